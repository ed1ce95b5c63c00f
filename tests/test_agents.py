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
from gymbus.worker.telemetry.step_buffer import StepAppenders


class Recorder:
    """Telemetry that keeps what the loop reports, in memory: each recorded step as a row
    (episode, step, action, obs, reward, terminated, truncated, label), given to `step`."""

    def __init__(self) -> None:
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self.steps: list[tuple[Any, ...]] = []
        self.metrics: list[tuple[str, int, float]] = []
        self._values: tuple[list[Any], ...] = ([], [], [], [])  # obs, action, label, reward

    def step_appenders(self) -> StepAppenders:
        obs, actions, labels, rewards = self._values
        return obs.append, actions.append, labels.append, rewards.append

    def record_steps(self, episode: int, t: int, terminated: bool = False,
                     truncated: bool = False) -> int:
        obs, actions, labels, rewards = self._values
        n = len(rewards)
        assert len(obs) == len(actions) == n and len(labels) in (0, n)
        for i in range(n):
            last = i == n - 1
            self.step(episode, t - n + i, actions[i], obs[i], rewards[i], last and terminated,
                      last and truncated, labels[i] if labels else None)
        for values in self._values:
            values.clear()
        return 7  # a small room, so that the loop's cuts are exercised

    def step(self, *row: Any) -> None:
        self.steps.append(row)

    def episode(self, episode: int, ret: float, length: int, terminated: bool, truncated: bool,
                seed: int | None = None, reset_obs: Any = None) -> int:
        self.returns.append(float(ret))
        self.lengths.append(length)
        return self.record_steps(episode, length, terminated, truncated)

    def metric(self, name: str, step: int, value: float) -> None:
        self.metrics.append((name, step, value))


def train(config: dict[str, Any]) -> tuple[Any, gym.Env[Any, Any], Recorder, training.LoopResult]:
    cfg = parse_config(config)
    rng = training.seed_everything(cfg.seed)
    env = training.make_env(cfg)
    rec = Recorder()
    agent = training.make_agent(cfg, env, rng, rec)
    result = training.run_training(env, agent, rec, training.budget_of(cfg), seed=cfg.seed,
                                   mode=cfg.telemetry, every=cfg.every,
                                   evaluation=training.make_evaluation(cfg, agent, rec))
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
    (artifact,) = agent.artifacts()
    assert (artifact.name, artifact.filename, artifact.format) == ("q_table", "q_table.npy", "npy")
    table = artifact.data
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
    assert agent.artifacts()[0].data.shape == shape
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
        # the learning rate falls over the whole budget, from 0.1 to 0.01
        assert by_episode.learning_rate == pytest.approx(0.1 - 0.09 * episode / 100)
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


def test_qlearning_emits_epsilon_and_one_row_per_episode() -> None:
    _, _, rec, result = train({"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 20,
                               "telemetry": TelemetryMode.FAST.value})
    names = [m[0] for m in rec.metrics]
    assert names.count("charts/epsilon") == 20
    # return and length travel once, as episode rows (TensorBoard's curves are made from them)
    assert "charts/episodic_return" not in names and len(rec.lengths) == 20
    assert rec.steps == []  # fast mode: the loop made no per-step telemetry call
    assert result.steps == sum(rec.lengths)


def test_qlearning_refuses_box_observations() -> None:
    with pytest.raises(ValueError, match="Discrete observation"):
        train({"env": "CartPole-v1", "algo": "q-learning", "episodes": 1})


def test_the_random_agent_publishes_its_constant_epsilon_once() -> None:
    _, _, rec, _ = train({"env": "CartPole-v1", "algo": "random", "episodes": 4, "seed": 2})
    assert [(s, v) for n, s, v in rec.metrics if n == "charts/epsilon"] == [(0, 1.0)]


def test_periodic_evaluation_tracks_the_greedy_policy() -> None:
    agent, _, rec, _ = train({"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 300,
                              "seed": 1, "env_kwargs": {"is_slippery": False},
                              "eval_every": 100, "eval_episodes": 5})
    evals = [(step, v) for n, step, v in rec.metrics if n == "eval/mean_return"]
    assert len(evals) == 3 and evals[-1][1] == 1.0  # solved: every greedy episode succeeds
    assert [s for s, _ in evals] == sorted(s for s, _ in evals)
    lengths = [v for n, _, v in rec.metrics if n == "eval/mean_length"]
    assert lengths[-1] == 6.0  # the shortest path on the 4x4 map
    greedy = agent.evaluator()
    assert greedy.artifacts() == [] and greedy.label == "greedy"
    assert greedy.act(0) == agent.greedy_action(0)


def test_greedy_episodes_get_a_step_limit_where_the_env_has_none() -> None:
    config = parse_config({"env": "CliffWalking-v1", "algo": "q-learning", "episodes": 1})
    assert training.make_env(config).spec.max_episode_steps is None  # type: ignore[union-attr]
    limited = training.make_env(config, greedy=True)
    assert limited.spec.max_episode_steps == training.GREEDY_STEP_LIMIT  # type: ignore[union-attr]
    evaluation = parse_config({"env": "CliffWalking-v1", "algo": "q-learning", "episodes": 1,
                               "eval_from": "01TRAINED"})
    limited = training.make_env(evaluation)  # an evaluation run's own environment
    assert limited.spec.max_episode_steps == training.GREEDY_STEP_LIMIT  # type: ignore[union-attr]


def test_a_q_table_of_another_shape_is_refused() -> None:
    agent = QLearningAgent(QLearningParams(), space(16), space(4), Budget(episodes=1),
                           np.random.default_rng(0), NullSink())
    with pytest.raises(ValueError, match=r"\(64, 4\).*16 states and 4 actions"):
        agent.load_table(np.zeros((64, 4)))
    agent.load_table(np.arange(64, dtype=np.float64).reshape(16, 4))
    assert agent.greedy_action(1) == 3 and agent.table()[15, 3] == 63.0
