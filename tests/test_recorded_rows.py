"""The single-env wrapper's buffer (api/recorder.py `Steps`) against the loop's own log.

The wrapper buffers one column per value and only where each episode's rows begin; the episode,
step, terminated and truncated columns are made from those when a frame is sent. A scripted
loop keeps its own log of every step it takes (episode by the order of its resets, step within
it, flags) and crosses every boundary: frames of a few rows, resets in mid-episode, steps past
an episode's end without a reset, a sampled run, observations that are views not in C order,
of another dtype, and named info keys. Frames are encoded and decoded as the ingest sees them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from gymbus.recorder import Recorder, StepPolicy
from gymbus.recording import RecordedEnv
from gymbus.session import Run
from gymbus.shared import settings as settings_mod
from gymbus.shared.codec import decode_frame, encode_frame
from gymbus.shared.protocol import FrameKind
from gymbus.spaces import layout
from gymbus.worker.telemetry.columns import FRAME_VALUE_BYTES


class Scripted(gym.Env[Any, Any]):
    """Box observations of 3 float32 (some steps: a strided view, or float64), episodes that
    end by termination or truncation at lengths drawn from the seed, reward = step number."""

    def __init__(self, continuous: bool) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        self.action_space = (gym.spaces.Box(-1, 1, (2,), np.float32) if continuous
                             else gym.spaces.Discrete(3))
        self.rng = np.random.default_rng(0)
        self.t = 0
        self.length = 5

    def _obs(self) -> Any:
        base = np.arange(6, dtype=np.float32) + 10 * self.t
        kind = self.t % 4
        if kind == 1:
            return base[::2]  # a view, not in C order of its own
        if kind == 2:
            return base[:3].astype(np.float64)  # another dtype than the space's
        return base[:3].copy()

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        self.t = 0
        self.length = int(self.rng.integers(1, 9))
        return self._obs(), {"level": self.length}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        self.t += 1
        end = self.t >= self.length
        terminated = end and self.length % 2 == 0
        return self._obs(), float(self.t), terminated, end and not terminated, {"t": self.t}


def run_loop(every: int, max_rows: int, continuous: bool, info: bool
             ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[Any], list[Any]]:
    """(step rows, episode rows) decoded from the frames, and the loop's own (expected) ones."""
    frames: list[Any] = []

    def send(kind: FrameKind, body: dict[str, Any], rows: int) -> None:
        frames.append(decode_frame(list(encode_frame(kind, "r", len(frames), body))))

    recorder = Recorder(send)
    raw = Scripted(continuous)
    env = RecordedEnv(raw, recorder, lambda e: e % every == 0,
                      layout(raw.observation_space), layout(raw.action_space, "action"),
                      ("t",) if info else ())
    env._steps.max_rows = max_rows
    raw.action_space.seed(3)
    want_steps: list[tuple[Any, ...]] = []
    want_episodes: list[tuple[Any, ...]] = []
    episode, t, ret, ended = -1, 0, 0.0, True

    def close(terminated: bool, truncated: bool) -> None:
        want_episodes.append((episode, ret, t, terminated, truncated))

    for i in range(600):
        if i % 97 == 50 and t:  # a reset in mid-episode cuts it short
            close(False, False)
            ended = True
        if ended and i % 41 != 7:  # ... and now and then, a step past the end without reset
            env.reset()
            episode, t, ret, ended = episode + 1, 0, 0.0, False
        elif ended:
            episode, t, ret, ended = episode + 1, 0, 0.0, False
        action = raw.action_space.sample()
        obs, reward, terminated, truncated, step_info = env.step(action)
        if episode % every == 0:
            want_steps.append((episode, t, np.asarray(action).tolist(),
                               np.asarray(obs, np.float32).tolist(), reward, terminated,
                               truncated, f'{{"t": {step_info["t"]}}}' if info else None))
        t, ret = t + 1, ret + reward
        if terminated or truncated:
            close(terminated, truncated)
            ended = True
    env.finish()
    recorder.flush()
    if t and not ended:
        close(False, False)
    steps: list[tuple[Any, ...]] = []
    episodes: list[tuple[Any, ...]] = []
    for frame in frames:
        body = frame.body
        assert frame.kind is not FrameKind.STEP or frame.rows <= max_rows
        for r in range(frame.rows):
            if frame.kind is FrameKind.STEP:
                steps.append((int(body["episode"][r]), int(body["step"][r]),
                              np.asarray(body["action"][r]).tolist(),
                              np.asarray(body["obs"][r]).tolist(), float(body["reward"][r]),
                              bool(body["terminated"][r]), bool(body["truncated"][r]),
                              body["info"][r] if info else None))
            elif frame.kind is FrameKind.EPISODE:
                episodes.append((int(body["episode"][r]), float(body["return"][r]),
                                 int(body["length"][r]), bool(body["terminated"][r]),
                                 bool(body["truncated"][r])))
    return steps, sorted(episodes), want_steps, want_episodes


@pytest.mark.parametrize(("every", "max_rows", "continuous", "info"), [
    (1, 7, False, False), (1, 1, True, False), (3, 5, False, True), (1, 1024, True, True)])
def test_every_row_is_the_step_the_loop_took(every: int, max_rows: int, continuous: bool,
                                             info: bool) -> None:
    steps, episodes, want_steps, want_episodes = run_loop(every, max_rows, continuous, info)
    assert len(want_steps) > 150
    assert steps == want_steps
    assert episodes == sorted(want_episodes)
    # every kind of boundary was crossed: cut short, terminated, truncated
    assert {(e[3], e[4]) for e in want_episodes} == {(False, False), (True, False), (False, True)}


def episode_columns(policy: Any, seeded: bool) -> dict[str, list[Any]]:
    """Every episode column the recorder sent for `run_loop`'s kind of loop (its resets,
    seeded or not, cuts and steps past an episode's end), as lists, with each episode's global
    step; ts_ns left out."""
    columns: dict[str, list[Any]] = {}

    def send(kind: FrameKind, body: dict[str, Any], rows: int) -> None:
        if kind is FrameKind.EPISODE:
            frame = decode_frame(list(encode_frame(kind, "r", 0, body)))
            for name, values in frame.body.items():
                if name != "ts_ns":
                    columns.setdefault(name, []).extend(np.asarray(values).tolist())

    def on_episodes(batch: dict[str, Any]) -> None:  # as the run's TensorBoard curves get it
        columns.setdefault("global_step", []).extend(batch["global_step"].tolist())

    recorder = Recorder(send, on_episodes=on_episodes)
    raw = Scripted(False)
    env = RecordedEnv(raw, recorder, policy, layout(raw.observation_space),
                      layout(raw.action_space, "action"), ("level",), env_index=2)
    ended = True
    for i in range(600):
        if i % 97 == 50:
            env.reset(seed=i if seeded else None)
            ended = False
        elif ended and i % 41 != 7:
            env.reset(seed=i if seeded else None)
        _, _, terminated, truncated, _ = env.step(i % 3)
        ended = terminated or truncated
    env.finish()  # type: ignore[attr-defined]
    recorder.flush()
    return columns


@pytest.mark.parametrize("seeded", [False, True])
def test_fast_mode_records_the_episodes_full_mode_records(seeded: bool) -> None:
    """Fast mode's step closure is its own (no step rows, no policy per episode): its episode
    rows hold what full mode's do, ids, returns, flags, global steps and reset values."""
    full = episode_columns(StepPolicy(1), seeded)
    fast = episode_columns(StepPolicy(0), seeded)
    assert len(full["episode"]) > 80
    assert fast == full
    assert max(full["global_step"]) == 600 and len(set(full["global_step"])) == len(full["episode"])
    assert set(full["env_index"]) == {2}
    # cut short by a reset, and stepped past an end without one: no reset values
    assert {(t, u) for t, u in zip(full["terminated"], full["truncated"])} == {
        (False, False), (True, False), (False, True)}
    assert ("seed" in full) == seeded


def test_a_frame_is_sent_when_its_first_row_has_waited() -> None:
    """No clock per step: the buffer looks at the clock at rows 1, 2, 4, ...; a slow env's rows
    go out at most about twice FLUSH_INTERVAL after the first of them."""
    now = [0.0]
    sent: list[int] = []
    recorder = Recorder(lambda kind, body, rows: sent.append(rows) if kind is FrameKind.STEP
                        else None, clock=lambda: now[0])
    raw = gym.make("CartPole-v1")
    env = RecordedEnv(raw, recorder, lambda e: True, layout(raw.observation_space),
                      layout(raw.action_space, "action"))
    env.reset(seed=1)
    raw.action_space.seed(1)
    for _ in range(40):  # a step every 30 ms
        _, _, terminated, truncated, _ = env.step(raw.action_space.sample())
        if terminated or truncated:
            env.reset()
        now[0] += 0.03
    assert sent and all(rows <= 8 for rows in sent)
    assert sum(sent) + len(env._steps) == 40


def test_frames_of_large_observations_stay_under_a_lowered_limit() -> None:
    """Stored 32x32x3 images (3 KiB a step) under a 256 KiB frame limit: step frames of 42
    rows and episode frames of as many reset observations, every frame under the limit."""
    limit = 256 * 1024
    sizes: dict[FrameKind, list[tuple[int, int]]] = {FrameKind.STEP: [], FrameKind.EPISODE: []}

    def send(kind: FrameKind, body: dict[str, Any], rows: int) -> None:
        if kind in sizes:
            sizes[kind].append((rows, sum(map(len, encode_frame(kind, "r", 0, body)))))

    class Images(gym.Env[Any, Any]):
        observation_space = gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed: int | None = None,
                  options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
            return self.observation_space.sample(), {}

        def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
            return self.observation_space.sample(), 1.0, True, False, {}  # one-step episodes

    recorder = Recorder(send, max_frame_bytes=limit, clock=lambda: 0.0)  # flushed by rows
    raw = Images()
    env = RecordedEnv(raw, recorder, lambda e: True, layout(raw.observation_space, store_large=True),
                      layout(raw.action_space, "action"))
    for _ in range(100):
        env.reset()
        env.step(0)
    recorder.flush()
    fit = limit // 2 // (32 * 32 * 3 + 8)
    for kind, frames in sizes.items():
        assert [rows for rows, _ in frames] == [fit, fit, 100 - 2 * fit], kind
        assert max(size for _, size in frames) < limit


def test_a_run_sizes_its_frames_by_the_frame_limit_setting(tmp_path: Path) -> None:
    """`gymbus.run()` hands GYMBUS_MAX_FRAME_BYTES, which the services keep, to its buffers."""
    settings = settings_mod.load({"GYMBUS_HOME": str(tmp_path),
                                  "GYMBUS_MAX_FRAME_BYTES": str(256 * 1024)})
    assert Run(settings=settings).recorder.value_bytes == 128 * 1024
    assert Run(settings=settings_mod.load({"GYMBUS_HOME": str(tmp_path)})).recorder.value_bytes \
        == FRAME_VALUE_BYTES


class NonFinite(gym.Env[Any, Any]):
    """CartPole-shaped steps where every 7th observation holds a NaN or an inf and every 43rd
    reward is NaN; 20-step episodes."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self) -> None:
        self.t = self.n = 0

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        self.t = 0
        return np.zeros(4, np.float32), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        self.t += 1
        self.n += 1
        obs = np.full(4, self.n, np.float32)
        if self.n % 7 == 0:
            obs[self.n % 4] = np.nan if self.n % 2 else np.inf
        reward = float("nan") if self.n % 43 == 0 else 1.0
        return obs, reward, False, self.t == 20, {}


@pytest.mark.parametrize("vector", [False, True])
def test_rows_with_nan_or_inf_are_refused_and_counted_and_the_rest_stored(vector: bool) -> None:
    steps: list[int] = []
    returns: list[float] = []

    def send(kind: FrameKind, body: dict[str, Any], rows: int) -> None:
        frame = decode_frame(list(encode_frame(kind, "r", 0, body)))
        if frame.kind is FrameKind.EPISODE:
            returns.extend(np.asarray(frame.body["return"], np.float64).tolist())
        if frame.kind is FrameKind.STEP:
            assert np.isfinite(np.asarray(frame.body["obs"], np.float64)).all()
            assert np.isfinite(np.asarray(frame.body["reward"], np.float64)).all()
            steps.extend(int(v) for v in np.asarray(frame.body["obs"])[:, 0])

    recorder = Recorder(send)
    obs, action = layout(NonFinite.observation_space), layout(NonFinite.action_space, "action")
    if vector:
        from gymnasium.vector import SyncVectorEnv

        from gymbus.vector import RecordedVectorEnv

        envs = RecordedVectorEnv(SyncVectorEnv([NonFinite]), recorder, lambda e: True, obs,
                                 action)
        envs.reset(seed=0)
        for _ in range(1000):  # NEXT_STEP: every 21st call is a reset row, not a step
            envs.step(np.zeros(1, np.int64))
        envs.finish()
        stepped = 1000 - 1000 // 21
    else:
        env = RecordedEnv(NonFinite(), recorder, lambda e: True, obs, action)
        env.reset(seed=0)
        for n in range(1, 1001):
            env.step(0)
            if n % 20 == 0:
                env.reset()
        env.finish()  # type: ignore[attr-defined]
        stepped = 1000
    recorder.flush()
    # the env's own counter numbers its steps (NonFinite.n); a reset row took no step
    numbered = list(range(1, stepped + 1))
    bad = [n for n in numbered if n % 7 == 0 or n % 43 == 0]
    # an episode with a NaN reward has a NaN return: its row is refused and counted too
    nan_returns = sum(any(n % 43 == 0 for n in numbered[i:i + 20])
                      for i in range(0, len(numbered), 20))
    assert recorder.refused == len(bad) + nan_returns and len(bad) > 100
    assert 0 < len(returns) == recorder.episode_count - nan_returns
    assert all(np.isfinite(returns))
    assert steps == sorted(set(numbered) - set(bad))  # each kept step once, in order
    assert recorder.steps == len(numbered) - len(bad)


class NanResets(NonFinite):
    """NonFinite's steps, and a NaN in every third reset observation."""

    def __init__(self) -> None:
        super().__init__()
        self.resets = 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = super().reset(**kwargs)
        self.resets += 1
        if self.resets % 3 == 0:
            obs[0] = np.nan
        return obs, info


@pytest.mark.parametrize("fast", [False, True])
def test_an_episode_whose_reset_observation_holds_a_nan_is_refused_not_its_frame(
        fast: bool) -> None:
    """The reset observation travels in the episode row: one NaN there would make the ingest
    refuse the whole episode frame. The row is refused and counted; the others are stored."""
    episodes: list[int] = []

    def send(kind: FrameKind, body: dict[str, Any], rows: int) -> None:
        frame = decode_frame(list(encode_frame(kind, "r", 0, body)))  # as the ingest decodes
        if frame.kind is FrameKind.EPISODE:
            episodes.extend(np.asarray(frame.body["episode"]).tolist())

    recorder = Recorder(send)
    raw = NanResets()
    env = RecordedEnv(raw, recorder, StepPolicy(0 if fast else 1),
                      layout(raw.observation_space), layout(raw.action_space, "action"))
    for _ in range(30):  # episodes 0..29, reset 1..30: every third one's observation is NaN
        env.reset()
        for _ in range(5):
            env.step(0)
    env.finish()  # type: ignore[attr-defined]  # (each episode is cut short by the next reset)
    recorder.flush()
    # steps 1..150 (NonFinite.n): every 7th observation and 43rd reward are NaN or inf
    bad_steps = [n for n in range(1, 151) if n % 7 == 0 or n % 43 == 0]
    nan_returns = {(n - 1) // 5 for n in range(1, 151) if n % 43 == 0}  # episodes 8, 17, 25
    nan_resets = {e for e in range(30) if (e + 1) % 3 == 0}
    assert sorted(episodes) == [e for e in range(30) if e not in nan_resets | nan_returns]
    assert recorder.steps == (0 if fast else 150 - len(bad_steps))
    assert recorder.refused == (0 if fast else len(bad_steps)) + len(nan_resets | nan_returns)
