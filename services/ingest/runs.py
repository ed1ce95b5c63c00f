"""Per-run accounting of the ingest: which seqs of a run are stored, its gaps, its `runs` row.

Runs on the ingest loop. Every seq below `contiguous` is stored, so are those in `above`; the
state is rebuilt from the `frames` and `gaps` tables at start, so a restarted ingest still drops
duplicates and knows its gaps.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(eq=False)
class Gap:
    """Seqs `first`..`last` of a run, all missing when found; filled once every one is stored."""

    first: int
    last: int
    detected_us: int
    missing: int = 0
    filled_us: int | None = None
    #: whether its row is in the `gaps` table already (else the next flush inserts it)
    in_db: bool = False


def _add_range(ranges: list[list[int]], first: int, last: int) -> None:
    """Append first..last to ascending ranges, merged with the last one when they touch."""
    if ranges and ranges[-1][1] + 1 == first:
        ranges[-1][1] = last
    else:
        ranges.append([first, last])


@dataclass(eq=False)
class RunAccount:
    """One run's `runs` row and which seqs are stored.

    Every seq below `contiguous` is stored, and so is every seq in `above`; each seq missing below
    `end()` belongs to exactly one of `open_gaps`, which stay sorted by `first`.
    """

    run_id: str
    agent_id: str = ""
    worker_id: str = ""
    env: str | None = None
    algo: str | None = None
    telemetry: str | None = None
    seed: int | None = None
    config: str | None = None
    started_at: int | None = None  # epoch microseconds, as are all times here
    ended_at: int | None = None
    status: str | None = None
    reason: str | None = None
    frames_emitted: int | None = None
    name: str | None = None
    backend: str | None = None
    policy_label: str | None = None
    render_hint: str | None = None
    obs_not_stored: int | None = None
    rows_refused: int | None = None
    duplicates: int = 0
    episodes: int = 0
    steps: int = 0
    metrics: int = 0
    contiguous: int = 0
    above: set[int] = field(default_factory=set)
    highest: int = -1
    open_gaps: list[Gap] = field(default_factory=list)
    #: gaps found or filled since the last flush
    unsaved_gaps: list[Gap] = field(default_factory=list)
    #: when a flush last wrote something of this run (monotonic; 0: before this process)
    saved_at: float = 0.0

    ROW_FIELDS = ("run_id", "agent_id", "worker_id", "env", "algo", "telemetry", "seed", "config",
                  "started_at", "ended_at", "status", "reason", "frames_emitted")
    COUNTERS = ("duplicates", "episodes", "steps", "metrics")
    #: run_started's labels, the last columns of the `runs` row
    LABELS = ("name", "backend", "policy_label", "render_hint")
    #: run_completed's counts of what a recorded run did not store (docs/python-api.md)
    NOT_STORED = ("obs_not_stored", "rows_refused")
    #: the frame tables whose rows a run counts (`schema.FRAME_TABLES`), as the counters named so
    ROW_COUNTS = ("episodes", "steps", "metrics")

    @property
    def frames_stored(self) -> int:
        return self.contiguous + len(self.above)

    @property
    def last_seq(self) -> int | None:
        return self.highest if self.highest >= 0 else None

    @property
    def gaps(self) -> int:
        return sum(g.missing for g in self.open_gaps)

    @property
    def complete(self) -> bool:
        return self.frames_emitted is not None and self.frames_stored == self.frames_emitted

    def end(self) -> int:
        """The highest seq the run is known to have: the highest stored, or the last emitted."""
        return max(self.highest, -1 if self.frames_emitted is None else self.frames_emitted - 1)

    def accept(self, seq: int, now_us: int) -> bool:
        """Record `seq` as stored; False (and counted as a duplicate) when it already is."""
        if seq < self.contiguous or seq in self.above:
            self.duplicates += 1
            return False
        end = self.end()
        if seq == self.contiguous:
            self.contiguous += 1
            while self.contiguous in self.above:
                self.above.remove(self.contiguous)
                self.contiguous += 1
        else:
            self.above.add(seq)
        if seq > end + 1:
            self._open_gap(end + 1, seq - 1, now_us)
        elif seq <= end:
            self._fill(seq, now_us)
        self.highest = max(self.highest, seq)
        return True

    def count_rows(self, table: str, n: int) -> None:
        """Count `n` rows buffered for a frame table: each has the counter of its name."""
        if table not in self.ROW_COUNTS:
            raise ValueError(f"a run counts rows of {', '.join(self.ROW_COUNTS)}, not of {table!r}")
        setattr(self, table, getattr(self, table) + n)

    def set_emitted(self, emitted: int, now_us: int) -> None:
        """`run_completed` is stored: every seq below `emitted` not stored yet is missing."""
        end = self.end()
        self.frames_emitted = emitted
        if emitted - 1 > end:
            self._open_gap(end + 1, emitted - 1, now_us)

    def missing(self, below: int, limit: int) -> list[list[int]]:
        """Ranges `[first, last]` of the seqs under `below` that are not stored, ascending, at
        most `limit` of them: the open gaps (less what was filled in them) and the tail past
        `end()`. Costs at most the size of the open gaps or of `above`, whichever is smaller."""
        out: list[list[int]] = []
        for gap in self.open_gaps:
            if gap.first >= below or len(out) >= limit:
                break
            last = min(gap.last, below - 1)
            if gap.missing == gap.last - gap.first + 1:  # nothing stored in it yet
                ranges = [[gap.first, last]]
            else:
                ranges = self._missing_in(max(gap.first, self.contiguous), last)
            for first, end in ranges:
                _add_range(out, first, end)
        tail = self.end() + 1
        if tail < below:
            _add_range(out, tail, below - 1)
        return out[:limit]

    def _missing_in(self, first: int, last: int) -> list[list[int]]:
        """Missing ranges within first..last, all at or above `contiguous`."""
        if last - first < len(self.above):
            held = [seq for seq in range(first, last + 1) if seq in self.above]
        else:
            held = sorted(seq for seq in self.above if first <= seq <= last)
        out, pos = [], first
        for seq in held:
            if seq > pos:
                out.append([pos, seq - 1])
            pos = seq + 1
        if pos <= last:
            out.append([pos, last])
        return out

    def _open_gap(self, first: int, last: int, now_us: int) -> None:
        gap = Gap(first, last, now_us, last - first + 1)
        self.open_gaps.append(gap)  # found above every other gap: the list stays sorted
        self.unsaved_gaps.append(gap)

    def _fill(self, seq: int, now_us: int) -> None:
        i = bisect_right(self.open_gaps, seq, key=lambda g: g.first) - 1
        if i < 0 or seq > self.open_gaps[i].last:
            return  # in no known gap: the gaps table was edited by hand
        gap = self.open_gaps[i]
        gap.missing -= 1
        if gap.missing == 0:
            gap.filled_us = now_us
            del self.open_gaps[i]
            if gap.in_db:  # a gap found since the last flush is listed already
                self.unsaved_gaps.append(gap)

    def restore(self, seqs: list[int], gaps: list[Gap]) -> None:
        """Rebuild which seqs are stored from the ledger's sorted seqs, and reopen unfilled gaps."""
        stored = np.asarray(seqs, dtype=np.int64)
        off = np.flatnonzero(stored != np.arange(len(stored)))
        self.contiguous = int(off[0]) if len(off) else len(stored)
        self.above = set(stored[self.contiguous:].tolist())
        self.highest = int(stored[-1]) if len(stored) else -1
        for gap in gaps:
            held = max(0, min(self.contiguous, gap.last + 1) - gap.first)
            held += sum(1 for s in self.above if gap.first <= s <= gap.last)
            gap.missing = gap.last - gap.first + 1 - held
            if gap.missing > 0:
                self.open_gaps.append(gap)

    def saved(self) -> None:
        self.saved_at = time.monotonic()
        for gap in self.unsaved_gaps:
            gap.in_db = True
        self.unsaved_gaps.clear()

    def row(self) -> tuple[Any, ...]:
        """The `runs` row, in table order."""
        head = tuple(getattr(self, name) for name in self.ROW_FIELDS)
        return (*head, self.frames_stored, self.last_seq, self.gaps, self.duplicates,
                self.complete, self.episodes, self.steps, self.metrics,
                *(getattr(self, name) for name in self.LABELS),
                *(getattr(self, name) for name in self.NOT_STORED))

    def stats(self) -> dict[str, Any]:
        """RunStats, as docs/protocol.md defines them."""
        return {"run_id": self.run_id, "status": self.status, "frames_emitted": self.frames_emitted,
                "frames_stored": self.frames_stored, "last_seq": self.last_seq, "gaps": self.gaps,
                "duplicates": self.duplicates, "complete": self.complete,
                "episodes": self.episodes, "steps": self.steps, "metrics": self.metrics,
                "obs_not_stored": self.obs_not_stored, "rows_refused": self.rows_refused}
