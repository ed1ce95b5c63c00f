"""The telemetry publisher: one XPUB connected to the broker's XSUB, delivering encoded frames.

Every process that puts frames on the telemetry bus publishes through this class: a run child's
emitter, `gymbus import-tb` and the worker's spool repair. The socket is an XPUB rather than a
PUB for two reasons: it reports the subscriptions the broker forwards, so that a publisher can
wait for the first one before it sends (PUB/SUB drops what is sent before a subscriber has
joined: the slow-joiner problem), and with `XPUB_NODROP` a full queue refuses a frame instead of
dropping it, so that delivery can push back on the publisher.

Two ways to send:

- `publish` (a run's frames, an import's): the frame is first appended to the spool when one is
  set, then sent; a full queue blocks in waits of `retry_ms`. Once `stop` turns true the frame is
  dropped (and counted) after GIVE_UP_AFTER_STOP more seconds without room; with a
  `block_timeout` the send raises PublishTimeout after that long without room.
- `offer` (the spool repair, on the worker daemon's loop, which must never wait): the frame is
  sent now or not at all.

Not thread-safe: each publisher is used by one thread (a run process's main thread, the CLI's,
the worker daemon's loop).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from gymbus.shared.errors import GymbusError
from gymbus.shared.protocol import FrameKind
from gymbus.shared.transport import connect, new_socket
from gymbus.worker.telemetry.spool import SpoolWriter

log = logging.getLogger("gymbus.run.publisher")

#: frames queued on the socket before a send finds no room
SEND_HWM = 100_000
#: milliseconds one blocking retry of a send waits for room in the queue
SEND_RETRY_MS = 100
#: milliseconds a closing socket may spend delivering queued frames
CLOSE_LINGER_MS = 3000
#: seconds to wait for the broker to forward a subscription
SUBSCRIBE_WAIT = 3.0
#: seconds a blocked send keeps trying once `stop` is true, before it drops the frame
GIVE_UP_AFTER_STOP = 1.0
#: seconds between two checks of `stop` while waiting for a subscriber
_SUBSCRIBE_POLL = 0.1
_SUBSCRIBE, _UNSUBSCRIBE = b"\x01", b"\x00"


class TelemetryError(GymbusError):
    """The telemetry socket failed (not a full queue: that blocks). The run fails with this reason."""


class PublishTimeout(TelemetryError):
    """No room in the queue for `block_timeout` seconds: nothing takes frames (is the broker up?)."""


class Publisher:
    """Encoded frames onto one XPUB. Build it with `Publisher.connect`, or around a socket.

    Counters (`stats`): frames and rows delivered per frame kind, frames sent in all, sends that
    found the queue full, frames dropped after `stop`.
    """

    def __init__(
        self,
        sock: zmq.Socket[Any],
        *,
        stop: Callable[[], bool] | None = None,
        block_timeout: float | None = None,
        linger_ms: int = CLOSE_LINGER_MS,
        name: str = "telemetry",
    ) -> None:
        """`stop`: true once the process is stopping (a blocked frame is then dropped after
        GIVE_UP_AFTER_STOP s); `block_timeout`: seconds without room before `publish` raises
        PublishTimeout (None: it waits as long as `stop` allows); `linger_ms`: the default of
        `close`; `name`: what it publishes, for the error once it is closed."""
        self._sock: zmq.Socket[Any] | None = sock
        self._stop = stop
        self.block_timeout = block_timeout
        self.linger_ms = linger_ms
        self.name = name
        #: the run's spool (worker/telemetry/spool.py): `publish` writes each frame to it first
        self.spool: SpoolWriter | None = None
        #: the topic prefixes subscribed now, as the broker forwarded them (b"": every topic)
        self.subscriptions: set[bytes] = set()
        #: a subscription has come (it stays true)
        self.subscribed = False
        self.frames = {kind.value: 0 for kind in FrameKind}
        self.rows = {kind.value: 0 for kind in FrameKind}
        self.sent = 0
        self.blocked_sends = 0
        self.frames_dropped = 0

    @classmethod
    def connect(
        cls,
        ctx: zmq.Context[Any],
        endpoint: str,
        *,
        hwm: int = SEND_HWM,
        retry_ms: int = SEND_RETRY_MS,
        linger_ms: int = CLOSE_LINGER_MS,
        stop: Callable[[], bool] | None = None,
        block_timeout: float | None = None,
        what: str = "broker's telemetry XSUB",
        name: str = "telemetry",
    ) -> Publisher:
        """An XPUB with `XPUB_NODROP` connected to `endpoint` (the settings' `telemetry_in`),
        queueing up to `hwm` frames; `what` names the endpoint in a connection error."""
        sock = new_socket(ctx, zmq.XPUB, linger=linger_ms)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.setsockopt(zmq.SNDTIMEO, retry_ms)
        connect(sock, endpoint, what)
        return cls(sock, stop=stop, block_timeout=block_timeout, linger_ms=linger_ms, name=name)

    # --- subscriptions ----------------------------------------------------------------------------

    def wait_for_subscriber(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the first subscription (forwarded by the broker's XSUB);
        True once one has come. Returns early, False, when `stop` turns true."""
        sock = self._socket()
        deadline = time.monotonic() + timeout
        while not self.subscribed:
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping():
                break
            if sock.poll(int(min(left, _SUBSCRIBE_POLL) * 1000) + 1, zmq.POLLIN):
                self._note(sock.recv())
        return self.subscribed

    def take_subscriptions(self) -> set[bytes]:
        """Take the (un)subscriptions forwarded since the last call, without waiting; returns
        the topic prefixes subscribed now (the ingest's is b"")."""
        sock = self._socket()
        while sock.poll(0, zmq.POLLIN):
            self._note(sock.recv())
        return self.subscriptions

    def _note(self, event: bytes) -> None:
        if event[:1] == _SUBSCRIBE:
            self.subscriptions.add(event[1:])
            self.subscribed = True
        elif event[:1] == _UNSUBSCRIBE:
            self.subscriptions.discard(event[1:])

    # --- sending ----------------------------------------------------------------------------------

    def publish(self, seq: int, parts: tuple[bytes, bytes], kind: FrameKind | None = None,
                rows: int = 0) -> bool:
        """Spool (when a spool is set) and deliver one encoded frame, blocking while the queue
        is full; False when it was dropped after `stop`.

        The spool is written before the send, so a frame that reached anyone is in it; a
        SpoolError leaves the frame unsent. `kind` and `rows` feed the per-kind counters; a
        frame published without them counts in `sent` only. Raises TelemetryError when the
        socket fails, PublishTimeout after `block_timeout` s without room.
        """
        if self.spool is not None:
            self.spool.append(seq, parts)
        if not self._deliver(seq, parts):
            return False
        self.sent += 1
        if kind is not None:
            self.frames[kind.value] += 1
            self.rows[kind.value] += rows
        return True

    def offer(self, parts: tuple[bytes, bytes]) -> bool:
        """Send one encoded frame now or not at all: False (counted in `blocked_sends`) when the
        queue is full. Never waits and never spools: for the worker daemon's loop."""
        try:
            self._socket().send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.blocked_sends += 1
            return False
        except zmq.ZMQError as exc:
            raise TelemetryError(f"cannot publish telemetry: {exc}") from None
        self.sent += 1
        return True

    def _deliver(self, seq: int, parts: tuple[bytes, bytes]) -> bool:
        """Send without blocking; when the queue is full, block in short waits (backpressure)."""
        sock = self._socket()
        try:
            sock.send_multipart(parts, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.blocked_sends += 1
        except zmq.ZMQError as exc:
            raise TelemetryError(f"cannot publish telemetry: {exc}") from None
        blocked_at = time.monotonic()
        give_up_at: float | None = None
        while True:
            try:
                sock.send_multipart(parts)  # waits up to SNDTIMEO for room
                return True
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                raise TelemetryError(f"cannot publish telemetry: {exc}") from None
            now = time.monotonic()
            if self.block_timeout is not None and now - blocked_at >= self.block_timeout:
                raise PublishTimeout(f"the broker took no frame for {self.block_timeout:g} s")
            if self._stopping():
                if give_up_at is None:
                    give_up_at = now + GIVE_UP_AFTER_STOP
                elif now >= give_up_at:
                    self.frames_dropped += 1
                    log.warning("dropped frame %d: the queue stayed full while stopping", seq)
                    return False

    # --- the rest ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The counters: frames and rows per kind, frames sent, blocked sends, drops."""
        return {"frames": dict(self.frames), "rows": dict(self.rows), "sent": self.sent,
                "blocked_sends": self.blocked_sends, "frames_dropped": self.frames_dropped,
                "subscribed": self.subscribed}

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self, linger_ms: int | None = None) -> None:
        """Close the socket; up to `linger_ms` (default: the publisher's) is spent delivering
        queued frames. Idempotent. The spool is the caller's to close."""
        if self._sock is not None:
            self._sock.close(linger=self.linger_ms if linger_ms is None else linger_ms)
            self._sock = None

    def _socket(self) -> zmq.Socket[Any]:
        if self._sock is None:
            raise TelemetryError(f"{self.name} was already closed")
        return self._sock

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop()
