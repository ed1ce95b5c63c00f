"""The episode loop of a run, apart from process plumbing: seeding, env and agent, training.

Everything here runs on the run process's main thread. Telemetry goes through an object with
the Emitter's `step` / `episode` / `metric` methods, so the loop runs the same against a real
emitter, a recorder in tests, or `NullTelemetry` in benchmarks.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from gymbus.shared.protocol import TelemetryMode
from gymbus.shared.runconfig import QLearningParams, RandomParams, RunConfig
from gymbus.worker.agents.base import Agent, Budget, MetricSink
from gymbus.worker.agents.qlearning import QLearningAgent
from gymbus.worker.agents.random_agent import RandomAgent

#: seconds between two `charts/SPS` metrics (checked at episode ends)
SPS_INTERVAL = 1.0


class Telemetry(MetricSink, Protocol):
    """What the loop publishes through: the Emitter's per-step and per-episode methods."""

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
    ) -> None: ...

    def episode(self, episode: int, ret: float, length: int, terminated: bool, truncated: bool) -> None: ...


class StopSignal(Protocol):
    """Truthy once the run should stop (a `StopFlag`)."""

    def __bool__(self) -> bool: ...


class NullTelemetry:
    """Telemetry that goes nowhere: the bare loop, for benchmarks and evaluation."""

    def step(self, *args: Any) -> None:
        return None

    def episode(self, episode: int, ret: float, length: int, terminated: bool, truncated: bool) -> None:
        return None

    def metric(self, name: str, step: int, value: float) -> None:
        return None


@dataclass
class LoopResult:
    """How far a run got, updated at every episode end (so it is right even if the loop raises).

    `episodes` counts episode frames, a final partial episode included.
    """

    episodes: int = 0
    steps: int = 0
    stopped: bool = False


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python's `random` and numpy's global state; the agent's own generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    return np.random.default_rng(seed)


def make_env(config: RunConfig) -> gym.Env[Any, Any]:
    """`gymnasium.make` with the config's kwargs and episode limit; the action space seeded."""
    kwargs = dict(config.env_kwargs)
    if config.max_episode_steps is not None:
        kwargs["max_episode_steps"] = config.max_episode_steps
    env = gym.make(config.env, **kwargs)
    env.action_space.seed(config.seed)
    return env


def budget_of(config: RunConfig) -> Budget:
    return Budget(episodes=config.episodes, total_steps=config.total_steps)


def make_agent(
    config: RunConfig, env: gym.Env[Any, Any], rng: np.random.Generator, sink: MetricSink
) -> Agent:
    """The agent named by `config.algo`, with its params dataclass, for this env's spaces."""
    params = config.params()
    if isinstance(params, QLearningParams):
        return QLearningAgent(
            params, env.observation_space, env.action_space, budget_of(config), rng, sink
        )
    if isinstance(params, RandomParams):
        return RandomAgent(params, env.action_space, sink)
    raise ValueError(f"no agent for algo {config.algo!r}")


def has_vector_obs(env: gym.Env[Any, Any]) -> bool:
    """True for Box observations (sent as float vectors), False for Discrete (sent as ints)."""
    space = env.observation_space
    if isinstance(space, spaces.Discrete):
        return False
    if isinstance(space, spaces.Box):
        return True
    raise ValueError(f"telemetry supports Discrete or Box observations, not {space}")


def records_steps(mode: TelemetryMode, every: int | None, episode: int) -> bool:
    """Whether the steps of `episode` go into step frames under this telemetry mode."""
    if mode is TelemetryMode.FULL:
        return True
    if mode is TelemetryMode.SAMPLED:
        return episode % (every or 1) == 0
    return False


def run_training(
    env: gym.Env[Any, Any],
    agent: Agent,
    telemetry: Telemetry,
    budget: Budget,
    *,
    seed: int,
    mode: TelemetryMode = TelemetryMode.FULL,
    every: int | None = None,
    stop: StopSignal | None = None,
    progress: LoopResult | None = None,
) -> LoopResult:
    """Train until the budget is spent or `stop` turns true (checked before every step).

    In an episode whose steps are not recorded the inner loop makes no telemetry call at all.
    An episode cut short by the step budget, by `stop` or by an exception still gets its
    episode frame, so that step rows always add up to the episode lengths.
    """
    act, learn, env_step = agent.act, agent.learn, env.step
    record_step = telemetry.step
    max_steps = budget.total_steps if budget.total_steps is not None else float("inf")
    never_stop = stop is None
    progress = LoopResult() if progress is None else progress
    sps = _SpsMeter(telemetry)
    episode = 0
    while not budget.done(episode, progress.steps):
        if not never_stop and stop:
            progress.stopped = True
            break
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        agent.begin_episode(episode, progress.steps)
        record = records_steps(mode, every, episode)
        ret = 0.0
        t = 0
        terminated = truncated = False
        left = max_steps - progress.steps
        try:
            while True:
                if not never_stop and stop:
                    progress.stopped = True
                    break
                action = act(obs)
                next_obs, raw_reward, terminated, truncated, _ = env_step(action)
                reward = float(raw_reward)
                learn(obs, action, reward, next_obs, terminated, truncated)
                if record:
                    record_step(episode, t, action, next_obs, reward, terminated, truncated,
                                agent.label)
                ret += reward
                t += 1
                obs = next_obs
                if terminated or truncated or t >= left:
                    break
        except BaseException:
            if t:  # the steps recorded so far get their episode frame before the run fails
                _end_episode(telemetry, agent, progress, episode, ret, t, False, False)
            raise
        if t:
            _end_episode(telemetry, agent, progress, episode, ret, t, terminated, truncated)
            episode += 1
            sps.tick(progress.steps)
        if progress.stopped:
            break
    return progress


def _end_episode(telemetry: Telemetry, agent: Agent, progress: LoopResult, episode: int,
                 ret: float, length: int, terminated: bool, truncated: bool) -> None:
    """Count the episode and publish its frame row and per-episode metrics."""
    progress.episodes = episode + 1
    progress.steps += length
    telemetry.episode(episode, ret, length, terminated, truncated)
    telemetry.metric("charts/episodic_return", progress.steps, ret)
    telemetry.metric("charts/episodic_length", progress.steps, length)
    agent.end_episode(episode, progress.steps, ret, length)


class _SpsMeter:
    """Publishes `charts/SPS` about every SPS_INTERVAL seconds (checked at episode ends)."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.since = time.perf_counter()
        self.steps = 0

    def tick(self, steps: int) -> None:
        now = time.perf_counter()
        if now - self.since >= SPS_INTERVAL:
            self.telemetry.metric("charts/SPS", steps, (steps - self.steps) / (now - self.since))
            self.since, self.steps = now, steps
