"""The real ingest process, fed by a test-owned XPUB (the broker's out side), asked by a Client."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import msgpack
import pytest
import zmq
from conftest import wait_until

from gymbus.shared.codec import encode_frame
from gymbus.shared.errors import RemoteError, ServiceUnavailable
from gymbus.shared.protocol import Command, ErrorCode, FrameKind, topic
from gymbus.shared.transport import Client

pytestmark = pytest.mark.integration

RUN = "01JD3Q6R8W4Y2M5N7P9QAZBXCE"
MAX_FRAME_BYTES = 64 * 1024


@dataclass
class Ingest:
    proc: subprocess.Popen[bytes]
    client: Client
    xpub: zmq.Socket[Any]
    db_path: Path

    def send(self, parts: list[bytes] | tuple[bytes, ...]) -> None:
        self.xpub.send_multipart(list(parts))

    def query(self, sql: str, **body: Any) -> dict[str, Any]:
        return self.client.request(Command.QUERY, {"sql": sql, **body})

    def scalar(self, sql: str) -> Any:
        return self.query(sql)["rows"][0][0]


def answers(client: Client) -> bool:
    try:
        return client.request(Command.PING, timeout=0.5) == {"service": "ingest"}
    except ServiceUnavailable:
        return False


def subscribed(xpub: zmq.Socket[Any]) -> bool:
    """True once the ingest's subscribe-to-everything message reached the XPUB."""
    while xpub.poll(0, zmq.POLLIN):
        if xpub.recv() == b"\x01":
            return True
    return False


@pytest.fixture
def ingest(gymbus_env: dict[str, str], tmp_path: Path) -> Iterator[Ingest]:
    env = {**os.environ, **gymbus_env, "GYMBUS_MAX_FRAME_BYTES": str(MAX_FRAME_BYTES)}
    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.LINGER, 0)
    xpub.bind(gymbus_env["GYMBUS_TELEMETRY_OUT"])
    client = Client(gymbus_env["GYMBUS_INGEST"], "ingest", timeout=5.0, ctx=ctx)
    with open(tmp_path / "ingest.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gymbus.services.ingest"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: subscribed(xpub), timeout=15, what="the ingest's subscription")
            wait_until(lambda: answers(client), timeout=10, what="the ingest to answer ping")
            yield Ingest(proc, client, xpub, Path(gymbus_env["GYMBUS_HOME"]) / "gymbus.duckdb")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            client.close()
            xpub.close()
            ctx.term()


def run_frames() -> list[tuple[bytes, bytes]]:
    """A whole small run: started, discrete and vector steps, episodes, a metric, completed."""
    def make(kind: FrameKind, seq: int, body: dict[str, Any]) -> tuple[bytes, bytes]:
        return encode_frame(kind, RUN, seq, body, agent_id="agent-0", worker_id="w1")

    step_body = {"episode": [0, 0], "step": [0, 1], "action": [2, 1], "reward": [0.0, 1.0],
                 "terminated": [False, True], "truncated": [False, False]}
    return [
        make(FrameKind.LIFECYCLE, 0, {"event": "run_started",
                                      "config": {"env": "FrozenLake-v1", "algo": "random"}}),
        make(FrameKind.STEP, 1, {**step_body, "obs": [4, 8], "label": ["explore", "exploit"]}),
        make(FrameKind.STEP, 2, {**step_body, "obs": [[0.1, 0.2], [0.3, 0.4]]}),
        make(FrameKind.EPISODE, 3, {"episode": [0], "return": [1.0], "length": [2],
                                    "terminated": [True], "truncated": [False],
                                    "ts_ns": [time.time_ns()]}),
        make(FrameKind.METRIC, 4, {"name": ["charts/epsilon"], "step": [2], "value": [0.9],
                                   "ts_ns": [time.time_ns()]}),
        make(FrameKind.LIFECYCLE, 5, {"event": "run_completed", "status": "completed",
                                      "frames_emitted": 6, "episodes": 1, "steps": 2}),
    ]


def received(ingest: Ingest) -> int:
    return int(ingest.client.request(Command.INGEST_STATS)["frames_received"])


def test_frames_are_stored_and_run_stats_add_up(ingest: Ingest) -> None:
    frames = run_frames()
    for parts in frames + frames[1:3]:  # two duplicates
        ingest.send(parts)
    wait_until(lambda: received(ingest) == 8, what="8 frames received")

    stats = ingest.client.request(Command.RUN_STATS, {"run_id": RUN})["runs"]
    assert stats == [{"run_id": RUN, "status": "completed", "frames_emitted": 6,
                      "frames_stored": 6, "last_seq": 5, "gaps": 0, "duplicates": 2,
                      "complete": True, "episodes": 1, "steps": 4, "metrics": 1,
                      "obs_not_stored": None, "rows_refused": None}]
    assert ingest.client.request(Command.RUN_STATS)["runs"] == stats
    totals = ingest.client.request(Command.INGEST_STATS)
    assert (totals["frames_stored"], totals["duplicates"], totals["pending"]) == (6, 2, 0)
    assert totals["rows"] == {"lifecycle": 2, "episodes": 1, "steps": 4, "metrics": 1}

    reply = ingest.query("SELECT seq, obs, obs_vec, label, reward FROM steps ORDER BY seq, step")
    assert reply["columns"] == ["seq", "obs", "obs_vec", "label", "reward"]
    assert reply["types"] == ["BIGINT", "BIGINT", "DOUBLE[]", "VARCHAR", "DOUBLE"]
    assert reply["rows"] == [[1, 4, None, "explore", 0.0], [1, 8, None, "exploit", 1.0],
                             [2, None, [0.1, 0.2], None, 0.0], [2, None, [0.3, 0.4], None, 1.0]]
    assert not reply["truncated"]
    started = ingest.scalar("SELECT started_at FROM runs")
    assert isinstance(started, str) and "T" in started  # ISO-8601
    cut = ingest.query("SELECT * FROM frames", max_rows=2)
    assert (len(cut["rows"]), cut["truncated"]) == (2, True)

    with pytest.raises(RemoteError) as unknown:
        ingest.client.request(Command.RUN_STATS, {"run_id": "nope"})
    assert unknown.value.code is ErrorCode.UNKNOWN_RUN


def test_malformed_frames_land_in_dead_letters_and_the_stream_goes_on(ingest: Ingest) -> None:
    good_topic, good = run_frames()[4]
    payload = msgpack.unpackb(good)
    bad = [
        [good_topic, os.urandom(64)],
        [good_topic, msgpack.packb({**payload, "v": 2})],
        [good_topic, msgpack.packb({**payload, "body": {**payload["body"], "value": [math.nan]}})],
        [good_topic, good, b"third part"],
        [topic(FrameKind.STEP, RUN), b"\x00" * (MAX_FRAME_BYTES + 1)],
    ]
    for parts in bad:
        ingest.send(parts)
    ingest.send(run_frames()[0])
    wait_until(lambda: ingest.scalar("SELECT count(*) FROM lifecycle") == 1, what="the valid frame")

    reasons = [row[0] for row in ingest.query("SELECT reason FROM dead_letters")["rows"]]
    assert len(reasons) == len(bad)
    assert any("version 2" in r for r in reasons) and any("NaN" in r for r in reasons)
    assert any("over the limit" in r for r in reasons) and any("2 parts" in r for r in reasons)
    assert ingest.client.request(Command.INGEST_STATS)["dead_letters"] == len(bad)
    assert ingest.proc.poll() is None


@pytest.mark.parametrize("sql", [
    "INSERT INTO runs (run_id) VALUES ('x')",
    "DROP TABLE steps",
    "CREATE TABLE evil (a INT)",
    "COPY steps TO 'steps.csv'",
    "SELECT 1; DELETE FROM steps",
    "EXPLAIN ANALYZE DELETE FROM steps",
    "UPDATE runs SET status = 'x'",
])
def test_write_statements_are_refused(ingest: Ingest, sql: str) -> None:
    with pytest.raises(RemoteError) as refused:
        ingest.query(sql)
    assert refused.value.code is ErrorCode.READ_ONLY
    assert "read-only" in str(refused.value)
    assert ingest.scalar("SELECT count(*) FROM information_schema.tables "
                         "WHERE table_name IN ('steps', 'evil')") == 1


def test_read_only_statements_and_failures(ingest: Ingest) -> None:
    assert ingest.query("DESCRIBE steps")["rows"][0][:2] == ["run_id", "VARCHAR"]
    assert ingest.query("SHOW TABLES")["rows"]
    assert ingest.query("SUMMARIZE metrics")["columns"][0] == "column_name"
    assert ingest.query("EXPLAIN SELECT * FROM steps")["rows"]
    reply = ingest.query("SELECT now() AS n, 1.5::DECIMAL(4, 2) AS d, uuid() AS u, "
                         "INTERVAL 90 SECOND AS i, 'x'::BLOB AS b")
    n, d, u, i, b = reply["rows"][0]
    assert isinstance(n, str) and d == 1.5 and len(u) == 36 and i == 90.0 and b == b"x"
    with pytest.raises(RemoteError) as failed:
        ingest.query("SELECT * FROM no_such_table")
    assert failed.value.code is ErrorCode.QUERY_FAILED and "no_such_table" in str(failed.value)
    with pytest.raises(RemoteError) as host_file:
        ingest.query("SELECT * FROM read_text('/etc/hostname')")
    assert host_file.value.code is ErrorCode.QUERY_FAILED
    with pytest.raises(RemoteError) as bad:
        ingest.client.request(Command.SUBMIT, {})
    assert bad.value.code is ErrorCode.BAD_REQUEST


def test_sigterm_flushes_checkpoints_and_exits_143(ingest: Ingest) -> None:
    frames = run_frames()
    for parts in frames[:3]:
        ingest.send(parts)
    wait_until(lambda: ingest.scalar("SELECT count(*) FROM frames") == 3, what="3 frames stored")
    for parts in frames[3:]:
        ingest.send(parts)
    # received, and most likely still buffered (ingest_stats does not flush) when the signal comes
    wait_until(lambda: received(ingest) == 6, what="6 frames received")

    ingest.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert ingest.proc.wait(timeout=5) == 143
    assert time.monotonic() - started < 5

    with duckdb.connect(str(ingest.db_path), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM frames").fetchall() == [(6,)]
        assert conn.execute("SELECT count(*) FROM steps").fetchall() == [(4,)]
        assert conn.execute("SELECT complete FROM runs").fetchall() == [(True,)]


def test_written_rows_are_checkpointed_without_being_asked(ingest: Ingest) -> None:
    """With nothing arriving, the ingest moves what it wrote from its WAL into the main file on
    its own (BACKGROUND_CHECKPOINT_S), so that a run's end waits for its last rows only."""
    for parts in run_frames():
        ingest.send(parts)
    wal = ingest.db_path.with_name(ingest.db_path.name + ".wal")
    # stored by the ingest's own flush (INGEST_STATS does not flush), then checkpointed
    wait_until(lambda: ingest.client.request(Command.INGEST_STATS)["frames_stored"] == 6,
               timeout=10, what="the frames flushed")
    wait_until(lambda: not wal.exists() or wal.stat().st_size == 0, timeout=10,
               what="the WAL emptied by a checkpoint")
    assert ingest.scalar("SELECT count(*) FROM steps") == 4
