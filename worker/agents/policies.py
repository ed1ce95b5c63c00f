"""Policies: each algorithm's learner, its saved files, and their loading for evaluation runs.

Formats (in a run's `artifacts/` folder, announced by `artifact` lifecycle frames):

- `q_table.npy` (q-learning, bdi): float64 array [n_states, n_actions], numpy's .npy format.
- `bdi_memory.json` (bdi): what the plans remember, see `gymbus.worker.agents.bdi`.
- `q_network.json` then `q_network.pt` (dqn): the network's shape, then its torch state_dict
  (tensors on the CPU), loadable with `torch.load(path, weights_only=True)`.

The run process writes them (agents never touch files); an evaluation run loads them here and
fails at its start, before any step, when they do not fit the environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from gymbus.shared.errors import GymbusError
from gymbus.shared.policy_files import BDI_MEMORY_FILE, policy_path, read_network_meta
from gymbus.shared.runconfig import (
    BdiParams,
    DqnParams,
    QLearningParams,
    RandomParams,
    RunConfig,
)
from gymbus.worker.agents.base import Agent, Artifact, Budget, MetricSink


class PolicyError(GymbusError):
    """A saved policy cannot be loaded or does not fit the environment: evaluate it on the
    environment it was trained on, or point eval_from / policy at another one."""


def build_learner(
    config: RunConfig, env: gym.Env[Any, Any], rng: np.random.Generator, sink: MetricSink
) -> Agent:
    """A fresh agent of `config.algo` for this env's spaces, ready to train."""
    params = config.params()
    budget = Budget(episodes=config.episodes, total_steps=config.total_steps)
    if isinstance(params, BdiParams):  # before QLearningParams: a BdiParams is one too
        from gymbus.worker.agents.bdi import BdiAgent

        return BdiAgent(params, env, budget, rng, sink)
    if isinstance(params, QLearningParams):
        from gymbus.worker.agents.qlearning import QLearningAgent

        return QLearningAgent(
            params, env.observation_space, env.action_space, budget, rng, sink
        )
    if isinstance(params, DqnParams):
        from gymbus.worker.agents.dqn import DqnAgent

        return DqnAgent(params, env.observation_space, env.action_space, budget, rng, sink,
                        seed=config.seed)
    if isinstance(params, RandomParams):
        from gymbus.worker.agents.random_agent import RandomAgent

        return RandomAgent(params, env.action_space, sink)
    raise ValueError(f"no agent for algo {config.algo!r}")


def load_evaluator(
    config: RunConfig,
    env: gym.Env[Any, Any],
    rng: np.random.Generator,
    sink: MetricSink,
    runs_dir: Path | None = None,
) -> Agent:
    """The greedy agent of an evaluation run: the saved policy, checked against the env."""
    if runs_dir is None:
        from gymbus.shared import settings as settings_mod

        runs_dir = settings_mod.load().runs_dir
    path = policy_path(config, runs_dir)
    if config.algo == "dqn":
        return _load_network(path, env, sink)
    table = load_q_table(path, env)
    if config.algo == "bdi":
        from gymbus.worker.agents.bdi import BdiAgent, Memory

        params = config.params()
        budget = Budget(episodes=config.episodes, total_steps=config.total_steps)
        memory = Memory.from_json(_read_json(path.parent / BDI_MEMORY_FILE, missing_ok=True))
        agent = BdiAgent(params, env, budget, rng, sink, memory=memory)
        agent.load_table(table)
        return agent.evaluator()
    from gymbus.worker.agents.qlearning import GreedyQ

    return GreedyQ(table.tolist(), sink)


def load_q_table(path: Path, env: gym.Env[Any, Any]) -> np.ndarray:
    """A saved Q-table, checked to be [n_states, n_actions] of `env`."""
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PolicyError(f"cannot read the Q-table {path}: {exc}") from None
    obs, act = env.observation_space, env.action_space
    if not isinstance(obs, spaces.Discrete) or not isinstance(act, spaces.Discrete):
        raise PolicyError(f"a Q-table needs discrete observations and actions, not {obs}, {act}")
    want = (int(obs.n), int(act.n))
    if table.ndim != 2 or table.shape != want:
        raise PolicyError(f"the Q-table {path.name} is {table.shape}, but {_env_name(env)} has "
                          f"{want[0]} states and {want[1]} actions")
    if not np.all(np.isfinite(table)):
        raise PolicyError(f"the Q-table {path} holds NaN or infinite values")
    out: np.ndarray = table.astype(np.float64)
    return out


def _load_network(path: Path, env: gym.Env[Any, Any], sink: MetricSink) -> Agent:
    import torch

    from gymbus.worker.agents.dqn import GreedyDqn, QNetwork, pick_device

    try:
        meta = read_network_meta(path)
    except GymbusError as exc:
        raise PolicyError(str(exc)) from None
    obs = env.observation_space
    size = int(obs.shape[0]) if isinstance(obs, spaces.Box) and len(obs.shape) == 1 else None
    n_actions = int(env.action_space.n) if isinstance(env.action_space, spaces.Discrete) else None
    if (meta.get("obs_size"), meta.get("n_actions")) != (size, n_actions):
        raise PolicyError(f"the network {path.name} takes {meta.get('obs_size')} inputs and has "
                          f"{meta.get('n_actions')} actions, but {_env_name(env)} has "
                          f"{size} and {n_actions}")
    hidden = meta.get("hidden_sizes")
    if not isinstance(hidden, list) or not all(isinstance(h, int) and h > 0 for h in hidden):
        raise PolicyError(f"{path.with_suffix('.json').name}: hidden_sizes should be a list of "
                          f"positive integers, got {hidden!r}")
    device = pick_device()
    network = QNetwork(int(meta["obs_size"]), int(meta["n_actions"]), tuple(hidden))
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(weights)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise PolicyError(f"cannot load the weights {path}: {exc}") from None
    network.to(device).eval()
    return GreedyDqn(network, device, sink)


def write_artifact(folder: Path, artifact: Artifact) -> Path:
    """Write one artifact file atomically (a reader never sees half of it); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / artifact.filename
    tmp = path.with_name(path.name + ".tmp")
    if artifact.format == "npy":
        with open(tmp, "wb") as f:
            np.save(f, artifact.data, allow_pickle=False)
    elif artifact.format == "json":
        tmp.write_text(json.dumps(artifact.data, indent=2), encoding="utf-8")
    elif artifact.format == "torch":
        import torch

        torch.save(artifact.data, tmp)
    else:
        raise ValueError(f"unknown artifact format {artifact.format!r}")
    os.replace(tmp, path)
    return path


def _read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise PolicyError(f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise PolicyError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path} should hold a JSON object")
    return data


def _env_name(env: gym.Env[Any, Any]) -> str:
    return env.spec.id if env.spec is not None else type(env.unwrapped).__name__
