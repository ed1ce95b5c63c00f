"""Stored values come back in their spaces' dtype and shape: `gymbus.arrays(run_id)`.

A script records one run per space kind (float actions, a Dict observation, uint8 images with a
MultiDiscrete action, a Discrete observation, and a built-in agent's run, which keeps no spaces
of its own) and saves what it saw; the reader's arrays must equal it, dtype and shape included,
and one episode's `observations` must be its reset observation followed by its steps'.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import STACK_ENV, gymbus_cli_json, make_stack, stored_run
from recorded_runs import ROLES

import gymbus
from gymbus.services.stack.launcher import Stack
from gymbus.shared.errors import NotFound

pytestmark = pytest.mark.integration

SCRIPT = """
    import json, sys, gymnasium as gym, numpy as np, gymbus

    class DictObs(gym.ObservationWrapper):
        def __init__(self, env):
            super().__init__(env)
            box = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
            self.observation_space = gym.spaces.Dict({"pos": box, "vel": box})
        def observation(self, obs):
            return {"pos": obs[[0, 2]], "vel": obs[[1, 3]]}

    class Pixels(gym.Env):
        observation_space = gym.spaces.Box(0, 255, (6, 5, 3), np.uint8)
        action_space = gym.spaces.MultiDiscrete([3, 4])
        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return self.np_random.integers(0, 256, (6, 5, 3), dtype=np.uint8), {}
        def step(self, action):
            self.t += 1
            obs = self.np_random.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            return obs, float(action.sum()), False, self.t >= 7, {}

    envs = {"pendulum": lambda: gym.make("Pendulum-v1", max_episode_steps=20),
            "dict": lambda: DictObs(gym.make("CartPole-v1")),
            "pixels": Pixels,
            "lake": lambda: gym.make("FrozenLake-v1", is_slippery=False, max_episode_steps=9)}
    seen = {}
    for key, make in envs.items():
        with gymbus.run(name=key) as run:
            env = run.record(make(), store_large_obs=True)
            env.action_space.seed(0)
            actions, obs_rows, resets = [], [], []
            for ep in range(3):
                obs, _ = env.reset(seed=ep)
                resets.append(obs)
                done = False
                while not done:
                    a = env.action_space.sample()
                    obs, _, term, trunc, _ = env.step(a)
                    actions.append(np.asarray(a).tolist())
                    obs_rows.append({k: v.tolist() for k, v in obs.items()}
                                    if isinstance(obs, dict) else np.asarray(obs).tolist())
                    done = term or trunc
        first = resets[0]
        seen[key] = {"run_id": run.run_id, "actions": actions, "obs": obs_rows,
                     "reset0": ({k: v.tolist() for k, v in first.items()}
                                if isinstance(first, dict) else np.asarray(first).tolist())}
    print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, Any]]]:
    home = tmp_path_factory.mktemp("typed") / "home"
    with make_stack(home, **STACK_ENV) as stack:
        stack.start(ROLES + ("worker",))
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)],
                                env=stack.process_env(), capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        seen: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        for run in seen.values():
            stored_run(stack, run["run_id"])
        yield stack, seen


@pytest.fixture
def reader(recorded: tuple[Stack, dict[str, Any]],
           monkeypatch: pytest.MonkeyPatch) -> Iterator[gymbus.Reader]:
    stack, _ = recorded
    for key, value in stack.process_env().items():
        if key.startswith("GYMBUS_"):
            monkeypatch.setenv(key, value)
    with gymbus.store() as db:
        yield db


@pytest.mark.parametrize(("key", "obs_dtype", "obs_shape", "action_dtype", "action_shape"), [
    ("pendulum", np.float32, (3,), np.float32, (1,)),
    ("pixels", np.uint8, (6, 5, 3), np.int64, (2,)),
    ("lake", np.int64, (), np.int64, ()),
])
def test_values_come_back_in_their_space_s_dtype_and_shape(
        recorded: tuple[Stack, dict[str, Any]], reader: gymbus.Reader, key: str,
        obs_dtype: Any, obs_shape: tuple[int, ...], action_dtype: Any,
        action_shape: tuple[int, ...]) -> None:
    seen = recorded[1][key]
    arrays = reader.arrays(seen["run_id"])
    n = len(seen["actions"])
    assert arrays["obs"].dtype == obs_dtype and arrays["obs"].shape == (n, *obs_shape)
    assert arrays["action"].dtype == action_dtype
    assert arrays["action"].shape == (n, *action_shape)
    np.testing.assert_array_equal(arrays["obs"], np.asarray(seen["obs"], obs_dtype))
    np.testing.assert_array_equal(arrays["action"], np.asarray(seen["actions"], action_dtype))
    one = reader.arrays(seen["run_id"], episode=0)
    length = len(one["step"])
    assert one["observations"].shape == (length + 1, *obs_shape)
    np.testing.assert_array_equal(one["observations"][0], np.asarray(seen["reset0"], obs_dtype))
    np.testing.assert_array_equal(one["observations"][1:], one["obs"])


def test_a_dict_space_comes_back_one_array_per_key(recorded: tuple[Stack, dict[str, Any]],
                                                   reader: gymbus.Reader) -> None:
    seen = recorded[1]["dict"]
    arrays = reader.arrays(seen["run_id"], episode=0)
    assert set(arrays["obs"]) == {"pos", "vel"}
    length = len(arrays["step"])
    for key in ("pos", "vel"):
        assert arrays["obs"][key].dtype == np.float32
        assert arrays["obs"][key].shape == (length, 2)
        expected = np.asarray([row[key] for row in seen["obs"][:length]], np.float32)
        np.testing.assert_array_equal(arrays["obs"][key], expected)
        assert arrays["observations"][key].shape == (length + 1, 2)
        np.testing.assert_array_equal(arrays["observations"][key][0], seen["reset0"][key])


def test_a_built_in_agent_s_run_is_decoded_from_its_environment(
        recorded: tuple[Stack, dict[str, Any]], reader: gymbus.Reader) -> None:
    stack, _ = recorded
    reply = gymbus_cli_json(stack.process_env(), "submit", "--env", "CartPole-v1", "--algo",
                            "random", "--episodes", "2", "--seed", "4", "--wait")
    stored_run(stack, reply["run_id"])
    arrays = reader.arrays(reply["run_id"], episode=1)
    length = len(arrays["step"])
    assert arrays["obs"].dtype == np.float32 and arrays["obs"].shape == (length, 4)
    assert arrays["action"].dtype == np.int64 and arrays["action"].shape == (length,)
    assert arrays["observations"].shape == (length + 1, 4)


def test_an_unknown_run_is_named(reader: gymbus.Reader) -> None:
    with pytest.raises(NotFound, match="nope"):
        reader.arrays("nope")
