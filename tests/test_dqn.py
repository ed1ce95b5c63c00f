"""The DQN agent: a short run trains, publishes its losses, saves and reloads its network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_agents import Recorder

from gymbus.services.controller.validation import check_environment
from gymbus.shared.errors import ConfigError
from gymbus.shared.runconfig import DqnParams, parse_config
from gymbus.worker import training
from gymbus.worker.agents.dqn import DqnAgent, GreedyDqn, QNetwork, ReplayBuffer
from gymbus.worker.agents.policies import PolicyError, write_artifact

#: a short run that still trains: the buffer fills for 300 steps, then a gradient step every 4
SHORT = {"env": "CartPole-v1", "algo": "dqn", "total_steps": 1500, "seed": 3,
         "agent": {"learning_starts": 300, "target_network_frequency": 200, "buffer_size": 2000}}


def train_dqn(config: dict[str, Any]) -> tuple[DqnAgent, Recorder, training.LoopResult]:
    cfg = parse_config(config)
    rng = training.seed_everything(cfg.seed)
    env = training.make_env(cfg)
    rec = Recorder()
    agent = training.make_agent(cfg, env, rng, rec)
    assert isinstance(agent, DqnAgent)
    result = training.run_training(env, agent, rec, training.budget_of(cfg), seed=cfg.seed)
    return agent, rec, result


def evaluate(config: dict[str, Any], runs_dir: Path, episodes: int = 3) -> Recorder:
    cfg = parse_config({**config, "episodes": episodes})
    rng = training.seed_everything(cfg.seed)
    env = training.make_env(cfg, greedy=True)
    rec = Recorder()
    agent = training.make_agent(cfg, env, rng, rec, runs_dir=runs_dir)
    training.run_training(env, agent, rec, training.budget_of(cfg), seed=cfg.seed)
    return rec


def test_a_short_run_trains_and_publishes_its_losses() -> None:
    agent, rec, result = train_dqn(SHORT)
    assert result.steps == 1500 == agent.global_step and agent.buffer.size == 1500
    names = {name for name, _, _ in rec.metrics}
    assert {"losses/td_loss", "losses/q_values", "charts/epsilon"} <= names
    losses = [(step, v) for name, step, v in rec.metrics if name == "losses/td_loss"]
    assert losses[0][0] >= 400 and all(np.isfinite(v) for _, v in losses)
    assert len(losses) == pytest.approx((1500 - 300) / 100, abs=1)
    epsilons = [v for name, _, v in rec.metrics if name == "charts/epsilon"]
    assert epsilons[0] > epsilons[-1] >= 0.02
    assert agent.epsilon_at(0) == 1.0 and agent.epsilon_at(300) == pytest.approx(0.02)
    labels = {row[-1] for row in rec.steps}
    assert labels == {"explore", "exploit"}
    assert agent.device.type in ("cpu", "cuda")


def test_same_seed_same_returns() -> None:
    _, first, _ = train_dqn(SHORT)
    _, again, _ = train_dqn(SHORT)
    _, other, _ = train_dqn({**SHORT, "seed": 4})
    assert first.returns == again.returns and first.lengths == again.lengths
    td = [v for name, _, v in first.metrics if name == "losses/td_loss"]
    assert td == [v for name, _, v in again.metrics if name == "losses/td_loss"]
    assert first.returns != other.returns


def test_the_network_is_saved_and_loaded_for_evaluation(tmp_path: Path) -> None:
    agent, _, _ = train_dqn(SHORT)
    folder = tmp_path / "runs" / "01TRAINED" / "artifacts"
    meta, weights = agent.artifacts()
    assert (meta.filename, meta.format, weights.filename, weights.format) == (
        "q_network.json", "json", "q_network.pt", "torch")
    assert meta.data["obs_size"] == 4 and meta.data["n_actions"] == 2
    assert meta.data["hidden_sizes"] == [120, 84]
    for artifact in agent.artifacts():
        write_artifact(folder, artifact)
    state = torch.load(folder / "q_network.pt", weights_only=True)
    assert set(state) == set(agent.q_network.state_dict())
    config = {**SHORT, "eval_from": "01TRAINED"}
    del config["total_steps"]
    assert check_environment(parse_config({**config, "episodes": 1}), tmp_path / "runs") == "box"
    rec = evaluate(config, tmp_path / "runs")
    assert len(rec.returns) == 3 and {row[-1] for row in rec.steps} == {"greedy"}
    # the loaded network acts as the trained one does
    greedy = agent.evaluator()
    assert isinstance(greedy, GreedyDqn)
    obs = np.array([row[3] for row in rec.steps[:20]], dtype=np.float32)
    loaded = QNetwork(4, 2, (120, 84))
    loaded.load_state_dict(state)
    with torch.no_grad():
        assert loaded(torch.from_numpy(obs)).argmax(1).tolist() == [greedy.act(o) for o in obs]


def test_weights_for_another_observation_size_are_refused(tmp_path: Path) -> None:
    agent, _, _ = train_dqn({**SHORT, "total_steps": 50})
    folder = tmp_path / "runs" / "01CARTPOLE" / "artifacts"
    for artifact in agent.artifacts():
        write_artifact(folder, artifact)
    config = {"env": "Acrobot-v1", "algo": "dqn", "episodes": 1, "eval_from": "01CARTPOLE"}
    with pytest.raises(ConfigError, match="takes 4 inputs and has 2 actions, but Acrobot-v1 "
                                          "has 6 and 3") as info:
        check_environment(parse_config(config), tmp_path / "runs")
    assert info.value.field == "eval_from"
    with pytest.raises(PolicyError, match="takes 4 inputs"):
        evaluate(config, tmp_path / "runs")
    (folder / "q_network.json").unlink()
    with pytest.raises(ConfigError, match="q_network.json, the network's shape, is missing"):
        check_environment(parse_config({**config, "env": "CartPole-v1"}), tmp_path / "runs")


def test_dqn_config_is_checked() -> None:
    assert parse_config({**SHORT, "agent": {"hidden_sizes": [64]}}).params().hidden_sizes == (64,)
    assert parse_config(SHORT).params() == DqnParams(learning_starts=300,
                                                     target_network_frequency=200,
                                                     buffer_size=2000)
    cases = [({"total_steps": None, "episodes": 10}, "total_steps", "environment steps"),
             ({"agent": {"hidden_sizes": [0]}}, "agent.hidden_sizes", "integers between 1 and"),
             ({"agent": {"hidden_sizes": 64}}, "agent.hidden_sizes", "integers between 1 and"),
             ({"agent": {"batch_size": 0}}, "agent.batch_size", "must be >= 1"),
             ({"agent": {"learning_starts": -1}}, "agent.learning_starts", "must be >= 0"),
             ({"agent": {"tau": 1.5}}, "agent.tau", "between 0 and 1")]
    for changes, field, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            parse_config({**SHORT, **changes})
        assert info.value.field == field
    for env in ("FrozenLake-v1", "Taxi-v4"):
        with pytest.raises(ConfigError, match="dqn cannot learn") as info:
            check_environment(parse_config({**SHORT, "env": env}))
        assert info.value.field == "algo"
    assert check_environment(parse_config({**SHORT, "env": "Acrobot-v1"})) == "box"


def test_the_replay_buffer_is_a_ring() -> None:
    buffer = ReplayBuffer(3, 2)
    for i in range(5):
        buffer.add(np.full(2, i), np.full(2, i + 1), i % 2, float(i), i == 4)
    assert buffer.size == 3 and sorted(buffer.rewards.tolist()) == [2.0, 3.0, 4.0]
    obs, _, rewards, next_obs, dones = buffer.sample(16, np.random.default_rng(0))
    assert obs.shape == (16, 2) and set(rewards.tolist()) <= {2.0, 3.0, 4.0}
    assert np.array_equal(next_obs, obs + 1) and np.array_equal(dones, rewards == 4.0)
