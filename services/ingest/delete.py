"""The ingest's `delete_run`: every row of one run removed from every table, and its accounting.

Runs on the ingest loop, like every write: the buffers are flushed first (a frame of the run
still buffered is written, then deleted with the rest), then one transaction deletes the run's
rows from each table that has a `run_id` column. Nothing of any other run is touched, and the
process counters (`ingest_stats`: frames received, stored, rows written since start) stay as
they were: they count what this process did, not what the file holds. The space is reused by
later writes, and DuckDB gives back what it can at the next checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import duckdb

from gymbus.services.ingest.store import Store
from gymbus.shared import schema
from gymbus.shared.errors import RequestError
from gymbus.shared.protocol import ErrorCode

log = logging.getLogger("gymbus.ingest")

#: the tables that hold rows of runs: those with a run_id column (dead letters have none)
RUN_TABLES = tuple(table for table, columns in schema.TABLES.items()
                   if any(name == "run_id" for name, _ in columns))


def delete_run(store: Store, body: dict[str, Any]) -> dict[str, Any]:
    """Delete the rows of `body["run_id"]`; the reply counts them per table. `unknown_run`
    when the ingest holds nothing of the run."""
    run_id = body.get("run_id")
    if not isinstance(run_id, str) or not 0 < len(run_id) <= 128:
        raise RequestError(ErrorCode.BAD_REQUEST, "run_id must be a string of 1-128 chars")
    store.flush()
    if run_id not in store.runs:
        raise RequestError(ErrorCode.UNKNOWN_RUN, f"the ingest holds no frame of run {run_id}")
    if run_id in store.archive.runs_archived():
        raise RequestError(ErrorCode.BAD_REQUEST, f"the steps of run {run_id} are archived to "
                                                  "Parquet: restore them first, then remove it")
    db = store.cursor()
    rows: dict[str, int] = {}
    try:
        db.execute("BEGIN TRANSACTION")
        for table in RUN_TABLES:
            target = store.archive.live if table == "steps" else table  # steps may be a view
            deleted = db.execute(f"DELETE FROM {target} WHERE run_id = ?", [run_id]).fetchone()
            rows[table] = int(deleted[0]) if deleted else 0
        db.execute("COMMIT")
    except duckdb.Error as exc:
        db.execute("ROLLBACK")
        log.exception("deleting run %s failed; nothing of it was deleted", run_id)
        raise RequestError(ErrorCode.INTERNAL, f"deleting run {run_id} failed, nothing was "
                                               f"deleted: {exc}") from None
    finally:
        db.close()
    del store.runs[run_id]
    log.info("deleted run %s: %d rows", run_id, sum(rows.values()))
    return {"run_id": run_id, "rows": rows}
