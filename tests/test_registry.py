"""The run registry, driven by a fake clock: transitions, immutability, idempotency, persistence."""

from __future__ import annotations

import itertools
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from gymbus.services.controller.registry import MAX_DISPATCH_ATTEMPTS, Registry, Run
from gymbus.shared.protocol import TERMINAL_STATES, RunState
from gymbus.shared.runconfig import RunConfig, parse_config

S = RunState
#: the legal transitions, spelled out independently of the registry's own table
LEGAL: dict[RunState, set[RunState]] = {
    S.QUEUED: {S.DISPATCHED, S.CANCELLED},
    S.DISPATCHED: {S.QUEUED, S.RUNNING, S.COMPLETED, S.FAILED, S.CANCELLED, S.LOST},
    S.RUNNING: {S.COMPLETED, S.FAILED, S.CANCELLED, S.LOST},
    S.COMPLETED: set(),
    S.FAILED: set(),
    S.CANCELLED: set(),
    S.LOST: set(),
}
#: a legal path from queued to each state
PATHS: dict[RunState, list[RunState]] = {
    S.QUEUED: [],
    S.DISPATCHED: [S.DISPATCHED],
    S.RUNNING: [S.DISPATCHED, S.RUNNING],
    S.COMPLETED: [S.DISPATCHED, S.RUNNING, S.COMPLETED],
    S.FAILED: [S.DISPATCHED, S.RUNNING, S.FAILED],
    S.CANCELLED: [S.CANCELLED],
    S.LOST: [S.DISPATCHED, S.LOST],
}
ALL_PAIRS = [(src, dst) for src in RunState for dst in RunState]


class FakeClock:
    """Unix nanoseconds that advance by 1,000 on every reading."""

    def __init__(self, start: int = 1_700_000_000_000_000_000) -> None:
        self._ticks = itertools.count(start, 1_000)
        self.last = start

    def __call__(self) -> int:
        self.last = next(self._ticks)
        return self.last


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(tmp_path: Path, clock: FakeClock) -> Iterator[Registry]:
    reg = Registry(tmp_path / "controller.sqlite", clock=clock)
    yield reg
    reg.close()


def config(**overrides: object) -> RunConfig:
    raw: dict[str, object] = {"env": "FrozenLake-v1", "algo": "random", "episodes": 3}
    raw.update(overrides)
    return parse_config(raw)


def run_in(registry: Registry, state: RunState) -> Run:
    run, _ = registry.submit(config())
    for step in PATHS[state]:
        changed = registry.transition(run.run_id, step, **({"worker_id": "w1"} if step is S.DISPATCHED else {}))
        assert changed is not None
        run = changed
    assert run.state is state
    return run


def test_submit_stores_a_queued_run(registry: Registry, clock: FakeClock) -> None:
    run, created = registry.submit(config(name="first", telemetry="fast"))

    assert created is True
    assert len(run.run_id) == 26  # a ULID
    assert run.state is S.QUEUED
    assert (run.name, run.env, run.algo, run.telemetry) == ("first", "FrozenLake-v1", "random", "fast")
    assert run.config["episodes"] == 3 and run.config["telemetry"] == "fast"
    assert run.created_ns == run.updated_ns
    assert run.worker_id is None and run.started_ns is None and run.ended_ns is None
    wire = run.to_wire()
    assert set(wire) == {
        "run_id", "name", "env", "algo", "telemetry", "config", "state", "created_ns",
        "updated_ns", "started_ns", "ended_ns", "worker_id", "reason", "frames_emitted",
        "episodes", "steps", "tags", "group",
    }
    assert wire["state"] == "queued"
    assert (wire["tags"], wire["group"]) == ({}, "")


def test_the_transition_table_is_what_the_protocol_says() -> None:
    from gymbus.services.controller.registry import TRANSITIONS

    assert {src: set(dsts) for src, dsts in TRANSITIONS.items()} == LEGAL
    assert all(not TRANSITIONS[state] for state in TERMINAL_STATES)


@pytest.mark.parametrize(("src", "dst"), ALL_PAIRS, ids=[f"{s.value}->{d.value}" for s, d in ALL_PAIRS])
def test_every_transition_is_applied_only_when_legal(
    registry: Registry, src: RunState, dst: RunState, caplog: pytest.LogCaptureFixture
) -> None:
    run = run_in(registry, src)

    with caplog.at_level(logging.WARNING, logger="gymbus.controller"):
        result = registry.transition(run.run_id, dst)

    stored = registry.get(run.run_id)
    assert stored is not None
    if dst in LEGAL[src]:
        assert result is not None and result.state is dst and stored.state is dst
        assert stored.updated_ns > run.updated_ns
    else:
        assert result is None
        assert stored == run  # nothing written, not even updated_ns
        assert "refused transition" in caplog.text


@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATES))
def test_terminal_runs_never_change(registry: Registry, terminal: RunState) -> None:
    run = run_in(registry, terminal)

    for dst in RunState:
        assert registry.transition(run.run_id, dst, reason="late", worker_id="other") is None
    assert registry.finish(run.run_id, S.COMPLETED, frames_emitted=9) is None
    assert registry.requeue(run.run_id, "late failure") is None
    assert registry.mark_running(run.run_id) is None
    assert registry.get(run.run_id) == run


def test_unknown_run_is_refused(registry: Registry) -> None:
    assert registry.get("nope") is None
    assert registry.transition("nope", S.DISPATCHED) is None
    assert registry.requeue("nope", "x") is None


def test_transition_rejects_columns_it_may_not_set(registry: Registry) -> None:
    run, _ = registry.submit(config())
    with pytest.raises(ValueError):
        registry.transition(run.run_id, S.DISPATCHED, created_ns=0)


def test_lifecycle_sets_timestamps_and_results(registry: Registry, clock: FakeClock) -> None:
    run, _ = registry.submit(config())

    dispatched = registry.mark_dispatched(run.run_id, "w1")
    running = registry.mark_running(run.run_id)
    done = registry.finish(run.run_id, S.COMPLETED, reason=None, frames_emitted=12, episodes=3, steps=40)

    assert dispatched is not None and dispatched.worker_id == "w1"
    assert running is not None and running.started_ns is not None
    assert running.started_ns > run.created_ns
    assert done is not None and done.state is S.COMPLETED
    assert (done.frames_emitted, done.episodes, done.steps) == (12, 3, 40)
    assert done.ended_ns is not None and done.ended_ns > running.started_ns
    assert done.started_ns == running.started_ns and done.worker_id == "w1"


def test_finish_accepts_only_terminal_states(registry: Registry) -> None:
    run = run_in(registry, S.RUNNING)
    with pytest.raises(ValueError):
        registry.finish(run.run_id, S.QUEUED)


def test_failed_dispatches_requeue_then_fail(registry: Registry) -> None:
    run, _ = registry.submit(config())

    for attempt in range(1, MAX_DISPATCH_ATTEMPTS):
        registry.mark_dispatched(run.run_id, "w1")
        again = registry.requeue(run.run_id, f"no slot ({attempt})")
        assert again is not None and again.state is S.QUEUED and again.worker_id is None
        assert registry.dispatch_failures(run.run_id) == attempt

    registry.mark_dispatched(run.run_id, "w1")
    failed = registry.requeue(run.run_id, "no slot (last)")

    assert failed is not None and failed.state is S.FAILED
    assert failed.reason is not None and "no slot (last)" in failed.reason
    assert failed.ended_ns is not None


def test_requeue_of_a_running_run_is_refused(registry: Registry) -> None:
    run = run_in(registry, S.RUNNING)
    assert registry.requeue(run.run_id, "late dispatch_failed") is None
    assert registry.dispatch_failures(run.run_id) == 0
    assert registry.get(run.run_id) == run


def test_idempotency_key_makes_one_run(registry: Registry) -> None:
    first, created = registry.submit(config(), idempotency_key="key-1")
    again, created_again = registry.submit(config(seed=7), idempotency_key="key-1")
    other, created_other = registry.submit(config(), idempotency_key="key-2")

    assert created is True and created_again is False and created_other is True
    assert again == first
    assert other.run_id != first.run_id
    assert len(registry.runs()) == 2


def test_empty_idempotency_key_means_none(registry: Registry) -> None:
    a, _ = registry.submit(config(), idempotency_key="")
    b, created = registry.submit(config(), idempotency_key="")
    assert created is True and a.run_id != b.run_id


def test_queued_is_oldest_first_and_limited(registry: Registry) -> None:
    ids = [registry.submit(config(name=f"r{i}"))[0].run_id for i in range(4)]
    registry.transition(ids[1], S.CANCELLED)

    assert [r.run_id for r in registry.queued()] == [ids[0], ids[2], ids[3]]
    assert [r.run_id for r in registry.queued(limit=2)] == [ids[0], ids[2]]
    assert [r.run_id for r in registry.runs()] == ids


def test_active_filters_by_worker(registry: Registry) -> None:
    a = run_in(registry, S.RUNNING)
    b, _ = registry.submit(config())
    registry.mark_dispatched(b.run_id, "w2")
    run_in(registry, S.COMPLETED)

    assert {r.run_id for r in registry.active()} == {a.run_id, b.run_id}
    assert [r.run_id for r in registry.active("w2")] == [b.run_id]
    assert registry.active("w9") == []


def test_runs_survive_reopening(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "controller.sqlite"
    first = Registry(path, clock=clock)
    queued, _ = first.submit(config(name="waiting"), idempotency_key="k")
    done = run_in(first, S.COMPLETED)
    first.close()
    first.close()  # idempotent

    second = Registry(path, clock=clock)
    try:
        assert second.get(queued.run_id) == queued
        assert second.get(done.run_id) == done
        assert [r.run_id for r in second.queued()] == [queued.run_id]
        assert second.submit(config(), idempotency_key="k") == (queued, False)
    finally:
        second.close()


def test_the_file_uses_wal(registry: Registry) -> None:
    with closing(sqlite3.connect(registry.path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
