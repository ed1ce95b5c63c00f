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

import os
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from conftest import STACK_ENV, make_stack, stack_fixture, wait_until
from fuzz_strategies import (
    FRAME_CATEGORIES,
    FUZZ,
    IDS,
    INT64,
    MESSAGE_CATEGORIES,
    SCALARS,
    TARGETS,
    bad_frame,
    bad_message,
    column_values,
    frame_parts,
    pack,
    valid_frame,
)
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from gymbus.services.stack.launcher import SERVICES, Stack
from gymbus.shared.codec import (
    COLUMNS,
    FLOAT,
    OBS,
    decode_frame,
    decode_message,
    encode_frame,
    encode_message,
)
from gymbus.shared.errors import DecodeError, RemoteError
from gymbus.shared.protocol import (
    Command,
    ErrorCode,
    FrameKind,
    RunState,
    topic,
)
from gymbus.shared.transport import Client

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
    for name, sent in payload["body"].items():
        value = column_values(sent) if name in COLUMNS.get(kind, {}) else sent
        got = frame.body[name]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        if COLUMNS.get(kind, {}).get(name) in (FLOAT, OBS) and value and not isinstance(
                value[0], int):
            value = np.asarray(value, dtype=np.float64).tolist()
        assert got == value, name


#: control messages: (target, category, message parts); targets are the four ROUTERs
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


def start_with_a_debug_broker(s: Stack) -> None:
    """Every service, the broker logging at DEBUG: one line per malformed message."""
    for role in SERVICES:
        s.start_one(role, {"GYMBUS_LOG_LEVEL": "DEBUG"} if role == "broker" else None)
    s.wait_ready(tuple(SERVICES), 30)


stack = stack_fixture("fuzz", start=start_with_a_debug_broker, **STACK_ENV)


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
    """Cancel never hangs. tests/test_controller.py checks `worker_gone` against a fake broker; here the
    worker really dies, first under a live broker, then together with it."""
    runs: list[str] = []
    with make_stack(tmp_path / "home", **STACK_ENV) as stack, \
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
