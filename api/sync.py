"""Storing a recorded run's spool: at the run's end, and later with `gymbus sync`.

A recorded script spools every frame in its run folder (as a worker's run child does). When
its run ends, `store_at_end` waits until the ingest holds every frame, and confirms the spool
(removes it) once the ingest has them in its main file, on a thread (`Confirmation`); a frame
missing is replayed from the spool by `store_spool`, for a few seconds at most. What is still
missing then, a run recorded offline, or one whose stack went away, is stored later by `gymbus
sync`, which first registers the run with the controller (from its spooled run_started and
run_completed frames) and then does the same. The ingest drops frames it holds already, so
syncing twice stores nothing twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from gymbus.shared.codec import decode_frame
from gymbus.shared.errors import DecodeError, GymbusError
from gymbus.shared.protocol import Command, FrameKind, LifecycleEvent, RunState
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client
from gymbus.worker.telemetry import spool
from gymbus.worker.telemetry.repair import Repairer
from gymbus.worker.telemetry.spool import SpoolReader

#: a run's end waits for the ingest to confirm its spool while the ingest makes progress, at
#: most END_OF_RUN_WAIT seconds, and gives up after END_OF_RUN_STALL seconds without progress
#: (the spool then stays for `gymbus sync`)
END_OF_RUN_WAIT = 120.0
END_OF_RUN_STALL = 5.0
#: seconds `gymbus sync` waits per run
SYNC_WAIT = 60.0
POLL_SECONDS = 0.02
FIRST_POLL_SECONDS = 0.001
#: the end's first questions go on this long without progress (the ingest spacing the
#: checkpoints it is asked for, or the run's last frames in flight) before the spool's repair
#: takes over
END_OF_RUN_QUICK_STALL = 1.5


log = logging.getLogger("gymbus.api")


class SyncError(GymbusError):
    """A folder that holds no spool of a run, or a spool that says nothing of its run."""


@dataclass
class Spooled:
    """What a run's spool says of it."""

    run_id: str
    run_dir: Path
    frames: int
    config: dict[str, Any]
    #: from its run_completed frame; None when the run never ended it
    status: str | None
    reason: str | None
    confirmed: bool


def read_spool(run_dir: Path) -> Spooled:
    """The run of a spool: its id, frames, and what its first and last frames say."""
    if spool.is_confirmed(run_dir):
        return Spooled(run_dir.name, run_dir, 0, {}, None, None, True)
    path = spool.spool_path(run_dir)
    if not path.exists():
        raise SyncError(f"{run_dir} holds no spool ({path} does not exist)")
    reader = SpoolReader(path)
    while True:
        reader.refresh()
        if reader.exhausted:
            break
    if reader.damage:
        raise SyncError(f"{path}: {reader.damage}")
    if reader.count == 0:
        raise SyncError(f"{path} holds no frames")
    first = _frame(reader, reader.first)
    last = _frame(reader, reader.count - 1)
    trimmed = reader.first > 0  # the ingest holds the frames before, run_started included
    if not trimmed and (first.kind is not FrameKind.LIFECYCLE or first.body.get("event") !=
                        LifecycleEvent.RUN_STARTED.value):
        raise SyncError(f"{path}: its first frame is not the run's run_started")
    ended = last.kind is FrameKind.LIFECYCLE and \
        last.body.get("event") == LifecycleEvent.RUN_COMPLETED.value
    return Spooled(first.run_id, run_dir, reader.count, {} if trimmed else dict(first.body),
                   last.body.get("status") if ended else None,
                   last.body.get("reason") if ended else None, False)


def _frame(reader: SpoolReader, seq: int) -> Any:
    topic, payload = reader.read(seq)
    try:
        return decode_frame([topic, payload])
    except DecodeError as exc:
        raise SyncError(f"{reader.path}: frame {seq} does not decode: {exc}") from None


def register(settings: Settings, run: Spooled, ctx: zmq.Context[Any]) -> dict[str, Any]:
    """Make the controller know an offline run, ended as its spool says (failed when its
    spool has no run_completed: its script stopped without ending it). Returns the run."""
    started = run.config
    raw = started.get("config")
    config: dict[str, Any] = raw if isinstance(raw, dict) else {}
    client = Client(settings.controller, "controller", settings.request_timeout, ctx=ctx)
    try:
        opened = client.request(Command.OPEN_RUN, {
            "run_id": run.run_id, "name": str(config.get("name", "")),
            "env": str(started.get("env", "")), "config": config,
            "telemetry": str(started.get("telemetry", "full")),
            "host": str(started.get("host", "")), "pid": started.get("pid", 0)})
        if opened["run"]["state"] != RunState.RUNNING.value:
            return dict(opened["run"])
        status = run.status or RunState.FAILED.value
        reason = run.reason if run.status else "exited without ending its run"
        closed = client.request(Command.CLOSE_RUN, {
            "run_id": run.run_id, "status": status, "reason": reason,
            "frames_emitted": run.frames})
        return dict(closed["run"])
    finally:
        client.close()


def store_spool(settings: Settings, run_id: str, run_dir: Path, ctx: zmq.Context[Any], *,
                timeout: float, stall: float | None = None,
                progress: Callable[[dict[str, Any]], None] | None = None,
                clock: Callable[[], float] = time.monotonic) -> bool:
    """Replay what the ingest misses of a run's spool until it confirms the run (True), or
    `timeout` seconds pass, or (with `stall`) the ingest stores nothing more of it for `stall`
    seconds (False: the spool stays for `gymbus sync`)."""
    if spool.is_confirmed(run_dir):
        return True
    repairer = Repairer(settings, ctx)
    try:
        repairer.track(run_id, run_dir, running=False)
        started = clock()
        deadline = started + timeout
        while run_id in repairer.runs:
            now = clock()
            if now >= deadline:
                return False
            tracked = repairer.runs[run_id]
            if stall is not None and now - max(started, tracked.progress_at) >= stall:
                return False
            repairer.tick()
            if progress is not None:
                now_tracked = repairer.runs.get(run_id)
                progress({"run_id": run_id,
                          "replayed": now_tracked.replayed if now_tracked else tracked.replayed})
            if not repairer.busy():
                time.sleep(POLL_SECONDS)  # poll toward the deadline above
        return True
    finally:
        repairer.close()


class Confirmation:
    """A run's spool being confirmed after its end: the ingest holds every frame already (a
    query sees all of them); this waits, on a thread of its own, for the checkpoint that holds
    them in the ingest's main file, then removes the spool. Python's exit waits for the thread
    (it is not a daemon), so a script that ends right after its run leaves no spool behind."""

    def __init__(self, target: Callable[[], bool], run_id: str) -> None:
        self.confirmed: bool | None = None  # None: still waiting

        def run() -> None:
            self.confirmed = target()

        self._thread = threading.Thread(target=run, name=f"gymbus-confirm-{run_id}")
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the spool is confirmed; False if it stays (for `gymbus sync`) or
        `timeout` seconds pass first."""
        self._thread.join(timeout)
        return self.confirmed is True


def store_at_end(settings: Settings, run_id: str, run_dir: Path, ctx: zmq.Context[Any],
                 frames: int | None = None, close: Callable[[], None] = lambda: None
                 ) -> Confirmation | bool:
    """At a run's end: wait for the ingest to hold every frame, replaying what it misses, while
    it makes progress; what it still misses is left in the spool for `gymbus sync` (said).
    `frames`, the run's frame count when the caller knows it (its emitter), lets the common
    case (nothing missing) be answered without reading the spool back: once the ingest holds
    them all, the rest (its checkpoint, the spool's removal) goes on in a `Confirmation`.
    Otherwise returns whether the spool was confirmed. `close` is called when done with `ctx`."""
    if frames is not None and _ask_until_held(settings, run_id, run_dir, ctx, frames, False):

        def confirm() -> bool:
            try:
                return _ask_until_held(settings, run_id, run_dir, ctx, frames, True) or \
                    _store_rest(settings, run_id, run_dir, ctx)
            finally:
                close()

        return Confirmation(confirm, run_id)
    try:
        return _store_rest(settings, run_id, run_dir, ctx)
    finally:
        close()


def _store_rest(settings: Settings, run_id: str, run_dir: Path, ctx: zmq.Context[Any]) -> bool:
    """Replay what the ingest misses of a run that has ended, while it makes progress."""
    try:
        done = store_spool(settings, run_id, run_dir, ctx, timeout=END_OF_RUN_WAIT,
                           stall=END_OF_RUN_STALL)
    except GymbusError as exc:
        done = False
        log.warning("run %s: its spool could not be replayed: %s", run_id, exc)
    if not done:
        log.warning("run %s: the ingest does not hold all of it yet; its spool stays in %s: "
                    "`gymbus sync %s` stores the rest", run_id, run_dir, run_id)
    return done


def _ask_until_held(settings: Settings, run_id: str, run_dir: Path, ctx: zmq.Context[Any],
                    frames: int, final: bool) -> bool:
    """Ask the ingest whether it holds the run's `frames` frames, again while its last frames
    are still arriving and it stores more of them (after 1 ms, then twice as long each time, up
    to POLL_SECONDS: the last frames are usually a millisecond away); True once it does:
    has them all (buffered or written) or, `final`, holds them in its main file (the spool is
    confirmed then). False as soon as it lacks a frame before its last one (a hole: the spool's
    repair replays it), stops progressing, or does not answer: `store_spool` takes over."""
    # a final question can wait for the ingest to flush and checkpoint what it holds (seconds,
    # for stored pixels): it is asked on the confirmation's thread, with the usual timeout
    timeout = settings.request_timeout if final else min(settings.request_timeout, 1.0)
    client = Client(settings.ingest, "ingest", timeout, ctx=ctx)
    progress: tuple[Any, ...] | None = None
    still = time.monotonic()
    pause = FIRST_POLL_SECONDS
    try:
        while True:
            status = client.request(Command.SPOOL_STATUS,
                                    {"run_id": run_id, "frames": frames, "final": final})
            if status.get("complete") is True:
                if final:
                    spool.confirm(run_dir, frames)
                return True
            last = status.get("last_seq")
            # a hole: a frame missing before one the ingest holds (none held yet: all in flight)
            holes = [r for r in status.get("missing", []) if last is not None and r[0] < last]
            if holes:
                return False
            now = time.monotonic()
            if (status.get("stored"), last) != progress:
                progress, still = (status.get("stored"), last), now
            elif now - still > END_OF_RUN_QUICK_STALL:
                return False
            time.sleep(pause)  # its last frames are on their way, or it checkpoints soon
            pause = min(POLL_SECONDS, 2 * pause)
    except (GymbusError, OSError) as exc:
        log.debug("run %s: asking the ingest at the run's end: %s", run_id, exc)
        return False
    finally:
        client.close()
