"""A built-in run's recorded steps between two step frames, kept as the training loop appends them.

A recorded step costs the loop four appends to lists and arrays created once and emptied after
each frame (`appenders`: observation, action, label, reward), and each run of consecutive
steps of one episode one call (`record_steps` amid an episode, `end_steps` at its end, from
the emitter's `episode`): no tuple, no dict, no encoding, no send per step. The runs are kept
as their `columns.RUN_FIELDS`, one after another in one list; at the frame, the values become
typed columns and the episode, step and end-flag columns are worked out from the runs in numpy
(`columns.StepColumns.body`).

When the batch is looked at: at its first step (its start time and deadline are taken), then
when its steps reach 2, 4, 8, ...: the clock is looked at eleven times for a full batch instead
of once per step, and a slow run's batch goes out at most about twice the interval after its
first step. The loop is told how many more steps it may append before it calls again (what
`record_steps` and `end_steps` return). Everything here runs on the run's main thread.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, MutableSequence, Sequence
from typing import Any

import numpy as np

from gymbus.worker.telemetry.columns import RUN_FIELDS, StepColumns

#: the training loop's appenders of a recorded step's values: observation, action, label, reward
StepAppenders = tuple[Callable[[Any], None], Callable[[Any], None], Callable[[Any], None],
                      Callable[[Any], None]]


class StepBuffer:
    """The steps of one batch, for the columns `steps` describes. `due` is called when the
    batch is full (`max_rows`) or its first step has waited `interval` seconds (looked at when
    the steps double); it is expected to take the batch (`take_batch`)."""

    def __init__(self, steps: StepColumns, *, max_rows: int, interval: float,
                 clock: Callable[[], float], due: Callable[[], None]) -> None:
        self.columns = steps
        self.max_rows = max_rows
        self.obs: list[Any] = []
        #: the built-in agents' actions are integers (Discrete); an array holds its numbers,
        #: not one object each until the frame
        self.actions = array("q")
        self.labels: list[Any] = []
        self.rewards = array("d")
        self.runs: list[Any] = []  # RUN_FIELDS of each run, one after another
        self.t0_ns = 0
        self._bind(interval, clock, due)

    def _bind(self, interval: float, clock: Callable[[], float], due: Callable[[], None]) -> None:
        """Build the appenders, `record_steps`, `end_steps`, `room`, `step` and `restart` as
        closures: they run per step or per episode on the training thread, where a closure
        reaches its state through cells and calls no bound method."""
        steps, rewards, add_run, time_ns = self.columns, self.rewards, self.runs.extend, time.time_ns
        max_rows = self.max_rows
        deadline = 0.0  # FLUSH_INTERVAL after the batch's first step
        taken = 0  # steps taken into runs since the batch began
        check_at = 1  # the batch is looked at when `taken` reaches this

        def end_steps(episode: int, end: int, terminated: bool, truncated: bool) -> int:
            """The steps appended since the last call are the last of the first `end` steps of
            `episode` (the last one ended it if `terminated` or `truncated`); returns how many
            more steps the loop may append before it calls again."""
            nonlocal taken, check_at, deadline
            count = len(rewards) - taken
            if count > 0:
                add_run((episode, end - count, count, terminated, truncated))
                if not taken:
                    self.t0_ns = time_ns()
                    deadline = clock() + interval
                taken += count
                if taken >= check_at:
                    if taken >= max_rows or clock() >= deadline:
                        due()  # taken and check_at start over
                    else:
                        check_at = min(max_rows, 2 * taken)
            return check_at - taken

        def record_steps(episode: int, t: int) -> int:
            """`end_steps` for steps of an episode that goes on: steps up to `t` (not
            included) of `episode`."""
            return end_steps(episode, t, False, False)

        def room() -> int:
            """How many steps the loop may append before it calls again."""
            return check_at - taken

        def restart() -> None:
            """The batch was taken: the next step starts a new one."""
            nonlocal taken, check_at
            taken, check_at = 0, 1

        obs_dtype, add_obs = steps.obs_dtype, self.obs.append

        def add_obs_bytes(obs: Any) -> None:
            """A Box observation of `obs_dtype`, kept as its bytes (an environment may reuse its
            arrays)."""
            if obs.dtype is not obs_dtype:
                obs = np.asarray(obs, dtype=obs_dtype)
            add_obs(obs.tobytes())

        def add_obs_list(obs: Any) -> None:
            """A Box observation of a dtype no typed array holds, kept as a list of floats."""
            add_obs(obs.tolist())

        appenders: StepAppenders = (
            add_obs if not steps.vector_obs else add_obs_list if obs_dtype is None
            else add_obs_bytes, self.actions.append, self.labels.append, rewards.append)
        add_value, add_action, add_label, add_reward = appenders
        with_labels = steps.labels

        def step(episode: int, step: int, action: int, obs: Any, reward: float,
                 terminated: bool, truncated: bool, label: str | None = None) -> None:
            """Buffer one step, row by row: the appenders and `end_steps` for one step (a
            caller that is not the training loop; `label` is kept if the run labels steps)."""
            add_value(obs)
            add_action(action)
            if with_labels:
                add_label(label)
            add_reward(reward)
            end_steps(episode, step + 1, terminated, truncated)

        self.appenders = appenders
        self.end_steps: Callable[[int, int, bool, bool], int] = end_steps
        self.record_steps: Callable[[int, int], int] = record_steps
        self.room: Callable[[], int] = room
        self.step: Callable[..., None] = step
        self._restart = restart

    def take_batch(self) -> tuple[dict[str, Any], int, Sequence[Any]] | None:
        """The steps taken into runs as a step frame's body, how many they are and their
        observations (for `StepColumns.normalized`), or None when there are none. The batch
        starts over; values appended after the last run (a step under way) stay for the next."""
        runs = self.runs
        if not runs:
            return None
        n = sum(runs[2::len(RUN_FIELDS)])
        values: tuple[MutableSequence[Any], ...] = (self.obs, self.actions, self.labels,
                                                   self.rewards)
        try:
            # copies (a C slice each): the body may hold a list as it is, sent after the clear
            obs, actions, labels, rewards = (c[:n] for c in values)
            return self.columns.body(runs, obs, actions, labels, rewards, self.t0_ns), n, obs
        finally:
            runs.clear()
            for column in values:
                del column[:n]
            # what a step cut short left (an exception between two appends: the reward is
            # appended last) is not a step
            for column in values[:3]:
                del column[len(self.rewards):]
            self._restart()
