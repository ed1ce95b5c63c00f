"""The steps of a vector env kept as blocks of arrays, and turned into rows and episodes later.

Per `step` call, the call's arrays are written into row k of preallocated (rows, envs) arrays:
five assignments into row views by the wrapper's step closure (gymbus.vector), or `Block.put`
for the other shapes. Which rows are steps, which episode each belongs to, its step index,
and where episodes end and start are worked out when the block is full (or due), for the whole
block at once (`Block.take`), with array operations: no Python per step, and the block's ended
episodes handed on as columns.

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

from gymbus.recorder import FRAME_VALUE_BYTES, per_block
from gymbus.spaces import Layout

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
    """Preallocated arrays for `size` step calls of a vector env of `n` sub-environments."""

    def __init__(self, n: int, obs: Layout, action: Layout, *, next_step: bool,
                 size: int = 0) -> None:
        self.n, self.next_step = n, next_step
        # a block is one step frame: its values stay within FRAME_VALUE_BYTES (stored pixels)
        self.size = size or max(1, min(max(16, BLOCK_VALUES // n), FRAME_VALUE_BYTES // max(
            1, n * (obs.row_bytes + action.row_bytes))))
        self.k = 0
        self.reward = np.zeros((self.size, n), np.float64)
        self.terminated = np.zeros((self.size, n), np.bool_)
        self.truncated = np.zeros((self.size, n), np.bool_)
        self.obs_layout, self.action_layout = obs, action
        self.obs = _values(obs, self.size, n)
        self.action = _values(action, self.size, n)
        #: the shape of one call's values that is written as it is (None: through `_put`)
        self._obs_shape = _direct(obs, self.obs)
        self._action_shape = _direct(action, self.action)
        #: SAME_STEP: (row, sub-env, final observation row) of the steps that ended episodes
        self.finals: list[tuple[int, int, Any]] = []
        self._index = np.tile(np.arange(n, dtype=np.int64), self.size)

    def direct_shapes(self) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
        """The shapes of one call's actions and observations that are written into a row as
        they are (None: they go through `put`)."""
        return self._action_shape, self._obs_shape

    def put(self, actions: Any, obs: Any, rewards: Any, terminated: Any, truncated: Any,
            infos: dict[str, Any] | None) -> bool:
        """Write one call's arrays at the next row; True when the block is full. `infos` is
        given under SAME_STEP, where an episode's final observation comes from it."""
        k = self.k
        self.reward[k] = rewards
        self.terminated[k] = terminated
        self.truncated[k] = truncated
        into = self.action
        if into is not None:
            if actions.__class__ is np.ndarray and actions.shape == self._action_shape:
                into[k] = actions  # the common call: no reshape, no function call
            else:
                _put(self.action_layout, into, k, actions, self.n)
        into = self.obs
        if into is not None:
            if obs.__class__ is np.ndarray and obs.shape == self._obs_shape:
                into[k] = obs
            else:
                _put(self.obs_layout, into, k, obs, self.n)
            if infos is not None and "final_obs" in infos:
                final, mask = infos["final_obs"], infos.get("_final_obs")
                for i in np.flatnonzero(mask if mask is not None else
                                        np.asarray(terminated) | np.asarray(truncated)):
                    one = stack_one(final[i])
                    self.finals.append((k, int(i), self.obs_layout.rows(one, 1)[0]))
        self.k = k + 1
        return self.k == self.size

    def take(self, state: EnvState, new_episodes: Callable[[int], int],
             recorded: Callable[[int], bool]) -> Taken:
        """The block's rows as steps and episodes; `state` (each sub-env's episode under way)
        is carried into the next block. `new_episodes(count)` numbers the episodes that start,
        in call order (row, then sub-env), from the id it returns; `recorded(episode)` says
        whether an episode's steps are kept."""
        K, n = self.k, self.n
        self.k = 0
        term, trunc, reward = self.terminated[:K], self.truncated[:K], self.reward[:K]
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
        episode, step, keep = self._segments(K, state, valid, ended, starts_at, reward,
                                             new_episodes, recorded, taken)
        mask = keep.reshape(-1)
        chunk: dict[str, Any] = {
            "episode": episode.reshape(-1)[mask], "step": step.reshape(-1)[mask],
            "reward": reward.reshape(-1)[mask], "terminated": term.reshape(-1)[mask],
            "truncated": trunc.reshape(-1)[mask], "env_index": self._index[:K * n][mask]}
        # rows kept by np.compress: for a (rows, values) array ~8x faster than values[mask]
        if self.action is not None:
            chunk["action"] = np.compress(mask, _flat(self.action, K, n), axis=0)
        if self.obs is not None:
            obs = _flat(self.obs, K, n)
            if self.finals:
                obs = obs.copy()
                for k, i, row in self.finals:
                    obs[k * n + i] = row
                self.finals.clear()
            chunk["obs"] = np.compress(mask, obs, axis=0)
        taken.chunk, taken.rows = chunk, int(mask.sum())
        return taken

    def _segments(self, K: int, state: EnvState, valid: np.ndarray[Any, Any],
                  ended: np.ndarray[Any, Any], starts_at: np.ndarray[Any, Any],
                  reward: np.ndarray[Any, Any], new_episodes: Callable[[int], int],
                  recorded: Callable[[int], bool],
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
                      "terminated": self.terminated[k, i], "truncated": self.truncated[k, i],
                      "env_index": i}
        # an ended episode's reset: the row before its segment begins, or an earlier block's
        taken.carried = g == first[i]
        if self.obs is not None:  # a carried episode's row is some row: the wrapper fills it
            taken.ends["reset_obs"] = self.obs[(seg_begin[g] - 1) % K, i]
        if ks.size:  # each sub-env's last reset in the block: its episode under way
            which = np.flatnonzero(starts_at.any(axis=0))
            last_k = K - 1 - np.argmax(starts_at[::-1, which], axis=0)
            taken.resets = list(zip(which.tolist(), self._reset_values(last_k, which),
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


    def _reset_values(self, ks: np.ndarray[Any, Any], is_: np.ndarray[Any, Any]) -> list[Any]:
        """The observations at rows (ks, is_) as episode rows hold a reset observation: ints
        (a Discrete space), the bytes of each row, or None (not stored)."""
        if self.obs is None:
            return [None] * len(ks)
        rows = self.obs[ks, is_]
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


def _values(layout: Layout, size: int, n: int) -> np.ndarray[Any, Any] | None:
    if layout.kind == "int":
        return np.zeros((size, n), np.int64)
    if not layout.stored:
        return None
    return np.zeros((size, n, layout.size), layout.dtype)


def _direct(layout: Layout, into: np.ndarray[Any, Any] | None) -> tuple[int, ...] | None:
    """The shape of a call's values that `put` writes into a row as they are: a row's own
    (a Discrete space's ints, a flat Box), not for Dict and Tuple spaces."""
    return None if into is None or layout.leaves else into.shape[1:]


def _put(layout: Layout, into: np.ndarray[Any, Any], k: int, values: Any, n: int) -> None:
    """One call's values into row k: as they are when their shape is the row's (a Discrete
    space, a flat Box: no reshape), flattened per sub-env otherwise, leaf by leaf for Dict and
    Tuple spaces."""
    if layout.leaves:
        into[k] = layout.rows(values, n)
    elif getattr(values, "shape", None) == into.shape[1:]:
        into[k] = values
    else:
        into[k] = np.reshape(values, into.shape[1:])


def _flat(values: np.ndarray[Any, Any], K: int, n: int) -> np.ndarray[Any, Any]:
    return values[:K].reshape((K * n,) + values.shape[2:])


def stack_one(value: Any) -> Any:
    """One sub-environment's value with a first axis of 1, for `Layout.rows`."""
    if isinstance(value, dict):
        return {k: stack_one(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(stack_one(v) for v in value)
    return np.asarray(value)[None]
