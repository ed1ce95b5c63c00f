"""The one runner of gymbus's long-running processes, and the handler tables of their ROUTERs.

A service's `main` calls `run_until_stopped`: parse the (option-less) command line, set up
logging, load the settings, build the service, serve it until SIGTERM or SIGINT, close it. Its
`python -m` entry point hands that `main` to `run_service`. The exit code says what stopped it:

    143   SIGTERM (128 + 15, as a shell or honcho reports a process the signal stopped)
    130   SIGINT (128 + 2: Ctrl-C)
      0   the service stopped by itself
      1   a GymbusError (one line on stderr: `error: ...`)

A ROUTER's messages go through a table keyed by Command: `RequestTable` answers requests
(decode, dispatch, reply; the project's errors become error replies), `MessageTable` delivers
one-way messages (the broker's). Both count what is malformed. They run on the loop thread.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar

import zmq

from gymbus.shared import settings as settings_mod
from gymbus.shared.codec import Message, encode_error, encode_reply
from gymbus.shared.errors import DecodeError, GymbusError, RequestError
from gymbus.shared.logs import setup
from gymbus.shared.protocol import MAX_FRAME_BYTES, Command, ErrorCode
from gymbus.shared.settings import Settings
from gymbus.shared.transport import recv_request, send_payload

#: messages taken from one socket per pass, so that the loop's housekeeping runs under any load
MAX_BATCH = 1000
#: the first malformed messages, each logged as a WARNING; after them one in every LOG_EVERY
LOG_FIRST = 20
LOG_EVERY = 1000

# --- the runner ---------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGTERM or SIGINT (or `set()`); service loops check it once per pass.

    `signal_number` is the signal that set it first (0 while none did): the exit code comes
    from it, so that a Ctrl-C followed by honcho's SIGTERM still exits 130.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_number = 0

    def install(self) -> StopFlag:
        """Handle SIGTERM and SIGINT from now on (call it on the main thread)."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.signal_number:
            self.signal_number = signum
        self._event.set()

    def set(self) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def exit_code(self) -> int:
        """143 after SIGTERM, 130 after SIGINT, 0 when no signal set the flag."""
        return 128 + self.signal_number if self.signal_number else 0


class Service(Protocol):
    def close(self) -> None: ...


S = TypeVar("S", bound=Service)


def run_until_stopped(role: str, description: str, argv: list[str] | None,
                      build: Callable[[Settings], S], serve: Callable[[S, StopFlag], None],
                      module: str | None = None) -> int:
    """Run one service as `role` (its log name) and return the process's exit code.

    The stop flag is installed before `build`, so that a signal during a slow start (the ingest
    opening its file) stops the service as soon as it serves. The service is closed whatever
    ends `serve`. `module` is what `python -m` runs (gymbus.services.<role> unless given).
    """
    argparse.ArgumentParser(
        prog=f"python -m {module or f'gymbus.services.{role}'}",
        description=f"{description} Configured by GYMBUS_* variables.",
    ).parse_args(argv)
    setup(role)
    stop = StopFlag().install()
    try:
        service = build(settings_mod.load())
        try:
            serve(service, stop)
        finally:
            service.close()
    except GymbusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return stop.exit_code()


def run_service(main: Callable[[], int]) -> None:
    """A `python -m` entry point: exit with the code the service's main returns."""
    sys.exit(main())


# --- handler tables -----------------------------------------------------------------------------


class MalformedCount:
    """Malformed messages, counted and logged without flooding: the first LOG_FIRST as WARNINGs,
    then one in every LOG_EVERY (the others at DEBUG). One count may serve several tables."""

    def __init__(self, log: logging.Logger, outcome: str) -> None:
        self.log = log
        #: what became of a malformed message, for the log line
        self.outcome = outcome
        self.count = 0

    def add(self, peer: str, identity: bytes, reason: str) -> None:
        self.count += 1
        flood = self.count > LOG_FIRST and self.count % LOG_EVERY != 0
        self.log.log(logging.DEBUG if flood else logging.WARNING,
                     "malformed message from %s %.40r %s (%d so far): %s",
                     peer, identity, self.outcome, self.count, reason)


H = TypeVar("H")


class HandlerTable(Generic[H]):
    """The handlers of one ROUTER's messages, keyed by Command.

    A message that does not decode, or whose command has no handler here, is counted in
    `malformed` with the reason (a count of its own unless one is given to share).
    """

    #: what becomes of a malformed message
    OUTCOME = "dropped"

    def __init__(self, service: str, handlers: Mapping[Command, H], log: logging.Logger, *,
                 peer: str, malformed: MalformedCount | None = None,
                 max_bytes: int = MAX_FRAME_BYTES, batch: int = MAX_BATCH) -> None:
        self.service = service
        self.handlers = handlers
        self.log = log
        #: who sends on this socket, for the log
        self.peer = peer
        self.malformed = malformed if malformed is not None else MalformedCount(log, self.OUTCOME)
        self.max_bytes = max_bytes
        self.batch = batch

    def waiting(self, router: zmq.Socket[Any]) -> Iterator[tuple[bytes, Message | DecodeError]]:
        """The messages waiting on `router`, at most `batch` of them: identity and message (or
        why it did not decode)."""
        for _ in range(self.batch):
            if not router.poll(0, zmq.POLLIN):
                return
            yield recv_request(router, self.max_bytes)

    def find(self, identity: bytes, msg: Message) -> H:
        """The handler of `msg`'s command; DecodeError (counted) when this service serves none."""
        handler = self.handlers.get(msg.cmd)
        if handler is None:
            reason = f"the {self.service} does not serve {msg.cmd.value!r}"
            self.malformed.add(self.peer, identity, reason)
            raise DecodeError(reason)
        return handler


RequestHandler = Callable[[dict[str, Any]], dict[str, Any]]
#: a handler that answers later itself (its work goes on elsewhere): it gets the requester's
#: identity, the request's req and its body, and replies through `RequestTable.answer`
LaterHandler = Callable[[bytes, int, dict[str, Any]], None]


class RequestTable(HandlerTable[RequestHandler]):
    """A request/reply ROUTER's table: every request gets one reply.

    A handler returns the reply's body or raises a GymbusError (RequestError, ConfigError, ...),
    which becomes an error reply with its code and message. A request that does not decode gets a
    `bad_request` (or `unsupported_version`, `too_large`) reply to req 0. Any other exception is a
    bug: it is logged, answered `internal`, and costs that request only. The commands in `later`
    are answered by their handlers once their work is done; what such a handler raises is
    answered at once, the same way.
    """

    OUTCOME = "answered with an error"

    def __init__(self, service: str, handlers: Mapping[Command, RequestHandler],
                 log: logging.Logger, *, peer: str,
                 later: Mapping[Command, LaterHandler] | None = None,
                 max_bytes: int = MAX_FRAME_BYTES, batch: int = MAX_BATCH) -> None:
        super().__init__(service, handlers, log, peer=peer, max_bytes=max_bytes, batch=batch)
        self.later: Mapping[Command, LaterHandler] = later or {}

    def answer_waiting(self, router: zmq.Socket[Any]) -> int:
        """Answer the requests waiting on `router` (at most `batch`); returns how many arrived."""
        arrived = 0
        for identity, msg in self.waiting(router):
            arrived += 1
            payload = self.reply(identity, msg)
            if payload is not None:
                send_payload(router, identity, payload)
        return arrived

    def reply(self, identity: bytes, msg: Message | DecodeError) -> bytes | None:
        """The encoded reply to one request from `identity`; None when a `later` handler took it."""
        if isinstance(msg, DecodeError):
            self.malformed.add(self.peer, identity, msg.reason)
            return encode_error(0, msg.to_wire())
        later = self.later.get(msg.cmd)
        if later is None:
            return self.outcome(msg.cmd, msg.req, lambda: self.find(identity, msg)(msg.body))
        try:
            later(identity, msg.req, msg.body)
        except GymbusError as exc:
            return encode_error(msg.req, exc.to_wire())
        except Exception as exc:  # a bug must cost one request, not the service
            self.log.exception("request %s to the %s failed", msg.cmd.value, self.service)
            return internal_error(msg.req, exc)
        return None

    def answer(self, router: zmq.Socket[Any], identity: bytes, req: int, cmd: Command,
               produce: Callable[[], dict[str, Any]]) -> None:
        """Answer a request that a `later` handler took: the body `produce` returns, or the error
        reply for what it raises."""
        send_payload(router, identity, self.outcome(cmd, req, produce))

    def outcome(self, cmd: Command, req: int, produce: Callable[[], dict[str, Any]]) -> bytes:
        """The encoded reply to request `req`: the body `produce` returns, or an error reply."""
        try:
            body = produce()
        except GymbusError as exc:
            return encode_error(req, exc.to_wire())
        except Exception as exc:  # a bug must cost one request, not the service
            self.log.exception("request %s to the %s failed", cmd.value, self.service)
            return internal_error(req, exc)
        try:
            return encode_reply(req, body)
        except DecodeError as exc:  # a body the codec cannot carry is the service's bug
            self.log.error("the reply to %s from the %s: %s", cmd.value, self.service, exc.reason)
            return internal_error(req, exc)


def internal_error(req: int, exc: Exception) -> bytes:
    """The `internal` error reply to request `req` that a bug in its handler earned."""
    error = RequestError(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
    return encode_error(req, error.to_wire())


#: a one-way message's handler: the sender's identity, the body, when it was received
MessageHandler = Callable[[bytes, dict[str, Any], float], None]


class MessageTable(HandlerTable[MessageHandler]):
    """A one-way ROUTER's table: nothing is answered. A handler raises DecodeError for a message
    whose body is wrong (counted as malformed); any other exception is a bug, logged, and costs
    that message only."""

    def deliver_waiting(self, router: zmq.Socket[Any], clock: Callable[[], float]) -> int:
        """Hand the messages waiting on `router` (at most `batch`) to their handlers; returns
        how many arrived."""
        arrived = 0
        for identity, msg in self.waiting(router):
            arrived += 1
            if isinstance(msg, DecodeError):
                self.malformed.add(self.peer, identity, msg.reason)
                continue
            try:
                handler = self.find(identity, msg)
            except DecodeError:
                continue  # counted
            try:
                handler(identity, msg.body, clock())
            except DecodeError as exc:
                self.malformed.add(self.peer, identity, f"{msg.cmd.value}: {exc.reason}")
            except Exception:  # a bug must cost one message, not the service
                self.log.exception("handling %s from %s %.40r failed",
                                   msg.cmd.value, self.peer, identity)
        return arrived
