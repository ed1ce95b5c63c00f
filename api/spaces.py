"""How a Gymnasium space's values travel in step frames: as an integer, or as a row of numbers.

A step frame's `obs` and `action` columns hold either one integer per row (a Discrete space)
or one row of numbers per row, all of one length (every other space, flattened in C order). A
row of numbers keeps the space's dtype on the wire (a typed array: float32 stays float32, uint8
stays uint8); the store keeps it as DOUBLE[] in `obs_vec` / `action_vec`, exact for every dtype
a space uses up to 2**53. The space itself (its type, shape, dtype, and for Dict and Tuple spaces
the key of every value's offset) goes into the run's config under `spaces`, so that a reader can
give the rows their shape back.

An observation of more than `MAX_STORED_VALUES` values (pixels) is not stored per step unless
the run asks for it (`record(env, store_large_obs=True)`): its rows hold NULL, and the number of
observations left out is counted and reported with the run's end.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gymnasium import spaces

from gymbus.shared.codec import TYPED_ARRAY_DTYPES
from gymbus.shared.errors import GymbusError

log = logging.getLogger("gymbus.api")

#: observations with more values than this (a 32x32 RGB image has 3,072) are not stored per step
#: by default: at 100k steps/s they would write hundreds of MB a second
MAX_STORED_VALUES = 1024


class SpaceError(GymbusError):
    """A space whose values cannot be recorded, naming it and what to do instead."""


@dataclass(frozen=True)
class Layout:
    """How one space's values are recorded."""

    #: "int": one integer per row; "vector": a row of `size` numbers of `dtype`; "none": a
    #: space whose values are not stored (NULL in the store, counted)
    kind: str
    size: int = 1
    dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype(np.int64))
    #: what the store is told of the space (the run config's `spaces`)
    description: dict[str, Any] = field(default_factory=dict)
    #: for Dict and Tuple spaces: the flattening of one value (leaves in order)
    leaves: tuple[tuple[str, spaces.Space[Any]], ...] = ()
    #: False: too large to store per step by default (see MAX_STORED_VALUES)
    stored: bool = True

    def row(self, value: Any) -> Any:
        """One value as it is buffered: an int, or the bytes of its numbers in `dtype`."""
        if self.kind == "int":
            return value
        if not self.stored:
            return None
        if self.leaves:
            value = np.concatenate([np.asarray(_leaf(value, key), self.dtype).reshape(-1)
                                    for key, _ in self.leaves])
        return np.asarray(value, dtype=self.dtype).tobytes()

    @property
    def row_bytes(self) -> int:
        """Bytes one buffered value takes (0 when not stored)."""
        if self.kind == "int":
            return 8
        return self.size * self.dtype.itemsize if self.stored else 0

    def rows(self, values: Any, n: int) -> np.ndarray[Any, Any]:
        """`n` values of a vector env (first axis) as an (n,) int or (n, size) array."""
        if self.kind == "int":
            return np.asarray(values, dtype=np.int64).reshape(n)
        if not self.stored:
            return np.zeros((n, 0))
        if self.leaves:
            parts = [np.asarray(_leaf(values, key), self.dtype).reshape(n, -1)
                     for key, _ in self.leaves]
            return np.concatenate(parts, axis=1)
        return np.array(values, dtype=self.dtype, copy=True).reshape(n, self.size)


def _leaf(value: Any, key: str) -> Any:
    for part in key.split("/"):
        value = value[int(part)] if isinstance(value, tuple | list) else value[part]
    return value


def _dtype(space: spaces.Space[Any], what: str) -> np.dtype[Any]:
    dtype = np.dtype(space.dtype if space.dtype is not None else np.float64)
    if dtype.newbyteorder("<").str not in TYPED_ARRAY_DTYPES:
        if dtype.kind in "iu":
            return np.dtype(np.int64)
        if dtype.kind == "f":
            return np.dtype(np.float64)
        raise SpaceError(f"the {what} space {space} has values of {dtype}, which cannot be "
                         "recorded as numbers: record a numeric view of it (a gymnasium "
                         "ObservationWrapper) or leave it out with record(env, obs=False)")
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def _leaves(space: spaces.Space[Any], prefix: str = "") -> list[tuple[str, spaces.Space[Any]]]:
    if isinstance(space, spaces.Dict):
        return [leaf for key, sub in space.spaces.items()
                for leaf in _leaves(sub, f"{prefix}{key}/")]
    if isinstance(space, spaces.Tuple):
        return [leaf for i, sub in enumerate(space.spaces) for leaf in _leaves(sub, f"{prefix}{i}/")]
    if isinstance(space, spaces.Box | spaces.Discrete | spaces.MultiDiscrete | spaces.MultiBinary):
        return [(prefix.rstrip("/"), space)]
    raise SpaceError(f"the space {space} ({type(space).__name__}) inside a Dict or Tuple cannot "
                     "be recorded: gymbus records Box, Discrete, MultiDiscrete and MultiBinary "
                     "values; flatten it with a gymnasium ObservationWrapper first")


def describe(space: spaces.Space[Any]) -> dict[str, Any]:
    """The space as JSON-able fields: type, shape, dtype (and n / start / nvec, keys)."""
    out: dict[str, Any] = {"type": type(space).__name__}
    if isinstance(space, spaces.Discrete):
        out.update(n=int(space.n), start=int(space.start))
    elif isinstance(space, spaces.Dict | spaces.Tuple):
        out["leaves"] = {key or "0": describe(sub) for key, sub in _leaves(space)}
        return out
    if space.shape is not None:
        out["shape"] = list(space.shape)
    if space.dtype is not None:
        out["dtype"] = np.dtype(space.dtype).name
    if isinstance(space, spaces.MultiDiscrete):
        out["nvec"] = np.asarray(space.nvec).tolist()
    return out


def layout(space: spaces.Space[Any], what: str = "observation", *,
           store_large: bool = False) -> Layout:
    """The Layout of a space; one whose values cannot be stored gets kind "none" (no
    environment is refused for its spaces: its steps are stored without those values)."""
    try:
        return _layout(space, what, store_large)
    except SpaceError as exc:
        return Layout("none", 0, np.dtype(np.float64),
                      {"type": type(space).__name__, "stored": False, "reason": str(exc)},
                      stored=False)


def _layout(space: spaces.Space[Any], what: str, store_large: bool) -> Layout:
    description = describe(space)
    if isinstance(space, spaces.Discrete):
        return Layout("int", 1, np.dtype(np.int64), description)
    if isinstance(space, spaces.Box | spaces.MultiDiscrete | spaces.MultiBinary):
        size = int(np.prod(space.shape, dtype=np.int64)) if space.shape else 1
        dtype = _dtype(space, what)
        stored = store_large or size <= MAX_STORED_VALUES
        return Layout("vector", size, dtype, {**description, "stored": stored}, stored=stored)
    if isinstance(space, spaces.Dict | spaces.Tuple):
        leaves = tuple(_leaves(space))
        kinds = {np.dtype(np.float64) if isinstance(s, spaces.Discrete) else _dtype(s, what)
                 for _, s in leaves}
        dtype = np.result_type(*kinds) if kinds else np.dtype(np.float64)
        size = sum(int(np.prod(s.shape, dtype=np.int64)) if s.shape else 1 for _, s in leaves)
        offsets, at = {}, 0
        for key, sub in leaves:
            width = int(np.prod(sub.shape, dtype=np.int64)) if sub.shape else 1
            offsets[key or "0"] = [at, at + width]
            at += width
        stored = store_large or size <= MAX_STORED_VALUES
        return Layout("vector", size, np.dtype(dtype),
                      {**description, "offsets": offsets, "stored": stored}, leaves, stored)
    raise SpaceError(unsupported(space, what))


def unsupported(space: spaces.Space[Any], what: str) -> str:
    """Why a space's values are not stored, and what to do (a log line of `record`)."""
    return (f"the {what} space {space} ({type(space).__name__}) is not stored per step: gymbus "
            "stores Discrete, Box, MultiDiscrete, MultiBinary, and Dict or Tuple spaces of "
            "those; wrap the environment (a gymnasium ObservationWrapper) to record a numeric "
            "view of it. Its steps are stored without it, and counted")


def env_layouts(obs_space: spaces.Space[Any], act_space: spaces.Space[Any], *,
                store_large_obs: bool = False, num_envs: int = 1,
                info_keys: Sequence[str] = ()) -> tuple[Layout, Layout, dict[str, Any]]:
    """The observation and action layouts of a recorded env (its actions always stored, its
    large observations only with `store_large_obs`), and its entry of the run config's
    `spaces`. A space whose values cannot be stored is said in the log: its steps are stored
    without them."""
    obs = layout(obs_space, "observation", store_large=store_large_obs)
    action = layout(act_space, "action", store_large=True)
    for kept, space, what in ((obs, obs_space, "observation"), (action, act_space, "action")):
        if kept.kind == "none":
            log.warning("%s", kept.description.get("reason") or unsupported(space, what))
    return obs, action, {"observation": obs.description, "action": action.description,
                         "num_envs": num_envs, "info_keys": list(info_keys)}
