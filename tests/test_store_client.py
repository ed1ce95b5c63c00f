"""The one store client (ingest first, then the DuckDB file read-only, else one error) and the
named queries, on a real DuckDB file written by the ingest's store and a real ingest process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import wait_until

from gymbus.services.ingest.client import StoreClient
from gymbus.services.ingest.store import Store
from gymbus.shared import queries
from gymbus.shared import settings as settings_mod
from gymbus.shared.codec import Frame, decode_frame, encode_frame
from gymbus.shared.errors import (
    ExitCode,
    RemoteError,
    ServiceUnavailable,
    StoreUnavailable,
)
from gymbus.shared.protocol import Command, ErrorCode, FrameKind
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client

#: two runs, named so that RUN sorts first, and one whose id holds a quote
RUN, OTHER, QUOTED = "01RUNA0000000000000000000A", "01RUNB0000000000000000000B", "o'brien"
T0_NS = 1_700_000_000_000_000_000
MAX_SEQ = 2**62
#: the request timeout where no ingest answers: short, each read waits it out first
DOWN_TIMEOUT = 0.3


def frame(kind: FrameKind, run_id: str, seq: int, body: dict[str, Any]) -> Frame:
    """A frame as the ingest gets it: encoded by the codec, then decoded and checked."""
    parts = encode_frame(kind, run_id, seq, body, agent_id="agent-0", worker_id="w1",
                         ts_ns=T0_NS + seq)
    return decode_frame(list(parts))


def started(run_id: str, **config: Any) -> Frame:
    return frame(FrameKind.LIFECYCLE, run_id, 0, {"event": "run_started", "config": config})


def completed(run_id: str, seq: int) -> Frame:
    return frame(FrameKind.LIFECYCLE, run_id, seq, {
        "event": "run_completed", "status": "completed", "frames_emitted": seq + 1,
        "reason": None})


def steps(run_id: str, seq: int, episode: int, obs: list[int]) -> Frame:
    n = len(obs)
    return frame(FrameKind.STEP, run_id, seq, {
        "episode": [episode] * n, "step": list(range(n)), "action": [1] * n, "obs": obs,
        "reward": [0.0] * (n - 1) + [1.0], "terminated": [False] * (n - 1) + [True],
        "truncated": [False] * n, "label": ["explore"] * n})


def episodes(run_id: str, seq: int, returns: list[float], lengths: list[int]) -> Frame:
    n = len(returns)
    return frame(FrameKind.EPISODE, run_id, seq, {
        "episode": list(range(n)), "return": returns, "length": lengths,
        "terminated": [True] * n, "truncated": [False] * n, "ts_ns": [T0_NS] * n})


def metrics(run_id: str, seq: int, points: list[tuple[str, int, float]]) -> Frame:
    return frame(FrameKind.METRIC, run_id, seq, {
        "name": [p[0] for p in points], "step": [p[1] for p in points],
        "value": [p[2] for p in points], "ts_ns": [T0_NS] * len(points)})


def write_store(path: Path) -> None:
    """RUN: two episodes with steps, SPS and epsilon metrics, complete; OTHER: a fast-mode run
    with one episode; QUOTED: only started."""
    store = Store(path)
    try:
        for f in (
            started(RUN, env="FrozenLake-v1", algo="q-learning", telemetry="full", seed=3,
                    env_kwargs={"is_slippery": False}),
            steps(RUN, 1, 0, [0, 1, 2]),
            steps(RUN, 2, 1, [0, 4]),
            episodes(RUN, 3, [1.0, 0.0], [3, 2]),
            metrics(RUN, 4, [("charts/SPS", 3, 100.0), ("charts/epsilon", 3, 0.5)]),
            metrics(RUN, 5, [("charts/SPS", 5, 120.0)]),
            completed(RUN, 6),
            started(OTHER, env="Taxi-v4", algo="q-learning", telemetry="fast"),
            episodes(OTHER, 1, [-5.0], [200]),
            completed(OTHER, 2),
            started(QUOTED, env="CliffWalking-v1", algo="random", telemetry="full"),
        ):
            assert store.add(f)
    finally:
        store.close()


@pytest.fixture
def settings(gymbus_env: dict[str, str]) -> Settings:
    """Settings of a home whose DuckDB file the ingest's store wrote (no ingest runs yet)."""
    s = settings_mod.load(gymbus_env)
    s.home.mkdir(parents=True, exist_ok=True)
    write_store(s.db_path)
    return s


def answers(client: Client) -> bool:
    try:
        return client.request(Command.PING, timeout=0.5) == {"service": "ingest"}
    except ServiceUnavailable:
        return False


@contextmanager
def ingest_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The real ingest on `env`'s home and endpoints, answering ping; killed at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gymbus.services.ingest"],
                                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    def up(client: Client) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the ingest exited {proc.returncode}: {log.read_text()[-2000:]}")
        return answers(client)

    try:
        with Client(env["GYMBUS_INGEST"], "ingest") as client:
            wait_until(lambda: up(client), 20, "the ingest to answer ping")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()  # a stopped (SIGSTOP) process dies of SIGKILL too
        proc.wait(timeout=10)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the named queries, on the store's file ------------------------------------------------------


def test_values_are_quoted_as_literals() -> None:
    assert queries.sql_str("it's") == "'it''s'"
    assert queries.sql_strs(["a", "b'c"]) == "('a', 'b''c')"
    assert queries.sql_strs([]) == "(NULL)"
    with pytest.raises(ValueError):
        queries.episode(RUN, "1; DROP TABLE steps")  # type: ignore[arg-type]


def test_the_named_queries_return_the_stored_rows(settings: Settings) -> None:
    before = digest(settings.db_path)
    with StoreClient(settings, DOWN_TIMEOUT) as store:  # no ingest: every read is the file's
        rows = store.rows
        (run,) = rows(queries.run(RUN))
        assert (run["run_id"], run["agent_id"], run["env"], run["algo"], run["telemetry"]) == (
            RUN, "agent-0", "FrozenLake-v1", "q-learning", "full")
        assert json.loads(run["config"])["env_kwargs"] == {"is_slippery": False}
        assert json.loads(rows(queries.run_config(RUN))[0]["config"])["seed"] == 3
        assert rows(queries.run_config("no-such-run")) == []
        assert rows(queries.run(QUOTED))[0]["env"] == "CliffWalking-v1"
        assert rows(queries.run("x' OR '1' = '1")) == []  # a value, never SQL

        assert [r["seq"] for r in rows(queries.stored_seqs(RUN, 0, MAX_SEQ))] == list(range(7))
        assert [r["seq"] for r in rows(queries.stored_seqs(RUN, 2, 4))] == [2, 3, 4]
        events = {r["event"]: r for r in rows(queries.lifecycle_events(RUN, 0, 6))}
        assert set(events) == {"run_started", "run_completed"}
        assert events["run_completed"]["frames_emitted"] == 7
        assert rows(queries.lifecycle_events(RUN, 1, 5)) == []
        assert rows(queries.latest_episodes(RUN, 0, 6, 1)) == [
            {"seq": 3, "episode": 1, "return": 0.0, "length": 2}]
        assert [r["episode"] for r in rows(queries.latest_episodes(RUN, 0, 6, 10))] == [1, 0]
        assert rows(queries.latest_metric(RUN, 0, 6, "charts/SPS")) == [
            {"seq": 5, "value": 120.0}]
        assert rows(queries.latest_metric(RUN, 0, 4, "charts/SPS")) == [
            {"seq": 4, "value": 100.0}]
        (last,) = rows(queries.latest_step(RUN, 0, 6))
        assert (last["seq"], last["episode"], last["step"], last["obs"]) == (2, 1, 1, 4)
        assert rows(queries.latest_step(RUN, 3, 6)) == []

        assert rows(queries.episode(RUN, 0)) == [
            {"episode": 0, "return": 1.0, "length": 3, "terminated": True, "truncated": False}]
        assert rows(queries.episode(RUN, 5)) == []
        assert rows(queries.episode_span(RUN)) == [{"n": 2, "lo": 0, "hi": 1}]
        assert rows(queries.episode_span("no-such-run"))[0]["n"] == 0
        ep0 = rows(queries.episode_steps(RUN, 0))
        assert [(s["step"], s["obs"], s["obs_vec"], s["label"]) for s in ep0] == [
            (0, 0, None, "explore"), (1, 1, None, "explore"), (2, 2, None, "explore")]
        assert rows(queries.episode_steps(OTHER, 0)) == []  # fast mode: no steps

        summary = {r["name"]: r for r in rows(queries.metric_summary(RUN))}
        assert sorted(summary) == ["charts/SPS", "charts/episodic_length",
                                   "charts/episodic_return", "charts/epsilon"]
        assert (summary["charts/SPS"]["n"], summary["charts/SPS"]["last"]) == (2, 120.0)
        assert summary["charts/episodic_return"]["last"] == 0.0  # the last episode's
        assert (summary["charts/episodic_length"]["lo"],
                summary["charts/episodic_length"]["hi"]) == (2.0, 3.0)
        curves = rows(queries.metric_curves(RUN, 40))
        assert [r["v"] for r in curves if r["name"] == "charts/SPS"] == [100.0, 120.0]

        assert [r["return"] for r in rows(queries.returns(RUN))] == [1.0, 0.0]
        summaries = rows(queries.run_summaries([OTHER, RUN]))
        assert [(s["run_id"], s["status"], s["complete"], s["episodes"], s["steps_stored"],
                 s["mean_return_last_100"]) for s in summaries] == [
            (RUN, "completed", True, 2, 5, 0.5), (OTHER, "completed", True, 1, 0, -5.0)]
        assert rows(queries.run_summaries([])) == []
    assert digest(settings.db_path) == before  # read-only: the file did not change


# --- the client's one policy --------------------------------------------------------------------


def test_through_the_ingest_then_the_file_and_one_error_when_it_is_held(
        settings: Settings, gymbus_env: dict[str, str], tmp_path: Path) -> None:
    with ingest_process(gymbus_env, tmp_path / "ingest.log") as ingest:
        with StoreClient(settings) as store:
            via_ingest = store.rows(queries.episode_steps(RUN, 1))
            assert [s["obs"] for s in via_ingest] == [0, 4]
            with pytest.raises(duckdb.Error):  # the ingest holds the file: it answered, not it
                duckdb.connect(str(settings.db_path), read_only=True)
            stats = store.run_stats()
            assert stats[RUN]["complete"] and stats[RUN]["frames_stored"] == 7
            assert set(store.run_stats(RUN)) == {RUN}
            with pytest.raises(RemoteError) as unknown:
                store.run_stats("no-such-run")
            assert unknown.value.code is ErrorCode.UNKNOWN_RUN
            with pytest.raises(RemoteError) as refused:
                store.query("DELETE FROM runs")
            assert refused.value.code is ErrorCode.READ_ONLY

        ingest.send_signal(signal.SIGSTOP)  # up, holding the file, but answering nothing
        try:
            with StoreClient(settings, DOWN_TIMEOUT) as store, \
                    pytest.raises(StoreUnavailable) as held:
                store.rows(queries.run(RUN))
            message = str(held.value)
            assert settings.ingest in message and str(settings.db_path) in message
            assert "cannot be opened read-only" in message
            assert held.value.exit_code == ExitCode.UNAVAILABLE
            assert isinstance(held.value, ServiceUnavailable)
            cli = subprocess.run(
                [sys.executable, "-m", "gymbus.services.cli", "query", "SELECT 1"],
                env={**os.environ, **gymbus_env, "GYMBUS_REQUEST_TIMEOUT": str(DOWN_TIMEOUT)},
                capture_output=True, text=True, timeout=60, check=False)
            assert cli.returncode == ExitCode.UNAVAILABLE, cli.stderr
            assert settings.ingest in cli.stderr and str(settings.db_path) in cli.stderr
        finally:
            ingest.send_signal(signal.SIGCONT)
        ingest.terminate()  # it checkpoints and lets the file go
        ingest.wait(timeout=15)

    with StoreClient(settings, DOWN_TIMEOUT) as store:  # no ingest: the file, read-only
        assert store.rows(queries.episode_steps(RUN, 1)) == via_ingest
        with pytest.raises(ServiceUnavailable):
            store.run_stats()  # the accounting is the running ingest's alone
        with pytest.raises(RemoteError) as refused:
            store.query("DELETE FROM runs")
        assert refused.value.code is ErrorCode.READ_ONLY
    cli = subprocess.run(
        [sys.executable, "-m", "gymbus.services.cli", "query", "--json",
         queries.stored_seqs(RUN, 0, MAX_SEQ)],
        env={**os.environ, **gymbus_env, "GYMBUS_REQUEST_TIMEOUT": str(DOWN_TIMEOUT)},
        capture_output=True, text=True, timeout=60, check=False)
    assert cli.returncode == 0, cli.stderr
    assert [r["seq"] for r in json.loads(cli.stdout)] == list(range(7))


def test_with_neither_it_raises_one_error_naming_both(gymbus_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    settings = settings_mod.load({**gymbus_env, "GYMBUS_HOME": str(tmp_path / "empty")})
    assert not settings.db_path.exists()
    with StoreClient(settings, DOWN_TIMEOUT) as store, pytest.raises(StoreUnavailable) as absent:
        store.rows(queries.run(RUN))
    message = str(absent.value)
    assert settings.ingest in message and str(settings.db_path) in message
    assert "does not exist" in message
    assert (absent.value.endpoint, absent.value.db_path) == (settings.ingest,
                                                              str(settings.db_path))
    assert not settings.db_path.exists()  # reading never creates the file
