"""Memory cgroups for runs: where a worker can make them (cgroup v2 with the memory controller
delegated, or v1's memory hierarchy), a run's cgroup with its limit, and its OOM-kill count.

Paths come from /proc/self/cgroup and /proc/self/mountinfo; nothing here runs in a child.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("gymbus.worker")

#: the cgroup folder under which run cgroups are made; "none": RLIMIT_AS for every run
CGROUP_VAR = "GYMBUS_WORKER_CGROUP"


def _own_cgroups() -> list[tuple[int, Path]]:
    """(version, folder) of this process's cgroups that hold a memory controller: v2's unified
    one, and v1's memory hierarchy, where they are mounted."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        version = 2 if hierarchy == "0" and not controllers else 1
        if version == 1 and "memory" not in controllers.split(","):
            continue
        for mount in mounts:
            fields = mount.split()
            kind = fields[fields.index("-") + 1]
            if (version == 2 and kind == "cgroup2") or (
                    version == 1 and kind == "cgroup" and "memory" in fields[-1].split(",")):
                relative = os.path.relpath(path, fields[3])
                if not relative.startswith(".."):  # else outside what is mounted here
                    found.append((version, Path(fields[4]) / relative))
                break
    return found


def own_cgroup_files(names: tuple[str, ...]) -> list[Path]:
    """The files of these names that this process's memory cgroups have."""
    return [folder / name for _, folder in _own_cgroups() for name in names
            if (folder / name).exists()]


class MemoryCgroups:
    """Where run cgroups with a memory limit are made: a folder of a v2 hierarchy whose
    subtree has the memory controller, or of v1's memory hierarchy."""

    def __init__(self, parent: Path, version: int) -> None:
        self.parent = parent
        self.version = version

    @classmethod
    def find(cls, env: Mapping[str, str]) -> MemoryCgroups | None:
        """GYMBUS_WORKER_CGROUP's folder, else this process's own memory cgroup, if a run
        cgroup can be made in it; None: memory limits fall back to RLIMIT_AS."""
        raw = env.get(CGROUP_VAR, "").strip()
        if raw.lower() == "none":
            return None
        candidates = [(_version(Path(raw)), Path(raw))] if raw else _own_cgroups()
        # v2 first: v1's memory hierarchy is the legacy one
        for version, folder in sorted(candidates, key=lambda c: -c[0]):
            if version == 2 and not _enable_memory(folder):
                continue
            probe = folder / f"gymbus-probe-{os.getpid()}"
            try:
                probe.mkdir()
                probe.rmdir()
            except OSError as exc:
                log.info("cannot make memory cgroups in %s (%s)", folder, exc.strerror or exc)
                continue
            return cls(folder, version)
        return None

    def create(self, name: str, limit: int) -> Path:
        """A new cgroup limited to `limit` bytes (swap included, where the host counts it)."""
        folder = self.parent / name
        folder.mkdir(exist_ok=True)
        try:
            if self.version == 2:
                (folder / "memory.max").write_text(str(limit))
                _write_if_present(folder / "memory.swap.max", "0")
            else:
                (folder / "memory.limit_in_bytes").write_text(str(limit))
                _write_if_present(folder / "memory.memsw.limit_in_bytes", str(limit))
        except OSError:
            self.remove(folder)
            raise
        return folder

    def oom_kills(self, folder: Path) -> int:
        """Processes of the cgroup its memory limit has killed."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            lines = (folder / name).read_text().splitlines()
        except OSError:
            return 0
        counts = dict(line.split() for line in lines if len(line.split()) == 2)
        return int(counts.get("oom_kill", "0"))

    def remove(self, folder: Path) -> bool:
        """Remove an emptied run cgroup; False while processes remain in it."""
        try:
            folder.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


def _version(folder: Path) -> int:
    return 2 if (folder / "cgroup.controllers").exists() else 1


def _enable_memory(folder: Path) -> bool:
    """Whether the v2 folder's children get the memory controller (enabling it if allowed)."""
    control = folder / "cgroup.subtree_control"
    try:
        if "memory" in control.read_text().split():
            return True
        control.write_text("+memory")
    except OSError:
        return False  # not delegated, or processes in the folder itself (no internal processes)
    return True


def _write_if_present(path: Path, value: str) -> None:
    if path.exists():
        path.write_text(value)
