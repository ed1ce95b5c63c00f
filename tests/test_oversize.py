"""Oversized frames and control messages: refused by the decoders and counted up to the socket
limit (4 x GYMBUS_MAX_FRAME_BYTES), cut by the socket beyond it; only the offender's connection
is cut, and nothing is ever buffered beyond the limit, whatever size a peer announces.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from conftest import STACK_ENV, stack_fixture, wait_until
from test_fuzz import BrokerLog, dealer, publisher, receive, sql

from gymbus.services.stack.launcher import Stack
from gymbus.shared import security
from gymbus.shared.codec import encode_frame, encode_message
from gymbus.shared.protocol import MAX_FRAME_BYTES, Command, ErrorCode, FrameKind
from gymbus.shared.transport import Client, bind, connect, new_socket

pytestmark = pytest.mark.integration

SOCKET_LIMIT = security.WIRE_LIMIT_FACTOR * MAX_FRAME_BYTES
OVER_LIMIT = MAX_FRAME_BYTES + 1024 * 1024  # refused by the decoder: too_large, dead letter
OVER_SOCKET_LIMIT = SOCKET_LIMIT + 1024 * 1024  # cut by libzmq (ZMQ_MAXMSGSIZE)
RUN = "01OVERSIZERUN"


def test_bound_sockets_carry_the_size_limits(ctx: zmq.Context[Any]) -> None:
    security.install(security.Policy(max_frame_bytes=1000))
    try:
        expected = {zmq.ROUTER: 4000, zmq.XSUB: 4000, zmq.XPUB: security.SUBSCRIPTION_LIMIT,
                    zmq.PUB: security.SUBSCRIPTION_LIMIT}
        for kind, limit in expected.items():
            sock = new_socket(ctx, kind, linger=0)
            bind(sock, "tcp://127.0.0.1:*", "test socket")
            assert sock.getsockopt(zmq.MAXMSGSIZE) == limit
            sock.close()
        client = new_socket(ctx, zmq.DEALER, linger=0)
        connect(client, "tcp://127.0.0.1:9", "nothing")
        assert client.getsockopt(zmq.MAXMSGSIZE) == -1  # a client trusts what it asked for
        client.close()
    finally:
        security.install(None)


stack = stack_fixture("oversize", **STACK_ENV)


@pytest.fixture
def ingest(stack: Stack) -> Iterator[Client]:
    with Client(stack.settings.ingest, "ingest", 5.0) as client:
        yield client


def watch(ctx: zmq.Context[Any], sock: zmq.Socket[Any]) -> zmq.Socket[Any]:
    """A monitor of `sock`'s disconnections: the offender's own view that it was cut."""
    endpoint = f"inproc://watch-{id(sock):x}"
    sock.monitor(endpoint, zmq.EVENT_DISCONNECTED)
    mon = ctx.socket(zmq.PAIR)
    mon.connect(endpoint)
    return mon


def metric(seq: int) -> list[bytes]:
    return list(encode_frame(FrameKind.METRIC, RUN, seq, {
        "name": ["x"], "step": [seq], "value": [1.0], "ts_ns": [seq]}))


def stored(ingest: Client) -> int:
    runs = sql(ingest, f"SELECT count(*) AS n FROM frames WHERE run_id = '{RUN}'")
    return int(runs[0]["n"])


def test_frames_over_the_limit_are_dead_letters_and_beyond_the_socket_limit_cut_the_sender(
    stack: Stack, ctx: zmq.Context[Any], ingest: Client
) -> None:
    s = stack.settings
    before = sql(ingest, "SELECT count(*) AS n FROM dead_letters")[0]["n"]
    honest = publisher(ctx, s.telemetry_in)
    offender = ctx.socket(zmq.XPUB)
    offender.setsockopt(zmq.LINGER, 0)
    offender.setsockopt(zmq.XPUB_VERBOSE, 1)  # see the subscription again after a reconnect
    cut = watch(ctx, offender)
    offender.connect(s.telemetry_in)
    assert offender.poll(5000)
    offender.recv()

    offender.send_multipart([metric(0)[0], b"\x00" * OVER_LIMIT])  # decoder: a dead letter
    offender.send_multipart(metric(0))
    wait_until(lambda: stored(ingest) == 1, 10, "the frame after the oversized one")
    letters = sql(ingest, f"SELECT reason, size FROM dead_letters WHERE size >= {OVER_LIMIT}")
    assert len(letters) == 1 and "over the limit" in letters[0]["reason"]

    offender.send_multipart([metric(1)[0], b"\x00" * OVER_SOCKET_LIMIT])  # socket: cut
    assert cut.poll(5000), "the broker did not cut the publisher of an over-limit frame"
    honest.send_multipart(metric(1))  # the other publishers are not affected
    wait_until(lambda: stored(ingest) == 2, 10, "the honest publisher's frame")
    assert offender.poll(5000), "the offender did not reconnect"  # it may come back
    offender.recv()
    offender.send_multipart(metric(2))
    wait_until(lambda: stored(ingest) == 3, 10, "the reconnected publisher's frame")
    assert sql(ingest, "SELECT count(*) AS n FROM dead_letters")[0]["n"] == before + 1
    stack.check_alive()
    for sock in (honest, offender, cut):
        sock.close()


@pytest.mark.parametrize("target", ["controller", "ingest", "broker_workers"])
def test_control_messages_over_the_limit_are_refused_and_beyond_it_cut_the_sender(
    stack: Stack, ctx: zmq.Context[Any], target: str
) -> None:
    s = stack.settings
    endpoint = {"controller": s.controller, "ingest": s.ingest,
                "broker_workers": s.broker_workers}[target]
    broker_log = BrokerLog(stack.services["broker"].log_path)
    counted = broker_log.update()
    sock = dealer(ctx, endpoint, b"oversize-peer")
    cut = watch(ctx, sock)
    sock.send(msgpack.packb({"v": 1, "cmd": "ping", "req": 7, "blob": b"x" * OVER_LIMIT}))
    if target == "broker_workers":
        wait_until(lambda: broker_log.update() == counted + 1, 10, "the broker to count it")
        assert "over the limit" in broker_log.reasons[-1]
    else:
        reply = receive(sock)
        assert (reply.ok, reply.error["code"]) == (False, ErrorCode.TOO_LARGE.value)
    sock.send(b"x" * OVER_SOCKET_LIMIT)
    assert cut.poll(5000), f"the {target} did not cut the peer of an over-limit message"
    service = "controller" if target == "broker_workers" else target
    with Client(s.controller if service == "controller" else s.ingest, service, 5.0) as other:
        assert other.request(Command.PING) == {"service": service}  # others are still served
        if target == "broker_workers":  # and the broker still hears the real worker
            assert other.request(Command.LIST_WORKERS)["workers"]
    if target != "broker_workers":  # the offender reconnects, and is served again
        sock.send(encode_message(Command.PING, {}, 8))
        assert receive(sock).req == 8
    stack.check_alive()
    sock.close()
    cut.close()


def raw_zmtp_peer(endpoint: str, socket_type: bytes) -> socket.socket:
    """A plain TCP peer that speaks just enough ZMTP 3.0 (NULL mechanism) to send frames."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    peer = socket.create_connection((host, int(port)), timeout=5)
    peer.sendall(b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32)
    name, value = b"Socket-Type", socket_type
    ready = b"\x05READY" + bytes([len(name)]) + name + struct.pack(">I", len(value)) + value
    peer.sendall(b"\x04" + bytes([len(ready)]) + ready)
    return peer


@pytest.mark.parametrize("target, socket_type", [("telemetry_in", b"PUB"),
                                                 ("controller", b"DEALER"),
                                                 ("broker_workers", b"DEALER")])
def test_an_announced_huge_frame_is_cut_at_its_header_not_buffered(
    stack: Stack, target: str, socket_type: bytes
) -> None:
    """A peer announces a 2 GiB frame and streams it: the service resets the connection at the
    header. (Without ZMQ_MAXMSGSIZE libzmq allocates the 2 GiB and buffers all that comes.)"""
    peer = raw_zmtp_peer(getattr(stack.settings, target), socket_type)
    sent, error = 0, None
    chunk = b"\x00" * (1024 * 1024)
    try:
        peer.sendall(b"\x02" + struct.pack(">Q", 2**31))  # a long frame of 2 GiB
        while sent < 256 * 1024 * 1024:
            peer.sendall(chunk)
            sent += len(chunk)
    except OSError as exc:
        error = exc
    finally:
        peer.close()
    assert isinstance(error, (ConnectionResetError, BrokenPipeError)), error
    assert sent < 32 * 1024 * 1024, f"the {target} took {sent} bytes of a frame over its limit"
    stack.check_alive()
