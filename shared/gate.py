"""Handler tables that know who is asking: each message's ZAP User-Id, and its key's role checked.

`RoleRequestTable` is a `RequestTable` (shared/service.py) that receives with the User-Id of the
connection, answers a request its sender's role does not allow with a `forbidden` error reply
(logged, counted in `forbidden`), and keeps the script runs a restricted key opened as that key's
own: only it may keep them alive or close them, and `on_open` tells the broker that it may
publish their telemetry. `KeyedMessageTable` is the broker's `MessageTable` with the User-Id.
Both run on their service's loop thread; without CURVE every User-Id is '' and nothing is
refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import zmq

from gymbus.shared.codec import Message, decode_message, encode_error
from gymbus.shared.errors import DecodeError, RequestError
from gymbus.shared.protocol import Command, ErrorCode
from gymbus.shared.roles import PURPOSE, may_request, role_of, user_id
from gymbus.shared.service import LOG_EVERY, LOG_FIRST, MessageTable, RequestTable

#: script runs remembered with the key that opened them (the oldest are forgotten first)
MAX_OWNED_RUNS = 100_000
#: the requests that name a script's run, which only the key that opened it may make
OWNED = frozenset({Command.OPEN_RUN, Command.RUN_ALIVE, Command.CLOSE_RUN})


def receive(router: zmq.Socket[Any], max_bytes: int) -> tuple[bytes, str, Message | DecodeError]:
    """One message from a ROUTER: the peer's identity, its ZAP User-Id and the message (or why
    it did not decode)."""
    parts = router.recv_multipart(copy=False)
    identity, user = parts[0].bytes, user_id(parts[-1])
    if len(parts) != 2:
        return identity, user, DecodeError(f"expected one message frame, got {len(parts) - 1}")
    try:
        return identity, user, decode_message(parts[1].bytes, max_bytes)
    except DecodeError as exc:
        return identity, user, exc


class _Keyed(Protocol):
    batch: int
    max_bytes: int
    user: str


def _waiting(table: _Keyed, router: zmq.Socket[Any]
             ) -> Iterator[tuple[bytes, Message | DecodeError]]:
    """The messages waiting on `router` (a table's batch at most), each setting `table.user`
    to its sender's ZAP User-Id before it is handled."""
    for _ in range(table.batch):
        if not router.poll(0, zmq.POLLIN):
            return
        identity, table.user, msg = receive(router, table.max_bytes)
        yield identity, msg


class RoleRequestTable(RequestTable):
    """A RequestTable that refuses what the sender's role does not allow (see the module)."""

    def __init__(self, *args: Any, on_open: Callable[[str, str], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: called with (run_id, user id) when a restricted key opened a script's run
        self.on_open = on_open
        #: the User-Id of the message being handled
        self.user = ""
        #: requests refused for their sender's role
        self.forbidden = 0
        #: script runs opened by restricted keys: run id -> the key
        self.owners: dict[str, str] = {}

    def waiting(self, router: zmq.Socket[Any]) -> Iterator[tuple[bytes, Message | DecodeError]]:
        return _waiting(self, router)

    def reply(self, identity: bytes, msg: Message | DecodeError) -> bytes | None:
        if isinstance(msg, DecodeError):
            return super().reply(identity, msg)
        try:
            self.check(msg)
        except RequestError as exc:
            return encode_error(msg.req, exc.to_wire())
        payload = super().reply(identity, msg)
        # granted again on every run_alive: a restarted broker learns it within a second
        if msg.cmd in (Command.OPEN_RUN, Command.RUN_ALIVE) and role_of(self.user) is not None:
            self.opened(msg.body.get("run_id"), payload)
        return payload

    def check(self, msg: Message) -> None:
        """RequestError `forbidden` (logged, counted) unless the sender may make `msg`."""
        role = role_of(self.user)
        if role is None:
            return
        if not may_request(role, msg.cmd):
            self.refuse(f"a {role} key may not {msg.cmd.value} (a {role} key may "
                        f"{PURPOSE[role]})")
        run_id = msg.body.get("run_id")
        owner = self.owners.get(run_id) if isinstance(run_id, str) else None
        if msg.cmd in OWNED and owner is not None and owner != self.user:
            self.refuse(f"run {run_id} was opened with another key")
        if msg.cmd in (Command.RUN_ALIVE, Command.CLOSE_RUN) and owner is None:
            self.refuse(f"run {run_id} was not opened with this key")

    def refuse(self, reason: str) -> None:
        self.forbidden += 1
        n = self.forbidden
        level = logging.WARNING if n <= LOG_FIRST or n % LOG_EVERY == 0 else logging.DEBUG
        self.log.log(level, "refused a request of key %s to the %s: %s (%d refused so far)",
                     self.user, self.service, reason, n)
        raise RequestError(ErrorCode.FORBIDDEN, f"forbidden: {reason}")

    def opened(self, run_id: Any, payload: bytes | None) -> None:
        """After an open_run or run_alive of a restricted key: the run is its own; grant it."""
        if not isinstance(run_id, str) or payload is None or not _succeeded(payload):
            return
        if run_id not in self.owners and len(self.owners) >= MAX_OWNED_RUNS:
            del self.owners[next(iter(self.owners))]
        self.owners[run_id] = self.user
        if self.on_open is not None:
            self.on_open(run_id, self.user)


def _succeeded(payload: bytes) -> bool:
    try:
        reply = decode_message(payload)
    except DecodeError:
        return False
    return reply.ok


class KeyedMessageTable(MessageTable):
    """A MessageTable whose `user` is the ZAP User-Id of the message being handled."""

    def __init__(self, service: str, handlers: Mapping[Command, Any], log: logging.Logger,
                 **kwargs: Any) -> None:
        super().__init__(service, handlers, log, **kwargs)
        self.user = ""

    def waiting(self, router: zmq.Socket[Any]) -> Iterator[tuple[bytes, Message | DecodeError]]:
        return _waiting(self, router)
