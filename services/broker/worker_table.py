"""The broker's worker table: who is registered, what each runs, and when each expires.

Pure state, no sockets: every verb takes `now` (seconds on a monotonic clock) so that tests can
drive it with a fake clock. Wall-clock timestamps for the Worker records come from `wall_ns`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class WorkerEntry:
    """One registered worker, as its last `ready` and `heartbeat` described it."""

    worker_id: str
    host: str
    pid: int
    slots: int
    busy: int
    runs: list[str]
    #: wall-clock time of the last message from the worker, Unix nanoseconds (for people)
    last_heartbeat_ns: int
    #: the injected clock's time of the last message from the worker (for expiry)
    last_seen: float
    #: cores, memory and GPUs the worker offers its runs (its `ready`; empty if it said none)
    capacity: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The Worker record of docs/protocol.md."""
        return {
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": self.pid,
            "slots": self.slots,
            "busy": self.busy,
            "runs": list(self.runs),
            "last_heartbeat_ns": self.last_heartbeat_ns,
            "capacity": dict(self.capacity),
        }


@dataclass(frozen=True, slots=True)
class LostWorker:
    """A worker purged for silence, with the runs it held when last heard from."""

    worker_id: str
    runs: list[str] = field(default_factory=list)


class WorkerTable:
    """Registered workers keyed by worker id (which is also their ROUTER identity).

    A worker expires when it has been silent for `liveness × interval` seconds: at exactly that
    age it is gone. Runs on the broker's loop thread; not thread-safe.
    """

    def __init__(
        self, interval: float, liveness: int, wall_ns: Callable[[], int] = time.time_ns
    ) -> None:
        self.window = interval * liveness
        self._wall_ns = wall_ns
        self._workers: dict[str, WorkerEntry] = {}

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, worker_id: str) -> WorkerEntry | None:
        return self._workers.get(worker_id)

    def register(
        self, worker_id: str, host: str, pid: int, slots: int, runs: list[str], now: float,
        capacity: dict[str, Any] | None = None,
    ) -> bool:
        """Add a worker from its `ready`; returns True when it replaced an older entry."""
        replaced = worker_id in self._workers
        self._workers[worker_id] = WorkerEntry(
            worker_id=worker_id,
            host=host,
            pid=pid,
            slots=slots,
            busy=len(runs),
            runs=list(runs),
            last_heartbeat_ns=self._wall_ns(),
            last_seen=now,
            capacity=dict(capacity or {}),
        )
        return replaced

    def touch(self, worker_id: str, now: float) -> bool:
        """Note that a known worker spoke; False (and nothing done) for an unknown one."""
        entry = self._workers.get(worker_id)
        if entry is None:
            return False
        entry.last_seen = now
        entry.last_heartbeat_ns = self._wall_ns()
        return True

    def refresh(self, worker_id: str, busy: int, runs: list[str], now: float) -> bool:
        """Apply a heartbeat; returns True when busy or runs changed. KeyError if unknown."""
        entry = self._workers[worker_id]
        changed = entry.busy != busy or entry.runs != runs
        entry.busy = busy
        entry.runs = list(runs)
        self.touch(worker_id, now)
        return changed

    def remove(self, worker_id: str) -> WorkerEntry | None:
        """Forget a worker (its `disconnect`); returns its entry, or None if it was unknown."""
        return self._workers.pop(worker_id, None)

    def expired(self, worker_id: str, now: float) -> bool:
        entry = self._workers.get(worker_id)
        return entry is not None and now - entry.last_seen >= self.window

    def purge_expired(self, now: float) -> list[LostWorker]:
        """Remove every worker silent for the liveness window; returns them, by worker id."""
        lost = [
            LostWorker(entry.worker_id, list(entry.runs))
            for entry in self._workers.values()
            if now - entry.last_seen >= self.window
        ]
        for worker in lost:
            del self._workers[worker.worker_id]
        return sorted(lost, key=lambda worker: worker.worker_id)

    def next_expiry(self) -> float | None:
        """When the next worker will expire if it stays silent; None with no workers."""
        if not self._workers:
            return None
        return min(entry.last_seen for entry in self._workers.values()) + self.window

    def records(self) -> list[dict[str, Any]]:
        """Worker records of every registered worker, by worker id."""
        return [self._workers[key].record() for key in sorted(self._workers)]
