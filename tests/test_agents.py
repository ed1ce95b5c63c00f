"""Agents on real Gymnasium environments: Q-learning learns, runs are reproducible, random works."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from gymbus.shared.protocol import TelemetryMode
from gymbus.shared.runconfig import QLearningParams, parse_config
from gymbus.worker import training
from gymbus.worker.agents.base import Budget, NullSink
from gymbus.worker.agents.qlearning import EXPLOIT, EXPLORE, QLearningAgent
from gymbus.worker.agents.random_agent import RandomAgent


class Recorder:
    """Telemetry that keeps what the loop reports, in memory."""

    def __init__(self) -> None:
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self.steps: list[tuple[Any, ...]] = []
        self.metrics: list[tuple[str, int, float]] = []

    def step(self, *row: Any) -> None:
        self.steps.append(row)

    def episode(self, episode: int, ret: float, length: int, terminated: bool, truncated: bool) -> None:
        self.returns.append(float(ret))
        self.lengths.append(length)

    def metric(self, name: str, step: int, value: float) -> None:
        self.metrics.append((name, step, value))


def train(config: dict[str, Any]) -> tuple[Any, gym.Env[Any, Any], Recorder, training.LoopResult]:
    cfg = parse_config(config)
    rng = training.seed_everything(cfg.seed)
    env = training.make_env(cfg)
    rec = Recorder()
    agent = training.make_agent(cfg, env, rng, rec)
    result = training.run_training(env, agent, rec, training.budget_of(cfg), seed=cfg.seed,
                                   mode=cfg.telemetry, every=cfg.every)
    return agent, env, rec, result


def greedy_return(agent: QLearningAgent, env: gym.Env[Any, Any], max_steps: int = 100) -> float:
    obs, _ = env.reset(seed=12345)
    total = 0.0
    for _ in range(max_steps):
        obs, reward, terminated, truncated, _ = env.step(agent.greedy_action(obs))
        total += float(reward)
        if terminated or truncated:
            break
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qlearning_solves_frozenlake_non_slippery(seed: int) -> None:
    agent, env, rec, result = train({"env": "FrozenLake-v1", "algo": "q-learning",
                                     "episodes": 300, "seed": seed,
                                     "env_kwargs": {"is_slippery": False}})
    assert result.episodes == 300 and result.steps == sum(rec.lengths)
    assert greedy_return(agent, env) == 1.0  # the greedy policy reaches the goal
    assert sum(rec.returns[-50:]) > sum(rec.returns[:50])  # and the behaviour policy improved
    table = agent.artifacts()["q_table"]
    assert table.shape == (16, 4) and table.dtype == np.float64 and table.max() > 0


def test_same_seed_same_returns() -> None:
    config = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 300, "seed": 7}
    _, _, first, _ = train(config)
    _, _, again, _ = train(config)
    _, _, other, _ = train({**config, "seed": 8})
    assert first.returns == again.returns and first.lengths == again.lengths
    assert (first.returns, first.lengths) != (other.returns, other.lengths)


@pytest.mark.parametrize("env_id, shape", [("Taxi-v4", (500, 6)), ("CliffWalking-v1", (48, 4))])
def test_qlearning_runs_on_toy_text(env_id: str, shape: tuple[int, int]) -> None:
    agent, _, rec, result = train({"env": env_id, "algo": "q-learning", "episodes": 200,
                                   "max_episode_steps": 200, "seed": 3})
    assert result.episodes == 200 and len(rec.returns) == 200
    assert agent.artifacts()["q_table"].shape == shape
    # it learns: late episodes are shorter or better than early ones
    early, late = np.mean(rec.returns[:20]), np.mean(rec.returns[-20:])
    assert late > early


def test_random_agent_on_cartpole() -> None:
    agent, _, rec, result = train({"env": "CartPole-v1", "algo": "random", "episodes": 20,
                                     "seed": 5})
    assert isinstance(agent, RandomAgent) and not agent.has_labels
    assert result.episodes == 20 and result.steps == sum(rec.lengths) == len(rec.steps)
    assert all(5 <= n <= 200 for n in rec.lengths)
    obs = rec.steps[0][3]
    assert isinstance(obs, np.ndarray) and obs.shape == (4,)
    assert {row[2] for row in rec.steps} == {0, 1}
    _, _, again, _ = train({"env": "CartPole-v1", "algo": "random", "episodes": 20, "seed": 5})
    assert again.lengths == rec.lengths


def test_step_budget_cuts_the_last_episode() -> None:
    _, _, rec, result = train({"env": "CartPole-v1", "algo": "random", "total_steps": 250,
                               "seed": 1})
    assert result.steps == 250 == sum(rec.lengths) == len(rec.steps)
    both = train({"env": "CartPole-v1", "algo": "random", "total_steps": 10_000, "episodes": 3})
    assert both[3].episodes == 3  # whichever budget is reached first


def space(n: int) -> gym.spaces.Discrete:
    return gym.spaces.Discrete(n)


def test_epsilon_decays_linearly_over_episodes_or_steps() -> None:
    params = QLearningParams(epsilon_start=1.0, epsilon_end=0.1, epsilon_decay=0.5)
    by_episode = QLearningAgent(params, space(4), space(2), Budget(episodes=100),
                                np.random.default_rng(0), NullSink())
    for episode, expected in [(0, 1.0), (25, 0.55), (50, 0.1), (90, 0.1)]:
        by_episode.begin_episode(episode, 0)
        assert by_episode.epsilon == pytest.approx(expected)
    by_step = QLearningAgent(params, space(4), space(2), Budget(total_steps=1000),
                             np.random.default_rng(0), NullSink())
    for _ in range(251):
        by_step.act(0)
    assert by_step.epsilon == pytest.approx(0.55)


def test_labels_and_random_tie_breaking() -> None:
    params = QLearningParams(epsilon_start=0.0, epsilon_end=0.0)
    agent = QLearningAgent(params, space(2), space(4), Budget(episodes=10),
                           np.random.default_rng(0), NullSink())
    agent.begin_episode(0, 0)
    actions = {agent.act(0) for _ in range(200)}
    assert actions == {0, 1, 2, 3} and agent.label == EXPLOIT  # all tied at zero: uniform
    agent.q[0][2] = 1.0
    assert {agent.act(0) for _ in range(50)} == {2}
    explorer = QLearningAgent(QLearningParams(epsilon_start=1.0, epsilon_end=1.0), space(2),
                              space(4), Budget(episodes=10), np.random.default_rng(0), NullSink())
    explorer.act(0)
    assert explorer.label == EXPLORE


def test_td_update_bootstraps_on_truncation_not_on_termination() -> None:
    params = QLearningParams(learning_rate=0.5, gamma=0.9)
    agent = QLearningAgent(params, space(3), space(2), Budget(episodes=1),
                           np.random.default_rng(0), NullSink())
    agent.q[1] = [2.0, 4.0]
    agent.learn(0, 0, 1.0, 1, terminated=True, truncated=False)
    assert agent.q[0][0] == pytest.approx(0.5 * 1.0)
    agent.learn(0, 1, 1.0, 1, terminated=False, truncated=True)
    assert agent.q[0][1] == pytest.approx(0.5 * (1.0 + 0.9 * 4.0))


def test_qlearning_emits_epsilon_per_episode_and_loop_metrics() -> None:
    _, _, rec, result = train({"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 20,
                               "telemetry": TelemetryMode.FAST.value})
    names = [m[0] for m in rec.metrics]
    assert names.count("charts/epsilon") == 20
    assert names.count("charts/episodic_return") == names.count("charts/episodic_length") == 20
    assert rec.steps == []  # fast mode: the loop made no per-step telemetry call
    assert result.steps == sum(rec.lengths)


def test_qlearning_refuses_box_observations() -> None:
    with pytest.raises(ValueError, match="Discrete observation"):
        train({"env": "CartPole-v1", "algo": "q-learning", "episodes": 1})
