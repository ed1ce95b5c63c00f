"""The episode loop of a run, apart from process plumbing: seeding, env and agent, training.

Everything here runs on the run process's main thread. Telemetry goes through an object with
the Emitter's `step_appenders` / `record_steps` / `episode` / `metric` methods, so the loop
runs the same against a real emitter, a recorder in tests, or `NullTelemetry` in benchmarks.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from gymbus.shared.protocol import TelemetryMode
from gymbus.shared.runconfig import RunConfig
from gymbus.worker import envs
from gymbus.worker.agents.base import Agent, Budget, MetricSink

if TYPE_CHECKING:
    from gymbus.worker.telemetry.step_buffer import StepAppenders

#: seconds between two `charts/SPS` metrics (checked at episode ends)
SPS_INTERVAL = 1.0
#: greedy episodes on an environment without a time limit are cut here (a greedy policy may
#: walk in circles forever where an exploring one would not)
GREEDY_STEP_LIMIT = 1000
#: the evaluation environment's seed is the run's seed plus this (other episodes than training's)
EVAL_SEED_OFFSET = 1_000_003


class Telemetry(MetricSink, Protocol):
    """What the loop publishes through: the Emitter's per-step and per-episode methods.

    A recorded step is four appends (`step_appenders`: observation, action, label, reward);
    the steps appended since the last `record_steps` or `episode` call are that call's steps.
    Both return how many more steps the loop may append before it calls one of them again.
    """

    def step_appenders(self) -> StepAppenders: ...

    def record_steps(self, episode: int, t: int) -> int: ...

    def episode(self, episode: int, ret: float, length: int, terminated: bool, truncated: bool,
                seed: int | None = None, reset_obs: Any = None) -> int: ...


class StopSignal(Protocol):
    """Truthy once the run should stop (a `StopFlag`)."""

    def __bool__(self) -> bool: ...


def _ignore(value: Any) -> None:
    return None


class NullTelemetry:
    """Telemetry that goes nowhere: the bare loop, for benchmarks and evaluation."""

    def step_appenders(self) -> StepAppenders:
        return _ignore, _ignore, _ignore, _ignore

    def record_steps(self, episode: int, t: int) -> int:
        return sys.maxsize

    def episode(self, episode: int, ret: float, length: int, terminated: bool, truncated: bool,
                seed: int | None = None, reset_obs: Any = None) -> int:
        return sys.maxsize

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


def loop_columns_fit(env: gym.Env[Any, Any]) -> bool:
    """True when the loop's own step columns hold this env's steps: a Discrete action space,
    and Discrete or one-dimensional Box observations (what the learning agents take; the
    random agent's other runs are recorded by worker/recorded_spaces.py)."""
    obs = env.observation_space
    return isinstance(env.action_space, spaces.Discrete) and (
        isinstance(obs, spaces.Discrete) or (isinstance(obs, spaces.Box) and len(obs.shape) == 1))


def configure_steps(emitter: Any, env: gym.Env[Any, Any], agent: Agent) -> None:
    """Tell the emitter how this run's steps look: the observations (ints, or vectors of the
    observation space's dtype) and whether the agent labels its actions."""
    emitter.configure_steps(vector_obs=has_vector_obs(env), labels=agent.has_labels,
                            obs_dtype=env.observation_space.dtype,
                            obs_shape=env.observation_space.shape)


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

    A recorded step is four appends (observation, action, label if the agent labels its steps,
    reward: `Telemetry.step_appenders`); the loop hands the steps to the telemetry at the
    episode's end, with its row, or when the telemetry wants to look at its batch earlier
    (`record_steps`: about eleven times a batch, and at least every STEP_BATCH_ROWS steps).
    In an episode whose steps are not recorded the inner loop makes no telemetry call at all;
    for an agent that neither learns nor looks at the observation (`draw`: the random agent)
    it is a user's random loop, plus the return, the step count and the stop test. An episode
    cut short by the step budget, by `stop` or by an exception still gets its episode frame,
    so that step rows always add up to the episode lengths. `evaluation`, if given, runs after
    every finished episode (it decides itself when it is due).

    Per episode, the loop does what a plain loop does (a reset) plus one episode row and a few
    integer tests: the budget, the `charts/SPS` meter (which looks at the clock only about ten
    times per SPS_INTERVAL) and the telemetry mode are kept in local variables.
    """
    act, learn, draw, env_step, env_reset = agent.act, agent.learn, agent.draw, env.step, env.reset
    learns, labels = agent.learns, agent.has_labels
    begin_episode, end_episode = agent.begin_episode, agent.end_episode
    add_obs, add_action, add_label, add_reward = telemetry.step_appenders()
    record_steps, episode_row = telemetry.record_steps, telemetry.episode
    room = 1  # steps the telemetry takes before it wants to look again: a batch's first
    after_episode = evaluation.after_episode if evaluation is not None else None
    max_steps = budget.total_steps if budget.total_steps is not None else sys.maxsize
    max_episodes = budget.episodes if budget.episodes is not None else sys.maxsize
    stop_test: StopSignal | tuple[()] = () if stop is None else stop  # () is never true
    full, sampled = mode is TelemetryMode.FULL, mode is TelemetryMode.SAMPLED
    every = every or 1
    progress = LoopResult() if progress is None else progress
    sps = _SpsMeter(telemetry)
    sps_at = 0
    steps = progress.steps
    episode = 0
    while episode < max_episodes and steps < max_steps:
        if stop_test:
            progress.stopped = True
            break
        reset_seed = seed if episode == 0 else None
        obs, _ = env_reset(seed=reset_seed)
        reset_obs = obs
        begin_episode(episode, steps)
        record = full or (sampled and episode % every == 0)
        ret = 0.0
        t = 0
        terminated = truncated = False
        left = max_steps - steps
        cut = min(left, room) if record else left
        try:
            if draw is not None and not record and not learns:
                while True:  # a plain random loop
                    if stop_test:
                        progress.stopped = True
                        break
                    obs, raw_reward, terminated, truncated, _ = env_step(draw())
                    ret += float(raw_reward)
                    t += 1
                    if terminated or truncated or t >= left:
                        break
            else:
                while True:
                    if stop_test:
                        progress.stopped = True
                        break
                    action = act(obs) if draw is None else draw()
                    next_obs, raw_reward, terminated, truncated, _ = env_step(action)
                    reward = float(raw_reward)
                    if learns:
                        learn(obs, action, reward, next_obs, terminated, truncated)
                    if record:
                        add_obs(next_obs)
                        add_action(action)
                        if labels:
                            add_label(agent.label)
                        add_reward(reward)
                    ret += reward
                    t += 1
                    obs = next_obs
                    if terminated or truncated or t >= cut:
                        if terminated or truncated or t >= left:
                            break
                        cut = min(left, t + record_steps(episode, t))  # a batch to look at
        except BaseException:
            if t:  # the steps recorded so far get their episode frame before the run fails
                progress.episodes, progress.steps = episode + 1, steps + t
                episode_row(episode, ret, t, False, False, reset_seed, reset_obs)
                end_episode(episode, steps + t, ret, t)
            raise
        if t:
            # the emitter derives the TensorBoard curves `charts/episodic_return` and
            # `charts/episodic_length` from episode rows: sending them as metric rows as well
            # measured 4% of a fast-mode FrozenLake run
            steps += t
            progress.episodes, progress.steps = episode + 1, steps
            room = episode_row(episode, ret, t, terminated, truncated, reset_seed, reset_obs)
            end_episode(episode, steps, ret, t)
            episode += 1
            if steps >= sps_at:
                sps_at = sps.tick(steps)
            if after_episode is not None:
                after_episode(episode, steps)
        if progress.stopped:
            break
    return progress


class _SpsMeter:
    """Publishes `charts/SPS` about every SPS_INTERVAL seconds; `tick` says at which step count
    to look at the clock next (about ten looks per interval, from the rate so far)."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.since = time.perf_counter()
        self.steps = 0

    def tick(self, steps: int) -> int:
        """Publish if an interval has passed; the step count of the next look."""
        now = time.perf_counter()
        elapsed, done = now - self.since, steps - self.steps
        if elapsed >= SPS_INTERVAL:
            self.telemetry.metric("charts/SPS", steps, done / elapsed)
            self.since, self.steps = now, steps
        return steps + max(1, int(done / max(elapsed, 1e-9) * SPS_INTERVAL / 10))


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
