"""Aggregates across seeds with stratified bootstrap confidence intervals, computed by rliable.

Scores are arranged as rliable expects them: one row per run (seed), one column per task (gymbus
compares one configuration on one environment, so one task), and for a learning curve a third
axis of step points. The interval is rliable's `get_interval_estimates` (percentile method,
95%). rliable 1.2 draws its resamples from NumPy's global generator, so `seeded` sets that
generator for the call and puts the caller's state back afterwards: the same seed gives the same
intervals as rliable called directly after `np.random.seed(seed)`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]

#: the aggregates of final performance, in the order `final_aggregates` returns them
AGGREGATES = ("mean", "median", "iqm")
#: bootstrap resamples unless asked otherwise: enough for stable 95% bounds on a handful of
#: seeds, and about a second for three configurations on two cores (rliable's own default,
#: 50,000, takes a minute there)
DEFAULT_REPS = 2000
DEFAULT_SEED = 0
CONFIDENCE = 0.95


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """NumPy's global generator seeded for the block, its earlier state restored after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def final_aggregates(scores: Array) -> Array:
    """Mean, median and IQM of a (runs x tasks) score matrix.

    Mean and IQM are rliable's `aggregate_mean` and `aggregate_iqm` (the mean of the middle 50%
    of all scores). rliable's `aggregate_median` is the median of the per-task means, which for
    one task is the mean again; the median here is that of the runs' scores.
    """
    from rliable import metrics

    return np.array([metrics.aggregate_mean(scores), float(np.median(scores)),
                     metrics.aggregate_iqm(scores)])


def iqm_per_point(scores: Array) -> Array:
    """The IQM across runs (and tasks) at each step point of a (runs x tasks x points) array:
    rliable's `aggregate_iqm` of `scores[..., j]` for every j, in one vectorised call."""
    from scipy.stats import trim_mean

    flat = scores.reshape(-1, scores.shape[-1])
    return np.asarray(trim_mean(flat, proportiontocut=0.25, axis=0), dtype=np.float64)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval (arrays of one shape)."""

    value: Array
    low: Array
    high: Array


def interval_estimates(scores: Mapping[str, Array], func: Any, reps: int = DEFAULT_REPS,
                       seed: int = DEFAULT_SEED) -> dict[str, Estimate]:
    """rliable's stratified bootstrap of `func` over each key's scores: the point estimate and
    the 95% percentile interval, by key, drawn in the mapping's order from one seeded generator."""
    from rliable import library as rly

    if reps < 1:
        raise ValueError("reps must be >= 1")
    with seeded(seed):
        points, intervals = rly.get_interval_estimates(
            dict(scores), func, reps=reps, confidence_interval_size=CONFIDENCE)
    return {key: Estimate(np.asarray(points[key], np.float64),
                          np.asarray(intervals[key][0], np.float64),
                          np.asarray(intervals[key][1], np.float64)) for key in scores}


# --- a run's episodes as a score and as a curve -------------------------------------------------


def final_score(returns: Array, last: int) -> float:
    """The mean return of a run's last `last` episodes (all of them when it has fewer)."""
    if returns.size == 0:
        raise ValueError("a run without episodes has no final score")
    return float(np.mean(returns[-last:]))


def smoothed(returns: Array, window: int) -> Array:
    """Each episode's return averaged with the `window - 1` before it (fewer at the start)."""
    if window <= 1:
        return returns.astype(np.float64)
    sums = np.cumsum(np.concatenate([[0.0], returns]))
    ends = np.arange(1, returns.size + 1)
    starts = np.maximum(0, ends - window)
    return np.asarray((sums[ends] - sums[starts]) / (ends - starts), np.float64)


def common_steps(step_ends: list[Array], points: int) -> Array:
    """`points` environment-step positions that every run's episodes cover: from the latest
    first episode end to the earliest last one (no run is extrapolated)."""
    start = max(float(ends[0]) for ends in step_ends)
    stop = min(float(ends[-1]) for ends in step_ends)
    if stop <= start:
        return np.array([stop])
    return np.linspace(start, stop, points)


def curve_at(step_ends: Array, values: Array, steps: Array) -> Array:
    """A run's (smoothed) returns, known at its episode ends, interpolated at `steps`."""
    return np.asarray(np.interp(steps, step_ends, values), np.float64)
