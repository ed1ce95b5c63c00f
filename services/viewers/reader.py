"""What a viewer asks the services and the store: run records, the ingest's accounting, frames.

A `Reader` only reads and returns plain data (`Status`, `Stored`); `Live` applies it to its
runs on the viewer's thread. The terminal viewer calls it on its own loop; the Qt viewer on its
request thread, so that a service that does not answer never stalls the GUI. A reader is used on
one thread at a time: its sockets stay there.

When the controller does not answer, the runs come from the store's `runs` table; when the
ingest does not answer, the store is read from the DuckDB file, read-only, without waiting out
the ingest's timeout at every statement (`StoreClient.ask_ingest`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import zmq

from gymbus.services.ingest.client import StoreClient
from gymbus.services.viewers.live_runs import MAX_EPISODES, SPS_METRIC
from gymbus.shared import queries
from gymbus.shared.errors import RemoteError, ServiceUnavailable
from gymbus.shared.protocol import Command
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client

#: runs read from the store's `runs` table when the controller does not answer
STORED_RUNS = 200


@dataclass(frozen=True)
class Fetch:
    """One run's stored frames to read: those with seq in lo..hi, and its `runs` row if asked."""

    run_id: str
    lo: int
    hi: int
    run_row: bool = False
    #: the run's first load (its snapshot), not a backfill of gaps
    snapshot: bool = False


@dataclass
class Stored:
    """What a `Fetch` read: the seqs stored in its range and the rows of those frames."""

    fetch: Fetch
    seqs: list[int] = field(default_factory=list)
    run: list[dict[str, Any]] = field(default_factory=list)
    lifecycle: list[dict[str, Any]] = field(default_factory=list)
    episodes: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Status:
    """What one refresh found: the controller's run records (None: it did not answer), the
    store's `runs` rows in their stead, and the ingest's accounting (None: it did not answer)."""

    records: list[dict[str, Any]] | None
    stored_runs: list[dict[str, Any]] | None
    stats: dict[str, dict[str, Any]] | None


class Reader:
    """The viewer's requests, each blocking for at most `timeout` (and the file read after it)."""

    def __init__(self, settings: Settings, timeout: float,
                 ctx: zmq.Context[Any] | None = None) -> None:
        self.controller = Client(settings.controller, "controller", timeout, ctx)
        self.store = StoreClient(settings, timeout, ctx)

    def status(self) -> Status:
        """The controller's runs, else the store's; the ingest's accounting if it answers."""
        try:
            records: list[dict[str, Any]] | None = self.controller.request(Command.LIST_RUNS)["runs"]
        except (ServiceUnavailable, RemoteError):
            records = None
        try:
            stats: dict[str, dict[str, Any]] | None = self.store.run_stats()
            self.store.ask_ingest = True
        except ServiceUnavailable:
            stats = None
            self.store.ask_ingest = False  # read the file until the ingest answers again
        except RemoteError:
            stats = None
        stored_runs = None
        if records is None:
            try:
                stored_runs = self.store.rows(queries.runs_started(STORED_RUNS))
            except (ServiceUnavailable, RemoteError):
                pass
        return Status(records, stored_runs, stats)

    def read(self, fetches: list[Fetch]) -> list[Stored]:
        """The stored frames of each fetch, in order; stops at the first the store cannot answer
        (the ones after it are asked again at the next refresh)."""
        out = []
        for fetch in fetches:
            try:
                out.append(self._read(fetch))
            except (ServiceUnavailable, RemoteError):
                break
        return out

    def _read(self, fetch: Fetch) -> Stored:
        rows, run_id = self.store.rows, fetch.run_id
        stored = Stored(fetch, [r["seq"] for r in rows(queries.stored_seqs(run_id, fetch.lo,
                                                                            fetch.hi))])
        if not stored.seqs:
            return stored
        first, last = stored.seqs[0], stored.seqs[-1]  # ascending: the range the tables are read
        if fetch.run_row:
            stored.run = rows(queries.run(run_id))
        stored.lifecycle = rows(queries.lifecycle_events(run_id, first, last))
        stored.episodes = rows(queries.latest_episodes(run_id, first, last, MAX_EPISODES))
        stored.metrics = rows(queries.latest_metric(run_id, first, last, SPS_METRIC))
        stored.steps = rows(queries.latest_step(run_id, first, last))
        return stored

    def close(self) -> None:
        self.controller.close()
        self.store.close()
