"""TensorBoard event files of a run: its metrics as scalars, written from the emitter's batches.

Every run writes `events.out.tfevents.*` into its run folder, in every telemetry mode. The data
come from the emitter's metric batches (`charts/epsilon`, `charts/SPS`, the agent's losses) and
its episode rows (`charts/episodic_return`, `charts/episodic_length`), handed over when a batch
is taken, so the
training loop pays nothing per value for TensorBoard.

The writer is TensorBoard's file format and nothing more: TFRecord framing (length, masked
CRC-32C, bytes, masked CRC-32C) around `Event` protos, encoded here (the three messages and five
fields a scalar needs, byte for byte what TensorBoard's own `event_pb2` writes: a test compares
them). No thread, no torch, no protobuf: `torch.utils.tensorboard` costs about 1.3 s of imports
per run process, TensorBoard's `EventFileWriter` about 70 ms and a thread, its `event_pb2`
module alone about 10 ms; this module imports nothing beyond numpy and the standard library,
and writes on the run's main thread, where a background thread would compete for the same GIL
anyway.

Aggregation: the rows of the batches are kept, and written once a second (FLUSH_SECONDS). Per
tag, up to `MAX_POINTS` values are written as they are, one point per value (CleanRL's one point
per episode: a DQN's episodes, `charts/SPS`); more values are averaged in `MAX_POINTS` runs of
consecutive values, each point at the step and time of its run's last value. So a run that ends
thousands of episodes a second writes 8 points a second per tag, not thousands: framing a point
costs ~15 us (a pure-Python CRC over ~100 bytes), grouping a row ~0.1 us.

Everything here runs on the run process's main thread. A failing disk never fails the run: the
first OSError is logged and kept in `error`, and the log stops writing.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import count, pairwise, repeat
from math import fsum
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

import numpy as np

from gymbus.shared.errors import GymbusError
from gymbus.worker.telemetry.observers import MetricRow

log = logging.getLogger("gymbus.run.tensorboard")

#: what TensorBoard looks for in a file name; the suffix says which writer made it
EVENT_FILE_MARKER = "tfevents"
FILE_SUFFIX = ".gymbus"
FILE_VERSION = "brain.Event:2"
#: the episode curves' tags (CleanRL's)
EPISODIC_RETURN, EPISODIC_LENGTH = "charts/episodic_return", "charts/episodic_length"
#: points per tag per write before consecutive values are averaged
MAX_POINTS = 8
#: seconds between two writes of the kept rows, each handed to the operating system at once
FLUSH_SECONDS = 1.0

_uid = count()


class TensorBoardError(GymbusError):
    """Writing to a closed event file: a bug in the caller (close is the last call)."""


# --- CRC-32C (Castagnoli), as TFRecord frames use it --------------------------------------------


def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of `data` (table-driven; a record is tens of bytes, so pure Python is enough)."""
    crc, table = 0xFFFFFFFF, _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The masked CRC that TFRecord stores, so that a CRC of CRCs is not a CRC."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: little-endian length, its masked CRC, the bytes, their masked CRC."""
    header = struct.pack("<Q", len(data))
    return b"".join((header, struct.pack("<I", masked_crc32c(header)), data,
                     struct.pack("<I", masked_crc32c(data))))


# --- Event protos (tensorboard/compat/proto/event.proto, summary.proto; proto3) ----------------
# Event: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5.
# Summary: repeated Value value = 1; Value: tag = 1 (string), simple_value = 2 (float).
# Fields in number order, proto3 defaults (0, "") left out, oneof members always written.

def _varint(value: int) -> bytes:
    """A protobuf varint; a negative int64 as its 64-bit two's complement (ten bytes)."""
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_bytes(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _float32(value: float) -> bytes:
    """`value` as a little-endian float32, out of range rounding to +-inf as protobuf does."""
    try:
        return struct.pack("<f", value)
    except OverflowError:
        return struct.pack("<f", math.copysign(math.inf, value))


def encode_event(wall_time: float, step: int = 0, file_version: str | None = None,
                 scalars: Sequence[tuple[str, float]] | None = None) -> bytes:
    """One serialized `Event`: a file version (the file's first event) or scalar values."""
    out = []
    time_bytes = struct.pack("<d", wall_time)
    if time_bytes != bytes(8):
        out.append(b"\x09" + time_bytes)
    if step:
        out.append(b"\x10" + _varint(step))
    if file_version is not None:
        out.append(_field_bytes(3, file_version.encode()))
    if scalars is not None:
        values = b"".join(_field_bytes(1, (_field_bytes(1, tag.encode()) if tag else b"") +
                                       b"\x15" + _float32(value)) for tag, value in scalars)
        out.append(_field_bytes(5, values))
    return b"".join(out)


# --- the event file ------------------------------------------------------------------------------


class EventFileWriter:
    """One event file in `logdir`, named as TensorBoard's writers name theirs.

    Writes go to a buffered file; `flush` hands them to the operating system (so that a run
    killed afterwards loses nothing flushed). `close` is idempotent; writing after it raises.
    """

    def __init__(self, logdir: Path, suffix: str = FILE_SUFFIX) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        name = (f"events.out.{EVENT_FILE_MARKER}.{int(time.time()):010d}.{socket.gethostname()}"
                f".{os.getpid()}.{next(_uid)}{suffix}")
        self.path = logdir / name
        self._file: IO[bytes] | None = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self.events = 0
        self._write(encode_event(time.time(), file_version=FILE_VERSION))
        self.flush()

    def add_scalars(self, step: int, wall_time: float, values: Sequence[tuple[str, float]]) -> None:
        """One event at `step` holding a scalar per (tag, value)."""
        self._write(encode_event(wall_time, step, scalars=values))

    def _write(self, event: bytes) -> None:
        if self._file is None:
            raise TensorBoardError(f"the event file {self.path} is closed")
        self._file.write(frame_record(event))
        self.events += 1

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close; idempotent."""
        if self._file is not None:
            try:
                self._file.flush()
            finally:
                self._file.close()
                self._file = None

    @property
    def closed(self) -> bool:
        return self._file is None


# --- a run's scalars -----------------------------------------------------------------------------

_VALUE = itemgetter(2)


#: one tag's values as columns (steps, values, ts_ns), numpy arrays of equal length
Series = tuple[str, np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]


def aggregate(rows: Sequence[MetricRow], max_points: int = MAX_POINTS,
              series: Sequence[Series] = ()) -> list[tuple[int, float, list[tuple[str, float]]]]:
    """Metric rows and series as events: [(step, wall_time, [(tag, value), ...])], by step.

    Up to `max_points` values of a tag are kept as they are; more are averaged in `max_points`
    runs of consecutive values, each point at its run's last step and time. One dict lookup
    per row to group, `fsum` in C for the means: ~0.1 us per row; a series' values are
    averaged in numpy, with nothing per value in Python.
    """
    groups: dict[str, list[MetricRow]] = {}
    for row in rows:
        group = groups.get(row[0])
        if group is None:
            groups[row[0]] = [row]
        else:
            group.append(row)
    columns: dict[str, list[Series]] = {}
    for one in series:
        if one[0] in groups:  # a tag logged as rows too: its series joins them, in order
            groups[one[0]].extend(zip(repeat(one[0]), one[1].tolist(),
                                      one[2].tolist(), one[3].tolist()))
        else:
            columns.setdefault(one[0], []).append(one)
    events: dict[int, tuple[float, list[tuple[str, float]]]] = {}
    for tag, tag_rows in groups.items():
        n = len(tag_rows)
        if n <= max_points:
            points = [(r[1], float(r[2]), r[3]) for r in tag_rows]
        else:
            bounds = [i * n // max_points for i in range(max_points + 1)]
            points = [(tag_rows[hi - 1][1], _mean(tag_rows[lo:hi]), tag_rows[hi - 1][3])
                      for lo, hi in pairwise(bounds)]
        _add_points(events, tag, points)
    for tag, parts in columns.items():
        _add_points(events, tag, _series_points(parts, max_points))
    return [(step, wall, values) for step, (wall, values) in sorted(events.items())]


def _add_points(events: dict[int, tuple[float, list[tuple[str, float]]]], tag: str,
                points: Iterable[tuple[int, float, int]]) -> None:
    for step, value, ts_ns in points:
        events.setdefault(int(step), (ts_ns / 1e9, []))[1].append((tag, value))


def _series_points(parts: list[Series], max_points: int) -> list[tuple[int, float, int]]:
    """A tag's series joined, as points: as they are, or averaged in `max_points` runs."""
    steps, values, ts_ns = (np.concatenate([p[i] for p in parts]) for i in (1, 2, 3))
    values = values.astype(np.float64)
    n = len(values)
    if n <= max_points:
        return list(zip(steps.tolist(), values.tolist(), ts_ns.tolist()))
    bounds = np.arange(max_points + 1) * n // max_points
    with np.errstate(invalid="ignore", over="ignore"):  # inf and -inf in one run: NaN
        means = np.add.reduceat(values, bounds[:-1]) / np.diff(bounds)
    last = bounds[1:] - 1
    return list(zip(steps[last].tolist(), means.tolist(), ts_ns[last].tolist()))


def _mean(rows: Sequence[MetricRow]) -> float:
    """The mean of the rows' values; NaN when they hold infinities of both signs."""
    try:
        return fsum(map(_VALUE, rows)) / len(rows)
    except (ValueError, OverflowError):
        return float("nan")


class ScalarLog:
    """A run's TensorBoard scalars: keeps metric batches, aggregates and writes them each second.

    `add_rows` is the emitter's metric observer (called when a batch is taken: at episode ends);
    when `flush_seconds` have passed since the last write, it writes the kept rows and flushes
    the file. `close` does the same a last time (run end, cancel and failure) and closes it.
    """

    def __init__(self, logdir: Path, *, max_points: int = MAX_POINTS,
                 flush_seconds: float = FLUSH_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logdir = logdir
        self.max_points = max_points
        self.flush_seconds = flush_seconds
        self._clock = clock
        self.values = 0
        self.points = 0
        self.flushes = 0
        self.error: str | None = None
        self._writer: EventFileWriter | None = None
        #: the event file (None when it could not be created)
        self.path: Path | None = None
        self._rows: list[MetricRow] = []  # kept since the last write
        self._series: list[Series] = []
        self._last_flush = clock()
        try:
            self._writer = EventFileWriter(logdir)
            self.path = self._writer.path
        except OSError as exc:
            self._fail(exc)

    def add_rows(self, rows: Sequence[MetricRow]) -> None:
        """Keep one batch of metric rows (name, step, value, ts_ns); write them all when due."""
        if self._writer is None or not rows:
            return
        self.values += len(rows)
        self._rows.extend(rows)
        if self._clock() - self._last_flush >= self.flush_seconds:
            self.flush()

    def add_series(self, tag: str, steps: np.ndarray[Any, Any], values: np.ndarray[Any, Any],
                   ts_ns: np.ndarray[Any, Any]) -> None:
        """Keep one tag's values given as columns (a recorded run's batch of episodes), each
        value at its step and time; written with the rows."""
        if self._writer is None or not len(steps):
            return
        self.values += len(steps)
        self._series.append((tag, steps, values, ts_ns))
        if self._clock() - self._last_flush >= self.flush_seconds:
            self.flush()

    def add_episode_columns(self, episodes: Mapping[str, np.ndarray[Any, Any]]) -> None:
        """`add_episodes` of a recorder's batch of episodes (`gymbus.recorder.EpisodeColumns`:
        its "global_step", "return", "length" and "ts_ns" columns)."""
        self.add_episodes(episodes["global_step"], episodes["return"], episodes["length"],
                          episodes["ts_ns"])

    def add_episodes(self, steps: np.ndarray[Any, Any], returns: np.ndarray[Any, Any],
                     lengths: np.ndarray[Any, Any], ts_ns: np.ndarray[Any, Any]) -> None:
        """CleanRL's episode curves, `charts/episodic_return` and `charts/episodic_length`,
        of a batch of episodes given as columns, each at the global step of its end."""
        self.add_series(EPISODIC_RETURN, steps, returns, ts_ns)
        self.add_series(EPISODIC_LENGTH, steps, lengths, ts_ns)

    def flush(self) -> None:
        """Write the kept rows as points and hand the file to the operating system."""
        writer = self._writer
        rows, self._rows = self._rows, []
        series, self._series = self._series, []
        self._last_flush = self._clock()
        if writer is None:
            return
        try:
            for step, wall, values in aggregate(rows, self.max_points, series):
                writer.add_scalars(step, wall, values)
                self.points += len(values)
            writer.flush()
            self.flushes += 1
        except OSError as exc:
            self._fail(exc)

    def close(self) -> None:
        """Write what is kept, flush and close the event file; idempotent, and later batches
        are ignored."""
        self.flush()
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError as exc:
                self._fail(exc)

    def stats(self) -> dict[str, Any]:
        """For result.json: where the file is, what was written, and the error if any."""
        return {"path": str(self.path) if self.path is not None else None, "values": self.values,
                "points": self.points, "flushes": self.flushes, "error": self.error}

    def _fail(self, exc: OSError) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        log.warning("TensorBoard events of %s are no longer written: %s", self.logdir, self.error)
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass
