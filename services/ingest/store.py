"""The ingest's DuckDB store: its tables, written through Arrow row buffers, and per-run accounting.

`Store` is the only writer of the DuckDB file; every method of this module runs on the ingest
loop (one thread). A frame is checked against its run's stored seqs as it arrives, buffered per
table as column chunks, and written by `flush` in one transaction with the ledger, the gaps and
the run rows, so that the file and the accounting rebuilt from it always agree. The tables and
how a frame's columns map onto them come from the column schema (`gymbus.shared.schema`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from gymbus.services.ingest.archive import Archive, archive_root, live_table
from gymbus.services.ingest.buffers import ArrowColumns, Chunk, Repeated, TableBuffer, rows_table
from gymbus.services.ingest.runs import Gap, RunAccount
from gymbus.shared import schema
from gymbus.shared.codec import Frame
from gymbus.shared.protocol import FrameKind, LifecycleEvent
from gymbus.shared.schema import Column, Type

log = logging.getLogger("gymbus.ingest")

#: the Arrow type a buffer builds for each SQL type of the schema
ARROW_TYPES: dict[str, pa.DataType] = {
    "VARCHAR": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(), "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(), "TIMESTAMP": pa.timestamp("us"), "BLOB": pa.binary(),
    "DOUBLE[]": pa.large_list(pa.float64()),
    "HUGEINT": pa.decimal128(38, 0),  # as DuckDB gives a 128-bit integer to Arrow
}
#: table -> [(column, Arrow type)] in table order (a constraint after the SQL type, such as
#: PRIMARY KEY, does not change it)
COLUMNS: dict[str, ArrowColumns] = {
    table: [(name, ARROW_TYPES[sql.split()[0]]) for name, sql in columns]
    for table, columns in schema.TABLES.items()
}
#: tables filled from frame buffers; the data tables among them count rows in `stats`
DATA_TABLES = ("lifecycle", *schema.FRAME_TABLES.values())
BUFFERED = ("frames", *DATA_TABLES, "dead_letters")
DEAD_LETTER_PAYLOAD_BYTES = 64 * 1024
#: a buffer this full is written at once: above DuckDB's row group (122,880 rows), a large
#: insert goes to the file in whole row groups instead of through the write-ahead log
FLUSH_ROWS = 131_072
#: seconds the first buffered frame waits at most. Every query and run_stats flushes first, and
#: viewers follow the live stream, so this bounds only what a crash can take from the buffers
#: (the spools bring it back); a longer interval writes bigger, cheaper batches (measured: 0.2 s
#: costs ~20% more ingest CPU per row than 0.5 s at 100k steps/s)
FLUSH_INTERVAL = 0.5


def wal_path(db_path: Path) -> Path:
    """DuckDB's write-ahead log beside the database file: `<file>.wal`."""
    return db_path.with_name(db_path.name + ".wal")


def create_schema(conn: duckdb.DuckDBPyConnection) -> None:
    """Create the tables that do not exist yet, and add the columns an existing file lacks
    (a file written before a column was added to the schema: its old rows hold NULL)."""
    for table in schema.TABLES:
        conn.execute(schema.ddl(table))  # nothing when the name is the archive's view
        base = live_table(conn, table)  # an archived table's columns go to its base table
        have = {row[0] for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
            [base]).fetchall()}
        for name, sql in schema.TABLES[table]:
            if name not in have:
                conn.execute(f'ALTER TABLE {base} ADD COLUMN "{name}" {sql.split()[0]}')


#: each frame kind's columns with the names of the table columns that hold them
STORED_NAMES: dict[FrameKind, tuple[tuple[Column, tuple[str, ...]], ...]] = {
    kind: tuple((c, tuple(name for name, _ in schema.stored_columns(c))) for c in columns)
    for kind, columns in schema.FRAME_COLUMNS.items()
}


def _frame_chunks(frame: Frame) -> dict[str, Chunk]:
    """A columnar frame's rows as column chunks of its table: the header columns repeated
    (`schema.FRAME_HEADER`), then each frame column as the table columns that hold it."""
    n, body = frame.rows, frame.body
    chunks: dict[str, Chunk] = {}
    for name, _ in schema.FRAME_HEADER:
        value = getattr(frame, name)
        chunks[name] = Repeated(value, n) if isinstance(value, str) else np.full(n, value)
    for column, names in STORED_NAMES[frame.kind]:
        values = body.get(column.name)
        if values is None:  # an optional column left out: NULL rows
            continue
        if column.type is Type.OBS:  # an integer per row, or a row of numbers per row
            vector = values.ndim == 2
            chunks[names[0]], chunks[names[1]] = (None, values) if vector else (values, None)
        elif column.type is Type.TIME:  # nanoseconds on the wire, Arrow's timestamp("us") here
            chunks[names[0]] = values // 1000
        else:
            chunks[names[0]] = values
    return chunks


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
        self.archive = Archive(self.conn, archive_root(path))
        self.archive.open()
        # queries come over the network: they may read this database and its archived Parquet
        # files (the `steps` view reads them), not the host's other files
        self.conn.execute("SET allowed_directories = ?", [self.archive.allowed_directories()])
        self.conn.execute("SET enable_external_access = false")
        self.runs = self._load_runs()
        self._buffers = {name: TableBuffer(COLUMNS[name]) for name in BUFFERED}
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
        names = (RunAccount.ROW_FIELDS + RunAccount.COUNTERS + RunAccount.LABELS
                 + RunAccount.NOT_STORED)
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
        table = schema.FRAME_TABLES[frame.kind]
        run.count_rows(table, frame.rows)
        self._buffers[table].append(frame.rows, _frame_chunks(frame))
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
            for name in RunAccount.LABELS:
                setattr(run, name, _opt_str(body.get(name, config.get(name))))
            run.started_at = ts_us
        elif event is LifecycleEvent.RUN_COMPLETED:
            run.status, run.reason = _opt_str(body.get("status")), _opt_str(body.get("reason"))
            run.ended_at = ts_us
            for name in RunAccount.NOT_STORED:
                setattr(run, name, _opt_int(body.get(name)))
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
            batches["runs"] = rows_table(COLUMNS["runs"], [run.row() for run in runs])
            gaps = [(run.run_id, g) for run in runs for g in run.unsaved_gaps]
            new = [(r, g.first, g.last, g.detected_us, g.filled_us) for r, g in gaps if not g.in_db]
            if new:
                batches["gaps"] = rows_table(COLUMNS["gaps"], new)
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
        target = self.archive.live if table == "steps" else table
        db.register(f"batch_{table}", batch)
        try:
            db.execute(f"{verb} INTO {target} BY NAME SELECT * FROM batch_{table}")
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
