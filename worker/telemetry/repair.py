"""The worker's repair of its spooled runs: it asks the ingest what it misses and replays that.

Every run this worker started, and every unconfirmed spool found in the runs folder at start
(`scan`), is tracked until the ingest confirms it. Each heartbeat interval, and at once when a
run ends, the worker asks the ingest `spool_status` {run_id, frames, final}; the answer lists the
missing seq ranges. The worker replays them from the spool, byte for byte, through its own
publisher connected to the broker's telemetry XSUB (the live path), and when a final run is
complete it writes the `confirmed` marker and removes the spool. While a run goes on and its
spool holds a complete segment, the question says `trim`: the segments below the answer's
`durable` (checkpointed by the ingest) are deleted, so that a long run's spool stays bounded.
A stopping worker `drain`s first. See docs/reliability.md.

Everything runs on the worker daemon's loop (`Repairer.tick` once per pass) and never blocks it:
the question goes out on a DEALER and its answer is taken on a later pass; an ingest that does not
answer within ASK_TIMEOUT is asked again (counted); replays are sent without blocking, a bounded
number per pass.

What is replayed, so that frames merely in flight are not sent twice: a seq missing below the
highest one the ingest holds is lost (a run's frames travel one ordered path), and is replayed at
once; the rest (the tail, or a replay that got lost) only once the run has made no progress at the
ingest for `stall_after` seconds. A frame replayed twice is dropped by the ingest's dedupe.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from gymbus.shared.codec import decode_message, encode_message
from gymbus.shared.errors import DecodeError
from gymbus.shared.protocol import Command
from gymbus.shared.settings import Settings
from gymbus.shared.transport import connect, new_socket
from gymbus.worker.telemetry import spool
from gymbus.worker.telemetry.publisher import Publisher
from gymbus.worker.telemetry.spool import SpoolError, SpoolReader

log = logging.getLogger("gymbus.worker.telemetry.repair")

#: seconds an unanswered spool_status waits before the socket is recreated and the run re-asked
ASK_TIMEOUT = 2.0
#: spool_status questions in flight at once
MAX_IN_FLIGHT = 32
#: frames, and seconds, replayed per pass of the daemon's loop (heartbeats come first)
REPLAY_FRAMES_PER_PASS = 256
REPLAY_SECONDS_PER_PASS = 0.02
#: frames the replay publisher queues before a send would block (then the pass ends)
REPLAY_HWM = 1000
#: seconds after which a hole that was replayed and is still missing is replayed again
REPLAY_AGAIN_AFTER = 10.0
#: replays of a range starting at the same seq before it is given up on (the ingest refuses it)
MAX_REPLAYS = 5
#: longest wait for the ingest's answer in one pass of `drain`
DRAIN_POLL_MS = 20
#: milliseconds the closing replay socket may deliver: the next worker asks for the rest again
LINGER_MS = 200


@dataclass(eq=False)
class SpooledRun:
    """A run whose spool the ingest has not confirmed yet."""

    run_id: str
    run_dir: Path
    reader: SpoolReader
    #: its run process (a child of this daemon) is alive
    running: bool
    next_ask: float = 0.0
    #: the request id of the question in flight, and what it said
    asking: int | None = None
    asked_frames: int = 0
    asked_final: bool = False
    #: (stored, last_seq) of the last answer, when it last changed, when the last answer came
    progress: tuple[int, int | None] | None = None
    progress_at: float = 0.0
    answered_at: float = 0.0
    #: ranges [first, last] still to send, oldest first
    replay: deque[list[int]] = field(default_factory=deque)
    #: the highest seq replayed lately (holes up to it are not replayed again before a stall)
    replayed_through: int = -1
    replayed_at: float = 0.0
    replayed: int = 0
    #: first seq of a range queued for replay -> times it was queued
    attempts: dict[int, int] = field(default_factory=dict)
    #: troubles already logged (each is logged once)
    problems: set[str] = field(default_factory=set)


class Repairer:
    """Tracks spooled runs, asks the ingest about them, replays and confirms. Daemon loop only."""

    def __init__(self, settings: Settings, ctx: zmq.Context[Any],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.ctx = ctx
        self.clock = clock
        self.interval = settings.heartbeat_interval
        #: no progress at the ingest for this long: what is missing is lost, not in flight
        self.stall_after = max(1.0, 2 * settings.heartbeat_interval)
        self.runs: dict[str, SpooledRun] = {}
        self.pending: dict[int, tuple[str, float]] = {}
        self.ids = itertools.count(1)
        self.dealer: zmq.Socket[Any] | None = None
        self.ingest_silent = False
        self.counters = dict.fromkeys(("asked", "answered", "unanswered", "refused",
                                       "frames_replayed", "replay_blocked", "confirmed",
                                       "segments_trimmed", "bytes_trimmed"), 0)
        self.publisher = Publisher.connect(
            ctx, settings.telemetry_in, hwm=REPLAY_HWM, linger_ms=LINGER_MS,
            what="broker's telemetry XSUB (replays)", name="the spool repair's publisher")

    # --- what is tracked --------------------------------------------------------------------------

    def scan(self) -> int:
        """Track every unconfirmed spool in the runs folder (those a stopped worker left)."""
        runs_dir = self.settings.runs_dir
        found = 0
        if runs_dir.is_dir():
            for run_dir in sorted(runs_dir.iterdir()):
                path = spool.spool_path(run_dir)
                if run_dir.name in self.runs or not path.exists():
                    continue
                if spool.is_confirmed(run_dir):  # removed after the marker, or meant to be
                    for _, segment in spool.segments(spool.spool_dir(run_dir)):
                        segment.unlink(missing_ok=True)
                    continue
                self.track(run_dir.name, run_dir, running=False)
                found += 1
        if found:
            log.info("%d unconfirmed spools found in %s: repairing them", found, runs_dir)
        return found

    def track(self, run_id: str, run_dir: Path, *, running: bool) -> None:
        """Follow a run's spool: one whose child was just started, or one found by `scan`."""
        now = self.clock()
        self.runs[run_id] = SpooledRun(run_id, run_dir, SpoolReader(spool.spool_path(run_dir)),
                                       running, next_ask=now + self.interval if running else now)

    def run_ended(self, run_id: str) -> None:
        """Its child has exited: ask about it at once, now with `final`."""
        run = self.runs.get(run_id)
        if run is not None:
            run.running = False
            run.next_ask = self.clock()

    def busy(self) -> bool:
        """Frames wait to be replayed and can be (the daemon then polls without waiting)."""
        return self._ingest_subscribed() and any(run.replay for run in self.runs.values())

    # --- one pass ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """Take answers, give up on silent questions, ask what is due, replay within budget."""
        now = self.clock()
        self.publisher.take_subscriptions()
        self._take_answers(now)
        self._expire(now)
        self._ask(now)
        self._replay(now)

    def _ingest_subscribed(self) -> bool:
        """The ingest's subscription (to every topic, b"") has reached the replay publisher."""
        return b"" in self.publisher.subscriptions

    def _require_dealer(self) -> zmq.Socket[Any]:
        if self.dealer is None:
            self.dealer = new_socket(self.ctx, zmq.DEALER, linger=0)
            connect(self.dealer, self.settings.ingest, "ingest")
        return self.dealer

    def _ask(self, now: float) -> None:
        for run in list(self.runs.values()):
            if len(self.pending) >= MAX_IN_FLIGHT:
                return
            if run.asking is not None or run.replay or now < run.next_ask:
                continue
            run.next_ask = now + self.interval
            # the writer is checked before the file is read: a writer gone by then wrote it all
            gone = not run.running and not spool.writer_alive(run.reader.path)
            try:
                frames = run.reader.refresh()
            except SpoolError as exc:
                self._problem(run, str(exc))
                continue
            if run.reader.damage is not None:
                self._problem(run, f"spool damaged, repaired up to frame {frames}: "
                                   f"{run.reader.damage}; it is kept, never confirmed")
            if gone and not run.reader.exhausted:
                run.next_ask = now  # a long spool is indexed over several passes
                continue
            final = gone and run.reader.damage is None
            if final and frames == 0:  # the run process died before its first frame
                self._confirm(run, 0)
                continue
            self._send_question(run, frames, final, now)

    def _send_question(self, run: SpooledRun, frames: int, final: bool, now: float) -> None:
        req = next(self.ids)
        body = {"run_id": run.run_id, "frames": frames, "final": final}
        if not final and len(run.reader.segments) > 1:  # a complete segment could be trimmed
            body["trim"] = True
        try:
            self._require_dealer().send(encode_message(Command.SPOOL_STATUS, body, req),
                                        flags=zmq.NOBLOCK)
        except zmq.Again:
            return  # the queue to the ingest is full: asked again next interval
        self.pending[req] = (run.run_id, now)
        run.asking, run.asked_frames, run.asked_final = req, frames, final
        self.counters["asked"] += 1

    def _take_answers(self, now: float) -> None:
        dealer = self.dealer
        while dealer is not None and dealer.poll(0, zmq.POLLIN):
            try:
                msg = decode_message(dealer.recv(), self.settings.max_frame_bytes)
            except DecodeError as exc:
                log.warning("malformed answer from the ingest dropped: %s", exc)
                continue
            asked = self.pending.pop(msg.req, None)
            run = self.runs.get(asked[0]) if asked is not None else None
            if run is None or run.asking != msg.req:
                continue  # a late answer to a question given up on
            run.asking = None
            self.counters["answered"] += 1
            if self.ingest_silent:
                self.ingest_silent = False
                log.info("the ingest answers spool_status again")
            if not msg.ok:
                self.counters["refused"] += 1
                self._problem(run, f"the ingest refused spool_status: {msg.error}")
                continue
            try:
                self._answered(run, msg.body, now)
            except (KeyError, TypeError, ValueError) as exc:
                self._problem(run, f"malformed spool_status answer {msg.body!r}: {exc}")

    def _expire(self, now: float) -> None:
        """No answer within ASK_TIMEOUT: forget the questions, recreate the socket, ask again."""
        if not self.pending or now - min(sent for _, sent in self.pending.values()) < ASK_TIMEOUT:
            return
        self.counters["unanswered"] += len(self.pending)
        if not self.ingest_silent:  # once per silence, not once per question
            self.ingest_silent = True
            log.warning("the ingest at %s did not answer spool_status within %.1f s; asking again "
                        "every %.2f s (%d spools waiting)", self.settings.ingest, ASK_TIMEOUT,
                        self.interval, len(self.runs))
        for run_id, _ in self.pending.values():
            run = self.runs.get(run_id)
            if run is not None:
                run.asking = None
        self.pending.clear()
        if self.dealer is not None:
            self.dealer.close(linger=0)
            self.dealer = None

    # --- an answer --------------------------------------------------------------------------------

    def _answered(self, run: SpooledRun, body: dict[str, Any], now: float) -> None:
        """Confirm a complete final run; else queue what is missing and evidently lost."""
        missing = [(int(first), int(last)) for first, last in body["missing"]]
        stored, last_seq = int(body["stored"]), body.get("last_seq")
        if run.asked_final and body.get("complete") is True:
            self._confirm(run, run.asked_frames)
            return
        self._trim(run, body.get("durable"))
        if missing and missing[0][0] < run.reader.first:
            self._problem(run, f"the ingest misses frames from {missing[0][0]} that it had "
                               "confirmed durable, and the spool no longer holds them")
        # a stall is seen across answers that kept coming: after a silence of the ingest (down,
        # frozen) its backlog may still hold the run's frames
        if (stored, last_seq) != run.progress or now - run.answered_at > self.stall_after:
            run.progress, run.progress_at = (stored, last_seq), now
        run.answered_at = now
        if not missing:
            return
        stalled = now - run.progress_at >= self.stall_after
        if now - run.replayed_at >= REPLAY_AGAIN_AFTER:
            run.replayed_through = -1
        for first, last in missing:
            if not stalled:  # only holes below what the ingest holds, not replayed lately
                if last_seq is None:
                    break
                first, last = max(first, run.replayed_through + 1), min(last, int(last_seq) - 1)
            if first > last:
                continue
            tries = run.attempts[first] = run.attempts.get(first, 0) + 1
            if tries > MAX_REPLAYS:
                self._problem(run, f"frames {first}-{last} were replayed {MAX_REPLAYS} times and "
                                   "the ingest still lacks them (refused? see its dead_letters); "
                                   "no more replays, the spool is kept")
                continue
            run.replay.append([first, last])

    def _trim(self, run: SpooledRun, durable: object) -> None:
        """Delete the spool's segments below `durable`: the ingest said that every frame below
        it is in its checkpointed file, so none of them is ever asked for again."""
        if type(durable) is not int or durable <= run.reader.first:
            return
        segments = len(run.reader.segments)
        try:
            freed = run.reader.trim(min(durable, run.asked_frames))
        except SpoolError as exc:
            self._problem(run, str(exc))
            return
        self.counters["segments_trimmed"] += segments - len(run.reader.segments)
        self.counters["bytes_trimmed"] += freed

    def _confirm(self, run: SpooledRun, frames: int) -> None:
        try:
            spool.confirm(run.run_dir, frames)
        except OSError as exc:
            self._problem(run, f"cannot remove the confirmed spool: {exc}")
            return
        del self.runs[run.run_id]
        self.counters["confirmed"] += 1
        log.info("run %s: the ingest holds all %d frames; spool removed (%d frames replayed)",
                 run.run_id, frames, run.replayed)

    def _problem(self, run: SpooledRun, what: str) -> None:
        """Log a run's trouble, once per run and kind of trouble."""
        if what not in run.problems and len(run.problems) < 100:
            run.problems.add(what)
            log.error("run %s: %s", run.run_id, what)

    # --- replaying --------------------------------------------------------------------------------

    def _replay(self, now: float) -> None:
        """Send queued ranges, oldest first, until the pass budget or the queue's room is spent."""
        if not self._ingest_subscribed():
            return  # nobody would receive them: the broker or the ingest is not up
        budget = [REPLAY_FRAMES_PER_PASS]
        until = time.perf_counter() + REPLAY_SECONDS_PER_PASS
        for run in list(self.runs.values()):
            while run.replay:
                if not self._replay_first(run, budget, until, now):
                    return

    def _replay_first(self, run: SpooledRun, budget: list[int], until: float, now: float) -> bool:
        """Send run.replay[0] as far as the budget goes; False when the pass must end."""
        first, last = run.replay[0]
        frames = run.reader.read_range(first, last)
        try:
            for seq, topic, payload in frames:
                if budget[0] <= 0 or time.perf_counter() > until:
                    run.replay[0][0] = seq
                    return False
                if not self.publisher.offer((topic, payload)):
                    self.counters["replay_blocked"] += 1
                    run.replay[0][0] = seq
                    return False
                budget[0] -= 1
                run.replayed += 1
                run.replayed_through = max(run.replayed_through, seq)
                run.replayed_at = now
                self.counters["frames_replayed"] += 1
        except SpoolError as exc:  # the file cannot be read: nothing of it can be replayed now
            self._problem(run, f"cannot replay: {exc}")
            run.replay.clear()
        finally:
            frames.close()
        if run.reader.bad_records:
            self._problem(run, f"{len(run.reader.bad_records)} damaged records in the spool "
                               f"(from frame {min(run.reader.bad_records)}) cannot be replayed; "
                               "the spool stays until the ingest holds them")
        if run.replay:
            run.replay.popleft()
        if not run.replay:  # what was sent is in flight: ask again an interval later
            run.next_ask = now + self.interval
        return True

    def drain(self, seconds: float) -> int:
        """Before the worker exits: ask about every tracked spool at once and replay what the
        ingest misses, until it confirms them all or `seconds` pass. Returns the spools left
        unconfirmed (the next worker on this host repairs them)."""
        now = self.clock()
        until = now + seconds
        for run in self.runs.values():
            run.next_ask = min(run.next_ask, now)
        while self.runs and self.clock() < until:
            self.tick()
            if not self.busy():  # nothing to send now: wait for an answer, briefly
                if self.dealer is not None:
                    self.dealer.poll(DRAIN_POLL_MS, zmq.POLLIN)
                else:
                    time.sleep(DRAIN_POLL_MS / 1000)  # no question could be sent: try again
        return len(self.runs)

    def close(self) -> None:
        """Close both sockets (queued replays are asked for again by the next worker)."""
        log.info("repair: %d spools unconfirmed; %s", len(self.runs), self.counters)
        self.publisher.close()
        if self.dealer is not None:
            self.dealer.close(linger=0)
            self.dealer = None
