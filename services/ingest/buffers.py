"""The ingest's row buffers: rows of one table kept as column chunks and turned into Arrow tables.

Runs on the ingest loop. A decoded frame's columns are numpy arrays already, so a buffer keeps
them as they came and joins each column in one numpy concatenation at flush time, where building
the rows one by one would cost a Python object per value.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa


class Repeated(NamedTuple):
    """A chunk of `n` rows that all hold `value` (a frame's run_id and agent_id)."""

    value: str
    n: int


#: a buffered column chunk: numpy values, Python values, one string repeated, or None for a
#: chunk's worth of NULLs
Chunk = np.ndarray[Any, Any] | list[Any] | Repeated | None
#: a table's columns in order, each with its Arrow type
ArrowColumns = list[tuple[str, pa.DataType]]


class TableBuffer:
    """Rows of one table waiting for the next flush, as column chunks with equal row counts."""

    def __init__(self, columns: ArrowColumns) -> None:
        self.columns = columns
        self.chunks: dict[str, list[Chunk]] = {name: [] for name, _ in self.columns}
        self.lengths: list[int] = []
        self.rows = 0

    def append(self, n: int, values: dict[str, Chunk]) -> None:
        """Add `n` rows; a column missing from `values` gets NULLs (a key not a column: ignored)."""
        for name, _ in self.columns:
            self.chunks[name].append(values.get(name))
        self.lengths.append(n)
        self.rows += n

    def to_arrow(self) -> pa.Table:
        arrays = [_arrow_column(self.chunks[name], self.lengths, typ) for name, typ in self.columns]
        return pa.table(arrays, names=[name for name, _ in self.columns])

    def clear(self) -> None:
        for chunks in self.chunks.values():
            chunks.clear()
        self.lengths.clear()
        self.rows = 0


def _arrow_column(chunks: list[Chunk], lengths: list[int], typ: pa.DataType) -> pa.Array:
    """One column's chunks as one Arrow array, in one numpy concatenation where possible."""
    if pa.types.is_large_list(typ):
        return _list_column(chunks, lengths, typ)
    if chunks and all(type(c) is Repeated for c in chunks):
        return _repeated_column(chunks, typ)  # type: ignore[arg-type]
    arrays = [c for c in chunks if isinstance(c, np.ndarray)]
    if not arrays and not any(isinstance(c, list) for c in chunks):
        return pa.nulls(sum(lengths), typ)
    if len(arrays) == len(chunks):
        return pa.array(np.concatenate(arrays), type=typ)
    if arrays and not any(isinstance(c, list) for c in chunks):  # numbers with NULL chunks
        values = np.concatenate([c if isinstance(c, np.ndarray) else np.zeros(n, arrays[0].dtype)
                                 for c, n in zip(chunks, lengths, strict=True)])
        mask = np.concatenate([np.full(n, c is None) for c, n in zip(chunks, lengths, strict=True)])
        return pa.array(values, mask=mask, type=typ)
    pieces = ([None] * n if c is None else c if isinstance(c, list) else
              [c.value] * n if isinstance(c, Repeated) else c.tolist()
              for c, n in zip(chunks, lengths, strict=True))
    return pa.array(list(chain.from_iterable(pieces)), type=typ)


def _repeated_column(chunks: list[Repeated], typ: pa.DataType) -> pa.Array:
    """Strings each repeated over its chunk, decoded from a dictionary in Arrow: no Python
    string per row (two such columns were a quarter of building a CartPole step batch)."""
    codes: dict[str, int] = {}
    index = np.fromiter((codes.setdefault(c.value, len(codes)) for c in chunks), np.int32,
                        len(chunks))
    rows = np.repeat(index, np.fromiter((c.n for c in chunks), np.int64, len(chunks)))
    dictionary = pa.array(list(codes), typ)
    return pa.DictionaryArray.from_arrays(pa.array(rows), dictionary).dictionary_decode()


def _list_column(chunks: list[Chunk], lengths: list[int], typ: pa.DataType) -> pa.Array:
    """A list column from 2-D numpy chunks (a row's list per row) and None chunks (NULL rows)."""
    sizes, values, nulls = [], [], []
    for chunk, n in zip(chunks, lengths, strict=True):
        is_array = isinstance(chunk, np.ndarray) and chunk.ndim == 2
        sizes.append(np.full(n, chunk.shape[1] if is_array else 0, np.int64))  # type: ignore[union-attr]
        nulls.append(np.full(n, not is_array))
        if is_array:
            values.append(chunk.reshape(-1))  # type: ignore[union-attr]
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(np.concatenate(sizes))])
    flat = np.concatenate(values) if values else np.zeros(0)
    mask = np.concatenate(nulls)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, typ.value_type),
                                         type=typ, mask=pa.array(mask) if mask.any() else None)


def rows_table(columns: ArrowColumns, rows: list[tuple[Any, ...]]) -> pa.Table:
    """An Arrow table from Python row tuples in the order of `columns`."""
    arrays = [pa.array([row[i] for row in rows], typ) for i, (_, typ) in enumerate(columns)]
    return pa.table(arrays, names=[name for name, _ in columns])
