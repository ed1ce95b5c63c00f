"""Where a run fits: the cpus, memory and GPUs it asks for against each worker's capacity less
what the runs already on that worker hold, and, when it fits nowhere, the reason it waits.

Pure: used by `Controller.schedule` on the loop thread, with the registry's active runs; tests
drive it with records alone. Runs without limits ask for nothing and are placed by slots alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gymbus.shared.config_values import format_size

log = logging.getLogger("gymbus.controller")

#: the resources, as run configs and worker capacities name them
KINDS = ("cpus", "memory", "gpus")


@dataclass(frozen=True, slots=True)
class Resources:
    """Cores, bytes of memory and GPUs: what a run asks for, or what a worker offers."""

    cpus: int = 0
    memory: int = 0
    gpus: int = 0

    @classmethod
    def asked(cls, config: dict[str, Any]) -> Resources:
        """What a (validated) run config asks for; a limit it does not give counts as 0."""
        return cls(*(int(config.get(kind) or 0) for kind in KINDS))

    @classmethod
    def offered(cls, record: dict[str, Any]) -> Resources | None:
        """A worker record's `capacity`; None when it gives none (or a malformed one)."""
        capacity = record.get("capacity")
        if not isinstance(capacity, dict) or not capacity:
            return None
        values = [capacity.get(kind, 0) for kind in KINDS]
        if not all(type(v) is int and v >= 0 for v in values):
            log.warning("ignoring the malformed capacity %r of worker %s", capacity,
                        record.get("worker_id"))
            return None
        return cls(*values)

    def __bool__(self) -> bool:
        return any((self.cpus, self.memory, self.gpus))

    def plus(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.memory + other.memory,
                         self.gpus + other.gpus)

    def minus(self, other: Resources) -> Resources:
        return Resources(self.cpus - other.cpus, self.memory - other.memory,
                         self.gpus - other.gpus)

    def within(self, other: Resources) -> bool:
        """Every part at most the other's."""
        return self.cpus <= other.cpus and self.memory <= other.memory and self.gpus <= other.gpus

    def short_of(self, other: Resources) -> list[str]:
        """The kinds of which this asks more than `other` has."""
        return [kind for kind in KINDS if getattr(self, kind) > getattr(other, kind)]


def amount(kind: str, value: int) -> str:
    """`4 cpus`, `1 gpu`, `2 GiB memory`."""
    if kind == "memory":
        return f"{format_size(value)} memory"
    return f"{value} {kind[:-1] if value == 1 else kind}"


def unplaceable(asked: Resources, capacities: dict[str, Resources | None]) -> str | None:
    """Why the run fits none of the connected workers even when idle (None: one would take it,
    or no worker is connected)."""
    offers = {w: c for w, c in capacities.items() if c is not None}
    if not capacities or any(asked.within(c) for c in offers.values()):
        return None
    if not offers:
        return f"needs {describe(asked)}; no connected worker says what it has"
    largest = {kind: max(getattr(c, kind) for c in offers.values()) for kind in KINDS}
    short = [kind for kind in KINDS if getattr(asked, kind) > largest[kind]]
    if short:
        kind = short[0]
        have = format_size(largest[kind]) if kind == "memory" else str(largest[kind])
        return f"needs {amount(kind, getattr(asked, kind))}; the largest worker has {have}"
    return f"needs {describe(asked)} on one worker; no worker has all of them"


def describe(asked: Resources) -> str:
    return ", ".join(amount(kind, getattr(asked, kind)) for kind in KINDS if getattr(asked, kind))


class Placement:
    """One scheduling pass: the resources each worker has left, updated as runs are placed."""

    def __init__(self, capacities: dict[str, Resources | None],
                 active: Iterable[tuple[str | None, dict[str, Any]]]) -> None:
        """`capacities`: worker id -> its capacity; `active`: (worker id, config) of the runs
        dispatched or running, whose resources are taken."""
        self.capacities = capacities
        self.used: dict[str, Resources] = {}
        for worker_id, config in active:
            if worker_id is not None:
                self.took(worker_id, config)
        #: run id -> why it waits, for the queued runs of this pass that were not placed
        self.waiting: dict[str, str] = {}
        #: the queued runs this pass looked at, placed or not
        self.examined: set[str] = set()

    def took(self, worker_id: str, config: dict[str, Any]) -> None:
        self.used[worker_id] = self.used.get(worker_id, Resources()).plus(Resources.asked(config))

    def fits(self, worker_id: str, asked: Resources) -> bool:
        """Whether the worker has what the run asks for left (a worker that says nothing of
        its capacity takes only runs that ask for nothing)."""
        if not asked:
            return True
        capacity = self.capacities.get(worker_id)
        if capacity is None:
            return False
        return asked.within(capacity.minus(self.used.get(worker_id, Resources())))

    def placed(self, run_id: str, worker_id: str, config: dict[str, Any]) -> None:
        self.examined.add(run_id)
        self.took(worker_id, config)

    def wait(self, run_id: str, config: dict[str, Any]) -> None:
        """The run was placed nowhere: note why, when it is more than a busy slot."""
        self.examined.add(run_id)
        asked = Resources.asked(config)
        if not asked:
            return
        reason = unplaceable(asked, self.capacities)
        if reason is None and self.capacities:
            reason = f"waiting for a worker with {describe(asked)} free"
        if reason is not None:
            self.waiting[run_id] = reason
