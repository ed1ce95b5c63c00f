"""The vector wrapper's block path (api/vector_block.py) against its call-by-call path.

Both record the same seeded loop into a Recorder whose frames are encoded and decoded as the
ingest would see them; every step row and every episode row must be the same, for both
autoreset modes, for Discrete, Box and Dict observations and pixels not stored, with every
episode recorded and with only some (a sampled run), across block boundaries and explicit
resets.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from gymbus import vector_block
from gymbus.recorder import Recorder, StepPolicy
from gymbus.shared.codec import decode_frame, encode_frame
from gymbus.shared.protocol import MAX_FRAME_BYTES, FrameKind
from gymbus.spaces import layout
from gymbus.vector import RecordedVectorEnv
from gymbus.vector_block import Block


class DictObs(gym.ObservationWrapper[Any, Any, Any]):
    """CartPole's observation as a Dict of two Boxes."""

    def __init__(self, env: gym.Env[Any, Any]) -> None:
        super().__init__(env)
        box = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.observation_space = gym.spaces.Dict({"pos": box, "vel": box})

    def observation(self, obs: Any) -> Any:
        return {"pos": obs[[0, 2]], "vel": obs[[1, 3]]}


class Multi(gym.Env[Any, Any]):
    """MultiBinary observations and MultiDiscrete actions; an episode ends when the action's
    first part is 0 twice in a row, or at 15 steps."""

    observation_space = gym.spaces.MultiBinary(5)
    action_space = gym.spaces.MultiDiscrete([3, 4])

    def __init__(self) -> None:
        self.t, self.last = 0, -1

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        self.t, self.last = 0, -1
        return self.np_random.integers(0, 2, 5, dtype=np.int8), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        self.t += 1
        terminated = self.last == action[0] == 0
        self.last = int(action[0])
        obs = self.np_random.integers(0, 2, 5, dtype=np.int8)
        return obs, float(action[1]) - 1.5, terminated, self.t >= 15, {}


class Pixels(gym.ObservationWrapper[Any, Any, Any]):
    """CartPole seen as a 33x33 grey image: more values than a step stores by default."""

    def __init__(self, env: gym.Env[Any, Any]) -> None:
        super().__init__(env)
        self.observation_space = gym.spaces.Box(0, 255, (33, 33, 1), np.uint8)

    def observation(self, obs: Any) -> Any:
        image = np.zeros((33, 33, 1), np.uint8)
        image[16 + int(np.clip(obs[0] * 3, -16, 16)), :, 0] = 255
        return image


ENVS = {
    "multi": Multi,
    "pixels": lambda: Pixels(gym.make("CartPole-v1")),
    "cartpole": lambda: gym.make("CartPole-v1"),
    "frozenlake": lambda: gym.make("FrozenLake-v1", max_episode_steps=12),
    "dict": lambda: DictObs(gym.make("CartPole-v1")),
}


def collecting() -> tuple[Recorder, list[Any]]:
    """A Recorder whose frames are encoded and decoded, as the ingest would see them, into the
    list returned with it."""
    frames: list[Any] = []

    def send(kind: FrameKind, body: dict[str, Any], rows: int) -> None:
        frames.append(decode_frame(list(encode_frame(kind, "r", len(frames), body))))

    return Recorder(send), frames


class Unusual(gym.vector.VectorWrapper):
    """A vector env's values in the other forms a loop may meet, call by call: observations
    of float64 (the space's are float32) or not in C order, float32 rewards, flags as lists."""

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        self.calls = 0

    def step(self, actions: Any) -> Any:
        obs, rewards, terminated, truncated, infos = self.env.step(actions)
        self.calls += 1
        kind = self.calls % 5
        if kind == 1:
            obs = obs.astype(np.float64)
        elif kind == 2:
            obs = np.asfortranarray(obs)
        elif kind == 3:
            rewards = rewards.astype(np.float32)
        elif kind == 4:
            terminated, truncated = terminated.tolist(), truncated.tolist()
        return obs, rewards, terminated, truncated, infos


def unusual_actions(actions: Any, call: int) -> Any:
    """The loop's actions as a list, of int32, or a view not in C order, call by call."""
    kind = call % 4
    if kind == 1:
        return actions.tolist()
    if kind == 2:
        return actions.astype(np.int32)
    if kind == 3:
        return np.stack([actions, actions], axis=1)[:, 0]
    return actions


def record(make: Any, mode: AutoresetMode, blocks: bool, every: int, calls: int = 700,
           vector: Any = SyncVectorEnv, unusual: bool = False
           ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Step rows and episode rows of a seeded random loop, as decoded frames hold them."""
    recorder, frames = collecting()
    envs = vector([make] * 3, autoreset_mode=mode)
    if unusual:
        envs = Unusual(envs)
    wrapped = RecordedVectorEnv(envs, recorder, StepPolicy(every),  # the run's policy
                                layout(envs.single_observation_space),
                                layout(envs.single_action_space, "action"), blocks=blocks)
    wrapped.reset(seed=5)
    envs.action_space.seed(5)
    for call in range(calls):
        actions = envs.action_space.sample()
        wrapped.step(unusual_actions(actions, call) if unusual else actions)
        if call == 400:  # an explicit reset mid-run cuts every episode under way
            wrapped.reset(seed=9)
    wrapped.finish()
    wrapped.close()
    recorder.flush()
    return rows_of(frames)


def rows_of(frames: list[Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The step rows and episode rows that decoded frames hold, each sorted."""
    steps: list[tuple[Any, ...]] = []
    episodes: list[tuple[Any, ...]] = []
    for frame in frames:
        body = frame.body
        if frame.kind is FrameKind.STEP:
            obs = body.get("obs")
            for r in range(frame.rows):
                steps.append((int(body["episode"][r]), int(body["step"][r]),
                              int(body["env_index"][r]), np.asarray(body["action"][r]).tolist(),
                              None if obs is None else np.asarray(obs[r]).tolist(),
                              float(body["reward"][r]),
                              bool(body["terminated"][r]), bool(body["truncated"][r])))
        elif frame.kind is FrameKind.EPISODE:
            reset_obs, seed = body.get("reset_obs"), body.get("seed")
            for r in range(frame.rows):
                episodes.append((int(body["episode"][r]), float(body["return"][r]),
                                 int(body["length"][r]), bool(body["terminated"][r]),
                                 bool(body["truncated"][r]), int(body["env_index"][r]),
                                 None if reset_obs is None else
                                 np.asarray(reset_obs[r]).tolist(),
                                 None if seed is None else int(seed[r])))
    return sorted(steps), sorted(episodes)


@pytest.mark.parametrize("env", sorted(ENVS))
@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
@pytest.mark.parametrize("every", [1, 3, 0])  # 0: fast mode, no step recorded
def test_blocks_record_what_call_by_call_recording_does(env: str, mode: AutoresetMode,
                                                        every: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vector_block, "BLOCK_VALUES", 96)  # 32 calls a block: many blocks
    steps, episodes = record(ENVS[env], mode, True, every)
    expected_steps, expected_episodes = record(ENVS[env], mode, False, every)
    assert len(episodes) > 20  # many episodes, several blocks
    assert len(steps) > 100 if every else steps == []
    # the seeded resets' episodes (3 sub-envs, reset at the start and at call 400) keep seeds
    assert sorted(e[-1] for e in episodes if e[-1] is not None) == [5, 6, 7, 9, 10, 11]
    assert episodes == expected_episodes
    assert steps == expected_steps
    # each recorded episode's step rows number its length, indices 0..length-1
    for episode, _, length, *_ in episodes:
        mine = [s[1] for s in steps if s[0] == episode]
        assert mine in ([], list(range(length)))


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_values_of_other_dtypes_layouts_and_types_record_the_same_rows(
        mode: AutoresetMode, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block's common call appends an array's bytes as they are; every other form (float64
    observations for a float32 space, arrays not in C order, float32 rewards, flags and actions
    as lists, int32 actions) is converted, in the same block: the same rows as plain arrays."""
    monkeypatch.setattr(vector_block, "BLOCK_VALUES", 96)
    steps, episodes = record(ENVS["cartpole"], mode, True, 1, unusual=True)
    assert len(steps) > 1500 and len(episodes) > 20
    assert (steps, episodes) == record(ENVS["cartpole"], mode, True, 1)
    assert (steps, episodes) == record(ENVS["cartpole"], mode, False, 1, unusual=True)


def test_a_vector_env_whose_rewards_change_count_gets_a_clear_error() -> None:
    """A block appends the rewards' bytes unchecked per call; their count is checked for the
    block as it is taken, and a wrong one is named."""
    recorder, _ = collecting()
    envs = SyncVectorEnv([ENVS["cartpole"]] * 2)
    real_step = envs.step

    def one_reward_too_many(actions: Any) -> Any:
        obs, rewards, terminated, truncated, infos = real_step(actions)
        return obs, np.append(rewards, 0.0), terminated, truncated, infos

    envs.step = one_reward_too_many  # type: ignore[method-assign]
    wrapped = RecordedVectorEnv(envs, recorder, StepPolicy(1),
                                layout(envs.single_observation_space),
                                layout(envs.single_action_space, "action"))
    wrapped.reset(seed=0)
    wrapped.step(np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="3 rewards a call for 2 sub-environments"):
        wrapped.finish()


def test_a_call_whose_values_are_refused_leaves_the_block_as_it_was() -> None:
    """A call whose values no space takes raises in the loop, and the block keeps none of it:
    once its actions no space takes, once its observations of the wrong size (its actions
    were appended before they failed). The calls around them are recorded whole, each
    episode's steps numbered without a hole."""
    recorder, frames = collecting()
    envs = SyncVectorEnv([ENVS["multi"]] * 2)
    real_step = envs.step
    short_obs = [False]

    def step(actions: Any) -> Any:  # with actions of its own: only the block sees the loop's
        obs, *rest = real_step(envs.action_space.sample())
        return (obs[:, :3] if short_obs[0] else obs, *rest)

    envs.step = step  # type: ignore[method-assign]
    wrapped = RecordedVectorEnv(envs, recorder, StepPolicy(1),
                                layout(envs.single_observation_space),
                                layout(envs.single_action_space, "action"))
    wrapped.reset(seed=0)
    envs.action_space.seed(0)
    for call in range(40):
        if call == 20:
            with pytest.raises(ValueError):
                wrapped.step(np.zeros((2, 5), np.int64))  # five parts an action, not two
        if call == 30:
            short_obs[0] = True
            with pytest.raises(ValueError):  # three values an observation, not five
                wrapped.step(envs.action_space.sample())
            short_obs[0] = False
        wrapped.step(envs.action_space.sample())
    wrapped.finish()
    recorder.flush()
    steps, episodes = rows_of(frames)
    assert len(steps) == recorder.steps > 40 and all(len(s[3]) == 2 for s in steps)
    for episode, _, length, *_ in episodes:
        assert sorted(s[1] for s in steps if s[0] == episode) == list(range(length))


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_an_async_vector_env_records_what_a_sync_one_does(mode: AutoresetMode) -> None:
    """AsyncVectorEnv (sub-environments in processes of their own, observations through shared
    memory) through the block path: the same rows as SyncVectorEnv with the same seeds."""
    steps, episodes = record(ENVS["cartpole"], mode, True, 1, calls=500,
                             vector=gym.vector.AsyncVectorEnv)
    assert len(episodes) > 20
    assert (steps, episodes) == record(ENVS["cartpole"], mode, True, 1, calls=500)


def test_disabled_autoreset_records_the_episodes_the_loop_counts() -> None:
    """AutoresetMode.DISABLED: the loop resets the sub-envs that ended (a reset_mask); each
    sub-env's episodes are recorded as the loop itself counts them (length, return)."""
    recorder, frames = collecting()
    envs = SyncVectorEnv([ENVS["cartpole"]] * 3, autoreset_mode=AutoresetMode.DISABLED)
    wrapped = RecordedVectorEnv(envs, recorder, lambda e: True,
                                layout(envs.single_observation_space),
                                layout(envs.single_action_space, "action"))
    wrapped.reset(seed=3)
    envs.action_space.seed(3)
    counted: list[tuple[int, int, float]] = []  # (sub-env, length, return), as the loop sees
    length, ret = np.zeros(3, np.int64), np.zeros(3)
    for _ in range(600):
        _, rewards, terminated, truncated, _ = wrapped.step(envs.action_space.sample())
        length += 1
        ret += rewards
        done = terminated | truncated
        for i in np.flatnonzero(done):
            counted.append((int(i), int(length[i]), float(ret[i])))
        if done.any():
            wrapped.reset(options={"reset_mask": done})
            length[done], ret[done] = 0, 0.0
    wrapped.finish()
    recorder.flush()
    steps, episodes = rows_of(frames)
    ended = sorted((e[5], e[2], e[1]) for e in episodes if e[3] or e[4])
    assert len(counted) > 30 and ended == sorted(counted)
    # and the episodes cut short by the end of the run, with the steps taken since their reset
    assert sorted((e[5], e[2]) for e in episodes if not (e[3] or e[4])) == [
        (i, int(length[i])) for i in range(3) if length[i]]
    assert len(steps) == 600 * 3


def test_a_block_sends_when_full_and_keeps_rows_in_call_order() -> None:
    obs, action = layout(gym.spaces.Discrete(4)), layout(gym.spaces.Discrete(2), "action")
    block = Block(2, obs, action, next_step=True, size=16)
    full = [block.put(np.array([k % 2, 1]), np.array([k, k + 1]), np.ones(2),
                      np.zeros(2, bool), np.zeros(2, bool), None) for k in range(16)]
    assert full == [False] * 15 + [True]
    assert block.size == 16 and block.k == 16


@pytest.mark.parametrize("limit", [MAX_FRAME_BYTES, 1024 * 1024])
def test_a_block_of_large_observations_is_a_frame_under_the_limit(limit: int) -> None:
    """Stored pixels: a block holds as many calls as fit in one frame (of the protocol's
    limit, or a lower GYMBUS_MAX_FRAME_BYTES), not BLOCK_VALUES; a block whose reset rows left
    it short of a frame is not merged with the next one."""
    sizes: list[int] = []

    def send(kind: FrameKind, body: dict[str, Any], rows: int) -> None:
        if kind is FrameKind.STEP:
            sizes.append(sum(len(part) for part in encode_frame(kind, "r", len(sizes), body)))

    pixels = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    frame = pixels.sample()  # one frame, at once: the block fills long before it is due

    class Frames(gym.Env[Any, Any]):
        observation_space, action_space = pixels, gym.spaces.Discrete(2)

        t = 0

        def reset(self, *, seed: int | None = None,
                  options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
            self.t = 0
            return frame, {}

        def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
            self.t += 1
            return frame, 0.0, False, self.t == 25, {}  # a reset row every 26 calls

    recorder = Recorder(send, max_frame_bytes=limit)
    envs = SyncVectorEnv([Frames] * 4)
    wrapped = RecordedVectorEnv(envs, recorder, lambda e: True,
                                layout(pixels, store_large=True),
                                layout(envs.single_action_space, "action"))
    wrapped.reset(seed=0)
    for _ in range(300):  # 1,200 rows of 12 KiB: several frames
        wrapped.step(envs.action_space.sample())
    wrapped.finish()
    recorder.flush()
    # at most half the limit of observations and actions a frame, beside a few columns
    assert len(sizes) > 1 and max(sizes) <= limit // 2 + 64 * 1024 < limit
    assert recorder.steps == 1200 - 4 * (300 // 26)  # every call's rows but the resets


class Counted(gym.Wrapper[Any, Any, Any, Any]):
    """CartPole with info {"t": steps since the reset} (0 at the reset)."""

    def __init__(self) -> None:
        super().__init__(gym.make("CartPole-v1"))
        self.t = 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self.t = 0
        obs, _ = self.env.reset(**kwargs)
        return obs, {"t": 0}

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        self.t += 1
        obs, reward, terminated, truncated, _ = self.env.step(action)
        return obs, reward, terminated, truncated, {"t": self.t}


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_a_vector_envs_named_info_keys_are_each_steps_own(mode: AutoresetMode) -> None:
    """Each step row holds its own sub-env's info, the last step of an episode too (under
    SAME_STEP from `final_info`, the returned info being the next episode's reset info); each
    episode row holds its reset's info."""
    import json

    recorder, frames = collecting()
    envs = SyncVectorEnv([Counted] * 3, autoreset_mode=mode)
    wrapped = RecordedVectorEnv(envs, recorder, lambda e: True,
                                layout(envs.single_observation_space),
                                layout(envs.single_action_space, "action"), info_keys=["t"])
    wrapped.reset(seed=2)
    envs.action_space.seed(2)
    for _ in range(300):
        wrapped.step(envs.action_space.sample())
    wrapped.finish()
    recorder.flush()
    rows = [(int(f.body["step"][r]), json.loads(f.body["info"][r]), bool(f.body["terminated"][r]
             or f.body["truncated"][r])) for f in frames if f.kind is FrameKind.STEP
            for r in range(f.rows)]
    ends = [r for r in rows if r[2]]
    assert len(rows) > 800 and len(ends) > 20
    assert all(info == {"t": step + 1} for step, info, _ in rows)
    resets = [json.loads(text) for f in frames if f.kind is FrameKind.EPISODE
              for text in f.body["reset_info"]]
    assert len(resets) > 20 and all(info == {"t": 0} for info in resets)


@pytest.mark.parametrize(("every", "recorded"), [
    (0, []), (1, list(range(10))), (3, [0, 3, 6, 9])])  # fast, full, sampled
def test_a_step_policy_answers_alike_per_episode_as_a_function_and_for_a_block(
        every: int, recorded: list[int]) -> None:
    policy = StepPolicy(every)
    ids = np.arange(10, dtype=np.int64)
    expected = [e in recorded for e in range(10)]
    assert [policy(e) for e in range(10)] == expected
    assert [policy.function()(e) for e in range(10)] == expected
    assert policy.of(ids).tolist() == expected
