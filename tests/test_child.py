"""The run child as a real subprocess, publishing to a test-owned XSUB on a loopback port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from conftest import wait_until
from test_emitter import FrameSink
from test_tensorboard import read_tensorboard

from gymbus.shared.codec import Frame
from gymbus.shared.protocol import FrameKind, LifecycleEvent
from gymbus.worker.child import CONFIG_FILE, RESULT_FILE, RunExit

BOOM_ENV = '''
import gymnasium as gym
from gymnasium import spaces

class Boom(gym.Env):
    """Fine for a few steps, then raises."""
    observation_space = spaces.Discrete(4)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return 0, {}

    def step(self, action):
        self.t += 1
        if self.t == 30:
            raise RuntimeError("the reactor melted at step 30")
        return self.t % 4, 0.0, False, False, {}

gym.register("Boom-v0", entry_point=Boom)
'''


@pytest.fixture
def sink(gymbus_env: dict[str, str]) -> Iterator[FrameSink]:
    ctx: zmq.Context[Any] = zmq.Context()
    s = FrameSink(ctx, gymbus_env["GYMBUS_TELEMETRY_IN"])
    yield s
    s.close()
    ctx.destroy(linger=0)


class ChildRun:
    """One child process; killed in the test's finalizer whatever happened."""

    def __init__(self, tmp_path: Path, env: dict[str, str], config: dict[str, Any],
                 *extra: str, run_id: str = "01RUNCHILD") -> None:
        self.run_dir = tmp_path / run_id
        self.run_dir.mkdir()
        (self.run_dir / CONFIG_FILE).write_text(json.dumps(config))
        self.run_id = run_id
        self.exited_at = 0.0  # monotonic seconds, once `wait` saw the process exit
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gymbus.worker.child", "--run-dir", str(self.run_dir),
             "--run-id", run_id, "--worker-id", "w-test", *extra],
            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )

    def wait(self, timeout: float = 20.0) -> tuple[int, str]:
        out, _ = self.process.communicate(timeout=timeout)
        self.exited_at = time.monotonic()
        return self.process.returncode, out.decode(errors="replace")

    def result(self) -> dict[str, Any]:
        return json.loads((self.run_dir / RESULT_FILE).read_text())

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
def start(tmp_path: Path, gymbus_env: dict[str, str]) -> Iterator[Any]:
    runs: list[ChildRun] = []

    def _start(config: dict[str, Any], *extra: str, env: dict[str, str] | None = None,
               run_id: str = "01RUNCHILD") -> ChildRun:
        run = ChildRun(tmp_path, {**gymbus_env, **(env or {})}, config, *extra, run_id=run_id)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        run.kill()


def check_complete(frames: list[Frame]) -> Frame:
    """Every frame of the run arrived once, in order, ending with run_completed."""
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert frames[0].kind is FrameKind.LIFECYCLE
    assert frames[0].body["event"] == LifecycleEvent.RUN_STARTED
    last = frames[-1]
    assert last.body["event"] == LifecycleEvent.RUN_COMPLETED
    assert last.body["frames_emitted"] == len(frames)
    return last


def rows(frames: list[Frame], kind: FrameKind) -> int:
    return sum(f.rows for f in frames if f.kind is kind)


def episode_lengths(frames: list[Frame]) -> int:
    return sum(int(f.body["length"].sum()) for f in frames if f.kind is FrameKind.EPISODE)


FROZEN = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 400, "seed": 3,
          "env_kwargs": {"is_slippery": False}}


def test_full_run(start: Any, sink: FrameSink) -> None:
    run = start(FROZEN)
    code, out = run.wait()
    assert code == RunExit.COMPLETED, out
    last = sink.wait_completed()
    frames = sink.drain()
    check_complete(frames)
    assert last.body["status"] == "completed" and last.body["reason"] is None
    assert last.body["episodes"] == 400
    assert rows(frames, FrameKind.STEP) == episode_lengths(frames) == last.body["steps"]
    assert rows(frames, FrameKind.EPISODE) == 400
    started = frames[0].body
    assert started["config"]["env"] == "FrozenLake-v1" and started["telemetry"] == "full"
    assert started["pid"] == run.process.pid and started["seed"] == 3
    artifact = frames[-2].body
    assert artifact["event"] == LifecycleEvent.ARTIFACT and artifact["format"] == "npy"
    table = np.load(run.run_dir / artifact["path"])
    assert artifact["path"] == "artifacts/q_table.npy"
    assert table.shape == (16, 4) and table.dtype == np.float64 and table.max() > 0
    result = run.result()
    assert result["status"] == "completed" and result["exit_code"] == 0
    assert result["frames_emitted"] == len(frames) and result["blocked_sends"] == 0
    assert result["rows"]["step"] == last.body["steps"]
    assert all(f.worker_id == "w-test" and f.run_id == run.run_id for f in frames)
    # TensorBoard: complete at run end, the last episode's point at the run's last step
    scalars = read_tensorboard(run.run_dir)
    assert {"charts/episodic_return", "charts/episodic_length", "charts/epsilon"} <= set(scalars)
    assert scalars["charts/episodic_length"][-1][0] == last.body["steps"]
    assert result["tensorboard"]["path"].startswith(str(run.run_dir))
    assert result["tensorboard"]["error"] is None and result["tensorboard"]["points"] > 0


def test_sigterm_cancels_within_two_seconds(start: Any, sink: FrameSink) -> None:
    run = start({**FROZEN, "episodes": 10_000_000})
    wait_until(lambda: any(f.kind is FrameKind.STEP for f in sink.drain()), 15, "step frames")
    sent = time.monotonic()
    run.process.send_signal(signal.SIGTERM)
    last, frames = ended(run, sink, RunExit.CANCELLED, timeout=5)
    assert run.exited_at - sent < 2.0
    assert last.body["status"] == "cancelled"
    assert rows(frames, FrameKind.STEP) == episode_lengths(frames) == last.body["steps"] > 0
    assert run.result()["status"] == "cancelled"
    # TensorBoard was flushed at the cancel: it holds the run up to its last episode
    lengths = read_tensorboard(run.run_dir)["charts/episodic_length"]
    assert lengths[-1][0] == last.body["steps"]


def test_an_env_that_blows_up_fails_the_run(start: Any, sink: FrameSink, tmp_path: Path) -> None:
    modules = tmp_path / "mods"
    modules.mkdir()
    (modules / "boom_env.py").write_text(BOOM_ENV)
    path = os.pathsep.join(filter(None, [str(modules), os.environ.get("PYTHONPATH")]))
    run = start({"env": "boom_env:Boom-v0", "algo": "random", "episodes": 5},
                env={"PYTHONPATH": path})
    code, out = run.wait()
    assert code == RunExit.FAILED
    assert "Traceback" in out and "the reactor melted" in out
    last = sink.wait_completed()
    frames = sink.drain()
    check_complete(frames)
    # the 29 steps before the crash are reported, with the partial episode's frame
    assert rows(frames, FrameKind.STEP) == episode_lengths(frames) == last.body["steps"] == 29
    assert last.body["status"] == "failed"
    assert last.body["reason"] == "RuntimeError: the reactor melted at step 30"
    result = run.result()
    assert result["status"] == "failed" and result["reason"] == last.body["reason"]
    # TensorBoard was flushed at the failure: the partial episode is there
    assert read_tensorboard(run.run_dir)["charts/episodic_length"] == [(29, 29.0)]


def test_bad_config_fails_the_run(start: Any, sink: FrameSink) -> None:
    run = start({"env": "FrozenLake-v1", "algo": "q-learning"})  # no budget
    code, _ = run.wait()
    assert code == RunExit.FAILED
    last = sink.wait_completed()
    assert last.body["status"] == "failed" and "episodes" in last.body["reason"]


@pytest.mark.parametrize("how", ["flag", "env", "config"])
def test_fast_mode_sends_no_step_frames(start: Any, sink: FrameSink, how: str) -> None:
    config = {**FROZEN, "episodes": 300}
    if how == "config":
        config["telemetry"] = "fast"
    extra = ["--no-telemetry"] if how == "flag" else []
    run = start(config, *extra, env={"DISABLE_TELEMETRY": "TRUE" if how == "env" else ""})
    code, out = run.wait()
    assert code == RunExit.COMPLETED, out
    last = sink.wait_completed()
    frames = sink.drain()
    check_complete(frames)
    assert rows(frames, FrameKind.STEP) == 0
    assert rows(frames, FrameKind.EPISODE) == 300 and rows(frames, FrameKind.METRIC) >= 300
    assert frames[0].body["telemetry"] == "fast"
    assert last.body["steps"] == episode_lengths(frames) > 0
    assert run.result()["telemetry"] == "fast"
    assert read_tensorboard(run.run_dir)["charts/episodic_return"]  # in every mode


# --- the random agent on spaces the loop's own step columns do not hold ------------------------

SPACES_ENV = '''
import gymnasium as gym
import numpy as np
from gymnasium import spaces

class Rover(gym.Env):
    """Dict observations (an image and a position), MultiDiscrete actions; 5-step episodes."""
    observation_space = spaces.Dict({
        "camera": spaces.Box(0, 255, (32, 32, 3), np.uint8),
        "pos": spaces.Box(-10.0, 10.0, (2,), np.float32)})
    action_space = spaces.MultiDiscrete([3, 4])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def _obs(self):
        return {"camera": np.full((32, 32, 3), self.t, np.uint8),
                "pos": np.array([self.t, -self.t], np.float32)}

    def step(self, action):
        self.t += 1
        return self._obs(), float(action[0] * 10 + action[1]), self.t == 5, False, {}
'''


def ended(run: ChildRun, sink: FrameSink, code: RunExit = RunExit.COMPLETED,
          timeout: float = 20.0) -> tuple[Frame, list[Frame]]:
    """A run that exits with `code` within `timeout` s: its run_completed frame and every
    frame, checked whole."""
    exit_code, out = run.wait(timeout)
    assert exit_code == code, out
    last = sink.wait_completed()
    frames = sink.drain()
    check_complete(frames)
    return last, frames


def plain_random_returns(env: Any, steps: int, seed: int) -> list[float]:
    """A user's random loop over `steps` steps: each episode's return, a last partial one too."""
    env.action_space.seed(seed)
    env.reset(seed=seed)
    returns, ret = [], 0.0
    for t in range(steps):
        _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        ret += float(reward)
        if terminated or truncated or t == steps - 1:
            returns.append(ret)
            ret = 0.0
            env.reset()
    return returns


def step_column(frames: list[Frame], name: str) -> np.ndarray:
    return np.concatenate([f.body[name] for f in frames if f.kind is FrameKind.STEP])


def episode_column(frames: list[Frame], name: str) -> np.ndarray:
    return np.concatenate([f.body[name] for f in frames if f.kind is FrameKind.EPISODE])


def test_random_on_continuous_actions_records_them_as_floats(start: Any, sink: FrameSink) -> None:
    """Pendulum-v1: float32 actions stored as floats, every step, returns as a plain loop's."""
    import gymnasium as gym

    run = start({"env": "Pendulum-v1", "algo": "random", "total_steps": 450, "seed": 5})
    last, frames = ended(run, sink)
    assert (last.body["steps"], last.body["episodes"]) == (450, 3)
    actions = step_column(frames, "action")
    assert actions.dtype.kind == "f" and actions.shape == (450, 1)
    assert np.all(np.abs(actions) <= 2.0) and len(np.unique(actions)) > 400
    assert step_column(frames, "obs").shape == (450, 3)
    assert sorted(episode_column(frames, "length").tolist()) == [50, 200, 200]
    order = np.argsort(episode_column(frames, "episode"))
    assert episode_column(frames, "return")[order].tolist() == pytest.approx(
        plain_random_returns(gym.make("Pendulum-v1"), 450, 5))
    spaces = frames[0].body["config"]["spaces"]["env"]
    assert spaces["action"]["type"] == "Box" and spaces["action"]["dtype"] == "float32"
    scalars = read_tensorboard(run.run_dir)
    assert [s for s, _ in scalars["charts/episodic_length"]] == [200, 400, 450]


def rover_path(tmp_path: Path) -> str:
    """A PYTHONPATH that finds SPACES_ENV as `rover_env`."""
    modules = tmp_path / "mods"
    modules.mkdir(exist_ok=True)
    (modules / "rover_env.py").write_text(SPACES_ENV)
    return os.pathsep.join(filter(None, [str(modules), os.environ.get("PYTHONPATH")]))


@pytest.mark.parametrize("telemetry", ["full", "fast", "sampled"])
def test_random_on_dict_images_and_multidiscrete(start: Any, sink: FrameSink, tmp_path: Path,
                                                 telemetry: str) -> None:
    """A Dict observation holding an image (3,072 values: not stored per step by default, and
    counted) and MultiDiscrete actions (stored as integers); fast mode stores no step, sampled
    mode (every 3rd episode) the steps of episodes 0, 3 and 6."""
    config = {"env": "rover_env:Rover", "algo": "random", "episodes": 8, "seed": 2,
              "telemetry": telemetry, **({"every": 3} if telemetry == "sampled" else {})}
    last, frames = ended(start(config, env={"PYTHONPATH": rover_path(tmp_path)}), sink)
    assert (last.body["steps"], last.body["episodes"]) == (40, 8)
    assert episode_column(frames, "length").tolist() == [5] * 8
    if telemetry == "fast":
        assert rows(frames, FrameKind.STEP) == 0 and last.body["obs_not_stored"] == 0
        return
    if telemetry == "sampled":
        assert sorted(set(step_column(frames, "episode").tolist())) == [0, 3, 6]
        assert rows(frames, FrameKind.STEP) == last.body["obs_not_stored"] == 15
        return
    actions = step_column(frames, "action")
    assert actions.shape == (40, 2) and np.array_equal(actions, np.round(actions))
    assert frames[0].body["config"]["spaces"]["env"]["action"]["type"] == "MultiDiscrete"
    assert actions[:, 0].max() <= 2 and actions[:, 1].max() <= 3
    assert all("obs" not in f.body for f in frames if f.kind is FrameKind.STEP)
    assert last.body["obs_not_stored"] == 40
    rewards = step_column(frames, "reward")
    assert rewards.tolist() == (actions[:, 0] * 10 + actions[:, 1]).astype(float).tolist()


def test_a_cancelled_or_failing_random_run_on_float_actions_keeps_its_steps_whole(
        start: Any, sink: FrameSink, tmp_path: Path) -> None:
    """SIGTERM amid a random Pendulum-v1 run: cancelled, and its step rows (the last episode's
    cut short) add up to the episode rows' lengths and the run's step count. An env that raises
    at its 13th step on the same path: failed, its 12 steps and their episode stored."""
    run = start({"env": "Pendulum-v1", "algo": "random", "total_steps": 10_000_000})
    wait_until(lambda: any(f.kind is FrameKind.STEP for f in sink.drain()), 15, "step frames")
    run.process.send_signal(signal.SIGTERM)
    last, frames = ended(run, sink, RunExit.CANCELLED, timeout=5)
    assert last.body["status"] == "cancelled"
    assert rows(frames, FrameKind.STEP) == episode_lengths(frames) == last.body["steps"] > 0
    lengths = episode_column(frames, "length").tolist()  # 200-step episodes, the last cut
    assert set(lengths[:-1]) <= {200} and 1 <= lengths[-1] <= 200
    assert len(lengths) == last.body["episodes"] == -(-last.body["steps"] // 200)

    failing = SPACES_ENV + '''

class Breaks(Rover):
    n = 0

    def step(self, action):
        self.n += 1
        if self.n == 13:
            raise RuntimeError("the rover fell over")
        return super().step(action)
'''
    (tmp_path / "mods").mkdir(exist_ok=True)
    (tmp_path / "mods" / "rover_env.py").write_text(failing)
    path = os.pathsep.join(filter(None, [str(tmp_path / "mods"), os.environ.get("PYTHONPATH")]))
    broken = start({"env": "rover_env:Breaks", "algo": "random", "episodes": 5},
                   env={"PYTHONPATH": path}, run_id="01RUNCHILD2")
    code, out = broken.wait()
    assert code == RunExit.FAILED and "the rover fell over" in out
    last = sink.wait_completed("01RUNCHILD2")
    mine = [f for f in sink.drain() if f.run_id == "01RUNCHILD2"]
    check_complete(mine)
    assert last.body["reason"] == "RuntimeError: the rover fell over"
    # two episodes of 5 steps, then the third's 2 steps until the 13th step raised
    assert rows(mine, FrameKind.STEP) == episode_lengths(mine) == last.body["steps"] == 12
    assert episode_column(mine, "length").tolist() == [5, 5, 2]
