"""TensorBoard: event files read back by TensorBoard's own reader, aggregation, flushing, and the
`gymbus import-tb` and `gymbus tensorboard` commands against a real stack.

A run's event files at its end, at cancel and at failure are checked in test_child.py.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import gymbus_cli, gymbus_cli_json, stack_fixture, wait_until

from gymbus.services.cli.tbimport import RUN_ID_PREFIX
from gymbus.services.stack.launcher import Stack
from gymbus.shared.protocol import Command
from gymbus.shared.transport import Client
from gymbus.worker.telemetry.tensorboard import (
    FILE_SUFFIX,
    EventFileWriter,
    ScalarLog,
    TensorBoardError,
    aggregate,
    crc32c,
    encode_event,
    masked_crc32c,
)


def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under `folder`, by tag, as TensorBoard's EventAccumulator reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def rows(tag: str, values: list[float], step0: int = 0) -> list[tuple[str, int, float, int]]:
    return [(tag, step0 + 10 * i, v, 1_700_000_000_000_000_000 + i) for i, v in enumerate(values)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


# --- the writer -----------------------------------------------------------------------------------


def test_crc32c_is_tfrecords_checksum() -> None:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    for data in (b"", b"\x00" * 7, bytes(range(256)), b"brain.Event:2"):
        assert masked_crc32c(data) == reference(data)


def test_events_are_encoded_as_tensorboards_own_protos_encode_them() -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2

    def reference(wall_time: float, step: int, scalars: list[tuple[str, float]]) -> bytes:
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v)
                                             for t, v in scalars])
        return event_pb2.Event(wall_time=wall_time, step=step,
                               summary=summary).SerializeToString()

    assert encode_event(1.7e9, file_version="brain.Event:2") == event_pb2.Event(
        wall_time=1.7e9, file_version="brain.Event:2").SerializeToString()
    cases = [
        (1_700_000_000.25, 0, [("charts/episodic_return", 0.0)]),  # step 0, value 0: written
        (0.0, 1, [("", 1.5)]),  # no time, no tag
        (12.5, -7, [("losses/td_loss", -3.25), ("charts/SPS", 1e300)]),  # > float32: inf
        (3.0, 2**40 + 3, [("a", float("-inf")), ("é/ü", 1e-50), ("b", -1e300)]),
        (-0.0, 127, [("x", 128.0)]), (5.0, 128, []),
    ]
    for wall_time, step, scalars in cases:
        assert encode_event(wall_time, step, scalars=scalars) == \
            reference(wall_time, step, scalars), (wall_time, step, scalars)
    nan = event_pb2.Event.FromString(encode_event(1.0, 3, scalars=[("n", float("nan"))]))
    assert nan.step == 3 and math.isnan(nan.summary.value[0].simple_value)


def test_event_file_is_read_back_by_tensorboard(tmp_path: Path) -> None:
    log = ScalarLog(tmp_path)
    log.add_rows(rows("charts/episodic_return", [1.0, 0.0, 1.0]) + rows("charts/SPS", [5000.0]))
    log.close()
    assert log.path is not None and log.path.name.startswith("events.out.tfevents.")
    assert log.path.name.endswith(FILE_SUFFIX)
    scalars = read_tensorboard(tmp_path)
    assert scalars["charts/episodic_return"] == [(0, 1.0), (10, 0.0), (20, 1.0)]
    assert scalars["charts/SPS"] == [(0, 5000.0)]
    assert log.stats() == {"path": str(log.path), "values": 4, "points": 4, "flushes": 1,
                           "error": None}


def test_many_values_are_averaged_in_runs_few_are_kept() -> None:
    batch = rows("a", [1.0, 2.0, 3.0]) + rows("b", [float(v) for v in range(10)], step0=1)
    events = aggregate(batch, max_points=4)
    a = [(step, dict(values)["a"]) for step, _, values in events if "a" in dict(values)]
    b = [(step, dict(values)["b"]) for step, _, values in events if "b" in dict(values)]
    assert a == [(0, 1.0), (10, 2.0), (20, 3.0)]
    # 10 values in 4 runs: [0, 1], [2, 3, 4], [5, 6], [7, 8, 9], each at its last step
    assert b == [(11, 0.5), (41, 3.0), (61, 5.5), (91, 8.0)]
    assert [step for step, _, _ in events] == sorted(step for step, _, _ in events)


def test_series_are_averaged_as_rows_are(tmp_path: Path) -> None:
    import numpy as np

    def series(tag: str, values: list[float], step0: int = 0) -> Any:
        r = rows(tag, values, step0)
        return (tag, np.array([x[1] for x in r]), np.array(values), np.array([x[3] for x in r]))

    b = [float(v) for v in range(10)]
    # a series averages as the same values as rows would, split over two batches or not
    as_rows = aggregate(rows("b", b, step0=1), max_points=4)
    assert aggregate([], 4, [series("b", b, step0=1)]) == as_rows
    assert aggregate([], 4, [series("b", b[:3], step0=1), series("b", b[3:], step0=31)]) == as_rows
    assert aggregate([], 4, [series("a", [1.0, 2.0])]) == aggregate(rows("a", [1.0, 2.0]), 4)
    # a tag given both ways: its values joined in the order they came
    joined = aggregate(rows("b", b[:5], step0=1), 4, [series("b", b[5:], step0=51)])
    assert joined == as_rows
    # inf and -inf in one run: NaN, as for rows
    mixed = aggregate([], 1, [series("c", [math.inf, -math.inf])])
    assert math.isnan(mixed[0][2][0][1])

    log = ScalarLog(tmp_path)  # a batch of episodes: both of CleanRL's curves
    _, steps, lengths, ts = series("charts/episodic_length", [10.0, 12.0, 9.0])
    log.add_episodes(steps, np.array([1.0, 0.0, 2.5]), lengths.astype(np.int64), ts)
    log.close()
    assert read_tensorboard(tmp_path) == {
        "charts/episodic_length": [(0, 10.0), (10, 12.0), (20, 9.0)],
        "charts/episodic_return": [(0, 1.0), (10, 0.0), (20, 2.5)]}
    assert log.stats()["values"] == 6


def test_the_file_is_flushed_on_an_interval_and_at_close(tmp_path: Path) -> None:
    clock = FakeClock()
    log = ScalarLog(tmp_path, flush_seconds=1.0, clock=clock)
    log.add_rows(rows("charts/epsilon", [0.9]))
    assert read_tensorboard(tmp_path) == {}  # buffered in the process
    clock.now += 1.0
    log.add_rows(rows("charts/epsilon", [0.8], step0=10))
    flushed = read_tensorboard(tmp_path)["charts/epsilon"]
    assert [s for s, _ in flushed] == [0, 10]
    assert [v for _, v in flushed] == pytest.approx([0.9, 0.8])  # float32, as TensorBoard keeps
    log.add_rows(rows("charts/epsilon", [0.7], step0=20))
    log.close()
    log.close()  # idempotent
    log.add_rows(rows("charts/epsilon", [0.6], step0=30))  # after close: ignored
    assert read_tensorboard(tmp_path)["charts/epsilon"][-1] == (20, pytest.approx(0.7))


def test_a_failing_disk_never_fails_the_run(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    log = ScalarLog(not_a_folder)
    assert log.error is not None and log.path is None
    log.add_rows(rows("charts/epsilon", [0.5]))
    log.close()
    writer = EventFileWriter(tmp_path / "ok")
    writer.close()
    with pytest.raises(TensorBoardError):
        writer.add_scalars(1, 0.0, [("x", 1.0)])


# --- gymbus import-tb and gymbus tensorboard, against a real stack --------------------------------


stack = stack_fixture("tbstack", GYMBUS_HEARTBEAT_INTERVAL="0.25")


def gymbus(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return gymbus_cli(stack.process_env(), *args)


def gymbus_json(stack: Stack, *args: str) -> Any:
    return gymbus_cli_json(stack.process_env(), *args)


def query(stack: Stack, sql: str) -> list[dict[str, Any]]:
    """Rows of a read-only query, asked of the ingest from this process."""
    with Client(stack.settings.ingest, "ingest") as ingest:
        reply = ingest.request(Command.QUERY, {"sql": sql})
    return [dict(zip(reply["columns"], row)) for row in reply["rows"]]


def metric_rows(stack: Stack, run_id: str) -> int:
    return int(query(stack, f"SELECT count(*) AS n FROM metrics WHERE run_id = '{run_id}'")[0]["n"])


def run_to_end(stack: Stack, config: dict[str, Any]) -> str:
    """Submit a run from this process and wait until the ingest holds all of it."""
    with Client(stack.settings.controller, "controller") as controller:
        run_id = str(controller.request(Command.SUBMIT, {"config": config})["run_id"])
    with Client(stack.settings.ingest, "ingest") as ingest:
        def complete() -> bool:
            runs = ingest.request(Command.RUN_STATS, {})["runs"]
            return any(r["run_id"] == run_id and r["complete"] for r in runs)
        wait_until(complete, 30, f"run {run_id} to be stored whole")
    return run_id


@pytest.fixture(scope="module")
def fast_run(stack: Stack) -> str:
    return run_to_end(stack, {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 300,
                              "seed": 2, "telemetry": "fast"})


def test_import_tb_of_a_run_stores_its_points_once(stack: Stack, fast_run: str) -> None:
    scalars = read_tensorboard(stack.settings.run_dir(fast_run))
    assert {"charts/episodic_return", "charts/episodic_length", "charts/epsilon"} <= set(scalars)
    points = sum(len(v) for v in scalars.values())
    (first,) = gymbus_json(stack, "import-tb", fast_run)
    assert first["run_id"] == RUN_ID_PREFIX + fast_run
    assert first["points"] == first["new_rows"] == points and first["already_stored"] == 0
    assert metric_rows(stack, first["run_id"]) == points
    (again,) = gymbus_json(stack, "import-tb", str(stack.settings.run_dir(fast_run)))
    assert again["run_id"] == first["run_id"]
    assert again["new_rows"] == 0 and again["already_stored"] == points
    assert metric_rows(stack, first["run_id"]) == points
    stats = query(stack, f"SELECT complete, duplicates, env FROM runs "
                         f"WHERE run_id = '{first['run_id']}'")[0]
    assert stats["complete"] is True and stats["duplicates"] == again["frames"]
    assert stats["env"] == "FrozenLake-v1"
    # the controller never made it: `gymbus runs` lists it from the store
    listed = [r for r in gymbus_json(stack, "runs") if r["run_id"] == first["run_id"]]
    assert [(r["env"], r["source"]) for r in listed] == [("FrozenLake-v1", "store")]
    assert first["run_id"][-8:] in gymbus(stack, "runs").stdout


def test_import_tb_of_another_tools_files(stack: Stack, tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter  # what CleanRL and Stable-Baselines3 use

    folder = tmp_path / "runs" / "CartPole-v1__dqn__1__1700000000"
    writer = SummaryWriter(str(folder))
    writer.add_text("hyperparameters", "|param|value|")  # not a scalar: left out
    for step in range(0, 500, 100):
        writer.add_scalar("charts/episodic_return", step / 10, step)  # CleanRL: simple_value
        writer.add_scalar("rollout/ep_rew_mean", step / 5, step, new_style=True)  # SB3: tensor
    writer.add_scalar("losses/td_loss", float("nan"), 500)  # the protocol refuses NaN
    writer.close()
    (result,) = gymbus_json(stack, "import-tb", str(tmp_path / "runs"))
    assert result["run_id"].startswith(RUN_ID_PREFIX + "CartPole-v1__dqn__1__1700000000-")
    counts = (result["points"], result["tags"], result["skipped"], result["new_rows"])
    assert counts == (10, 2, 1, 10)
    stored = query(stack, f"SELECT name, step, value FROM metrics WHERE run_id = "
                          f"'{result['run_id']}' ORDER BY name, step")
    assert [(r["name"], r["step"], r["value"]) for r in stored][:2] == [
        ("charts/episodic_return", 0, 0.0), ("charts/episodic_return", 100, 10.0)]
    assert [r["value"] for r in stored if r["name"] == "rollout/ep_rew_mean"][-1] == 80.0
    assert gymbus_json(stack, "import-tb", str(folder))[0]["new_rows"] == 0
    # the files change (a run still writing): that import is refused, nothing is mixed in
    writer = SummaryWriter(str(folder))
    writer.add_scalar("charts/episodic_return", 99.0, 600)
    writer.close()
    changed = gymbus(stack, "import-tb", str(folder))
    assert changed.returncode == 5 and "other contents" in changed.stderr
    assert metric_rows(stack, result["run_id"]) == 10


def test_import_tb_says_what_is_missing(stack: Stack, tmp_path: Path) -> None:
    assert gymbus(stack, "import-tb", "01NOSUCHRUN").returncode == 4
    empty = gymbus(stack, "import-tb", str(tmp_path))
    assert empty.returncode == 4 and "no TensorBoard event files" in empty.stderr


def test_gymbus_tensorboard_serves_the_runs_folder(stack: Stack, fast_run: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "gymbus.services.cli", "tensorboard",
                             "--port", "0"], env=stack.process_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert url.startswith("http://127.0.0.1:"), url

        def get(path: str) -> Any:
            with urllib.request.urlopen(url.rstrip("/") + path, timeout=5) as response:
                return json.loads(response.read())

        wait_until(lambda: fast_run in get("/data/runs"), 30, "TensorBoard to load the run")
        query = f"/data/plugin/scalars/scalars?run={fast_run}&tag=charts/episodic_length"
        points = wait_until(lambda: get(query), 30, "the run's scalars")
        assert len(points) > 0 and all(p[2] > 0 for p in points)  # [wall_time, step, value]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
    assert code == 0
    tensorboards = [p for p in Path("/proc").iterdir() if p.name.isdigit()
                    and b"tensorboard.main" in _cmdline(p)
                    and str(stack.settings.runs_dir).encode() in _cmdline(p)]
    assert tensorboards == []  # stopped with the command


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""

