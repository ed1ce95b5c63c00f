"""Reading what is stored, from Python: `gymbus.store()` and the shortcuts beside it.

    import gymbus

    curve = gymbus.episodes(run_id)                  # a pandas DataFrame
    one = gymbus.steps(run_id, episode=3)            # that episode's steps, in order
    table = gymbus.steps(run_id, arrow=True)         # a pyarrow Table instead
    gymbus.sql("SELECT env, count(*) FROM runs GROUP BY env")

    with gymbus.store() as db:                       # one reader for many calls
        for run_id in db.runs()["run_id"]:
            ...

A reader never writes. It asks the running ingest (which flushes first, so an answer holds
every frame received), in the query API's Arrow reply format; when no ingest answers, it opens
the DuckDB file read-only. Either way a statement must be one read-only SELECT (WITH, EXPLAIN,
DESCRIBE, SHOW, SUMMARIZE). docs/data.md describes every table and column.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from gymbus.services.ingest.client import ROWS_LIMIT, StoreClient
from gymbus.shared import settings as settings_mod
from gymbus.shared.errors import NotFound
from gymbus.shared.queries import sql_str

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

#: seconds a reader that found no ingest reads the file before it asks the ingest again
ASK_INGEST_AGAIN_S = 30.0


class Reader:
    """A read-only view of the store: Arrow tables or pandas DataFrames. Not thread-safe (one
    per thread); `close` it, or use it as a context manager."""

    def __init__(self, timeout: float | None = None) -> None:
        self.settings = settings_mod.load()
        self.client = StoreClient(self.settings, timeout)
        self._file_since: float | None = None

    def _store(self) -> StoreClient:
        """The client, asking the ingest again once the file has been read a while."""
        if self.client.ask_ingest:
            self._file_since = None
        elif self._file_since is None:
            self._file_since = time.monotonic()
        elif time.monotonic() - self._file_since > ASK_INGEST_AGAIN_S:
            self.client.ask_ingest, self._file_since = True, None
        return self.client

    @staticmethod
    def _out(table: pa.Table, arrow: bool) -> pa.Table | pd.DataFrame:
        return table if arrow else table.to_pandas()

    def sql(self, sql: str, *, arrow: bool = False,
            max_rows: int = ROWS_LIMIT) -> pa.Table | pd.DataFrame:
        """The rows of one read-only statement (at most `max_rows`; a warning says when more
        were cut). Raises RemoteError when it is refused or fails."""
        import pyarrow as pa

        result = self._store().query(sql, max_rows, "arrow")
        if result["truncated"]:
            warnings.warn(f"the result was cut at {max_rows} rows (max_rows)", stacklevel=2)
        return self._out(pa.ipc.open_stream(result["arrow"]).read_all(), arrow)

    def runs(self, *, arrow: bool = False) -> pa.Table | pd.DataFrame:
        """Every stored run, the first started first: the `runs` table."""
        return self.sql("SELECT * FROM runs ORDER BY started_at NULLS LAST, run_id", arrow=arrow)

    def episodes(self, run_id: str | None = None, *,
                 arrow: bool = False) -> pa.Table | pd.DataFrame:
        """Episode rows (return, length, seed, ...) of one run, or of every run."""
        where = ""
        if run_id is not None:
            self._require_run(run_id)
            where = f" WHERE run_id = {sql_str(run_id)}"
        return self._paged(f"SELECT * FROM episodes{where}",
                           "ORDER BY run_id, episode, env_index, seq", arrow)

    def steps(self, run_id: str, episode: int | None = None, *,
              arrow: bool = False) -> pa.Table | pd.DataFrame:
        """The run's stored steps (of one episode), in episode and step order; read in pages,
        so that a run of any length comes back whole."""
        from gymbus.services.ingest.export import table_pages

        self._require_run(run_id)
        if episode is not None:  # one episode fits in one reply
            return self.sql(f"SELECT * FROM steps WHERE run_id = {sql_str(run_id)} AND episode "
                            f"= {int(episode)} ORDER BY env_index, step, seq", arrow=arrow)
        return self._concat(table_pages(self._store(), "steps", run_id), arrow)

    def arrays(self, run_id: str, episode: int | None = None) -> dict[str, Any]:
        """The run's stored steps (of one episode) as numpy arrays, in episode and step order:
        `obs` and `action` in their spaces' dtype and shape (rows, *shape), or for a Dict or
        Tuple space a dict of such arrays, one per key (None where the values were not
        stored); `reward`, `terminated`, `truncated`, `episode`, `step`, `env_index`. For one
        episode, `observations` holds N+1 observations: its reset observation, then each
        step's (as offline-RL datasets take them)."""
        from gymbus.typed import decode, run_spaces

        self._require_run(run_id)
        run = self.sql(f"SELECT * FROM runs WHERE run_id = {sql_str(run_id)}", arrow=True)
        spaces = run_spaces(run.to_pylist()[0])
        table = self.steps(run_id, episode, arrow=True)
        out: dict[str, Any] = {
            name: table.column(name).to_numpy(zero_copy_only=False)
            for name in ("episode", "step", "env_index", "reward", "terminated", "truncated")}
        out["obs"] = decode(spaces["observation"], table.column("obs"), table.column("obs_vec"))
        out["action"] = decode(spaces["action"], table.column("action"),
                               table.column("action_vec"))
        if episode is not None:
            first = self.sql(f"SELECT reset_obs, reset_obs_vec FROM episodes WHERE run_id = "
                             f"{sql_str(run_id)} AND episode = {int(episode)}", arrow=True)
            reset = decode(spaces["observation"], first.column("reset_obs"),
                           first.column("reset_obs_vec"))
            out["observations"] = _prepend(reset, out["obs"])
        return out

    def metrics(self, run_id: str, *, arrow: bool = False) -> pa.Table | pd.DataFrame:
        """The run's metric points (name, step, value, ts), in step order per name."""
        self._require_run(run_id)
        return self.sql(f"SELECT * FROM metrics WHERE run_id = {sql_str(run_id)} "
                        "ORDER BY name, step, seq", arrow=arrow)

    def _paged(self, select: str, order: str, arrow: bool) -> pa.Table | pd.DataFrame:
        """A statement's rows whole, read ROWS_LIMIT at a time."""
        def pages() -> Any:
            offset = 0
            while True:
                page = self._store().arrow(f"{select} {order} LIMIT {ROWS_LIMIT} "
                                           f"OFFSET {offset}")
                yield page
                if page.num_rows < ROWS_LIMIT:
                    return
                offset += ROWS_LIMIT
        return self._concat(pages(), arrow)

    def _concat(self, pages: Any, arrow: bool) -> pa.Table | pd.DataFrame:
        import pyarrow as pa

        return self._out(pa.concat_tables(list(pages)), arrow)

    def _require_run(self, run_id: str) -> None:
        found = self._store().query(f"SELECT 1 FROM runs WHERE run_id = {sql_str(run_id)}", 1)
        if not found["rows"]:
            raise NotFound(f"run {run_id!r} is not stored (gymbus.runs() lists the runs)")

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prepend(first: Any, rest: Any) -> Any:
    """An episode's reset observation before its steps' (a dict of arrays key by key)."""
    if first is None or rest is None:
        return None
    if isinstance(first, dict):
        return {key: np.concatenate([first[key], rest[key]]) for key in first}
    return np.concatenate([first, rest])


def store(timeout: float | None = None) -> Reader:
    """A read-only reader of the store (GYMBUS_HOME's, through its ingest when one answers);
    `timeout`: seconds to wait for the ingest (default GYMBUS_REQUEST_TIMEOUT)."""
    return Reader(timeout)


_default: Reader | None = None


def _reader() -> Reader:
    """The reader the shortcuts share, made again when the GYMBUS_* settings changed."""
    global _default
    if _default is None or _default.settings != settings_mod.load():
        if _default is not None:
            _default.close()
        _default = Reader()
    return _default


def runs(*, arrow: bool = False) -> pa.Table | pd.DataFrame:
    """Every stored run (`Reader.runs`)."""
    return _reader().runs(arrow=arrow)


def episodes(run_id: str | None = None, *, arrow: bool = False) -> pa.Table | pd.DataFrame:
    """Episode rows of one run or of every run (`Reader.episodes`)."""
    return _reader().episodes(run_id, arrow=arrow)


def steps(run_id: str, episode: int | None = None, *,
          arrow: bool = False) -> pa.Table | pd.DataFrame:
    """A run's steps, or one episode's (`Reader.steps`)."""
    return _reader().steps(run_id, episode, arrow=arrow)


def arrays(run_id: str, episode: int | None = None) -> dict[str, Any]:
    """A run's steps, or one episode's, as arrays in their spaces' dtype and shape
    (`Reader.arrays`)."""
    return _reader().arrays(run_id, episode)


def metrics(run_id: str, *, arrow: bool = False) -> pa.Table | pd.DataFrame:
    """A run's metric points (`Reader.metrics`)."""
    return _reader().metrics(run_id, arrow=arrow)


def sql(statement: str, *, arrow: bool = False) -> pa.Table | pd.DataFrame:
    """The rows of one read-only statement (`Reader.sql`)."""
    return _reader().sql(statement, arrow=arrow)
