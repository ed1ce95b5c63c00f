"""`run.record(env)` for one environment: a Gymnasium wrapper that records every step.

The wrapper changes nothing the training loop sees: `step` and `reset` return what the wrapped
environment returned. `step` is a closure bound per wrapper (not a method), appending the step's
action, observation and reward to the buffer's columns (an array's own bytes onto a bytearray):
no tuple, no dict, no clock, no encoding per step (`gymbus.recorder` makes the frames). An
episode is recorded from its `reset`: the reset observation and (the named keys of) the reset
info go into its episode row, so that a stored episode has its N+1 observations, and so does
the seed it was reset with, if any. In fast mode the closure stores no step: it adds to the
episode's length and return, and an episode's end appends its row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from gymbus.recorder import Recorder, StepPolicy, info_json, per_episode
from gymbus.spaces import Layout


class RecordedEnv(gym.Wrapper[Any, Any, Any, Any]):
    """Records every step and episode of `env` into a run (made by `Run.record`)."""

    # the env's spaces as plain attributes, not the Wrapper's properties: a loop that samples
    # its actions reads `action_space` every step (~75 ns through the property, ~29 as an
    # attribute, timeit); set per instance, and assignable as the properties are
    action_space: Any = None
    observation_space: Any = None

    def __init__(self, env: gym.Env[Any, Any], recorder: Recorder, policy: Callable[[int], bool],
                 obs: Layout, action: Layout, info_keys: Sequence[str] = (),
                 env_index: int = 0, stop: list[str] | None = None) -> None:
        super().__init__(env)
        self.env_index = env_index
        self._stop = stop if stop is not None else []
        self._recorder = recorder
        self._policy = policy
        self._obs, self._action = obs, action
        self._info_keys = tuple(info_keys)
        self._steps = recorder.buffer(obs, action, bool(info_keys), env_index)
        self.action_space, self.observation_space = env.action_space, env.observation_space
        self._bind()

    def _bind(self) -> None:
        if isinstance(self._policy, StepPolicy) and self._policy.every < 1:
            self._bind_fast()
            return
        rec, buffer = self._recorder, self._steps
        policy = per_episode(self._policy)
        rewards, actions, observations = buffer.rewards, buffer.actions, buffer.observations
        add_reward, check = rewards.append, rec.check
        env_step, env_reset = self.env.step, self.env.reset
        info_keys = self._info_keys
        add_info = buffer.infos.append if buffer.infos is not None else None
        obs_layout, env_index, stop = self._obs, self.env_index, self._stop
        # how each value is buffered: a list's append (an int layout), a bytearray's extend
        # (a row of numbers: the value's own bytes when it is an array of the layout's dtype,
        # else `row(value)`), or not at all (a layout not stored)
        add_obs, obs_row, obs_dtype, obs_raw = _adder(self._obs, observations)
        add_action, act_row, act_dtype, act_raw = _adder(self._action, actions)
        inline = add_info is None and not (self._obs.leaves or self._action.leaves)
        ndarray = np.ndarray
        # the episode under way: id, steps so far, return so far, recording its steps or not;
        # its reset's seed, observation and info (as the episode row holds them)
        episode, t, ret, recording, started = -1, 0, 0.0, False, False
        seed0: int | None = None
        obs0: Any = None
        info0: str | None = None

        add_episode, reset_row = rec.episode, obs_layout.row

        def end_episode(terminated: bool, truncated: bool) -> None:
            nonlocal started
            if recording:
                buffer.end(terminated, truncated)
            add_episode(episode, ret, t, terminated, truncated, env_index, seed0, obs0, info0,
                        obs_layout)
            started = False

        def begin(obs: Any, info: Any, seed: int | None) -> None:
            nonlocal episode, t, ret, recording, started, seed0, obs0, info0
            episode, t, ret, started = rec.new_episode(), 0, 0.0, True
            recording = policy(episode)
            if recording:
                buffer.begin(episode)
            seed0 = seed
            # None: no reset (stepped on past an episode's end)
            obs0 = None if obs is None else reset_row(obs)
            info0 = info_json(info, info_keys) if info_keys and info is not None else None

        def reset(*, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
            if started and t:  # the loop reset an episode that had not ended: cut short
                end_episode(False, False)
            obs, info = env_reset(seed=seed, options=options)
            begin(obs, info, seed)
            return obs, info

        def put(action: Any, obs: Any, reward: Any, info: Any) -> None:
            """One row into the buffer, any layout (the step closure inlines the common one)."""
            if add_action is not None:
                add_action(action if act_row is None else act_row(action))
            if add_obs is not None:
                add_obs(obs if obs_row is None else obs_row(obs))
            add_reward(reward)
            if add_info is not None:
                add_info(info_json(info, info_keys))

        def step(action: Any) -> Any:
            nonlocal t, ret
            if stop:  # Ctrl-C or `gymbus cancel`: stop here, between two steps
                raise KeyboardInterrupt(stop[0])
            result = env_step(action)
            obs, reward, terminated, truncated, info = result
            if not started:  # stepped on past an episode's end without a reset: a new one
                begin(None, None, None)
            if recording:
                if inline:  # no info keys, and each value an int, a row of numbers or nothing
                    try:
                        if obs_raw:
                            add_obs(obs if obs.__class__ is ndarray and obs.dtype is obs_dtype
                                    else obs_row(obs))  # type: ignore[misc]
                        elif add_obs is not None:
                            add_obs(obs)
                        if act_raw:
                            add_action(action if action.__class__ is ndarray and  # type: ignore[misc]
                                       action.dtype is act_dtype else act_row(action))  # type: ignore[misc]
                        elif add_action is not None:
                            add_action(action)
                    except TypeError:  # an array not in C order: its bytes through `row`
                        buffer.drop_partial()
                        put(action, obs, reward, info)
                    else:
                        add_reward(reward)
                else:
                    put(action, obs, reward, info)
            t += 1
            ret += reward  # type: ignore[operator]  # a float, or a numpy float
            if terminated or truncated:  # (before a frame is sent: its last row's flags)
                end_episode(bool(terminated), bool(truncated))
            if recording and len(rewards) >= buffer.check_at:  # a frame's worth, or waited
                check(buffer)
            return result

        def finish() -> None:
            """End the episode under way (the run ends): stored as far as it went."""
            if started and t:
                end_episode(False, False)

        self.step = step  # type: ignore[method-assign]
        self.reset = reset  # type: ignore[method-assign]
        self.finish = finish  # type: ignore[method-assign]

    def _bind_fast(self) -> None:
        """Fast mode: no step rows. A step adds to the episode's length and return, nothing
        else; an episode's end makes its row, and takes the next episode's id at once, so that
        a step never asks whether an episode is under way (one stepped on past its end, with
        no reset, has no reset observation, seed or info)."""
        rec, env_index, stop = self._recorder, self.env_index, self._stop
        env_step, env_reset = self.env.step, self.env.reset
        info_keys, obs_layout = self._info_keys, self._obs
        add_episode, new_episode, reset_row = rec.episode, rec.new_episode, obs_layout.row
        episode, t, ret = new_episode(), 0, 0.0
        seed0: int | None = None
        obs0: Any = None
        info0: str | None = None

        def end_episode(terminated: bool, truncated: bool) -> None:
            nonlocal episode, t, ret, seed0, obs0, info0
            add_episode(episode, ret, t, terminated, truncated, env_index, seed0, obs0, info0,
                        obs_layout)
            episode, t, ret, seed0, obs0, info0 = new_episode(), 0, 0.0, None, None, None

        def reset(*, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
            nonlocal seed0, obs0, info0
            if t:  # the loop reset an episode that had not ended: cut short
                end_episode(False, False)
            obs, info = env_reset(seed=seed, options=options)
            seed0, obs0 = seed, reset_row(obs)
            info0 = info_json(info, info_keys) if info_keys else None
            return obs, info

        def step(action: Any) -> Any:
            nonlocal t, ret
            if stop:  # Ctrl-C or `gymbus cancel`: stop here, between two steps
                raise KeyboardInterrupt(stop[0])
            result = env_step(action)
            t += 1
            ret += result[1]  # type: ignore[operator]  # a float, or a numpy float
            if result[2] or result[3]:
                end_episode(bool(result[2]), bool(result[3]))
            return result

        def finish() -> None:
            if t:
                end_episode(False, False)

        self.step = step  # type: ignore[method-assign]
        self.reset = reset  # type: ignore[method-assign]
        self.finish = finish  # type: ignore[method-assign]

    def finish(self) -> None:  # replaced per instance by _bind
        """End the episode under way, stored as far as it went (the run is ending)."""


def _adder(layout: Layout, values: list[Any] | bytearray | None) -> tuple[
        Callable[[Any], Any] | None, Callable[[Any], Any] | None, np.dtype[Any], bool]:
    """How a step closure buffers one space's values: (add, row, dtype, raw). `add` appends
    to the buffer (None: not stored); `row` makes a value buffer-ready (None: as it is, an
    int); raw: `add` extends a bytearray, and takes an array of `dtype` in C order as it is."""
    if values is None:  # `row` gives None: a reset observation not stored either
        return None, layout.row, layout.dtype, False
    if isinstance(values, list):
        return values.append, None, layout.dtype, False
    return values.extend, layout.row, layout.dtype, not layout.leaves

