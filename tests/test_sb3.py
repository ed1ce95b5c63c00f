"""Stable-Baselines3 recorded through `gymbus.integrations.sb3`, with the real SB3 and a real stack.

Each test runs a training script in a subprocess with the stack's variables. The script prints
what SB3 itself counted (its `num_timesteps`, the episodes of its `Monitor` wrappers, every value
its logger dumped, the actions its env received), and the test compares that with what the store
holds, through the real `gymbus` command.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import STACK_ENV, stack_fixture, store_query, stored_run

from gymbus.services.stack.launcher import Stack

stack = stack_fixture("sb3", **STACK_ENV)

#: the scripts' shared part: an SB3 logger output that keeps every value SB3 dumps, beside
#: gymbus's, and the returns and lengths of each sub-environment's Monitor
SEEN = """
    import hashlib, json
    import numpy as np, torch
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import KVWriter
    import gymbus
    from gymbus.integrations.sb3 import GymbusCallback

    class Dumps(KVWriter, BaseCallback):
        def __init__(self):
            BaseCallback.__init__(self)
            self.rows = []
        def write(self, key_values, key_excluded, step=0):
            self.rows += [[k, int(step), float(v)] for k, v in key_values.items()]
        def _on_training_start(self):
            self.model.logger.output_formats.append(self)
        def _on_step(self):
            return True

    def monitors(env):
        return {"returns": env.get_attr("episode_returns"),
                "lengths": env.get_attr("episode_lengths")}

    def digest(model):
        weights = torch.cat([p.detach().flatten() for p in model.policy.parameters()])
        return hashlib.sha256(weights.numpy().tobytes()).hexdigest()
"""

PPO = SEEN + """
    from stable_baselines3 import PPO

    def train(run):
        env = make_vec_env("CartPole-v1", n_envs=4, seed=1,
                           wrapper_class=run.record if run else None)
        model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=2, seed=1,
                    device="cpu")
        dumps = Dumps()
        model.learn(1024, callback=CallbackList([GymbusCallback(run), dumps]) if run else None)
        return {"num_timesteps": model.num_timesteps, "dumps": dumps.rows,
                "weights": digest(model), **monitors(env)}

    with gymbus.run(name="sb3-ppo", backend="sb3") as run:
        recorded = train(run)
    plain = train(None)  # the same seed, neither wrapper nor callback
    print(json.dumps({"run_id": run.run_id, "recorded": recorded, "plain": plain}))
"""

SAC = SEEN + """
    import gymnasium as gym
    from stable_baselines3 import SAC

    class Actions(gym.Wrapper):
        def __init__(self, env):
            super().__init__(env)
            self.seen = []
        def step(self, action):
            self.seen.append(np.asarray(action, np.float64).tolist())
            return self.env.step(action)

    with gymbus.run(name="sb3-sac", backend="sb3") as run:
        env = make_vec_env("Pendulum-v1", n_envs=1, seed=2,
                           wrapper_class=lambda env: run.record(Actions(env)))
        model = SAC("MlpPolicy", env, learning_starts=50, batch_size=32, seed=2, device="cpu",
                    policy_kwargs={"net_arch": [32, 32]})
        model.learn(300, log_interval=1, callback=GymbusCallback(run))
        space = env.action_space
    print(json.dumps({"run_id": run.run_id, "num_timesteps": model.num_timesteps,
                      "actions": env.get_attr("seen")[0], "low": space.low.tolist(),
                      "high": space.high.tolist(), **monitors(env)}))
"""


def script(stack: Stack, code: str) -> Any:
    """Run `code` as a user's script with the stack's variables; what it printed last, parsed."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                            env=stack.process_env(), capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])




def ended_episodes(stack: Stack, run_id: str, n_envs: int) -> dict[str, list[list[Any]]]:
    """Per sub-environment, in order: the returns and lengths of the episodes that ended (the
    ones SB3's Monitor counts; the run's end cuts the others)."""
    rows = store_query(stack, f"SELECT env_index, \"return\", length FROM episodes WHERE run_id = "
                        f"'{run_id}' AND (terminated OR truncated) ORDER BY env_index, episode")
    return {"returns": [[r["return"] for r in rows if r["env_index"] == i] for i in range(n_envs)],
            "lengths": [[r["length"] for r in rows if r["env_index"] == i] for i in range(n_envs)]}


@pytest.fixture(scope="module")
def ppo(stack: Stack) -> Iterator[dict[str, Any]]:
    """PPO on four CartPoles, recorded, then again with the same seed unrecorded."""
    yield script(stack, PPO)


def test_ppo_s_steps_episodes_and_logged_values_are_stored(stack: Stack,
                                                           ppo: dict[str, Any]) -> None:
    run_id, seen = ppo["run_id"], ppo["recorded"]
    row = stored_run(stack, run_id)
    assert (row["status"], row["backend"], row["name"]) == ("completed", "sb3", "sb3-ppo")
    assert seen["num_timesteps"] == 1024
    steps = store_query(stack, f"SELECT env_index, count(*) AS n FROM steps WHERE run_id = "
                         f"'{run_id}' GROUP BY env_index ORDER BY env_index")
    assert steps == [{"env_index": i, "n": 256} for i in range(4)]
    assert row["steps"] == seen["num_timesteps"]
    episodes = ended_episodes(stack, run_id, 4)
    assert episodes == {"returns": seen["returns"], "lengths": seen["lengths"]}
    assert sum(map(len, seen["returns"])) >= 20
    # every value SB3's logger dumped, at SB3's num_timesteps, and nothing else
    metrics = store_query(stack, f"SELECT name, step, value FROM metrics WHERE run_id = '{run_id}' "
                           "ORDER BY name, step")
    assert [[m["name"], m["step"]] for m in metrics] == sorted([n, s] for n, s, _ in seen["dumps"])
    assert [m["value"] for m in metrics] == pytest.approx(
        [v for _, _, v in sorted(seen["dumps"])])
    at = {m["name"]: [] for m in metrics}
    for m in metrics:
        at[m["name"]].append(m["step"])
    assert at["time/fps"] == [256, 512, 768, 1024]
    assert at["rollout/ep_rew_mean"] == [256, 512, 768, 1024]
    assert at["train/value_loss"] == at["train/loss"] == [512, 768, 1024]


def test_recording_changes_nothing_sb3_computes(ppo: dict[str, Any]) -> None:
    recorded, plain = ppo["recorded"], ppo["plain"]
    assert recorded["returns"] == plain["returns"]
    assert recorded["lengths"] == plain["lengths"]
    assert recorded["weights"] == plain["weights"]  # the same updates, bit for bit


def test_sac_s_continuous_actions_are_stored_as_floats(stack: Stack) -> None:
    seen = script(stack, SAC)
    run_id = seen["run_id"]
    row = stored_run(stack, run_id)
    assert row["status"] == "completed" and seen["num_timesteps"] == 300
    steps = store_query(stack, f"SELECT action, action_vec FROM steps WHERE run_id = '{run_id}' "
                         "ORDER BY episode, step")
    assert len(steps) == row["steps"] == 300
    assert {s["action"] for s in steps} == {None}
    stored_actions = [s["action_vec"] for s in steps]
    assert stored_actions == [pytest.approx(a, abs=1e-6) for a in seen["actions"]]
    low, high = seen["low"][0], seen["high"][0]
    values = [a[0] for a in stored_actions]
    assert all(low <= v <= high for v in values) and len(set(values)) > 250
    assert ended_episodes(stack, run_id, 1) == {"returns": seen["returns"],
                                                "lengths": seen["lengths"]}
    assert seen["lengths"] == [[200]]  # Pendulum's time limit, once in 300 steps
    trained = store_query(stack, f"SELECT DISTINCT step FROM metrics WHERE run_id = '{run_id}' "
                           "AND name = 'train/actor_loss'")
    assert trained == [{"step": 200}]  # SAC dumps its logs at each episode's end
