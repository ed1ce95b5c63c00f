"""Stored runs out of the store: each table of each run as Parquet or CSV, partitioned by run.

Every read goes through `StoreClient.arrow` (the ingest's query API in its Arrow reply format, or
the DuckDB file read-only when no ingest answers), so what the store serves, from its tables or
from views over archived files, is what is exported. A run's rows are read in pages of whole
frames (`seq` ranges of at most about `PAGE_ROWS` rows, taken from the `frames` ledger), so
that no reply is larger than a page and the ingest answers other requests between two pages.

The layout is hive-style: `OUT/<table>/run_id=<run id>/part-0.parquet` (or `.csv`). The run id
lives in the folder name, not in the file, as DuckDB (`hive_partitioning`), pyarrow and pandas
(`read_parquet(OUT/"steps")`) expect.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from gymbus.services.ingest.client import ROWS_LIMIT, StoreClient
from gymbus.shared import schema
from gymbus.shared.errors import ConfigError, NotFound
from gymbus.shared.protocol import FrameKind
from gymbus.shared.queries import sql_str, sql_strs

#: the tables exported per run, in this order (dead_letters belong to no run)
EXPORT_TABLES = ("runs", "lifecycle", "frames", "episodes", "steps", "metrics", "gaps")
#: tables whose rows come from frames: the frame kind whose ledger pages them
PAGED: dict[str, FrameKind | None] = {
    "lifecycle": FrameKind.LIFECYCLE, "episodes": FrameKind.EPISODE, "steps": FrameKind.STEP,
    "metrics": FrameKind.METRIC, "frames": None}
#: the row order within a page, per table (frame rows: their episode and step order)
ORDER: dict[str, str] = {
    "runs": "run_id", "lifecycle": "seq", "frames": "seq", "gaps": "first_seq",
    "episodes": "episode, env_index, seq", "steps": "episode, env_index, step, seq",
    "metrics": "seq, name, step"}
#: rows asked for in one page (whole frames: a page may hold a frame's rows more)
PAGE_ROWS = 100_000
FORMATS = ("parquet", "csv")
#: progress lines go to this function (the CLI's stderr)
Progress = Callable[[str], None]


def _quiet(line: str) -> None:
    pass


def resolve_runs(client: StoreClient, run_ids: tuple[str, ...] | list[str],
                 group: str | None) -> list[str]:
    """The runs named, or the runs of `group`, as stored; NotFound naming any that is not."""
    if group:
        rows = client.rows(group_runs(group))
        if not rows:
            raise NotFound(f"no stored run belongs to group {group!r} (a run's group is the "
                           "`group` of its config or of its tags)")
        return [str(r["run_id"]) for r in rows]
    if not run_ids:
        raise ConfigError("runs", "name at least one run id, or --group")
    stored = {r["run_id"] for r in client.rows(
        f"SELECT run_id FROM runs WHERE run_id IN {sql_strs(run_ids)}")}
    missing = [r for r in run_ids if r not in stored]
    if missing:
        raise NotFound(f"not stored: {', '.join(missing)} (gymbus runs lists the runs)")
    return list(dict.fromkeys(run_ids))


def group_runs(group: str) -> str:
    """The runs of a group, by start: the `group` of a run's config (a submitted run), of the
    config its script gave (`gymbus.run(config=...)`), or of its tags."""
    g = sql_str(group)
    return ("SELECT run_id FROM runs WHERE json_extract_string(config, '$.group') = " + g
            + " OR json_extract_string(config, '$.config.group') = " + g
            + " OR json_extract_string(config, '$.tags.group') = " + g
            + " ORDER BY started_at NULLS LAST, run_id")


def seq_pages(client: StoreClient, run_id: str, kind: FrameKind | None,
              page_rows: int = PAGE_ROWS) -> list[tuple[int, int]]:
    """(first seq, last seq) ranges of the run's frames of `kind` (every frame: None) holding
    about `page_rows` rows each, in seq order."""
    where = f"run_id = {sql_str(run_id)}"
    if kind is not None:
        where += f" AND kind = {sql_str(kind.value)}"
    ledger = client.arrow(f"SELECT seq, rows FROM frames WHERE {where} ORDER BY seq",
                          max_rows=ROWS_LIMIT)
    seqs = ledger.column("seq").to_pylist()
    rows = ledger.column("rows").to_pylist() if kind is not None else [1] * len(seqs)
    pages: list[tuple[int, int]] = []
    first, count = None, 0
    for seq, n in zip(seqs, rows, strict=True):
        first = seq if first is None else first
        count += max(int(n or 0), 1)
        if count >= page_rows:
            pages.append((first, seq))
            first, count = None, 0
    if first is not None:
        pages.append((first, seqs[-1]))
    return pages


def table_pages(client: StoreClient, table: str, run_id: str, *, select: str = "*",
                where: str = "", page_rows: int = PAGE_ROWS) -> Iterator[pa.Table]:
    """One run's rows of a table as Arrow tables, a page at a time (at least one page, maybe
    empty, so that its columns are known). `where` narrows them further (SQL, ANDed)."""
    base = f"SELECT {select} FROM {table} WHERE run_id = {sql_str(run_id)}"
    if where:
        base += f" AND ({where})"
    order = f" ORDER BY {ORDER.get(table, 'run_id')}"
    if table not in PAGED:
        yield client.arrow(base + order, max_rows=ROWS_LIMIT)
        return
    pages = seq_pages(client, run_id, PAGED[table], page_rows)
    if not pages:
        yield client.arrow(base + " AND false", max_rows=0)
        return
    for lo, hi in pages:
        yield client.arrow(f"{base} AND seq BETWEEN {int(lo)} AND {int(hi)}{order}",
                           max_rows=ROWS_LIMIT)


class _Writer(Protocol):
    def write(self, table: pa.Table) -> None: ...
    def close(self) -> None: ...


class _ParquetFile:
    def __init__(self, path: Path, table_schema: pa.Schema) -> None:
        self.writer = pq.ParquetWriter(path, table_schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()


class _CsvFile:
    def __init__(self, path: Path, table_schema: pa.Schema) -> None:
        self.writer = pacsv.CSVWriter(path, table_schema)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()


def partition(out: Path, table: str, run_id: str) -> Path:
    """The folder of one run's rows of a table: `out/<table>/run_id=<run id, URI-quoted>`."""
    return out / table / f"run_id={quote(run_id, safe='')}"


def csv_select(table: str) -> str:
    """`*` with list columns as their text (`[0.1, 0.2]`): CSV holds no lists."""
    lists = [name for name, sql in schema.TABLES.get(table, ()) if sql.endswith("[]")]
    if not lists:
        return "*"
    return "* REPLACE (" + ", ".join(f'CAST("{c}" AS VARCHAR) AS "{c}"' for c in lists) + ")"


@dataclass
class Exported:
    """What one export wrote: rows per table, files, bytes and seconds."""

    out: Path
    fmt: str
    runs: list[str]
    rows: dict[str, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        total = sum(self.rows.values())
        return {"out": str(self.out), "format": self.fmt, "runs": self.runs, "rows": self.rows,
                "total_rows": total, "files": self.files, "bytes": self.bytes,
                "seconds": round(self.seconds, 3),
                "rows_per_s": round(total / self.seconds) if self.seconds > 0 else None}


def export_tables(client: StoreClient, run_ids: list[str], out: Path, fmt: str,
                  progress: Progress = _quiet, page_rows: int = PAGE_ROWS) -> Exported:
    """Write every table of each run under `out` in `fmt` (parquet or csv), one file per table
    per run; a run exported before is replaced. Returns what was written."""
    if fmt not in FORMATS:
        raise ConfigError("format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    started = time.perf_counter()
    done = Exported(out, fmt, run_ids, rows=dict.fromkeys(EXPORT_TABLES, 0))
    for run_id in run_ids:
        for table in EXPORT_TABLES:
            folder = partition(out, table, run_id)
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            path = folder / f"part-0.{fmt}"
            select = csv_select(table) if fmt == "csv" else "*"
            writer: _Writer | None = None
            rows = 0
            try:
                for page in table_pages(client, table, run_id, select=select,
                                        page_rows=page_rows):
                    page = page.drop_columns(["run_id"])
                    if writer is None:
                        writer = (_ParquetFile if fmt == "parquet" else _CsvFile)(
                            path, page.schema)
                    writer.write(page)
                    rows += page.num_rows
                    if table == "steps":
                        progress(f"{run_id} steps: {rows:,} rows")
            finally:
                if writer is not None:
                    writer.close()
            done.rows[table] += rows
            done.files += 1
            done.bytes += path.stat().st_size
        progress(f"{run_id}: exported ({fmt}) to {out}")
    done.seconds = time.perf_counter() - started
    return done
