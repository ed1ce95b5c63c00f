"""The real worker daemon as a subprocess, against a test-owned ROUTER acting as the broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import wait_until
from test_emitter import FrameSink

from gymbus.shared.codec import Message, decode_message, encode_message
from gymbus.shared.protocol import Command, FrameKind, LifecycleEvent, RunState
from gymbus.shared.settings import Settings

WORKER_ID = "w-test"
LONG_RUN = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 10_000_000}
SHORT_RUN = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 200,
             "env_kwargs": {"is_slippery": False}}


class FakeBroker:
    """A ROUTER where the broker binds. `pump` records what the worker sends and, unless
    `silent`, heartbeats it every interval as the real broker does."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, interval: float) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a re-registering worker takes its id over
        self.sock.bind(endpoint)
        self.interval = interval
        self.silent = False
        self.messages: list[Message] = []
        self._next_heartbeat = 0.0

    def send(self, cmd: Command, body: dict[str, Any]) -> None:
        self.sock.send_multipart([WORKER_ID.encode(), encode_message(cmd, body)])

    def pump(self) -> list[Message]:
        """Receive what has arrived (for up to 20 ms), heartbeat if due; all messages so far."""
        if self.sock.poll(20, zmq.POLLIN):
            while self.sock.poll(0, zmq.POLLIN):
                identity, payload = self.sock.recv_multipart()
                assert identity == WORKER_ID.encode()
                self.messages.append(decode_message(payload))
        now = time.monotonic()
        if not self.silent and now >= self._next_heartbeat:
            self._next_heartbeat = now + self.interval
            self.send(Command.HEARTBEAT, {})
        return self.messages

    def find(self, cmd: Command, **match: Any) -> list[Message]:
        return [m for m in self.messages if m.cmd is cmd
                and all(m.body.get(k) == v for k, v in match.items())]

    def expect(self, cmd: Command, timeout: float = 10.0, **match: Any) -> Message:
        """Pump until a message of `cmd` whose body has the `match` fields arrives."""
        def found() -> Message | None:
            self.pump()
            hits = self.find(cmd, **match)
            return hits[0] if hits else None
        return wait_until(found, timeout, f"{cmd.value} {match}", interval=0.0)


class Daemon:
    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "gymbus.worker"], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def children(self) -> list[int]:
        """Pids of the daemon's child processes (from /proc)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """Finalizer: kill the daemon and any child it left."""
        if self.process.poll() is None:
            leftovers = self.children()
            self.process.kill()
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process.communicate(timeout=5)


@pytest.fixture
def stack(gymbus_env: dict[str, str], gymbus_settings: Settings) -> Iterator[Callable[..., Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    made: list[Any] = []

    def start(slots: int = 1) -> tuple[FakeBroker, FrameSink, Daemon]:
        broker = FakeBroker(ctx, gymbus_settings.broker_workers, gymbus_settings.heartbeat_interval)
        sink = FrameSink(ctx, gymbus_settings.telemetry_in)
        env = {**os.environ, **gymbus_env, "GYMBUS_WORKER_ID": WORKER_ID,
               "GYMBUS_WORKER_SLOTS": str(slots)}
        daemon = Daemon(env)
        made.extend([sink, daemon])
        return broker, sink, daemon

    yield start
    for thing in reversed(made):
        if isinstance(thing, Daemon):
            thing.stop()
        else:
            thing.close()
    ctx.destroy(linger=0)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_ready_then_heartbeats(stack: Any) -> None:
    broker, _, daemon = stack(slots=2)
    ready = broker.expect(Command.READY)
    assert ready.body["worker_id"] == WORKER_ID and ready.body["slots"] == 2
    assert ready.body["pid"] == daemon.process.pid and ready.body["runs"] == []
    beat = broker.expect(Command.HEARTBEAT)
    assert beat.body == {"busy": 0, "runs": []}


def test_run_goes_running_then_completed(stack: Any, gymbus_settings: Settings) -> None:
    broker, sink, _ = stack()
    broker.expect(Command.READY)
    broker.send(Command.RUN, {"run_id": "01RUNA", "config": SHORT_RUN})
    broker.expect(Command.RUN_UPDATE, run_id="01RUNA", state=RunState.RUNNING.value)
    done = broker.expect(Command.RUN_UPDATE, run_id="01RUNA", state=RunState.COMPLETED.value)
    assert done.body["episodes"] == 200 and done.body["steps"] > 0
    last = sink.wait_completed("01RUNA")
    assert done.body["frames_emitted"] == last.body["frames_emitted"] == len(sink.drain())
    run_dir = gymbus_settings.run_dir("01RUNA")
    assert json.loads((run_dir / "config.json").read_text())["env"] == "FrozenLake-v1"
    assert (run_dir / "artifacts" / "q_table.npy").exists() and (run_dir / "run.log").exists()


def test_cancel_stops_a_long_run_and_slots_are_enforced(stack: Any) -> None:
    broker, sink, _ = stack(slots=1)
    broker.expect(Command.READY)
    broker.send(Command.RUN, {"run_id": "01LONG", "config": LONG_RUN})
    broker.expect(Command.RUN_UPDATE, run_id="01LONG", state=RunState.RUNNING.value)
    broker.send(Command.RUN, {"run_id": "01MORE", "config": SHORT_RUN})
    refused = broker.expect(Command.DISPATCH_FAILED, run_id="01MORE")
    assert "slot" in refused.body["reason"]
    started = wait_until(lambda: [f for f in sink.drain() if f.kind is FrameKind.LIFECYCLE
                                  and f.body["event"] == LifecycleEvent.RUN_STARTED], 15,
                         "run_started")[0]
    child_pid = started.body["pid"]
    sent = time.monotonic()
    broker.send(Command.CANCEL, {"run_id": "01LONG"})
    update = broker.expect(Command.RUN_UPDATE, timeout=5, run_id="01LONG",
                           state=RunState.CANCELLED.value)
    assert time.monotonic() - sent < 2.0
    assert pid_gone(child_pid)
    assert update.body["frames_emitted"] == sink.wait_completed("01LONG").body["frames_emitted"]
    broker.send(Command.CANCEL, {"run_id": "01NOPE"})  # unknown: ignored
    beat = broker.expect(Command.HEARTBEAT, busy=0)
    assert beat.body["runs"] == []


def test_invalid_config_is_refused(stack: Any) -> None:
    broker, _, _ = stack()
    broker.expect(Command.READY)
    broker.send(Command.RUN, {"run_id": "01BAD", "config": {"env": "FrozenLake-v1"}})
    refused = broker.expect(Command.DISPATCH_FAILED, run_id="01BAD")
    assert "algo" in refused.body["reason"]


def test_reregisters_when_the_broker_goes_silent(stack: Any) -> None:
    broker, _, _ = stack()
    broker.expect(Command.READY)
    broker.send(Command.RUN, {"run_id": "01HELD", "config": LONG_RUN})
    broker.expect(Command.RUN_UPDATE, run_id="01HELD", state=RunState.RUNNING.value)
    broker.silent = True
    silent_since = time.monotonic()
    again = broker.expect(Command.READY, timeout=5, runs=["01HELD"])
    # liveness 3 x interval 0.25 s, give or take one interval
    assert 0.5 <= time.monotonic() - silent_since < 2.0
    assert again.body["worker_id"] == WORKER_ID
    broker.silent = False
    broker.send(Command.CANCEL, {"run_id": "01HELD"})
    broker.expect(Command.RUN_UPDATE, run_id="01HELD", state=RunState.CANCELLED.value)


def test_sigterm_stops_runs_and_exits_within_five_seconds(stack: Any) -> None:
    broker, _, daemon = stack(slots=2)
    broker.expect(Command.READY)
    broker.send(Command.RUN, {"run_id": "01RUNX", "config": LONG_RUN})
    broker.expect(Command.RUN_UPDATE, run_id="01RUNX", state=RunState.RUNNING.value)
    children = wait_until(daemon.children, what="the run's child process")
    sent = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    out, _ = daemon.process.communicate(timeout=6)
    assert time.monotonic() - sent < 5.0
    assert daemon.process.returncode == 0, out.decode(errors="replace")
    broker.expect(Command.RUN_UPDATE, run_id="01RUNX", state=RunState.CANCELLED.value)
    broker.expect(Command.DISCONNECT)
    assert all(pid_gone(pid) for pid in children)
