"""The random agent: uniform actions from the seeded action space; a baseline that never learns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gymnasium import spaces

from gymbus.shared.runconfig import RandomParams
from gymbus.worker.agents.base import Agent, Artifact, MetricSink


class RandomAgent:
    """Samples `action_space` uniformly; works with any observation space.

    The action space must be Discrete (step frames carry actions as integers); the caller seeds
    it (`action_space.seed(seed)`) so that runs are reproducible. The loop draws its actions
    through `draw`, the space's own `sample`, as a user's random loop does: nothing of gymbus
    runs between two steps. `charts/epsilon` is published once, at the first episode: every
    action is exploration, from the first step to the last.
    """

    label: str | None = None
    has_labels = False
    learns = False

    def __init__(self, params: RandomParams, action_space: spaces.Space[Any], sink: MetricSink) -> None:
        if not isinstance(action_space, spaces.Discrete):
            raise TypeError(f"random agent needs a Discrete action space, got {action_space}")
        self.params = params
        self.draw: Callable[[], Any] | None = action_space.sample
        self._sample = action_space.sample
        self._sink = sink
        self._epsilon_sent = False

    def begin_episode(self, episode: int, global_step: int) -> None:
        if not self._epsilon_sent:
            self._epsilon_sent = True
            self._sink.metric("charts/epsilon", global_step, 1.0)

    def act(self, obs: Any) -> int:
        return int(self._sample())

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
