"""The controller's scheduling state: the broker's worker view, dispatches not yet acknowledged,
which worker takes the next run, and which workers have been absent too long.

Pure: no sockets, no SQL; every verb takes `now` (monotonic seconds), so tests drive it directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gymbus.services.controller.placement import Placement, Resources
from gymbus.shared.protocol import RunState

log = logging.getLogger("gymbus.controller")


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One worker as the broker's last `workers` message described it."""

    worker_id: str
    slots: int
    busy: int
    runs: frozenset[str]
    #: the Worker record as received, for `list_workers`
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Pending:
    """A dispatch sent to a worker that has not yet shown the run in its `runs`."""

    run_id: str
    worker_id: str
    sent_at: float


def parse_workers(body: dict[str, Any]) -> list[WorkerView]:
    """The worker records of a `workers` message; malformed records are logged and skipped."""
    records = body.get("workers")
    if not isinstance(records, list):
        log.warning("workers message without a list of workers: %r", body)
        return []
    views = []
    for record in records:
        try:
            views.append(_view(record))
        except (TypeError, ValueError) as exc:
            log.warning("skipping malformed worker record %r: %s", record, exc)
    return views


def _view(record: Any) -> WorkerView:
    if not isinstance(record, dict):
        raise TypeError("a worker record is a map")
    worker_id, slots, busy, runs = (record.get(k) for k in ("worker_id", "slots", "busy", "runs"))
    if not isinstance(worker_id, str) or not worker_id:
        raise ValueError("worker_id must be a non-empty string")
    if type(slots) is not int or type(busy) is not int or slots < 0 or busy < 0:
        raise ValueError("slots and busy must be integers >= 0")
    if not isinstance(runs, list) or not all(isinstance(r, str) for r in runs):
        raise ValueError("runs must be a list of run ids")
    return WorkerView(worker_id, slots, busy, frozenset(runs), dict(record))


class Scheduler:
    """Free slots per worker, counting dispatches in flight; used on the controller's loop thread.

    free(w) = slots − busy − dispatches sent to w that w has not yet acknowledged (listed in its
    `runs`, or reported ended). A run reported running still counts until the view lists it.
    """

    def __init__(self, interval: float, liveness: int) -> None:
        self.window = interval * liveness
        #: a dispatch not acknowledged in this time is taken back (the message was lost)
        self.ack_timeout = 2 * self.window
        #: a worker with active runs that is absent from the view this long is gone; one interval
        #: more than the broker's own window, so that a worker re-registering after a broker
        #: restart is not declared gone first
        self.absence_window = self.window + interval
        self.workers: dict[str, WorkerView] = {}
        self.pending: dict[str, Pending] = {}
        self._absent_since: dict[str, float] = {}
        #: workers that refused a dispatch -> their last_heartbeat_ns at that moment
        self._refused: dict[str, Any] = {}
        #: queued run -> why no worker takes it (its resources), from the last scheduling pass
        self.waiting: dict[str, str] = {}

    # --- the view ------------------------------------------------------------------------------

    def update_view(self, workers: list[WorkerView], now: float) -> None:
        """Replace the view with the broker's latest; acknowledge dispatches it shows."""
        self.workers = {view.worker_id: view for view in workers}
        for worker_id, heartbeat in list(self._refused.items()):
            view = self.workers.get(worker_id)
            if view is not None and view.record.get("last_heartbeat_ns") != heartbeat:
                del self._refused[worker_id]  # it spoke since: its slots are news again
        for pending in list(self.pending.values()):
            view = self.workers.get(pending.worker_id)
            if view is not None and pending.run_id in view.runs:
                del self.pending[pending.run_id]
        for worker_id in self.workers:
            self._absent_since.pop(worker_id, None)

    def clear_view(self) -> None:
        """Forget the view (the broker is unreachable: nothing can be dispatched)."""
        self.workers = {}

    def drop_worker(self, worker_id: str) -> None:
        """The broker reported the worker lost: stop scheduling onto it."""
        self.workers.pop(worker_id, None)
        self._absent_since.pop(worker_id, None)
        self._refused.pop(worker_id, None)
        for run_id in [p.run_id for p in self.pending.values() if p.worker_id == worker_id]:
            del self.pending[run_id]

    def records(self) -> list[dict[str, Any]]:
        """The Worker records of the current view, by worker id."""
        return [self.workers[key].record for key in sorted(self.workers)]

    def absent_workers(self, active_workers: set[str], now: float) -> list[str]:
        """Of the workers holding active runs, those missing from the view for the absence window.

        Call on each `workers` message: absence is measured only while the broker is talking.
        """
        gone = []
        for worker_id in sorted(active_workers - set(self.workers)):
            since = self._absent_since.setdefault(worker_id, now)
            if now - since >= self.absence_window:
                gone.append(worker_id)
                del self._absent_since[worker_id]
        for worker_id in set(self._absent_since) - active_workers:
            del self._absent_since[worker_id]
        return gone

    # --- dispatches ----------------------------------------------------------------------------

    def free_slots(self) -> dict[str, int]:
        """Free slots of every worker in the view (never below zero)."""
        in_flight: dict[str, int] = {}
        for pending in self.pending.values():
            in_flight[pending.worker_id] = in_flight.get(pending.worker_id, 0) + 1
        return {
            worker_id: max(0, view.slots - view.busy - in_flight.get(worker_id, 0))
            for worker_id, view in self.workers.items()
        }

    def refused(self, worker_id: str) -> None:
        """A dispatch to the worker failed: skip it until it has heartbeated again.

        Without this, a worker the view still shows (dead, or refusing) would burn a run's
        dispatch attempts in one burst.
        """
        view = self.workers.get(worker_id)
        self._refused[worker_id] = None if view is None else view.record.get("last_heartbeat_ns")

    def capacities(self) -> dict[str, Resources | None]:
        """Each worker's cpus, memory and GPUs, as its record says (None: it says nothing)."""
        return {worker_id: Resources.offered(view.record) for worker_id, view in self.workers.items()}

    def placement(self, active: Iterable[tuple[str | None, dict[str, Any]]]) -> Placement:
        """A scheduling pass over the view; `active`: (worker id, config) of the active runs."""
        return Placement(self.capacities(), active)

    def settle(self, placement: Placement, queued: Iterable[str]) -> None:
        """Keep the reasons of the pass's runs that wait; forget those of the runs it placed
        and of runs no longer among the `queued` it read (dispatched or cancelled)."""
        still = set(queued) - placement.examined
        self.waiting = {run_id: why for run_id, why in self.waiting.items() if run_id in still}
        self.waiting.update(placement.waiting)

    def annotate(self, record: dict[str, Any]) -> dict[str, Any]:
        """A run record for the API: a queued run that fits no worker says why as its reason."""
        if record.get("state") == RunState.QUEUED and record.get("run_id") in self.waiting:
            return {**record, "reason": self.waiting[record["run_id"]]}
        return record

    def pick_worker(self, fits: Callable[[str], bool] | None = None) -> str | None:
        """The worker with the most free slots (ties: the smallest id) that `fits` accepts (the
        run's resources), or None when all are full.

        Workers that refused a dispatch and have not heartbeated since are skipped.
        """
        free = {w: n for w, n in self.free_slots().items()
                if w not in self._refused and n > 0 and (fits is None or fits(w))}
        if not free:
            return None
        best = min(free, key=lambda worker_id: (-free[worker_id], worker_id))
        return best if free[best] > 0 else None

    def sent(self, run_id: str, worker_id: str, now: float) -> None:
        """A dispatch went out; its slot counts as taken until the worker acknowledges it."""
        self.pending[run_id] = Pending(run_id, worker_id, now)

    def acknowledged(self, run_id: str) -> None:
        """The run started, ended, failed to dispatch or was lost: nothing is in flight."""
        self.pending.pop(run_id, None)

    def unacknowledged(self, now: float) -> list[Pending]:
        """Dispatches in flight longer than the ack timeout; removed from the pending set."""
        late = [p for p in self.pending.values() if now - p.sent_at >= self.ack_timeout]
        for pending in late:
            del self.pending[pending.run_id]
        return sorted(late, key=lambda p: p.sent_at)
