"""A worker's capacity, and the limits it holds each run to: cores, memory, GPUs and time.

The capacity (cores, memory, GPUs) is what the worker advertises in its `ready`; the controller
places a run only where it fits. Each run with limits gets an `Allocation`: distinct cores of
the worker's (CPU affinity, set in the child before it executes), a memory cgroup where this
host lets the worker make one (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`:
worker/cgroups.py), else RLIMIT_AS, the GPUs it names in CUDA_VISIBLE_DEVICES, and a deadline at which the daemon stops
its whole process group. `RunLimits.finish` turns the end of a run over a limit into `failed`
with the limit as its reason. docs/limits.md describes the same, and what a host without
cgroups does.

Used on the daemon's loop thread; the function `Allocation.preexec` returns runs in the forked
child, between fork and exec, and touches nothing but system calls.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gymbus.shared.config_values import (
    format_duration,
    format_size,
    parse_size,
)
from gymbus.shared.errors import ConfigError
from gymbus.shared.protocol import RunState
from gymbus.shared.runconfig import RunConfig
from gymbus.worker.cgroups import MemoryCgroups, own_cgroup_files
from gymbus.worker.child import LOG_FILE, tail

log = logging.getLogger("gymbus.worker")

#: overrides of the detected capacity: a count of cores, a size, a count or list of GPU ids
CPUS_VAR, MEMORY_VAR, GPUS_VAR = "GYMBUS_WORKER_CPUS", "GYMBUS_WORKER_MEMORY", "GYMBUS_WORKER_GPUS"
#: seconds between SIGTERM and SIGKILL of a run past its time limit
TIMEOUT_GRACE = 1.5
#: lines at the end of run.log searched for an allocation failure (runs under RLIMIT_AS)
LOG_TAIL_LINES = 20
#: what a process that ran out of address space says as it dies
OUT_OF_MEMORY_SIGNS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc")


# --- capacity -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capacity:
    """What a worker offers its runs: core ids, bytes of memory, GPU ids."""

    cores: tuple[int, ...]
    memory: int
    gpus: tuple[str, ...]

    def to_wire(self) -> dict[str, int]:
        """The `capacity` of the worker's `ready` (docs/protocol.md)."""
        return {"cpus": len(self.cores), "memory": self.memory, "gpus": len(self.gpus)}

    def describe(self) -> str:
        return (f"{len(self.cores)} cpus, {format_size(self.memory)} memory, "
                f"{len(self.gpus)} gpus")

    @classmethod
    def detect(cls, env: Mapping[str, str]) -> Capacity:
        """This host's capacity, each part overridden by its GYMBUS_WORKER_* variable if set."""
        return cls(detect_cores(env), detect_memory(env), detect_gpus(env))


def detect_cores(env: Mapping[str, str]) -> tuple[int, ...]:
    """The cores this process may run on; GYMBUS_WORKER_CPUS=N offers N of them (cycling
    through the real ones when N is more)."""
    real = sorted(os.sched_getaffinity(0))
    raw = env.get(CPUS_VAR, "").strip()
    if not raw:
        return tuple(real)
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(CPUS_VAR, f"expected a number of cores >= 1, got {raw!r}")
    return tuple(real[i % len(real)] for i in range(int(raw)))


def detect_memory(env: Mapping[str, str]) -> int:
    """Bytes of memory: GYMBUS_WORKER_MEMORY, else the smaller of MemTotal and the limit of
    this process's own cgroup."""
    raw = env.get(MEMORY_VAR, "").strip()
    if raw:
        size = parse_size(raw)
        if not size:
            raise ConfigError(MEMORY_VAR, f"expected a size such as 8GiB, got {raw!r}")
        return size
    total = _meminfo_total()
    for path in own_cgroup_files(("memory.max", "memory.limit_in_bytes")):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _meminfo_total() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemTotal")


def detect_gpus(env: Mapping[str, str]) -> tuple[str, ...]:
    """GPU ids: GYMBUS_WORKER_GPUS (a count, or ids such as 0,2), else CUDA_VISIBLE_DEVICES,
    else one per line of `nvidia-smi -L`, else none."""
    raw = env.get(GPUS_VAR, "").strip()
    if raw.isdigit():
        return tuple(str(i) for i in range(int(raw)))
    if raw:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return tuple(part.strip() for part in visible.split(",") if part.strip())
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(str(i) for i, line in enumerate(
        line for line in listing.splitlines() if line.startswith("GPU ")))


# --- a run's allocation ---------------------------------------------------------------------------


@dataclass
class Allocation:
    """What one run holds of its worker, and how its limits are applied."""

    run_id: str
    run_dir: Path
    #: indices into Capacity.cores (the same core may appear twice when overridden)
    core_slots: tuple[int, ...]
    cores: frozenset[int]
    #: GPU ids; None: the run sees what the worker sees
    gpus: tuple[str, ...] | None
    memory: int | None
    timeout: float | None
    cgroup: Path | None = None
    pid: int | None = None
    deadline: float | None = None
    timed_out: bool = False
    kill_at: float | None = None

    def env(self) -> dict[str, str]:
        """Variables for the run's process: its GPUs, and thread pools sized to its cores."""
        out = {}
        if self.gpus is not None:
            out["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        if self.cores:
            out["OMP_NUM_THREADS"] = str(len(self.core_slots))
        return out

    def preexec(self) -> Callable[[], None] | None:
        """What the child does before it executes: join the cgroup (RLIMIT_AS if that fails),
        pin itself to its cores. None when the run has neither limit."""
        cores, memory = self.cores, self.memory
        procs = str(self.cgroup / "cgroup.procs") if self.cgroup is not None else None
        if not cores and memory is None:
            return None

        def apply() -> None:  # in the forked child: system calls only, never raising
            joined = False
            if procs is not None:
                try:
                    fd = os.open(procs, os.O_WRONLY)
                    try:
                        os.write(fd, str(os.getpid()).encode())
                        joined = True
                    finally:
                        os.close(fd)
                except OSError:
                    pass
            if memory is not None and not joined:
                try:
                    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
                except (OSError, ValueError):
                    pass
            if cores:
                try:
                    os.sched_setaffinity(0, cores)
                except OSError:
                    pass

        return apply

    def started(self, pid: int, now: float) -> None:
        self.pid = pid
        if self.timeout is not None:
            self.deadline = now + self.timeout


class RunLimits:
    """The worker's capacity and the allocations of its runs; the daemon's loop thread."""

    def __init__(self, capacity: Capacity, cgroups: MemoryCgroups | None) -> None:
        self.capacity = capacity
        self.cgroups = cgroups
        self.runs: dict[str, Allocation] = {}
        #: run cgroups not yet removable (processes were still leaving them)
        self._leftover: list[Path] = []

    @classmethod
    def detect(cls, env: Mapping[str, str] | None = None) -> RunLimits:
        source = os.environ if env is None else env
        limits = cls(Capacity.detect(source), MemoryCgroups.find(source))
        where = (f"cgroup v{limits.cgroups.version} under {limits.cgroups.parent}"
                 if limits.cgroups else "RLIMIT_AS (no memory cgroup to make run cgroups in)")
        log.info("capacity %s; memory limits by %s", limits.capacity.describe(), where)
        return limits

    # --- admission --------------------------------------------------------------------------

    def _free_core_slots(self) -> list[int]:
        taken = {slot for a in self.runs.values() for slot in a.core_slots}
        return [i for i in range(len(self.capacity.cores)) if i not in taken]

    def _free_gpus(self) -> list[str]:
        taken = {gpu for a in self.runs.values() for gpu in a.gpus or ()}
        return [gpu for gpu in self.capacity.gpus if gpu not in taken]

    def refusal(self, config: RunConfig) -> str | None:
        """Why this worker cannot take the run now (None: it can)."""
        cap = self.capacity
        memory_used = sum(a.memory or 0 for a in self.runs.values())
        wants: list[tuple[str, int, int, int, Callable[[int], str]]] = [
            ("cpus", config.cpus or 0, len(cap.cores), len(self._free_core_slots()), str),
            ("memory", config.memory or 0, cap.memory, cap.memory - memory_used, format_size),
            ("gpus", config.gpus or 0, len(cap.gpus), len(self._free_gpus()), str),
        ]
        for name, want, total, free, show in wants:
            if want > total:
                return f"needs {show(want)} {name}; this worker has {show(total)}"
            if want > free:
                return f"needs {show(want)} {name}; {show(max(free, 0))} free on this worker"
        return None

    def allocate(self, run_id: str, config: RunConfig, run_dir: Path) -> Allocation:
        """Take the run's cores and GPUs, and make its memory cgroup (call `refusal` first)."""
        slots = tuple(self._free_core_slots()[:config.cpus or 0])
        allocation = Allocation(
            run_id=run_id, run_dir=run_dir, core_slots=slots,
            cores=frozenset(self.capacity.cores[i] for i in slots),
            gpus=None if config.gpus is None else tuple(self._free_gpus()[:config.gpus]),
            memory=config.memory, timeout=config.timeout,
        )
        if config.memory is not None and self.cgroups is not None:
            try:
                allocation.cgroup = self.cgroups.create(f"gymbus-{run_id}", config.memory)
            except OSError as exc:
                log.warning("run %s: no memory cgroup (%s); RLIMIT_AS instead", run_id, exc)
        self.runs[run_id] = allocation
        return allocation

    # --- while runs run ---------------------------------------------------------------------

    def enforce(self, now: float) -> None:
        """Stop the process group of each run past its deadline: SIGTERM, then SIGKILL after
        TIMEOUT_GRACE. Also retries removing emptied run cgroups."""
        for allocation in self.runs.values():
            if allocation.pid is None:
                continue
            if allocation.deadline is not None and now >= allocation.deadline:
                log.warning("run %s is past its time limit of %s: stopping it",
                            allocation.run_id, format_duration(allocation.timeout or 0))
                allocation.timed_out = True
                allocation.deadline = None
                allocation.kill_at = now + TIMEOUT_GRACE
                _signal_group(allocation.pid, signal.SIGTERM)
            elif allocation.kill_at is not None and now >= allocation.kill_at:
                allocation.kill_at = None
                _signal_group(allocation.pid, signal.SIGKILL)
        if self._leftover and self.cgroups is not None:
            self._leftover = [f for f in self._leftover if not self.cgroups.remove(f)]

    def finish(self, run_id: str, state: RunState,
               reason: str | None) -> tuple[RunState, str | None]:
        """The run's state and reason once its limits are judged, and its allocation freed:
        a run stopped at its deadline, or over its memory limit, is `failed` saying which."""
        allocation = self.runs.pop(run_id, None)
        if allocation is None:
            return state, reason
        exceeded = self._memory_exceeded(allocation, reason)
        if allocation.timed_out and allocation.pid is not None:
            _signal_group(allocation.pid, signal.SIGKILL)  # whatever it left behind
        if allocation.cgroup is not None and self.cgroups is not None \
                and not self.cgroups.remove(allocation.cgroup):
            self._leftover.append(allocation.cgroup)
        if state is RunState.COMPLETED:
            return state, reason
        if allocation.timed_out:
            return RunState.FAILED, f"timeout {format_duration(allocation.timeout or 0)}"
        if exceeded and allocation.memory is not None:
            return RunState.FAILED, f"memory limit {format_size(allocation.memory)} exceeded"
        return state, reason

    def _memory_exceeded(self, allocation: Allocation, reason: str | None) -> bool:
        """Killed by its cgroup's limit; or, under RLIMIT_AS, an allocation that failed."""
        if allocation.memory is None:
            return False
        if allocation.cgroup is not None and self.cgroups is not None:
            return self.cgroups.oom_kills(allocation.cgroup) > 0
        said = f"{reason or ''}\n{tail(allocation.run_dir / LOG_FILE, LOG_TAIL_LINES)}"
        return any(sign in said for sign in OUT_OF_MEMORY_SIGNS)


def _signal_group(pid: int, signum: int) -> None:
    """Signal the run's process group (its pid: a run starts a session of its own)."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone
