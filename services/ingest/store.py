"""The ingest's DuckDB store: the schema, row buffers written through Arrow, per-run accounting.

`Store` is the only writer of the DuckDB file; every method of this module runs on the ingest
loop (one thread). A frame is checked against its run's stored seqs as it arrives, buffered per
table as column chunks, and written by `flush` in one transaction with the ledger, the gaps and
the run rows, so that the file and the accounting rebuilt from it always agree.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from gymbus.services.ingest.runs import Gap, RunAccount
from gymbus.shared.codec import Frame
from gymbus.shared.protocol import FrameKind, LifecycleEvent

log = logging.getLogger("gymbus.ingest")

#: every table's columns, in order. TIMESTAMP columns hold UTC; `gaps` keeps each run of missing
#: seqs found (filled_at stays NULL until every seq in it is stored).
SCHEMA: dict[str, str] = {
    "runs": "run_id VARCHAR PRIMARY KEY, agent_id VARCHAR, worker_id VARCHAR, env VARCHAR, "
            "algo VARCHAR, telemetry VARCHAR, seed BIGINT, config VARCHAR, started_at TIMESTAMP, "
            "ended_at TIMESTAMP, status VARCHAR, reason VARCHAR, frames_emitted BIGINT, "
            "frames_stored BIGINT, last_seq BIGINT, gaps BIGINT, duplicates BIGINT, "
            "complete BOOLEAN, episodes BIGINT, steps BIGINT, metrics BIGINT",
    "frames": "run_id VARCHAR, seq BIGINT, kind VARCHAR, ts_ns BIGINT, rows INTEGER, "
              "received_at TIMESTAMP",
    "lifecycle": "run_id VARCHAR, seq BIGINT, ts TIMESTAMP, agent_id VARCHAR, worker_id VARCHAR, "
                 "event VARCHAR, status VARCHAR, reason VARCHAR, name VARCHAR, path VARCHAR, "
                 "format VARCHAR, frames_emitted BIGINT, episodes BIGINT, steps BIGINT",
    "episodes": "run_id VARCHAR, seq BIGINT, agent_id VARCHAR, episode BIGINT, return DOUBLE, "
                "length BIGINT, terminated BOOLEAN, truncated BOOLEAN, ts TIMESTAMP",
    "steps": "run_id VARCHAR, seq BIGINT, agent_id VARCHAR, episode BIGINT, step BIGINT, "
             "action BIGINT, obs BIGINT, obs_vec DOUBLE[], reward DOUBLE, terminated BOOLEAN, "
             "truncated BOOLEAN, label VARCHAR",
    "metrics": "run_id VARCHAR, seq BIGINT, agent_id VARCHAR, name VARCHAR, step BIGINT, "
               "value DOUBLE, ts TIMESTAMP",
    "dead_letters": "received_at TIMESTAMP, reason VARCHAR, topic VARCHAR, size BIGINT, "
                    "payload BLOB",
    "gaps": "run_id VARCHAR, first_seq BIGINT, last_seq BIGINT, detected_at TIMESTAMP, "
            "filled_at TIMESTAMP",
}
ARROW_TYPES: dict[str, pa.DataType] = {
    "VARCHAR": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(), "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(), "TIMESTAMP": pa.timestamp("us"), "BLOB": pa.binary(),
    "DOUBLE[]": pa.large_list(pa.float64()),
}
#: table -> [(column, Arrow type)], parsed from SCHEMA
COLUMNS: dict[str, list[tuple[str, pa.DataType]]] = {
    table: [(c.split()[0], ARROW_TYPES[c.split()[1]]) for c in cols.split(", ")]
    for table, cols in SCHEMA.items()
}
#: tables filled from frame buffers; the data tables among them count rows in `stats`
BUFFERED = ("frames", "lifecycle", "episodes", "steps", "metrics", "dead_letters")
DATA_TABLES = ("lifecycle", "episodes", "steps", "metrics")
DEAD_LETTER_PAYLOAD_BYTES = 64 * 1024
#: a buffer this full is written at once: above DuckDB's row group (122,880 rows), a large
#: insert goes to the file in whole row groups instead of through the write-ahead log
FLUSH_ROWS = 131_072
#: seconds the first buffered frame waits at most. Every query and run_stats flushes first, and
#: viewers follow the live stream, so this bounds only what a crash can take from the buffers
#: (the spools bring it back); a longer interval writes bigger, cheaper batches (measured: 0.2 s
#: costs ~20% more ingest CPU per row than 0.5 s at 100k steps/s)
FLUSH_INTERVAL = 0.5

#: a buffered column chunk: numpy values, Python values, or None for a chunk's worth of NULLs
Chunk = np.ndarray[Any, Any] | list[Any] | None


def wal_path(db_path: Path) -> Path:
    """DuckDB's write-ahead log beside the database file: `<file>.wal`."""
    return db_path.with_name(db_path.name + ".wal")


def create_schema(conn: duckdb.DuckDBPyConnection) -> None:
    """Create the tables that do not exist yet (column names quoted: `return` is a keyword)."""
    for table, cols in SCHEMA.items():
        quoted = ", ".join(f'"{c.split(" ", 1)[0]}" {c.split(" ", 1)[1]}' for c in cols.split(", "))
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({quoted})")


# --- the batched writer's buffers -----------------------------------------------------------------


class TableBuffer:
    """Rows of one table waiting for the next flush, as column chunks with equal row counts."""

    def __init__(self, table: str) -> None:
        self.columns = COLUMNS[table]
        self.chunks: dict[str, list[Chunk]] = {name: [] for name, _ in self.columns}
        self.lengths: list[int] = []
        self.rows = 0

    def append(self, n: int, values: dict[str, Chunk]) -> None:
        """Add `n` rows; a column missing from `values` gets NULLs."""
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
    pieces = ([None] * n if c is None else c if isinstance(c, list) else c.tolist()
              for c, n in zip(chunks, lengths, strict=True))
    return pa.array(list(chain.from_iterable(pieces)), type=typ)


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


def _rows_table(table: str, rows: list[tuple[Any, ...]]) -> pa.Table:
    """An Arrow table from Python row tuples in the table's column order."""
    columns = COLUMNS[table]
    arrays = [pa.array([row[i] for row in rows], typ) for i, (_, typ) in enumerate(columns)]
    return pa.table(arrays, names=[name for name, _ in columns])


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: Any) -> int | None:
    """An optional int of a lifecycle body, if it fits BIGINT (the decoder checks required ones)."""
    return value if type(value) is int and -(2**63) <= value < 2**63 else None


# --- per-run accounting ---------------------------------------------------------------------------


class Store:
    """The DuckDB file, the buffers and every run's accounting."""

    def __init__(self, path: Path, flush_rows: int = FLUSH_ROWS,
                 flush_interval: float = FLUSH_INTERVAL,
                 clock: Callable[[], float] = time.monotonic, threads: int | None = None) -> None:
        self.path = path
        self.flush_rows = flush_rows
        self.flush_interval = flush_interval
        self._clock = clock
        config: dict[str, str | bool | int | float | list[str]] = (
            {} if threads is None else {"threads": int(threads)})
        self.conn: duckdb.DuckDBPyConnection | None = duckdb.connect(str(path), config=config)
        create_schema(self.conn)
        self._warm_up()
        # queries come over the network: they may read this database, not the host's files
        self.conn.execute("SET enable_external_access = false")
        self.runs = self._load_runs()
        self._buffers = {name: TableBuffer(name) for name in BUFFERED}
        self._dirty: set[str] = set()  # runs whose row changed since the last flush
        self._pending_frames = 0
        self._first_pending: float | None = None
        self.counters = dict.fromkeys(("frames_received", "frames_stored", "duplicates",
                                       "dead_letters", "flushes", "flush_errors", "frames_lost"), 0)
        self.rows = dict.fromkeys(DATA_TABLES, 0)
        self.last_flush_ms = 0.0

    def _db(self) -> duckdb.DuckDBPyConnection:
        if self.conn is None:
            raise RuntimeError(f"the ingest store {self.path} is closed")
        return self.conn

    def _warm_up(self) -> None:
        """One tiny Arrow insert: the first Arrow conversion in a process stalls ~0.25 s."""
        db = self._db()
        db.execute("CREATE TEMP TABLE warm_up (x BIGINT, v DOUBLE[])")
        self._insert("warm_up", pa.table({"x": pa.array([1], pa.int64()),
                                          "v": pa.array([[1.0]], pa.large_list(pa.float64()))}))
        db.execute("DROP TABLE warm_up")

    def _load_runs(self) -> dict[str, RunAccount]:
        """Every run's accounting from the file, so that a restarted ingest drops duplicates."""
        db = self._db()
        names = RunAccount.ROW_FIELDS + RunAccount.COUNTERS
        select = ", ".join(f"epoch_us({n})" if n.endswith("_at") else n for n in names)
        runs = {}
        for values in db.execute(f"SELECT {select} FROM runs").fetchall():
            fields = {n: v for n, v in zip(names, values, strict=True) if v is not None}
            runs[fields["run_id"]] = RunAccount(**fields)
        gaps: dict[str, list[Gap]] = {}
        for run_id, first, last, detected in db.execute(
            "SELECT run_id, first_seq, last_seq, epoch_us(detected_at) FROM gaps "
            "WHERE filled_at IS NULL ORDER BY first_seq"
        ).fetchall():
            gaps.setdefault(run_id, []).append(Gap(first, last, detected, in_db=True))
        ledger = db.execute("SELECT run_id, list(seq ORDER BY seq) FROM frames GROUP BY run_id")
        for run_id, seqs in ledger.fetchall():
            runs.setdefault(run_id, RunAccount(run_id)).restore(seqs, gaps.get(run_id, []))
        return runs

    # --- frames in (on the ingest loop, as they arrive) -------------------------------------------

    def add(self, frame: Frame, received_ns: int | None = None) -> bool:
        """Buffer a decoded frame; False (and counted) when its (run_id, seq) is stored already."""
        self._db()  # raises once closed
        now_us = (time.time_ns() if received_ns is None else received_ns) // 1000
        self.counters["frames_received"] += 1
        run = self.runs.get(frame.run_id)
        if run is None:
            run = self.runs[frame.run_id] = RunAccount(frame.run_id)
        self._dirty.add(run.run_id)
        self._mark_pending()
        if not run.accept(frame.seq, now_us):
            self.counters["duplicates"] += 1
            return False
        run.agent_id = run.agent_id or frame.agent_id
        run.worker_id = run.worker_id or frame.worker_id
        self._buffers["frames"].append(1, {
            "run_id": [frame.run_id], "seq": np.array([frame.seq]), "kind": [frame.kind.value],
            "ts_ns": np.array([frame.ts_ns]), "rows": np.array([frame.rows], np.int32),
            "received_at": np.array([now_us]),
        })
        self._pending_frames += 1
        if frame.kind is FrameKind.LIFECYCLE:
            self._add_lifecycle(run, frame, now_us)
            return True
        n, body = frame.rows, frame.body
        columns: dict[str, Chunk] = {**body, "run_id": [frame.run_id] * n,
                                     "seq": np.full(n, frame.seq), "agent_id": [frame.agent_id] * n}
        if "ts_ns" in body:
            columns["ts"] = body["ts_ns"] // 1000
        if frame.kind is FrameKind.STEP:
            vector = body["obs"].ndim == 2
            columns["obs"] = None if vector else body["obs"]
            columns["obs_vec"] = body["obs"] if vector else None
            self._buffers["steps"].append(n, columns)
            run.steps += n
        elif frame.kind is FrameKind.EPISODE:
            self._buffers["episodes"].append(n, columns)
            run.episodes += n
        else:
            self._buffers["metrics"].append(n, columns)
            run.metrics += n
        return True

    def _add_lifecycle(self, run: RunAccount, frame: Frame, now_us: int) -> None:
        body, ts_us = frame.body, frame.ts_ns // 1000
        event = LifecycleEvent(body["event"])
        emitted = _opt_int(body.get("frames_emitted"))
        texts = {k: [_opt_str(body.get(k))] for k in ("status", "reason", "name", "path", "format")}
        self._buffers["lifecycle"].append(1, {
            **texts, "run_id": [frame.run_id], "seq": np.array([frame.seq]),
            "ts": np.array([ts_us]),
            "agent_id": [frame.agent_id], "worker_id": [frame.worker_id], "event": [event.value],
            "frames_emitted": [emitted], "episodes": [_opt_int(body.get("episodes"))],
            "steps": [_opt_int(body.get("steps"))],
        })
        if event is LifecycleEvent.RUN_STARTED:
            config = body["config"]
            run.config = json.dumps(config, default=repr, ensure_ascii=False)
            run.env, run.algo, run.telemetry = (_opt_str(body.get(k, config.get(k)))
                                                for k in ("env", "algo", "telemetry"))
            run.seed = _opt_int(body.get("seed", config.get("seed")))
            run.started_at = ts_us
        elif event is LifecycleEvent.RUN_COMPLETED:
            run.status, run.reason = _opt_str(body.get("status")), _opt_str(body.get("reason"))
            run.ended_at = ts_us
            if emitted is not None and emitted >= 0:
                run.set_emitted(emitted, now_us)

    def add_dead_letter(
        self, parts: list[bytes], reason: str, received_ns: int | None = None
    ) -> None:
        """Keep a frame that failed to decode, with the reason (its payload cut to 64 KiB)."""
        self._db()
        now_us = (time.time_ns() if received_ns is None else received_ns) // 1000
        self.counters["frames_received"] += 1
        self.counters["dead_letters"] += 1
        self._buffers["dead_letters"].append(1, {
            "received_at": np.array([now_us]), "reason": [reason],
            "topic": [parts[0].decode("utf-8", errors="replace")[:1024] if parts else ""],
            "size": np.array([sum(len(p) for p in parts)]),
            "payload": [b"".join(parts[1:])[:DEAD_LETTER_PAYLOAD_BYTES]],
        })
        self._mark_pending()

    def _mark_pending(self) -> None:
        if self._first_pending is None:
            self._first_pending = self._clock()

    # --- flushing ---------------------------------------------------------------------------------

    def seconds_until_flush(self) -> float | None:
        """Seconds until the buffers are due (0: now), or None when nothing waits."""
        if self._first_pending is None:
            return None
        if max(buf.rows for buf in self._buffers.values()) >= self.flush_rows:
            return 0.0
        return max(0.0, self._first_pending + self.flush_interval - self._clock())

    def flush_due(self) -> bool:
        wait = self.seconds_until_flush()
        return wait is not None and wait <= 0.0

    def flush(self) -> int:
        """Write the buffered rows, the ledger, gaps and changed run rows in one transaction.

        Returns the frames written. A failed write is rolled back, its frames counted as lost,
        and the accounting rebuilt from the file, so that a resent frame is stored, not dropped.
        """
        if self._first_pending is None and not self._dirty:
            return 0
        started, db, frames = time.perf_counter(), self._db(), self._pending_frames
        runs = [self.runs[run_id] for run_id in sorted(self._dirty)]
        try:
            batches = {name: buf.to_arrow() for name, buf in self._buffers.items() if buf.rows}
            batches["runs"] = _rows_table("runs", [run.row() for run in runs])
            gaps = [(run.run_id, g) for run in runs for g in run.unsaved_gaps]
            new = [(r, g.first, g.last, g.detected_us, g.filled_us) for r, g in gaps if not g.in_db]
            if new:
                batches["gaps"] = _rows_table("gaps", new)
            filled = [(r, g.first, g.filled_us) for r, g in gaps if g.in_db]
            db.execute("BEGIN TRANSACTION")
            for name, batch in batches.items():
                self._insert(name, batch, "INSERT OR REPLACE" if name == "runs" else "INSERT")
            if filled:
                self._update_filled_gaps(filled)
            db.execute("COMMIT")
        except Exception:
            log.exception("writing %d frames to %s failed; rebuilding the accounting",
                          frames, self.path)
            with contextlib.suppress(duckdb.Error):  # no transaction if it failed before BEGIN
                db.execute("ROLLBACK")
            self.counters["flush_errors"] += 1
            self.counters["frames_lost"] += frames
            self.runs = self._load_runs()
            self._reset_buffers()
            return 0
        for run in runs:
            run.saved()
        for name in DATA_TABLES:
            self.rows[name] += self._buffers[name].rows
        self.counters["frames_stored"] += frames
        self.counters["flushes"] += 1
        self._reset_buffers()
        self.last_flush_ms = (time.perf_counter() - started) * 1000
        return frames

    def _insert(self, table: str, batch: pa.Table, verb: str = "INSERT") -> None:
        db = self._db()
        db.register(f"batch_{table}", batch)
        try:
            db.execute(f"{verb} INTO {table} SELECT * FROM batch_{table}")
        finally:
            db.unregister(f"batch_{table}")

    def _update_filled_gaps(self, filled: list[tuple[str, int, int | None]]) -> None:
        db = self._db()
        run_ids, firsts, filled_at = zip(*filled, strict=True)
        db.register("batch_fills", pa.table({
            "run_id": pa.array(run_ids, pa.string()), "first_seq": pa.array(firsts, pa.int64()),
            "filled_at": pa.array(filled_at, pa.timestamp("us"))}))
        try:
            db.execute("UPDATE gaps SET filled_at = f.filled_at FROM batch_fills f "
                       "WHERE gaps.run_id = f.run_id AND gaps.first_seq = f.first_seq")
        finally:
            db.unregister("batch_fills")

    def _reset_buffers(self) -> None:
        for buf in self._buffers.values():
            buf.clear()
        self._dirty.clear()
        self._pending_frames = 0
        self._first_pending = None

    # --- answers and shutdown ---------------------------------------------------------------------

    def run_stats(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """RunStats of one run (empty when unknown) or of every run, by run id."""
        if run_id is not None:
            return [self.runs[run_id].stats()] if run_id in self.runs else []
        return [self.runs[r].stats() for r in sorted(self.runs)]

    def stats(self) -> dict[str, Any]:
        """Counters since this process started, rows stored per table, frames not yet written."""
        return {**self.counters, "rows": dict(self.rows), "pending": self._pending_frames,
                "runs": len(self.runs), "last_flush_ms": round(self.last_flush_ms, 3)}

    def account(self, run_id: str) -> RunAccount:
        """A run's accounting, created if new; the next flush writes its `runs` row and gaps."""
        self._db()
        run = self.runs.get(run_id)
        if run is None:
            run = self.runs[run_id] = RunAccount(run_id)
        self._dirty.add(run_id)
        return run

    def checkpoint(self) -> None:
        """Flush, then move everything from the WAL into the main file (`CHECKPOINT`): what is
        confirmed to a worker must survive the loss of the WAL."""
        self.flush()
        self._db().execute("CHECKPOINT")

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor on the single connection, for read-only queries."""
        return self._db().cursor()

    def close(self) -> None:
        """Flush, checkpoint and close; idempotent. Adding a frame later raises RuntimeError."""
        if self.conn is None:
            return
        try:
            self.flush()
            self.conn.execute("CHECKPOINT")
        finally:
            self.conn.close()
            self.conn = None
