"""What a viewer asks the services and the store: run records, the ingest's accounting, frames.

A `Reader` only reads and returns plain data (`Status`, `Stored`); `Live` applies it to its
runs on the viewer's thread. The terminal viewer calls it on its own loop; the Qt viewer on its
request thread, so that a service that does not answer never stalls the GUI. A reader is used on
one thread at a time: its sockets stay there.

When the controller does not answer, the runs come from the store's `runs` table; when the
ingest does not answer, the store is read from the DuckDB file, read-only, without waiting out
the ingest's timeout at every statement (`StoreClient.ask_ingest`). When the controller answers,
the runs the store holds that it never made (`gymbus import-tb` makes them) are shown beside
its own. The ingest's accounting is asked on a thread of its own (`StatsAsker`) while the
controller is asked on the caller's: a refresh with both down waits one timeout, not two.
"""

from __future__ import annotations

import signal
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from queue import SimpleQueue
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
#: signals a viewer's own threads never take: the kernel gives them to the main thread, whose
#: blocking calls they interrupt, so that Ctrl-C is seen at once however busy the other threads are
MAIN_THREAD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def leave_signals_to_the_main_thread() -> None:
    """Block MAIN_THREAD_SIGNALS on the calling thread (a thread a viewer starts, at its start)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)


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
    #: beside the controller's records: the store's rows of the runs it never made
    store_only: list[dict[str, Any]] = field(default_factory=list)


class StatsAsker:
    """The ingest's accounting (`RUN_STATS`), asked on the "viewer-stats" thread, where its
    client socket lives; `ask` and `close` run on the reader's thread. A daemon thread: a
    request waiting out its timeout never holds up the viewer's exit."""

    def __init__(self, settings: Settings, timeout: float,
                 ctx: zmq.Context[Any] | None = None) -> None:
        self.timeout = timeout
        self._client = Client(settings.ingest, "ingest", timeout, ctx)
        self._jobs: SimpleQueue[Future[dict[str, dict[str, Any]]] | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="viewer-stats", daemon=True)
        self._thread.start()

    def ask(self) -> Future[dict[str, dict[str, Any]]]:
        """The accounting of every run, by run id, once the ingest answers (or the error)."""
        future: Future[dict[str, dict[str, Any]]] = Future()
        self._jobs.put(future)
        return future

    def _serve(self) -> None:
        leave_signals_to_the_main_thread()
        try:
            while (future := self._jobs.get()) is not None:
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    reply = self._client.request(Command.RUN_STATS, {})
                    future.set_result({r["run_id"]: r for r in reply["runs"]})
                except Exception as exc:  # noqa: BLE001 - handed to the reader's thread
                    future.set_exception(exc)
        finally:
            self._client.close()

    def close(self) -> None:
        """Stop the thread once its request in progress ends (its socket closed there)."""
        self._jobs.put(None)


def warm_duckdb() -> None:
    """Import DuckDB on a thread of its own while the first requests wait: where neither service
    answers, the file is read next, and the import alone takes half a second or more."""
    def load() -> None:
        leave_signals_to_the_main_thread()
        import duckdb  # noqa: F401 - imported for StoreClient's file reads

    threading.Thread(target=load, name="viewer-warm-duckdb", daemon=True).start()


class Reader:
    """The viewer's requests, each blocking for at most `timeout` (and the file read after it)."""

    def __init__(self, settings: Settings, timeout: float,
                 ctx: zmq.Context[Any] | None = None) -> None:
        self.controller = Client(settings.controller, "controller", timeout, ctx)
        self.store = StoreClient(settings, timeout, ctx)
        self.stats_asker = StatsAsker(settings, timeout, ctx)
        #: the stored rows of ended store-only runs, by run id (such a run changes no more)
        self._store_only: dict[str, dict[str, Any]] = {}
        self._warmed = False

    def status(self) -> Status:
        """The controller's runs (and the store's that it never made), else the store's; the
        ingest's accounting if it answers. Both services are asked at once: this waits one
        request timeout at most, then reads the file if neither answered."""
        pending = self.stats_asker.ask()
        if not self._warmed:
            self._warmed = True
            warm_duckdb()
        try:
            records: list[dict[str, Any]] | None = self.controller.request(Command.LIST_RUNS)["runs"]
        except (ServiceUnavailable, RemoteError):
            records = None
        try:  # the request has a timeout of its own; the margin is for a thread starved of CPU
            stats: dict[str, dict[str, Any]] | None = pending.result(
                self.stats_asker.timeout + 5.0)
            self.store.ask_ingest = True
        except ServiceUnavailable:
            stats = None
            self.store.ask_ingest = False  # read the file until the ingest answers again
        except (RemoteError, TimeoutError):
            stats = None
        stored_runs = None
        store_only: list[dict[str, Any]] = []
        try:
            if records is None:
                stored_runs = self.store.rows(queries.runs_started(STORED_RUNS))
            else:
                store_only = self.store_only(records, stats)
        except (ServiceUnavailable, RemoteError):
            pass
        return Status(records, stored_runs, stats, store_only)

    def store_only(self, records: list[dict[str, Any]],
                   stats: dict[str, dict[str, Any]] | None) -> list[dict[str, Any]]:
        """The stored rows of the runs the store holds and the controller never made: of those
        the ingest counts, else (it did not answer) of those the file's last STORED_RUNS
        started."""
        known = {r["run_id"] for r in records}
        if stats is None:
            return [r for r in self.store.rows(queries.runs_started(STORED_RUNS))
                    if r["run_id"] not in known]
        missing = sorted(set(stats) - known)
        unread = [run_id for run_id in missing if run_id not in self._store_only]
        rows = ({r["run_id"]: r for r in self.store.rows(queries.stored_runs(unread))}
                if unread else {})
        self._store_only.update((k, r) for k, r in rows.items() if r["status"] is not None)
        return [row for run_id in missing
                if (row := self._store_only.get(run_id) or rows.get(run_id)) is not None]

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
        self.stats_asker.close()
