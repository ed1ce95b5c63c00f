"""What a first-time user of the `gymbus` command meets: waiting with no worker, environment
arguments checked against the environment, steps taken beside steps stored, names and evaluation
runs shown, quick failure with no stack running, JSON errors, and contradictions refused.

Most tests drive one stack of real processes through the real `gymbus` command; those about a
missing stack point the command at endpoints where nothing listens.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import STACK_ENV, gymbus_cli, make_stack, stack_fixture, wait_until

from gymbus.services.cli.runs import NO_WORKER_EVERY, WorkerNotice, parse_assignments
from gymbus.services.controller.validation import check_environment
from gymbus.services.ingest.store import Store
from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.services.viewers.live import VIEWER_TIMEOUT
from gymbus.shared.codec import decode_frame, encode_frame
from gymbus.shared.errors import ConfigError
from gymbus.shared.protocol import FrameKind
from gymbus.shared.runconfig import parse_config

pytestmark = pytest.mark.integration

stack = stack_fixture("newcomer", **STACK_ENV)

LAKE = ["--env", "FrozenLake-v1", "--algo", "q-learning"]
INT64_MAX = str(2**63 - 1)


def gymbus(stack: Stack, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return gymbus_cli(stack.process_env({"COLUMNS": "200"}), *args, timeout=timeout)


def gymbus_json(stack: Stack, *args: str, timeout: float = 90) -> Any:
    result = gymbus(stack, *args, "--json", timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def row_of(table: str, run_id: str) -> dict[str, str]:
    """The row of `run_id` in an aligned table, keyed by header (cells hold no two spaces)."""
    lines = table.splitlines()
    header = lines[0]
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 2:i] == "  ")]
    names = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    line = next(line for line in lines if line.startswith(run_id))
    cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    return dict(zip(names, cells, strict=True))


def status_rows(text: str) -> dict[str, str]:
    """`gymbus status`'s lines as label -> value (labels right-aligned, two spaces before the value)."""
    rows = {}
    for line in text.splitlines():
        label, _, value = line.strip().partition("  ")
        rows[label] = value.strip()
    return rows


# --- 1: waiting with no worker ------------------------------------------------------------------


def test_wait_says_no_worker_is_connected_and_keeps_waiting(tmp_path: Path) -> None:
    with make_stack(tmp_path / "home", **STACK_ENV) as bare:
        bare.start(("ingest", "broker", "controller"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "gymbus.services.cli", "submit", *LAKE, "--episodes", "20",
             "--wait"], env=bare.process_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        assert proc.stderr is not None

        def pump() -> None:
            for line in proc.stderr or ():
                lines.put(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        seen: list[str] = []

        def notice() -> bool:
            while not lines.empty():
                seen.append(lines.get())
            return any("no worker" in line for line in seen)

        try:
            wait_until(notice, 15, "submit --wait to say that no worker is connected")
            first_seen = time.monotonic()
            (said,) = [line for line in seen if "no worker" in line]
            assert "make up" in said and "python -m gymbus.worker" in said
            assert proc.poll() is None  # it keeps waiting
            bare.start_one("worker")
            assert proc.wait(60) == 0  # the worker came: the run ran to its end
        finally:
            proc.kill()
            proc.wait()
        reader.join(5)
        while not lines.empty():
            seen.append(lines.get())
        said_again = sum("no worker" in line for line in seen) - 1  # every 10 s, not every poll
        assert said_again <= (time.monotonic() - first_seen) / NO_WORKER_EVERY
        assert proc.stdout is not None and proc.stdout.read().strip()  # the run id


def test_the_no_worker_notice_comes_again_every_ten_seconds() -> None:
    notice = WorkerNotice()
    assert notice.due(100.0)  # at once
    notice.checked(100.0)
    assert not notice.due(105.0)
    assert notice.due(110.0)


# --- 5, 12: environment arguments, ranges -------------------------------------------------------


def lake(**env_kwargs: Any) -> str:
    return check_environment(parse_config({"env": "FrozenLake-v1", "algo": "q-learning",
                                           "episodes": 1, "env_kwargs": env_kwargs}))


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"is_slippery": "maybe"}, "env_kwargs.is_slippery: expected true or false, got 'maybe'"),
    ({"is_slippery": 2}, "env_kwargs.is_slippery: expected true or false, got 2"),
    ({"success_rate": "abc"}, "env_kwargs.success_rate: expected a number, got 'abc'"),
    ({"map_name": 5}, "env_kwargs.map_name: expected a string, got 5"),
    ({"map_name": "5x5"}, "env_kwargs.map_name: FrozenLake-v1 has no map_name '5x5' (it has '4x4', '8x8')"),
    ({"colour": "red"}, "env_kwargs.colour: FrozenLake-v1 takes no argument colour (it takes"),
])
def test_env_args_are_checked_against_the_environment(kwargs: dict[str, Any],
                                                      expected: str) -> None:
    with pytest.raises(ConfigError) as refused:
        lake(**kwargs)
    assert str(refused.value).startswith(expected), str(refused.value)


def test_env_args_of_the_right_type_pass() -> None:
    assert lake(is_slippery=False, map_name="8x8", success_rate=0.5) == "discrete"
    assert lake(is_slippery=0, render_mode="ansi") == "discrete"


def test_the_cli_refuses_a_bad_env_arg_naming_the_field(stack: Stack) -> None:
    result = gymbus(stack, "submit", *LAKE, "--episodes", "5", "--env-arg", "is_slippery=maybe")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "error: env_kwargs.is_slippery: expected true or false, got 'maybe'")
    result = gymbus(stack, "submit", *LAKE, "--episodes", "5", "--env-arg", "map_name=5x5")
    assert result.returncode == 2, result.stderr
    assert "env_kwargs.map_name:" in result.stderr and "'4x4', '8x8'" in result.stderr


def test_out_of_range_numbers_name_the_field_and_the_range(tmp_path: Path) -> None:
    env = dead_env(tmp_path)  # refused before any service is asked
    for args, field in [(["--episodes", "100000000000000000000"], "episodes:"),
                        (["--episodes", "5", "--seed", "100000000000000000000"], "seed:"),
                        (["--episodes", "5", "--agent-arg", "learning_starts=1e30"],
                         "agent.learning_starts:"),
                        (["--episodes", "5", "--env-arg", "n=100000000000000000000"],
                         "env_kwargs.n:")]:
        result = gymbus_cli(env, "submit", *LAKE, *args, timeout=30)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(f"error: {field}"), result.stderr
        if field != "agent.learning_starts:":
            assert INT64_MAX in result.stderr, result.stderr
        assert "cannot encode" not in result.stderr


def test_assignments_keep_dates_as_text() -> None:
    assert parse_assignments(("day=2024-01-01", "x=0.5", "ok=true", "m=8x8"), "--env-arg") == {
        "day": "2024-01-01", "x": 0.5, "ok": True, "m": "8x8"}


# --- 6, 10, 11, 13: what status and runs show -------------------------------------------------


@pytest.fixture(scope="module")
def fast_run(stack: Stack) -> str:
    result = gymbus(stack, "submit", *LAKE, "--episodes", "200", "--fast", "--name", "lake-label",
                    "--wait")
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    wait_until(lambda: gymbus_json(stack, "status", run_id)["complete"], 20, "the run stored")
    return run_id


def test_a_fast_run_shows_steps_taken_and_steps_stored(stack: Stack, fast_run: str) -> None:
    taken = json.loads((stack.settings.run_dir(fast_run) / "result.json").read_text())["steps"]
    assert taken > 200
    record = gymbus_json(stack, "status", fast_run)
    assert (record["steps"], record["steps_stored"]) == (taken, 0)
    listed = {r["run_id"]: r for r in gymbus_json(stack, "runs")}[fast_run]
    assert (listed["steps"], listed["steps_stored"]) == (taken, 0)
    shown = status_rows(gymbus(stack, "status", fast_run).stdout)
    assert (shown["steps"], shown["steps stored"]) == (str(taken), "0")
    row = row_of(gymbus(stack, "runs").stdout, fast_run)
    assert (row["STEPS"], row["STEPS STORED"]) == (str(taken), "0")


def test_the_demos_table_shows_the_steps_a_fast_run_took(
        stack: Stack, fast_run: str, capsys: pytest.CaptureFixture[str]) -> None:
    from gymbus.services.ingest.client import StoreClient
    from gymbus.services.stack import demo
    from gymbus.shared.transport import Client

    taken = json.loads((stack.settings.run_dir(fast_run) / "result.json").read_text())["steps"]
    with Client(stack.settings.controller, "controller") as controller, \
            StoreClient(stack.settings) as store:
        demo.watch(controller, store, [fast_run])  # the run has ended: one table, then back
    row = row_of(capsys.readouterr().out.strip(), fast_run[-8:])
    assert row["STEPS"] == str(taken) and taken > 200, row  # not the 0 step rows it stored


def test_the_name_is_shown_in_runs_and_status(stack: Stack, fast_run: str) -> None:
    assert row_of(gymbus(stack, "runs").stdout, fast_run)["NAME"] == "lake-label"
    assert status_rows(gymbus(stack, "status", fast_run).stdout)["name"] == "lake-label"


def test_status_rows_are_labelled_for_people_and_json_keys_stay(stack: Stack,
                                                                fast_run: str) -> None:
    text = gymbus(stack, "status", fast_run).stdout
    shown = status_rows(text)
    assert "created_ns" not in shown and "created" in shown
    assert shown["created"][:2] == "20" and ":" in shown["created"]  # a date and time
    assert shown["mode"] == "fast" and shown["stored"] == "complete"
    assert sum(label == "telemetry" for label in shown) <= 1
    assert [line.split()[0] for line in text.splitlines()].count("telemetry") <= 1
    record = gymbus_json(stack, "status", fast_run)
    assert {"run_id", "name", "status", "env", "algo", "telemetry", "worker_id", "reason",
            "created_ns", "frames_emitted", "frames_stored", "gaps", "duplicates", "complete",
            "episodes", "steps"} <= set(record)
    assert record["telemetry"] == "fast" and isinstance(record["created_ns"], int)


def test_runs_marks_evaluation_runs(stack: Stack, fast_run: str) -> None:
    result = gymbus(stack, "submit", "--eval-from", fast_run, "--episodes", "5", "--wait")
    assert result.returncode == 0, result.stderr
    eval_id = result.stdout.strip()
    assert row_of(gymbus(stack, "runs").stdout, eval_id)["ALGO"] == "eval:q-learning"
    assert row_of(gymbus(stack, "runs").stdout, fast_run)["ALGO"] == "q-learning"
    listed = {r["run_id"]: r for r in gymbus_json(stack, "runs")}
    assert listed[eval_id]["evaluation"] and not listed[fast_run]["evaluation"]
    assert listed[eval_id]["eval_from"] == fast_run


def test_a_step_budget_run_shows_its_steps_while_it_waits(stack: Stack) -> None:
    result = gymbus(stack, "submit", "--env", "CartPole-v1", "--algo", "dqn", "--total-steps",
                    "1500", "--fast", "--wait", timeout=120)
    assert result.returncode == 0, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "steps 1500/1500 (100%)" in last, result.stderr
    assert "episodes 0" not in last
    assert "no worker" not in result.stderr


def test_replay_of_an_absent_episode_exits_4(stack: Stack, fast_run: str) -> None:
    result = gymbus(stack, "replay", fast_run, "--episode", "100000")
    assert result.returncode == 4, result.stderr
    assert "episodes 0 to 199" in result.stderr


# --- 13: contradictions -------------------------------------------------------------------------


def test_csv_and_json_together_are_refused(tmp_path: Path) -> None:
    result = gymbus_cli(dead_env(tmp_path), "query", "SELECT 1", "--csv", "--json", timeout=30)
    assert result.returncode == 2, result.stderr
    message = json.loads(result.stdout)["error"]["message"]
    assert "--csv" in message and "--json" in message
    result = gymbus_cli(dead_env(tmp_path), "query", "--csv", "SELECT 1", "--json", timeout=30)
    assert result.returncode == 2
    assert "did not answer" not in result.stdout  # refused before the store was asked


@pytest.mark.parametrize("args", [
    ["submit", *LAKE, "--episodes", "5", "--seed", "1", "--seed", "2"],
    ["submit", *LAKE, "--episodes", "5", "--episodes=6"],
    ["query", "SELECT 1", "--max-rows", "1", "--max-rows", "2"],
])
def test_a_single_value_option_given_twice_is_refused(tmp_path: Path, args: list[str]) -> None:
    result = gymbus_cli(dead_env(tmp_path), *args, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "more than once" in result.stderr
    assert "did not answer" not in result.stderr


# --- 9: no stack running ------------------------------------------------------------------------


def dead_env(tmp_path: Path, timeout: float = 2.0) -> dict[str, str]:
    """The environment of a `gymbus` pointed at endpoints where nothing listens."""
    env = Stack(free_endpoints(tmp_path / "home")).process_env()
    return {**env, "GYMBUS_REQUEST_TIMEOUT": f"{timeout:g}"}


def timed(env: dict[str, str], *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    """The command's result, and the seconds it took beyond a `gymbus --help` timed just before
    it (the start-up alone: on a loaded machine it takes seconds, whatever the command does)."""
    started = time.monotonic()
    gymbus_cli(env, "--help", timeout=60)
    start_up = time.monotonic() - started
    started = time.monotonic()
    result = gymbus_cli(env, *args, timeout=60)
    return time.monotonic() - started - start_up, result


def write_one_run(db_path: Path, run_id: str) -> None:
    """A DuckDB file holding one finished fast-mode run of two episodes (no ingest running)."""
    def frame(kind: FrameKind, seq: int, body: dict[str, Any]) -> Any:
        return decode_frame(list(encode_frame(kind, run_id, seq, body, agent_id="agent-0",
                                              worker_id="w1", ts_ns=1_700_000_000 + seq)))
    store = Store(db_path)
    try:
        for f in (frame(FrameKind.LIFECYCLE, 0, {"event": "run_started", "config": {
                      "env": "FrozenLake-v1", "algo": "q-learning", "telemetry": "fast"}}),
                  frame(FrameKind.EPISODE, 1, {
                      "episode": [0, 1], "return": [0.0, 1.0], "length": [3, 5],
                      "terminated": [True, True], "truncated": [False, False],
                      "ts_ns": [1, 2]}),
                  frame(FrameKind.LIFECYCLE, 2, {"event": "run_completed", "status": "completed",
                                                 "frames_emitted": 3, "reason": None})):
            assert store.add(f)
    finally:
        store.close()


#: the request timeout of the commands timed below. A command that waited for two services in
#: turn would take twice this beyond its start-up; one that waits for one, once, and then reads
#: the file takes less (a loaded machine stretches the file's reads, not the timeout)
TIMEOUT = 3.0


def test_with_no_stack_each_command_fails_or_falls_back_within_the_timeout(
        tmp_path: Path) -> None:
    env = dead_env(tmp_path, timeout=TIMEOUT)
    took, result = timed(env, "submit", *LAKE, "--episodes", "5")
    assert result.returncode == 3 and "within 3 s" in result.stderr, result.stderr
    assert took < 2 * TIMEOUT, took
    took, result = timed(env, "query", "SELECT 1")
    assert result.returncode == 3 and "within 3 s" in result.stderr, result.stderr
    assert took < 2 * TIMEOUT, took

    run_id = "01NEWCOMER0000000000000000"
    Path(env["GYMBUS_HOME"]).mkdir(parents=True, exist_ok=True)
    write_one_run(Path(env["GYMBUS_HOME"]) / "gymbus.duckdb", run_id)
    took, result = timed(env, "replay", run_id, "--episode", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["length"] == 5
    assert took < 2 * TIMEOUT, took


def test_watch_once_with_no_stack_falls_back_within_the_timeout(tmp_path: Path) -> None:
    # the viewer's own timeout, 2 s, is the shorter: the controller and the ingest are asked at
    # once, so it waits 2 s, not 4
    env = dead_env(tmp_path, timeout=TIMEOUT)
    took, result = timed(env, "watch", "--once")
    assert result.returncode == 0, result.stderr
    assert "controller down" in result.stdout and "ingest down" in result.stdout
    assert took < 2 * VIEWER_TIMEOUT, took


def test_under_json_errors_are_json_on_stdout(tmp_path: Path) -> None:
    env = dead_env(tmp_path, timeout=0.5)
    result = gymbus_cli(env, "runs", "--json", timeout=30)
    assert result.returncode == 3
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "unavailable" and "did not answer within 0.5 s" in error["message"]
    result = gymbus_cli(env, "submit", *LAKE, "--episodes", "-5", "--json", timeout=30)
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert (error["code"], error["field"]) == ("invalid_config", "episodes")
    result = gymbus_cli(env, "submit", "--json", *LAKE, "--episodes", "x", timeout=30)
    assert result.returncode == 2
    assert "--episodes" in json.loads(result.stdout)["error"]["message"]
    result = gymbus_cli(env, "runs", timeout=30)  # without --json: one line on stderr
    assert result.returncode == 3 and not result.stdout
    assert result.stderr.startswith("error: the controller")
