"""Socket helpers: bounded linger, request/reply with timeouts, and ZeroMQ errors translated.

Services use `bind`, `recv_request` and `send_reply`/`send_error` on their ROUTER sockets (their
handler tables, shared/service.py, do the receiving and answering);
clients use `Client`, which reconnects by closing and recreating its DEALER after a timeout.
`bind` and `connect` apply the process's security policy (shared/security.py): CURVE keys when
configured, the loopback rule when not, and a size limit on what a bound socket accepts.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Self

import zmq

from gymbus.shared.codec import Message, decode_message, encode_error, encode_message, encode_reply
from gymbus.shared.errors import DecodeError, GymbusError, RemoteError, ServiceUnavailable
from gymbus.shared.protocol import MAX_FRAME_BYTES, Command
from gymbus.shared.security import secure_bind, secure_connect

#: milliseconds a closing socket may spend delivering what it still holds
LINGER_MS = 500


class EndpointError(GymbusError):
    """An endpoint could not be bound or connected; check the GYMBUS_* variable that names it."""

    exit_code = 3


def new_socket(
    ctx: zmq.Context[Any],
    kind: int,
    *,
    identity: bytes | None = None,
    hwm: int | None = None,
    linger: int = LINGER_MS,
) -> zmq.Socket[Any]:
    """A socket with a bounded linger (and optional identity and high-water marks)."""
    sock: zmq.Socket[Any] = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if hwm is not None:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
    return sock


def bind(sock: zmq.Socket[Any], endpoint: str, what: str) -> None:
    """Secure (CURVE server, or the loopback rule) and bind; EndpointError or SecurityError
    naming the endpoint and its role. The socket is closed when it raises."""
    try:
        secure_bind(sock, endpoint, what)
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise EndpointError(f"cannot bind the {what} to {endpoint}: {exc}") from None
    except GymbusError:
        sock.close(linger=0)
        raise


def connect(sock: zmq.Socket[Any], endpoint: str, what: str) -> None:
    """Secure (CURVE client when keys are configured) and connect; EndpointError or
    SecurityError naming the endpoint and its role. The socket is closed when it raises."""
    try:
        secure_connect(sock, endpoint, what)
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise EndpointError(f"cannot connect to the {what} at {endpoint}: {exc}") from None
    except GymbusError:
        sock.close(linger=0)
        raise


# --- the serving side ---------------------------------------------------------------------------


def recv_request(
    router: zmq.Socket[Any], max_bytes: int = MAX_FRAME_BYTES
) -> tuple[bytes, Message | DecodeError]:
    """Receive one request from a ROUTER: the peer's identity and the message, or why it failed."""
    parts = router.recv_multipart(copy=True)
    identity = parts[0]
    if len(parts) != 2:
        return identity, DecodeError(f"expected one message frame, got {len(parts) - 1}")
    try:
        return identity, decode_message(parts[1], max_bytes)
    except DecodeError as exc:
        return identity, exc


def send_reply(router: zmq.Socket[Any], identity: bytes, req: int, body: dict[str, Any]) -> None:
    send_payload(router, identity, encode_reply(req, body))


def send_error(router: zmq.Socket[Any], identity: bytes, req: int, error: GymbusError) -> None:
    send_payload(router, identity, encode_error(req, error.to_wire()))


def send_to(router: zmq.Socket[Any], identity: bytes, cmd: Command, body: dict[str, Any]) -> None:
    """Send a command to one peer of a ROUTER (dropped if the peer is gone)."""
    send_payload(router, identity, encode_message(cmd, body))


def send_payload(router: zmq.Socket[Any], identity: bytes, payload: bytes) -> None:
    """Send an encoded message to one peer of a ROUTER, without blocking."""
    try:
        router.send_multipart([identity, payload], flags=zmq.NOBLOCK)
    except zmq.Again:
        pass  # the peer's queue is full or it is gone; a ROUTER drops, and so do we


# --- the client side ----------------------------------------------------------------------------


class Client:
    """Request/reply to one service over a DEALER, with a timeout on every request.

    Not thread-safe: one Client per thread. A timed-out socket is closed and recreated so that a
    late reply never answers the next request.
    """

    def __init__(
        self,
        endpoint: str,
        service: str,
        timeout: float = 5.0,
        ctx: zmq.Context[Any] | None = None,
        max_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.endpoint = endpoint
        self.service = service
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._ctx = ctx or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._sock: zmq.Socket[Any] | None = None

    def _socket(self) -> zmq.Socket[Any]:
        if self._sock is None:
            self._sock = new_socket(self._ctx, zmq.DEALER, linger=0)
            connect(self._sock, self.endpoint, self.service)
        return self._sock

    def request(
        self, cmd: Command, body: dict[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send one request and return the reply's body; raises RemoteError or ServiceUnavailable."""
        wait = self.timeout if timeout is None else timeout
        req = next(self._ids)
        sock = self._socket()
        sock.send(encode_message(cmd, body, req))
        deadline = time.monotonic() + wait
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not sock.poll(left_ms, zmq.POLLIN):
                self.close()
                raise ServiceUnavailable(self.service, self.endpoint, wait)
            reply = decode_message(sock.recv(), self.max_bytes)
            if reply.req != req:
                continue  # a late answer to an earlier request
            if not reply.ok:
                raise RemoteError.from_wire(reply.error or {})
            return reply.body

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
