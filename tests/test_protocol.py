"""Protocol round trips for every frame kind and control message; decoding rejects bad input."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from gymbus.shared.codec import (
    decode_frame,
    decode_message,
    encode_error,
    encode_frame,
    encode_message,
    encode_reply,
    typed_array,
)
from gymbus.shared.errors import DecodeError
from gymbus.shared.protocol import (
    PROTOCOL_VERSION,
    Command,
    ErrorCode,
    FrameKind,
    LifecycleEvent,
    topic,
    topic_prefix,
)

RUN = "01JD3Q6R8W4Y2M5N7P9QAZBXCE"

STEP_BODY: dict[str, Any] = {
    "episode": [0, 0, 1],
    "step": [0, 1, 0],
    "action": [2, 1, 3],
    "obs": [4, 8, 0],
    "reward": [0.0, 1, -1.5],
    "terminated": [False, True, False],
    "truncated": [False, False, False],
    "label": ["explore", "exploit", "explore"],
    "t0_ns": 123,
}
BODIES: dict[FrameKind, dict[str, Any]] = {
    FrameKind.STEP: STEP_BODY,
    FrameKind.EPISODE: {"episode": [0, 1], "return": [1.0, 0.0], "length": [7, 12],
                        "terminated": [True, False], "truncated": [False, True],
                        "ts_ns": [10, 20]},
    FrameKind.METRIC: {"name": ["charts/epsilon", "charts/SPS"], "step": [7, 19],
                       "value": [0.9, 31000.5], "ts_ns": [10, 20]},
    FrameKind.LIFECYCLE: {"event": LifecycleEvent.RUN_COMPLETED.value, "status": "completed",
                          "frames_emitted": 5, "reason": None},
}


def raw_payload(**overrides: Any) -> bytes:
    payload = {"v": PROTOCOL_VERSION, "kind": "step", "run_id": RUN, "agent_id": "a",
               "worker_id": "w", "seq": 0, "ts_ns": 1, "body": dict(STEP_BODY)}
    payload.update(overrides)
    return msgpack.packb(payload)


@pytest.mark.parametrize("kind", list(FrameKind))
def test_every_frame_kind_round_trips(kind: FrameKind) -> None:
    body = BODIES[kind]
    parts = encode_frame(kind, RUN, 7, body, agent_id="agent-0", worker_id="w1", ts_ns=99)
    assert parts[0] == topic(kind, RUN) == f"{kind.value}.{RUN}".encode()
    frame = decode_frame(list(parts))
    assert (frame.kind, frame.run_id, frame.seq, frame.ts_ns) == (kind, RUN, 7, 99)
    assert (frame.agent_id, frame.worker_id) == ("agent-0", "w1")
    for key, value in body.items():
        got = frame.body[key]
        if isinstance(got, np.ndarray):
            assert got.tolist() == value
        else:
            assert got == value
    assert frame.rows == (1 if kind is FrameKind.LIFECYCLE else len(next(iter(body.values()))))


def test_vector_observations_decode_as_a_float_matrix() -> None:
    body = {**STEP_BODY, "obs": [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]}
    frame = decode_frame(list(encode_frame(FrameKind.STEP, RUN, 0, body)))
    assert frame.body["obs"].shape == (3, 2)
    assert frame.body["obs"].dtype == np.float64


def test_typed_array_columns_decode_like_lists() -> None:
    obs32 = np.array([[0.5, -1.25], [2.0, 3.5], [1e-3, 4.0]], np.float32)
    body = {**STEP_BODY, "obs": typed_array(obs32),
            "episode": typed_array(np.array(STEP_BODY["episode"], np.int32)),
            "terminated": typed_array(np.array(STEP_BODY["terminated"])),
            "reward": typed_array(np.array(STEP_BODY["reward"], np.float64))}
    frame = decode_frame(list(encode_frame(FrameKind.STEP, RUN, 0, body)))
    assert frame.body["obs"].dtype == np.float64 and frame.body["obs"].tolist() == obs32.tolist()
    assert frame.body["episode"].dtype == np.int64
    assert frame.body["episode"].tolist() == STEP_BODY["episode"]
    assert frame.body["terminated"].tolist() == STEP_BODY["terminated"]
    assert frame.body["reward"].tolist() == [0.0, 1.0, -1.5]
    assert frame.rows == 3


def _typed(**changes: Any) -> dict[str, Any]:
    return {**typed_array(np.array([1.0, 2.0, 3.0])), **changes}


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("reward", _typed(dtype=">f8"), "typed-array dtype '>f8' is not one of"),
        ("reward", _typed(dtype="<c16"), "typed-array dtype '<c16' is not one of"),
        ("reward", _typed(shape=[3, 1, 1]), "shape must be 1 or 2 non-negative integers"),
        ("reward", _typed(shape=[-3]), "shape must be 1 or 2 non-negative integers"),
        ("reward", _typed(shape=[True, 3]), "shape must be 1 or 2 non-negative integers"),
        ("reward", _typed(data=b"\0" * 23), "data has 23 bytes, shape [3] of <f8 needs 24"),
        ("reward", _typed(data="abc"), "typed-array data must be bytes, got str"),
        ("reward", {"dtype": "<f8", "shape": [3]}, "exactly the keys dtype, shape and data"),
        ("reward", _typed(extra=1), "exactly the keys dtype, shape and data"),
        ("reward", typed_array(np.array([1.0, np.nan, 3.0])), "holds NaN or infinity"),
        ("reward", typed_array(np.array([1.0, 2.0])), "has 2 rows, expected 3"),
        ("episode", typed_array(np.array([0.0, 0.5, 1.0])), "must hold 64-bit integers"),
        ("episode", typed_array(np.array([0, 1, 2], np.uint64)), "typed-array dtype '<u8'"),
        ("terminated", {"dtype": "|b1", "shape": [3], "data": b"\x00\x02\x01"},
         "booleans must be bytes 0 or 1"),
        ("terminated", typed_array(np.array([0, 1, 0], np.int8)), "must hold booleans"),
        ("label", typed_array(np.array([1, 2, 3])), "must be a list, got dict"),
        ("obs", typed_array(np.zeros((3, 2), np.bool_)), "must hold integers or equal-length"),
        ("obs", typed_array(np.zeros(0, np.int64)), "frame has no rows"),
    ],
)
def test_bad_typed_arrays_are_rejected_with_a_reason(column: str, value: Any, reason: str) -> None:
    body = {**STEP_BODY, column: value}
    with pytest.raises(DecodeError) as info:
        decode_frame(list(encode_frame(FrameKind.STEP, RUN, 0, body)))
    assert reason in info.value.reason


def test_topic_prefixes_filter_by_kind_then_run() -> None:
    assert topic(FrameKind.STEP, RUN).startswith(topic_prefix(FrameKind.STEP))
    assert topic(FrameKind.STEP, RUN).startswith(topic_prefix(FrameKind.STEP, RUN))
    assert not topic(FrameKind.EPISODE, RUN).startswith(topic_prefix(FrameKind.STEP))


def test_wrong_version_is_rejected_with_its_code() -> None:
    with pytest.raises(DecodeError, match="unknown protocol version 2") as info:
        decode_frame([topic(FrameKind.STEP, RUN), raw_payload(v=2)])
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"seq": -1}, "seq must be a non-negative integer"),
        ({"seq": "3"}, "seq must be a non-negative integer"),
        ({"ts_ns": 1.5}, "ts_ns must be"),
        ({"run_id": ""}, "run_id must be a string"),
        ({"run_id": 5}, "run_id must be a string"),
        ({"kind": "video"}, "unknown frame kind"),
        ({"body": [1, 2]}, "body must be a map"),
        ({"body": {**STEP_BODY, "reward": [0.0, "x", 1.0]}}, "column 'reward' must hold numbers"),
        ({"body": {**STEP_BODY, "reward": [0.0, float("nan"), 1.0]}}, "NaN or infinity"),
        ({"body": {**STEP_BODY, "reward": [0.0, float("inf"), 1.0]}}, "NaN or infinity"),
        ({"body": {**STEP_BODY, "episode": [0, 1.5, 2]}}, "must hold 64-bit integers"),
        ({"body": {**STEP_BODY, "episode": [0, 2**64 - 1, 2]}}, "must hold 64-bit integers"),
        # an action is an int (Discrete) or a row of numbers: a 1-D float column is neither
        ({"body": {**STEP_BODY, "action": [0, 1.5, 2]}}, "must hold integers or equal-length"),
        ({"body": {**STEP_BODY, "terminated": [0, 1, 0]}}, "must hold booleans"),
        ({"body": {**STEP_BODY, "step": [0, 1]}}, "has 2 rows, expected 3"),
        ({"body": {**STEP_BODY, "obs": [[1.0], [2.0, 3.0], [4.0]]}}, "rectangular"),
        ({"body": {**STEP_BODY, "label": ["a", 2, "c"]}}, "must hold strings"),
        ({"body": {k: v for k, v in STEP_BODY.items() if k != "reward"}}, "lacks column 'reward'"),
        ({"body": {**STEP_BODY, "colour": [1, 2, 3]}}, "unknown fields: colour"),
        ({"body": {**STEP_BODY, "t0_ns": "soon"}}, "t0_ns must be an integer"),
    ],
)
def test_wrong_types_are_rejected_with_a_reason(overrides: dict[str, Any], reason: str) -> None:
    parts = [topic(FrameKind.STEP, RUN), raw_payload(**overrides)]
    with pytest.raises(DecodeError, match=reason):
        decode_frame(parts)


def test_empty_columns_are_rejected() -> None:
    body = {k: ([] if isinstance(v, list) else v) for k, v in STEP_BODY.items()}
    with pytest.raises(DecodeError, match="no rows"):
        decode_frame([topic(FrameKind.STEP, RUN), raw_payload(body=body)])


@pytest.mark.parametrize(
    ("parts", "reason"),
    [
        ([b"step." + RUN.encode()], "2 parts"),
        ([b"step." + RUN.encode(), b"\xc1\x00garbage"], "malformed msgpack"),
        ([b"step." + RUN.encode(), msgpack.packb([1, 2])], "expected a map"),
        ([b"\xff\xfe", raw_payload()], "not ASCII"),
        ([b"episode." + RUN.encode(), raw_payload()], "does not match the payload"),
        ([b"step.other-run", raw_payload()], "does not match the payload"),
    ],
)
def test_malformed_frames_are_rejected(parts: list[bytes], reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_frame(parts)


def test_oversized_payload_is_rejected_before_unpacking() -> None:
    payload = raw_payload(body={**STEP_BODY, "label": ["x" * 5000] * 3})
    with pytest.raises(DecodeError, match="over the limit") as info:
        decode_frame([topic(FrameKind.STEP, RUN), payload], max_bytes=1024)
    assert info.value.code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"event": "exploded"}, "unknown lifecycle event"),
        ({"event": "run_completed", "status": "completed"}, "frames_emitted must be int"),
        ({"event": "run_completed", "status": "completed", "frames_emitted": True},
         "frames_emitted must be int"),
        ({"event": "run_started", "config": "env=x"}, "config must be dict"),
        ({"event": "artifact", "name": "q", "path": 3, "format": "npy"}, "path must be str"),
    ],
)
def test_lifecycle_bodies_are_checked(body: dict[str, Any], reason: str) -> None:
    parts = [topic(FrameKind.LIFECYCLE, RUN), raw_payload(kind="lifecycle", body=body)]
    with pytest.raises(DecodeError, match=reason):
        decode_frame(parts)


def test_control_messages_and_replies_round_trip() -> None:
    msg = decode_message(encode_message(Command.SUBMIT, {"config": {"env": "x"}}, req=4))
    assert (msg.cmd, msg.req, msg.body, msg.ok) == (Command.SUBMIT, 4, {"config": {"env": "x"}}, True)
    reply = decode_message(encode_reply(4, {"run_id": RUN}))
    assert (reply.cmd, reply.req, reply.ok, reply.body) == (Command.REPLY, 4, True, {"run_id": RUN})
    error = decode_message(encode_error(4, {"code": "invalid_config", "message": "m", "field": "f"}))
    assert not error.ok
    assert error.error == {"code": "invalid_config", "message": "m", "field": "f"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (msgpack.packb({"v": 9, "cmd": "ping"}), "unknown protocol version 9"),
        (msgpack.packb({"v": 1, "cmd": "fly"}), "unknown command 'fly'"),
        (msgpack.packb({"v": 1, "cmd": "ping", "req": "1"}), "req must be an integer"),
        (msgpack.packb({"v": 1, "cmd": "ping", "body": [1]}), "body must be a map"),
        (b"\x93\x01", "malformed msgpack"),
        (msgpack.packb("ping"), "expected a map"),
    ],
)
def test_bad_control_messages_are_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_message(data)


def test_encoding_keeps_its_packer_and_packs_as_msgpack_does() -> None:
    """The kept per-thread Packer gives msgpack's own bytes, frame after frame, after a value it
    refused (nothing of it left behind) and on another thread."""
    import threading

    def packed(seq: int, body: dict[str, Any]) -> bytes:
        return msgpack.packb({"v": PROTOCOL_VERSION, "kind": "step", "run_id": RUN,
                              "agent_id": "", "worker_id": "", "seq": seq, "ts_ns": 5,
                              "body": body}, use_bin_type=True)

    big = {**STEP_BODY, "obs": typed_array(np.arange(60_000, dtype=np.float32).reshape(-1, 4))}
    for body in (STEP_BODY, big, STEP_BODY):
        assert encode_frame(FrameKind.STEP, RUN, 3, body, ts_ns=5)[1] == packed(3, body)
    with pytest.raises(DecodeError, match="cannot encode"):
        encode_frame(FrameKind.STEP, RUN, 4, {**STEP_BODY, "reward": [object()]})
    assert encode_frame(FrameKind.STEP, RUN, 4, STEP_BODY, ts_ns=5)[1] == packed(4, STEP_BODY)
    on_thread: list[bytes] = []
    worker = threading.Thread(target=lambda: on_thread.append(
        encode_frame(FrameKind.STEP, RUN, 4, big, ts_ns=5)[1]))
    worker.start()
    worker.join()
    assert on_thread == [packed(4, big)]
