"""The ingest service: subscribes to all telemetry, writes it to DuckDB, answers read-only queries.

A receiver thread owns the SUB (telemetry from the broker's XPUB) and queues decoded batches
(receiver.py), so that a flush or a query never stops receiving. One loop on the main thread, the
store's only writer, polls the ROUTER (the query API) and the receiver's wake-up socket, takes the
queued telemetry, flushes the store when a buffer is full or old enough, and answers requests
through a table keyed by Command (a `RequestTable`).
Run: `python -m gymbus.services.ingest`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import duckdb
import zmq

from gymbus.services.ingest import archive
from gymbus.services.ingest.delete import delete_run
from gymbus.services.ingest.query import DEFAULT_MAX_ROWS, MAX_ROWS_LIMIT, run_query
from gymbus.services.ingest.receiver import DeadLetter, Receiver, ReceiverFailed
from gymbus.services.ingest.runs import RunAccount
from gymbus.services.ingest.store import Store, wal_path
from gymbus.shared.errors import GymbusError, RequestError
from gymbus.shared.gate import RoleRequestTable
from gymbus.shared.protocol import Command, ErrorCode
from gymbus.shared.service import RequestHandler, StopFlag, run_until_stopped
from gymbus.shared.settings import Settings
from gymbus.shared.transport import EndpointError, bind, connect, new_socket

#: telemetry messages the SUB may queue before the broker's XPUB drops for us
SUB_RCVHWM = 200_000
#: seconds of queued telemetry taken per pass before requests get their turn
PASS_BUDGET_S = 0.05
#: requests answered per pass
MAX_REQUESTS_PER_PASS = 100
#: longest poll, so that a stop request is seen quickly
POLL_MS = 100
#: seconds spent at stop on telemetry already queued in the SUB (honcho kills after 5 s), and
#: more seconds for the writer to take what the receiver queued
FINAL_DRAIN_S = 0.5
STOP_GRACE_S = 1.5
#: missing ranges in one spool_status reply (the worker asks again for the rest)
MAX_MISSING_RANGES = 1000
#: largest frame count a spool_status may name (seqs are signed 64-bit)
MAX_SPOOL_FRAMES = 2**62
#: seconds between the checkpoints that confirming spooled runs asks for (at most one per)
CHECKPOINT_EVERY = 0.25
#: with rows written since the last checkpoint, the ingest checkpoints on its own after one of
#: its flushes (or when idle with nothing buffered), at most once per this many seconds: a run's
#: end then waits for the checkpoint of its last rows only, not of all of them
BACKGROUND_CHECKPOINT_S = 0.5

log = logging.getLogger("gymbus.ingest")


class StoreUnavailable(GymbusError):
    """The DuckDB file cannot be opened; nothing in it was changed. If another ingest holds it,
    stop that one; if the file itself is damaged, move it aside to start a new one: the workers'
    spools bring back what they still hold."""


class Ingest:
    """The ingest's store, sockets and loop. Every method runs on the thread that calls `serve`
    (the writer), except the receiver's, which run on its own thread."""

    def __init__(self, settings: Settings, store: Store, sub: zmq.Socket[Any],
                 router: zmq.Socket[Any], ctx: zmq.Context[Any]) -> None:
        self.settings = settings
        self.store = store
        self.router = router
        self.ctx = ctx
        self.wake = ctx.socket(zmq.PAIR)
        wake_tx = ctx.socket(zmq.PAIR)
        for sock in (self.wake, wake_tx):
            sock.setsockopt(zmq.SNDHWM, 1)
            sock.setsockopt(zmq.RCVHWM, 1)
        endpoint = f"inproc://gymbus-ingest-wake-{id(self)}"
        self.wake.bind(endpoint)
        wake_tx.connect(endpoint)
        self.receiver = Receiver(sub, wake_tx, settings.max_frame_bytes)
        self.receiver.final_drain_s = FINAL_DRAIN_S
        self._closed = False
        #: when the last checkpoint ended (monotonic), and the store's flushes by then
        self.checkpointed_at = -1.0
        self._checkpointed_flushes = 0
        #: when a confirmation last asked for a checkpoint
        self._asked_at = -math.inf
        handlers: dict[Command, RequestHandler] = {
            Command.PING: self.handle_ping,
            Command.QUERY: self.handle_query,
            Command.RUN_STATS: self.handle_run_stats,
            Command.INGEST_STATS: self.handle_ingest_stats,
            Command.SPOOL_STATUS: self.handle_spool_status,
            Command.DELETE_RUN: lambda body: delete_run(self.store, body),
            Command.ARCHIVE: self.handle_archive,
            Command.RESTORE: self.handle_restore,
        }
        self.requests = RoleRequestTable("ingest", handlers, log, peer="client",
                                         max_bytes=settings.max_frame_bytes,
                                         batch=MAX_REQUESTS_PER_PASS)

    @classmethod
    def open(cls, settings: Settings) -> Ingest:
        """Open the store (which warms Arrow up before anything is subscribed), then bind the
        query ROUTER and connect the telemetry SUB. StoreUnavailable when the file will not open."""
        settings.home.mkdir(parents=True, exist_ok=True)
        try:
            store = open_store(settings.db_path, settings.ingest_threads)
        except duckdb.Error as exc:
            raise StoreUnavailable(
                f"cannot open {settings.db_path}: {exc}. Nothing was changed or deleted. If "
                "another ingest holds the file, stop it; if the file itself is damaged, move it "
                "aside to start a new one: the workers' spools bring back what they still hold."
            ) from None
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            router, sub = open_sockets(ctx, settings)
        except BaseException:
            store.close()
            ctx.term()
            raise
        log.info("ingest writing %s; telemetry from %s; queries on %s",
                 settings.db_path, settings.telemetry_out, settings.ingest)
        return cls(settings, store, sub, router, ctx)

    def serve(self, stop: StopFlag) -> None:
        """Poll, take queued telemetry, answer requests, flush when due; until `stop` is set.
        Then the receiver takes what the SUB still holds, and every batch it queued is taken
        (`close` flushes)."""
        self.receiver.start()
        poller = zmq.Poller()
        poller.register(self.wake, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        while not stop and self.receiver.alive():
            wait = self.store.seconds_until_flush()
            timeout = POLL_MS if wait is None else min(POLL_MS, int(wait * 1000))
            ready = dict(poller.poll(0 if self.receiver.waiting() else timeout))
            if self.wake in ready:
                while self.wake.poll(0, zmq.POLLIN):
                    self.wake.recv()
            self.take_telemetry(deadline=time.monotonic() + PASS_BUDGET_S)
            if self.router in ready:
                self.requests.answer_waiting(self.router)
            if self.store.flush_due():
                self.store.flush()
                self._checkpoint_if_due()
            elif not self.receiver.waiting():
                self._checkpoint_if_due()
        self.receiver.stop()
        deadline = time.monotonic() + FINAL_DRAIN_S + STOP_GRACE_S
        while (left := deadline - time.monotonic()) > 0:
            if not self.take_telemetry(deadline, wait=left):
                break
        if not stop:
            raise ReceiverFailed("the telemetry receiver thread failed (its traceback is in "
                                 "the log); what it received is stored. Restart the ingest: "
                                 "the workers' spools bring back what it missed.")

    def close(self) -> None:
        """Close the sockets, flush and close the store (a checkpoint), end the context; log
        the totals. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.receiver.close()
        self.wake.close(linger=0)
        self.router.close()
        at_stop = self.store.stats()["pending"]
        self.store.close()
        self.ctx.term()
        stats = self.store.stats()
        log.info("ingest stopped: %d frames stored (%d of them at stop), %d duplicates, "
                 "%d dead letters, %d lost in failed flushes", stats["frames_stored"], at_stop,
                 stats["duplicates"], stats["dead_letters"], stats["frames_lost"])

    def _dead_letter(self, parts: list[bytes], reason: str, received_ns: int) -> None:
        self.store.add_dead_letter(parts, reason, received_ns)
        count = self.store.counters["dead_letters"]
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th...: seen, but no flood
            log.warning("dead letter #%d: %s", count, reason)

    def take_telemetry(self, deadline: float, wait: float | None = None) -> bool:
        """Buffer the queued batches (until `deadline`), keeping what failed to decode as dead
        letters; with `wait`, wait that long for the first. False once the receiver's sentinel
        has come: it has stopped, and everything it received was taken."""
        while time.monotonic() <= deadline:
            batch = self.receiver.take(wait)
            if batch is None:
                return False
            if not batch:
                return True
            wait = None
            for item, received_ns in batch:
                if isinstance(item, DeadLetter):
                    self._dead_letter(item.parts, item.reason, received_ns)
                else:
                    self.store.add(item, received_ns)
                if self.store.flush_due():
                    self.store.flush()
        return True

    # --- handlers: those that read the file flush first, so that answers hold all received ---

    def handle_ping(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"service": "ingest"}

    def handle_query(self, body: dict[str, Any]) -> dict[str, Any]:
        sql = body.get("sql")
        if not isinstance(sql, str) or not sql.strip():
            raise RequestError(ErrorCode.BAD_REQUEST, "query needs `sql`, a non-empty string")
        max_rows = body.get("max_rows", DEFAULT_MAX_ROWS)
        if type(max_rows) is not int or not 0 <= max_rows <= MAX_ROWS_LIMIT:
            raise RequestError(ErrorCode.BAD_REQUEST,
                               f"max_rows must be an integer from 0 to {MAX_ROWS_LIMIT}")
        self.store.flush()
        cursor = self.store.cursor()
        try:
            return run_query(cursor, sql, max_rows, body.get("format", "rows"))
        finally:
            cursor.close()

    def handle_run_stats(self, body: dict[str, Any]) -> dict[str, Any]:
        run_id = body.get("run_id")
        if run_id is not None and not isinstance(run_id, str):
            raise RequestError(ErrorCode.BAD_REQUEST, "run_id must be a string")
        self.store.flush()
        runs = self.store.run_stats(run_id)
        if run_id is not None and not runs:
            raise RequestError(ErrorCode.UNKNOWN_RUN, f"the ingest holds no frame of run {run_id}")
        return {"runs": runs}

    def durable(self, run: RunAccount) -> bool:
        """Whether everything of the run is in the main file: flush, and checkpoint unless the
        last checkpoint (asked for, or the ingest's own) came after the run's last write; at most
        one asked for per CHECKPOINT_EVERY (False meanwhile: the worker asks again)."""
        self.store.flush()
        if self.store.runs.get(run.run_id) is not run:
            return False  # the flush failed and the accounting was rebuilt: ask again
        if run.saved_at <= self.checkpointed_at:
            return True
        if time.monotonic() - self._asked_at < CHECKPOINT_EVERY:
            return False
        self._asked_at = time.monotonic()
        self.checkpoint()
        return True

    def _checkpoint_if_due(self) -> None:
        """The ingest's own checkpoint: right after one of its flushes (so that it costs no flush
        of its own), or when nothing is buffered and nothing waits; at most one per
        BACKGROUND_CHECKPOINT_S, and only when rows were written since the last one."""
        if (self.store.counters["flushes"] != self._checkpointed_flushes
                and self.store.seconds_until_flush() is None
                and time.monotonic() - self.checkpointed_at >= BACKGROUND_CHECKPOINT_S):
            self.checkpoint()

    def checkpoint(self) -> None:
        """Flush and checkpoint the store; what was saved before now is in its main file."""
        self.store.checkpoint()
        self.checkpointed_at = time.monotonic()
        self._checkpointed_flushes = self.store.counters["flushes"]

    def handle_ingest_stats(self, body: dict[str, Any]) -> dict[str, Any]:
        """Counters as they are, no flush: `pending` shows what the next flush will write, and
        `receive_backlog` what the receiver has queued for the writer."""
        return {**self.store.stats(), **self.receiver.stats()}

    def handle_archive(self, body: dict[str, Any]) -> dict[str, Any]:
        """Finished runs' step rows to Parquet (archive.py); the receiver goes on meanwhile."""
        self.store.flush()
        return archive.archive_request(self.store.archive, body)

    def handle_restore(self, body: dict[str, Any]) -> dict[str, Any]:
        self.store.flush()
        return archive.restore_request(self.store.archive, body)

    def handle_spool_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """A worker's question about a spooled run: which of its first `frames` seqs are missing.

        The accounting counts buffered frames as stored (a frame lost with an unflushed buffer is
        missing again after a restart, and asked for again), so no flush is needed to answer.
        `final` says the run process is gone and its spool whole. A final run that never stored a
        `run_completed` (its process was killed) emitted exactly the spool's frames: that becomes
        its `frames_emitted`, so that its gaps are recorded and its completeness known. The worker
        removes the spool on a final `complete`, so that answer waits until a checkpoint holds
        the run (not only the WAL): `durable`.
        """
        run_id = body.get("run_id")
        frames = body.get("frames")
        final = body.get("final", False)
        if not isinstance(run_id, str) or not 0 < len(run_id) <= 128:
            raise RequestError(ErrorCode.BAD_REQUEST, "run_id must be a string of 1-128 chars")
        if type(frames) is not int or not 0 <= frames < MAX_SPOOL_FRAMES:
            raise RequestError(ErrorCode.BAD_REQUEST, "frames must be an integer >= 0")
        if not isinstance(final, bool):
            raise RequestError(ErrorCode.BAD_REQUEST, "final must be a boolean")
        run = self.store.runs.get(run_id)
        if final and frames and (run is None or (run.frames_emitted is None
                                                 and frames > run.highest)):
            run = self.store.account(run_id)
            run.set_emitted(frames, time.time_ns() // 1000)
            log.info("run %s ended without run_completed: its spool holds %d frames", run_id, frames)
        if run is None:
            return {"missing": [[0, frames - 1]] if frames else [], "stored": 0, "last_seq": None,
                    "frames_emitted": None, "complete": False}
        missing = run.missing(frames, MAX_MISSING_RANGES)
        complete = run.complete and not missing
        if final and complete:
            complete = self.durable(run)
        # `trim`: the worker would delete spool segments below `durable`, all checkpointed seqs
        durable = run.contiguous if body.get("trim") is True and self.durable(run) else None
        return {"missing": missing, "stored": run.frames_stored, "last_seq": run.last_seq,
                "frames_emitted": run.frames_emitted, "complete": complete, "durable": durable}


def open_sockets(
    ctx: zmq.Context[Any], settings: Settings
) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """The query ROUTER (bound) and the telemetry SUB (connected, subscribed to everything).

    The SUB sets no MAXMSGSIZE: ZeroMQ would drop the whole connection to the broker for one
    oversized frame, losing every run's frames queued behind it, and record nothing. The decoder's
    size check keeps an oversized frame as a dead letter instead.
    """
    router = new_socket(ctx, zmq.ROUTER)
    bind(router, settings.ingest, "ingest query API")
    sub = new_socket(ctx, zmq.SUB, linger=0)
    sub.setsockopt(zmq.RCVHWM, SUB_RCVHWM)
    try:
        connect(sub, settings.telemetry_out, "broker's telemetry XPUB")
    except EndpointError:
        router.close(linger=0)
        raise
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    return router, sub


def open_store(path: Path, threads: int | None = None) -> Store:
    """Open the DuckDB file, recovering from a write-ahead log that DuckDB cannot replay.

    Such a WAL is moved aside (`<file>.wal.corrupt-<time>-<pid>`, kept, never deleted) and the
    file opened without it, with an ERROR saying so: what it held comes back from the workers'
    spools. Any other failure (the file is damaged, or locked by another ingest), or a file that
    does not open without the WAL either, raises duckdb.Error with the WAL where it was.
    """
    wal = wal_path(path)
    left = wal.stat().st_size if wal.exists() else 0
    try:
        store = Store(path, threads=threads)
    except duckdb.Error as exc:
        if not wal.exists() or "WAL" not in str(exc):
            raise
        error = exc
    else:
        if left:  # DuckDB replays a truncated log up to its last whole entry, silently
            log.warning("%s (%d bytes) was left by an ingest that did not stop cleanly; replayed "
                        "it: what a damaged end of it held comes back from the spools", wal, left)
        return store
    aside = wal.with_name(f"{wal.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(wal, aside)
    try:
        store = Store(path, threads=threads)
    except duckdb.Error:
        os.replace(aside, wal)
        raise
    log.error("DuckDB could not replay the write-ahead log %s: %s. MOVED IT ASIDE to %s and opened "
              "%s without it: the frames stored since the last checkpoint are missing from the "
              "file (%d runs in it now). Workers replay them from their spools; a run's spool is "
              "removed only after a checkpoint, so no confirmed run depended on this log.",
              wal, str(error).splitlines()[0], aside, path, len(store.runs))
    return store


def main(argv: list[str] | None = None) -> int:
    """Run the ingest until SIGTERM or SIGINT; flush and checkpoint at stop. The exit code
    (shared/service.py) says what stopped it; 1 when the file will not open."""
    return run_until_stopped("ingest", "Write gymbus telemetry to DuckDB and answer read-only "
                             "queries.", argv, Ingest.open, Ingest.serve)
