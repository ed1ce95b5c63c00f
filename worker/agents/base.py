"""The small interface every agent implements, and the telemetry sink agents publish through.

The training loop (`gymbus.worker.training`) drives an agent one step at a time: `begin_episode`,
then `act` / `learn` per step, then `end_episode`. Agents never open sockets or files: metrics go
through the injected `MetricSink`, and what should be saved is returned by `artifacts()` for the
run process to write (`gymbus.worker.agents.policies.write_artifact`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class MetricSink(Protocol):
    """What an agent may publish: namespaced scalar metrics (`charts/epsilon`, `losses/td_loss`)."""

    def metric(self, name: str, step: int, value: float) -> None:
        """Record `value` of metric `name` at global environment step `step`."""


class NullSink:
    """A MetricSink that drops everything (evaluation, tests, benchmarks)."""

    def metric(self, name: str, step: int, value: float) -> None:
        return None


@dataclass(frozen=True)
class Artifact:
    """One file of a saved policy, as data; the run process writes it under `artifacts/`."""

    #: names it in the artifact lifecycle frame, e.g. "q_table"
    name: str
    #: the file's name in the artifacts folder, e.g. "q_table.npy"
    filename: str
    #: how it is written: "npy" (numpy array), "json" (a JSON object) or "torch" (a state_dict)
    format: str
    data: Any


@dataclass(frozen=True)
class Budget:
    """How long a run trains: episodes and/or environment steps, whichever is reached first."""

    episodes: int | None = None
    total_steps: int | None = None


class Agent(Protocol):
    """One learner. The loop calls these on the run's main thread, in this order per episode."""

    #: what chose the last action (e.g. "explore"/"exploit"), or None for agents without labels
    label: str | None
    #: whether `label` is meaningful; decides if step frames carry a label column
    has_labels: bool
    #: whether `learn` does anything; the loop of an agent that does not learn never calls it
    learns: bool
    #: for a policy that ignores the observation: its next action, drawn without one (the
    #: random agent's seeded `action_space.sample`, called by the loop with nothing between);
    #: None for every policy that looks at what it sees
    draw: Callable[[], Any] | None

    def begin_episode(self, episode: int, global_step: int) -> None:
        """Called before the first step of each episode."""

    def act(self, obs: Any) -> int:
        """The action for observation `obs`; sets `label` when `has_labels`."""

    def learn(
        self, obs: Any, action: int, reward: float, next_obs: Any, terminated: bool, truncated: bool
    ) -> None:
        """Learn from one transition (never called when `learns` is false)."""

    def end_episode(self, episode: int, global_step: int, ret: float, length: int) -> None:
        """Called after the last step of each episode; may publish metrics."""

    def artifacts(self) -> list[Artifact]:
        """The files of the learned policy, saved at the end of the run in this order (none for
        evaluation and for agents that learn nothing)."""

    def evaluator(self) -> Agent:
        """A greedy view of the current policy that learns nothing and saves nothing; it shares
        the learner's parameters (evaluation runs, and `eval_every` during training)."""
