"""Tabular Q-learning with an epsilon-greedy behaviour policy and random tie-breaking.

The table is held as Python lists while training (a row lookup and `max` over a handful of
floats is several times faster than the numpy equivalent at this size) and handed out as a
float64 array of shape [n_states, n_actions] by `artifacts()` and `table()`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from gymnasium import spaces

from gymbus.shared.policy_files import POLICY_FILES
from gymbus.shared.runconfig import QLearningParams
from gymbus.worker.agents.base import Agent, Artifact, Budget, MetricSink

EXPLORE = "explore"
EXPLOIT = "exploit"
GREEDY = "greedy"


class QLearningAgent:
    """Q-learning on a Discrete observation and action space.

    Epsilon falls linearly from `epsilon_start` to `epsilon_end` over `epsilon_decay` times the
    episode budget (per episode), or, when the run only has a step budget, over that fraction of
    the steps (per step); the learning rate falls linearly from `learning_rate` to
    `learning_rate_end` over the whole budget, so that the final greedy policy does not hang
    on the last few noisy updates. The TD target does not bootstrap from a terminal state, and
    does bootstrap when the episode was only truncated (a time limit is not a terminal state).
    """

    has_labels = True
    learns = True
    draw: Callable[[], Any] | None = None

    def __init__(
        self,
        params: QLearningParams,
        observation_space: spaces.Space[Any],
        action_space: spaces.Space[Any],
        budget: Budget,
        rng: np.random.Generator,
        sink: MetricSink,
    ) -> None:
        if not isinstance(observation_space, spaces.Discrete) or observation_space.start != 0:
            raise ValueError(
                f"q-learning needs a Discrete observation space starting at 0, got {observation_space}"
            )
        if not isinstance(action_space, spaces.Discrete) or action_space.start != 0:
            raise ValueError(
                f"q-learning needs a Discrete action space starting at 0, got {action_space}"
            )
        self.params = params
        self.n_states = int(observation_space.n)
        self.n_actions = int(action_space.n)
        self.q: list[list[float]] = [[0.0] * self.n_actions for _ in range(self.n_states)]
        self._actions = range(self.n_actions)
        self._random = rng.random
        self._sink = sink
        self._per_step = budget.episodes is None
        horizon = budget.total_steps if self._per_step else budget.episodes
        self._decay_span = max(params.epsilon_decay * float(horizon or 0), 1e-9)
        self._horizon = max(float(horizon or 0), 1.0)
        self._steps = 0
        self.epsilon = params.epsilon_start
        self.learning_rate = params.learning_rate
        self.label: str | None = None

    def epsilon_at(self, t: float) -> float:
        """Epsilon after `t` episodes (or steps, with a step budget only)."""
        p = self.params
        frac = min(t / self._decay_span, 1.0)
        return p.epsilon_start + (p.epsilon_end - p.epsilon_start) * frac

    def learning_rate_at(self, t: float) -> float:
        """The learning rate after `t` episodes (or steps, with a step budget only)."""
        p = self.params
        frac = min(t / self._horizon, 1.0)
        return p.learning_rate + (p.learning_rate_end - p.learning_rate) * frac

    def _schedule(self, t: float) -> None:
        """Set epsilon and the learning rate for episode (or step) `t`."""
        p = self.params
        self.epsilon = p.epsilon_start + (p.epsilon_end - p.epsilon_start) * min(
            t / self._decay_span, 1.0)
        self.learning_rate = p.learning_rate + (p.learning_rate_end - p.learning_rate) * min(
            t / self._horizon, 1.0)

    def begin_episode(self, episode: int, global_step: int) -> None:
        if not self._per_step:
            self._schedule(episode)

    def act(self, obs: Any) -> int:
        """Epsilon-greedy; ties among the best actions are broken uniformly at random."""
        if self._per_step:
            self._schedule(self._steps)
            self._steps += 1
        rand = self._random
        if rand() < self.epsilon:
            self.label = EXPLORE
            return int(rand() * self.n_actions)
        self.label = EXPLOIT
        row = self.q[obs]
        best = max(row)
        ties = [a for a in self._actions if row[a] == best]
        if len(ties) == 1:
            return ties[0]
        return ties[int(rand() * len(ties))]

    def learn(
        self, obs: Any, action: int, reward: float, next_obs: Any, terminated: bool, truncated: bool
    ) -> None:
        row = self.q[obs]
        target = reward if terminated else reward + self.params.gamma * max(self.q[next_obs])
        row[action] += self.learning_rate * (target - row[action])

    def end_episode(self, episode: int, global_step: int, ret: float, length: int) -> None:
        self._sink.metric("charts/epsilon", global_step, self.epsilon)

    def greedy_action(self, obs: Any) -> int:
        """The best action for `obs` (lowest index among ties): the learned policy, for evaluation."""
        row = self.q[obs]
        return row.index(max(row))

    def table(self) -> np.ndarray:
        """The Q-table as float64, shape [n_states, n_actions]."""
        return np.array(self.q, dtype=np.float64).reshape(self.n_states, self.n_actions)

    def load_table(self, table: np.ndarray) -> None:
        """Replace the Q-table (a saved policy); its shape must be [n_states, n_actions]."""
        if table.shape != (self.n_states, self.n_actions):
            raise ValueError(f"the Q-table is {table.shape}, but the environment has "
                             f"{self.n_states} states and {self.n_actions} actions")
        self.q = np.asarray(table, dtype=np.float64).tolist()

    def artifacts(self) -> list[Artifact]:
        """The Q-table as `q_table.npy` (float64, [n_states, n_actions])."""
        return [Artifact("q_table", POLICY_FILES["q-learning"], "npy", self.table())]

    def evaluator(self) -> Agent:
        return GreedyQ(self.q, self._sink)


class GreedyQ:
    """The greedy policy of a Q-table (shared with its learner, not copied); learns nothing.

    Ties go to the lowest action index, so that evaluation is deterministic. Publishes
    `charts/epsilon` = 0 per episode, like every agent.
    """

    has_labels = True
    learns = False
    draw: Callable[[], Any] | None = None
    label: str | None = GREEDY

    def __init__(self, q: list[list[float]], sink: MetricSink) -> None:
        self.q = q
        self._sink = sink

    def begin_episode(self, episode: int, global_step: int) -> None:
        return None

    def act(self, obs: Any) -> int:
        row = self.q[obs]
        return row.index(max(row))

    def learn(
        self, obs: Any, action: int, reward: float, next_obs: Any, terminated: bool, truncated: bool
    ) -> None:
        return None

    def end_episode(self, episode: int, global_step: int, ret: float, length: int) -> None:
        self._sink.metric("charts/epsilon", global_step, 0.0)

    def artifacts(self) -> list[Artifact]:
        return []

    def evaluator(self) -> Agent:
        return self
