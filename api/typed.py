"""Stored step values back in their spaces' dtype and shape.

The store keeps a step's action and observation as an integer (`obs`, `action`: a Discrete
space) or as a flat row of numbers (`obs_vec`, `action_vec`: every other space, C order), which
holds every value a space's dtype takes exactly (up to 2**53). The run's config keeps each
recorded space (`spaces`: type, shape, dtype, and for Dict and Tuple spaces each key's offsets
in the row); a built-in agent's run keeps its environment id, whose spaces are made again.
`decode` turns a column pair back into one array of shape (rows, *shape) in the space's dtype,
or, for a Dict or Tuple space, into one such array per key ("pos", "arm/angle", "0", ...).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from gymbus.shared.errors import GymbusError


class NotDecodable(GymbusError):
    """A stored run whose spaces cannot be told (no `spaces` in its config and no environment
    that can be made), or whose values were not stored."""


def decode(space: dict[str, Any], ints: Any, vecs: Any) -> Any:
    """The values of one space: ints (a Discrete space's column) or vecs (a list column of
    rows) as the space's arrays; None for a space whose values were not stored."""
    kind = space.get("type")
    if kind == "Discrete":
        values = _ints(ints)
        return None if values is None else values.astype(space.get("dtype", "int64"))
    rows = _rows(vecs)
    if rows is None or space.get("stored") is False:
        return None
    if kind in ("Dict", "Tuple"):
        out = {}
        for key, (lo, hi) in space["offsets"].items():
            leaf = space["leaves"][key]
            part = rows[:, lo:hi]
            out[key] = (part.reshape(len(rows)) if leaf["type"] == "Discrete"
                        else part.reshape(len(rows), *leaf.get("shape", [hi - lo])))
            out[key] = out[key].astype(leaf.get("dtype", "float64"))
        return out
    shape = space.get("shape") or [rows.shape[1]]
    return rows.reshape(len(rows), *shape).astype(space.get("dtype", "float64"))


def _ints(column: Any) -> np.ndarray[Any, Any] | None:
    values = column.to_numpy(zero_copy_only=False) if hasattr(column, "to_numpy") else column
    arr = np.asarray(values)
    if arr.dtype == object:  # NULLs: the values were not stored
        return None
    return arr


def _rows(column: Any) -> np.ndarray[Any, Any] | None:
    """A list column (pyarrow, or a sequence of lists) as a 2-D float64 array."""
    if column is None:
        return None
    if hasattr(column, "null_count"):
        if column.null_count or len(column) == 0:
            return None if column.null_count else np.zeros((0, 0))
        import pyarrow as pa

        chunks = column.chunks if hasattr(column, "chunks") else [column]
        flat = pa.concat_arrays([c.flatten() for c in chunks]).to_numpy(zero_copy_only=False)
        return np.asarray(flat, np.float64).reshape(len(column), -1)
    if any(v is None for v in column):
        return None
    return np.asarray(list(column), np.float64).reshape(len(column), -1)


def run_spaces(run: dict[str, Any]) -> dict[str, Any]:
    """The observation and action spaces of a stored run (its `runs` row), as descriptions."""
    config = run.get("config")
    config = json.loads(config) if isinstance(config, str) else (config or {})
    recorded = config.get("spaces") or {}
    if recorded:
        first = recorded.get("env") or next(iter(recorded.values()))
        return {"observation": first["observation"], "action": first["action"]}
    env_id = run.get("env") or config.get("env")
    if not env_id:
        raise NotDecodable(f"run {run.get('run_id')} keeps no spaces and names no environment: "
                           "read its obs_vec and action_vec columns as they are")
    import gymnasium as gym

    from gymbus.spaces import layout

    try:
        env = gym.make(env_id, **(config.get("env_kwargs") or {}))
    except Exception as exc:  # noqa: BLE001 - an environment's own code may raise anything
        raise NotDecodable(f"run {run.get('run_id')}: cannot make {env_id!r} to learn its "
                           f"spaces ({type(exc).__name__}: {exc}); read its obs_vec and "
                           "action_vec columns as they are") from None
    try:
        return {"observation": layout(env.observation_space).description,
                "action": layout(env.action_space, "action", store_large=True).description}
    finally:
        env.close()
