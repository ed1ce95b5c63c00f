"""The services' runner and handler tables (shared/service.py): the handler tables on real inproc
sockets, the runner in this process with a service of the test's own, and the real processes'
exit codes after SIGTERM (143) and SIGINT (130)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from conftest import wait_until

from gymbus.services.stack.launcher import Stack
from gymbus.shared.codec import Message, decode_message, encode_message
from gymbus.shared.errors import ConfigError, DecodeError, GymbusError, RequestError
from gymbus.shared.protocol import PROTOCOL_VERSION, Command, ErrorCode
from gymbus.shared.service import (
    MalformedCount,
    MessageTable,
    RequestHandler,
    RequestTable,
    StopFlag,
    run_until_stopped,
)
from gymbus.shared.settings import Settings

log = logging.getLogger("gymbus.test_service")
_endpoints = count()

# --- handler tables, on real inproc sockets ------------------------------------------------------


class Pair:
    """A ROUTER (the service's) and a DEALER (a client) on a private inproc endpoint."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        endpoint = f"inproc://test-service-{next(_endpoints)}"
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(endpoint)
        self.client = ctx.socket(zmq.DEALER)
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.setsockopt(zmq.IDENTITY, b"client-1")
        self.client.connect(endpoint)

    def send(self, cmd: Command, body: dict[str, Any] | None = None, req: int = 7) -> None:
        self.client.send(encode_message(cmd, body, req))

    def arrived(self) -> None:
        """Wait (bounded) until a request is waiting on the ROUTER."""
        assert self.router.poll(5000, zmq.POLLIN), "the request did not reach the ROUTER"

    def reply(self, timeout_ms: int = 5000) -> Message:
        assert self.client.poll(timeout_ms, zmq.POLLIN), "no reply"
        return decode_message(self.client.recv())

    def no_reply(self) -> bool:
        return not self.client.poll(50, zmq.POLLIN)

    def close(self) -> None:
        self.router.close()
        self.client.close()


@pytest.fixture
def pair(ctx: zmq.Context[Any]) -> Iterator[Pair]:
    p = Pair(ctx)
    yield p
    p.close()


def refuse(body: dict[str, Any]) -> dict[str, Any]:
    raise RequestError(ErrorCode.UNKNOWN_RUN, f"no run {body.get('run_id')!r}")


def invalid(body: dict[str, Any]) -> dict[str, Any]:
    raise ConfigError("env", "no such environment")


def crash(body: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("a bug")


def unencodable(body: dict[str, Any]) -> dict[str, Any]:
    return {"value": object()}


HANDLERS: dict[Command, RequestHandler] = {
    Command.PING: lambda body: {"service": "test", "echo": body},
    Command.GET_RUN: refuse,
    Command.SUBMIT: invalid,
    Command.QUERY: crash,
    Command.LIST_RUNS: unencodable,
}


def table(**kwargs: Any) -> RequestTable:
    return RequestTable("test service", HANDLERS, log, peer="client", **kwargs)


def ask(pair: Pair, requests: RequestTable, cmd: Command, body: dict[str, Any] | None = None,
        req: int = 7) -> Message:
    pair.send(cmd, body, req)
    pair.arrived()
    assert requests.answer_waiting(pair.router) == 1
    return pair.reply()


def test_a_handler_s_body_is_the_reply_to_its_req(pair: Pair) -> None:
    reply = ask(pair, table(), Command.PING, {"x": 1}, req=41)
    assert reply.ok and reply.req == 41
    assert reply.body == {"service": "test", "echo": {"x": 1}}


def test_an_unknown_command_is_a_bad_request_and_counted(pair: Pair) -> None:
    requests = table()
    reply = ask(pair, requests, Command.CANCEL, {"run_id": "r1"}, req=3)
    assert not reply.ok and reply.req == 3 and reply.error is not None
    assert reply.error["code"] == ErrorCode.BAD_REQUEST.value
    assert reply.error["message"] == "the test service does not serve 'cancel'"
    assert requests.malformed.count == 1


def test_a_request_error_becomes_an_error_reply_with_its_code(pair: Pair) -> None:
    requests = table()
    reply = ask(pair, requests, Command.GET_RUN, {"run_id": "01X"}, req=9)
    assert not reply.ok and reply.req == 9
    assert reply.error == {"code": ErrorCode.UNKNOWN_RUN.value, "message": "no run '01X'"}
    assert requests.malformed.count == 0  # a refusal, not a malformed request


def test_a_config_error_names_its_field(pair: Pair) -> None:
    reply = ask(pair, table(), Command.SUBMIT, {})
    assert reply.error == {"code": ErrorCode.INVALID_CONFIG.value,
                           "message": "env: no such environment", "field": "env"}


def test_a_bug_is_answered_internal_and_the_next_request_is_served(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    requests = table()
    with caplog.at_level(logging.ERROR, logger=log.name):
        failed = ask(pair, requests, Command.QUERY, {"sql": "SELECT 1"})
    assert failed.error == {"code": ErrorCode.INTERNAL.value,
                            "message": "internal error: ValueError: a bug"}
    assert "request query to the test service failed" in caplog.text
    assert ask(pair, requests, Command.PING, req=8).ok


def test_a_reply_the_codec_cannot_carry_is_internal(pair: Pair) -> None:
    reply = ask(pair, table(), Command.LIST_RUNS)
    assert reply.error is not None and reply.error["code"] == ErrorCode.INTERNAL.value
    assert "cannot encode" in reply.error["message"]


@pytest.mark.parametrize(("payload", "code"), [
    (b"\xc1 not msgpack", ErrorCode.BAD_REQUEST),
    (encode_message(Command.PING)[:-1], ErrorCode.BAD_REQUEST),
    (msgpack.packb({"v": PROTOCOL_VERSION + 1, "cmd": "ping", "req": 5, "body": {}}),
     ErrorCode.UNSUPPORTED_VERSION),
])
def test_an_undecodable_request_is_answered_to_req_0_and_counted(
        pair: Pair, payload: bytes, code: ErrorCode) -> None:
    requests = table()
    pair.client.send(payload)
    pair.arrived()
    requests.answer_waiting(pair.router)
    reply = pair.reply()
    assert not reply.ok and reply.req == 0 and reply.error is not None
    assert reply.error["code"] == code.value
    assert requests.malformed.count == 1


def test_an_oversized_request_is_too_large(pair: Pair) -> None:
    requests = table(max_bytes=1024)
    reply = ask(pair, requests, Command.PING, {"blob": b"x" * 2048})
    assert reply.error is not None and reply.error["code"] == ErrorCode.TOO_LARGE.value


def test_one_pass_answers_at_most_a_batch(pair: Pair) -> None:
    requests = table(batch=2)
    for req in (1, 2, 3):
        pair.send(Command.PING, req=req)
    pair.arrived()  # one inproc pipe: all three are there once the first is
    assert requests.answer_waiting(pair.router) == 2
    assert [pair.reply().req, pair.reply().req] == [1, 2]
    assert pair.no_reply()
    pair.arrived()
    assert requests.answer_waiting(pair.router) == 1
    assert pair.reply().req == 3


def test_a_later_handler_answers_once_its_work_is_done(pair: Pair) -> None:
    taken: list[tuple[bytes, int, dict[str, Any]]] = []

    def later(identity: bytes, req: int, body: dict[str, Any]) -> None:
        if body.get("refuse"):
            raise RequestError(ErrorCode.BAD_REQUEST, "refused at once")
        taken.append((identity, req, body))

    requests = table(later={Command.CANCEL: later})
    pair.send(Command.CANCEL, {"run_id": "r1"}, req=5)
    pair.arrived()
    requests.answer_waiting(pair.router)
    assert taken == [(b"client-1", 5, {"run_id": "r1"})] and pair.no_reply()
    identity, req, body = taken[0]
    requests.answer(pair.router, identity, req, Command.CANCEL, lambda: {"done": body["run_id"]})
    done = pair.reply()
    assert done.ok and done.req == 5 and done.body == {"done": "r1"}
    requests.answer(pair.router, identity, 6, Command.CANCEL, lambda: refuse({"run_id": "r2"}))
    assert pair.reply().error == {"code": ErrorCode.UNKNOWN_RUN.value, "message": "no run 'r2'"}
    refused = ask(pair, requests, Command.CANCEL, {"refuse": True}, req=7)
    assert refused.req == 7 and refused.error is not None
    assert refused.error["message"] == "refused at once"


def test_a_message_table_delivers_and_counts_into_one_shared_count(ctx: zmq.Context[Any]) -> None:
    got: list[tuple[bytes, dict[str, Any], float]] = []

    def on_hello(identity: bytes, body: dict[str, Any], now: float) -> None:
        got.append((identity, body, now))

    def on_ready(identity: bytes, body: dict[str, Any], now: float) -> None:
        if not isinstance(body.get("slots"), int):
            raise DecodeError(f"slots must be int, got {body.get('slots')!r}")
        raise RuntimeError("a bug")

    shared = MalformedCount(log, "dropped")
    pairs = [Pair(ctx), Pair(ctx)]
    tables = [MessageTable("broker", {Command.HELLO: on_hello}, log, peer="controller",
                           malformed=shared),
              MessageTable("broker", {Command.READY: on_ready}, log, peer="worker",
                           malformed=shared)]
    try:
        pairs[0].send(Command.HELLO, {"a": 1})
        pairs[0].send(Command.READY, {})  # not served on this socket
        pairs[1].client.send(b"\x93\x01\x02\x03")  # msgpack, not a map
        pairs[1].send(Command.READY, {"slots": "two"})
        pairs[1].send(Command.READY, {"slots": 2})  # the handler's bug: logged, not counted
        for p in pairs:
            p.arrived()  # one inproc pipe each: all of a pair's messages are there
        assert [t.deliver_waiting(p.router, lambda: 12.5) for t, p in zip(tables, pairs,
                                                                           strict=True)] == [2, 3]
        assert got == [(b"client-1", {"a": 1}, 12.5)]
        assert shared.count == 3 and tables[0].malformed is tables[1].malformed
        assert all(p.no_reply() for p in pairs)  # one-way: nothing is answered
    finally:
        for p in pairs:
            p.close()


def test_malformed_messages_are_logged_without_a_flood(caplog: pytest.LogCaptureFixture) -> None:
    malformed = MalformedCount(log, "dropped")
    with caplog.at_level(logging.DEBUG, logger=log.name):
        for _ in range(1000):
            malformed.add("worker", b"w1", "bad")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(caplog.records) == 1000 and len(warnings) == 21  # the first 20, and the 1000th
    assert warnings[-1].getMessage() == ("malformed message from worker b'w1' dropped "
                                         "(1000 so far): bad")


# --- the runner, in this process -----------------------------------------------------------------


class FakeService:
    """A service of the test's own: `serve` runs `action` with the stop flag."""

    def __init__(self, action: Callable[[StopFlag], None]) -> None:
        self.action = action
        self.served = False
        self.closed = 0

    def serve(self, stop: StopFlag) -> None:
        self.served = True
        self.action(stop)

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[..., int]]:
    """run_until_stopped for a FakeService; the process's signal handlers and root logger are
    put back afterwards."""
    for name in list(os.environ):
        if name.startswith("GYMBUS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GYMBUS_HOME", str(tmp_path))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    root = logging.getLogger()
    level, root_handlers = root.level, list(root.handlers)

    def run(service: FakeService, build: Callable[[Settings], FakeService] | None = None) -> int:
        return run_until_stopped("test", "A test service.", [], build or (lambda s: service),
                                 FakeService.serve)

    yield run
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    root.setLevel(level)
    root.handlers[:] = root_handlers


def signal_self(*signums: int) -> Callable[[StopFlag], None]:
    def action(stop: StopFlag) -> None:
        for signum in signums:
            os.kill(os.getpid(), signum)
        assert stop.wait(5), "the stop flag was not set"
    return action


def test_a_service_that_stops_by_itself_exits_0(runner: Callable[..., int]) -> None:
    service = FakeService(lambda stop: None)
    assert runner(service) == 0
    assert service.served and service.closed == 1


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_the_exit_code_says_which_signal_stopped_it(runner: Callable[..., int], signum: int,
                                                    code: int) -> None:
    service = FakeService(signal_self(signum))
    assert runner(service) == code
    assert service.closed == 1


def test_the_first_signal_decides(runner: Callable[..., int]) -> None:
    # Ctrl-C reaches every process of the terminal, then honcho sends SIGTERM
    assert runner(FakeService(signal_self(signal.SIGINT, signal.SIGTERM))) == 130


def test_a_gymbus_error_at_build_is_one_line_and_exit_1(
        runner: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    service = FakeService(lambda stop: None)

    def build(settings: Settings) -> FakeService:
        raise GymbusError("cannot bind the test ROUTER to tcp://127.0.0.1:1")

    assert runner(service, build) == 1
    assert capsys.readouterr().err == "error: cannot bind the test ROUTER to tcp://127.0.0.1:1\n"
    assert not service.served and service.closed == 0


def test_a_gymbus_error_while_serving_closes_the_service_and_exits_1(
        runner: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    def fail(stop: StopFlag) -> None:
        raise RequestError(ErrorCode.INTERNAL, "the store went away")

    service = FakeService(fail)
    assert runner(service) == 1
    assert service.closed == 1
    assert capsys.readouterr().err.splitlines()[-1] == "error: the store went away"


# --- the real processes ---------------------------------------------------------------------------

#: role -> a line each service logs once it serves (its stop flag is installed before that)
UP_LINES = {"broker": "broker up", "controller": "controller up", "ingest": "ingest writing",
            "worker": "slots, broker at"}


@pytest.mark.integration
@pytest.mark.parametrize("role", list(UP_LINES))
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_service_process_exits_128_plus_the_signal(
        gymbus_env: dict[str, str], role: str, signum: int, code: int) -> None:
    stack = Stack(gymbus_env)
    try:
        service = stack.start_one(role)
        wait_until(lambda: UP_LINES[role] in service.log_tail(50) or stack.check_alive(), 30,
                   f"the {role} to serve")
        started = time.monotonic()
        assert stack.stop_one(role, signum) == code, service.log_tail()
        assert time.monotonic() - started < 5.0
    finally:
        stack.stop()


@pytest.mark.integration
def test_a_service_that_cannot_start_exits_1_with_one_line(gymbus_env: dict[str, str]) -> None:
    env = {**os.environ, **gymbus_env, "GYMBUS_HEARTBEAT_LIVENESS": "0"}
    result = subprocess.run([sys.executable, "-m", "gymbus.services.broker"], env=env,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "error: GYMBUS_HEARTBEAT_LIVENESS: must be >= 1"
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1
