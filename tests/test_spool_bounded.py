"""A long run's spool holds only what the ingest has not confirmed: it stays bounded.

A real stack runs a long full-telemetry run with small spool segments; the worker deletes the
segments whose frames the ingest holds in its checkpointed file, so the spool on disk stays
under a bound while the run writes many times that. A range dropped on the way to the broker
(after segments were trimmed) is still repaired from what the spool holds, and every frame is
stored exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import STACK_ENV, make_stack, wait_until
from test_faults import ACTIVE, Bus, DroppingProxy, assert_stored_exactly_once

from gymbus.services.stack.launcher import Stack
from gymbus.worker.telemetry import spool
from gymbus.worker.telemetry.spool import SpoolReader

pytestmark = pytest.mark.integration

SEGMENT = 64 * 1024
#: what the run writes to its spool before it is stopped (untrimmed, the spool holds it all)
WRITTEN = 12 * 2**20
#: what the spool may hold on disk at once: the segment being written and those written since
#: the ingest's last checkpoint (at most one a second; 1-4 MiB measured at ~1.7 MB/s of
#: spool), with room for a machine twice as slow: half of what the run writes
BOUND = WRITTEN // 2
GAP = 10


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = make_stack(tmp_path / "home", **STACK_ENV, GYMBUS_SPOOL_SEGMENT_BYTES=str(SEGMENT))
    try:
        yield s
    finally:
        s.stop()


def test_a_long_runs_spool_stays_bounded_and_still_repairs_a_gap(stack: Stack) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    proxy = DroppingProxy(ctx, stack.settings.telemetry_in, -1, -1)  # drops nothing yet
    bus = Bus(stack)
    try:
        stack.start(("ingest", "broker", "controller"))
        stack.start_one("worker", {"GYMBUS_TELEMETRY_IN": proxy.endpoint})
        stack.wait_ready(("controller", "worker"), 30)
        run_id = bus.submit(env="FrozenLake-v1", algo="q-learning", total_steps=10**9, seed=4,
                            telemetry="full")
        run_dir = stack.settings.run_dir(run_id)
        reader = SpoolReader(spool.spool_path(run_dir))
        seen: dict[int, int] = {}  # segment -> its largest size seen: their sum, all written
        largest, gap_at = 0, None
        deadline = time.monotonic() + 120
        while sum(seen.values()) < WRITTEN:
            assert time.monotonic() < deadline, f"the run wrote {sum(seen.values())} bytes"
            held = 0
            for first, path in spool.segments(spool.spool_dir(run_dir)):
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue  # trimmed just now
                held += size
                seen[first] = max(seen.get(first, 0), size)
            largest = max(largest, held)
            if gap_at is None and reader.refresh() and reader.first > 0:
                gap_at = reader.count + 50  # a range ahead of the run, above what was trimmed
                proxy.first = gap_at  # first, then last: the range is never wider
                proxy.last = gap_at + GAP - 1
            time.sleep(0.05)  # the sampling interval, bounded by the deadline above
        assert gap_at is not None, "no segment was ever trimmed"
        assert largest <= BOUND, f"the spool held {largest} bytes (bound {BOUND})"
        bus.cancel(run_id)
        wait_until(lambda: bus.state(run_id) not in ACTIVE, 15, "the run to end")
        assert_stored_exactly_once(bus, run_id)
        assert proxy.dropped == {(run_id, seq) for seq in range(gap_at, gap_at + GAP)}
        gaps = bus.sql(f"SELECT first_seq, last_seq, filled_at IS NOT NULL FROM gaps "
                       f"WHERE run_id = '{run_id}'")
        assert gaps == [[gap_at, gap_at + GAP - 1, True]]
        print(f"\nMEASURED spool bound: {sum(seen.values())} bytes written in {len(seen)} "
              f"segments of {SEGMENT}; at most {largest} on disk; gap {gap_at}-"
              f"{gap_at + GAP - 1} repaired after trimming")
    finally:
        bus.close()
        proxy.close()
        ctx.destroy(linger=0)
