"""The real broker process, with test-owned DEALERs playing the controller and workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import wait_until

from gymbus.shared.codec import Message, decode_message, encode_frame, encode_message
from gymbus.shared.protocol import MAX_FRAME_BYTES, Command, FrameKind, LifecycleEvent, RunState

pytestmark = pytest.mark.integration

INTERVAL = 0.25  # GYMBUS_HEARTBEAT_INTERVAL of the gymbus_env fixture
WINDOW = INTERVAL * 3


class Peer:
    """A DEALER with an inbox; `expect` polls for a message until a deadline, failing loudly."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, identity: bytes) -> None:
        self.identity = identity
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(endpoint)
        self.inbox: list[Message] = []

    def send(self, cmd: Command, body: dict[str, Any] | None = None) -> None:
        self.sock.send(encode_message(cmd, body or {}))

    def pump(self) -> None:
        while self.sock.poll(0, zmq.POLLIN):
            self.inbox.append(decode_message(self.sock.recv()))

    def take(self, cmd: Command, where: Callable[[dict[str, Any]], bool] = lambda b: True) -> Message | None:
        self.pump()
        for i, msg in enumerate(self.inbox):
            if msg.cmd is cmd and where(msg.body):
                return self.inbox.pop(i)
        return None

    def expect(
        self,
        cmd: Command,
        where: Callable[[dict[str, Any]], bool] = lambda b: True,
        timeout: float = 5.0,
        tick: Callable[[], None] | None = None,
    ) -> Message:
        def arrived() -> Message | None:
            if tick is not None:
                tick()
            return self.take(cmd, where)

        msg = wait_until(arrived, timeout, what=f"{self.identity!r} to receive {cmd.value}")
        assert msg is not None
        return msg


class Worker(Peer):
    def __init__(self, ctx: zmq.Context[Any], endpoint: str, worker_id: str, slots: int = 2) -> None:
        super().__init__(ctx, endpoint, worker_id.encode())
        self.worker_id = worker_id
        self.slots = slots
        self.runs: list[str] = []

    def ready(self) -> None:
        self.send(Command.READY, {"worker_id": self.worker_id, "host": "test-host", "pid": 4242,
                                  "slots": self.slots, "runs": self.runs})

    def heartbeat(self) -> None:
        self.send(Command.HEARTBEAT, {"busy": len(self.runs), "runs": self.runs})


def has_worker(worker_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda body: any(w["worker_id"] == worker_id for w in body["workers"])


@pytest.fixture
def broker(gymbus_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log_path = tmp_path / "broker.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gymbus.services.broker"],
            env={**os.environ, **gymbus_env}, stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sys.stderr.write(log_path.read_text())  # shown by pytest when a test fails


@pytest.fixture
def controller(ctx: zmq.Context[Any], gymbus_env: dict[str, str], broker: Any) -> Peer:
    peer = Peer(ctx, gymbus_env["GYMBUS_BROKER_CONTROLLER"], b"controller")
    peer.send(Command.HELLO)
    peer.expect(Command.WORKERS, timeout=10.0)  # the broker is up
    return peer


@pytest.fixture
def worker(ctx: zmq.Context[Any], gymbus_env: dict[str, str], controller: Peer) -> Worker:
    w = Worker(ctx, gymbus_env["GYMBUS_BROKER_WORKERS"], "w1")
    w.ready()
    controller.expect(Command.WORKERS, has_worker("w1"))
    return w


def test_ready_reaches_the_controller_as_workers(controller: Peer, worker: Worker) -> None:
    controller.send(Command.HELLO)
    msg = controller.expect(Command.WORKERS, has_worker("w1"))

    (record,) = msg.body["workers"]
    assert record["worker_id"] == "w1" and record["host"] == "test-host" and record["pid"] == 4242
    assert record["slots"] == 2 and record["busy"] == 0 and record["runs"] == []
    assert record["last_heartbeat_ns"] > 0


def test_ready_again_replaces_the_entry(controller: Peer, worker: Worker) -> None:
    worker.slots = 5
    worker.ready()
    msg = controller.expect(Command.WORKERS, lambda b: [w["slots"] for w in b["workers"]] == [5])
    assert len(msg.body["workers"]) == 1


def test_heartbeat_changes_reach_the_controller(controller: Peer, worker: Worker) -> None:
    worker.runs = ["r1"]
    worker.heartbeat()
    controller.expect(Command.WORKERS, lambda b: b["workers"][0]["runs"] == ["r1"]
                      and b["workers"][0]["busy"] == 1)


def test_broker_heartbeats_its_workers(worker: Worker) -> None:
    worker.expect(Command.HEARTBEAT, tick=worker.heartbeat)
    worker.expect(Command.HEARTBEAT, tick=worker.heartbeat)


def test_dispatch_reaches_the_worker(controller: Peer, worker: Worker) -> None:
    controller.send(Command.DISPATCH, {"run_id": "r1", "worker_id": "w1", "config": {"env": "X"}})

    msg = worker.expect(Command.RUN, tick=worker.heartbeat)

    assert msg.body == {"run_id": "r1", "config": {"env": "X"},
                        "max_frame_bytes": MAX_FRAME_BYTES}  # the broker's (a default here)


def test_dispatch_to_an_unknown_worker_fails_back(controller: Peer, worker: Worker) -> None:
    controller.send(Command.DISPATCH, {"run_id": "r2", "worker_id": "ghost", "config": {}})

    msg = controller.expect(Command.DISPATCH_FAILED)

    assert msg.body["run_id"] == "r2" and msg.body["worker_id"] == "ghost"
    assert "ghost" in msg.body["reason"]


def test_run_update_and_dispatch_failed_are_forwarded_with_worker_id(
    controller: Peer, worker: Worker
) -> None:
    worker.send(Command.RUN_UPDATE, {"run_id": "r1", "state": "running", "reason": None,
                                     "frames_emitted": None, "episodes": None, "steps": None})
    update = controller.expect(Command.RUN_UPDATE)
    assert update.body["worker_id"] == "w1"
    assert update.body["run_id"] == "r1" and update.body["state"] == RunState.RUNNING

    worker.send(Command.DISPATCH_FAILED, {"run_id": "r3", "reason": "no free slot"})
    failed = controller.expect(Command.DISPATCH_FAILED)
    assert failed.body == {"run_id": "r3", "worker_id": "w1", "reason": "no free slot"}


def test_cancel_is_forwarded_or_reported_lost(controller: Peer, worker: Worker) -> None:
    controller.send(Command.CANCEL, {"run_id": "r1", "worker_id": "w1"})
    assert worker.expect(Command.CANCEL, tick=worker.heartbeat).body == {"run_id": "r1"}

    controller.send(Command.CANCEL, {"run_id": "r9", "worker_id": "ghost"})
    lost = controller.expect(Command.RUN_UPDATE)
    assert lost.body["run_id"] == "r9" and lost.body["worker_id"] == "ghost"
    assert lost.body["state"] == RunState.LOST and "ghost" in lost.body["reason"]


def test_silent_worker_is_lost_within_the_window(
    ctx: zmq.Context[Any], gymbus_env: dict[str, str], controller: Peer
) -> None:
    alive = Worker(ctx, gymbus_env["GYMBUS_BROKER_WORKERS"], "alive")
    silent = Worker(ctx, gymbus_env["GYMBUS_BROKER_WORKERS"], "silent")
    alive.ready()
    silent.runs = ["r1", "r2"]
    silent.ready()
    controller.expect(Command.WORKERS, lambda b: has_worker("alive")(b) and has_worker("silent")(b),
                      tick=alive.heartbeat)
    last_word = time.monotonic()  # the silent worker's ready was sent before this

    lost = controller.expect(Command.WORKER_LOST, timeout=5.0, tick=alive.heartbeat)

    elapsed = time.monotonic() - last_word
    assert lost.body == {"worker_id": "silent", "runs": ["r1", "r2"]}
    assert elapsed <= WINDOW + INTERVAL + 0.5
    # the heartbeating worker outlives several windows
    deadline = time.monotonic() + 2 * WINDOW
    while time.monotonic() < deadline:
        alive.heartbeat()
        assert controller.take(Command.WORKER_LOST) is None
        controller.sock.poll(50)
    controller.send(Command.HELLO)
    view = controller.expect(Command.WORKERS, has_worker("alive"), tick=alive.heartbeat)
    assert not has_worker("silent")(view.body)


def test_heartbeat_from_an_unknown_worker_gets_nothing(
    ctx: zmq.Context[Any], gymbus_env: dict[str, str], controller: Peer
) -> None:
    stranger = Worker(ctx, gymbus_env["GYMBUS_BROKER_WORKERS"], "stranger")
    deadline = time.monotonic() + 3 * INTERVAL
    while time.monotonic() < deadline:
        stranger.heartbeat()
        stranger.sock.poll(50)
    stranger.pump()
    assert stranger.inbox == []
    controller.send(Command.HELLO)
    view = controller.expect(Command.WORKERS)
    assert not has_worker("stranger")(view.body)


def test_disconnect_removes_the_worker(controller: Peer, worker: Worker) -> None:
    worker.send(Command.DISCONNECT)
    controller.expect(Command.WORKERS, lambda b: b["workers"] == [])
    assert controller.take(Command.WORKER_LOST) is None


def test_telemetry_reaches_subscribers(ctx: zmq.Context[Any], gymbus_env: dict[str, str],
                                       controller: Peer) -> None:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"lifecycle")
    sub.connect(gymbus_env["GYMBUS_TELEMETRY_OUT"])
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(gymbus_env["GYMBUS_TELEMETRY_IN"])
    frame = encode_frame(FrameKind.LIFECYCLE, "r1", 0,
                         {"event": LifecycleEvent.RUN_STARTED.value, "config": {}})
    other = encode_frame(FrameKind.METRIC, "r1", 1,
                         {"name": ["x"], "step": [0], "value": [1.0], "ts_ns": [0]})

    def delivered() -> list[bytes] | None:
        # the subscription travels SUB -> XPUB -> XSUB -> PUB; publish until it has arrived
        pub.send_multipart(other)
        pub.send_multipart(frame)
        return sub.recv_multipart() if sub.poll(50, zmq.POLLIN) else None

    parts = wait_until(delivered, 10.0, what="a telemetry frame through the broker")
    assert parts == list(frame)  # the metric frame was filtered out by the prefix


def test_garbage_does_not_kill_it(ctx: zmq.Context[Any], gymbus_env: dict[str, str],
                                  controller: Peer, worker: Worker,
                                  broker: subprocess.Popen[bytes]) -> None:
    controller.sock.send(b"\xc1\xff not msgpack")
    controller.sock.send_multipart([b"two", b"frames"])
    controller.sock.send(encode_message(Command.DISPATCH, {"run_id": 7}))
    controller.sock.send(encode_message(Command.READY, {}))  # a worker's command
    worker.sock.send(b"\x93\x01\x02\x03")  # msgpack, not a map
    worker.send(Command.READY, {"worker_id": "w1", "host": 1, "pid": "x"})
    worker.send(Command.READY, {"worker_id": "w1", "host": "h", "pid": 2**64 - 1, "slots": 1})
    worker.send(Command.RUN_UPDATE, {"run_id": "r1", "state": "exploded"})
    worker.send(Command.HELLO)
    raw = socket.create_connection(("127.0.0.1", int(gymbus_env["GYMBUS_BROKER_WORKERS"].rsplit(":", 1)[1])))
    raw.sendall(os.urandom(4096))
    raw.close()

    controller.send(Command.HELLO)
    view = controller.expect(Command.WORKERS, has_worker("w1"), tick=worker.heartbeat)
    assert view.body["workers"][0]["host"] == "test-host"  # the bad ready changed nothing
    assert controller.take(Command.RUN_UPDATE) is None
    assert broker.poll() is None


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_it_within_5_s(controller: Peer, worker: Worker,
                                    broker: subprocess.Popen[bytes], signum: int,
                                    code: int) -> None:
    started = time.monotonic()
    broker.send_signal(signum)
    assert broker.wait(5) == code
    assert time.monotonic() - started < 5
