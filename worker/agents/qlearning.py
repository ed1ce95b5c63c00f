"""Tabular Q-learning with an epsilon-greedy behaviour policy and random tie-breaking.

The table is held as Python lists while training (a row lookup and `max` over a handful of
floats is several times faster than the numpy equivalent at this size) and handed out as a
float64 array of shape [n_states, n_actions] by `artifacts()` and `table()`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

from gymbus.shared.runconfig import QLearningParams
from gymbus.worker.agents.base import Budget, MetricSink

EXPLORE = "explore"
EXPLOIT = "exploit"


class QLearningAgent:
    """Q-learning on a Discrete observation and action space.

    Epsilon falls linearly from `epsilon_start` to `epsilon_end` over `epsilon_decay` times the
    episode budget (per episode), or, when the run only has a step budget, over that fraction of
    the steps (per step). The TD target does not bootstrap from a terminal state, and does
    bootstrap when the episode was only truncated (a time limit is not a terminal state).
    """

    has_labels = True

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
        self._steps = 0
        self.epsilon = params.epsilon_start
        self.label: str | None = None

    def epsilon_at(self, t: float) -> float:
        """Epsilon after `t` episodes (or steps, with a step budget only)."""
        p = self.params
        frac = min(t / self._decay_span, 1.0)
        return p.epsilon_start + (p.epsilon_end - p.epsilon_start) * frac

    def begin_episode(self, episode: int, global_step: int) -> None:
        if not self._per_step:
            self.epsilon = self.epsilon_at(episode)

    def act(self, obs: Any) -> int:
        """Epsilon-greedy; ties among the best actions are broken uniformly at random."""
        if self._per_step:
            self.epsilon = self.epsilon_at(self._steps)
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
        row[action] += self.params.learning_rate * (target - row[action])

    def end_episode(self, episode: int, global_step: int, ret: float, length: int) -> None:
        self._sink.metric("charts/epsilon", global_step, self.epsilon)

    def greedy_action(self, obs: Any) -> int:
        """The best action for `obs` (lowest index among ties): the learned policy, for evaluation."""
        row = self.q[obs]
        return row.index(max(row))

    def table(self) -> np.ndarray:
        """The Q-table as float64, shape [n_states, n_actions]."""
        return np.array(self.q, dtype=np.float64).reshape(self.n_states, self.n_actions)

    def artifacts(self) -> dict[str, np.ndarray]:
        return {"q_table": self.table()}
