"""The one client of the ingest's query API, for every reader of stored telemetry.

The CLI's `query`, `status` and `runs`, the terminal and Qt viewers, replay and the demo all read
through a `StoreClient`. Its policy, the same for each of them: ask the ingest (the DuckDB file's
only writer); when the ingest does not answer, open the file itself, read-only; when neither
works, raise `StoreUnavailable`, naming the endpoint and the file. A query fails the same way
whichever of the two answered it (a `RemoteError` with the ingest's error code). The statements
the readers send are named in `gymbus.shared.queries`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

import zmq

from gymbus.shared.errors import RemoteError, RequestError, ServiceUnavailable, StoreUnavailable
from gymbus.shared.protocol import Command
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client

if TYPE_CHECKING:
    import pyarrow as pa

#: rows of a `query` unless asked otherwise (the ingest's own default)
DEFAULT_MAX_ROWS = 100_000
#: rows of `rows` unless asked otherwise (the most one reply may carry)
ROWS_LIMIT = 1_000_000


class StoreClient:
    """Stored telemetry through the ingest's query API, or the DuckDB file read-only when no
    ingest answers. Not thread-safe: one per thread; each call blocks its caller's thread for at
    most the request timeout (and the file read after it)."""

    def __init__(self, settings: Settings, timeout: float | None = None,
                 ctx: zmq.Context[Any] | None = None) -> None:
        self.settings = settings
        self.client = Client(settings.ingest, "ingest", timeout or settings.request_timeout, ctx)
        #: False: `query` reads the file without asking the ingest first (a caller that has just
        #: found the ingest down, so that each statement does not wait out its timeout again);
        #: a query the ingest does not answer sets it False too, until a caller sets it back
        self.ask_ingest = True

    def query(self, sql: str, max_rows: int = DEFAULT_MAX_ROWS,
              reply: str = "rows") -> dict[str, Any]:
        """One read-only statement's `{"columns", "types", "rows", "truncated"}` (in the `arrow`
        reply format, `arrow` holds the rows as Arrow IPC bytes and `rows` counts them).

        Raises RemoteError when the statement is refused or fails, StoreUnavailable when neither
        the ingest nor the file answers.
        """
        if not self.ask_ingest:
            return self._read_file(sql, max_rows, reply)
        body: dict[str, Any] = {"sql": sql, "max_rows": max_rows}
        if reply != "rows":
            body["format"] = reply
        try:
            return self.client.request(Command.QUERY, body)
        except ServiceUnavailable:
            self.ask_ingest = False
            return self._read_file(sql, max_rows, reply)

    def arrow(self, sql: str, max_rows: int = ROWS_LIMIT) -> pa.Table:
        """The rows of one read-only statement as an Arrow table (at most `max_rows`: a reader
        of more pages through them); large results travel as Arrow IPC, not msgpack rows."""
        import pyarrow as pa  # only here: the viewers and most commands never need it

        result = self.query(sql, max_rows, "arrow")
        table: pa.Table = pa.ipc.open_stream(result["arrow"]).read_all()
        return table

    def rows(self, sql: str, max_rows: int = ROWS_LIMIT) -> list[dict[str, Any]]:
        """The rows of one read-only statement, as dicts keyed by column name."""
        result = self.query(sql, max_rows)
        return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]

    def _read_file(self, sql: str, max_rows: int, reply: str = "rows") -> dict[str, Any]:
        """Answer from the DuckDB file, read-only: only when the ingest did not answer."""
        import duckdb  # only here: most readers never need it, and it is slow to import

        from gymbus.services.ingest.query import run_query

        path = self.settings.db_path
        if not path.exists():
            raise self._unavailable("does not exist (nothing is stored under this home yet)")
        try:
            conn = duckdb.connect(str(path), read_only=True)
        except duckdb.Error as exc:  # most often: the ingest holds it, up but busy
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise self._unavailable(f"cannot be opened read-only ({reason})") from None
        try:
            return run_query(conn, sql, max_rows, reply)
        except RequestError as exc:  # as the ingest would have answered it
            raise RemoteError(exc.code.value, str(exc)) from None
        finally:
            conn.close()

    def _unavailable(self, why: str) -> StoreUnavailable:
        return StoreUnavailable(self.client.endpoint, self.client.timeout,
                                str(self.settings.db_path), why)

    def run_stats(self, run_id: str | None = None,
                  timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """The ingest's accounting (frames stored, gaps, duplicates, ...) of every run, or of one,
        by run id. Only the running ingest keeps it: raises ServiceUnavailable when it does not
        answer, RemoteError `unknown_run` when it holds no frame of the run named."""
        body = {"run_id": run_id} if run_id else {}
        reply = self.client.request(Command.RUN_STATS, body, timeout=timeout)
        return {r["run_id"]: r for r in reply["runs"]}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
