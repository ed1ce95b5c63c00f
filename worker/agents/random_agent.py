"""The random agent: uniform actions from the seeded action space; a baseline that never learns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gymnasium import spaces

from gymbus.shared.runconfig import RandomParams
from gymbus.worker.agents.base import Agent, Artifact, MetricSink


class RandomAgent:
    """Samples `action_space` uniformly; works with any action and observation space.

    The caller seeds the space (`action_space.seed(seed)`) so that runs are reproducible. The
    loop draws its actions through `draw`, the space's own `sample`, as a user's random loop
    does: nothing of gymbus runs between two steps. (A run whose spaces the loop's step columns
    do not hold, continuous actions say, is recorded by the recording API's wrapper:
    worker/recorded_spaces.py.) `charts/epsilon` is published once, at the first episode:
    every action is exploration, from the first step to the last.
    """

    label: str | None = None
    has_labels = False
    learns = False

    def __init__(self, params: RandomParams, action_space: spaces.Space[Any], sink: MetricSink) -> None:
        self.params = params
        self.draw: Callable[[], Any] | None = action_space.sample
        self._sample = action_space.sample
        self._discrete = isinstance(action_space, spaces.Discrete)
        self._sink = sink
        self._epsilon_sent = False

    def begin_episode(self, episode: int, global_step: int) -> None:
        if not self._epsilon_sent:
            self._epsilon_sent = True
            self._sink.metric("charts/epsilon", global_step, 1.0)

    def act(self, obs: Any) -> Any:
        action = self._sample()
        return int(action) if self._discrete else action

    def learn(
        self, obs: Any, action: int, reward: float, next_obs: Any, terminated: bool, truncated: bool
    ) -> None:
        return None

    def end_episode(self, episode: int, global_step: int, ret: float, length: int) -> None:
        return None

    def artifacts(self) -> list[Artifact]:
        return []

    def evaluator(self) -> Agent:
        return self
