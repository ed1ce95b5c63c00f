"""The telemetry emitter of one run: batches steps, episodes and metrics into columnar frames.

Runs on the run process's main thread only (not thread-safe). One `seq` counter covers every
frame of the run, from 0. The socket is an XPUB connected to the broker's XSUB: XPUB rather than
PUB so that the emitter can wait for the first subscription before it publishes (the slow-joiner
problem), and so that with `XPUB_NODROP` a full queue pushes back on the run instead of losing
frames.

The per-step path (`step`) appends one row tuple to a list created once and cleared after each
flush: no dict, no encoding, no send per step. At flush the rows become columns (`zip`), and
numpy scalars from an environment are converted only if msgpack refuses the frame as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from gymbus.shared.codec import encode_frame
from gymbus.shared.errors import DecodeError, GymbusError
from gymbus.shared.protocol import FrameKind, LifecycleEvent
from gymbus.shared.transport import connect, new_socket

log = logging.getLogger("gymbus.run.emitter")

#: a step frame is flushed at this many rows, or FLUSH_INTERVAL after its first row
STEP_BATCH_ROWS = 1024
EPISODE_BATCH_ROWS = 256
METRIC_BATCH_ROWS = 1024
#: seconds; also the age at which episode and metric batches are flushed
FLUSH_INTERVAL = 0.1
#: seconds to wait for the broker to forward a subscription before publishing anyway
SUBSCRIBE_WAIT = 3.0
SEND_HWM = 100_000
#: milliseconds a closing socket may spend delivering queued frames
CLOSE_LINGER_MS = 3000
#: milliseconds one blocking retry of a send waits for room in the queue
SEND_RETRY_MS = 100
#: seconds a blocked send keeps trying once the run is being stopped, before it drops the frame
GIVE_UP_AFTER_STOP = 1.0

_EPISODE_COLUMNS = ("episode", "return", "length", "terminated", "truncated", "ts_ns")
_METRIC_COLUMNS = ("name", "step", "value", "ts_ns")


class TelemetryError(GymbusError):
    """The telemetry socket failed (not a full queue: that blocks). The run fails with this reason."""


def _bools(column: tuple[Any, ...]) -> Any:
    """A bool column as is when it holds Python bools only (0/1 would pack as ints), else cast."""
    if set(map(type, column)) == {bool}:
        return column
    return np.asarray(column, dtype=bool).tolist()


def _normalized(body: dict[str, Any], n: int, vector_obs: bool) -> dict[str, Any]:
    """A step body with numpy scalars (np.int64, np.float32, ...) turned into Python numbers."""
    out = dict(body)
    for name in ("episode", "step", "action"):
        out[name] = np.asarray(body[name], dtype=np.int64).tolist()
    out["reward"] = np.asarray(body["reward"], dtype=np.float64).tolist()
    if vector_obs:
        out["obs"] = np.asarray(body["obs"], dtype=np.float64).reshape(n, -1).tolist()
    else:
        out["obs"] = np.asarray(body["obs"], dtype=np.int64).tolist()
    return out


class _Batch:
    """Columns of episode or metric rows, flushed by count or by the time since the last flush."""

    def __init__(self, kind: FrameKind, names: tuple[str, ...], max_rows: int, now: float) -> None:
        self.kind = kind
        self.names = names
        self.columns: list[list[Any]] = [[] for _ in names]
        self.max_rows = max_rows
        self.rows = 0
        self.last_flush = now

    def add(self, values: tuple[Any, ...]) -> None:
        for column, value in zip(self.columns, values):
            column.append(value)
        self.rows += 1

    def due(self, now: float) -> bool:
        return self.rows >= self.max_rows or now - self.last_flush >= FLUSH_INTERVAL

    def take(self, now: float) -> dict[str, Any]:
        body = {name: list(column) for name, column in zip(self.names, self.columns)}
        for column in self.columns:
            column.clear()
        self.rows = 0
        self.last_flush = now
        return body


class Emitter:
    """Frames of one run onto one socket. Build it with `Emitter.connect`, or around a socket."""

    def __init__(
        self,
        sock: zmq.Socket[Any],
        run_id: str,
        *,
        agent_id: str = "",
        worker_id: str = "",
        clock: Callable[[], float] = time.monotonic,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self._sock: zmq.Socket[Any] | None = sock
        self.run_id = run_id
        self.agent_id = agent_id
        self.worker_id = worker_id
        self._clock = clock
        self._stop = stop
        self.seq = 0
        self.frames = {kind.value: 0 for kind in FrameKind}
        self.rows = {kind.value: 0 for kind in FrameKind}
        self.blocked_sends = 0
        self.frames_dropped = 0
        self.subscribed = False
        now = clock()
        self._episodes = _Batch(FrameKind.EPISODE, _EPISODE_COLUMNS, EPISODE_BATCH_ROWS, now)
        self._metrics = _Batch(FrameKind.METRIC, _METRIC_COLUMNS, METRIC_BATCH_ROWS, now)
        # steps are buffered as row tuples in one list (created once, cleared after each flush)
        # and turned into columns at flush time by zip(): one append per step measures about
        # half the cost of eight per-column appends
        self._rows: list[tuple[Any, ...]] = []
        self._append_row = self._rows.append
        self._n = 0
        self._deadline = 0.0
        self._t0_ns = 0
        self._vector_obs = False
        self._labels = False

    @classmethod
    def connect(
        cls,
        ctx: zmq.Context[Any],
        endpoint: str,
        run_id: str,
        *,
        agent_id: str = "",
        worker_id: str = "",
        hwm: int = SEND_HWM,
        subscribe_wait: float = SUBSCRIBE_WAIT,
        stop: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Emitter:
        """An XPUB connected to `endpoint`, after waiting up to `subscribe_wait` s for a subscriber."""
        sock = new_socket(ctx, zmq.XPUB, linger=CLOSE_LINGER_MS)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.setsockopt(zmq.SNDTIMEO, SEND_RETRY_MS)
        connect(sock, endpoint, "broker's telemetry XSUB")
        emitter = cls(sock, run_id, agent_id=agent_id, worker_id=worker_id, clock=clock, stop=stop)
        emitter.wait_for_subscriber(subscribe_wait)
        return emitter

    def wait_for_subscriber(self, timeout: float) -> bool:
        """Wait for the first subscription message (forwarded by the broker's XSUB)."""
        sock = self._socket()
        deadline = time.monotonic() + timeout
        while not self.subscribed:
            left = deadline - time.monotonic()
            if left <= 0 or (self._stop is not None and self._stop()):
                break
            if sock.poll(int(min(left, 0.1) * 1000) + 1, zmq.POLLIN):
                sock.recv()
                self.subscribed = True
        if not self.subscribed:
            log.warning("no subscriber after %.1f s: is the broker up? publishing anyway", timeout)
        return self.subscribed

    def configure_steps(self, *, vector_obs: bool, labels: bool) -> None:
        """Observations as float vectors (Box) or integers (Discrete); with or without labels."""
        if self._n:
            self.flush_steps()
        self._vector_obs = vector_obs
        self._labels = labels
        if vector_obs:
            self.step = self._step_vector  # type: ignore[method-assign]
        else:
            self.step = self._step_scalar  # type: ignore[method-assign]

    # --- the per-step path --------------------------------------------------------------------

    def step(
        self,
        episode: int,
        step: int,
        action: int,
        obs: Any,
        reward: float,
        terminated: bool,
        truncated: bool,
        label: str | None = None,
    ) -> None:
        """Buffer one step; flushes at STEP_BATCH_ROWS rows or FLUSH_INTERVAL after the first.

        For Discrete observations (the default); `configure_steps` switches to Box ones.
        """
        self._append_row((episode, step, action, obs, reward, terminated, truncated, label))
        n = self._n + 1
        self._n = n
        if n == 1:
            self._deadline = self._clock() + FLUSH_INTERVAL
            self._t0_ns = time.time_ns()
        elif n >= STEP_BATCH_ROWS or self._clock() >= self._deadline:
            self.flush_steps()

    _step_scalar = step

    def _step_vector(
        self,
        episode: int,
        step: int,
        action: int,
        obs: Any,
        reward: float,
        terminated: bool,
        truncated: bool,
        label: str | None = None,
    ) -> None:
        """`step` for Box observations: copies the array (an env may reuse it) as a list."""
        self._step_scalar(episode, step, action, obs.tolist(), reward, terminated, truncated, label)

    def flush_steps(self) -> None:
        """Send the buffered steps as one step frame (nothing if none are buffered).

        The columns go to msgpack as they are; only when that fails (numpy scalars from an
        environment) are they converted, so the common case pays no per-row conversion.
        """
        n = self._n
        if not n:
            return
        episode, step, action, obs_rows, reward, terminated, truncated, label = zip(*self._rows)
        self._rows.clear()
        self._n = 0
        obs: Any = obs_rows
        if self._vector_obs and obs_rows[0] and isinstance(obs_rows[0][0], list):
            obs = np.asarray(obs_rows, dtype=np.float64).reshape(n, -1).tolist()  # a 2-D+ Box
        body: dict[str, Any] = {
            "episode": episode,
            "step": step,
            "action": action,
            "obs": obs,
            "reward": reward,
            "terminated": _bools(terminated),
            "truncated": _bools(truncated),
            "t0_ns": self._t0_ns,
        }
        if self._labels:
            body["label"] = ["" if v is None else v for v in label] if None in label else label
        try:
            parts = self._encode(FrameKind.STEP, body)
        except DecodeError:
            parts = self._encode(FrameKind.STEP, _normalized(body, n, self._vector_obs))
        self._publish(FrameKind.STEP, parts, n)

    # --- per episode and per metric -----------------------------------------------------------

    def episode(self, episode: int, ret: float, length: int, terminated: bool, truncated: bool) -> None:
        """Buffer one finished episode; a due episode batch flushes steps and metrics too."""
        self._episodes.add(
            (int(episode), float(ret), int(length), bool(terminated), bool(truncated), time.time_ns())
        )
        if self._episodes.due(self._clock()):
            self.flush()

    def metric(self, name: str, step: int, value: float) -> None:
        """Buffer one metric value (the agents' MetricSink)."""
        self._metrics.add((name, int(step), float(value), time.time_ns()))
        now = self._clock()
        if self._metrics.due(now):
            self._send_batch(self._metrics, now)

    def flush(self) -> None:
        """Send everything buffered: steps first, then episodes, then metrics."""
        now = self._clock()
        self.flush_steps()
        self._send_batch(self._episodes, now)
        self._send_batch(self._metrics, now)

    def _send_batch(self, batch: _Batch, now: float) -> None:
        if batch.rows:
            rows = batch.rows
            self._send(batch.kind, batch.take(now), rows)

    # --- lifecycle ----------------------------------------------------------------------------

    def lifecycle(self, event: LifecycleEvent, **fields: Any) -> None:
        """Send a lifecycle frame now, after whatever is buffered (so that order is kept)."""
        self.flush()
        self._send(FrameKind.LIFECYCLE, {"event": event.value, **fields}, 1)

    def artifact(self, name: str, path: str, fmt: str) -> None:
        self.lifecycle(LifecycleEvent.ARTIFACT, name=name, path=path, format=fmt)

    def finish(self, status: str, reason: str | None, episodes: int, steps: int) -> int:
        """Flush and send `run_completed` (the run's last frame); returns frames_emitted."""
        self.flush()
        frames_emitted = self.seq + 1
        self._send(
            FrameKind.LIFECYCLE,
            {
                "event": LifecycleEvent.RUN_COMPLETED.value,
                "status": status,
                "frames_emitted": frames_emitted,
                "reason": reason,
                "episodes": episodes,
                "steps": steps,
            },
            1,
        )
        return frames_emitted

    def stats(self) -> dict[str, Any]:
        """Counters for result.json: frames and rows per kind, blocked sends, drops."""
        return {
            "frames_emitted": self.seq,
            "frames": dict(self.frames),
            "rows": dict(self.rows),
            "blocked_sends": self.blocked_sends,
            "frames_dropped": self.frames_dropped,
            "subscribed": self.subscribed,
        }

    def close(self, linger_ms: int = CLOSE_LINGER_MS) -> None:
        """Close the socket; up to `linger_ms` is spent delivering queued frames. Idempotent."""
        if self._sock is not None:
            self._sock.close(linger=linger_ms)
            self._sock = None

    # --- sending ------------------------------------------------------------------------------

    def _socket(self) -> zmq.Socket[Any]:
        if self._sock is None:
            raise TelemetryError(f"telemetry of run {self.run_id} was already closed")
        return self._sock

    def _encode(self, kind: FrameKind, body: dict[str, Any]) -> tuple[bytes, bytes]:
        return encode_frame(
            kind, self.run_id, self.seq, body, agent_id=self.agent_id, worker_id=self.worker_id
        )

    def _send(self, kind: FrameKind, body: dict[str, Any], rows: int) -> None:
        self._publish(kind, self._encode(kind, body), rows)

    def _publish(self, kind: FrameKind, parts: tuple[bytes, bytes], rows: int) -> None:
        """Deliver an encoded frame; its seq is spent whether or not it is delivered."""
        self.seq += 1
        if self._deliver(parts):
            self.frames[kind.value] += 1
            self.rows[kind.value] += rows

    def _deliver(self, parts: tuple[bytes, bytes]) -> bool:
        """Send without blocking; when the queue is full, block in short waits (backpressure)."""
        sock = self._socket()
        try:
            sock.send_multipart(parts, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.blocked_sends += 1
        except zmq.ZMQError as exc:
            raise TelemetryError(f"cannot publish telemetry: {exc}") from None
        give_up_at: float | None = None
        while True:
            try:
                sock.send_multipart(parts)  # waits up to SNDTIMEO for room
                return True
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                raise TelemetryError(f"cannot publish telemetry: {exc}") from None
            if self._stop is not None and self._stop():
                now = time.monotonic()
                if give_up_at is None:
                    give_up_at = now + GIVE_UP_AFTER_STOP
                elif now >= give_up_at:
                    self.frames_dropped += 1
                    log.warning("dropped frame %d: the queue stayed full while stopping", self.seq - 1)
                    return False
