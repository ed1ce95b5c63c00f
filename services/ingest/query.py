"""Read-only queries for the ingest API: the statement check, the run, and the results, as
msgpack-able rows or as Arrow IPC bytes (the `arrow` reply format, for large results).

Everything here runs on the ingest loop, on a cursor of the store's single connection, between
two flushes (so no write is in flight while a query reads).
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import duckdb
import pyarrow as pa

from gymbus.shared.errors import RequestError
from gymbus.shared.protocol import ErrorCode

DEFAULT_MAX_ROWS = 100_000
#: the most rows one reply may carry, whatever `max_rows` asks
MAX_ROWS_LIMIT = 1_000_000
#: statement types that only read (DESCRIBE, SHOW and SUMMARIZE parse as SELECT)
READ_ONLY_TYPES = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})
_T = duckdb.StatementType
#: statement types refused as writes (anything else outside READ_ONLY_TYPES is refused as well)
_WRITING_TYPES = frozenset({
    _T.INSERT, _T.UPDATE, _T.DELETE, _T.MERGE_INTO, _T.CREATE, _T.CREATE_FUNC, _T.DROP, _T.ALTER,
    _T.COPY, _T.COPY_DATABASE, _T.EXPORT, _T.ATTACH, _T.DETACH, _T.VACUUM, _T.ANALYZE, _T.LOAD,
})
_EXPLAIN_PREFIX = re.compile(r"^\s*explain\s+(?:analy[sz]e\s+)?(?:\([^)]*\)\s*)?", re.IGNORECASE)
#: column types whose Python values msgpack takes as they are (and lists of them)
_PLAIN_TYPES = frozenset({
    "BOOLEAN", "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER",
    "UBIGINT", "FLOAT", "DOUBLE", "VARCHAR", "BLOB",
})
_TIMESTAMP_TZ = "TIMESTAMP WITH TIME ZONE"
#: the reply formats of a query: rows in msgpack, or one Arrow IPC stream (`arrow`)
REPLY_FORMATS = ("rows", "arrow")
#: rows per Arrow record batch of an `arrow` reply
ARROW_BATCH_ROWS = 65_536


def read_only_statement(conn: duckdb.DuckDBPyConnection, sql: str) -> duckdb.Statement:
    """The single read-only statement of `sql`; raises RequestError READ_ONLY or QUERY_FAILED."""
    try:
        statements = conn.extract_statements(sql)
    except duckdb.Error as exc:
        raise RequestError(ErrorCode.QUERY_FAILED, str(exc)) from None
    if not statements:
        raise RequestError(ErrorCode.BAD_REQUEST, "sql holds no statement")
    if len(statements) > 1:
        raise RequestError(
            ErrorCode.READ_ONLY,
            f"refused: {len(statements)} statements; gymbus query runs one read-only statement",
        )
    statement = statements[0]
    kind = statement.type
    if kind not in READ_ONLY_TYPES:
        raise RequestError(ErrorCode.READ_ONLY, _refusal(kind))
    if kind is duckdb.StatementType.EXPLAIN:
        _check_explained(conn, statement.query)
    return statement


def _check_explained(conn: duckdb.DuckDBPyConnection, query: str) -> None:
    """EXPLAIN ANALYZE runs its statement: the explained statement must be read-only too."""
    inner = _EXPLAIN_PREFIX.sub("", query, count=1)
    try:
        statements = conn.extract_statements(inner)
    except duckdb.Error:
        return  # unusual EXPLAIN syntax: the read-only transaction still refuses any write
    for statement in statements:
        if statement.type not in READ_ONLY_TYPES:
            raise RequestError(ErrorCode.READ_ONLY, _refusal(statement.type))


def _refusal(kind: duckdb.StatementType) -> str:
    if kind in _WRITING_TYPES:
        return f"refused: {kind.name} statements would write; gymbus query is read-only"
    return (f"refused: {kind.name} statements are not allowed; gymbus query is read-only "
            "(SELECT, WITH, EXPLAIN, DESCRIBE, SHOW, SUMMARIZE)")


def run_query(cursor: duckdb.DuckDBPyConnection, sql: str, max_rows: int,
              reply: str = "rows") -> dict[str, Any]:
    """Run one read-only statement and return `{"columns", "types", "rows", "truncated"}`; in
    the `arrow` reply format `rows` is the row count and `arrow` the rows as Arrow IPC bytes.

    The statement runs in a READ ONLY transaction that is rolled back afterwards, so that even a
    write hidden from the statement check fails instead of changing the file.
    """
    if reply not in REPLY_FORMATS:
        raise RequestError(ErrorCode.BAD_REQUEST,
                           f"format must be one of {', '.join(REPLY_FORMATS)}, got {reply!r}")
    statement = read_only_statement(cursor, sql)
    cursor.execute("BEGIN TRANSACTION READ ONLY")
    try:
        if reply == "arrow":
            return _arrow_result(cursor, statement.query, max_rows)
        cursor.execute(statement.query)
        columns = [str(d[0]) for d in cursor.description or []]
        types = [str(d[1]) for d in cursor.description or []]
        if any(_TIMESTAMP_TZ in t for t in types):
            if statement.type is not duckdb.StatementType.SELECT:
                raise RequestError(ErrorCode.QUERY_FAILED, "TIMESTAMPTZ results need a SELECT")
            cursor.execute(_without_time_zones(statement.query, types))
        fetched = cursor.fetchmany(max_rows + 1)
    except duckdb.Error as exc:
        code = ErrorCode.READ_ONLY if "read-only mode" in str(exc) else ErrorCode.QUERY_FAILED
        raise RequestError(code, str(exc)) from None
    finally:
        cursor.execute("ROLLBACK")
    truncated = len(fetched) > max_rows
    converters = [_converter(t) for t in types]
    if all(conv is None for conv in converters):
        rows = [list(row) for row in fetched[:max_rows]]
    else:
        rows = [[v if f is None or v is None else f(v)
                 for v, f in zip(row, converters, strict=True)] for row in fetched[:max_rows]]
    return {"columns": columns, "types": types, "rows": rows, "truncated": truncated}


def _arrow_result(cursor: duckdb.DuckDBPyConnection, query: str,
                  max_rows: int) -> dict[str, Any]:
    """At most `max_rows` rows of a checked statement as one Arrow IPC stream (every column
    type as DuckDB gives it to Arrow: no conversion, time zones kept)."""
    relation = cursor.sql(query)
    types = [str(t) for t in relation.types]
    reader = relation.to_arrow_reader(ARROW_BATCH_ROWS)
    schema = reader.schema
    sink = pa.BufferOutputStream()
    rows, truncated = 0, False
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in reader:
            if rows + batch.num_rows > max_rows:
                batch, truncated = batch.slice(0, max_rows - rows), True
            writer.write_batch(batch)
            rows += batch.num_rows
            if truncated:
                break
    return {"columns": schema.names, "types": types, "rows": rows,
            "truncated": truncated, "arrow": sink.getvalue().to_pybytes()}


def _without_time_zones(query: str, types: list[str]) -> str:
    """Wrap a SELECT so that TIMESTAMPTZ columns come back as UTC timestamps (or text if nested).

    DuckDB's Python conversion of TIMESTAMPTZ needs pytz, which gymbus does not install; the
    columns the ingest writes are naive UTC timestamps already, and these match them.
    """
    body = query.strip().rstrip(";")
    replaced = []
    for i, typ in enumerate(types):
        if _TIMESTAMP_TZ in typ:
            ref = f"#{i + 1}"
            expr = f"timezone('UTC', {ref})" if typ == _TIMESTAMP_TZ else f"CAST({ref} AS VARCHAR)"
            replaced.append(expr)
        else:
            replaced.append(f"#{i + 1}")
    return f"SELECT {', '.join(replaced)} FROM (\n{body}\n)"


def _converter(typ: str) -> Callable[[Any], Any] | None:
    """None when a column's values pack as they are, else the function that makes them packable."""
    base = typ
    while base.endswith("]"):
        base = base[: base.rindex("[")]
    return None if base in _PLAIN_TYPES else to_wire


def to_wire(value: Any) -> Any:
    """A query value as msgpack takes it: ISO strings for dates and times, floats for decimals,
    seconds for intervals, strings for UUIDs and out-of-range integers, str keys for maps."""
    if value is None or isinstance(value, (bool, float, str, bytes)):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(to_wire(k)): to_wire(v) for k, v in value.items()}
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return str(value)
