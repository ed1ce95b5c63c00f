"""Buffered rows and columns into columnar frame bodies, typed by the column schema.

The emitter keeps each episode and metric row as a tuple in the order of
`schema.column_names(kind)`, holding the first columns of that order (a run's rows stop before
the optional columns at the end that it does not fill); here they become a body of one column
per name, and the numeric columns (by `schema.python_types(kind)`) become typed arrays
(docs/protocol.md). Steps are kept as columns already (`StepColumns`, `step_buffer.py`). A step's
observation is an integer, for a Discrete space, unless the run configured it as vectors: the
observations of a Box, sent as one typed array of the space's dtype (or as lists of floats).
Values that msgpack refuses (numpy scalars from an environment) are converted by
`normalized`, only when the encoder has refused the body as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from itertools import repeat
from operator import is_, itemgetter
from typing import Any

import numpy as np

from gymbus.shared import schema
from gymbus.shared.codec import TYPED_ARRAY_DTYPES, TYPED_ARRAY_KEYS, typed_array, typed_array_of
from gymbus.shared.protocol import MAX_FRAME_BYTES, FrameKind

#: the order of a buffered row's values, per columnar frame kind
COLUMNS: dict[FrameKind, tuple[str, ...]] = {
    kind: schema.column_names(kind) for kind in schema.FRAME_COLUMNS}
STEP_COLUMNS = COLUMNS[FrameKind.STEP]
#: name -> Python type of each columnar kind's columns; an OBS column as an integer (Discrete)
KINDS: dict[FrameKind, dict[str, type]] = {
    kind: {**schema.python_types(kind),
           **{c.name: int for c in columns if c.type is schema.Type.OBS}}
    for kind, columns in schema.FRAME_COLUMNS.items()}

#: the step column that `StepColumns(vector_obs=True)` sends as vectors (a Box's observations)
_OBS = "obs"
#: the step column sent only by a run whose agent labels its steps
_LABEL = "label"
(_T0,) = schema.FRAME_SCALARS[FrameKind.STEP]
#: the step columns that `normalized` converts by type (observations and labels apart)
_STEP_KINDS = {name: kind for name, kind in KINDS[FrameKind.STEP].items()
               if name not in (_LABEL, _OBS)}

#: a step or episode frame holds at most this many bytes of observations and actions (half the
#: frame limit, `GYMBUS_MAX_FRAME_BYTES`, by default the protocol's: a frame of 4,096 large
#: observations would be refused whole)
FRAME_VALUE_BYTES = MAX_FRAME_BYTES // 2


def rows_within(rows: int, row_bytes: int, value_bytes: int = FRAME_VALUE_BYTES) -> int:
    """`rows`, or as many rows of `row_bytes` as fit in `value_bytes` (one at least): how many
    rows of large values a frame holds."""
    return max(1, min(rows, value_bytes // max(1, row_bytes)))


_TYPED_DTYPES: dict[type, np.dtype[Any]] = {
    int: np.dtype(np.int64), float: np.dtype(np.float64), bool: np.dtype(np.bool_)}
_NARROW_INTS = tuple((np.dtype(t), np.iinfo(t).min, np.iinfo(t).max)
                     for t in (np.int8, np.int16, np.int32))


def _bools(column: Sequence[Any]) -> list[bool]:
    """A bool column as Python bools (numpy bools and 0/1 ints from an environment included:
    msgpack would refuse the first and pack the second as integers). C-level, ~15 ns a row."""
    return list(map(bool, column))


def typed_columns(body: dict[str, Any], kinds: dict[str, type], rows: int) -> dict[str, Any]:
    """Turn the numeric columns of `body` into typed arrays (docs/protocol.md), in place
    (`typed_column` for each)."""
    for name, kind in kinds.items():
        if name in body and kind in _TYPED_DTYPES:
            body[name] = typed_column(partial(iter, body[name]), kind, rows)
    return body


def typed_column(values: Callable[[], Iterable[Any]], kind: type, rows: int) -> Any:
    """A numeric column (`values()` gives it, once more if the first try fails) as a typed
    array, or as a list when it does not convert.

    `np.fromiter` takes a column of 1,024 Python or numpy numbers in ~13 us, as fast as msgpack
    packs them, and the decoder then takes the column as one buffer instead of one object per
    value. Integers go in the smallest signed type that holds them (msgpack, too, packs a small
    int in one byte: step and action columns stay as small on the wire and in the spool). A
    column that does not convert (None in it, a number beyond 64 bits) stays a list, for the
    codec to refuse or for `normalized` to fix.
    """
    try:
        array = np.fromiter(values(), _TYPED_DTYPES[kind], rows)
    except (TypeError, ValueError, OverflowError):
        column = list(values())
        return _bools(column) if kind is bool else column
    if kind is int:
        array = narrowest(array)
    return typed_array_of(array.dtype, [rows], array.tobytes())


def narrowest(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """int64 values in the smallest signed integer type that holds them all."""
    lo, hi = int(values.min()), int(values.max())
    for dtype, smallest, largest in _NARROW_INTS:
        if smallest <= lo and hi <= largest:
            return values.astype(dtype)
    return values


def normalized(body: dict[str, Any], kinds: dict[str, type]) -> dict[str, Any]:
    """A body with numpy scalars (np.int64, np.float32, ...) turned into Python numbers
    (typed-array columns, and columns the body does not have, are left as they are)."""
    out = dict(body)
    for name, kind in kinds.items():
        dtype = _TYPED_DTYPES.get(kind)
        if dtype is not None and name in body and not isinstance(body[name], dict):
            out[name] = np.asarray(body[name], dtype=dtype).tolist()
    return out


def finite_rows(body: dict[str, Any], rows: int) -> tuple[dict[str, Any], int]:
    """`body` without its rows that hold a NaN or an infinite number, and how many those were.

    The protocol stores no such number, and the ingest refuses a frame that holds one whole (a
    dead letter): one NaN reward would take 4,095 good rows with it. The columns looked at are
    the float ones with a value per row, as numpy arrays (a recorded script's), typed arrays or
    lists of numbers (a built-in run's); every column with a value per row is cut alike. A
    frame of finite numbers costs a `np.isfinite` per float column (~5 us for 4,096 rows) and
    is returned as it is."""
    keep: np.ndarray[Any, Any] | None = None
    for value in body.values():
        values = _floats(value, rows)
        if values is None:
            continue
        ok = np.isfinite(values)
        if ok.all():
            continue
        ok = ok if ok.ndim == 1 else ok.reshape(rows, -1).all(axis=1)
        keep = ok if keep is None else keep & ok
    if keep is None:
        return body, 0
    return ({name: _rows_of(value, keep, rows) for name, value in body.items()},
            rows - int(keep.sum()))


def _floats(value: Any, rows: int) -> np.ndarray[Any, Any] | None:
    """A column's values as a float array (None: not a column of floats with a row each)."""
    if isinstance(value, np.ndarray):
        return value if value.dtype.kind == "f" and value.ndim and len(value) == rows else None
    if isinstance(value, dict):
        if set(value) != TYPED_ARRAY_KEYS or not value["shape"] or value["shape"][0] != rows:
            return None
        dtype = np.dtype(value["dtype"])
        if dtype.kind != "f":
            return None
        return np.frombuffer(value["data"], dtype).reshape(value["shape"])
    if isinstance(value, list) and len(value) == rows and rows and \
            not isinstance(value[0], str | bytes | bool | None):
        try:
            return np.asarray(value, np.float64)
        except (TypeError, ValueError):  # lists of unequal length, or not numbers
            return None
    return None


def _rows_of(value: Any, keep: np.ndarray[Any, Any], rows: int) -> Any:
    """The kept rows of a column with a value per row; any other value as it is."""
    if isinstance(value, np.ndarray):
        return value[keep] if value.ndim and len(value) == rows else value
    if isinstance(value, dict) and set(value) == TYPED_ARRAY_KEYS and value["shape"] \
            and value["shape"][0] == rows:
        array = np.frombuffer(value["data"], np.dtype(value["dtype"])).reshape(value["shape"])
        return typed_array(array[keep])
    if isinstance(value, list) and len(value) == rows:
        return [v for v, k in zip(value, keep.tolist(), strict=True) if k]
    return value


def rows_body(kind: FrameKind, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Episode or metric rows (tuples in the order of `COLUMNS[kind]`) as a columnar body,
    numeric columns as typed arrays."""
    body: dict[str, Any] = dict(zip(COLUMNS[kind], zip(*rows)))  # tuples pack as lists
    return typed_columns(body, KINDS[kind], len(rows))


#: an episode row's fields after the six every row has: env_index, seed, reset_obs
_EPISODE_BASE = 6
_SEED, _RESET_OBS = 7, 8
#: one getter per row field: a batch's columns are `map`s of them over its rows, half the cost
#: of `zip(*rows)` (which steps a thousand row iterators once per column)
_FIELDS = tuple(itemgetter(i) for i in range(_RESET_OBS + 1))


def episode_bodies(rows: list[tuple[Any, ...]]) -> list[tuple[dict[str, Any], int]]:
    """Episode rows as columnar bodies, one per set of the optional seed and reset_obs that
    its rows carry (a frame's optional columns are in all its rows or in none).

    A row is the six columns every episode has, or those and (env_index, seed, reset_obs),
    either of the last two None. A reset observation is an integer (Discrete) or an array,
    sent as one typed array of the observations' dtype and shape (rows, values per row).

    Rows of one shape (the usual batch: the training loop's, after its seeded first episode)
    are read column by column, each by an itemgetter straight into `np.fromiter`; a batch that
    mixes shapes is grouped row by row first (measured on 1,024 FrozenLake rows: 390 ns a row
    grouped, 210 ns with the columns built as tuples first, ~150 ns read straight).
    """
    n = len(rows)
    if n and len(set(map(len, rows))) == 1:
        if len(rows[0]) == _EPISODE_BASE:
            return [(_episode_body(rows, False, False), n)]
        seeds_none, obs_none = _nones(rows, _SEED), _nones(rows, _RESET_OBS)
        if seeds_none in (0, n) and obs_none in (0, n):
            return [(_episode_body(rows, not seeds_none, not obs_none), n)]
    groups: dict[tuple[bool, bool], list[tuple[Any, ...]]] = {}
    for row in rows:
        key = (len(row) > _EPISODE_BASE and row[_SEED] is not None,
               len(row) > _EPISODE_BASE and row[_RESET_OBS] is not None)
        groups.setdefault(key, []).append(row)
    return [(_episode_body(group, has_seed, has_obs), len(group))
            for (has_seed, has_obs), group in groups.items()]


def _nones(rows: list[tuple[Any, ...]], field: int) -> int:
    """In how many rows the field is None (by identity: arrays do not compare to None)."""
    return sum(map(is_, map(_FIELDS[field], rows), repeat(None, len(rows))))


#: (column, getter, Python type) of the six fields every episode row has
_EPISODE_FIELDS = tuple((name, _FIELDS[i], KINDS[FrameKind.EPISODE][name])
                        for i, name in enumerate(COLUMNS[FrameKind.EPISODE][:_EPISODE_BASE]))


def _episode_body(rows: list[tuple[Any, ...]], has_seed: bool, has_obs: bool) -> dict[str, Any]:
    """One episode frame's body from rows of one shape."""
    n = len(rows)
    body: dict[str, Any] = {}
    for name, get, kind in _EPISODE_FIELDS:
        body[name] = (typed_column(partial(map, get, rows), kind, n)
                      if kind in _TYPED_DTYPES else list(map(get, rows)))
    if has_seed:
        seeds = np.fromiter(map(_FIELDS[_SEED], rows), np.int64, n)
        body["seed"] = typed_array_of(seeds.dtype, [n], seeds.tobytes())
    if has_obs:
        body["reset_obs"] = _obs_column(list(map(_FIELDS[_RESET_OBS], rows)))
    return body


def _obs_column(values: Sequence[Any]) -> Any:
    """Observations as a column: integers as they are, arrays as one 2-D typed array."""
    kinds = set(map(type, values))
    if kinds == {int}:
        return list(values)
    if all(issubclass(kind, (int, np.integer)) for kind in kinds):
        return [int(v) for v in values]
    arr = np.stack([np.asarray(v).reshape(-1) for v in values])
    if arr.dtype.str not in TYPED_ARRAY_DTYPES:
        arr = arr.astype(np.float64)
    return typed_array_of(arr.dtype, list(arr.shape), np.ascontiguousarray(arr).tobytes())


#: the fields of a run of consecutive steps of one episode, as the emitter keeps runs: one flat
#: list of these five values per run (only a run's last step can have ended its episode)
RUN_FIELDS = ("episode", "first step", "steps", "terminated", "truncated")


class StepColumns:
    """How a run's steps become a step frame's body, by its observations and labels.

    The emitter keeps a batch of steps as columns: a list per value the loop appends (the
    observations, actions, labels and rewards) and, per run of consecutive steps of one
    episode, its `RUN_FIELDS`; the episode, step and end-flag columns are worked out from the
    runs here, in numpy, so that nothing per step but the appends runs in Python.
    """

    def __init__(self, *, vector_obs: bool = False, labels: bool = False,
                 obs_dtype: Any = None, obs_shape: Sequence[int] | None = None) -> None:
        """Observations as vectors (Box) or integers (Discrete); with or without labels.

        Vector observations of a `obs_dtype` that a typed array can hold are kept per step as
        their raw bytes and sent as one typed-array column (`obs_dtype` is then set); without
        one they are kept as lists of floats. `obs_shape` (the space's) sizes the batches.
        """
        self.vector_obs = vector_obs
        self.labels = labels
        dtype = None if obs_dtype is None else np.dtype(obs_dtype)
        #: vector observations travel as one typed array of this dtype (None: as lists)
        self.obs_dtype: np.dtype[Any] | None = (
            dtype if vector_obs and dtype is not None and dtype.str in TYPED_ARRAY_DTYPES
            else None)
        values = int(np.prod(obs_shape)) if vector_obs and obs_shape is not None else 1
        #: bytes of a step's observation and action, as sent (an integer takes 8 at most)
        self.value_bytes = values * (self.obs_dtype.itemsize if self.obs_dtype else 8) + 8

    def max_rows(self, rows: int, value_bytes: int = FRAME_VALUE_BYTES) -> int:
        """`rows`, or fewer when that many observations would not fit `value_bytes`."""
        return rows_within(rows, self.value_bytes, value_bytes)

    def body(self, runs: list[Any], obs: Sequence[Any], actions: Sequence[Any],
             labels: Sequence[Any], rewards: Sequence[Any], t0_ns: int) -> dict[str, Any]:
        """The step frame's body of a batch: `runs` and the per-step values of their steps, in
        order (`labels` is read only for a run whose agent labels its steps). Numeric columns
        become typed arrays, vector observations (kept as bytes) one 2-D typed array; what
        stays a list goes to msgpack as it is.

        In a tight loop, for FrozenLake-like steps (runs of 8; 200 batches, medians, twice):
        the body ~100 ns a step at 1,024 steps a batch, 59-74 at 4,096; the whole flush
        (body, NaN check, encoding, spool and send) ~150 and 89-112.
        """
        n = len(rewards)
        if not len(obs) == len(actions) == n or (self.labels and len(labels) != n):
            raise ValueError(f"a step batch's columns differ in length: {len(obs)} "
                             f"observations, {len(actions)} actions, {len(rewards)} rewards")
        body = _run_columns(runs, n)
        body["action"] = typed_array(narrowest(np.array(actions, np.int64)))
        if self.obs_dtype is not None:
            body[_OBS] = obs_typed_array(obs, self.obs_dtype)
        elif self.vector_obs:
            if obs and isinstance(obs[0], list) and obs[0] and isinstance(obs[0][0], list):
                obs = np.asarray(obs, dtype=np.float64).reshape(n, -1).tolist()  # a 2-D+ Box
            body[_OBS] = obs
        else:
            body[_OBS] = typed_column(partial(iter, obs), int, n)
        body["reward"] = typed_array(np.array(rewards, np.float64))
        body[_T0] = t0_ns
        if self.labels:
            body[_LABEL] = ["" if v is None else v for v in labels] if None in labels else labels
        return body

    def normalized(self, body: dict[str, Any], obs: Sequence[Any]) -> dict[str, Any]:
        """`body` with numpy scalars converted by column type, observations included."""
        fixed = normalized(body, _STEP_KINDS)
        if self.obs_dtype is None:
            values = np.asarray(obs, dtype=np.float64 if self.vector_obs else np.int64)
            fixed[_OBS] = (values.reshape(len(obs), -1) if self.vector_obs else values).tolist()
        return fixed


def _run_columns(runs: list[Any], rows: int) -> dict[str, Any]:
    """The episode, step, terminated and truncated columns of `rows` steps given as runs
    (`RUN_FIELDS` after one another in one list; ~38 us in a tight loop for a batch of ~130
    runs of 8 steps, as FrozenLake makes them)."""
    table = np.fromiter(runs, np.int64, len(runs)).reshape(-1, len(RUN_FIELDS))
    count = table[:, 2]
    lasts = np.cumsum(count) - 1
    if not len(table) or lasts[-1] != rows - 1 or (count < 1).any():
        raise ValueError(f"step runs of {count.tolist()} steps for {rows} step values")
    columns: dict[str, Any] = {
        "episode": typed_array(narrowest(np.repeat(table[:, 0], count))),
        "step": typed_array(narrowest(
            np.arange(rows) + np.repeat(table[:, 1] + count - 1 - lasts, count)))}
    for name, field in (("terminated", 3), ("truncated", 4)):
        column = np.zeros(rows, np.bool_)
        column[lasts] = table[:, field]
        columns[name] = typed_array(column)
    return columns


def obs_typed_array(obs_rows: Sequence[bytes], dtype: np.dtype[Any]) -> dict[str, Any]:
    """The steps' observation bytes as one typed array of shape (rows, values per row)."""
    width = len(obs_rows[0])
    data = b"".join(obs_rows)
    if len(data) != width * len(obs_rows) or width % dtype.itemsize:
        sizes = sorted({len(row) // dtype.itemsize for row in obs_rows})
        raise ValueError(f"the environment's observations changed size within a run: "
                         f"{sizes} values of {dtype}")
    return typed_array_of(dtype, [len(obs_rows), width // dtype.itemsize], data)
