"""The broker's worker table, driven by a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import itertools

import pytest

from gymbus.services.broker.worker_table import LostWorker, WorkerTable

INTERVAL = 0.25
LIVENESS = 3
WINDOW = INTERVAL * LIVENESS  # 0.75 exactly in binary floating point


@pytest.fixture
def table() -> WorkerTable:
    wall = itertools.count(1_000)
    return WorkerTable(INTERVAL, LIVENESS, wall_ns=lambda: next(wall))


def test_register_makes_a_worker_record(table: WorkerTable) -> None:
    replaced = table.register("w1", "host-a", 42, 2, ["r1"], now=10.0)

    assert replaced is False
    assert "w1" in table and len(table) == 1
    assert table.records() == [{
        "worker_id": "w1", "host": "host-a", "pid": 42, "slots": 2, "busy": 1, "runs": ["r1"],
        "last_heartbeat_ns": 1_000, "capacity": {},
    }]


def test_register_again_replaces_the_older_entry(table: WorkerTable) -> None:
    table.register("w1", "host-a", 42, 2, ["r1"], now=10.0)

    replaced = table.register("w1", "host-b", 43, 4, [], now=11.0)

    assert replaced is True
    (record,) = table.records()
    assert (record["host"], record["pid"], record["slots"], record["runs"]) == ("host-b", 43, 4, [])


def test_refresh_updates_busy_runs_and_reports_change(table: WorkerTable) -> None:
    table.register("w1", "h", 1, 2, [], now=0.0)

    assert table.refresh("w1", 1, ["r1"], now=0.2) is True
    assert table.refresh("w1", 1, ["r1"], now=0.4) is False  # same content: no change
    record = table.records()[0]
    assert record["busy"] == 1 and record["runs"] == ["r1"]
    assert record["last_heartbeat_ns"] > 1_000


def test_refresh_of_an_unknown_worker_raises(table: WorkerTable) -> None:
    with pytest.raises(KeyError):
        table.refresh("ghost", 0, [], now=0.0)
    assert table.touch("ghost", 0.0) is False
    assert len(table) == 0


def test_expiry_is_exactly_at_the_liveness_window(table: WorkerTable) -> None:
    table.register("w1", "h", 1, 2, ["r1"], now=100.0)

    assert table.purge_expired(100.0 + WINDOW - 1e-9) == []
    assert not table.expired("w1", 100.0 + WINDOW - 1e-9)
    assert table.expired("w1", 100.0 + WINDOW)
    assert table.purge_expired(100.0 + WINDOW) == [LostWorker("w1", ["r1"])]
    assert "w1" not in table
    assert table.purge_expired(200.0) == []  # reported once


def test_heartbeat_and_any_message_postpone_expiry(table: WorkerTable) -> None:
    table.register("w1", "h", 1, 2, [], now=0.0)
    table.refresh("w1", 0, [], now=0.5)
    assert table.purge_expired(0.5 + WINDOW - 0.01) == []
    table.touch("w1", now=1.2)
    assert table.next_expiry() == pytest.approx(1.2 + WINDOW)
    assert [w.worker_id for w in table.purge_expired(1.2 + WINDOW)] == ["w1"]


def test_purge_takes_only_the_silent_ones_sorted(table: WorkerTable) -> None:
    table.register("w3", "h", 1, 1, ["c"], now=0.0)
    table.register("w1", "h", 1, 1, ["a"], now=0.0)
    table.register("w2", "h", 1, 1, [], now=0.5)

    lost = table.purge_expired(WINDOW)

    assert lost == [LostWorker("w1", ["a"]), LostWorker("w3", ["c"])]
    assert [r["worker_id"] for r in table.records()] == ["w2"]
    assert table.next_expiry() == pytest.approx(0.5 + WINDOW)


def test_remove_forgets_a_worker(table: WorkerTable) -> None:
    table.register("w1", "h", 1, 2, ["r1"], now=0.0)

    entry = table.remove("w1")

    assert entry is not None and entry.runs == ["r1"]
    assert table.remove("w1") is None
    assert table.records() == [] and table.next_expiry() is None
    assert table.purge_expired(10.0) == []


def test_records_are_copies(table: WorkerTable) -> None:
    table.register("w1", "h", 1, 2, ["r1"], now=0.0)
    table.records()[0]["runs"].append("tampered")
    assert table.records()[0]["runs"] == ["r1"]
