"""The metric observers of a run's emitter: callbacks that get every metric row once, in batches.

The run's TensorBoard log (`gymbus.worker.telemetry.tensorboard.ScalarLog.add_rows`) is one: it
gets each batch of metric rows as the emitter takes it for a frame, so TensorBoard costs the
training loop nothing per value. Observers also get `charts/episodic_return` and
`charts/episodic_length` rows made from the episode rows, which are not sent as metrics.
Everything here runs on the run process's main thread, with the emitter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

import numpy as np

from gymbus.shared.protocol import FrameKind
from gymbus.worker.telemetry.columns import COLUMNS

#: a buffered metric row: (name, step, value, ts_ns), as metric observers receive it
MetricRow = tuple[str, int, float, int]
MetricObserver = Callable[[Sequence[MetricRow]], None]
#: an observer of a batch of episodes as columns: (global steps at their ends, returns,
#: lengths, ts_ns), numpy arrays (`ScalarLog.add_episodes`)
EpisodesObserver = Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any],
                             np.ndarray[Any, Any]], None]

_EPISODE = COLUMNS[FrameKind.EPISODE]
_LENGTH = itemgetter(_EPISODE.index("length"))
_RETURN = itemgetter(_EPISODE.index("return"))
_TIME = itemgetter(_EPISODE.index("ts_ns"))
_RETURN_LENGTH_TIME = itemgetter(*(_EPISODE.index(c) for c in ("return", "length", "ts_ns")))


class MetricObservers:
    """The observers of one emitter, and how far they have seen its buffered rows.

    `metric_rows` and `episode_rows` are the emitter's batch lists (cleared in place after each
    flush), read here, never changed.
    """

    def __init__(self, metric_rows: list[tuple[Any, ...]],
                 episode_rows: list[tuple[Any, ...]]) -> None:
        self._metric_rows = metric_rows
        self._episode_rows = episode_rows
        self._observers: list[MetricObserver] = []
        #: each observer's episodes observer, if it has one (all have one: episodes as columns)
        self._episodes: list[EpisodesObserver | None] = []
        self._metrics_seen = 0  # buffered metric rows already handed to the observers
        self._episodes_seen = 0  # and buffered episode rows
        self._episode_steps = 0  # the global step at the end of the last observed episode

    def add(self, observer: MetricObserver, episodes: EpisodesObserver | None = None) -> None:
        """`observer` gets metric rows; `episodes`, if given, the episodes as columns (without,
        their curves come to `observer` as rows, two per episode)."""
        self._observers.append(observer)
        self._episodes.append(episodes)

    def feed(self) -> None:
        """Hand the observers the buffered metric rows, and the episodes' rows, they have not
        seen."""
        rows = self._metric_rows
        if len(rows) > self._metrics_seen:
            fresh = rows[self._metrics_seen:]
            self._metrics_seen = len(rows)
            for observer in self._observers:
                observer(fresh)
        self.feed_episodes()

    def feed_episodes(self) -> None:
        """Hand the observers `charts/episodic_return` and `charts/episodic_length` of the
        episode rows they have not seen, at the global step of each episode's end (the sum of
        the lengths so far: every episode of a run has its row)."""
        rows = self._episode_rows
        if len(rows) <= self._episodes_seen:
            return
        fresh = rows[self._episodes_seen:]
        self._episodes_seen = len(rows)
        if not self._observers:
            self._episode_steps += sum(map(_LENGTH, fresh))
            return
        if all(self._episodes):
            self._feed_columns(fresh)
            return
        derived: list[MetricRow] = []
        steps = self._episode_steps
        for ret, length, ts_ns in map(_RETURN_LENGTH_TIME, fresh):
            steps += length
            derived.append(("charts/episodic_return", steps, ret, ts_ns))
            derived.append(("charts/episodic_length", steps, length, ts_ns))
        self._episode_steps = steps
        for observer in self._observers:
            observer(derived)

    def _feed_columns(self, fresh: list[tuple[Any, ...]]) -> None:
        """The episodes of `fresh` as numpy columns: nothing per episode in Python."""
        n = len(fresh)
        lengths = np.fromiter(map(_LENGTH, fresh), np.int64, n)
        steps = self._episode_steps + np.cumsum(lengths)
        returns = np.fromiter(map(_RETURN, fresh), np.float64, n)
        ts_ns = np.fromiter(map(_TIME, fresh), np.int64, n)
        self._episode_steps = int(steps[-1])
        for episodes in self._episodes:
            assert episodes is not None
            episodes(steps, returns, lengths, ts_ns)

    def taking_metrics(self) -> None:
        """The metric batch is about to be taken: the observers get what they have not seen,
        and the batch's next rows start unseen."""
        self.feed()
        self._metrics_seen = 0

    def taking_episodes(self) -> None:
        """The episode batch is about to be taken (as `taking_metrics`)."""
        self.feed_episodes()
        self._episodes_seen = 0
