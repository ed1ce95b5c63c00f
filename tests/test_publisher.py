"""The telemetry publisher against a real XSUB on a loopback port: the wait for a subscriber, the
spool written before each send, backpressure, and the counters of a frame dropped after stop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import free_endpoint, wait_until
from test_emitter import FrameSink

from gymbus.shared.codec import encode_frame
from gymbus.shared.protocol import FrameKind, topic_prefix
from gymbus.worker.telemetry import spool
from gymbus.worker.telemetry.publisher import (
    GIVE_UP_AFTER_STOP,
    Publisher,
    PublishTimeout,
    TelemetryError,
)
from gymbus.worker.telemetry.spool import SpoolError, SpoolReader, SpoolWriter

RUN = "01PUBLISHERTEST"
#: rows of a frame of ~0.6 MB: a few dozen fill the queues and the kernel's buffers
BIG_ROWS = 30_000


def frame(seq: int, rows: int = 3, run_id: str = RUN) -> tuple[bytes, bytes]:
    body = {"name": ["charts/x"] * rows, "step": list(range(rows)), "value": [0.5] * rows,
            "ts_ns": [0] * rows}
    return encode_frame(FrameKind.METRIC, run_id, seq, body)


@pytest.fixture
def sink(ctx: zmq.Context[Any]) -> Iterator[FrameSink]:
    s = FrameSink(ctx)
    yield s
    s.close()


def fill(publisher: Publisher) -> int:
    """Offer frames of another run until the queue refuses one; returns how many it took."""
    filler = frame(0, BIG_ROWS, run_id="01FILLER")
    taken = 0
    while publisher.offer(filler):  # never waits: refused once the queue is full
        taken += 1
        assert taken < 500, "the queue never filled up"
    return taken


def test_waits_for_the_first_subscription(ctx: zmq.Context[Any]) -> None:
    endpoint = free_endpoint()
    publisher = Publisher.connect(ctx, endpoint)  # nobody is there yet: ZeroMQ reconnects
    started = time.monotonic()
    assert not publisher.wait_for_subscriber(0.3)
    assert time.monotonic() - started >= 0.3 and not publisher.subscribed
    sink = FrameSink(ctx, endpoint)  # binds and subscribes to every topic
    try:
        assert publisher.wait_for_subscriber(10)
        assert publisher.subscriptions == {b""}
        assert publisher.publish(0, frame(0), FrameKind.METRIC, 3)
        wait_until(lambda: sink.drain(), what="the first frame")  # not lost to a slow joiner
        assert [f.seq for f in sink.drain()] == [0]
    finally:
        sink.close()
        publisher.close(0)


def test_the_wait_ends_when_stop_turns_true(ctx: zmq.Context[Any]) -> None:
    silent = ctx.socket(zmq.XSUB)  # bound, but nobody subscribes
    silent.setsockopt(zmq.LINGER, 0)
    endpoint = free_endpoint()
    silent.bind(endpoint)
    publisher = Publisher.connect(ctx, endpoint, stop=lambda: True)
    started = time.monotonic()
    assert not publisher.wait_for_subscriber(30)
    assert time.monotonic() - started < 5
    publisher.close(0)
    silent.close()


def test_subscriptions_follow_subscribe_and_unsubscribe(ctx: zmq.Context[Any]) -> None:
    xsub = ctx.socket(zmq.XSUB)
    xsub.setsockopt(zmq.LINGER, 0)
    endpoint = free_endpoint()
    xsub.bind(endpoint)
    publisher = Publisher.connect(ctx, endpoint)
    prefix = topic_prefix(FrameKind.STEP)
    try:
        xsub.send(b"\x01" + prefix)

        def subscribed_to(topics: set[bytes]) -> bool:
            xsub.getsockopt(zmq.EVENTS)  # an XSUB hands its subscriptions to a new peer when called
            return publisher.take_subscriptions() == topics

        wait_until(lambda: subscribed_to({prefix}), what="the step subscription")
        xsub.send(b"\x00" + prefix)
        wait_until(lambda: subscribed_to(set()), what="the unsubscription")
        assert publisher.subscribed  # a subscription has come, once
    finally:
        publisher.close(0)
        xsub.close()


def test_the_spool_is_written_before_the_send(ctx: zmq.Context[Any], sink: FrameSink,
                                              tmp_path: Path) -> None:
    publisher = Publisher.connect(ctx, sink.endpoint)
    assert publisher.wait_for_subscriber(10)
    publisher.spool = SpoolWriter.create(tmp_path)
    reader = SpoolReader(spool.spool_path(tmp_path))
    try:
        # a frame the spool refuses is not sent: had it gone out, it would arrive before frame 0
        # (one ordered path)
        with pytest.raises(SpoolError, match="seq 1 after 0"):
            publisher.publish(1, frame(1), FrameKind.METRIC, 3)
        assert publisher.publish(0, frame(0), FrameKind.METRIC, 3)
        wait_until(lambda: sink.drain(), what="frame 0")
        assert [f.seq for f in sink.drain()] == [0]
        assert reader.refresh() == 1 and list(reader.read(0)) == sink.raw[0]
        # a frame whose send fails is in the spool all the same (the repair replays it)
        publisher.close(0)
        unsent = frame(1)
        with pytest.raises(TelemetryError, match="already closed"):
            publisher.publish(1, unsent, FrameKind.METRIC, 3)
        assert reader.refresh() == 2 and reader.read(1) == unsent
        stats = publisher.stats()
        assert stats["sent"] == 1 and stats["frames"]["metric"] == 1
        assert stats["rows"]["metric"] == 3 and stats["frames_dropped"] == 0
    finally:
        publisher.spool.close()


def test_a_frame_dropped_after_stop_is_counted(ctx: zmq.Context[Any], tmp_path: Path) -> None:
    sink = FrameSink(ctx, rcvhwm=1, paused=True)
    stopping: list[int] = []
    publisher = Publisher.connect(ctx, sink.endpoint, hwm=1, stop=lambda: bool(stopping))
    writer = SpoolWriter.create(tmp_path)
    try:
        assert publisher.wait_for_subscriber(10)
        publisher.spool = writer
        filled = fill(publisher)
        assert publisher.blocked_sends == 1
        stopping.append(1)
        seq = 0
        while True:  # until a send finds no room for GIVE_UP_AFTER_STOP (room may come at first)
            started = time.monotonic()
            if not publisher.publish(seq, frame(seq, BIG_ROWS), FrameKind.METRIC, BIG_ROWS):
                break
            seq += 1
            assert seq < 50, "no send was dropped"
        assert time.monotonic() - started >= GIVE_UP_AFTER_STOP
        stats = publisher.stats()
        assert stats["frames_dropped"] == 1 and stats["blocked_sends"] >= 2
        assert stats["frames"]["metric"] == seq and stats["rows"]["metric"] == seq * BIG_ROWS
        assert stats["sent"] == filled + seq
        assert SpoolReader(spool.spool_path(tmp_path)).refresh() == seq + 1  # spooled still
        sink.resume()
        wait_until(lambda: len(sink.drain()) >= filled + seq, 20, "the queued frames")
        assert [f.seq for f in sink.drain() if f.run_id == RUN] == list(range(seq))
    finally:
        sink.resume()
        sink.close()
        publisher.close(0)
        writer.close()


def test_a_send_without_room_for_block_timeout_raises(ctx: zmq.Context[Any]) -> None:
    sink = FrameSink(ctx, rcvhwm=1, paused=True)
    publisher = Publisher.connect(ctx, sink.endpoint, hwm=1, block_timeout=0.3)
    try:
        assert publisher.wait_for_subscriber(10)
        fill(publisher)
        with pytest.raises(PublishTimeout, match="took no frame for 0.3 s"):
            for seq in range(50):  # until one finds no room for 0.3 s
                publisher.publish(seq, frame(seq, BIG_ROWS))
        assert publisher.frames_dropped == 0
    finally:
        sink.resume()
        sink.close()
        publisher.close(0)
