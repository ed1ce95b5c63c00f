"""The telemetry emitter of one run: batches steps, episodes and metrics into columnar frames.

Runs on the run process's main thread only (not thread-safe). One `seq` counter covers every
frame of the run, from 0. What is here is the batching and when a batch is flushed; a batch's
rows become a frame's columns in `gymbus.worker.telemetry.columns`, and the frames are delivered
(spool first, then the socket, with backpressure) by `gymbus.worker.telemetry.publisher`.

Steps are batched as the training loop appends them (`gymbus.worker.telemetry.step_buffer`:
four appends a step, one call per run of steps of an episode); episodes and metrics are
closures that append one row tuple per call to a list created once and cleared after each
flush: no dict, no encoding, no send per call. At flush the rows become typed columns, and
numpy scalars from an environment are converted only if msgpack refuses the frame as it is.
In fast mode the training loop appends no step, so no step frame is built at all.

Metric observers (the run's TensorBoard log) get each batch of metric rows as it is taken, so
TensorBoard costs the training loop nothing per value (`gymbus.worker.telemetry.observers`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

import zmq

from gymbus.shared.codec import encode_frame
from gymbus.shared.errors import DecodeError
from gymbus.shared.protocol import MAX_FRAME_BYTES, FrameKind, LifecycleEvent
from gymbus.worker.telemetry import columns
from gymbus.worker.telemetry.columns import KINDS, StepColumns
from gymbus.worker.telemetry.observers import (
    EpisodesObserver,
    MetricObserver,
    MetricObservers,
    MetricRow,
)
from gymbus.worker.telemetry.publisher import (
    CLOSE_LINGER_MS,
    SEND_HWM,
    SUBSCRIBE_WAIT,
    Publisher,
)
from gymbus.worker.telemetry.spool import SpoolError, SpoolWriter
from gymbus.worker.telemetry.step_buffer import StepAppenders, StepBuffer

log = logging.getLogger("gymbus.run.emitter")

#: a step frame is flushed at this many rows (fewer for large observations:
#: `StepColumns.max_rows`), or (at most about twice) FLUSH_INTERVAL after its first row. A
#: flush's Python and numpy calls run with cold caches after the environment's steps (timed
#: inside a FrozenLake run: 0.37-0.44 ms for 1,024 rows, 0.58-0.63 ms for 4,096, where a tight
#: loop flushes 1,024 rows in 0.11-0.16 ms): 4,096 rows a frame cost a FrozenLake step ~150 ns
#: where 1,024 cost ~400
STEP_BATCH_ROWS = 4096
EPISODE_BATCH_ROWS = 4096
METRIC_BATCH_ROWS = 1024
#: seconds; also the age at which episode and metric batches are flushed
FLUSH_INTERVAL = 0.1

_VALUE: Callable[[MetricRow], float] = itemgetter(columns.COLUMNS[FrameKind.METRIC].index("value"))


class _Batch:
    """Episode or metric rows, as tuples in one list; flushed by count or by age.

    `deadline` is when the batch is due by time: FLUSH_INTERVAL after the last flush.
    """

    def __init__(self, now: float) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.deadline = now + FLUSH_INTERVAL

    def take(self, now: float) -> list[tuple[Any, ...]]:
        """The buffered rows; the batch starts over, due again FLUSH_INTERVAL from `now`."""
        rows = self.rows[:]
        self.rows.clear()
        self.deadline = now + FLUSH_INTERVAL
        return rows


class Emitter:
    """Frames of one run onto one publisher. Build it with `Emitter.connect`, or around a
    Publisher (or a bare socket, which it wraps in one)."""

    def __init__(
        self,
        publisher: Publisher | zmq.Socket[Any],
        run_id: str,
        *,
        agent_id: str = "",
        worker_id: str = "",
        clock: Callable[[], float] = time.monotonic,
        stop: Callable[[], bool] | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        """`stop` (true once the run is being stopped) is for a bare socket: a Publisher
        brings its own. `max_frame_bytes` is the frame limit the services keep
        (`GYMBUS_MAX_FRAME_BYTES`): batches of large observations stay within half of it."""
        if isinstance(publisher, Publisher):
            if stop is not None:
                raise TypeError("stop belongs to the Publisher: pass it to Publisher.connect")
        else:
            publisher = Publisher(publisher, stop=stop, name=f"telemetry of run {run_id}")
        self.publisher = publisher
        self.run_id = run_id
        self.agent_id = agent_id
        self.worker_id = worker_id
        self._clock = clock
        self._value_bytes = max_frame_bytes // 2
        self.seq = 0
        #: metric values dropped because they were NaN or infinite
        self.metrics_dropped = 0
        #: step and episode rows not sent because they held a NaN or an infinite number (the
        #: protocol stores none: the ingest would refuse their whole frame)
        self.rows_refused = 0
        now = clock()
        self._episodes = _Batch(now)
        self._metrics = _Batch(now)
        self._observers = MetricObservers(self._metrics.rows, self._episodes.rows)
        self._steps = self._step_buffer(StepColumns())
        self._bind_hot_paths()

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
        subscribe_wait: float | None = SUBSCRIBE_WAIT,
        stop: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> Emitter:
        """A publisher connected to `endpoint`, after waiting up to `subscribe_wait` s for a
        subscriber (None: no wait, for a run that knows it records offline, to its spool)."""
        publisher = Publisher.connect(ctx, endpoint, hwm=hwm, stop=stop,
                                      name=f"telemetry of run {run_id}")
        emitter = cls(publisher, run_id, agent_id=agent_id, worker_id=worker_id, clock=clock,
                      max_frame_bytes=max_frame_bytes)
        if subscribe_wait is not None:
            emitter.wait_for_subscriber(subscribe_wait)
        return emitter

    def wait_for_subscriber(self, timeout: float) -> bool:
        """Wait for the first subscription message (forwarded by the broker's XSUB); without
        one the run publishes anyway, and its spool keeps what nobody received."""
        if not self.publisher.wait_for_subscriber(timeout):
            log.warning("no subscriber after %.1f s: is the broker up? publishing anyway", timeout)
        return self.publisher.subscribed

    @property
    def spool(self) -> SpoolWriter | None:
        """The run's spool (worker/telemetry/spool.py): each frame is written to it before it
        is sent."""
        return self.publisher.spool

    @spool.setter
    def spool(self, writer: SpoolWriter | None) -> None:
        self.publisher.spool = writer

    @property
    def subscribed(self) -> bool:
        return self.publisher.subscribed

    @property
    def blocked_sends(self) -> int:
        return self.publisher.blocked_sends

    @property
    def frames_dropped(self) -> int:
        return self.publisher.frames_dropped

    def configure_steps(self, *, vector_obs: bool, labels: bool,
                        obs_dtype: Any = None, obs_shape: Sequence[int] | None = None) -> None:
        """Observations as vectors (Box) or integers (Discrete); with or without labels.

        Vector observations of a `obs_dtype` that a typed array can hold (the observation
        space's dtype: float32 for most) are kept per step as their raw bytes (`tobytes`, ~45 ns)
        and sent as one typed-array column; an observation of another dtype is converted to it
        first. Without `obs_dtype` they are kept as lists of floats. `obs_shape`, the space's,
        makes the batches of large observations smaller (`StepColumns.max_rows`).
        """
        self.flush_steps()
        self._steps = self._step_buffer(StepColumns(
            vector_obs=vector_obs, labels=labels, obs_dtype=obs_dtype, obs_shape=obs_shape))
        self._bind_hot_paths()

    def _step_buffer(self, steps: StepColumns) -> StepBuffer:
        """A batch of steps of these columns: STEP_BATCH_ROWS, or as many large observations
        as fit half the frame limit."""
        return StepBuffer(steps, max_rows=steps.max_rows(STEP_BATCH_ROWS, self._value_bytes),
                          interval=FLUSH_INTERVAL, clock=self._clock, due=self.flush_steps)

    # --- the hot paths ------------------------------------------------------------------------

    def step_appenders(self) -> StepAppenders:
        """What the training loop appends a recorded step's values with, in this order: its
        observation, action, label (only for an agent that labels its steps) and reward. The
        steps appended since the last `record_steps` or `episode` call are that call's steps.
        Valid until `configure_steps`."""
        return self._steps.appenders

    def _bind_hot_paths(self) -> None:
        """Build `episode` and `metric` as closures over the batches' lists, and take the step
        buffer's `record_steps` and `step`.

        They run per episode on the training thread: a closure reaches its state through cells
        and calls no bound method, ~200 ns less per call than a method (measured: 475 -> 274 ns
        for `metric`), which is a third of what fast mode costs on FrozenLake.
        """
        episodes, metrics = self._episodes, self._metrics
        episode_rows, metric_rows = episodes.rows, metrics.rows
        add_episode, add_metric = episode_rows.append, metric_rows.append
        steps = self._steps
        end_steps, room = steps.end_steps, steps.room
        clock, time_ns = self._clock, time.time_ns
        flush, flush_metrics = self.flush, self._flush_metrics
        # each episode row with its reset observation
        max_episodes = steps.columns.max_rows(EPISODE_BATCH_ROWS, self._value_bytes)
        max_metrics = METRIC_BATCH_ROWS

        def episode(episode: int, ret: float, length: int, terminated: bool,
                    truncated: bool, seed: int | None = None, reset_obs: Any = None) -> int:
            """Buffer one finished episode (with the seed of its reset, if it was seeded, and
            the observation it started from); the steps appended since the last call are its
            last ones. A due batch flushes steps and metrics too. Returns how many more steps
            the loop may append before it calls again (as `record_steps` does)."""
            if seed is None and reset_obs is None:
                add_episode((episode, ret, length, terminated, truncated, time_ns()))
            else:
                add_episode((episode, ret, length, terminated, truncated, time_ns(), None,
                             seed, reset_obs))
            # after the row: a failed send of the steps keeps it
            left = end_steps(episode, length, terminated, truncated)
            if len(episode_rows) >= max_episodes or clock() >= episodes.deadline:
                flush()
                return room()
            return left

        def metric(name: str, step: int, value: float) -> None:
            """Buffer one metric value (the agents' MetricSink)."""
            add_metric((name, step, value, time_ns()))
            if len(metric_rows) >= max_metrics or clock() >= metrics.deadline:
                flush_metrics()

        self.record_steps: Callable[[int, int], int] = steps.record_steps
        self.step: Callable[..., None] = steps.step
        self.episode: Callable[..., int] = episode
        self.metric: Callable[[str, int, float], None] = metric

    def flush_steps(self) -> None:
        """Send the steps taken into runs as one step frame (nothing if there are none).

        Numeric columns become typed arrays; vector observations were kept as bytes and are
        joined into one (`StepColumns.body`). What stays a list goes to msgpack as it is, and is
        converted only when msgpack refuses it.
        """
        batch = self._steps.take_batch()
        if batch is None:
            return
        body, n, obs = batch
        kept, refused = columns.finite_rows(body, n)
        parts = None
        if refused < n:
            try:
                parts = self._encode(FrameKind.STEP, kept)
            except DecodeError:  # numpy scalars somewhere: convert by column type, once
                kept, refused = columns.finite_rows(self._steps.columns.normalized(body, obs), n)
                parts = self._encode(FrameKind.STEP, kept)
        self.rows_refused += refused
        if parts is not None:
            self._publish(FrameKind.STEP, parts, n - refused)

    # --- per episode and per metric -----------------------------------------------------------

    def observe_metrics(self, observer: MetricObserver,
                        episodes: EpisodesObserver | None = None) -> None:
        """Call `observer` with every batch of metric rows, before the batch is sent, and with
        `charts/episodic_return` and `charts/episodic_length` made from the episode rows, or,
        given `episodes`, call that with the episodes as columns instead (the run's
        TensorBoard log: `ScalarLog.add_episodes`).

        Observers run on this thread (the run's TensorBoard log is one); a row reaches each
        observer once, whether or not its frame is delivered.
        """
        self._observers.add(observer, episodes)

    def feed_observers(self) -> None:
        """Hand the metric rows buffered so far to the observers now, without sending them.

        For the end of a run: its TensorBoard file can be completed before the last frames are
        sent, which may block. The rows are still sent, once, by the next flush.
        """
        self._observers.feed()

    def flush(self) -> None:
        """Send everything buffered: metrics are taken first (observers see them before any send
        blocks), then steps, episodes and metrics are sent in that order."""
        now = self._clock()
        metrics = self._take_metrics(now)
        self.flush_steps()
        episodes = self._episodes
        if episodes.rows:
            self._observers.taking_episodes()
            for body, n in columns.episode_bodies(episodes.take(now)):
                kept, refused = columns.finite_rows(body, n)
                self.rows_refused += refused
                if refused < n:
                    self._send_body(FrameKind.EPISODE, kept, n - refused)
        self._send_metrics(metrics)

    def _flush_metrics(self) -> None:
        self._send_metrics(self._take_metrics(self._clock()))

    def _take_metrics(self, now: float) -> list[MetricRow]:
        """The buffered metric rows (observers get those they have not seen); the batch restarts."""
        if not self._metrics.rows:
            return []
        self._observers.taking_metrics()
        return self._metrics.take(now)

    def _send_metrics(self, rows: list[MetricRow]) -> None:
        """Send metric rows as one frame; non-finite values are dropped (and counted), since the
        protocol refuses them and one NaN loss would turn the whole frame into a dead letter."""
        if not rows:
            return
        if not all(map(math.isfinite, map(_VALUE, rows))):
            kept = [r for r in rows if math.isfinite(_VALUE(r))]
            self.metrics_dropped += len(rows) - len(kept)
            rows = kept
            if not rows:
                return
        self._send_rows(FrameKind.METRIC, rows)

    def _send_rows(self, kind: FrameKind, rows: list[Any]) -> None:
        self._send_body(kind, columns.rows_body(kind, rows), len(rows))

    def _send_body(self, kind: FrameKind, body: dict[str, Any], rows: int) -> None:
        try:
            parts = self._encode(kind, body)
        except DecodeError:  # numpy scalars somewhere: convert by column type, once
            parts = self._encode(kind, columns.normalized(body, KINDS[kind]))
        self._publish(kind, parts, rows)

    def send_columns(self, kind: FrameKind, body: dict[str, Any], rows: int) -> None:
        """Send a columnar body built elsewhere (the recording API's step and episode frames),
        typed arrays and all, as the run's next frame."""
        self._send(kind, body, rows)

    # --- lifecycle ----------------------------------------------------------------------------

    def lifecycle(self, event: LifecycleEvent, **fields: Any) -> None:
        """Send a lifecycle frame now, after whatever is buffered (so that order is kept)."""
        self.flush()
        self._send(FrameKind.LIFECYCLE, {"event": event.value, **fields}, 1)

    def artifact(self, name: str, path: str, fmt: str) -> None:
        self.lifecycle(LifecycleEvent.ARTIFACT, name=name, path=path, format=fmt)

    def finish(self, status: str, reason: str | None, episodes: int, steps: int,
               **counts: int) -> int:
        """Flush and send `run_completed` (the run's last frame, with `counts` of what was not
        stored, if any, the rows this emitter refused added to `rows_refused`); returns
        frames_emitted."""
        self.flush()
        if self.rows_refused:
            counts["rows_refused"] = counts.get("rows_refused", 0) + self.rows_refused
        frames_emitted = self.seq + 1
        self._send(FrameKind.LIFECYCLE, {
            "event": LifecycleEvent.RUN_COMPLETED.value, "status": status,
            "frames_emitted": frames_emitted, "reason": reason, "episodes": episodes,
            "steps": steps, **counts}, 1)
        return frames_emitted

    def stats(self) -> dict[str, Any]:
        """Counters for result.json: frames and rows per kind, blocked sends, drops."""
        delivery = self.publisher.stats()
        return {"frames_emitted": self.seq, "frames": delivery["frames"],
                "rows": delivery["rows"], "blocked_sends": delivery["blocked_sends"],
                "frames_dropped": delivery["frames_dropped"],
                "metrics_dropped": self.metrics_dropped, "rows_refused": self.rows_refused,
                "subscribed": delivery["subscribed"]}

    def close(self, linger_ms: int = CLOSE_LINGER_MS) -> None:
        """Close the socket; up to `linger_ms` is spent delivering queued frames. Idempotent."""
        self.publisher.close(linger_ms)

    # --- sending ------------------------------------------------------------------------------

    def _encode(self, kind: FrameKind, body: dict[str, Any]) -> tuple[bytes, bytes]:
        return encode_frame(
            kind, self.run_id, self.seq, body, agent_id=self.agent_id, worker_id=self.worker_id
        )

    def _send(self, kind: FrameKind, body: dict[str, Any], rows: int) -> None:
        self._publish(kind, self._encode(kind, body), rows)

    def _publish(self, kind: FrameKind, parts: tuple[bytes, bytes], rows: int) -> None:
        """Spool and deliver an encoded frame; its seq is spent once the spool holds it,
        whether or not it is delivered."""
        seq = self.seq
        self.seq = seq + 1
        try:
            self.publisher.publish(seq, parts, kind, rows)
        except SpoolError:
            self.seq = seq  # neither spooled nor sent: the next frame takes this seq
            raise
