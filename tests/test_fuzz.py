"""Fault test 5: fuzz the codec, the telemetry bus and every control socket with hypothesis.

(a) Properties of the codec: every malformed frame or control message makes `decode_frame` /
`decode_message` raise DecodeError with a reason, never another exception; valid ones round-trip.
(b) Against a real stack on loopback: bad frames, each followed by a valid one, go to the broker's
XSUB; bad control messages, each followed by a valid request, go to the controller, the ingest and
the broker's two ROUTERs. Every bad frame must become a dead letter with a reason, every bad
request an error reply (controller, ingest) or a count with a reason in the broker's log, every
valid frame must be stored, and every service must be alive and answering afterwards, able to run
a real training run. Cases per category are printed (`pytest -s`).
"""

from __future__ import annotations

import math
import os
import re
import signal
import string
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from conftest import free_endpoint, wait_until
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gymbus.services.stack import SERVICES, Stack, free_endpoints
from gymbus.shared import settings as settings_mod
from gymbus.shared.codec import (
    COLUMNS,
    FLOAT,
    INT,
    OBS,
    OPTIONAL_COLUMNS,
    STR,
    decode_frame,
    decode_message,
    encode_frame,
    encode_message,
)
from gymbus.shared.errors import DecodeError, RemoteError
from gymbus.shared.protocol import (
    PROTOCOL_VERSION,
    Command,
    ErrorCode,
    FrameKind,
    LifecycleEvent,
    RunState,
    topic,
)
from gymbus.shared.transport import Client

INT64 = st.integers(-(2**63), 2**63 - 1)
BEYOND_INT64 = st.integers(2**63, 2**64 - 1)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
IDS = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=30)
SCALARS = st.one_of(st.none(), st.booleans(), INT64, FINITE, st.text(max_size=8), st.binary(max_size=8))
NOT_STR = st.one_of(st.none(), st.booleans(), INT64, FINITE, st.binary(max_size=4),
                    st.lists(INT64, max_size=2))
NOT_INT = st.one_of(st.none(), st.booleans(), FINITE, st.text(max_size=4), BEYOND_INT64)
NOT_DICT = st.one_of(st.none(), INT64, st.text(max_size=4), st.lists(INT64, max_size=2))
#: wrong values for an element of a column of each type (numpy would silently take bools as
#: numbers, so they are no "wrong type" for numeric columns)
WRONG_ELEMENT = {INT: st.one_of(st.none(), st.text(max_size=4), st.floats().filter(
                     lambda x: not float(x).is_integer()), st.binary(min_size=1, max_size=4)),
                 FLOAT: st.one_of(st.none(), st.text(max_size=4), st.binary(min_size=1, max_size=4),
                                  st.dictionaries(st.text(max_size=2), INT64, max_size=1)),
                 "bool": st.one_of(st.none(), INT64.filter(lambda x: x not in (0, 1)),
                                   st.text(max_size=4), FINITE),
                 STR: st.one_of(st.none(), INT64, st.binary(max_size=4), st.booleans()),
                 OBS: st.one_of(st.none(), st.text(max_size=4), st.binary(min_size=1, max_size=4))}
FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


# --- strategies: valid frames -----------------------------------------------------------------


def column(typ: str, n: int, width: int) -> st.SearchStrategy[list[Any]]:
    if typ == INT:
        elements: st.SearchStrategy[Any] = INT64
    elif typ == FLOAT:
        elements = st.one_of(FINITE, st.integers(-(2**31), 2**31))
    elif typ == STR:
        elements = st.text(max_size=10)
    elif typ == OBS:
        elements = (st.lists(FINITE, min_size=width, max_size=width) if width
                    else st.integers(0, 2**31))
    else:
        elements = st.booleans()
    return st.lists(elements, min_size=n, max_size=n)


@st.composite
def valid_body(draw: st.DrawFn, kind: FrameKind) -> dict[str, Any]:
    if kind is FrameKind.LIFECYCLE:
        event = draw(st.sampled_from(LifecycleEvent))
        extra: dict[LifecycleEvent, dict[str, Any]] = {
            LifecycleEvent.RUN_STARTED: {"config": draw(st.dictionaries(IDS, SCALARS, max_size=3))},
            LifecycleEvent.ARTIFACT: {"name": draw(IDS), "path": draw(IDS), "format": draw(IDS)},
            LifecycleEvent.RUN_COMPLETED: {"status": "completed", "frames_emitted": draw(
                st.integers(1, 2**62)), "episodes": draw(st.integers(0, 2**40))},
        }
        return {"event": event.value, **extra[event]}
    n, width = draw(st.integers(1, 12)), draw(st.sampled_from([0, 0, 1, 4]))
    body = {name: draw(column(typ, n, width)) for name, typ in COLUMNS[kind].items()
            if name not in OPTIONAL_COLUMNS[kind] or draw(st.booleans())}
    if kind is FrameKind.STEP and draw(st.booleans()):
        body["t0_ns"] = draw(st.integers(0, 2**63 - 1))
    return body


@st.composite
def valid_frame(draw: st.DrawFn, run_id: st.SearchStrategy[str] = IDS,
                kinds: tuple[FrameKind, ...] = tuple(FrameKind)) -> dict[str, Any]:
    """A frame's payload as a dict (encode with `frame_parts`)."""
    kind = draw(st.sampled_from(kinds))
    return {"v": PROTOCOL_VERSION, "kind": kind.value, "run_id": draw(run_id),
            "agent_id": draw(st.text(max_size=10)), "worker_id": draw(st.text(max_size=10)),
            "seq": draw(st.integers(0, 2**63 - 1)), "ts_ns": draw(st.integers(0, 2**63 - 1)),
            "body": draw(valid_body(FrameKind(kind)))}


def frame_parts(payload: dict[str, Any]) -> list[bytes]:
    return [f"{payload['kind']}.{payload['run_id']}".encode(), pack(payload)]


# --- strategies: bad frames -------------------------------------------------------------------


def corrupt_column(draw: st.DrawFn, kind: FrameKind, body: dict[str, Any]) -> None:
    """One column of a columnar body made invalid, in one of several ways."""
    name = draw(st.sampled_from(sorted(set(body) & set(COLUMNS[kind]))))
    typ = COLUMNS[kind][name]
    if typ == OBS and isinstance(body[name][0], list):
        typ = OBS + "2"
    how = draw(st.sampled_from(["missing", "not_a_list", "empty", "ragged", "element",
                                "nested"] if name not in OPTIONAL_COLUMNS[kind] else
                               ["not_a_list", "empty", "ragged", "element"]))
    col = body[name]
    if how == "missing":
        del body[name]
    elif how == "not_a_list":
        body[name] = draw(st.one_of(INT64, st.text(max_size=4), st.none(),
                                    st.dictionaries(st.text(max_size=2), INT64, max_size=2)))
    elif how == "empty":
        for key in set(body) & set(COLUMNS[kind]):
            body[key] = []
    elif how == "ragged":
        body[name] = col + col[:1]
    elif how == "nested" and typ not in (STR, OBS, OBS + "2"):
        body[name] = [[v, v] for v in col]
    elif typ == OBS + "2":
        i = draw(st.integers(0, len(col) - 1))
        col[i] = col[i] + [0.0] if draw(st.booleans()) else draw(WRONG_ELEMENT[OBS])
    else:
        wrong = WRONG_ELEMENT["bool" if typ not in WRONG_ELEMENT else typ]
        col[draw(st.integers(0, len(col) - 1))] = draw(wrong)


FRAME_CATEGORIES = ("random_bytes", "truncated", "not_a_map", "wrong_version", "wrong_header",
                    "missing_header", "topic_mismatch", "bad_body", "non_finite", "huge_list",
                    "wrong_parts", "int_overflow")


@st.composite
def bad_frame(draw: st.DrawFn, category: str) -> list[bytes]:
    """The message parts of a frame of `category` that the protocol says must be rejected."""
    columnar = tuple(k for k in FrameKind if k is not FrameKind.LIFECYCLE)
    payload = draw(valid_frame(kinds=columnar if category == "non_finite" else tuple(FrameKind)))
    kind, body = FrameKind(payload["kind"]), payload["body"]
    parts = frame_parts(payload)
    if category == "random_bytes":
        return [draw(st.binary(max_size=40)), draw(st.binary(max_size=2048))]
    if category == "truncated":
        return [parts[0], parts[1][:draw(st.integers(0, len(parts[1]) - 1))]]
    if category == "not_a_map":
        return [parts[0], pack(draw(st.one_of(SCALARS, st.lists(INT64, max_size=4))))]
    if category == "wrong_parts":
        return draw(st.sampled_from([parts[:1], [*parts, b""], [*parts, parts[1]]]))
    if category == "huge_list":
        if draw(st.booleans()):  # a header that announces 4 G items, then stops
            return [parts[0], b"\xdd\xff\xff\xff\xff" + draw(st.binary(max_size=16))]
        key = "body" if kind is FrameKind.LIFECYCLE else "column"
        big = [None] * draw(st.integers(100_000, 250_000))
        if key == "body":
            payload["body"] = big
        else:
            body[draw(st.sampled_from(sorted(set(body) & set(COLUMNS[kind]))))] = big
    elif category == "wrong_version":
        payload["v"] = draw(st.one_of(st.integers().filter(lambda v: v != PROTOCOL_VERSION)
                                      .map(lambda v: max(min(v, 2**63 - 1), -(2**63))),
                                      st.just(True), st.just(1.0), st.text(max_size=3), st.none()))
    elif category == "wrong_header":
        name = draw(st.sampled_from(["kind", "run_id", "agent_id", "worker_id", "seq", "ts_ns",
                                     "body"]))
        payload[name] = draw({
            "kind": st.one_of(st.text(max_size=8).filter(lambda k: k not in set(FrameKind)),
                              INT64, st.none()),
            "run_id": st.one_of(st.just(""), st.text(min_size=129, max_size=140), NOT_STR),
            "agent_id": st.one_of(st.text(min_size=129, max_size=140), NOT_STR),
            "worker_id": st.one_of(st.text(min_size=129, max_size=140), NOT_STR),
            "seq": st.one_of(st.integers(-(2**63), -1), NOT_INT),
            "ts_ns": st.one_of(st.integers(-(2**63), -1), NOT_INT),
            "body": NOT_DICT}[name])
    elif category == "missing_header":
        del payload[draw(st.sampled_from(["v", "kind", "run_id", "seq", "ts_ns", "body"]))]
    elif category == "topic_mismatch":
        other = [k for k in FrameKind if k.value != payload["kind"]]
        return [draw(st.one_of(
            st.sampled_from(other).map(lambda k: topic(k, payload["run_id"])),
            st.just(parts[0] + b"x"), st.just(parts[0][:-1]),
            st.binary(min_size=1, max_size=20).filter(lambda b: b != parts[0]))), parts[1]]
    elif category == "int_overflow":
        if kind is FrameKind.LIFECYCLE and draw(st.booleans()):  # optional ints: stored as NULL
            body.update(event="run_completed", status="completed", frames_emitted=draw(BEYOND_INT64))
        else:
            payload[draw(st.sampled_from(["seq", "ts_ns"]))] = draw(BEYOND_INT64)
    elif kind is FrameKind.LIFECYCLE:  # bad_body
        bad_lifecycle(draw, body)
    elif category == "non_finite":
        names = [n for n, t in COLUMNS[kind].items() if t == FLOAT]
        if isinstance(body.get("obs", [0])[0], list):
            names.append("obs")
        name = draw(st.sampled_from(names))
        cell = draw(st.integers(0, len(body[name]) - 1))
        if name == "obs":
            body[name][cell] = [draw(NON_FINITE)] * len(body[name][cell])
        else:
            body[name][cell] = draw(NON_FINITE)
    else:
        if draw(st.booleans()):
            corrupt_column(draw, kind, body)
        else:
            extra = draw(st.one_of(st.text(max_size=8), st.binary(min_size=1, max_size=8)))
            if extra in COLUMNS[kind] or extra == "t0_ns":
                extra = extra + "_unknown"
            body[extra] = draw(st.one_of(SCALARS, st.lists(INT64, max_size=2)))
    return [parts[0], pack(payload)]


def bad_lifecycle(draw: st.DrawFn, body: dict[str, Any]) -> None:
    event = LifecycleEvent(body["event"])
    required = {LifecycleEvent.RUN_STARTED: {"config": NOT_DICT},
                LifecycleEvent.ARTIFACT: {"name": NOT_STR, "path": NOT_STR, "format": NOT_STR},
                LifecycleEvent.RUN_COMPLETED: {"status": NOT_STR, "frames_emitted": NOT_INT}}[event]
    how = draw(st.sampled_from(["event", "missing", "wrong_type"]))
    name = draw(st.sampled_from(sorted(required)))
    if how == "event":
        body["event"] = draw(st.one_of(st.text(max_size=12).filter(
            lambda e: e not in set(LifecycleEvent)), NOT_STR))
    elif how == "missing":
        del body[name]
    else:
        body[name] = draw(required[name])


# --- (a) the codec ----------------------------------------------------------------------------


@pytest.mark.parametrize("category", FRAME_CATEGORIES)
@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_every_bad_frame_is_a_decode_error_with_a_reason(category: str, data: Any) -> None:
    parts = data.draw(bad_frame(category))
    with pytest.raises(DecodeError) as info:
        decode_frame(parts)
    assert info.value.reason


@FUZZ
@given(payload=valid_frame())
def test_valid_frames_round_trip(payload: dict[str, Any]) -> None:
    kind = FrameKind(payload["kind"])
    topic_bytes, data = encode_frame(kind, payload["run_id"], payload["seq"], payload["body"],
                                     agent_id=payload["agent_id"], worker_id=payload["worker_id"],
                                     ts_ns=payload["ts_ns"])
    frame = decode_frame([topic_bytes, data])
    assert (frame.kind, frame.run_id, frame.seq, frame.ts_ns, frame.agent_id, frame.worker_id) == (
        kind, payload["run_id"], payload["seq"], payload["ts_ns"], payload["agent_id"],
        payload["worker_id"])
    for name, value in payload["body"].items():
        got = frame.body[name]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        if COLUMNS.get(kind, {}).get(name) in (FLOAT, OBS) and value and not isinstance(
                value[0], int):
            value = np.asarray(value, dtype=np.float64).tolist()
        assert got == value, name


#: control messages: (target, category, message parts); targets are the four ROUTERs
TARGETS = ("controller", "ingest", "broker_controller", "broker_workers")
#: commands each ROUTER serves, with the body fields a request needs and strategies for
#: wrong values of each (a deleted field counts as wrong too)
SERVED: dict[str, dict[Command, dict[str, st.SearchStrategy[Any]]]] = {
    "controller": {Command.GET_RUN: {"run_id": NOT_STR}, Command.CANCEL: {"run_id": NOT_STR},
                   Command.SUBMIT: {"config": st.one_of(NOT_DICT, st.dictionaries(
                       st.text(max_size=5), SCALARS, max_size=3))}},
    "ingest": {Command.QUERY: {"sql": st.one_of(NOT_STR, st.just(""), st.just("  "))},
               Command.RUN_STATS: {"run_id": NOT_STR.filter(lambda v: v is not None)}},
    "broker_controller": {Command.DISPATCH: {"run_id": NOT_STR, "worker_id": NOT_STR,
                                             "config": NOT_DICT},
                          Command.CANCEL: {"run_id": NOT_STR, "worker_id": NOT_STR}},
    "broker_workers": {Command.READY: {"host": NOT_STR, "pid": NOT_INT, "slots": NOT_INT},
                       Command.RUN_UPDATE: {"run_id": NOT_STR, "state": st.one_of(
                           NOT_STR, st.text(max_size=8).filter(lambda s: s not in set(RunState)))},
                       Command.DISPATCH_FAILED: {"run_id": NOT_STR}},
}
VALID_VALUES = {"run_id": "01FUZZ", "worker_id": "nobody", "config": {}, "sql": "SELECT 1",
                "host": "h", "pid": 1, "slots": 1, "state": "running"}
#: commands a ROUTER does not serve at all (HELLO is left out: on the broker's controller socket
#: any peer may say hello, which is what CURVE keys are for; HEARTBEAT and DISCONNECT from an
#: unknown worker are ignored by design, not errors; the ingest may serve SPOOL_STATUS soon)
NOT_SERVED = {
    "controller": [c for c in Command if c not in {Command.PING, Command.SUBMIT,
                   Command.LIST_RUNS, Command.GET_RUN, Command.CANCEL, Command.LIST_WORKERS}],
    "ingest": [c for c in Command if c not in {Command.PING, Command.QUERY, Command.RUN_STATS,
               Command.INGEST_STATS, Command.SPOOL_STATUS}],
    "broker_controller": [c for c in Command if c not in {Command.HELLO, Command.DISPATCH,
                          Command.CANCEL}],
    "broker_workers": [c for c in Command if c not in {Command.READY, Command.HEARTBEAT,
                       Command.RUN_UPDATE, Command.DISPATCH_FAILED, Command.DISCONNECT}],
}


MESSAGE_CATEGORIES = ("random_bytes", "truncated", "not_a_map", "wrong_version",
                      "unknown_command", "not_served", "wrong_req", "wrong_body", "bad_field",
                      "wrong_reply_fields", "wrong_parts", "huge_list")


@st.composite
def bad_message(draw: st.DrawFn, target: str, category: str) -> list[bytes]:
    """The frames of a control message of `category` that the `target` ROUTER must refuse."""
    cmd = draw(st.sampled_from(sorted(SERVED[target])))
    fields = SERVED[target][cmd]
    body: dict[Any, Any] = {name: VALID_VALUES[name] for name in fields}
    msg: dict[Any, Any] = {"v": PROTOCOL_VERSION, "cmd": cmd.value, "req": draw(st.integers(
        1, 2**31)), "body": body}
    if category == "random_bytes":
        return [draw(st.binary(max_size=512))]
    if category == "truncated":
        data = pack(msg)
        return [data[:draw(st.integers(0, len(data) - 1))]]
    if category == "not_a_map":
        return [pack(draw(st.one_of(SCALARS, st.lists(INT64, max_size=4))))]
    if category == "wrong_parts":
        return [pack(msg)] * draw(st.integers(2, 3))
    if category == "wrong_version":
        msg["v"] = draw(st.one_of(INT64.filter(lambda v: v != PROTOCOL_VERSION), st.just(True),
                                  st.just(1.0), st.none(), st.text(max_size=3)))
    elif category == "unknown_command":
        msg["cmd"] = draw(st.one_of(st.text(max_size=10).filter(lambda c: c not in set(Command)),
                                    NOT_STR))
    elif category == "not_served":
        msg["cmd"] = draw(st.sampled_from(NOT_SERVED[target])).value
    elif category == "wrong_req":
        msg["req"] = draw(st.one_of(st.none(), st.booleans(), FINITE, st.text(max_size=3)))
    elif category == "wrong_body":
        msg["body"] = draw(st.one_of(SCALARS.filter(lambda v: v is not None),
                                     st.lists(INT64, max_size=3)))
    elif category == "wrong_reply_fields":
        msg[draw(st.sampled_from(["ok", "error"]))] = draw(st.one_of(INT64, st.text(max_size=3)))
    elif category == "huge_list":
        body[draw(st.sampled_from(sorted(fields)))] = [0] * draw(st.integers(100_000, 200_000))
    else:  # bad_field: one field the command needs is missing or of a wrong type
        name = draw(st.sampled_from(sorted(fields)))
        if draw(st.booleans()) and not (target == "ingest" and cmd is Command.RUN_STATS):
            del body[name]
        else:
            body[name] = draw(fields[name])
    return [pack(msg)]


@pytest.mark.parametrize("category", MESSAGE_CATEGORIES)
@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_every_bad_control_message_is_refused_by_the_codec_or_its_handler(category: str,
                                                                         data: Any) -> None:
    """The codec refuses it, or it decodes into a command that its ROUTER must refuse."""
    target = data.draw(st.sampled_from(TARGETS))
    frames = data.draw(bad_message(target, category))
    if len(frames) != 1:
        return  # refused by recv_request for its part count
    try:
        msg = decode_message(frames[0])
    except DecodeError as exc:
        assert exc.reason
        return
    assert category in {"not_served", "bad_field", "huge_list"}, (category, msg)


@FUZZ
@given(cmd=st.sampled_from(Command), req=INT64, body=st.dictionaries(IDS, SCALARS, max_size=4))
def test_valid_control_messages_round_trip(cmd: Command, req: int, body: dict[str, Any]) -> None:
    msg = decode_message(encode_message(cmd, body, req))
    assert (msg.cmd, msg.req, msg.body, msg.ok) == (cmd, req, body, True)


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_never_escape_as_another_exception(data: bytes) -> None:
    for decode in (lambda: decode_message(data), lambda: decode_frame([b"step.r", data])):
        try:
            decode()
        except DecodeError as exc:
            assert exc.reason


# --- (b) the live stack -----------------------------------------------------------------------

#: live examples per category of bad frame, and per target and category of bad message
FRAMES_PER_CATEGORY, MESSAGES_PER_CASE = 16, 4
#: no shrinking against live services: a failure reports the example as drawn
LIVE = settings(FUZZ, phases=[Phase.explicit, Phase.generate])
VALID_RUN = "01FUZZVALIDRUN"
TWENTY_MB = 20_000_000


def stack_env(home: Path) -> dict[str, str]:
    """Free loopback endpoints (the live-viewer one too, where the settings have it)."""
    env = {**free_endpoints(home), "GYMBUS_HEARTBEAT_INTERVAL": "0.25",
           "GYMBUS_HEARTBEAT_LIVENESS": "3", "GYMBUS_WORKER_SLOTS": "2"}
    if "telemetry_live" in settings_mod.DEFAULTS:
        env.setdefault("GYMBUS_TELEMETRY_LIVE", free_endpoint())
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack for the module; the broker logs at DEBUG, one line per malformed message."""
    s = Stack(stack_env(tmp_path_factory.mktemp("fuzz") / "home"))
    try:
        for role in SERVICES:
            s.start_one(role, {"GYMBUS_LOG_LEVEL": "DEBUG"} if role == "broker" else None)
        s.wait_ready(tuple(SERVICES), 30)
        yield s
    finally:
        s.stop()


def publisher(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    """A raw XPUB on the broker's XSUB, as any peer could open, once the subscription is in."""
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(endpoint)
    assert pub.poll(5000), "no subscription reached the test publisher"
    pub.recv()
    return pub


def dealer(ctx: zmq.Context[Any], endpoint: str, identity: bytes | None = None) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket[Any], timeout_ms: int = 5000) -> Any:
    assert sock.poll(timeout_ms), "no reply"
    return decode_message(sock.recv(), 256 * 1024 * 1024)


def sql(client: Client, text: str) -> list[dict[str, Any]]:
    reply = client.request(Command.QUERY, {"sql": text})
    return [dict(zip(reply["columns"], row, strict=True)) for row in reply["rows"]]


class BrokerLog:
    """The broker's count of malformed messages, read from its log (DEBUG: one line each)."""

    LINE = re.compile(r"dropped \((\d+) so far\): (.*)")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self.reasons: list[str] = []
        self._offset = 0

    def update(self) -> int:
        with self.path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for match in self.LINE.finditer(chunk[:end].decode("utf-8", "replace")):
            self.count = max(self.count, int(match.group(1)))
            self.reasons.append(match.group(2))
        return self.count


def test_fuzzed_frames_are_dead_letters_and_the_valid_frames_between_are_stored(
    stack: Stack, ctx: zmq.Context[Any]
) -> None:
    s = stack.settings
    pub = publisher(ctx, s.telemetry_in)
    ingest = Client(s.ingest, "ingest", 5.0)
    start = ingest.request(Command.INGEST_STATS)
    sent, cases = Counter[str](), Counter[str]()

    def send(parts: list[bytes], bad: bool) -> None:
        pub.send_multipart(parts)
        sent["bad" if bad else "valid"] += 1

    def send_valid() -> None:
        send(list(encode_frame(FrameKind.METRIC, VALID_RUN, sent["valid"], {
            "name": ["fuzz/x"], "step": [sent["valid"]], "value": [1.5], "ts_ns": [1]})), False)

    def caught_up() -> bool:
        now = ingest.request(Command.INGEST_STATS)
        return (now["dead_letters"] - start["dead_letters"] == sent["bad"] and
                now["frames_received"] - start["frames_received"] == sent["bad"] + sent["valid"])

    def fuzz(category: str) -> None:
        @settings(LIVE, max_examples=FRAMES_PER_CATEGORY)
        @given(parts=bad_frame(category))
        def one_bad_frame(parts: list[bytes]) -> None:
            cases[category] += 1
            send(parts, bad=True)
            send_valid()
            wait_until(caught_up, 5, f"the ingest to keep a {category} frame as a dead letter",
                       interval=0.002)

        one_bad_frame()

    for category in FRAME_CATEGORIES:
        fuzz(category)
    for big in (b"\x00" * TWENTY_MB, pack({"v": 1, "blob": b"x" * TWENTY_MB})):
        cases["oversize_20MB"] += 1
        send([topic(FrameKind.STEP, VALID_RUN), big], bad=True)
        send_valid()
        wait_until(caught_up, 10, "the 20 MB frame to be a dead letter")

    strays: list[dict[str, Any]] = []

    @settings(LIVE, max_examples=20)
    @given(payload=valid_frame(IDS.map(lambda r: "stray-" + r)))
    def one_stray(payload: dict[str, Any]) -> None:  # a run nobody submitted: stored, accounted
        strays.append(payload)
        cases["unknown_run"] += 1
        send(frame_parts(payload), bad=False)

    one_stray()
    wait_until(caught_up, 5, "the frames of unknown runs to arrive")

    mine = ingest.request(Command.RUN_STATS, {"run_id": VALID_RUN})["runs"][0]
    assert (mine["frames_stored"], mine["gaps"], mine["duplicates"]) == (
        sent["valid"] - len(strays), 0, 0)
    dead = sql(ingest, "SELECT count(*) AS n, count(*) FILTER (WHERE coalesce(reason, '') = '') "
                       "AS unexplained, count(*) FILTER (WHERE size >= 20000000 AND reason LIKE "
                       "'%over the limit%') AS oversize FROM dead_letters")[0]
    assert dead == {"n": sent["bad"], "unexplained": 0, "oversize": 2}
    for payload in strays:
        runs = ingest.request(Command.RUN_STATS, {"run_id": payload["run_id"]})["runs"]
        assert runs and runs[0]["frames_stored"] >= 1
    final = ingest.request(Command.INGEST_STATS)
    assert (final["frames_lost"], final["flush_errors"]) == (0, 0)
    print(f"\ntelemetry fuzz: {sent['bad']} bad frames, all dead letters with a reason; "
          f"{sent['valid']} valid frames, all stored; by category: {dict(sorted(cases.items()))}")
    pub.close()
    ingest.close()


def test_fuzzed_control_messages_get_error_replies_or_are_counted(
    stack: Stack, ctx: zmq.Context[Any]
) -> None:
    s = stack.settings
    endpoints = {"controller": s.controller, "ingest": s.ingest,
                 "broker_controller": s.broker_controller, "broker_workers": s.broker_workers}
    socks = {target: dealer(ctx, endpoint, b"fuzz-w" if target == "broker_workers" else None)
             for target, endpoint in endpoints.items()}
    broker_log = BrokerLog(stack.services["broker"].log_path)
    base = broker_log.update()
    counted, cases, codes = Counter[str](), Counter[str](), Counter[str]()
    reqs = iter(range(10**6, 10**7))

    def refused(target: str, frames: list[bytes], what: str) -> None:
        sock = socks[target]
        sock.send_multipart(frames)
        if target.startswith("broker"):
            counted["broker"] += 1
            wait_until(lambda: broker_log.update() == base + counted["broker"], 5,
                       f"the broker to count a {what}", interval=0.002)
            return
        reply = receive(sock)
        assert not reply.ok and reply.error["message"], (what, reply)
        codes[ErrorCode(reply.error["code"]).value] += 1
        req = next(reqs)  # valid traffic in between: the same peer is still served
        sock.send(encode_message(Command.PING, {}, req))
        answer = receive(sock)
        assert answer.ok and answer.req == req

    def fuzz(target: str, category: str) -> None:
        @settings(LIVE, max_examples=MESSAGES_PER_CASE)
        @given(frames=bad_message(target, category))
        def one_bad_message(frames: list[bytes]) -> None:
            cases[category] += 1
            refused(target, frames, category)

        one_bad_message()

    for target in TARGETS:
        for category in MESSAGE_CATEGORIES:
            fuzz(target, category)
    big = pack({"v": 1, "cmd": "ping", "req": 1, "body": {"blob": b"x" * TWENTY_MB}})
    for target in TARGETS:
        cases["oversize_20MB"] += 1
        refused(target, [big], "20 MB message")
    assert codes[ErrorCode.TOO_LARGE.value] == 2
    assert sum("over the limit" in r for r in broker_log.reasons) == 2
    assert all(broker_log.reasons) and broker_log.count == base + counted["broker"]
    print(f"\ncontrol fuzz: {sum(cases.values())} bad messages; error replies by code "
          f"{dict(codes)}; {counted['broker']} counted by the broker; by category: "
          f"{dict(sorted(cases.items()))}")
    for sock in socks.values():
        sock.close()


def test_every_service_survives_and_still_trains_and_stores_a_run(stack: Stack) -> None:
    stack.check_alive()
    s = stack.settings
    with Client(s.controller, "controller", 5.0) as controller, \
            Client(s.ingest, "ingest", 5.0) as ingest:
        assert controller.request(Command.PING) == {"service": "controller"}
        assert ingest.request(Command.PING) == {"service": "ingest"}
        run_id = controller.request(Command.SUBMIT, {"config": {
            "env": "FrozenLake-v1", "algo": "q-learning", "episodes": 30, "seed": 2}})["run_id"]
        wait_until(lambda: controller.request(Command.GET_RUN, {"run_id": run_id})["run"]["state"]
                   == RunState.COMPLETED, 60, "the run to complete")
        wait_until(lambda: ingest.request(Command.RUN_STATS, {"run_id": run_id})["runs"][0][
            "complete"], 20, "every frame of the run to be stored")
    for role in ("broker", "controller", "ingest"):  # one warning each, at start
        text = stack.services[role].log_path.read_text()
        assert text.count("no CURVE keys: running without authentication") == 1, role


# --- (c) cancel when the worker is gone, with real processes ----------------------------------


def run_processes(run_id: str) -> list[int]:
    """The pids of the run's own process (a worker starts it in a session of its own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if b"gymbus.worker.child" in cmdline and run_id.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def test_cancel_for_a_run_whose_worker_is_gone_answers_at_once(tmp_path: Path) -> None:
    """Issue #6. tests/test_controller.py checks `worker_gone` against a fake broker; here the
    worker really dies, first under a live broker, then together with it."""
    runs: list[str] = []
    with Stack(stack_env(tmp_path / "home")) as stack, \
            Client(stack.settings.controller, "controller", 5.0) as cli:
        try:
            stack.start()

            def state(run_id: str) -> str:
                return str(cli.request(Command.GET_RUN, {"run_id": run_id})["run"]["state"])

            def running_run() -> str:
                runs.append(cli.request(Command.SUBMIT, {"config": {
                    "env": "FrozenLake-v1", "algo": "q-learning", "episodes": 10**7}})["run_id"])
                wait_until(lambda: state(runs[-1]) == RunState.RUNNING, 30, "a running run")
                return runs[-1]

            def kill_worker(run_id: str) -> None:
                stack.stop_one("worker", signal.SIGKILL)
                for pid in run_processes(run_id):
                    os.kill(pid, signal.SIGKILL)

            def cancel_within_a_second(run_id: str) -> ErrorCode | None:
                started = time.monotonic()
                try:
                    cli.request(Command.CANCEL, {"run_id": run_id}, timeout=1.0)
                    code = None
                except RemoteError as exc:
                    code = exc.code
                assert time.monotonic() - started < 1.0
                return code

            # the worker dies; the broker has not noticed yet: the cancel is taken, the run lost
            first = running_run()
            kill_worker(first)
            answers = [cancel_within_a_second(first)]
            assert answers[0] in (None, ErrorCode.WORKER_GONE)
            wait_until(lambda: state(first) == RunState.LOST, 5, "the run to be lost")
            assert cancel_within_a_second(first) is ErrorCode.NOT_CANCELLABLE

            # worker and broker die; a new broker knows no worker: `worker_gone`, at once
            stack.start_one("worker")
            second = running_run()
            kill_worker(second)
            stack.stop_one("broker", signal.SIGKILL)
            stack.start_one("broker")
            wait_until(lambda: cli.request(Command.LIST_WORKERS)["workers"] == [], 5,
                       "the controller to see no worker")
            answers.append(cancel_within_a_second(second))
            assert answers[1] is ErrorCode.WORKER_GONE
            wait_until(lambda: state(second) == RunState.LOST, 5, "the run to be lost")
            print(f"\ncancel answers with the worker gone: {answers}")
        finally:
            for run_id in runs:
                for pid in run_processes(run_id):
                    os.kill(pid, signal.SIGKILL)
