"""The ingest's store alone, on a real DuckDB file: types, dedupe, gaps, completeness, restarts."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import msgpack
import numpy as np
import pytest

from gymbus.services.ingest.store import DEAD_LETTER_PAYLOAD_BYTES, FLUSH_ROWS, Store
from gymbus.shared.codec import Frame, decode_frame, encode_frame
from gymbus.shared.errors import DecodeError
from gymbus.shared.protocol import FrameKind, topic

RUN = "01JD3Q6R8W4Y2M5N7P9QAZBXCE"
T0_NS = 1_700_000_000_123_456_789


def frame(kind: FrameKind, seq: int, body: dict[str, Any], run_id: str = RUN) -> Frame:
    """A frame as the ingest gets it: encoded by the codec, then decoded and checked."""
    parts = encode_frame(kind, run_id, seq, body, agent_id="agent-0", worker_id="w1", ts_ns=T0_NS)
    return decode_frame(list(parts))


def started(seq: int = 0, **extra: Any) -> Frame:
    config = {"env": "FrozenLake-v1", "algo": "q-learning", "seed": 7, "telemetry": "full"}
    return frame(FrameKind.LIFECYCLE, seq, {"event": "run_started", "config": config, **extra})


def completed(seq: int, emitted: int) -> Frame:
    body = {"event": "run_completed", "status": "completed", "frames_emitted": emitted,
            "reason": None, "episodes": 1, "steps": 3}
    return frame(FrameKind.LIFECYCLE, seq, body)


def steps(seq: int, n: int = 3, vector: bool = False, label: bool = True) -> Frame:
    body: dict[str, Any] = {
        "episode": [0] * n, "step": list(range(n)), "action": [i % 4 for i in range(n)],
        "obs": [[0.5 * i, -1.0] for i in range(n)] if vector else list(range(n)),
        "reward": [0.0] * (n - 1) + [1.0], "terminated": [False] * (n - 1) + [True],
        "truncated": [False] * n,
    }
    if label:
        body["label"] = ["explore"] * n
    return frame(FrameKind.STEP, seq, body)


def metric(seq: int, name: str = "charts/epsilon") -> Frame:
    return frame(FrameKind.METRIC, seq, {"name": [name], "step": [10], "value": [0.25],
                                         "ts_ns": [T0_NS]})


def episode(seq: int) -> Frame:
    return frame(FrameKind.EPISODE, seq, {"episode": [0, 1], "return": [1.0, 0.5], "length": [3, 4],
                                          "terminated": [True, False], "truncated": [False, True],
                                          "ts_ns": [T0_NS, T0_NS + 1000]})


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gymbus.duckdb"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


def rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    store.flush()
    conn = store.conn
    if conn is None:
        raise RuntimeError("store closed")
    return conn.execute(sql).fetchall()


def run_row(store: Store, column: str) -> Any:
    return rows(store, f"SELECT {column} FROM runs WHERE run_id = '{RUN}'")[0][0]


def test_every_kind_is_stored_with_typed_columns(store: Store) -> None:
    for f in (started(0), steps(1), steps(2, vector=True, label=False), episode(3), metric(4),
              completed(5, emitted=6)):
        assert store.add(f)
    assert store.flush() == 6

    types = dict(rows(store, "SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_name = 'steps'"))
    assert types["obs"] == "BIGINT" and types["obs_vec"] == "DOUBLE[]"
    assert types["reward"] == "DOUBLE" and types["terminated"] == "BOOLEAN"
    step_rows = rows(store, "SELECT seq, step, obs, obs_vec, label FROM steps ORDER BY seq, step")
    assert step_rows[:3] == [(1, 0, 0, None, "explore"), (1, 1, 1, None, "explore"),
                             (1, 2, 2, None, "explore")]
    assert step_rows[3:] == [(2, 0, None, [0.0, -1.0], None), (2, 1, None, [0.5, -1.0], None),
                             (2, 2, None, [1.0, -1.0], None)]
    assert rows(store, 'SELECT episode, "return", length, terminated, truncated, '
                       "epoch_ns(ts) FROM episodes ORDER BY episode") == [
        (0, 1.0, 3, True, False, T0_NS // 1000 * 1000),
        (1, 0.5, 4, False, True, (T0_NS + 1000) // 1000 * 1000),
    ]
    assert rows(store, "SELECT name, step, value FROM metrics") == [("charts/epsilon", 10, 0.25)]
    lifecycle = rows(store, "SELECT event, status, frames_emitted, steps FROM lifecycle "
                            "ORDER BY seq")
    assert lifecycle == [("run_started", None, None, None), ("run_completed", "completed", 6, 3)]
    assert rows(store, "SELECT seq, kind, rows, ts_ns FROM frames ORDER BY seq")[1] == (
        1, "step", 3, T0_NS)
    run = rows(store, "SELECT agent_id, worker_id, env, algo, telemetry, seed, "
                      "config::JSON->>'env', "
                      "status, frames_emitted, frames_stored, complete, episodes, steps, metrics, "
                      "started_at IS NOT NULL, ended_at IS NOT NULL FROM runs")
    assert run == [("agent-0", "w1", "FrozenLake-v1", "q-learning", "full", 7, "FrozenLake-v1",
                    "completed", 6, 6, True, 2, 6, 1, True, True)]
    assert store.stats()["rows"] == {"lifecycle": 2, "episodes": 2, "steps": 6, "metrics": 1}


def test_odd_lifecycle_fields_are_stored_as_null_not_fatal(store: Store) -> None:
    assert store.add(started(0, seed=2**64 - 1, env=3, telemetry=["full"]))
    assert store.flush() == 1
    assert rows(store, "SELECT env, seed, telemetry FROM runs") == [(None, None, None)]


def test_duplicates_are_dropped_and_counted(store: Store) -> None:
    assert store.add(started(0))
    assert store.add(steps(1))
    assert not store.add(steps(1))  # in the same batch
    store.flush()
    assert not store.add(steps(1))  # after it was written
    assert not store.add(started(0))
    store.flush()
    assert rows(store, "SELECT count(*) FROM steps") == [(3,)]
    assert rows(store, "SELECT count(*) FROM frames") == [(2,)]
    assert run_row(store, "duplicates") == 3
    assert store.stats()["duplicates"] == 3
    assert store.run_stats(RUN)[0]["duplicates"] == 3


def test_an_out_of_order_frame_fills_its_gap(store: Store) -> None:
    for seq in (0, 1, 4):
        store.add(metric(seq))
    store.flush()
    assert store.run_stats(RUN)[0]["gaps"] == 2
    assert rows(store, "SELECT first_seq, last_seq, filled_at FROM gaps") == [(2, 3, None)]

    store.add(metric(3))
    store.flush()
    assert (store.run_stats(RUN)[0]["gaps"], run_row(store, "gaps")) == (1, 1)
    assert rows(store, "SELECT filled_at FROM gaps") == [(None,)]
    store.add(metric(2))
    store.add(metric(6))  # opens a gap at 5 that is filled in the same batch
    store.add(metric(5))
    store.flush()
    assert store.run_stats(RUN)[0]["gaps"] == 0
    gaps = rows(store, "SELECT first_seq, last_seq, filled_at >= detected_at FROM gaps ORDER BY 1")
    assert gaps == [(2, 3, True), (5, 5, True)]


def test_complete_once_every_emitted_frame_is_stored(store: Store) -> None:
    for f in (started(0), metric(1), metric(3)):
        store.add(f)
    store.add(completed(6, emitted=8))  # seq 7 is missing too: frames_emitted says so
    stats = store.run_stats(RUN)[0]
    assert (stats["complete"], stats["gaps"], stats["frames_emitted"]) == (False, 4, 8)
    for seq in (2, 4, 5):
        store.add(metric(seq))
    store.flush()
    assert not store.run_stats(RUN)[0]["complete"]
    store.add(metric(7))
    store.flush()
    stats = store.run_stats(RUN)[0]
    assert (stats["complete"], stats["gaps"], stats["frames_stored"], stats["status"]) == (
        True, 0, 8, "completed")
    assert run_row(store, "complete") is True


def test_state_is_rebuilt_after_reopening(db_path: Path) -> None:
    first = Store(db_path)
    for f in (started(0), steps(1), steps(2), metric(4)):
        first.add(f)
    first.add(steps(1))
    first.close()

    again = Store(db_path)
    try:
        assert [again.add(f) for f in (started(0), steps(1), steps(2), metric(4))] == [False] * 4
        assert again.add(metric(3))  # the gap left before the restart
        again.add(completed(5, emitted=6))
        again.flush()
        stats = again.run_stats(RUN)[0]
        assert (stats["duplicates"], stats["frames_stored"], stats["gaps"], stats["complete"]) == (
            5, 6, 0, True)
        assert rows(again, "SELECT count(*) FROM steps") == [(6,)]
        assert rows(again, "SELECT first_seq, filled_at IS NOT NULL FROM gaps") == [(3, True)]
        assert run_row(again, "env") == "FrozenLake-v1"
    finally:
        again.close()


def dead_letter_parts() -> list[tuple[list[bytes], str]]:
    """Real bad inputs with the reason the decoder gives for each."""
    good_topic, good = encode_frame(FrameKind.METRIC, RUN, 0, {"name": ["x"], "step": [1],
                                                               "value": [1.0], "ts_ns": [1]})
    payload = msgpack.unpackb(good)
    wrong_version = msgpack.packb({**payload, "v": 99})
    nan = msgpack.packb({**payload, "body": {**payload["body"], "value": [math.nan]}})
    cases = [[b"step." + RUN.encode(), b"\xc1\xff random bytes"], [good_topic, wrong_version],
             [good_topic, nan], [good_topic, good, b"extra part"],
             [topic(FrameKind.STEP, RUN), b"\x00" * (DEAD_LETTER_PAYLOAD_BYTES * 2)]]
    out = []
    for parts in cases:
        with pytest.raises(DecodeError) as info:
            decode_frame(parts, max_bytes=DEAD_LETTER_PAYLOAD_BYTES)
        out.append((parts, info.value.reason))
    return out


def test_dead_letters_are_kept_with_their_reason(store: Store) -> None:
    cases = dead_letter_parts()
    for parts, reason in cases:
        store.add_dead_letter(parts, reason)
    store.add(metric(0))
    store.flush()
    stored = rows(store, "SELECT reason, topic, size, octet_length(payload) "
                         "FROM dead_letters")  # insertion order
    assert [r[0] for r in stored] == [reason for _, reason in cases]
    assert "malformed msgpack" in stored[0][0] and "version 99" in stored[1][0]
    assert "NaN" in stored[2][0] and "2 parts" in stored[3][0] and "over the limit" in stored[4][0]
    assert stored[4][2:] == (len(cases[4][0][0]) + DEAD_LETTER_PAYLOAD_BYTES * 2,
                             DEAD_LETTER_PAYLOAD_BYTES)
    assert store.stats()["dead_letters"] == len(cases)
    assert rows(store, "SELECT count(*) FROM metrics") == [(1,)]


def test_a_full_buffer_is_due_and_goes_in_one_flush(db_path: Path) -> None:
    store = Store(db_path, clock=lambda: 0.0)  # no time passes: only the row count is due
    frames = FLUSH_ROWS // 1000 + 1
    for seq in range(frames):
        assert not store.flush_due()
        store.add(steps(seq, n=1000, vector=seq % 2 == 1))
    assert store.flush_due()  # past FLUSH_ROWS rows, long before FLUSH_INTERVAL
    assert store.flush() == frames
    assert store.stats()["flushes"] == 1
    assert rows(store, "SELECT count(*), count(obs), count(obs_vec) FROM steps") == [
        (frames * 1000, (frames + 1) // 2 * 1000, frames // 2 * 1000)]
    store.close()


def test_a_failed_flush_is_rolled_back_and_its_frames_can_come_again(store: Store) -> None:
    store.add(steps(0))
    store.flush()
    store.add(steps(1))
    store.add(metric(2))
    assert store.conn is not None
    store.conn.execute("DROP TABLE metrics")  # the next INSERT INTO metrics fails
    assert store.flush() == 0
    stats = store.stats()
    assert (stats["flush_errors"], stats["frames_lost"], stats["pending"]) == (1, 2, 0)
    assert rows(store, "SELECT seq FROM frames") == [(0,)]  # seq 1 was rolled back with seq 2
    assert store.add(steps(1)), "a frame lost in a failed flush is not a duplicate"
    assert not store.add(steps(0))
    store.flush()
    assert rows(store, "SELECT count(*) FROM steps") == [(6,)]


def test_flush_is_due_by_age_or_by_rows(db_path: Path) -> None:
    now = [100.0]
    store = Store(db_path, flush_rows=10, flush_interval=0.2, clock=lambda: now[0])
    try:
        assert store.seconds_until_flush() is None and not store.flush_due()
        store.add(metric(0))
        assert not store.flush_due()
        now[0] += 0.2
        assert store.flush_due()
        store.flush()
        store.add(steps(1, n=10))
        assert store.flush_due()
    finally:
        store.close()


def test_close_is_idempotent_and_writes_after_close_raise(db_path: Path) -> None:
    store = Store(db_path)
    store.add(metric(0))
    store.close()
    store.close()
    with pytest.raises(RuntimeError):
        store.add(metric(1))
    with duckdb.connect(str(db_path), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM metrics").fetchall() == [(1,)]


def test_the_writer_uses_the_duckdb_threads_it_is_given(db_path: Path) -> None:
    for threads in (1, 3):
        store = Store(db_path, threads=threads)
        assert store.cursor().execute("SELECT current_setting('threads')").fetchone() == (threads,)
        store.close()


def test_repeated_strings_come_out_row_by_row_in_order() -> None:
    import pyarrow as pa

    from gymbus.services.ingest.buffers import Repeated, TableBuffer

    buf = TableBuffer([("run_id", pa.string()), ("seq", pa.int64())])
    for value, n in (("a", 2), ("b", 3), ("a", 1), ("c", 0)):
        buf.append(n, {"run_id": Repeated(value, n), "seq": np.arange(n)})
    assert buf.to_arrow().column("run_id").to_pylist() == ["a", "a", "b", "b", "b", "a"]
    buf.append(2, {"run_id": ["d", "e"], "seq": np.arange(2)})  # mixed with Python values
    buf.append(1, {"seq": np.arange(1)})  # and a NULL chunk
    assert buf.to_arrow().column("run_id").to_pylist() == [
        "a", "a", "b", "b", "b", "a", "d", "e", None]
