"""`run.record(envs)` for a vector environment: each sub-environment's episodes of their own.

A `gymnasium.vector.VectorEnv` (Sync or Async) is wrapped once. Each `step` call adds one chunk
of arrays to the run's buffer (the rows of the sub-environments that took a step), with an
`env_index` column; each sub-environment's episodes are recorded as episodes of their own, with
run-wide episode ids. Gymnasium's autoreset modes differ in what a step after an episode's end
is (docs/python-api.md):

- NEXT_STEP (the default): the call after a sub-environment's last step resets it; that row is
  not a step (its action was ignored), and its observation is the next episode's reset
  observation.
- SAME_STEP: the last step's row holds the final observation from `info["final_obs"]`, and the
  returned observation is already the next episode's reset observation.
- DISABLED: the loop resets ended sub-environments itself, with `reset(options={"reset_mask":
  ...})`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper

from gymbus.recorder import FLUSH_INTERVAL, Recorder, info_json, per_episode
from gymbus.spaces import Layout
from gymbus.vector_block import Block, EnvState, Taken, stack_one


def _sub_info(infos: dict[str, Any], i: int, keys: Sequence[str]) -> dict[str, Any]:
    """Sub-environment `i`'s values of the named keys of a vector info dict."""
    return {k: infos[k][i] for k in keys
            if k in infos and (f"_{k}" not in infos or infos[f"_{k}"][i])}


class RecordedVectorEnv(VectorWrapper):
    """Records every step of every sub-environment of `env` into a run (`Run.record`)."""

    # plain attributes, not VectorWrapper's properties (as `RecordedEnv`'s spaces)
    action_space: Any = None
    observation_space: Any = None
    single_action_space: Any = None
    single_observation_space: Any = None

    def __init__(self, env: VectorEnv, recorder: Recorder, policy: Callable[[int], bool],
                 obs: Layout, action: Layout, info_keys: Sequence[str] = (),
                 stop: list[str] | None = None, *, blocks: bool = True) -> None:
        """`blocks=False` takes every call apart as it comes (as named info keys and the
        DISABLED mode always do) instead of in blocks (vector_block.py)."""
        super().__init__(env)
        self.action_space, self.observation_space = env.action_space, env.observation_space
        self.single_action_space = env.single_action_space
        self.single_observation_space = env.single_observation_space
        self._stop = stop if stop is not None else []
        self._recorder, self._policy = recorder, policy
        self._recorded = per_episode(policy)
        self._obs, self._action = obs, action
        self._info_keys = tuple(info_keys)
        mode = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        self.autoreset_mode = AutoresetMode(mode)
        n = self.num_envs
        self._episode = np.full(n, -1, np.int64)
        self._t = np.zeros(n, np.int64)
        self._ret = np.zeros(n, np.float64)
        self._recording = np.zeros(n, np.bool_)
        self._started = np.zeros(n, np.bool_)
        #: sub-environments whose next `step` is an autoreset (NEXT_STEP)
        self._resetting = np.zeros(n, np.bool_)
        #: each sub-env's episode under way, as its episode row will say of its reset: env_index,
        #: seed, reset observation, reset info, observation layout (Recorder.episode's order)
        self._reset_rows: list[tuple[Any, ...]] = [(i, None, None, None, obs) for i in range(n)]
        self._index = np.arange(n, dtype=np.int64)
        #: sub-envs whose steps are recorded: an episode under way, of a recorded episode
        self._live = np.zeros(n, np.bool_)
        self._steps = recorder.buffer(obs, action, bool(info_keys))
        self._block: Block | None = None
        if blocks and not info_keys and self.autoreset_mode is not AutoresetMode.DISABLED:
            self._block = Block(n, obs, action,
                                next_step=self.autoreset_mode is AutoresetMode.NEXT_STEP,
                                value_bytes=recorder.value_bytes)
        self._same_step = self.autoreset_mode is AutoresetMode.SAME_STEP
        if self._block is not None:
            self._bind_block(self._block)

    # --- episodes -------------------------------------------------------------------------

    def _start(self, i: int, obs: Any, info: dict[str, Any], seed: int | None) -> None:
        """Sub-environment `i` starts an episode from `obs` (a reset)."""
        rec = self._recorder
        if self._started[i] and self._t[i]:
            self._end(i, False, False)
        episode = rec.new_episode()
        self._episode[i], self._t[i], self._ret[i] = episode, 0, 0.0
        self._started[i] = True
        self._recording[i] = self._recorded(episode)
        self._live[i] = self._recording[i]
        layout = self._obs
        self._reset_rows[i] = (
            i, seed, (int(obs) if layout.kind == "int" else
                      layout.row(obs) if layout.stored else None),
            info_json(info, self._info_keys) if self._info_keys else None, layout)

    def _end(self, i: int, terminated: bool, truncated: bool) -> None:
        self._recorder.episode(int(self._episode[i]), float(self._ret[i]), int(self._t[i]),
                               terminated, truncated, *self._reset_rows[i])
        self._started[i] = False
        self._live[i] = False

    def finish(self) -> None:
        """End every episode under way (the run is ending): stored as far as they went."""
        self._take_block()
        for i in np.flatnonzero(self._started & (self._t > 0)):
            self._end(int(i), False, False)

    # --- the vector API -------------------------------------------------------------------

    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        self._take_block()
        # read before the reset: SyncVectorEnv takes reset_mask out of the options it is given
        mask = (options or {}).get("reset_mask")
        obs, infos = self.env.reset(seed=seed, options=options)  # type: ignore[arg-type]
        which = np.flatnonzero(mask) if mask is not None else self._index
        seeds = (seed if isinstance(seed, list) else
                 [None if seed is None else seed + i for i in range(self.num_envs)])
        for i in which:
            self._start(int(i), self._obs_value(obs, int(i)), _sub_info(infos, int(i),
                        self._info_keys), seeds[int(i)])
        self._resetting[which] = False
        return obs, infos

    def _obs_value(self, obs: Any, i: int) -> Any:
        if isinstance(obs, dict):
            return {k: self._obs_value(v, i) for k, v in obs.items()}
        if isinstance(obs, tuple):
            return tuple(self._obs_value(v, i) for v in obs)
        return obs[i]

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        if self._stop:  # Ctrl-C or `gymbus cancel`: stop here, between two steps
            raise KeyboardInterrupt(self._stop[0])
        result = self.env.step(actions)
        obs, rewards, terminated, truncated, infos = result
        reward = np.asarray(rewards, np.float64)
        terminated = np.asarray(terminated, np.bool_)
        truncated = np.asarray(truncated, np.bool_)
        if self._live.all() and not self._resetting.any():
            # the common call: every sub-env took a recorded step, so no masks are needed
            done = terminated | truncated
            self._add_rows(None, actions, obs, reward, terminated, truncated, infos, done)
            self._t += 1
            self._ret += reward
            if not done.any():
                return result
        else:
            stepped = ~self._resetting  # NEXT_STEP: a sub-env that ended last call reset now
            done = (terminated | truncated) & stepped
            rows = stepped & self._live
            if rows.any():
                self._add_rows(rows, actions, obs, reward, terminated, truncated, infos, done)
            self._t[stepped] += 1
            self._ret[stepped] += reward[stepped]
        self._step_ends(done, obs, terminated, truncated, infos)
        return result

    def _bind_block(self, block: Block) -> None:
        """`step` and `_take_block` as closures, when calls are kept in blocks. The common
        call (NEXT_STEP; numpy arrays of the block's dtypes and sizes in C order, as a
        Gymnasium vector env returns them) is appended to the block as it is, the bytes of
        five arrays onto five bytearrays; any other goes through `Block.put`. The clock is
        looked at when the block's calls double (1, 2, 4, ...): a block is taken when full or
        when its first call has waited FLUSH_INTERVAL, at most about twice that."""
        env_step, stop, take_rows = self.env.step, self._stop, self._take_rows
        # five `bytearray.extend(array)` cost ~0.5 us a call of an 8-env CartPole inside the
        # training loop, five assignments into row views of preallocated arrays ~1.8 (the same
        # loop without them, fresh processes, 15 rounds): numpy's indexing machinery, cold
        # after each call's 60 us of environment code, costs more than the copy itself
        obs_dtype, obs_count = block.obs_dtype, block.obs_count
        act_dtype, act_count = block.action_dtype, block.action_count
        f64, b1 = np.dtype(np.float64), np.dtype(np.bool_)
        # the final observations come from `infos` (SAME_STEP), and values flattened from
        # leaves (Dict, Tuple): put, not appended as they are; observations not stored (pixels,
        # by default) are left out
        direct = block.direct() and not self._same_step and act_dtype is not None
        keep_obs = obs_dtype is not None
        size, clock, finals = block.size, time.monotonic, self._same_step
        k, check_at, due = 0, 1, 0.0
        add_reward = add_term = add_trunc = add_action = add_obs = bytearray().extend

        def bind() -> None:
            nonlocal add_reward, add_term, add_trunc, add_action, add_obs
            add_reward, add_term = block.reward.extend, block.terminated.extend
            add_trunc = block.truncated.extend
            if direct:
                add_action = block.action.extend  # type: ignore[union-attr]
            if direct and keep_obs:
                add_obs = block.obs.extend  # type: ignore[union-attr]

        def take() -> None:
            nonlocal k, check_at
            k, check_at = 0, 1
            take_rows()
            bind()

        def step(actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
            nonlocal k, check_at, due
            if stop:  # Ctrl-C or `gymbus cancel`: stop here, between two steps
                raise KeyboardInterrupt(stop[0])
            result = env_step(actions)
            obs, rewards, terminated, truncated = result[0], result[1], result[2], result[3]
            try:  # a list, a tensor, another dtype or size: not appended as it is
                # (the rewards' and flags' count is checked for the block, at `take`)
                if not (direct and actions.dtype is act_dtype and actions.size == act_count
                        and rewards.dtype is f64 and terminated.dtype is b1
                        and truncated.dtype is b1):
                    raise TypeError
                if keep_obs:
                    if not (obs.dtype is obs_dtype and obs.size == obs_count):
                        raise TypeError
                    add_obs(obs)  # (an array not in C order raises TypeError)
                add_action(actions)
                add_reward(rewards)
                add_term(terminated)
                add_trunc(truncated)  # last: the call counts in `block.k` once whole
            except (AttributeError, TypeError, BufferError, ValueError):
                block.rollback()
                try:
                    block.put(actions, obs, rewards, terminated, truncated,
                              result[4] if finals else None)
                except BaseException:  # values no space takes: nothing of the call is kept
                    block.rollback()
                    raise
            k += 1
            if k >= check_at:
                if k >= size:
                    take()
                else:
                    now = clock()
                    if k == 1:
                        due = now + FLUSH_INTERVAL
                    if now >= due:
                        take()
                    else:
                        check_at = min(size, 2 * k)
            return result

        bind()
        self.step = step  # type: ignore[method-assign]
        self._take_block = take  # type: ignore[method-assign]

    def _take_block(self) -> None:  # replaced per instance by _bind_block
        """The block's calls so far into the run's buffer (a vector env in blocks)."""

    def _take_rows(self) -> None:
        """The block's steps into the run's buffer, its episodes ended and started in order."""
        block = self._block
        if block is None or not block.k:
            return
        state = EnvState(self._episode, self._t, self._ret, self._live, self._resetting)
        taken = block.take(state, self._recorder.new_episodes, self._policy)
        self._recorder.add_chunk(self._steps, taken.chunk, taken.rows)
        self._block_episodes(taken)

    def _block_episodes(self, taken: Taken) -> None:
        """A block's ended episodes to the recorder, as columns; each sub-env's reset as the
        block leaves it into `_reset_rows`. An episode that began in an earlier block takes
        its reset (seed, observation) from there: the only ones that can have a seed."""
        ends, resets = taken.ends, self._reset_rows
        m = len(ends["episode"])
        if m:
            stored = "reset_obs" in ends
            seeds: np.ndarray[Any, Any] | None = None
            has_seed = has_obs = None
            for j in np.flatnonzero(taken.carried).tolist():
                _, seed, obs, _, _ = resets[int(ends["env_index"][j])]
                if seed is not None:
                    if seeds is None:
                        seeds, has_seed = np.zeros(m, np.int64), np.zeros(m, np.bool_)
                    seeds[j], has_seed[j] = seed, True  # type: ignore[index]
                if not stored:
                    continue
                if obs is None:  # stepped before any reset
                    has_obs = np.ones(m, np.bool_) if has_obs is None else has_obs
                    has_obs[j] = False
                else:
                    ends["reset_obs"][j] = (obs if self._obs.kind == "int" else
                                            np.frombuffer(obs, self._obs.dtype))
            if seeds is not None:
                ends["seed"], ends["has:seed"] = seeds, has_seed  # type: ignore[assignment]
            if has_obs is not None:
                ends["has:reset_obs"] = has_obs
            self._recorder.add_episodes(ends, m)
        layout = self._obs
        for i, obs in taken.resets:
            resets[i] = (i, None, obs, None, layout)
        self._recording[:] = self._live
        self._started[:] = ~self._resetting

    def _step_ends(self, done: np.ndarray[Any, Any], obs: Any, terminated: np.ndarray[Any, Any],
                   truncated: np.ndarray[Any, Any], infos: dict[str, Any]) -> None:
        """Episodes that ended this call, and those that start (autoreset)."""
        mode = self.autoreset_mode
        for i in np.flatnonzero(done & self._started):
            self._end(int(i), bool(terminated[i]), bool(truncated[i]))
        if mode is AutoresetMode.NEXT_STEP:
            for i in np.flatnonzero(self._resetting):  # this call's obs: the new episode's reset
                self._start(int(i), self._obs_value(obs, int(i)),
                            _sub_info(infos, int(i), self._info_keys), None)
            self._resetting = done
        elif mode is AutoresetMode.SAME_STEP:
            for i in np.flatnonzero(done):
                self._start(int(i), self._obs_value(obs, int(i)),
                            _sub_info(infos, int(i), self._info_keys), None)

    def _add_rows(self, rows: np.ndarray[Any, Any] | None, actions: Any, obs: Any,
                  reward: np.ndarray[Any, Any], terminated: np.ndarray[Any, Any],
                  truncated: np.ndarray[Any, Any], infos: dict[str, Any],
                  done: np.ndarray[Any, Any]) -> None:
        """Buffer the rows of the sub-envs in `rows` (None: all of them; the arrays are copied
        either way, since an env may reuse its own)."""
        n = self.num_envs
        every = slice(None) if rows is None else rows
        chunk: dict[str, Any] = {
            "episode": self._episode[every].copy(), "step": self._t[every].copy(),
            "reward": reward[every].copy(), "terminated": terminated[every].copy(),
            "truncated": truncated[every].copy(), "env_index": self._index[every],
        }
        if self._action.stored:
            chunk["action"] = self._action.rows(actions, n)[every]
        if self._obs.stored:
            values = self._obs.rows(obs, n)
            if self.autoreset_mode is AutoresetMode.SAME_STEP and done.any():
                values = values.copy()  # an int layout's rows may be the env's own array
                final = infos["final_obs"]
                for i in np.flatnonzero(done):  # the step's own observation, not the reset's
                    values[i] = self._obs.rows(stack_one(final[i]), 1)[0]
            chunk["obs"] = values[every]
        which = np.flatnonzero(rows) if rows is not None else self._index
        if self._info_keys:
            source = infos.get("final_info", infos) if done.any() else infos
            chunk["info"] = np.array([info_json(_sub_info(
                source if done[i] else infos, int(i), self._info_keys), self._info_keys)
                for i in which], dtype=object)
        self._recorder.add_chunk(self._steps, chunk, len(which))

