"""Hypothesis strategies for the fuzz tests (tests/test_fuzz.py): valid and malformed telemetry
frames and control messages, each malformed one in a named category that the protocol says must
be rejected.
"""

from __future__ import annotations

import math
import string
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from gymbus.shared.codec import (
    COLUMNS,
    FLOAT,
    INT,
    OBS,
    OPTIONAL_COLUMNS,
    STR,
    TYPED_ARRAY_DTYPES,
    typed_array,
)
from gymbus.shared.protocol import (
    PROTOCOL_VERSION,
    Command,
    FrameKind,
    LifecycleEvent,
    RunState,
    topic,
)

INT64 = st.integers(-(2**63), 2**63 - 1)
BEYOND_INT64 = st.integers(2**63, 2**64 - 1)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
IDS = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=30)
SCALARS = st.one_of(st.none(), st.booleans(), INT64, FINITE, st.text(max_size=8), st.binary(max_size=8))
NOT_STR = st.one_of(st.none(), st.booleans(), INT64, FINITE, st.binary(max_size=4),
                    st.lists(INT64, max_size=2))
NOT_INT = st.one_of(st.none(), st.booleans(), FINITE, st.text(max_size=4), BEYOND_INT64)
NOT_LIST_OF_INTS = st.one_of(st.none(), INT64, st.text(max_size=4), st.binary(max_size=4))
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


#: the typed-array dtype a numeric column of each type is sent as (a float column may be float32
#: only where its values fit, so the strategies use float64)
TYPED_DTYPE = {INT: np.int64, FLOAT: np.float64, "bool": np.bool_, OBS: np.int64}


def as_typed_array(typ: str, values: list[Any]) -> dict[str, Any]:
    """A valid column of `values` as a typed array (vector observations as float64)."""
    if typ == OBS and isinstance(values[0], list):
        return typed_array(np.asarray(values, dtype=np.float64).reshape(len(values), -1))
    return typed_array(np.asarray(values, dtype=TYPED_DTYPE.get(typ, TYPED_DTYPE["bool"])))


def column_values(value: Any) -> Any:
    """A column as a list, whichever form it was sent in."""
    if isinstance(value, dict):
        return np.frombuffer(value["data"], value["dtype"]).reshape(value["shape"]).tolist()
    return value


@st.composite
def valid_body(draw: st.DrawFn, kind: FrameKind, typed: bool = False) -> dict[str, Any]:
    """A valid body; with `typed`, some numeric columns are sent as typed arrays."""
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
    if typed:
        for name in sorted(body):
            typ = COLUMNS[kind][name]
            if typ != STR and draw(st.booleans()):
                body[name] = as_typed_array(typ, body[name])
    if kind is FrameKind.STEP and draw(st.booleans()):
        body["t0_ns"] = draw(st.integers(0, 2**63 - 1))
    return body


@st.composite
def valid_frame(draw: st.DrawFn, run_id: st.SearchStrategy[str] = IDS,
                kinds: tuple[FrameKind, ...] = tuple(FrameKind),
                typed: bool = True) -> dict[str, Any]:
    """A frame's payload as a dict (encode with `frame_parts`); `typed`: see valid_body."""
    kind = draw(st.sampled_from(kinds))
    return {"v": PROTOCOL_VERSION, "kind": kind.value, "run_id": draw(run_id),
            "agent_id": draw(st.text(max_size=10)), "worker_id": draw(st.text(max_size=10)),
            "seq": draw(st.integers(0, 2**63 - 1)), "ts_ns": draw(st.integers(0, 2**63 - 1)),
            "body": draw(valid_body(FrameKind(kind), typed))}


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
                    "wrong_parts", "int_overflow", "bad_typed_array")


@st.composite
def bad_frame(draw: st.DrawFn, category: str) -> list[bytes]:
    """The message parts of a frame of `category` that the protocol says must be rejected."""
    columnar = tuple(k for k in FrameKind if k is not FrameKind.LIFECYCLE)
    typed_only = category in ("non_finite", "bad_typed_array")
    payload = draw(valid_frame(kinds=columnar if typed_only else tuple(FrameKind), typed=False))
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
    elif category == "bad_typed_array":
        bad_typed_array(draw, kind, body)
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


TYPED_ARRAY_FAULTS = ("dtype", "shape", "data_size", "data_type", "keys", "rows", "bool_byte",
                      "non_finite", "wrong_kind")


def bad_typed_array(draw: st.DrawFn, kind: FrameKind, body: dict[str, Any]) -> None:
    """One numeric column of a columnar body sent as a typed array that must be refused."""
    numeric = sorted(n for n in set(body) & set(COLUMNS[kind]) if COLUMNS[kind][n] != STR)
    name = draw(st.sampled_from(numeric))
    typ = COLUMNS[kind][name]
    rows = len(body[name])
    arr = as_typed_array(typ, body[name])
    how = draw(st.sampled_from(TYPED_ARRAY_FAULTS))
    if how == "dtype":
        arr["dtype"] = draw(st.one_of(
            st.text(max_size=6).filter(lambda d: d not in TYPED_ARRAY_DTYPES),
            st.sampled_from([">f8", ">i8", "<c16", "|O", "<M8[ns]", "<U4"]), INT64, st.none()))
    elif how == "shape":
        arr["shape"] = draw(st.one_of(
            st.just([]), st.lists(st.integers(0, 4), min_size=3, max_size=4),
            st.just([-rows]), st.just([rows, -1]), st.just([rows, "4"]), st.just([float(rows)]),
            st.just([True]), NOT_LIST_OF_INTS))
    elif how == "data_size":
        cut = draw(st.integers(1, 16))
        arr["data"] = arr["data"][:-cut] if draw(st.booleans()) else arr["data"] + b"\0" * cut
    elif how == "data_type":
        arr["data"] = draw(st.one_of(st.text(max_size=8), st.lists(INT64, max_size=4), st.none()))
    elif how == "keys":
        if draw(st.booleans()):
            del arr[draw(st.sampled_from(sorted(arr)))]
        else:
            arr[draw(st.sampled_from(["order", "endian", "DTYPE", "rows"]))] = 1
    elif how == "rows":  # one more or one fewer row than the other columns
        extra = np.zeros(rows + 1, np.int64)
        arr = typed_array(extra if draw(st.booleans()) or rows == 1 else extra[: rows - 1])
    elif how == "bool_byte" and typ == "bool":
        data = bytearray(arr["data"])
        data[draw(st.integers(0, rows - 1))] = draw(st.integers(2, 255))
        arr["data"] = bytes(data)
    elif how == "non_finite" and typ in (FLOAT, OBS):
        values = np.asarray(body[name], np.float64).reshape(rows, -1)
        values[draw(st.integers(0, rows - 1)), 0] = draw(NON_FINITE)
        arr = typed_array(values if typ == OBS else values[:, 0])
    else:  # wrong_kind: numbers of another kind (a float in an int or bool column, ...)
        wrong = {INT: np.float64, FLOAT: np.bool_, "bool": np.int64, OBS: np.bool_}
        arr = typed_array(np.zeros(rows, wrong.get(typ, np.float64)))
    body[name] = arr


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
                   Command.LIST_RUNS, Command.GET_RUN, Command.CANCEL, Command.LIST_WORKERS,
                   Command.OPEN_RUN, Command.RUN_ALIVE, Command.CLOSE_RUN,
                   Command.DELETE_RUN}],
    "ingest": [c for c in Command if c not in {Command.PING, Command.QUERY, Command.RUN_STATS,
               Command.INGEST_STATS, Command.SPOOL_STATUS, Command.DELETE_RUN, Command.ARCHIVE,
               Command.RESTORE}],
    "broker_controller": [c for c in Command if c not in {Command.HELLO, Command.DISPATCH,
                          Command.CANCEL, Command.GRANT}],
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


