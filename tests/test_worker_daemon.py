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
from test_emitter import FakeClock, FrameSink

from gymbus.shared import settings as settings_mod
from gymbus.shared.codec import Message, decode_message, encode_message
from gymbus.shared.protocol import Command, FrameKind, LifecycleEvent, RunState
from gymbus.shared.settings import Settings
from gymbus.worker.daemon import CANCEL_GRACE, SHUTDOWN_GRACE, Child, Worker

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
        """Send to the worker; dropped when its queue is full (never blocks the test)."""
        try:
            self.sock.send_multipart([WORKER_ID.encode(), encode_message(cmd, body)],
                                     flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

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
    child_pid = run_started_pid(broker, sink)
    broker.send(Command.CANCEL, {"run_id": "01LONG"})
    update = broker.expect(Command.RUN_UPDATE, timeout=5, run_id="01LONG",
                           state=RunState.CANCELLED.value)
    assert pid_gone(child_pid)  # the grace before a SIGKILL: on a fake clock, below
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


def run_started_pid(broker: FakeBroker, sink: Any) -> int:
    """The run child's pid, from its run_started frame; the broker heartbeats meanwhile (a
    worker left without them for its liveness re-registers)."""
    def started() -> list[Any]:
        broker.pump()
        return [f for f in sink.drain() if f.kind is FrameKind.LIFECYCLE
                and f.body["event"] == LifecycleEvent.RUN_STARTED]
    return int(wait_until(started, 15, "run_started", interval=0.0)[0].body["pid"])


def test_reregisters_when_the_broker_goes_silent(stack: Any) -> None:
    broker, _, _ = stack()
    broker.expect(Command.READY)
    broker.send(Command.RUN, {"run_id": "01HELD", "config": LONG_RUN})
    broker.expect(Command.RUN_UPDATE, run_id="01HELD", state=RunState.RUNNING.value)
    broker.silent = True  # at which heartbeat it re-registers: on a fake clock, below
    again = broker.expect(Command.READY, timeout=5, runs=["01HELD"])
    assert again.body["worker_id"] == WORKER_ID
    broker.silent = False
    broker.send(Command.CANCEL, {"run_id": "01HELD"})
    broker.expect(Command.RUN_UPDATE, run_id="01HELD", state=RunState.CANCELLED.value)


def test_sigterm_stops_runs_and_exits_143(stack: Any) -> None:
    broker, _, daemon = stack(slots=2)
    broker.expect(Command.READY)
    broker.send(Command.RUN, {"run_id": "01RUNX", "config": LONG_RUN})
    broker.expect(Command.RUN_UPDATE, run_id="01RUNX", state=RunState.RUNNING.value)
    children = wait_until(daemon.children, what="the run's child process")
    daemon.process.send_signal(signal.SIGTERM)
    # the grace its runs get is checked on a fake clock below; this timeout bounds a hang
    out, _ = daemon.process.communicate(timeout=6)
    assert daemon.process.returncode == 143, out.decode(errors="replace")
    broker.expect(Command.RUN_UPDATE, run_id="01RUNX", state=RunState.CANCELLED.value)
    broker.expect(Command.DISCONNECT)
    assert all(pid_gone(pid) for pid in children)


# --- the daemon's deadlines, in this process on a fake clock ---------------------------------------


@pytest.fixture
def clocked(ctx: zmq.Context[Any],
            gymbus_env: dict[str, str]) -> Iterator[tuple[Worker, FakeBroker, FakeClock]]:
    """A Worker in this process on a clock that moves only when the test moves it, registered
    with a silent FakeBroker. The worker has a context of its own: closing it ends that one."""
    settings = settings_mod.load({**gymbus_env, "GYMBUS_WORKER_ID": WORKER_ID})
    broker = FakeBroker(ctx, settings.broker_workers, settings.heartbeat_interval)
    broker.silent = True
    clock = FakeClock()
    worker = Worker(settings, clock=clock)
    try:
        worker.connect_to_broker()
        broker.expect(Command.READY)
        yield worker, broker, clock
    finally:
        worker.close()
        broker.sock.close()


def received(broker: FakeBroker, cmd: Command, count: int) -> list[Message]:
    """Pump until the broker holds `count` messages of `cmd`; all of them."""
    def enough() -> list[Message]:
        broker.pump()
        found = broker.find(cmd)
        return found if len(found) >= count else []
    return wait_until(enough, 10, f"{count} {cmd.value} messages", interval=0.0)


def test_a_silent_broker_is_left_at_the_liveness_th_heartbeat(
    clocked: tuple[Worker, FakeBroker, FakeClock],
) -> None:
    """Liveness counts down once a heartbeat interval while nothing is heard, anything heard
    restores it, and at zero the worker re-registers on a fresh socket: liveness x interval after
    the last heartbeat at which it had heard the broker."""
    worker, broker, clock = clocked
    interval, liveness = worker.settings.heartbeat_interval, worker.settings.heartbeat_liveness
    first, start = worker.sock, clock.now  # 100.0 and multiples of 0.25: exact in binary

    def tick(at: float) -> None:
        clock.now = at
        worker.heartbeat()

    for beat in range(1, liveness):  # silent: 2, then 1 left
        tick(start + beat * interval)
    assert worker.liveness == 1
    broker.send(Command.HEARTBEAT, {})  # heard in the last interval: that tick counts nothing
    assert first is not None and first.poll(5000, zmq.POLLIN)
    worker.receive_all(first)
    tick(start + liveness * interval)
    assert worker.sock is first and worker.liveness == liveness
    heard_at = clock.now

    for beat in range(1, liveness):
        tick(heard_at + beat * interval)
    tick(heard_at + liveness * interval - 1e-6)  # just before the deadline
    assert worker.sock is first and worker.liveness == 1
    # one heartbeat a tick until then, all read before the socket goes (a ROUTER hands a
    # re-registering worker's identity over and gives what is left of the old pipe another)
    assert len(received(broker, Command.HEARTBEAT, 2 * liveness - 1)) == 2 * liveness - 1
    tick(heard_at + liveness * interval)  # at the deadline
    assert worker.sock is not first and worker.liveness == liveness
    first_ready, again = received(broker, Command.READY, 2)
    assert first_ready.body["runs"] == []
    assert again.body["worker_id"] == WORKER_ID and again.body["runs"] == []


STUBBORN = ("import signal\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ignoring SIGTERM', flush=True)\n"
            "while True:\n"
            "    signal.pause()\n")


def test_a_cancelled_run_that_ignores_sigterm_is_killed_when_its_grace_ends(
    clocked: tuple[Worker, FakeBroker, FakeClock],
) -> None:
    """SIGTERM at the cancel; SIGKILL at the first pass once CANCEL_GRACE has gone by, not before."""
    worker, broker, clock = clocked
    run_dir = worker.settings.run_dir("01STUBBORN")
    run_dir.mkdir(parents=True)
    with subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline() == b"ignoring SIGTERM\n"
            log_file = open(run_dir / "run.log", "ab")  # noqa: SIM115 - closed when it is reaped
            child = Child("01STUBBORN", process, run_dir, log_file)
            worker.children[child.run_id] = child
            cancelled_at = clock.now
            worker.on_cancel({"run_id": child.run_id})  # SIGTERM, which it ignores

            clock.now = cancelled_at + CANCEL_GRACE - 1e-6  # just before the grace ends
            worker.escalate_cancels()
            assert child.kill_at == cancelled_at + CANCEL_GRACE
            with pytest.raises(subprocess.TimeoutExpired):
                process.wait(timeout=0.2)  # alive: no SIGKILL was sent
            clock.now = cancelled_at + CANCEL_GRACE  # at the end of the grace
            worker.escalate_cancels()
            assert child.kill_at is None
            assert process.wait(timeout=10) == -signal.SIGKILL
            worker.reap_children()
            update = broker.expect(Command.RUN_UPDATE, run_id=child.run_id)
            assert update.body["state"] == RunState.CANCELLED.value
            assert update.body["reason"] == f"stopped (exit code {-signal.SIGKILL})"
        finally:
            process.kill()


class ScriptedProcess:
    """A run process on the test's clock: it ends `stops_after` seconds after SIGTERM (never
    when None) and at once on SIGKILL; a wait moves the clock as long as a real one would take.
    It stands where the daemon keeps a child's Popen."""

    def __init__(self, clock: FakeClock, stops_after: float | None) -> None:
        self.clock, self.stops_after = clock, stops_after
        self.pid = 0
        self.returncode: int | None = None
        self.terminated_at: float | None = None
        self.signals: list[int] = []
        self.waits: list[float] = []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        if signum == signal.SIGKILL:
            self.returncode = -signal.SIGKILL
        elif signum == signal.SIGTERM and self.terminated_at is None:
            self.terminated_at = self.clock.now

    def wait(self, timeout: float) -> int:
        self.waits.append(timeout)
        if self.returncode is not None:
            return self.returncode
        if self.terminated_at is not None and self.stops_after is not None:
            ends = self.terminated_at + self.stops_after
            if ends <= self.clock.now + timeout:
                self.clock.now = max(self.clock.now, ends)
                self.returncode = -signal.SIGTERM
                return self.returncode
        self.clock.now += timeout
        raise subprocess.TimeoutExpired("run", timeout)


def test_stopping_shares_one_grace_between_the_runs_then_kills(
    clocked: tuple[Worker, FakeBroker, FakeClock], tmp_path: Path,
) -> None:
    """Every run gets SIGTERM at once; each wait takes what the runs before it left of the one
    SHUTDOWN_GRACE, and a run still there when the grace is spent is killed."""
    worker, broker, clock = clocked
    runs = {"01QUICK": 1.0, "01ATDEADLINE": SHUTDOWN_GRACE, "01LATE": SHUTDOWN_GRACE + 1e-6}
    processes = {run_id: ScriptedProcess(clock, stops_after) for run_id, stops_after in runs.items()}
    for run_id, process in processes.items():
        log_file = open(tmp_path / f"{run_id}.log", "ab")  # noqa: SIM115 - closed when reaped
        worker.children[run_id] = Child(run_id, process, tmp_path, log_file)  # type: ignore[arg-type]
    worker.close()

    quick, at_deadline, late = processes.values()
    assert quick.waits == [SHUTDOWN_GRACE]
    assert at_deadline.waits == [SHUTDOWN_GRACE - 1.0]
    assert late.waits == [0.0, 1.0]  # nothing left of the grace; then a second for the SIGKILL
    assert [p.signals for p in processes.values()] == [
        [signal.SIGTERM], [signal.SIGTERM], [signal.SIGTERM, signal.SIGKILL]]
    for run_id, code in zip(runs, (-signal.SIGTERM, -signal.SIGTERM, -signal.SIGKILL)):
        update = broker.expect(Command.RUN_UPDATE, run_id=run_id)
        assert update.body["state"] == RunState.CANCELLED.value
        assert update.body["reason"] == f"stopped (exit code {code})"
    broker.expect(Command.DISCONNECT)
