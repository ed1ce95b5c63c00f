"""The column schema: every columnar frame kind's columns and every table of the store, once.

A frame kind's columns are declared here as `Column`s (name, wire type, whether a frame may
leave it out); the codec's checks (`gymbus.shared.codec`), the emitter's column conversion
(`gymbus.worker.telemetry.columns`) and the store's tables (`gymbus.services.ingest.store`:
DuckDB DDL and Arrow types) are all derived from them. Adding a column to a frame kind is one
line in `FRAME_COLUMNS`: its table gets the matching SQL column, in new files and, when the
ingest opens it, in an existing one (`ALTER TABLE ... ADD COLUMN`; rows are inserted by name).

A frame kind's table holds, in order, the header columns (`FRAME_HEADER`), then the frame's
columns, where a `TIME` column (nanoseconds on the wire) becomes a TIMESTAMP named without its
`_ns` and an `OBS` column becomes two: `obs` (a Discrete observation) and `obs_vec` (a Box's
values). The tables that are not filled from columnar frames are declared as they are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gymbus.shared.protocol import FrameKind


class Type(StrEnum):
    """The type of a frame column on the wire."""

    INT = "int"  # 64-bit signed
    FLOAT = "float"  # finite, stored as DOUBLE
    BOOL = "bool"
    STR = "str"
    OBS = "obs"  # an integer per row, or a row of numbers (equal length) per row
    TIME = "time"  # nanoseconds since the epoch (an INT on the wire), a TIMESTAMP in the store


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a columnar frame kind."""

    name: str
    type: Type
    #: a frame may leave the column out; its rows are NULL in the store
    optional: bool = False


FRAME_COLUMNS: dict[FrameKind, tuple[Column, ...]] = {
    FrameKind.STEP: (
        Column("episode", Type.INT),
        Column("step", Type.INT),  # within the episode, from 0
        # an int (Discrete) or a row of numbers (every other space); NULL when not stored
        Column("action", Type.OBS, optional=True),
        Column("obs", Type.OBS, optional=True),  # the observation the step led to
        Column("reward", Type.FLOAT),
        Column("terminated", Type.BOOL),
        Column("truncated", Type.BOOL),
        Column("label", Type.STR, optional=True),
        Column("env_index", Type.INT, optional=True),  # the sub-environment of a vector env
        Column("info", Type.STR, optional=True),  # the info keys a recorded run names, as JSON
    ),
    FrameKind.EPISODE: (
        Column("episode", Type.INT),
        Column("return", Type.FLOAT),
        Column("length", Type.INT),
        Column("terminated", Type.BOOL),
        Column("truncated", Type.BOOL),
        Column("ts_ns", Type.TIME),
        Column("env_index", Type.INT, optional=True),
        Column("seed", Type.INT, optional=True),  # the seed of the reset that started it
        Column("reset_obs", Type.OBS, optional=True),  # the observation it started from
        Column("reset_info", Type.STR, optional=True),  # the named keys of the reset info
    ),
    FrameKind.METRIC: (
        Column("name", Type.STR),
        Column("step", Type.INT),
        Column("value", Type.FLOAT),
        Column("ts_ns", Type.TIME),
    ),
}
#: scalar (non-column) fields a columnar body may carry, all optional integers
FRAME_SCALARS: dict[FrameKind, tuple[str, ...]] = {
    FrameKind.STEP: ("t0_ns",),  # the build time of the frame's first row
    FrameKind.EPISODE: (),
    FrameKind.METRIC: (),
}
#: the table each columnar frame kind's rows go to
FRAME_TABLES: dict[FrameKind, str] = {
    FrameKind.STEP: "steps", FrameKind.EPISODE: "episodes", FrameKind.METRIC: "metrics"}
#: the columns every frame table starts with, from the frame's header
FRAME_HEADER: tuple[tuple[str, str], ...] = (
    ("run_id", "VARCHAR"), ("seq", "BIGINT"), ("agent_id", "VARCHAR"))

SQL_TYPES: dict[Type, str] = {
    Type.INT: "BIGINT", Type.FLOAT: "DOUBLE", Type.BOOL: "BOOLEAN", Type.STR: "VARCHAR",
    Type.TIME: "TIMESTAMP",
}
#: the Python type of a scalar column's values (OBS has none: an int or a row of numbers)
PYTHON_TYPES: dict[Type, type] = {
    Type.INT: int, Type.FLOAT: float, Type.BOOL: bool, Type.STR: str, Type.TIME: int}

#: the tables not filled from columnar frames, as stored. TIMESTAMP columns hold UTC; `gaps`
#: keeps each run of missing seqs found (filled_at stays NULL until every seq in it is stored).
OTHER_TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "runs": (
        ("run_id", "VARCHAR PRIMARY KEY"), ("agent_id", "VARCHAR"), ("worker_id", "VARCHAR"),
        ("env", "VARCHAR"), ("algo", "VARCHAR"), ("telemetry", "VARCHAR"), ("seed", "BIGINT"),
        ("config", "VARCHAR"), ("started_at", "TIMESTAMP"), ("ended_at", "TIMESTAMP"),
        ("status", "VARCHAR"), ("reason", "VARCHAR"), ("frames_emitted", "BIGINT"),
        ("frames_stored", "BIGINT"), ("last_seq", "BIGINT"), ("gaps", "BIGINT"),
        ("duplicates", "BIGINT"), ("complete", "BOOLEAN"), ("episodes", "BIGINT"),
        ("steps", "BIGINT"), ("metrics", "BIGINT"),
        # from run_started: what made the run (gymbus, sb3, cleanrl, custom) and its labels
        ("name", "VARCHAR"), ("backend", "VARCHAR"), ("policy_label", "VARCHAR"),
        ("render_hint", "VARCHAR"),
        # from run_completed: steps stored without their observation (too large, or of a
        # space that cannot be stored), and rows refused (NaN or infinite values)
        ("obs_not_stored", "BIGINT"), ("rows_refused", "BIGINT"),
    ),
    "frames": (
        ("run_id", "VARCHAR"), ("seq", "BIGINT"), ("kind", "VARCHAR"), ("ts_ns", "BIGINT"),
        ("rows", "INTEGER"), ("received_at", "TIMESTAMP"),
    ),
    "lifecycle": (
        ("run_id", "VARCHAR"), ("seq", "BIGINT"), ("ts", "TIMESTAMP"), ("agent_id", "VARCHAR"),
        ("worker_id", "VARCHAR"), ("event", "VARCHAR"), ("status", "VARCHAR"),
        ("reason", "VARCHAR"), ("name", "VARCHAR"), ("path", "VARCHAR"), ("format", "VARCHAR"),
        ("frames_emitted", "BIGINT"), ("episodes", "BIGINT"), ("steps", "BIGINT"),
    ),
    "dead_letters": (
        ("received_at", "TIMESTAMP"), ("reason", "VARCHAR"), ("topic", "VARCHAR"),
        ("size", "BIGINT"), ("payload", "BLOB"),
    ),
    "gaps": (
        ("run_id", "VARCHAR"), ("first_seq", "BIGINT"), ("last_seq", "BIGINT"),
        ("detected_at", "TIMESTAMP"), ("filled_at", "TIMESTAMP"),
    ),
    # the Parquet files that archived runs' step rows moved to (services/ingest/archive.py)
    "archived_parts": (
        ("path", "VARCHAR PRIMARY KEY"), ("run_id", "VARCHAR"), ("rows", "BIGINT"),
        ("checksum", "HUGEINT"), ("bytes", "BIGINT"), ("archived_at", "TIMESTAMP"),
    ),
}


def stored_columns(column: Column) -> tuple[tuple[str, str], ...]:
    """The table columns (name, SQL type) that hold a frame column."""
    if column.type is Type.OBS:
        return ((column.name, "BIGINT"), (f"{column.name}_vec", "DOUBLE[]"))
    if column.type is Type.TIME:
        return ((column.name.removesuffix("_ns"), "TIMESTAMP"),)
    return ((column.name, SQL_TYPES[column.type]),)


def _frame_table(kind: FrameKind) -> tuple[tuple[str, str], ...]:
    return FRAME_HEADER + tuple(c for col in FRAME_COLUMNS[kind] for c in stored_columns(col))


#: every table of the store: name -> ((column, SQL type), ...), in column order
TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "runs": OTHER_TABLES["runs"],
    "frames": OTHER_TABLES["frames"],
    "lifecycle": OTHER_TABLES["lifecycle"],
    **{FRAME_TABLES[kind]: _frame_table(kind) for kind in FRAME_COLUMNS},
    "dead_letters": OTHER_TABLES["dead_letters"],
    "gaps": OTHER_TABLES["gaps"],
    "archived_parts": OTHER_TABLES["archived_parts"],
}


def ddl(table: str) -> str:
    """`CREATE TABLE IF NOT EXISTS` for a table (names quoted: `return` is a keyword)."""
    cols = ", ".join(f'"{name}" {sql}' for name, sql in TABLES[table])
    return f"CREATE TABLE IF NOT EXISTS {table} ({cols})"


def column_names(kind: FrameKind) -> tuple[str, ...]:
    """A frame kind's column names in order: the order of the emitter's row tuples."""
    return tuple(c.name for c in FRAME_COLUMNS[kind])


def python_types(kind: FrameKind, *, skip: frozenset[Type] = frozenset()) -> dict[str, type]:
    """name -> Python type of a frame kind's scalar columns (not OBS, not those in `skip`)."""
    return {c.name: PYTHON_TYPES[c.type] for c in FRAME_COLUMNS[kind]
            if c.type in PYTHON_TYPES and c.type not in skip}
