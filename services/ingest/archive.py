"""Finished runs' step rows moved out of the DuckDB file into Parquet files, and back.

A run's archived rows lie in `<home>/archive/steps/run_id=<run>/part-<n>.parquet`. Once a run is
archived the base table is `steps_live` (every insert goes there) and `steps` is a view kept in
the database file: `steps_live UNION ALL BY NAME read_parquet([the archived files])`, so every
reader (the ingest's queries, a read-only open of the file, the viewers, replay) sees the rows as
if they had never moved. `archived_parts` records each file with its row count and checksum.

Nothing is lost by a crash at any point: a file is written beside its name, fsynced, renamed and
verified (row count and the sum of the rows' hashes) before the rows leave the table, and the
delete, the record and the new view commit in one transaction. Until that commit the file is not
in the view (queries see the rows once, in the table); a file that no record names was left by
an archive or restore that did not finish, and is removed when the store opens. A restore puts
the rows back and drops the record in one transaction, then removes the file.

Every function here runs on the ingest loop (the store's only writer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import duckdb

from gymbus.shared import schema
from gymbus.shared.errors import RequestError
from gymbus.shared.protocol import ErrorCode

log = logging.getLogger("gymbus.ingest")

#: the archived table, its base table while a part is archived, and the record of the parts
TABLE, LIVE = "steps", "steps_live"
PARTS = "archived_parts"
#: a stage name here makes the ingest stop at that stage of the next archive or restore (and
#: write `paused-<stage>` in the archive folder), so that tests can kill it there
PAUSE_ENV = "GYMBUS_ARCHIVE_PAUSE_AT"
STAGES = ("written", "renamed", "deleted", "committed", "restored", "restore_committed")
_SAFE_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def archive_root(db_path: Path) -> Path:
    """The archive folder beside the DuckDB file, in the gymbus home: `<home>/archive`."""
    return db_path.parent / "archive"


def live_table(conn: duckdb.DuckDBPyConnection, table: str) -> str:
    """The base table that inserts of `table` go to: `steps_live` once `steps` is the view."""
    if table != TABLE:
        return table
    kinds = dict(conn.execute("SELECT table_name, table_type FROM information_schema.tables "
                              "WHERE table_name IN (?, ?)", [TABLE, LIVE]).fetchall())
    return LIVE if kinds.get(TABLE) == "VIEW" and LIVE in kinds else TABLE


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _pause_at(stage: str, root: Path) -> None:
    """Hold the ingest forever at `stage` when PAUSE_ENV names it (tests kill it there)."""
    if os.environ.get(PAUSE_ENV) != stage:
        return
    (root / f"paused-{stage}").write_text(str(os.getpid()))
    log.warning("%s=%s: holding at this stage until killed", PAUSE_ENV, stage)
    while True:
        time.sleep(1.0)  # held on purpose: nothing else of this process may run on


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Archive:
    """The archived parts of one store, on the store's connection."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, root: Path) -> None:
        self.conn = conn
        self.root = root.resolve()  # as allowed_directories compares it
        #: the base table of `steps` (the inserts' target), kept as each commit leaves it
        self.live = TABLE

    # --- opening -----------------------------------------------------------------------------

    def open(self) -> None:
        """Create the record, remove files that no record names (an unfinished archive or
        restore left them: their rows are in the table), and build the view from the record.
        Runs before the store turns external access off."""
        conn = self.conn
        conn.execute(schema.ddl(PARTS))
        recorded = {p for (p,) in conn.execute(f"SELECT path FROM {PARTS}").fetchall()}
        folder = self.root / TABLE
        if folder.is_dir():
            for file in sorted(folder.glob("*/*")):
                rel = file.relative_to(self.root).as_posix()
                if rel not in recorded:
                    log.warning("removed %s: an archive or restore that did not finish left it; "
                                "its rows are in the table", file)
                    file.unlink()
        missing = sorted(p for p in recorded if not (self.root / p).is_file())
        for rel in missing:
            log.error("archived file %s is missing: its rows are gone from every query; put it "
                      "back and restart the ingest", self.root / rel)
        if recorded:
            conn.execute(self._view_sql())
        self.live = live_table(conn, TABLE)

    def _paths(self) -> list[str]:
        rows = self.conn.execute(f"SELECT path FROM {PARTS} ORDER BY path").fetchall()
        return [str(self.root / p) for (p,) in rows if (self.root / p).is_file()]

    def _view_sql(self) -> str:
        paths = self._paths()
        if not paths:
            return f"CREATE OR REPLACE VIEW {TABLE} AS SELECT * FROM {LIVE}"
        files = ", ".join(_quote(p) for p in paths)
        return (f"CREATE OR REPLACE VIEW {TABLE} AS SELECT * FROM {LIVE} UNION ALL BY NAME "
                f"SELECT * FROM read_parquet([{files}], union_by_name = true)")

    def allowed_directories(self) -> list[str]:
        """What the store's connection may read once external access is off: the archive."""
        self.root.mkdir(parents=True, exist_ok=True)
        return [str(self.root) + os.sep]

    # --- what is archived ----------------------------------------------------------------------

    def checksum(self, source: str) -> tuple[int, int]:
        """(rows, sum of the rows' hashes) of a SELECT's rows: equal rows give equal sums."""
        row = self.conn.execute(f"SELECT count(*), coalesce(sum(hash(t)::HUGEINT), 0) "
                                f"FROM ({source}) t").fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def runs_archived(self) -> dict[str, int]:
        """Archived rows by run."""
        return dict(self.conn.execute(
            f"SELECT run_id, sum(rows)::BIGINT FROM {PARTS} GROUP BY run_id").fetchall())

    def finished_before(self, cutoff_us: int) -> list[str]:
        """Runs with step rows that ended before `cutoff_us` (epoch microseconds), not archived
        yet."""
        rows = self.conn.execute(
            "SELECT run_id FROM runs WHERE ended_at IS NOT NULL AND epoch_us(ended_at) < ? "
            "AND coalesce(steps, 0) > 0 "
            f"AND run_id NOT IN (SELECT run_id FROM {PARTS}) ORDER BY ended_at, run_id",
            [cutoff_us]).fetchall()
        return [r for (r,) in rows]

    def check_finished(self, run_id: str) -> None:
        """RequestError unless the run is stored and has ended."""
        row = self.conn.execute("SELECT ended_at IS NOT NULL FROM runs WHERE run_id = ?",
                                [run_id]).fetchone()
        if row is None:
            raise RequestError(ErrorCode.UNKNOWN_RUN, f"the ingest holds no run {run_id}")
        if not row[0]:
            raise RequestError(ErrorCode.BAD_REQUEST, f"run {run_id} has not finished (no "
                               "run_completed stored): only finished runs are archived")

    # --- archive and restore ---------------------------------------------------------------------

    def _folder(self, run_id: str) -> Path:
        name = run_id if _SAFE_RUN_ID.fullmatch(run_id) else f"x{run_id.encode().hex()[:120]}"
        return self.root / TABLE / f"run_id={name}"

    def archive_run(self, run_id: str) -> dict[str, Any]:
        """Move the run's rows of the base table into a new Parquet part. The reply names the
        rows moved (0 when the table held none), the file and its size."""
        conn, live = self.conn, self.live
        select = f"SELECT * FROM {live} WHERE run_id = {_quote(run_id)}"
        rows, checksum = self.checksum(select)
        if not rows:
            return {"run_id": run_id, "rows": 0, "path": None, "bytes": 0}
        folder = self._folder(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        index = len(list(folder.glob("part-*.parquet")))
        final = folder / f"part-{index}.parquet"
        temp = final.with_name(final.name + ".tmp")
        conn.execute(f"COPY ({select}) TO {_quote(str(temp))} "
                     "(FORMAT parquet, COMPRESSION zstd)")
        _fsync(temp)
        _pause_at("written", self.root)
        os.replace(temp, final)
        _fsync(folder)
        _fsync(folder.parent)
        _pause_at("renamed", self.root)
        if self.checksum(f"SELECT * FROM read_parquet({_quote(str(final))})") != (rows, checksum):
            final.unlink()
            raise RequestError(ErrorCode.INTERNAL, f"the Parquet file written for run {run_id} "
                               "does not read back as its rows: nothing was moved")
        size = final.stat().st_size
        rel = final.relative_to(self.root).as_posix()
        conn.execute("BEGIN TRANSACTION")
        try:
            if live == TABLE:
                conn.execute(f"ALTER TABLE {TABLE} RENAME TO {LIVE}")
            deleted = conn.execute(f"DELETE FROM {LIVE} WHERE run_id = ?", [run_id]).fetchone()
            if deleted is None or int(deleted[0]) != rows:
                raise RequestError(ErrorCode.INTERNAL, f"run {run_id}'s rows changed while "
                                   "archived: nothing was moved")
            conn.execute(f"INSERT INTO {PARTS} VALUES (?, ?, ?, ?, ?, now()::TIMESTAMP)",
                         [rel, run_id, rows, checksum, size])
            conn.execute(self._view_sql())
            _pause_at("deleted", self.root)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            final.unlink(missing_ok=True)
            raise
        finally:
            self.live = live_table(conn, TABLE)
        _pause_at("committed", self.root)
        conn.execute("CHECKPOINT")
        return {"run_id": run_id, "rows": rows, "path": str(final), "bytes": size}

    def restore_run(self, run_id: str) -> dict[str, Any]:
        """Put the run's archived rows back into the base table and remove its parts; with the
        last part gone, `steps` is the table again."""
        conn = self.conn
        parts = conn.execute(f"SELECT path, rows, checksum FROM {PARTS} WHERE run_id = ? "
                             "ORDER BY path", [run_id]).fetchall()
        if not parts:
            raise RequestError(ErrorCode.UNKNOWN_RUN, f"run {run_id} has no archived rows")
        for rel, rows, checksum in parts:
            file = self.root / rel
            if not file.is_file():
                raise RequestError(ErrorCode.INTERNAL, f"{file} is missing: nothing restored")
            source = f"SELECT * FROM read_parquet({_quote(str(file))})"
            if self.checksum(source) != (rows, int(checksum)):
                raise RequestError(ErrorCode.INTERNAL,
                                   f"{file} does not hold the rows recorded: nothing restored")
        conn.execute("BEGIN TRANSACTION")
        try:
            for rel, _, _ in parts:
                conn.execute(f"INSERT INTO {self.live} BY NAME SELECT * FROM "
                             f"read_parquet({_quote(str(self.root / rel))})")
            conn.execute(f"DELETE FROM {PARTS} WHERE run_id = ?", [run_id])
            if conn.execute(f"SELECT count(*) FROM {PARTS}").fetchone() == (0,):
                conn.execute(f"DROP VIEW {TABLE}")
                conn.execute(f"ALTER TABLE {LIVE} RENAME TO {TABLE}")
            else:
                conn.execute(self._view_sql())
            _pause_at("restored", self.root)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            self.live = live_table(conn, TABLE)
        conn.execute("CHECKPOINT")
        _pause_at("restore_committed", self.root)
        for rel, _, _ in parts:
            (self.root / rel).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the run's folder, once empty
            self._folder(run_id).rmdir()
        with_rows = sum(int(r) for _, r, _ in parts)
        return {"run_id": run_id, "rows": with_rows, "parts": len(parts)}


# --- the ingest's requests -----------------------------------------------------------------------


def _run_ids(body: dict[str, Any]) -> list[str]:
    run_ids = body.get("run_ids", [])
    if not isinstance(run_ids, list) or not all(isinstance(r, str) and 0 < len(r) <= 128
                                                for r in run_ids):
        raise RequestError(ErrorCode.BAD_REQUEST, "run_ids must be a list of run ids")
    return list(dict.fromkeys(run_ids))


def archive_request(archive: Archive, body: dict[str, Any]) -> dict[str, Any]:
    """`archive`: the runs named (`run_ids`), or those that ended over `older_than_s` seconds
    ago; with `dry_run`, only which runs those are. The store is flushed already."""
    run_ids, older = _run_ids(body), body.get("older_than_s")
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise RequestError(ErrorCode.BAD_REQUEST, "dry_run must be a boolean")
    if older is not None and (type(older) not in (int, float) or not older >= 0):
        raise RequestError(ErrorCode.BAD_REQUEST, "older_than_s must be a number >= 0")
    if (older is None) == (not run_ids):
        raise RequestError(ErrorCode.BAD_REQUEST,
                           "give either run_ids or older_than_s (not both)")
    if older is not None:
        run_ids = archive.finished_before(time.time_ns() // 1000 - int(older * 1e6))
    for run_id in run_ids:
        archive.check_finished(run_id)
    if dry_run:
        return {"runs": [{"run_id": r} for r in run_ids]}
    return {"runs": [archive.archive_run(r) for r in run_ids]}


def restore_request(archive: Archive, body: dict[str, Any]) -> dict[str, Any]:
    """`restore`: the named runs' archived rows back into the table."""
    run_ids = _run_ids(body)
    if not run_ids:
        raise RequestError(ErrorCode.BAD_REQUEST, "restore needs run_ids")
    archived = archive.runs_archived()
    for run_id in run_ids:
        if run_id not in archived:
            raise RequestError(ErrorCode.UNKNOWN_RUN, f"run {run_id} has no archived rows")
    return {"runs": [archive.restore_run(r) for r in run_ids]}
