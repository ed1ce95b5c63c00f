"""Encode and decode telemetry frames and control messages (msgpack), checking version and types.

Telemetry frame bodies are columnar; `decode_frame` checks every column against the column
schema (`gymbus.shared.schema`) and returns numpy arrays (strings stay lists), so that the ingest
can hand them to Arrow without another pass.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from gymbus.shared.errors import DecodeError
from gymbus.shared.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    TOPIC_SEPARATOR,
    Command,
    ErrorCode,
    FrameKind,
    LifecycleEvent,
    topic,
)
from gymbus.shared.schema import FRAME_COLUMNS, FRAME_SCALARS, Type

# The columnar frame kinds' checks, from the schema: name -> type of each kind's columns (in
# order), which of them a frame may leave out, and the scalar fields a body may carry. A TIME
# column is nanoseconds on the wire and is checked as an integer.
INT, FLOAT, BOOL, STR, OBS = Type.INT, Type.FLOAT, Type.BOOL, Type.STR, Type.OBS
_CHECKED_AS: dict[Type, Type] = {Type.TIME: Type.INT}
COLUMNS: dict[FrameKind, dict[str, Type]] = {
    kind: {c.name: _CHECKED_AS.get(c.type, c.type) for c in columns}
    for kind, columns in FRAME_COLUMNS.items()
}
OPTIONAL_COLUMNS: dict[FrameKind, frozenset[str]] = {
    kind: frozenset(c.name for c in columns if c.optional) for kind, columns in FRAME_COLUMNS.items()
}
SCALARS: dict[FrameKind, dict[str, Type]] = {
    kind: dict.fromkeys(names, Type.INT) for kind, names in FRAME_SCALARS.items()
}
#: Required fields of each lifecycle event beyond `event`.
LIFECYCLE_FIELDS: dict[LifecycleEvent, dict[str, type]] = {
    LifecycleEvent.RUN_STARTED: {"config": dict},
    LifecycleEvent.ARTIFACT: {"name": str, "path": str, "format": str},
    LifecycleEvent.RUN_COMPLETED: {"status": str, "frames_emitted": int},
}
MAX_ID_LENGTH = 128
#: the element types a typed-array column may have (numpy's `dtype.str`: little-endian)
TYPED_ARRAY_DTYPES = frozenset({"|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4",
                                "<f4", "<f8"})
TYPED_ARRAY_KEYS = frozenset({"dtype", "shape", "data"})
#: integers are stored as BIGINT: a header or required lifecycle integer outside this range
#: is refused (the store keeps optional ones that do not fit as NULL)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded telemetry frame. Columnar bodies hold numpy arrays (strings: lists)."""

    kind: FrameKind
    run_id: str
    seq: int
    ts_ns: int
    agent_id: str
    worker_id: str
    body: dict[str, Any]
    rows: int = 0


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded control message; replies carry `ok` and either `body` or `error`."""

    cmd: Command
    req: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    ok: bool = True
    error: dict[str, Any] | None = None


#: one msgpack Packer per thread, kept: `msgpack.packb` makes a Packer per call, whose fresh
#: 256 KiB buffer the allocator maps anew each time, and a 200 KB step frame then cost ~170 us
#: of page faults to pack, where a kept buffer packs it in ~12 us
_packers = threading.local()


def _pack(obj: Any) -> bytes:
    packer: msgpack.Packer | None = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    try:
        packer.pack(obj)
        return packer.bytes()  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"cannot encode: {exc}") from exc
    finally:
        packer.reset()


def _unpack(data: bytes, what: str, max_bytes: int) -> Any:
    if len(data) > max_bytes:
        raise DecodeError(
            f"{what} of {len(data)} bytes is over the limit of {max_bytes} bytes", ErrorCode.TOO_LARGE
        )
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise DecodeError(f"malformed msgpack in {what}: {type(exc).__name__}: {exc}") from exc


# --- telemetry frames -------------------------------------------------------------------------


def encode_frame(
    kind: FrameKind,
    run_id: str,
    seq: int,
    body: dict[str, Any],
    *,
    agent_id: str = "",
    worker_id: str = "",
    ts_ns: int | None = None,
) -> tuple[bytes, bytes]:
    """A telemetry frame as its two message parts, `(topic, payload)`."""
    payload = {
        "v": PROTOCOL_VERSION,
        "kind": kind.value,
        "run_id": run_id,
        "agent_id": agent_id,
        "worker_id": worker_id,
        "seq": seq,
        "ts_ns": time.time_ns() if ts_ns is None else ts_ns,
        "body": body,
    }
    return topic(kind, run_id), _pack(payload)


def decode_frame(parts: list[bytes], max_bytes: int = MAX_FRAME_BYTES) -> Frame:
    """Decode `[topic, payload]`, checking version, header and body types. Raises DecodeError."""
    if len(parts) != 2:
        raise DecodeError(f"a telemetry frame has 2 parts (topic, payload), got {len(parts)}")
    raw_topic, payload = parts
    try:
        topic_text = raw_topic.decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError("topic is not ASCII") from None
    data = _unpack(payload, "frame payload", max_bytes)
    if not isinstance(data, dict):
        raise DecodeError(f"payload is a {type(data).__name__}, expected a map")
    version = data.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise DecodeError(
            f"unknown protocol version {version!r} (this side speaks {PROTOCOL_VERSION})",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    try:
        kind = FrameKind(str(data.get("kind")))
    except ValueError:
        raise DecodeError(f"unknown frame kind {data.get('kind')!r}") from None
    run_id = _header_str(data, "run_id", required=True)
    agent_id = _header_str(data, "agent_id")
    worker_id = _header_str(data, "worker_id")
    seq = data.get("seq")
    if type(seq) is not int or not 0 <= seq <= INT64_MAX:
        raise DecodeError(f"seq must be a non-negative integer below 2**63, got {seq!r}")
    ts_ns = data.get("ts_ns")
    if type(ts_ns) is not int or not 0 <= ts_ns <= INT64_MAX:
        raise DecodeError(f"ts_ns must be a non-negative integer below 2**63, got {ts_ns!r}")
    expected_topic = f"{kind.value}{TOPIC_SEPARATOR}{run_id}"
    if topic_text != expected_topic:
        raise DecodeError(f"topic {topic_text!r} does not match the payload ({expected_topic!r})")
    body = data.get("body")
    if not isinstance(body, dict):
        raise DecodeError(f"body must be a map, got {type(body).__name__}")
    if kind is FrameKind.LIFECYCLE:
        _check_lifecycle(body)
        rows = 1
        checked = body
    else:
        checked, rows = _check_columns(kind, body)
    return Frame(kind, run_id, seq, ts_ns, agent_id, worker_id, checked, rows)


def _header_str(data: dict[str, Any], key: str, required: bool = False) -> str:
    value = data.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_ID_LENGTH or (required and not value):
        raise DecodeError(f"{key} must be a string of 1 to {MAX_ID_LENGTH} characters, got {value!r}")
    return value


def _check_lifecycle(body: dict[str, Any]) -> None:
    try:
        event = LifecycleEvent(str(body.get("event")))
    except ValueError:
        raise DecodeError(f"unknown lifecycle event {body.get('event')!r}") from None
    for name, typ in LIFECYCLE_FIELDS[event].items():
        value = body.get(name)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise DecodeError(f"{event.value}.{name} must be {typ.__name__}, got {value!r}")
        if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
            raise DecodeError(f"{event.value}.{name} must be a 64-bit integer, got {value!r}")


def _check_columns(kind: FrameKind, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    columns, optional, scalars = COLUMNS[kind], OPTIONAL_COLUMNS[kind], SCALARS[kind]
    unknown = set(body) - set(columns) - set(scalars)
    if unknown:
        names = ", ".join(sorted(str(name) for name in unknown))  # keys may be bytes
        raise DecodeError(f"{kind.value} body has unknown fields: {names}")
    out: dict[str, Any] = {}
    rows = -1
    for name, typ in columns.items():
        if name not in body:
            if name in optional:
                continue
            raise DecodeError(f"{kind.value} body lacks column {name!r}")
        col = _check_column(kind, name, typ, body[name])
        if rows < 0:
            rows = len(col)
        elif len(col) != rows:
            raise DecodeError(
                f"{kind.value} column {name!r} has {len(col)} rows, expected {rows}"
            )
        out[name] = col
    if rows <= 0:
        raise DecodeError(f"{kind.value} frame has no rows")
    for name, typ in scalars.items():
        if name in body:
            if type(body[name]) is not int or not INT64_MIN <= body[name] <= INT64_MAX:
                raise DecodeError(f"{kind.value}.{name} must be an integer, got {body[name]!r}")
            out[name] = body[name]
    return out, rows


def typed_array(arr: np.ndarray[Any, Any]) -> dict[str, Any]:
    """A numeric column as a typed array: its raw little-endian bytes, element type and shape.

    Packing and unpacking it costs one copy of the bytes, where a list costs a msgpack object
    per number on both sides (a vector observation per step: 4 to hundreds of them).
    """
    if arr.dtype.str not in TYPED_ARRAY_DTYPES:
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return typed_array_of(arr.dtype, list(arr.shape), arr.tobytes())


def typed_array_of(dtype: np.dtype[Any], shape: list[int], data: bytes) -> dict[str, Any]:
    """A typed-array column from its parts: `data` holds the values of `shape` in C order."""
    return {"dtype": dtype.str, "shape": shape, "data": data}


def _from_typed_array(where: str, value: dict[Any, Any]) -> np.ndarray[Any, Any]:
    """The numpy array of a typed-array column, every part of it checked."""
    if set(value) != TYPED_ARRAY_KEYS:
        raise DecodeError(f"{where}: a typed array has exactly the keys dtype, shape and data, "
                          f"got {sorted(map(str, value))}")
    dtype, shape, data = value["dtype"], value["shape"], value["data"]
    if not isinstance(dtype, str) or dtype not in TYPED_ARRAY_DTYPES:
        raise DecodeError(f"{where}: typed-array dtype {dtype!r} is not one of "
                          f"{', '.join(sorted(TYPED_ARRAY_DTYPES))}")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or not all(type(d) is int and 0 <= d <= INT64_MAX for d in shape)):
        raise DecodeError(f"{where}: typed-array shape must be 1 or 2 non-negative integers, "
                          f"got {shape!r}")
    if not isinstance(data, bytes):
        raise DecodeError(f"{where}: typed-array data must be bytes, got {type(data).__name__}")
    itemsize = np.dtype(dtype).itemsize
    if int(np.prod(shape, dtype=object)) * itemsize != len(data):
        raise DecodeError(f"{where}: typed-array data has {len(data)} bytes, shape {shape} of "
                          f"{dtype} needs {int(np.prod(shape, dtype=object)) * itemsize}")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    if arr.dtype.kind == "b" and np.frombuffer(data, np.uint8).max(initial=0) > 1:
        raise DecodeError(f"{where}: typed-array booleans must be bytes 0 or 1")
    return arr


def _check_column(kind: FrameKind, name: str, typ: Type, values: Any) -> Any:
    where = f"{kind.value} column {name!r}"
    if isinstance(values, dict) and typ != STR:
        arr = _from_typed_array(where, values)
        if len(arr) == 0:
            raise DecodeError(f"{kind.value} frame has no rows ({where} is empty)")
    else:
        if not isinstance(values, list):
            raise DecodeError(f"{where} must be a list, got {type(values).__name__}")
        if not values:
            raise DecodeError(f"{kind.value} frame has no rows ({where} is empty)")
        if typ == STR:
            if not set(map(type, values)) <= {str}:  # C-level: ~4x a generator's speed
                raise DecodeError(f"{where} must hold strings")
            return values
        try:
            arr = np.asarray(values)
        except (ValueError, TypeError, OverflowError) as exc:
            raise DecodeError(f"{where} is not a rectangular array: {exc}") from None
    dkind = arr.dtype.kind
    if typ == BOOL:
        if arr.ndim != 1 or dkind != "b":
            raise DecodeError(f"{where} must hold booleans, got {arr.dtype}")
        return arr
    if typ == INT:
        if arr.ndim != 1 or dkind not in "iu" or (dkind == "u" and arr.dtype.itemsize >= 8):
            raise DecodeError(f"{where} must hold 64-bit integers, got {arr.dtype}")
        return arr.astype(np.int64, copy=False)
    numeric = dkind in "iuf" and not (dkind == "u" and arr.dtype.itemsize >= 8)
    if typ == OBS:
        if arr.ndim == 1 and dkind in "iu" and numeric:
            return arr.astype(np.int64, copy=False)
        if arr.ndim != 2 or not numeric:
            raise DecodeError(
                f"{where} must hold integers or equal-length lists of numbers, got {arr.dtype}"
            )
    elif arr.ndim != 1 or not numeric:
        raise DecodeError(f"{where} must hold numbers, got {arr.dtype}")
    farr = arr.astype(np.float64, copy=False)
    if not np.isfinite(farr).all():
        raise DecodeError(f"{where} holds NaN or infinity")
    return farr


# --- control messages -------------------------------------------------------------------------


def encode_message(cmd: Command, body: dict[str, Any] | None = None, req: int = 0) -> bytes:
    """A control message (one frame)."""
    return _pack({"v": PROTOCOL_VERSION, "cmd": cmd.value, "req": req, "body": body or {}})


def encode_reply(req: int, body: dict[str, Any] | None = None) -> bytes:
    """A successful reply to request `req`."""
    return _pack(
        {"v": PROTOCOL_VERSION, "cmd": Command.REPLY.value, "req": req, "ok": True, "body": body or {}}
    )


def encode_error(req: int, error: dict[str, Any]) -> bytes:
    """An error reply to request `req`; `error` has `code`, `message` and maybe `field`."""
    return _pack(
        {"v": PROTOCOL_VERSION, "cmd": Command.REPLY.value, "req": req, "ok": False, "error": error}
    )


def decode_message(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Decode a control message or reply. Raises DecodeError naming what is wrong."""
    msg = _unpack(data, "control message", max_bytes)
    if not isinstance(msg, dict):
        raise DecodeError(f"control message is a {type(msg).__name__}, expected a map")
    if type(msg.get("v")) is not int or msg.get("v") != PROTOCOL_VERSION:
        raise DecodeError(
            f"unknown protocol version {msg.get('v')!r} (this side speaks {PROTOCOL_VERSION})",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    try:
        cmd = Command(str(msg.get("cmd")))
    except ValueError:
        raise DecodeError(f"unknown command {msg.get('cmd')!r}") from None
    req = msg.get("req", 0)
    if type(req) is not int:
        raise DecodeError(f"req must be an integer, got {req!r}")
    body = msg.get("body", {})
    if not isinstance(body, dict):
        raise DecodeError(f"body must be a map, got {type(body).__name__}")
    ok = msg.get("ok", True)
    error = msg.get("error")
    if not isinstance(ok, bool) or (error is not None and not isinstance(error, dict)):
        raise DecodeError("reply has a malformed ok/error field")
    return Message(cmd, req, body, ok, error)
