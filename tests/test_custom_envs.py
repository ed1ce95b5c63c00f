"""Users' own environments for the built-in agents: an entry point (`--env module:Attr`) and a
module that registers ids (`--env-module`), through a real stack whose processes find the module
on PYTHONPATH, as a user's would.

A bad module, attribute or id is refused at submit (exit code 2, the field named, nothing
stored); a good one trains, and every step is stored, but for those holding a NaN (refused,
counted).
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import STACK_ENV, gymbus_cli, gymbus_cli_json, make_stack, store_query, stored_run

from gymbus.services.stack.launcher import SERVICES, Stack
from gymbus.shared.errors import ExitCode

PACKAGE = "my_grid_envs"
ENVS = '''
    """A corridor: start in cell 0, move left (0) or right (1), reward 1 in the last cell."""
    import gymnasium as gym
    import numpy as np
    from gymnasium import spaces


    class GridEnv(gym.Env):
        def __init__(self, length=5):
            self.length = length
            self.observation_space = spaces.Discrete(length)
            self.action_space = spaces.Discrete(2)
            self.pos = 0

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.pos = 0
            return self.pos, {}

        def step(self, action):
            self.pos = min(max(self.pos + (1 if action == 1 else -1), 0), self.length - 1)
            done = self.pos == self.length - 1
            return self.pos, float(done), done, False, {}


    class NanRewards(GridEnv):
        """GridEnv whose reward is NaN every `every`th step (counted over episodes)."""

        def __init__(self, length=5, every=23):
            super().__init__(length)
            self.every, self.n = every, 0

        def step(self, action):
            obs, reward, terminated, truncated, info = super().step(action)
            self.n += 1
            return obs, float("nan") if self.n % self.every == 0 else reward, terminated, \
                truncated, info


    class Wide(gym.Env):
        """Observations of 3,072 float32 values (12 KiB a step), each its step's number."""

        observation_space = spaces.Box(0.0, 1e6, (3072,), "float32")
        action_space = spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return self.observation_space.low.copy(), {}

        def step(self, action):
            self.t += 1
            return self.observation_space.low + self.t, 1.0, False, False, {}


    class Rover(gym.Env):
        """Dict observations (a 32x32 camera, a position), two float controls; 5-step episodes.
        The reward is minus the distance from the origin after the move."""

        observation_space = spaces.Dict({
            "camera": spaces.Box(0, 255, (32, 32, 3), np.uint8),
            "pos": spaces.Box(-100.0, 100.0, (2,), np.float32)})
        action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t, self.pos = 0, np.zeros(2, np.float32)
            return self._obs(), {}

        def _obs(self):
            return {"camera": np.zeros((32, 32, 3), np.uint8), "pos": self.pos.copy()}

        def step(self, action):
            self.t += 1
            self.pos += action
            return self._obs(), -float(np.abs(self.pos).sum()), self.t == 5, False, {}
'''
REGISTER = f'''
    import gymnasium as gym

    gym.register(id="MyCorridor-v0", entry_point="{PACKAGE}.envs:GridEnv", max_episode_steps=50)
'''


def with_package(root: Path) -> str:
    """PACKAGE written under `root`; the PYTHONPATH that finds it."""
    package = root / "pkgs" / PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "envs.py").write_text(textwrap.dedent(ENVS))
    (package / "register.py").write_text(textwrap.dedent(REGISTER))
    return os.pathsep.join(p for p in (str(root / "pkgs"), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose controller and worker find PACKAGE on PYTHONPATH."""
    root = tmp_path_factory.mktemp("custom-envs")
    with make_stack(root / "home", **STACK_ENV, PYTHONPATH=with_package(root)) as s:
        s.start()
        yield s


def submit(stack: Stack, *args: str) -> tuple[int, Any, str]:
    """`gymbus submit ... --wait --json`: (exit code, the JSON printed or None, stderr)."""
    result = gymbus_cli(stack.process_env(), "submit", *args, "--wait", "--json", timeout=120)
    printed = json.loads(result.stdout) if result.stdout.strip() else None
    return result.returncode, printed, result.stderr


def episodes_of(stack: Stack, run_id: str) -> list[dict[str, Any]]:
    return store_query(stack, "SELECT episode, length, terminated, truncated FROM episodes "
                              f"WHERE run_id = '{run_id}' ORDER BY episode")


def test_an_entry_point_env_trains_with_its_kwargs_and_time_limit(stack: Stack) -> None:
    """A corridor of 30 cells cannot be crossed in 10 steps: with the TimeLimit that
    max_episode_steps asks for, every episode is truncated at exactly 10 steps."""
    code, printed, stderr = submit(
        stack, "--env", f"{PACKAGE}.envs:GridEnv", "--env-arg", "length=30", "--algo",
        "q-learning", "--episodes", "20", "--max-episode-steps", "10")
    assert code == 0, stderr
    assert printed["status"] == "completed"
    run_id = printed["run_id"]
    row = stored_run(stack, run_id)
    assert (row["env"], row["steps"], row["episodes"]) == (f"{PACKAGE}.envs:GridEnv", 200, 20)
    steps = store_query(stack, f"SELECT count(*) AS n FROM steps WHERE run_id = '{run_id}'")
    assert steps[0]["n"] == 200
    episodes = episodes_of(stack, run_id)
    assert [(e["length"], e["truncated"], e["terminated"]) for e in episodes] == \
        [(10, True, False)] * 20


def test_a_nan_reward_refuses_its_rows_and_keeps_the_rest_of_the_run(stack: Stack) -> None:
    """A built-in run on an env whose reward is now and then NaN: the step rows holding one,
    and the episodes whose return it makes NaN, are refused and counted (the protocol stores no
    NaN); every other row of their frames is stored, and nothing goes to the dead letters."""
    code, printed, stderr = submit(
        stack, "--env", f"{PACKAGE}.envs:NanRewards", "--env-arg", "length=30", "--algo",
        "random", "--episodes", "20", "--max-episode-steps", "10")
    assert code == 0, stderr
    run_id = printed["run_id"]
    row = stored_run(stack, run_id)
    # 20 episodes of 10 steps (30 cells cannot be crossed in 10); steps 23, 46, ... are NaN
    nan_steps = [n for n in range(1, 201) if n % 23 == 0]
    nan_episodes = {(n - 1) // 10 for n in nan_steps}
    # the run's row counts the rows stored; rows_refused the others
    assert (row["status"], row["steps"], row["episodes"]) == ("completed", 192, 12)
    assert row["rows_refused"] == len(nan_steps) + len(nan_episodes) == 16
    stored_steps = store_query(stack, "SELECT episode * 10 + step + 1 AS n FROM steps "
                                      f"WHERE run_id = '{run_id}' ORDER BY n")
    assert [r["n"] for r in stored_steps] == [n for n in range(1, 201) if n % 23]
    assert [e["episode"] for e in episodes_of(stack, run_id)] == [
        e for e in range(20) if e not in nan_episodes]
    assert store_query(stack, "SELECT count(*) AS n FROM dead_letters")[0]["n"] == 0


def test_random_acts_in_any_space_and_its_steps_are_stored_typed(stack: Stack) -> None:
    """The random agent on Dict observations holding an image and two float controls: the
    actions stored as floats, the 3,074-value observations left out per step (the recording
    API's default for large observations) and counted where `gymbus status` shows them, the
    spaces described in the run's config; q-learning is still refused for such an env."""
    code, printed, stderr = submit(stack, "--env", f"{PACKAGE}.envs:Rover", "--algo", "random",
                                   "--episodes", "6", "--seed", "4")
    assert code == 0, stderr
    run_id = printed["run_id"]
    row = stored_run(stack, run_id)
    assert (row["status"], row["steps"], row["episodes"]) == ("completed", 30, 6)
    steps = store_query(stack, "SELECT episode, step, action_vec, obs_vec, reward FROM steps "
                               f"WHERE run_id = '{run_id}' ORDER BY episode, step")
    assert [(r["episode"], r["step"]) for r in steps] == [(e, t) for e in range(6)
                                                          for t in range(5)]
    assert all(len(r["action_vec"]) == 2 and max(map(abs, r["action_vec"])) <= 1.0
               and r["obs_vec"] is None for r in steps)
    for e in range(6):  # each reward: minus the distance the episode's actions so far add up to
        moves = [r for r in steps if r["episode"] == e]
        pos = [0.0, 0.0]
        for r in moves:
            pos = [p + a for p, a in zip(pos, r["action_vec"], strict=True)]
            assert r["reward"] == pytest.approx(-(abs(pos[0]) + abs(pos[1])), abs=1e-5)
    status = gymbus_cli_json(stack.process_env(), "status", run_id)
    assert (status["obs_not_stored"], status["rows_refused"]) == (30, 0)
    config = json.loads(store_query(stack, f"SELECT config FROM runs WHERE run_id = "
                                           f"'{run_id}'")[0]["config"])
    spaces = config["spaces"]["env"]
    assert (spaces["action"]["type"], spaces["action"]["dtype"]) == ("Box", "float32")
    assert spaces["observation"]["stored"] is False
    refused = gymbus_cli(stack.process_env(), "submit", "--env", f"{PACKAGE}.envs:Rover",
                         "--algo", "dqn", "--total-steps", "100")
    assert refused.returncode == ExitCode.BAD_INPUT
    assert "dqn needs a discrete one (random acts in any)" in refused.stderr


@pytest.mark.parametrize("env_args", [
    ("--env-module", f"{PACKAGE}.register", "--env", "MyCorridor-v0"),
    ("--env", f"{PACKAGE}.register:MyCorridor-v0"),  # Gymnasium's own module:EnvId form
], ids=["env-module", "module-colon-id"])
def test_an_id_registered_by_a_module_trains(stack: Stack, env_args: tuple[str, ...]) -> None:
    code, printed, stderr = submit(stack, *env_args, "--algo", "q-learning", "--episodes", "15")
    assert code == 0, stderr
    assert printed["status"] == "completed"
    run_id = printed["run_id"]
    row = stored_run(stack, run_id)
    assert row["episodes"] == 15 and row["steps"] > 0
    steps = store_query(stack, f"SELECT count(*) AS n FROM steps WHERE run_id = '{run_id}'")
    assert steps[0]["n"] == row["steps"] == sum(e["length"] for e in episodes_of(stack, run_id))
    assert all(e["length"] <= 50 for e in episodes_of(stack, run_id))  # the registered limit


@pytest.mark.parametrize(("env_args", "message"), [
    (("--env", "no_such_pkg.envs:GridEnv"), "env: no module named 'no_such_pkg'"),
    (("--env", f"{PACKAGE}.nothing:GridEnv"), f"env: no module named '{PACKAGE}.nothing'"),
    (("--env", f"{PACKAGE}.envs:NoSuchEnv"), f"env: {PACKAGE}.envs has no attribute NoSuchEnv"),
    (("--env", "Zzyzx-v0"),
     ("env: 'Zzyzx-v0' is not a registered environment (register it in a module named "
      "with --env-module)")),
    (("--env-module", f"{PACKAGE}.register", "--env", "MyCorridr-v0"),
     "env: 'MyCorridr-v0' is not a registered environment (did you mean 'MyCorridor-v0'?"),
    (("--env-module", "no_such_module", "--env", "FrozenLake-v1"),
     "env_module: no module named 'no_such_module'"),
], ids=["module", "submodule", "attribute", "id", "id-near-a-registered-one", "env-module"])
def test_a_wrong_module_attribute_or_id_is_refused_at_submit(
    stack: Stack, env_args: tuple[str, ...], message: str,
) -> None:
    before = [run["run_id"] for run in gymbus_cli_json(stack.process_env(), "runs")]
    result = gymbus_cli(stack.process_env(), "submit", *env_args, "--algo", "q-learning",
                        "--episodes", "5")
    assert result.returncode == ExitCode.BAD_INPUT, result.stderr
    assert message in result.stderr
    after = [run["run_id"] for run in gymbus_cli_json(stack.process_env(), "runs")]
    assert after == before  # nothing stored


def test_an_id_a_module_registered_needs_that_module_named(stack: Stack) -> None:
    """The controller's process keeps the ids one submit's module registered; a config that
    names no module is refused for them, as its worker could not make the environment."""
    code, printed, stderr = submit(stack, "--env-module", f"{PACKAGE}.register", "--env",
                                   "MyCorridor-v0", "--algo", "q-learning", "--episodes", "1")
    assert code == 0 and printed["status"] == "completed", stderr
    result = gymbus_cli(stack.process_env(), "submit", "--env", "MyCorridor-v0", "--algo",
                        "q-learning", "--episodes", "1")
    assert result.returncode == ExitCode.BAD_INPUT, result.stderr
    assert ("env: 'MyCorridor-v0' is registered by a module this run does not import: name it "
            "with --env-module") in result.stderr


@pytest.mark.parametrize("worker_limit", [None, 8 << 20], ids=["same", "worker-higher"])
def test_large_observations_travel_in_frames_under_a_lowered_frame_limit(
        tmp_path: Path, worker_limit: int | None) -> None:
    """With GYMBUS_MAX_FRAME_BYTES at 256 KiB for the services, a built-in run's frames of
    12 KiB observations stay under it (10 steps a frame), also when its worker was started
    with a higher limit (the broker's comes with the dispatch): every step is stored with its
    values, nothing is refused or goes to the dead letters."""
    limit = 256 * 1024
    with make_stack(tmp_path / "home", **STACK_ENV, PYTHONPATH=with_package(tmp_path),
                    GYMBUS_MAX_FRAME_BYTES=str(limit)) as small:
        if worker_limit is None:
            small.start()
        else:
            roles = tuple(r for r in SERVICES if r != "worker")
            for role in roles:
                small.start_one(role)
            small.start_one("worker", {"GYMBUS_MAX_FRAME_BYTES": str(worker_limit)})
            small.wait_ready((*roles, "worker"), 30.0)
        code, printed, stderr = submit(
            small, "--env", f"{PACKAGE}.envs:Wide", "--algo", "random", "--episodes", "30",
            "--max-episode-steps", "7")
        assert code == 0, (stderr, printed)
        run_id = printed["run_id"]
        row = stored_run(small, run_id)
        assert (row["status"], row["steps"], row["episodes"]) == ("completed", 210, 30)
        stored = store_query(small, "SELECT step, obs_vec[1] AS first, len(obs_vec) AS n "
                                    f"FROM steps WHERE run_id = '{run_id}'")
        assert sorted((r["step"], r["first"], r["n"]) for r in stored) == sorted(
            (t, float(t + 1), 3072) for _ in range(30) for t in range(7))
        frames = store_query(small, "SELECT max(rows) AS most, count(*) AS n FROM frames "
                                    f"WHERE run_id = '{run_id}' AND kind = 'step'")[0]
        assert (frames["most"], frames["n"]) == (10, 21)  # 128 KiB of observations a frame
        assert store_query(small, "SELECT count(*) AS n FROM dead_letters")[0]["n"] == 0
