"""The steps of a vector env kept as blocks of arrays, and turned into rows and episodes later.

Per `step` call, the bytes of the call's five arrays are appended to one bytearray each (the
rewards, the flags, the actions, the observations): five `bytearray.extend` calls by the
wrapper's step closure (gymbus.vector) when the arrays are of the block's dtypes and sizes, or
`Block.put`, which converts anything else. Which rows are steps, which episode each belongs
to, its step index, and where episodes end and start are worked out when the block is full (or
due), for the whole block at once (`Block.take`, over arrays viewing those bytes), with array
operations: no Python per step, and the block's ended episodes handed on as columns.

Gymnasium's two autoreset modes (docs/python-api.md):
- NEXT_STEP: the row after a sub-environment's last step is its reset: not a step, and its
  observation is the next episode's reset observation.
- SAME_STEP: the last step's row returns the next episode's reset observation; the step's own
  observation is `info["final_obs"]`, kept apart (`finals`) for the stored row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gymbus.recorder import per_block
from gymbus.spaces import Layout
from gymbus.worker.telemetry.columns import FRAME_VALUE_BYTES, rows_within

#: sub-environment steps a block holds, over all sub-environments (a block of 8 envs: 512
#: calls): its array operations cost about the same for 1,024 values as for 4,096
BLOCK_VALUES = 4096


@dataclass
class Taken:
    """What a block held: the step rows (a chunk of arrays, `rows` long, in call order), and
    the episodes that ended in it, as columns in call order (row, then sub-env): "episode",
    "return", "length", "terminated", "truncated", "env_index", and "reset_obs" when the
    observations are stored. An ended episode that began in an earlier block (`carried`) has
    its reset where the wrapper keeps it, and its "reset_obs" row is left for the wrapper to
    fill. `resets`: each sub-env's last reset in the block, (sub-env, its observation as an
    episode row holds it: an int, the bytes of its row, or None), the episode it has under way
    as the block ends."""

    chunk: dict[str, Any]
    rows: int
    ends: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    carried: np.ndarray[Any, Any] = field(default_factory=lambda: np.zeros(0, np.bool_))
    resets: list[tuple[int, Any]] = field(default_factory=list)


class Block:
    """The calls of a vector env of `n` sub-environments, `size` at most, as bytes."""

    def __init__(self, n: int, obs: Layout, action: Layout, *, next_step: bool,
                 size: int = 0, value_bytes: int = FRAME_VALUE_BYTES) -> None:
        self.n, self.next_step = n, next_step
        # a block is one step frame: its values stay within `value_bytes` (stored pixels)
        self.size = size or rows_within(max(16, BLOCK_VALUES // n),
                                        n * (obs.row_bytes + action.row_bytes), value_bytes)
        self.obs_layout, self.action_layout = obs, action
        #: the dtype of a call's values as the block keeps them (None: not stored), their
        #: shape (n,) or (n, values) and how many a call has
        self.obs_dtype, self.obs_shape = _kept(obs, n)
        self.action_dtype, self.action_shape = _kept(action, n)
        self.obs_count = int(np.prod(self.obs_shape))
        self.action_count = int(np.prod(self.action_shape))
        #: SAME_STEP: (row, sub-env, final observation row) of the steps that ended episodes
        self.finals: list[tuple[int, int, Any]] = []
        self._index = np.tile(np.arange(n, dtype=np.int64), self.size)
        self.reward = self.terminated = self.truncated = bytearray()
        self.action: bytearray | None = None
        self.obs: bytearray | None = None
        self._renew()

    @property
    def k(self) -> int:
        """The calls the block holds: each call appends its truncated flags last, so that a
        call cut short (`rollback`) is not counted."""
        return len(self.truncated) // self.n

    def _renew(self) -> None:
        """New buffers (the last block's may still be viewed by its arrays)."""
        self.reward, self.terminated, self.truncated = bytearray(), bytearray(), bytearray()
        self.action = None if self.action_dtype is None else bytearray()
        self.obs = None if self.obs_dtype is None else bytearray()

    def direct(self) -> bool:
        """Whether a call's actions and observations can be appended as they are, when of the
        block's dtype and size (not for Dict and Tuple spaces, whose leaves `put` joins)."""
        return not (self.obs_layout.leaves or self.action_layout.leaves)

    def rollback(self) -> None:
        """Drop what a call appended to some buffers only (before its truncated flags)."""
        n, k = self.n, self.k
        for buffer, width in ((self.reward, 8 * n), (self.terminated, n), (self.truncated, n),
                              (self.action, _width(self.action_dtype, self.action_count)),
                              (self.obs, _width(self.obs_dtype, self.obs_count))):
            if buffer is not None:
                del buffer[k * width:]

    def put(self, actions: Any, obs: Any, rewards: Any, terminated: Any, truncated: Any,
            infos: dict[str, Any] | None) -> bool:
        """Append one call's values, of any type the spaces allow; True when the block is
        full. `infos` is given under SAME_STEP, where an episode's final observation comes
        from it."""
        n = self.n
        if self.action is not None:
            self.action.extend(np.ascontiguousarray(self.action_layout.rows(actions, n)))
        if self.obs is not None:
            self.obs.extend(np.ascontiguousarray(self.obs_layout.rows(obs, n)))
            if infos is not None and "final_obs" in infos:
                final, mask = infos["final_obs"], infos.get("_final_obs")
                for i in np.flatnonzero(mask if mask is not None else
                                        np.asarray(terminated) | np.asarray(truncated)):
                    one = stack_one(final[i])
                    self.finals.append((self.k, int(i), self.obs_layout.rows(one, 1)[0]))
        self.reward.extend(np.ascontiguousarray(rewards, np.float64).reshape(n))
        self.terminated.extend(np.ascontiguousarray(terminated, np.bool_).reshape(n))
        self.truncated.extend(np.ascontiguousarray(truncated, np.bool_).reshape(n))
        return self.k == self.size

    def _arrays(self, K: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any],
                                       np.ndarray[Any, Any], np.ndarray[Any, Any] | None,
                                       np.ndarray[Any, Any] | None]:
        """The block's K calls as (K, n[, values]) arrays over its bytes: reward, terminated,
        truncated, action and obs (None when not stored); new buffers for the next block."""
        n = self.n
        if len(self.reward) != 8 * K * n or len(self.terminated) != K * n \
                or len(self.truncated) != K * n:
            raise ValueError(f"the vector env returned {len(self.reward) / 8 / K:g} rewards a "
                             f"call for {n} sub-environments")
        arrays = (np.frombuffer(self.reward, np.float64).reshape(K, n),
                  np.frombuffer(self.terminated, np.bool_).reshape(K, n),
                  np.frombuffer(self.truncated, np.bool_).reshape(K, n),
                  _view(self.action, self.action_dtype, self.action_shape, self.action_count, K),
                  _view(self.obs, self.obs_dtype, self.obs_shape, self.obs_count, K))
        self._renew()
        return arrays

    def take(self, state: EnvState, new_episodes: Callable[[int], int],
             recorded: Callable[[int], bool]) -> Taken:
        """The block's rows as steps and episodes; `state` (each sub-env's episode under way)
        is carried into the next block. `new_episodes(count)` numbers the episodes that start,
        in call order (row, then sub-env), from the id it returns; `recorded(episode)` says
        whether an episode's steps are kept."""
        K, n = self.k, self.n
        reward, term, trunc, action, obs = self._arrays(K)
        ended = term | trunc
        valid = np.ones((K, n), np.bool_)
        if self.next_step:
            valid[0] = ~state.resetting
            valid[1:] = ~ended[:-1]
            ended &= valid
            starts_at = ~valid
        else:
            starts_at = ended
        taken = Taken({}, 0)
        episode, step, keep = self._segments(K, state, valid, ended, starts_at, reward, term,
                                             trunc, obs, new_episodes, recorded, taken)
        mask = keep.reshape(-1)
        chunk: dict[str, Any] = {
            "episode": episode.reshape(-1)[mask], "step": step.reshape(-1)[mask],
            "reward": reward.reshape(-1)[mask], "terminated": term.reshape(-1)[mask],
            "truncated": trunc.reshape(-1)[mask], "env_index": self._index[:K * n][mask]}
        # rows kept by np.compress: for a (rows, values) array ~8x faster than values[mask]
        if action is not None:
            chunk["action"] = np.compress(mask, _flat(action, K, n), axis=0)
        if obs is not None:
            obs = _flat(obs, K, n)
            if self.finals:  # (the block's own bytes: they are not used again)
                for k, i, row in self.finals:
                    obs[k * n + i] = row
                self.finals.clear()
            chunk["obs"] = np.compress(mask, obs, axis=0)
        taken.chunk, taken.rows = chunk, int(mask.sum())
        return taken

    def _segments(self, K: int, state: EnvState, valid: np.ndarray[Any, Any],
                  ended: np.ndarray[Any, Any], starts_at: np.ndarray[Any, Any],
                  reward: np.ndarray[Any, Any], term: np.ndarray[Any, Any],
                  trunc: np.ndarray[Any, Any], obs: np.ndarray[Any, Any] | None,
                  new_episodes: Callable[[int], int], recorded: Callable[[int], bool],
                  taken: Taken) -> tuple[np.ndarray[Any, Any], ...]:
        """Each row's episode and step index, and whether it is kept, as (K, n) arrays; the
        block's ended and started episodes into `taken`; `state` as the block leaves it.

        Each sub-env's rows fall into segments, one per episode: a start at row s begins a new
        episode at row s + 1 (under NEXT_STEP row s itself is the reset, no step; under
        SAME_STEP it is the last step of the episode before). The work is done on the block
        taken sub-env by sub-env (transposed), all sub-envs at once, so that it costs a few
        array operations per block and a little Python per episode, never per step.
        """
        n = self.n
        V, E = valid.T.reshape(-1), ended.T.reshape(-1)
        S = starts_at.T.reshape(-1)
        begins = np.zeros(n * K, np.bool_)
        begins[1:] = S[:-1]
        begins[::K] = True
        seg = np.cumsum(begins) - 1
        nseg = int(seg[-1]) + 1
        first = seg[::K]  # each sub-env's first segment: its episode under way
        # new episodes, numbered in call order (row, then sub-env)
        ks, is_ = np.nonzero(starts_at)
        ids = np.arange(ks.size, dtype=np.int64) + new_episodes(ks.size)
        live_ids = per_block(recorded, ids)
        seg_ep = np.empty(nseg, np.int64)
        seg_live = np.empty(nseg, np.bool_)
        offset = np.zeros(nseg, np.int64)
        base = np.zeros(nseg, np.float64)
        seg_ep[first], seg_live[first] = state.episode, state.live
        offset[first], base[first] = state.t, state.ret
        inner = ks < K - 1
        after = seg[is_[inner] * K + ks[inner] + 1]
        seg_ep[after], seg_live[after] = ids[inner], live_ids[inner]
        # step index: valid rows before it in its segment, after those of earlier blocks
        before = np.cumsum(V) - V
        seg_begin = np.flatnonzero(begins)
        step = before - before[seg_begin][seg] + offset[seg]
        count = np.bincount(seg, weights=V, minlength=nseg).astype(np.int64) + offset
        total = np.bincount(seg, weights=reward.T.reshape(-1) * V, minlength=nseg) + base
        p = np.flatnonzero(E)
        p = p[np.lexsort((p // K, p % K))]  # call order: row, then sub-env
        g, k, i = seg[p], p % K, p // K
        taken.ends = {"episode": seg_ep[g], "return": total[g], "length": count[g],
                      "terminated": term[k, i], "truncated": trunc[k, i],
                      "env_index": i}
        # an ended episode's reset: the row before its segment begins, or an earlier block's
        taken.carried = g == first[i]
        if obs is not None:  # a carried episode's row is some row: the wrapper fills it
            taken.ends["reset_obs"] = obs[(seg_begin[g] - 1) % K, i]
        if ks.size:  # each sub-env's last reset in the block: its episode under way
            which = np.flatnonzero(starts_at.any(axis=0))
            last_k = K - 1 - np.argmax(starts_at[::-1, which], axis=0)
            taken.resets = list(zip(which.tolist(), self._reset_values(obs, last_k, which),
                                    strict=True))
        last = seg[K - 1::K]
        state.episode[:], state.live[:] = seg_ep[last], seg_live[last]
        state.t[:], state.ret[:] = count[last], total[last]
        if (~inner).any():  # an episode that starts on the block's last row has no row yet
            j = is_[~inner]
            state.episode[j], state.live[j] = ids[~inner], live_ids[~inner]
            state.t[j], state.ret[j] = 0, 0.0
        # under NEXT_STEP an episode that ended on the last row starts in the next block
        state.resetting[:] = ended[K - 1] if self.next_step else False
        keep = (V & seg_live[seg]).reshape(n, K).T
        return (seg_ep[seg].reshape(n, K).T, step.reshape(n, K).T, keep)


    def _reset_values(self, obs: np.ndarray[Any, Any] | None, ks: np.ndarray[Any, Any],
                      is_: np.ndarray[Any, Any]) -> list[Any]:
        """The observations at rows (ks, is_) as episode rows hold a reset observation: ints
        (a Discrete space), the bytes of each row, or None (not stored)."""
        if obs is None:
            return [None] * len(ks)
        rows = obs[ks, is_]
        if self.obs_layout.kind == "int":
            return list(rows.tolist())
        blob, width = rows.tobytes(), self.obs_layout.row_bytes
        return [blob[j * width:(j + 1) * width] for j in range(len(ks))]


@dataclass
class EnvState:
    """Each sub-environment's episode under way (id, steps, return, recorded or not), and
    under NEXT_STEP whether its next call is its reset; carried from block to block."""

    episode: np.ndarray[Any, Any]
    t: np.ndarray[Any, Any]
    ret: np.ndarray[Any, Any]
    live: np.ndarray[Any, Any]
    resetting: np.ndarray[Any, Any]


def _kept(layout: Layout, n: int) -> tuple[np.dtype[Any] | None, tuple[int, ...]]:
    """How a block keeps a space's values of one call: (dtype, shape); dtype None: not kept."""
    if layout.kind == "int":
        return np.dtype(np.int64), (n,)
    if not layout.stored:
        return None, (n, 0)
    return layout.dtype, (n, layout.size)


def _view(buffer: bytearray | None, dtype: np.dtype[Any] | None, shape: tuple[int, ...],
          count: int, K: int) -> np.ndarray[Any, Any] | None:
    """K calls' values of one space (`count` a call) as a (K, *shape) array over the block's
    bytes (None: not kept); values that do not fill K calls are named."""
    if buffer is None or dtype is None:
        return None
    if len(buffer) != K * count * dtype.itemsize:
        raise ValueError(f"the vector env's values changed size within a run: expected "
                         f"{shape[1:] or 1} values of {dtype} per sub-env")
    return np.frombuffer(buffer, dtype).reshape((K, *shape))


def _width(dtype: np.dtype[Any] | None, count: int) -> int:
    """Bytes of one call's values."""
    return 0 if dtype is None else dtype.itemsize * count


def _flat(values: np.ndarray[Any, Any], K: int, n: int) -> np.ndarray[Any, Any]:
    return values[:K].reshape((K * n,) + values.shape[2:])


def stack_one(value: Any) -> Any:
    """One sub-environment's value with a first axis of 1, for `Layout.rows`."""
    if isinstance(value, dict):
        return {k: stack_one(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(stack_one(v) for v in value)
    return np.asarray(value)[None]
