"""The episode loop of a run, apart from process plumbing: seeding, env and agent, training.

Everything here runs on the run process's main thread. Telemetry goes through an object with
the Emitter's `step` / `episode` / `metric` methods, so the loop runs the same against a real
emitter, a recorder in tests, or `NullTelemetry` in benchmarks.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from gymbus.shared.protocol import TelemetryMode
from gymbus.shared.runconfig import RunConfig
from gymbus.worker import envs
from gymbus.worker.agents.base import Agent, Budget, MetricSink

#: seconds between two `charts/SPS` metrics (checked at episode ends)
SPS_INTERVAL = 1.0
#: greedy episodes on an environment without a time limit are cut here (a greedy policy may
#: walk in circles forever where an exploring one would not)
GREEDY_STEP_LIMIT = 1000
#: the evaluation environment's seed is the run's seed plus this (other episodes than training's)
EVAL_SEED_OFFSET = 1_000_003


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

    def episode(self, episode: int, ret: float, length: int, terminated: bool, truncated: bool,
                seed: int | None = None, reset_obs: Any = None) -> None: ...


class StopSignal(Protocol):
    """Truthy once the run should stop (a `StopFlag`)."""

    def __bool__(self) -> bool: ...


class NullTelemetry:
    """Telemetry that goes nowhere: the bare loop, for benchmarks and evaluation."""

    def step(self, *args: Any) -> None:
        return None

    def episode(self, episode: int, ret: float, length: int, terminated: bool, truncated: bool,
                seed: int | None = None, reset_obs: Any = None) -> None:
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


def make_env(config: RunConfig, greedy: bool = False) -> gym.Env[Any, Any]:
    """The config's environment (a registered id or an entry point, after its env_module:
    worker/envs.py) with its kwargs and episode limit; the action space seeded.

    A `greedy` environment (in-training evaluation, and every evaluation run) gets
    GREEDY_STEP_LIMIT when neither the config nor the environment sets a limit.
    """
    env = envs.build(config)
    unlimited = config.max_episode_steps is None and (
        env.spec is None or env.spec.max_episode_steps is None)
    if (greedy or config.evaluates) and unlimited:
        env = gym.wrappers.TimeLimit(env, GREEDY_STEP_LIMIT)
    env.action_space.seed(config.seed)
    return env


def budget_of(config: RunConfig) -> Budget:
    return Budget(episodes=config.episodes, total_steps=config.total_steps)


def make_agent(
    config: RunConfig,
    env: gym.Env[Any, Any],
    rng: np.random.Generator,
    sink: MetricSink,
    runs_dir: Path | None = None,
) -> Agent:
    """The agent named by `config.algo`, with its params dataclass, for this env's spaces.

    For an evaluation run, the learner is built, loaded with the saved policy (found under
    `runs_dir`, by default the settings' runs folder) and its greedy `evaluator()` returned.
    """
    from gymbus.worker.agents import policies

    if config.evaluates:
        return policies.load_evaluator(config, env, rng, sink, runs_dir)
    return policies.build_learner(config, env, rng, sink)


def has_vector_obs(env: gym.Env[Any, Any]) -> bool:
    """True for Box observations (sent as float vectors), False for Discrete (sent as ints)."""
    space = env.observation_space
    if isinstance(space, spaces.Discrete):
        return False
    if isinstance(space, spaces.Box):
        return True
    raise ValueError(f"telemetry supports Discrete or Box observations, not {space}")


def configure_steps(emitter: Any, env: gym.Env[Any, Any], agent: Agent) -> None:
    """Tell the emitter how this run's steps look: the observations (ints, or vectors of the
    observation space's dtype) and whether the agent labels its actions."""
    emitter.configure_steps(vector_obs=has_vector_obs(env), labels=agent.has_labels,
                            obs_dtype=env.observation_space.dtype)


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
    evaluation: PeriodicEvaluation | None = None,
) -> LoopResult:
    """Train until the budget is spent or `stop` turns true (checked before every step).

    In an episode whose steps are not recorded the inner loop makes no telemetry call at all.
    An episode cut short by the step budget, by `stop` or by an exception still gets its
    episode frame, so that step rows always add up to the episode lengths. `evaluation`, if
    given, runs after every finished episode (it decides itself when it is due).
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
        reset_seed = seed if episode == 0 else None
        obs, _ = env.reset(seed=reset_seed)
        reset_obs = obs
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
                _end_episode(telemetry, agent, progress, episode, ret, t, False, False,
                             reset_seed, reset_obs)
            raise
        if t:
            _end_episode(telemetry, agent, progress, episode, ret, t, terminated, truncated,
                         reset_seed, reset_obs)
            episode += 1
            sps.tick(progress.steps)
            if evaluation is not None:
                evaluation.after_episode(episode, progress.steps)
        if progress.stopped:
            break
    return progress


def _end_episode(telemetry: Telemetry, agent: Agent, progress: LoopResult, episode: int,
                 ret: float, length: int, terminated: bool, truncated: bool,
                 seed: int | None, reset_obs: Any) -> None:
    """Count the episode and publish its row (the emitter derives the TensorBoard curves
    `charts/episodic_return` and `charts/episodic_length` from episode rows: sending them as
    metric rows as well measured 4% of a fast-mode FrozenLake run)."""
    progress.episodes = episode + 1
    progress.steps += length
    telemetry.episode(episode, ret, length, terminated, truncated, seed, reset_obs)
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


class PeriodicEvaluation:
    """Greedy evaluation during training: every `every` episodes, `episodes` episodes of the
    agent's `evaluator()` on an environment of its own, published as `eval/mean_return` and
    `eval/mean_length` at the current global step.

    Each evaluation starts from the same seed, so successive ones compare policies, not luck.
    The training environment, the agent's random generator and its learning are untouched
    (an evaluator's `learn` only perceives; its `end_episode` is not called, so that it
    publishes nothing but the two metrics).
    """

    def __init__(self, config: RunConfig, agent: Agent, telemetry: MetricSink) -> None:
        self.config = config
        self.every = config.eval_every or 0
        self.episodes = config.eval_episodes
        self.telemetry = telemetry
        self._agent = agent
        self._greedy: Agent | None = None

    def after_episode(self, episodes_done: int, global_step: int) -> None:
        if self.every and episodes_done % self.every == 0:
            mean_return, mean_length = self.evaluate()
            self.telemetry.metric("eval/mean_return", global_step, mean_return)
            self.telemetry.metric("eval/mean_length", global_step, mean_length)

    def evaluate(self) -> tuple[float, float]:
        """Mean return and length of `episodes` greedy episodes of the current policy."""
        if self._greedy is None:
            self._greedy = self._agent.evaluator()
        greedy = self._greedy
        env = make_env(self.config, greedy=True)
        returns, lengths = [], []
        try:
            for episode in range(self.episodes):
                seed = self.config.seed + EVAL_SEED_OFFSET if episode == 0 else None
                obs, _ = env.reset(seed=seed)
                greedy.begin_episode(episode, 0)
                ret, t, done = 0.0, 0, False
                while not done:
                    action = greedy.act(obs)
                    next_obs, reward, terminated, truncated, _ = env.step(action)
                    greedy.learn(obs, action, float(reward), next_obs, terminated, truncated)
                    obs = next_obs
                    ret += float(reward)
                    t += 1
                    done = terminated or truncated
                returns.append(ret)
                lengths.append(t)
        finally:
            env.close()
        return float(np.mean(returns)), float(np.mean(lengths))


def make_evaluation(config: RunConfig, agent: Agent, telemetry: MetricSink) -> PeriodicEvaluation | None:
    """The in-training evaluation that `config.eval_every` asks for, or None."""
    if config.eval_every is None or config.evaluates:
        return None
    return PeriodicEvaluation(config, agent, telemetry)
