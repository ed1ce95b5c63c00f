"""Spool repair: the ingest's missing ranges, its `spool_status` answer, and a real worker daemon
that replays an unconfirmed spool through the real broker until the ingest confirms it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import FAST_HEARTBEATS, make_stack, wait_until
from test_ingest_service import Ingest, answers, subscribed

from gymbus.services.ingest.runs import RunAccount
from gymbus.shared.codec import encode_frame
from gymbus.shared.errors import RemoteError
from gymbus.shared.protocol import Command, ErrorCode, FrameKind
from gymbus.shared.transport import Client
from gymbus.worker.telemetry import spool
from gymbus.worker.telemetry.spool import SpoolWriter

RUN = "01REPAIRRUN000000000000000"


def run_frames(run_id: str = RUN, steps: int = 8) -> list[tuple[bytes, bytes]]:
    """A whole run: run_started, `steps` step frames of 4 rows, an episode, run_completed."""
    def make(kind: FrameKind, seq: int, body: dict[str, Any]) -> tuple[bytes, bytes]:
        return encode_frame(kind, run_id, seq, body, agent_id="agent-0", worker_id="w-old")

    frames = [make(FrameKind.LIFECYCLE, 0, {"event": "run_started", "config": {"env": "x"}})]
    for i in range(steps):
        frames.append(make(FrameKind.STEP, len(frames), {
            "episode": [0] * 4, "step": [4 * i + k for k in range(4)], "action": [1] * 4,
            "obs": [k for k in range(4)], "reward": [0.5] * 4,
            "terminated": [False] * 4, "truncated": [False] * 4}))
    frames.append(make(FrameKind.EPISODE, len(frames), {
        "episode": [0], "return": [2.0], "length": [4 * steps], "terminated": [True],
        "truncated": [False], "ts_ns": [time.time_ns()]}))
    n = len(frames) + 1
    frames.append(make(FrameKind.LIFECYCLE, n - 1, {
        "event": "run_completed", "status": "completed", "frames_emitted": n, "episodes": 1,
        "steps": 4 * steps}))
    return frames


def write_spool(run_dir: Path, frames: list[tuple[bytes, bytes]]) -> None:
    writer = SpoolWriter.create(run_dir)
    for seq, parts in enumerate(frames):
        writer.append(seq, parts)
    writer.close()


# --- the ingest's accounting ----------------------------------------------------------------------


def account(seqs: list[int], emitted: int | None = None) -> RunAccount:
    run = RunAccount("r")
    for seq in seqs:
        run.accept(seq, 0)
    if emitted is not None:
        run.set_emitted(emitted, 0)
    return run


def test_missing_ranges_are_holes_then_the_tail() -> None:
    run = account([0, 1, 5, 6, 9])
    assert run.missing(12, 100) == [[2, 4], [7, 8], [10, 11]]
    assert run.missing(8, 100) == [[2, 4], [7, 7]]
    assert run.missing(3, 100) == [[2, 2]]
    assert run.missing(12, 2) == [[2, 4], [7, 8]]
    run.accept(3, 0)  # partly filled: the gap 2-4 is still open
    assert run.missing(12, 100) == [[2, 2], [4, 4], [7, 8], [10, 11]]
    for seq in (2, 4, 7, 8, 10, 11):
        run.accept(seq, 0)
    assert run.missing(12, 100) == [] and run.open_gaps == []
    assert account([], emitted=4).missing(4, 100) == [[0, 3]]
    assert account([0, 3], emitted=6).missing(6, 100) == [[1, 2], [4, 5]]


# --- the ingest's answer --------------------------------------------------------------------------


@pytest.fixture
def ingest(gymbus_env: dict[str, str], tmp_path: Path) -> Iterator[Ingest]:
    """The real ingest, fed by a test-owned XPUB where the broker's output would be."""
    ctx: zmq.Context[Any] = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.LINGER, 0)
    xpub.bind(gymbus_env["GYMBUS_TELEMETRY_OUT"])
    client = Client(gymbus_env["GYMBUS_INGEST"], "ingest", timeout=5.0, ctx=ctx)
    with open(tmp_path / "ingest.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gymbus.services.ingest"],
                                env={**os.environ, **gymbus_env}, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: subscribed(xpub), 15, "the ingest's subscription")
            wait_until(lambda: answers(client), 10, "the ingest to answer ping")
            yield Ingest(proc, client, xpub, Path(gymbus_env["GYMBUS_HOME"]) / "gymbus.duckdb")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            client.close()
            xpub.close()
            ctx.term()


def spool_status(ingest: Ingest, frames: int, final: bool, run_id: str = RUN) -> dict[str, Any]:
    return ingest.client.request(Command.SPOOL_STATUS,
                                 {"run_id": run_id, "frames": frames, "final": final})


def stored(ingest: Ingest, n: int, run_id: str = RUN) -> bool:
    return bool(ingest.scalar(f"SELECT count(*) FROM frames WHERE run_id = '{run_id}'") == n)


def test_spool_status_reports_holes_records_them_and_sees_them_filled(ingest: Ingest) -> None:
    frames = run_frames()
    n = len(frames)
    for seq in [s for s in range(n) if s not in (3, 4, 5)]:
        ingest.send(frames[seq])
    wait_until(lambda: stored(ingest, n - 3), what="the frames around the hole")

    answer = spool_status(ingest, n, final=False)
    assert answer == {"missing": [[3, 5]], "stored": n - 3, "last_seq": n - 1,
                      "frames_emitted": n, "complete": False, "durable": None}
    assert ingest.query("SELECT first_seq, last_seq, filled_at FROM gaps")["rows"] == [[3, 5, None]]

    for seq in (3, 4, 5):  # the replay
        ingest.send(frames[seq])
    wait_until(lambda: stored(ingest, n), what="the replayed frames")
    assert spool_status(ingest, n, final=True)["complete"] is True
    gap = ingest.query("SELECT first_seq, last_seq, filled_at FROM gaps")["rows"]
    assert gap[0][:2] == [3, 5] and gap[0][2] is not None

    steps_before = ingest.scalar("SELECT sum(step) FROM steps")
    for parts in frames:  # replaying the whole spool again changes nothing
        ingest.send(parts)
    wait_until(lambda: ingest.client.request(Command.RUN_STATS, {"run_id": RUN})["runs"][0]
               ["duplicates"] == n, what="every frame counted as a duplicate")
    assert stored(ingest, n)
    assert ingest.scalar("SELECT sum(step) FROM steps") == steps_before
    assert ingest.scalar("SELECT count(*) FROM steps") == 4 * (n - 3)


def test_a_trim_question_is_answered_with_the_checkpointed_prefix(ingest: Ingest) -> None:
    """`trim` asks what the worker may delete: every seq below `durable` is in the checkpointed
    file; a hole stops it, and a question without `trim` gets no such promise."""
    frames = run_frames()
    n = len(frames)
    for seq in [s for s in range(n) if s != 5]:
        ingest.send(frames[seq])
    wait_until(lambda: stored(ingest, n - 1), what="the frames around the hole")
    body = {"run_id": RUN, "frames": n, "final": False}
    assert ingest.client.request(Command.SPOOL_STATUS, body)["durable"] is None
    answer = wait_until(lambda: (a := ingest.client.request(
        Command.SPOOL_STATUS, {**body, "trim": True}))["durable"] is not None and a,
        what="a checkpoint for the trim")
    assert (answer["durable"], answer["missing"]) == (5, [[5, 5]])


def test_a_final_spool_of_an_unknown_run_teaches_the_ingest_its_frame_count(ingest: Ingest) -> None:
    other = "01KILLEDRUN"
    assert spool_status(ingest, 5, final=False, run_id=other) == {
        "missing": [[0, 4]], "stored": 0, "last_seq": None, "frames_emitted": None,
        "complete": False}
    with pytest.raises(RemoteError) as unknown:  # a question creates no run
        ingest.client.request(Command.RUN_STATS, {"run_id": other})
    assert unknown.value.code is ErrorCode.UNKNOWN_RUN

    answer = spool_status(ingest, 5, final=True, run_id=other)
    assert (answer["missing"], answer["frames_emitted"], answer["complete"]) == ([[0, 4]], 5, False)
    stats = ingest.client.request(Command.RUN_STATS, {"run_id": other})["runs"][0]
    assert (stats["frames_emitted"], stats["gaps"], stats["complete"]) == (5, 5, False)
    assert spool_status(ingest, 0, final=True, run_id="01EMPTY")["missing"] == []


def test_bad_spool_status_questions_are_refused(ingest: Ingest) -> None:
    for body in [{"run_id": RUN, "frames": -1, "final": False},
                 {"run_id": RUN, "frames": True, "final": False},
                 {"run_id": RUN, "frames": 3, "final": "yes"},
                 {"run_id": "", "frames": 3},
                 {"frames": 3}]:
        with pytest.raises(RemoteError) as refused:
            ingest.client.request(Command.SPOOL_STATUS, body)
        assert refused.value.code is ErrorCode.BAD_REQUEST, body


# --- a real worker daemon repairs through the real broker ----------------------------------------


def run_stats(client: Client, run_id: str) -> dict[str, Any] | None:
    try:
        return client.request(Command.RUN_STATS, {"run_id": run_id}, timeout=2.0)["runs"][0]  # type: ignore[no-any-return]
    except RemoteError:
        return None


def test_a_restarted_worker_replays_an_unconfirmed_spool_once(tmp_path: Path) -> None:
    frames = run_frames(steps=40)
    n = len(frames)
    with make_stack(tmp_path / "home", **FAST_HEARTBEATS) as stack:
        run_dir = stack.settings.run_dir(RUN)
        write_spool(run_dir, frames)  # what a worker stopped before the ingest had anything left
        stack.start(("ingest", "broker"))
        client = Client(stack.settings.ingest, "ingest", timeout=5.0)
        try:
            stack.start_one("worker")
            wait_until(lambda: spool.is_confirmed(run_dir), 20, "the spool to be confirmed")
            stats = run_stats(client, RUN)
            assert stats is not None
            assert (stats["frames_stored"], stats["complete"], stats["gaps"]) == (n, True, 0)
            assert stats["duplicates"] == 0 and stats["steps"] == 160
            assert not spool.spool_path(run_dir).exists()
            gaps = client.request(Command.QUERY, {"sql": "SELECT first_seq, last_seq, "
                                  "filled_at IS NOT NULL FROM gaps"})["rows"]
            assert gaps == [[0, n - 1, True]]  # recorded when the spool was announced, filled
            wait_until(lambda: f"spool removed ({n} frames replayed)"
                       in stack.services["worker"].log_path.read_text(), 10,
                       "the worker to say what it replayed")

            # the same spool again, unconfirmed: a new worker asks, is told complete, sends nothing
            stack.stop_one("worker")
            (spool.spool_dir(run_dir) / spool.CONFIRMED_FILE).unlink()
            write_spool(run_dir, frames)
            stack.start_one("worker")
            wait_until(lambda: spool.is_confirmed(run_dir), 20, "the spool to be confirmed again")
            # the worker logs it just after the confirmation the wait above saw
            wait_until(lambda: "spool removed (0 frames replayed)"
                       in stack.services["worker"].log_path.read_text(), 10,
                       "the worker to say it replayed nothing")
            assert run_stats(client, RUN) == stats
        finally:
            client.close()
