"""`run.record(env)` for one environment: a Gymnasium wrapper that records every step.

The wrapper changes nothing the training loop sees: `step` and `reset` return what the wrapped
environment returned. `step` is a closure bound per wrapper (not a method), appending one row
tuple to the run's buffer: no dict, no encoding, no send per step (`gymbus.recorder` turns
the rows into columns per frame). An episode is recorded from its `reset`: the reset observation
and (the named keys of) the reset info go into its episode row, so that a stored episode has
its N+1 observations, and so does the seed it was reset with, if any.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import inf
from typing import TYPE_CHECKING, Any

import gymnasium as gym

from gymbus.recorder import FLUSH_INTERVAL, Recorder, info_json
from gymbus.spaces import Layout

if TYPE_CHECKING:
    from gymbus.session import StepPolicy


class RecordedEnv(gym.Wrapper[Any, Any, Any, Any]):
    """Records every step and episode of `env` into a run (made by `Run.record`)."""

    def __init__(self, env: gym.Env[Any, Any], recorder: Recorder, policy: StepPolicy,
                 obs: Layout, action: Layout, info_keys: Sequence[str] = (),
                 env_index: int = 0, stop: list[str] | None = None) -> None:
        super().__init__(env)
        self.env_index = env_index
        self._stop = stop if stop is not None else []
        self._recorder = recorder
        self._policy = policy
        self._obs, self._action = obs, action
        self._info_keys = tuple(info_keys)
        self._steps = recorder.buffer(obs, action, bool(info_keys))
        # the wrapper's spaces are the env's: looked up per call by a loop that samples
        # actions, an unset one costs a property and a getattr each time
        self._action_space, self._observation_space = env.action_space, env.observation_space
        self._bind()

    def _bind(self) -> None:
        rec, policy = self._recorder, self._policy
        rows = self._steps.rows
        add = rows.append
        clock, flush_steps = rec._clock, rec.flush_steps
        env_step, env_reset = self.env.step, self.env.reset
        obs_row, act_row = self._obs.row_function(), self._action.row_function()
        info_keys = self._info_keys
        max_rows, interval = self._steps.max_rows, FLUSH_INTERVAL
        obs_layout, env_index, stop = self._obs, self.env_index, self._stop
        # the episode under way: id, steps so far, return so far; recording its steps or not
        episode, t, ret, recording, started = -1, 0, 0.0, False, False
        reset_row: dict[str, Any] = {}

        def end_episode(terminated: bool, truncated: bool) -> None:
            nonlocal started
            rec.episode({"episode": episode, "return": ret, "length": t,
                         "terminated": terminated, "truncated": truncated, **reset_row})
            started = False

        def reset(*, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
            nonlocal episode, t, ret, recording, started
            if started and t:  # the loop reset an episode that had not ended: cut short
                end_episode(False, False)
            obs, info = env_reset(seed=seed, options=options)
            episode, t, ret, started = rec.new_episode(), 0, 0.0, True
            recording = policy(episode)
            reset_row.clear()
            reset_row.update(
                env_index=env_index, seed=seed, _obs_layout=obs_layout,
                reset_obs=obs if obs_row is None else obs_row(obs),  # None when not stored
                reset_info=info_json(info, info_keys) if info_keys else None)
            return obs, info

        def step(action: Any) -> Any:
            nonlocal t, ret
            if stop:  # Ctrl-C or `gymbus cancel`: stop here, between two steps
                raise KeyboardInterrupt(stop[0])
            result = env_step(action)
            obs, reward, terminated, truncated, info = result
            if recording:
                if rec.deadline == inf:
                    rec.deadline = clock() + interval
                add((episode, t, action if act_row is None else act_row(action),
                     obs if obs_row is None else obs_row(obs), reward, terminated, truncated,
                     info_json(info, info_keys) if info_keys else None, env_index))
                if len(rows) >= max_rows or clock() >= rec.deadline:
                    flush_steps()
            t += 1
            ret += reward  # type: ignore[operator]  # a float, or a numpy float
            if terminated or truncated:
                end_episode(bool(terminated), bool(truncated))
            return result

        def finish() -> None:
            """End the episode under way (the run ends): stored as far as it went."""
            if started and t:
                end_episode(False, False)

        self.step = step  # type: ignore[method-assign]
        self.reset = reset  # type: ignore[method-assign]
        self.finish = finish  # type: ignore[method-assign]

    def finish(self) -> None:  # replaced per instance by _bind
        """End the episode under way, stored as far as it went (the run is ending)."""
