"""The subscriber side of both viewers: a snapshot of what is stored, then the live stream.

Threads: `LiveFeed` runs one receiver thread ("live-feed") that only moves messages from its SUB
(on the broker's low-HWM live output) into a bounded queue, dropping the oldest when the viewer
falls behind and counting what it drops. Everything else runs on the viewer's own thread (the
watch loop, the Qt GUI thread): `Live.poll` decodes, discards by seq what is held already and
updates the `RunView`s; `Live.refresh` asks the controller and the ingest, takes snapshots and
backfills gaps from the store. Its requests are a `Reader`'s (reader.py), and its two halves
(`apply_status`, then `due` and `apply_stored`) take what a reader returned, so that the Qt
viewer can make the requests on a thread of their own. A viewer never blocks a worker: the
broker drops for it instead.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from gymbus.services.viewers.live_runs import RunView
from gymbus.services.viewers.reader import (
    Fetch,
    Reader,
    Status,
    Stored,
    leave_signals_to_the_main_thread,
)
from gymbus.shared.codec import Frame, decode_frame
from gymbus.shared.errors import DecodeError, GymbusError
from gymbus.shared.protocol import TERMINAL_STATES, FrameKind, topic_prefix
from gymbus.shared.settings import Settings
from gymbus.shared.transport import connect, new_socket

#: messages the SUB holds while the receiver thread is busy (the broker holds LIVE_HWM more),
#: and its kernel buffer: small, since the receiver thread drains both at once into the queue
FEED_RCVHWM = 100
FEED_RCVBUF = 256 * 1024
#: the viewer's own queue, between the receiver thread and the viewer's thread
QUEUE_FRAMES = 2000
QUEUE_BYTES = 64 * 1024 * 1024
RECV_BATCH = 500
POLL_MS = 100
#: seconds a gap waits before it is fetched from the store (the ingest flushes every 0.2 s)
BACKFILL_AGE = 1.0
#: finished runs shown beside the active ones when no run is named
RECENT_RUNS = 8
#: request timeout of a viewer: short, since it runs on a thread that draws
VIEWER_TIMEOUT = 2.0
MAX_SEQ = 2**62
#: seconds `LiveFeed.close` waits for the receiver thread (a daemon: it may be left behind)
CLOSE_WAIT = 0.5


class LiveFeed:
    """A SUB on the live output and the receiver thread that fills a bounded queue from it.

    `take` and `subscribe` run on the viewer's thread; the socket lives on the receiver thread.
    """

    def __init__(self, endpoint: str, prefixes: Iterable[bytes], ctx: zmq.Context[Any] | None = None,
                 *, max_frames: int = QUEUE_FRAMES, max_bytes: int = QUEUE_BYTES,
                 rcvhwm: int = FEED_RCVHWM) -> None:
        self.endpoint = endpoint
        self._ctx = ctx or zmq.Context.instance()
        self._prefixes = list(prefixes)
        self._changes: queue.SimpleQueue[tuple[int, bytes]] = queue.SimpleQueue()
        self._queue: deque[list[bytes]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self.max_frames, self.max_bytes, self.rcvhwm = max_frames, max_bytes, rcvhwm
        self.received = 0
        self.dropped = 0
        self.dropped_by_run: dict[str, int] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: GymbusError | None = None
        self._thread = threading.Thread(target=self._run, name="live-feed", daemon=True)

    def start(self, timeout: float = 5.0) -> None:
        """Start the receiver thread; raises its EndpointError if it could not connect."""
        self._thread.start()
        self._ready.wait(timeout)
        if self._error is not None:
            raise self._error

    def subscribe(self, prefix: bytes, on: bool = True) -> None:
        """Add (or drop) a topic prefix; applied by the receiver thread within POLL_MS."""
        self._changes.put((zmq.SUBSCRIBE if on else zmq.UNSUBSCRIBE, prefix))

    def _run(self) -> None:
        """The receiver thread: SUB -> bounded queue, until `close`."""
        leave_signals_to_the_main_thread()
        sub = new_socket(self._ctx, zmq.SUB, linger=0)
        sub.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sub.setsockopt(zmq.RCVBUF, FEED_RCVBUF)
        for prefix in self._prefixes:
            sub.setsockopt(zmq.SUBSCRIBE, prefix)
        try:
            connect(sub, self.endpoint, "broker's live telemetry output")
        except GymbusError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                while not self._changes.empty():
                    option, prefix = self._changes.get()
                    sub.setsockopt(option, prefix)
                if not sub.poll(POLL_MS, zmq.POLLIN):
                    continue
                batch = []
                for _ in range(RECV_BATCH):
                    try:
                        batch.append(sub.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                self._put(batch)
        finally:
            sub.close(linger=0)

    def _put(self, batch: list[list[bytes]]) -> None:
        """Queue a batch, under the lock once: were it taken for each message, a backlog to
        drain would keep it from the viewer's thread, which would wait in `take` meanwhile."""
        size = sum(len(p) for parts in batch for p in parts)
        with self._lock:
            self.received += len(batch)
            self._queue.extend(batch)
            self._bytes += size
            while len(self._queue) > self.max_frames or self._bytes > self.max_bytes:
                old = self._queue.popleft()  # the oldest: a viewer wants the latest state
                self._bytes -= sum(len(p) for p in old)
                self.dropped += 1
                run_id = old[0].partition(b".")[2].decode("ascii", "replace")
                self.dropped_by_run[run_id] = self.dropped_by_run.get(run_id, 0) + 1

    def take(self, max_frames: int) -> list[list[bytes]]:
        """Up to `max_frames` queued messages, oldest first (on the viewer's thread)."""
        with self._lock:
            n = min(max_frames, len(self._queue))
            out = [self._queue.popleft() for _ in range(n)]
            self._bytes -= sum(len(p) for parts in out for p in parts)
        return out

    @property
    def queued(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Stop the receiver thread and close its socket; idempotent."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(CLOSE_WAIT)


class Live:
    """What a viewer holds: its runs, filled by snapshots and the live stream.

    Watches the named runs, or (none named) every active run and the RECENT_RUNS last finished
    ones, plus every run whose frames arrive. Every method runs on the viewer's thread.
    """

    def __init__(self, settings: Settings, run_ids: Iterable[str] = (), *,
                 ctx: zmq.Context[Any] | None = None, timeout: float = VIEWER_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic, **feed_options: Any) -> None:
        self.settings = settings
        self.named = list(dict.fromkeys(run_ids))
        self.runs: dict[str, RunView] = {}
        self.clock = clock
        prefixes = [topic_prefix(kind, run_id) for kind in FrameKind
                    for run_id in (self.named or [""])]
        self.feed = LiveFeed(settings.telemetry_live, prefixes, ctx, **feed_options)
        #: the requests of `refresh` (the Qt viewer makes them on its request thread instead)
        self.reader = Reader(settings, timeout, ctx)
        self.rejected = 0
        self.controller_ok = self.ingest_ok = False
        #: whether a refresh has asked the services yet (before, `ingest_ok` says nothing)
        self.asked = False
        self.order: list[str] = []  # run ids as the controller (or store) lists them, oldest first

    def start(self, refresh: bool = True) -> None:
        """Subscribe first, then snapshot, so that nothing falls between the two (without
        `refresh`, the caller's first refresh takes the snapshot: the Qt viewer's, off its GUI
        thread)."""
        self.feed.start()
        if refresh:
            self.refresh()

    # --- the live stream ------------------------------------------------------------------------

    def poll(self, max_frames: int = 5000) -> list[Frame]:
        """Take what the feed queued: decode, drop what is held already, apply. The new frames."""
        accepted = []
        for parts in self.feed.take(max_frames):
            if len(parts) != 2:
                continue  # a subscription passing upstream, not a frame
            try:
                frame = decode_frame(parts, self.settings.max_frame_bytes)
            except DecodeError:
                self.rejected += 1
                continue
            if self.named and frame.run_id not in self.named:
                continue
            view = self.runs.get(frame.run_id)
            if view is None:  # found live: what it sent before is a gap that backfill fills
                view = self.view(frame.run_id)
                view.loaded = True
            if view.seqs.take(frame.seq, live=True, now=self.clock()):
                view.apply(frame)
                accepted.append(frame)
        return accepted

    def view(self, run_id: str) -> RunView:
        """The run's view, created on first sight."""
        view = self.runs.get(run_id)
        if view is None:
            view = self.runs[run_id] = RunView(run_id)
        return view

    # --- the services ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Run states from the controller (or the store), accounting from the ingest, snapshots,
        backfill. Blocks for the requests: on a thread that may wait (the watch loop)."""
        self.apply_status(self.reader.status())
        self.apply_stored(self.reader.read(self.due()))

    def apply_status(self, status: Status) -> None:
        """What a reader's `status` found: run records, or stored runs, and the accounting."""
        self.asked = True
        self.controller_ok = status.records is not None
        self.ingest_ok = status.stats is not None
        if status.records is not None:
            # the store's runs that the controller never made come after its own
            self._show_runs(status.records + status.store_only, _ended)
            for record in status.records:
                if record["run_id"] in self.runs:
                    self.runs[record["run_id"]].set_record(record)
            for row in status.store_only:
                if row["run_id"] in self.runs:
                    self.runs[row["run_id"]].set_stored_run(row)
        elif status.stored_runs is not None:
            self._show_runs(status.stored_runs, lambda r: r["status"] is not None)
            for row in status.stored_runs:
                if row["run_id"] in self.runs:
                    self.runs[row["run_id"]].set_stored_run(row)
        for run_id, stats in (status.stats or {}).items():
            if run_id in self.runs:
                self.runs[run_id].set_stats(stats, self.clock())

    def _show_runs(self, runs: list[dict[str, Any]], ended: Callable[[dict[str, Any]], bool]) -> None:
        """Follow the named runs, or the active ones and the RECENT_RUNS last finished."""
        self.order = [r["run_id"] for r in runs]
        if self.named:
            wanted = [r for r in runs if r["run_id"] in self.named]
        else:
            recent = {r["run_id"] for r in [r for r in runs if ended(r)][-RECENT_RUNS:]}
            wanted = [r for r in runs
                      if not ended(r) or r["run_id"] in recent or r["run_id"] in self.runs]
        for r in wanted:
            self.view(r["run_id"])

    def due(self) -> list[Fetch]:
        """What to read from the store now: the snapshot of each run not loaded yet, and the gaps
        older than BACKFILL_AGE (each gap is asked for once)."""
        fetches = [Fetch(v.run_id, 0, MAX_SEQ, run_row=not v.env, snapshot=True)
                   for v in self.runs.values() if not v.loaded]
        now = self.clock()
        for view in self.runs.values():
            gaps = view.seqs.due_gaps(now - BACKFILL_AGE) if view.loaded else []
            if gaps:
                fetches.append(Fetch(view.run_id, min(g[0] for g in gaps),
                                     max(g[1] for g in gaps), run_row=not view.env))
        return fetches

    def apply_stored(self, stored: list[Stored]) -> int:
        """Take what a reader read of `due()`'s fetches: the frames not held yet. The seqs taken."""
        taken = 0
        for s in stored:
            view = self.view(s.fetch.run_id)
            new = {seq for seq in s.seqs if view.seqs.take(seq, live=False, now=self.clock())}
            if s.fetch.snapshot:
                view.loaded = True
            if not new:
                continue
            for row in s.run:
                view.set_stored_run(row)
            view.add_lifecycle([r for r in s.lifecycle if r["seq"] in new])
            view.add_episode_rows([r for r in s.episodes if r["seq"] in new])
            view.add_stored_metrics([r for r in s.metrics if r["seq"] in new])
            view.add_stored_steps([r for r in s.steps if r["seq"] in new])
            taken += len(new)
        return taken

    # --- accounting -----------------------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        """The viewer's accounting over every run it shows."""
        views = self.runs.values()
        return {
            "received": self.feed.received,
            "live": sum(v.seqs.live for v in views),
            "duplicates": sum(v.seqs.duplicates for v in views),
            "missed": sum(v.seqs.missed for v in views),
            "dropped": self.feed.dropped,
            "from_store": sum(v.seqs.from_store for v in views),
            "rejected": self.rejected,
            "queued": self.feed.queued,
        }

    def active(self) -> bool:
        """Whether a shown run has not ended, or its last frames are not all accounted for."""
        return not self.runs or any(not v.settled for v in self.runs.values())

    def close(self) -> None:
        self.feed.close()
        self.reader.close()


def _ended(run: dict[str, Any]) -> bool:
    """Whether a controller's record (its `state`) or a stored row (its `status`) has ended."""
    return run["state"] in TERMINAL_STATES if "state" in run else run.get("status") is not None
