"""Runs the broker reported lost with a silent worker, to be stopped if that worker comes back.

A worker purged for silence (a cut link, a long pause) may still be training: its runs are
`lost` at the controller, which never takes a lost run back. When the worker registers again
and still lists such a run, the broker cancels it there, so that nothing trains unaccounted
for; the run's spool is then repaired like any other ended run's (docs/reliability.md).
"""

from __future__ import annotations

#: workers remembered (a worker that never returns is forgotten after this many others)
MAX_WORKERS = 10_000


class LostRuns:
    """Per worker id, the runs it held when it was declared lost. On the broker's loop thread."""

    def __init__(self, limit: int = MAX_WORKERS) -> None:
        self.limit = limit
        self._runs: dict[str, set[str]] = {}

    def note(self, worker_id: str, runs: list[str]) -> None:
        """`worker_id` was declared lost holding `runs`."""
        if not runs:
            return
        self._runs.setdefault(worker_id, set()).update(runs)
        while len(self._runs) > self.limit:
            del self._runs[next(iter(self._runs))]

    def returned(self, worker_id: str, runs: list[str]) -> list[str]:
        """`worker_id` registered again holding `runs`: those of them that are lost (forgotten
        from now on: the caller stops them)."""
        lost = self._runs.pop(worker_id, set())
        return [run_id for run_id in runs if run_id in lost]
