"""The ingest's receiver thread: frames keep being received while the writer is held (in a flush,
a query), a full queue holds the receiver back instead of dropping, and a stop takes everything
queued. The real Ingest and Store on a real DuckDB file, fed by a test-owned XPUB."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import duckdb
import pytest
import zmq
from conftest import wait_until
from test_archive import run_parts
from test_ingest_service import subscribed

from gymbus.services.ingest import receiver as receiver_mod
from gymbus.services.ingest.service import Ingest
from gymbus.shared.service import StopFlag
from gymbus.shared.settings import Settings


class Held:
    """The ingest's writer on a thread, with its flushes held on an Event until `release`."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self.entered = threading.Event()
        self.released = threading.Event()
        flush: Callable[[], int] = ingest.store.flush

        def held_flush() -> int:
            if ingest.store.seconds_until_flush() is not None:
                self.entered.set()
                self.released.wait(60)
            return flush()

        ingest.store.flush = held_flush  # type: ignore[method-assign]
        self.stop = StopFlag()
        self.thread = threading.Thread(target=ingest.serve, args=(self.stop,), daemon=True)

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def xpub(gymbus_settings: Settings) -> Iterator[zmq.Socket[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(gymbus_settings.telemetry_out)
    yield sock
    sock.close()
    ctx.term()


def serve_held(settings: Settings, xpub: zmq.Socket[Any]) -> Held:
    held = Held(Ingest.open(settings))
    held.thread.start()
    wait_until(lambda: subscribed(xpub), timeout=15, what="the ingest's subscription")
    return held


def stored_steps(settings: Settings) -> int:
    with duckdb.connect(str(settings.db_path), read_only=True) as db:
        row = db.execute("SELECT count(*) FROM steps").fetchone()
    return 0 if row is None else int(row[0])


def test_frames_are_received_while_the_writer_is_held(gymbus_settings: Settings,
                                                     xpub: zmq.Socket[Any]) -> None:
    held = serve_held(gymbus_settings, xpub)
    ingest, receiver = held.ingest, held.ingest.receiver
    first, rest = run_parts("run-a", frames=1, rows=10), run_parts("run-b", frames=300, rows=10)
    try:
        for parts in first:
            xpub.send_multipart(list(parts))
        wait_until(held.entered.is_set, timeout=15, what="the writer to hold in its flush")
        taken = receiver.taken
        for parts in rest:
            xpub.send_multipart(list(parts))
        # the receiver goes on while the writer waits on the Event: its counter advances
        wait_until(lambda: receiver.received == len(first) + len(rest), timeout=15,
                   what="every frame received while the writer is held")
        assert receiver.taken == taken  # the writer took nothing meanwhile
        assert ingest.handle_ingest_stats({})["receive_backlog"] == len(rest)
        held.stop.set()  # a stop while held: whatever is queued is still taken
        held.release()
        held.thread.join(timeout=30)
        assert not held.thread.is_alive()
        stats = ingest.handle_ingest_stats({})
        assert stats["receive_backlog_max"] >= len(rest)
    finally:
        held.release()
        held.stop.set()
        held.thread.join(timeout=30)
        ingest.close()
    assert (stats["frames_received"], stats["receive_backlog"]) == (len(first) + len(rest), 0)
    assert stored_steps(gymbus_settings) == 10 + 300 * 10


def test_a_full_queue_holds_the_receiver_back_and_drops_nothing(
        gymbus_settings: Settings, xpub: zmq.Socket[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(receiver_mod, "QUEUE_MESSAGES", 20)
    monkeypatch.setattr(receiver_mod, "BATCH_FRAMES", 10)
    held = serve_held(gymbus_settings, xpub)
    ingest, receiver = held.ingest, held.ingest.receiver
    frames = run_parts("run-c", frames=400, rows=5)
    try:
        xpub.send_multipart(list(frames[0]))
        wait_until(held.entered.is_set, timeout=15, what="the writer to hold in its flush")
        for parts in frames[1:]:
            xpub.send_multipart(list(parts))
        wait_until(lambda: receiver.full_waits > 0, timeout=15,
                   what="the receiver to find the queue full")
        # bounded: a batch is queued only while fewer than 20 messages wait
        assert receiver.received - receiver.taken < 20 + 10
        held.release()
        wait_until(lambda: ingest.store.counters["frames_received"] == len(frames), timeout=30,
                   what="every frame taken once the writer goes on")
    finally:
        held.release()
        held.stop.set()
        held.thread.join(timeout=30)
        ingest.close()
    assert stored_steps(gymbus_settings) == 400 * 5


def test_ingest_stats_name_the_receive_queue(gymbus_settings: Settings,
                                             xpub: zmq.Socket[Any]) -> None:
    held = serve_held(gymbus_settings, xpub)
    held.release()
    try:
        stats = held.ingest.handle_ingest_stats({})
        assert {"received", "receive_backlog", "receive_backlog_max",
                "receive_full_waits"} <= stats.keys()
    finally:
        held.stop.set()
        held.thread.join(timeout=30)
        held.ingest.close()
