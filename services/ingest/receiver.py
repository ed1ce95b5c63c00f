"""The ingest's receiver: a thread that owns the telemetry SUB and hands decoded batches to the
writer through a bounded queue, so that a flush, an archive or a slow query never stops receiving.

The receiver thread is the only user of the SUB (and of the wake socket's sending end) once
started; the writer (the ingest loop) takes batches with `take`. A full queue blocks the
receiver: the SUB's high-water mark then applies upstream, where the broker counts what its
XPUB drops, so nothing is dropped here without a count. After each batch the receiver sends one
empty message on an inproc PAIR that the writer polls beside its ROUTER, so that the writer
sleeps in `zmq.Poller` rather than spinning on the queue. At stop the receiver takes what the SUB
still holds (bounded in time), then puts the sentinel; the writer takes everything up to it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from gymbus.shared.codec import Frame, decode_frame
from gymbus.shared.errors import DecodeError, GymbusError

log = logging.getLogger("gymbus.ingest")

#: messages the queue holds before the receiver blocks, and messages in one batch at most
QUEUE_MESSAGES = 20_000
BATCH_FRAMES = 1000
#: milliseconds the receiver waits on the SUB before it looks at the stop event again
POLL_MS = 100
#: seconds one blocked put waits before it looks at the stop event again
PUT_WAIT_S = 0.1


class ReceiverFailed(GymbusError):
    """The receiver thread ended on an error; the ingest stops (exit code 1). Restart it: the
    workers' spools bring back the frames it did not receive."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that failed to decode, with the reason, kept by the writer."""

    parts: list[bytes]
    reason: str


#: one received message and its arrival time (time.time_ns())
Received = tuple[Frame | DeadLetter, int]


class Receiver:
    """The SUB's thread and the queue between it and the writer.

    `sub` and `wake` (the sending end of an inproc PAIR) must not be used by any other thread
    once `start` is called; `close` closes them after the thread has ended.
    """

    def __init__(self, sub: zmq.Socket[Any], wake: zmq.Socket[Any], max_frame_bytes: int,
                 capacity: int | None = None) -> None:
        #: messages queued at most (a batch that finds room is queued whole)
        self.capacity = capacity or QUEUE_MESSAGES
        self.sub = sub
        self.wake = wake
        self.max_frame_bytes = max_frame_bytes
        self.queue: queue.Queue[list[Received] | None] = queue.Queue()
        self._room = threading.Condition()
        #: messages queued by the receiver (its thread) and taken by the writer (the writer's)
        self.received = 0
        self.taken = 0
        #: the most messages that waited in the queue at once, and the puts that found it full
        self.backlog_max = 0
        self.full_waits = 0
        self.final_drain_s = 0.5
        self._stop = threading.Event()
        self._writer_gone = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="ingest-receiver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # --- the receiver thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.sub.poll(POLL_MS, zmq.POLLIN):
                    self._put(self._take_waiting())
            deadline = time.monotonic() + self.final_drain_s
            while time.monotonic() < deadline and self.sub.poll(0, zmq.POLLIN):
                self._put(self._take_waiting())
        except Exception:  # a receiver bug must not leave the writer waiting for the sentinel
            log.exception("the telemetry receiver failed; the ingest stops receiving")
        finally:
            self._put(None)

    def _take_waiting(self) -> list[Received]:
        """What the SUB holds now, decoded, up to BATCH_FRAMES messages."""
        batch: list[Received] = []
        for _ in range(BATCH_FRAMES):
            try:
                parts = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            now = time.time_ns()
            try:
                batch.append((decode_frame(parts, self.max_frame_bytes), now))
            except DecodeError as exc:
                batch.append((DeadLetter(parts, exc.reason), now))
            except Exception as exc:  # a decoder bug costs one frame, not the ingest
                log.exception("decoder error")
                batch.append((DeadLetter(parts, f"decoder error: {type(exc).__name__}: {exc}"),
                              now))
        return batch

    def _put(self, batch: list[Received] | None) -> None:
        """Queue a batch (None: the sentinel), blocking while `capacity` messages wait already;
        then wake the writer. Stops waiting only when the writer has gone (`abandon`)."""
        if batch is not None and not batch:
            return
        with self._room:
            while (batch is not None and self.received - self.taken >= self.capacity
                   and not self._writer_gone.is_set()):
                self.full_waits += 1
                self._room.wait(PUT_WAIT_S)
        if batch is not None:
            self.received += len(batch)
        self.queue.put(batch)
        self.backlog_max = max(self.backlog_max, self.received - self.taken)
        try:
            self.wake.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # a wake-up is waiting already: the writer takes every queued batch on it

    # --- the writer's side --------------------------------------------------------------------

    def take(self, timeout: float | None = None) -> list[Received] | None:
        """The next batch; [] when none waits (within `timeout`, when given); None once the
        sentinel has come (the receiver has stopped, and everything before it was taken)."""
        if self._ended:
            return None
        try:
            batch = self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
        except queue.Empty:
            return []
        if batch is None:
            self._ended = True
            return None
        self.taken += len(batch)
        with self._room:
            self._room.notify()
        return batch

    def waiting(self) -> bool:
        return not self.queue.empty()

    def stop(self) -> None:
        """Ask the thread to take what the SUB still holds and end; the writer then takes the
        rest with `take` until it returns None."""
        self._stop.set()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def abandon(self) -> None:
        """The writer takes nothing more: let a blocked put give up, so that the thread ends."""
        self._stop.set()
        self._writer_gone.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (whatever is still queued is dropped, and counted in the log) and
        close the sockets. Idempotent."""
        self.abandon()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        left = self.received - self.taken
        if left:
            log.warning("%d received telemetry messages were never written", left)
        self.sub.close(linger=0)
        self.wake.close(linger=0)

    def stats(self) -> dict[str, int]:
        """Counters for `ingest_stats`: received, waiting in the queue, most waiting, full waits."""
        return {"received": self.received, "receive_backlog": self.received - self.taken,
                "receive_backlog_max": self.backlog_max, "receive_full_waits": self.full_waits}
