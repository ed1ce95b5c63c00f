"""The controller: its scheduler driven by a fake clock, then the real process with a test-owned
ROUTER playing the broker and a `Client` playing the CLI."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gymnasium
import pytest
import zmq
from conftest import wait_until
from gymnasium import spaces

from gymbus.services.controller.scheduler import Scheduler, WorkerView, parse_workers
from gymbus.services.controller.service import Controller
from gymbus.shared.codec import Message, decode_message, encode_message
from gymbus.shared.errors import RemoteError
from gymbus.shared.protocol import Command, ErrorCode, RunState
from gymbus.shared.service import StopFlag
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client

INTERVAL = 0.25  # GYMBUS_HEARTBEAT_INTERVAL of the gymbus_env fixture
WINDOW = INTERVAL * 3
VALID = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 5, "seed": 1}


def worker_record(worker_id: str, slots: int = 2, runs: list[str] | None = None) -> dict[str, Any]:
    runs = runs or []
    return {"worker_id": worker_id, "host": "h", "pid": 1, "slots": slots, "busy": len(runs),
            "runs": runs, "last_heartbeat_ns": 1}


# --- the scheduler, without sockets ---------------------------------------------------------------


def view(worker_id: str, slots: int, runs: tuple[str, ...] = ()) -> WorkerView:
    return parse_workers({"workers": [worker_record(worker_id, slots, list(runs))]})[0]


def test_scheduler_picks_the_worker_with_most_free_slots() -> None:
    s = Scheduler(INTERVAL, 3)
    s.update_view([view("a", 2, ("x",)), view("b", 3, ("y",)), view("c", 1)], now=0.0)

    assert s.free_slots() == {"a": 1, "b": 2, "c": 1}
    assert s.pick_worker() == "b"
    s.sent("r1", "b", now=0.0)
    assert s.pick_worker() == "a"  # a, b and c tie at 1: the smallest id
    s.sent("r2", "a", 0.0)
    s.sent("r3", "b", 0.0)
    s.sent("r4", "c", 0.0)
    assert s.pick_worker() is None


def test_scheduler_counts_dispatches_until_acknowledged() -> None:
    s = Scheduler(INTERVAL, 3)
    s.update_view([view("a", 1)], now=0.0)
    s.sent("r1", "a", now=0.0)
    assert s.free_slots() == {"a": 0}

    s.update_view([view("a", 1)], now=0.25)  # not in its runs yet: still in flight
    assert s.free_slots() == {"a": 0} and "r1" in s.pending

    s.update_view([view("a", 1, ("r1",))], now=0.5)  # acknowledged, and busy now
    assert s.pending == {} and s.free_slots() == {"a": 0}

    s.update_view([view("a", 1)], now=0.75)  # it finished
    assert s.free_slots() == {"a": 1}


def test_scheduler_takes_back_dispatches_never_acknowledged() -> None:
    s = Scheduler(INTERVAL, 3)
    s.update_view([view("a", 2)], now=0.0)
    s.sent("r1", "a", now=0.0)
    s.sent("r2", "a", now=1.0)

    assert s.unacknowledged(s.ack_timeout - 0.01) == []
    late = s.unacknowledged(s.ack_timeout)
    assert [p.run_id for p in late] == ["r1"]
    assert list(s.pending) == ["r2"]
    s.acknowledged("r2")
    assert s.pending == {}


def test_scheduler_reports_workers_absent_for_the_window() -> None:
    s = Scheduler(INTERVAL, 3)
    s.update_view([], now=10.0)
    assert s.absent_workers({"w1"}, now=10.0) == []
    assert s.absent_workers({"w1"}, now=10.0 + s.absence_window - 0.01) == []
    assert s.absent_workers({"w1"}, now=10.0 + s.absence_window) == ["w1"]

    s.absent_workers({"w2"}, now=20.0)
    s.update_view([view("w2", 1)], now=20.5)  # it came back: the clock restarts
    s.update_view([], now=21.0)
    assert s.absent_workers({"w2"}, now=20.0 + s.absence_window) == []


def test_scheduler_skips_a_refusing_worker_until_it_heartbeats() -> None:
    s = Scheduler(INTERVAL, 3)
    s.update_view([view("a", 2), view("b", 1)], now=0.0)
    s.refused("a")
    assert s.pick_worker() == "b"
    s.update_view([view("a", 2), view("b", 1)], now=0.25)  # the same heartbeat of a
    assert s.pick_worker() == "b"
    beat = {**worker_record("a", 2), "last_heartbeat_ns": 99}
    s.update_view(parse_workers({"workers": [beat]}), now=0.5)
    assert s.pick_worker() == "a"


def test_parse_workers_skips_malformed_records() -> None:
    views = parse_workers({"workers": [worker_record("ok"), {"worker_id": 3}, "junk",
                                       {**worker_record("neg"), "slots": -1}]})
    assert [v.worker_id for v in views] == ["ok"]
    assert parse_workers({"workers": "nope"}) == []


# --- the real controller --------------------------------------------------------------------------


class FakeBroker:
    """A ROUTER bound where the broker would be, served by its own thread.

    It answers every `hello` with the current worker view (keeping the controller's liveness
    count up) and records every other message. Sends go through a queue to that thread.
    """

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        self.workers: list[dict[str, Any]] = []
        self.inbox: list[Message] = []
        self.hellos = 0
        self.silent = False
        self._lock = threading.Lock()
        self._outbox: queue.Queue[tuple[Command, dict[str, Any]]] = queue.Queue()
        self._stop = threading.Event()
        self._ctx = ctx
        self._endpoint = endpoint
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._bound.wait(5)

    def _serve(self) -> None:
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        router.bind(self._endpoint)
        self._bound.set()
        while not self._stop.is_set():
            while not self._outbox.empty():
                cmd, body = self._outbox.get()
                router.send_multipart([b"controller", encode_message(cmd, body)])
            if not router.poll(10, zmq.POLLIN):
                continue
            _, data = router.recv_multipart()
            msg = decode_message(data)
            with self._lock:
                if msg.cmd is Command.HELLO:
                    self.hellos += 1
                    if not self.silent:
                        router.send_multipart([b"controller", encode_message(
                            Command.WORKERS, {"workers": list(self.workers)})])
                else:
                    self.inbox.append(msg)
        router.close(linger=0)

    def send(self, cmd: Command, body: dict[str, Any]) -> None:
        self._outbox.put((cmd, body))

    def announce(self, *workers: dict[str, Any]) -> None:
        """Set the worker view and send it now."""
        with self._lock:
            self.workers = list(workers)
        self.send(Command.WORKERS, {"workers": list(workers)})

    def take(self, cmd: Command, where: Callable[[dict[str, Any]], bool] = lambda b: True) -> Message | None:
        with self._lock:
            for i, msg in enumerate(self.inbox):
                if msg.cmd is cmd and where(msg.body):
                    return self.inbox.pop(i)
        return None

    def expect(self, cmd: Command, where: Callable[[dict[str, Any]], bool] = lambda b: True,
               timeout: float = 5.0) -> Message:
        msg = wait_until(lambda: self.take(cmd, where), timeout, what=f"the controller's {cmd.value}")
        assert msg is not None
        return msg

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class ControllerProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gymbus.services.controller"],
                env={**os.environ, **env}, stdout=log_file, stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                return self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


@pytest.fixture
def broker(ctx: zmq.Context[Any], gymbus_env: dict[str, str]) -> Iterator[FakeBroker]:
    fake = FakeBroker(ctx, gymbus_env["GYMBUS_BROKER_CONTROLLER"])
    yield fake
    fake.close()


@pytest.fixture
def start(gymbus_env: dict[str, str], tmp_path: Path, ctx: zmq.Context[Any]
          ) -> Iterator[Callable[[], ControllerProcess]]:
    started: list[ControllerProcess] = []

    def launch() -> ControllerProcess:
        proc = ControllerProcess(gymbus_env, tmp_path / "controller.log")
        started.append(proc)
        with Client(gymbus_env["GYMBUS_CONTROLLER"], "controller", ctx=ctx) as probe:
            assert probe.request(Command.PING, timeout=10.0) == {"service": "controller"}
        return proc

    yield launch
    for proc in started:
        proc.stop()
    sys.stderr.write((tmp_path / "controller.log").read_text() if started else "")


@pytest.fixture
def controller(broker: FakeBroker, start: Callable[[], ControllerProcess]) -> ControllerProcess:
    return start()


@pytest.fixture
def cli(ctx: zmq.Context[Any], gymbus_env: dict[str, str]) -> Iterator[Client]:
    with Client(gymbus_env["GYMBUS_CONTROLLER"], "controller", timeout=5.0, ctx=ctx) as client:
        yield client


def submit(cli: Client, config: dict[str, Any] | None = None, key: str = "") -> dict[str, Any]:
    return cli.request(Command.SUBMIT, {"config": config or VALID, "idempotency_key": key})


def get_run(cli: Client, run_id: str) -> dict[str, Any]:
    run: dict[str, Any] = cli.request(Command.GET_RUN, {"run_id": run_id})["run"]
    return run


def run_in_state(cli: Client, run_id: str, state: RunState) -> dict[str, Any]:
    return wait_until(lambda: (run := get_run(cli, run_id))["state"] == state and run,
                      5.0, what=f"run {run_id} to be {state.value}")


def dispatched_run(cli: Client, broker: FakeBroker, worker_id: str = "w1") -> str:
    """Submit a run, announce a worker, and return the run id once it is dispatched there."""
    run_id: str = submit(cli)["run_id"]
    broker.announce(worker_record(worker_id, slots=1))
    broker.expect(Command.DISPATCH, lambda b: b["run_id"] == run_id)
    return run_id


def update(broker: FakeBroker, run_id: str, state: RunState, worker_id: str = "w1",
           **fields: Any) -> None:
    broker.send(Command.RUN_UPDATE, {"run_id": run_id, "worker_id": worker_id,
                                     "state": state.value, **fields})


def test_submit_queues_then_dispatches_to_an_announced_worker(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    reply = submit(cli, {**VALID, "name": "first"})
    run_id = reply["run_id"]
    assert reply["created"] is True
    assert reply["run"]["state"] == RunState.QUEUED and reply["run"]["name"] == "first"
    assert reply["run"]["config"]["episodes"] == 5

    broker.announce(worker_record("w1", slots=2))
    dispatch = broker.expect(Command.DISPATCH)

    assert dispatch.body["run_id"] == run_id and dispatch.body["worker_id"] == "w1"
    assert dispatch.body["config"]["env"] == "FrozenLake-v1"
    run = get_run(cli, run_id)
    assert run["state"] == RunState.DISPATCHED and run["worker_id"] == "w1"
    assert cli.request(Command.LIST_WORKERS)["workers"] == [worker_record("w1", slots=2)]


def test_one_slot_takes_one_run_until_the_worker_frees_it(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    first = submit(cli)["run_id"]
    second = submit(cli)["run_id"]
    broker.announce(worker_record("w1", slots=1))
    broker.expect(Command.DISPATCH, lambda b: b["run_id"] == first)  # oldest first
    broker.announce(worker_record("w1", slots=1, runs=[first]))  # acknowledged: still full
    update(broker, first, RunState.COMPLETED, frames_emitted=3, episodes=5, steps=40)
    run_in_state(cli, first, RunState.COMPLETED)
    assert broker.take(Command.DISPATCH) is None
    assert get_run(cli, second)["state"] == RunState.QUEUED

    broker.announce(worker_record("w1", slots=1))  # the slot is free again
    broker.expect(Command.DISPATCH, lambda b: b["run_id"] == second)


def test_a_running_update_before_the_worker_view_keeps_the_slot_taken(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    """The run reports running before the broker's next `workers` shows it: still no free slot."""
    first = submit(cli)["run_id"]
    second = submit(cli)["run_id"]
    broker.announce(worker_record("w1", slots=1))
    broker.expect(Command.DISPATCH, lambda b: b["run_id"] == first)
    update(broker, first, RunState.RUNNING)  # the view still says busy 0, runs []
    run_in_state(cli, first, RunState.RUNNING)
    hellos = broker.hellos
    wait_until(lambda: broker.hellos >= hellos + 3, 5.0, "three more controller loop passes")
    assert broker.take(Command.DISPATCH) is None
    assert get_run(cli, second)["state"] == RunState.QUEUED

    broker.announce(worker_record("w1", slots=1, runs=[first]))
    update(broker, first, RunState.COMPLETED, frames_emitted=3, episodes=5, steps=40)
    broker.announce(worker_record("w1", slots=1))
    broker.expect(Command.DISPATCH, lambda b: b["run_id"] == second)


@pytest.mark.parametrize(("config", "field"), [
    ({**VALID, "env": "NoSuchEnv-v0"}, "env"),
    ({**VALID, "episodes": -3}, "episodes"),
    ({**VALID, "bogus": 1}, "bogus"),
    ({**VALID, "seed": "one"}, "seed"),
    ({**VALID, "agent": {"gamma": 3.0}}, "agent.gamma"),
    ("not a table", "config"),
], ids=["unknown-env", "negative-episodes", "unknown-field", "wrong-type", "bad-param", "not-a-map"])
def test_invalid_configs_are_refused_and_nothing_is_stored(
    controller: ControllerProcess, broker: FakeBroker, cli: Client, config: Any, field: str
) -> None:
    with pytest.raises(RemoteError) as info:
        cli.request(Command.SUBMIT, {"config": config, "idempotency_key": "k"})

    assert info.value.code is ErrorCode.INVALID_CONFIG
    assert info.value.field == field
    assert field in str(info.value)
    assert cli.request(Command.LIST_RUNS) == {"runs": []}


def test_idempotent_submit_makes_one_run(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    first = submit(cli, key="retry-me")
    again = submit(cli, key="retry-me")

    assert first["created"] is True and again["created"] is False
    assert again["run_id"] == first["run_id"] and again["run"] == first["run"]
    assert [r["run_id"] for r in cli.request(Command.LIST_RUNS)["runs"]] == [first["run_id"]]


def test_run_updates_move_the_run_to_running_then_completed(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    run_id = dispatched_run(cli, broker)

    update(broker, run_id, RunState.RUNNING)
    running = run_in_state(cli, run_id, RunState.RUNNING)
    assert running["started_ns"] is not None and running["ended_ns"] is None

    update(broker, run_id, RunState.COMPLETED, reason=None, frames_emitted=17, episodes=5, steps=60)
    done = run_in_state(cli, run_id, RunState.COMPLETED)
    assert (done["frames_emitted"], done["episodes"], done["steps"]) == (17, 5, 60)
    assert done["ended_ns"] >= running["started_ns"]

    update(broker, run_id, RunState.FAILED, reason="late")  # terminal runs never change
    broker.send(Command.WORKERS, {"workers": []})
    wait_until(lambda: "ignoring failed" in controller.log(), 5.0, what="the late update logged")
    assert get_run(cli, run_id)["state"] == RunState.COMPLETED


def test_failed_run_keeps_its_reason(controller: ControllerProcess, broker: FakeBroker,
                                     cli: Client) -> None:
    run_id = dispatched_run(cli, broker)
    update(broker, run_id, RunState.FAILED, reason="ValueError: boom", frames_emitted=2)
    failed = run_in_state(cli, run_id, RunState.FAILED)
    assert failed["reason"] == "ValueError: boom" and failed["frames_emitted"] == 2


def test_dispatch_failed_requeues_and_retries_once_the_worker_heartbeats(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    run_id = dispatched_run(cli, broker)

    broker.send(Command.DISPATCH_FAILED, {"run_id": run_id, "worker_id": "w1", "reason": "full"})

    run_in_state(cli, run_id, RunState.QUEUED)
    hellos = broker.hellos
    wait_until(lambda: broker.hellos >= hellos + 2, 5.0, what="two more views of the same heartbeat")
    assert broker.take(Command.DISPATCH) is None  # w1 has not heartbeated since it refused
    broker.announce({**worker_record("w1", slots=1), "last_heartbeat_ns": 2})
    again = broker.expect(Command.DISPATCH, lambda b: b["run_id"] == run_id)
    assert again.body["worker_id"] == "w1"
    assert "dispatch of run" in controller.log() and "full" in controller.log()


def test_cancel_of_a_run_whose_dispatch_then_fails_ends_it(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    run_id = dispatched_run(cli, broker)
    assert cli.request(Command.CANCEL, {"run_id": run_id})["run"]["state"] == RunState.DISPATCHED
    broker.expect(Command.CANCEL)

    broker.send(Command.DISPATCH_FAILED, {"run_id": run_id, "worker_id": "w1", "reason": "gone"})

    assert run_in_state(cli, run_id, RunState.CANCELLED)["reason"] == "cancelled before it started"


def test_worker_lost_makes_its_runs_lost(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    run_id = dispatched_run(cli, broker)
    update(broker, run_id, RunState.RUNNING)
    run_in_state(cli, run_id, RunState.RUNNING)

    broker.send(Command.WORKER_LOST, {"worker_id": "w1", "runs": [run_id]})

    lost = run_in_state(cli, run_id, RunState.LOST)
    assert lost["reason"] == "worker w1 stopped answering heartbeats"
    assert lost["ended_ns"] is not None


def test_a_worker_back_with_a_lost_run_is_told_to_stop_it(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    """The run was dispatched just before its worker fell silent, so the broker's record of the
    worker held none of its runs: the controller, which lost the run, stops it when the worker
    lists it again (a lost run has stopped), and the run stays lost."""
    run_id = dispatched_run(cli, broker)
    update(broker, run_id, RunState.RUNNING)
    run_in_state(cli, run_id, RunState.RUNNING)
    broker.send(Command.WORKER_LOST, {"worker_id": "w1", "runs": []})
    run_in_state(cli, run_id, RunState.LOST)

    broker.announce(worker_record("w1", runs=[run_id]))  # back, and holding it

    cancel = broker.expect(Command.CANCEL, lambda b: b["run_id"] == run_id)
    assert cancel.body["worker_id"] == "w1"
    update(broker, run_id, RunState.CANCELLED)  # the worker stops it
    broker.announce(worker_record("w1"))
    assert get_run(cli, run_id)["state"] == RunState.LOST


def test_a_worker_absent_from_the_view_loses_its_runs(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    run_id = dispatched_run(cli, broker)
    update(broker, run_id, RunState.RUNNING)
    run_in_state(cli, run_id, RunState.RUNNING)

    broker.announce()  # w1 is missing from every view from now on (no worker_lost)

    lost = run_in_state(cli, run_id, RunState.LOST)
    assert "absent" in lost["reason"]


def test_cancel_a_queued_run_and_errors(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    run_id = submit(cli)["run_id"]

    cancelled = cli.request(Command.CANCEL, {"run_id": run_id})["run"]
    assert cancelled["state"] == RunState.CANCELLED
    assert get_run(cli, run_id)["state"] == RunState.CANCELLED

    with pytest.raises(RemoteError) as again:
        cli.request(Command.CANCEL, {"run_id": run_id})
    assert again.value.code is ErrorCode.NOT_CANCELLABLE and "cancelled" in str(again.value)
    with pytest.raises(RemoteError) as unknown:
        cli.request(Command.CANCEL, {"run_id": "01NOSUCHRUN"})
    assert unknown.value.code is ErrorCode.UNKNOWN_RUN
    with pytest.raises(RemoteError) as bad:
        cli.request(Command.GET_RUN, {"run_id": 5})
    assert bad.value.code is ErrorCode.BAD_REQUEST


def test_cancel_a_running_run_goes_to_its_worker(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    run_id = dispatched_run(cli, broker)
    update(broker, run_id, RunState.RUNNING)
    run_in_state(cli, run_id, RunState.RUNNING)

    reply = cli.request(Command.CANCEL, {"run_id": run_id})

    assert reply["run"]["state"] == RunState.RUNNING
    assert broker.expect(Command.CANCEL).body == {"run_id": run_id, "worker_id": "w1"}
    update(broker, run_id, RunState.CANCELLED, reason="cancelled", frames_emitted=4)
    assert run_in_state(cli, run_id, RunState.CANCELLED)["frames_emitted"] == 4


def test_cancel_when_the_worker_vanished_answers_worker_gone_quickly(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    run_id = dispatched_run(cli, broker)
    update(broker, run_id, RunState.RUNNING)
    run_in_state(cli, run_id, RunState.RUNNING)
    broker.announce()
    wait_until(lambda: cli.request(Command.LIST_WORKERS)["workers"] == [], 5.0, what="empty view")

    started = time.monotonic()
    with pytest.raises(RemoteError) as info:
        cli.request(Command.CANCEL, {"run_id": run_id})

    assert info.value.code is ErrorCode.WORKER_GONE
    assert time.monotonic() - started < 1.0
    assert broker.take(Command.CANCEL) is None


def test_restart_keeps_the_queued_run(
    broker: FakeBroker, start: Callable[[], ControllerProcess], cli: Client
) -> None:
    first = start()
    queued = submit(cli, key="k1")
    assert first.stop() == 143  # stopped by SIGTERM

    start()

    assert get_run(cli, queued["run_id"]) == queued["run"]
    assert submit(cli, key="k1")["created"] is False
    broker.announce(worker_record("w1"))
    broker.expect(Command.DISPATCH, lambda b: b["run_id"] == queued["run_id"])


def test_a_silent_broker_is_reconnected(
    controller: ControllerProcess, broker: FakeBroker, cli: Client
) -> None:
    broker.announce(worker_record("w1"))
    wait_until(lambda: cli.request(Command.LIST_WORKERS)["workers"], 5.0, what="w1 listed")
    broker.silent = True
    wait_until(lambda: "reconnecting" in controller.log(), 5.0, what="the controller to reconnect")
    assert cli.request(Command.LIST_WORKERS) == {"workers": []}  # no view while it is silent
    broker.silent = False
    wait_until(lambda: "the broker answers again" in controller.log(), 5.0,
               what="the controller to hear the broker on its new connection")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_it_within_5_s(controller: ControllerProcess, signum: int, code: int) -> None:
    started = time.monotonic()
    assert controller.stop(signum) == code
    assert time.monotonic() - started < 5


# --- validation off the loop thread ---------------------------------------------------------------

BLOCKING_ENV = "GymbusTest/Blocking-v0"


class BlockingEnv(gymnasium.Env[int, int]):
    """A toy-text-shaped environment whose construction waits for `release`: a slow gym.make."""

    observation_space = spaces.Discrete(4)
    action_space = spaces.Discrete(2)

    def __init__(self, entered: threading.Event, release: threading.Event) -> None:
        entered.set()
        if not release.wait(30):
            raise RuntimeError("the test never released the environment")


@pytest.fixture
def blocking_env() -> Iterator[tuple[threading.Event, threading.Event]]:
    """BLOCKING_ENV registered in this process: (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    gymnasium.register(BLOCKING_ENV, entry_point=lambda: BlockingEnv(entered, release))
    yield entered, release
    release.set()
    del gymnasium.envs.registry[BLOCKING_ENV]


@pytest.fixture
def controller_thread(broker: FakeBroker, gymbus_settings: Settings) -> Iterator[None]:
    """The real controller in this process (so that it sees BLOCKING_ENV), built, served and
    closed on a thread of its own: its loop thread."""
    stop = StopFlag()
    built = threading.Event()

    def run() -> None:
        controller = Controller(gymbus_settings)
        built.set()
        try:
            controller.serve(stop)
        finally:
            controller.close()

    loop = threading.Thread(target=run, name="controller-loop")
    loop.start()
    assert built.wait(10), "the controller was not built"
    yield
    stop.set()
    loop.join(5)
    assert not loop.is_alive(), "the controller's loop did not stop"


def test_a_slow_validation_holds_up_no_other_request(
    controller_thread: None, broker: FakeBroker, cli: Client, blocking_env: Any,
    gymbus_env: dict[str, str], ctx: zmq.Context[Any],
) -> None:
    entered, release = blocking_env
    replies: queue.Queue[dict[str, Any] | Exception] = queue.Queue()

    def submit_slow() -> None:
        with Client(gymbus_env["GYMBUS_CONTROLLER"], "controller", timeout=20.0, ctx=ctx) as slow:
            try:
                replies.put(submit(slow, {**VALID, "env": BLOCKING_ENV, "name": "slow"}))
            except Exception as exc:  # noqa: BLE001 - handed to the test thread
                replies.put(exc)

    threading.Thread(target=submit_slow, name="slow-submit", daemon=True).start()
    assert entered.wait(10), "the slow submission's environment was never built"

    assert cli.request(Command.PING, timeout=2.0) == {"service": "controller"}
    assert cli.request(Command.LIST_RUNS, timeout=2.0) == {"runs": []}
    fast = submit(cli)  # checked and stored while the slow one is still being built
    assert fast["created"] is True
    hellos = broker.hellos
    wait_until(lambda: broker.hellos >= hellos + 2, 5.0, what="the loop to go on saying hello")
    assert replies.empty() and not release.is_set()
    listed = cli.request(Command.LIST_RUNS)["runs"]
    assert [run["run_id"] for run in listed] == [fast["run_id"]]

    release.set()
    slow = replies.get(timeout=10)
    assert not isinstance(slow, Exception), slow
    assert slow["created"] is True and slow["run"]["name"] == "slow"
    assert slow["run"]["config"]["env"] == BLOCKING_ENV and slow["run"]["state"] == RunState.QUEUED
    assert get_run(cli, slow["run_id"]) == slow["run"]


#: the real controller's main, with an environment whose construction never ends registered
STUCK_CONTROLLER = """
import sys
import threading
from pathlib import Path

import gymnasium
from gymnasium import spaces

from gymbus.services.controller.service import main


class Stuck(gymnasium.Env):
    observation_space = spaces.Discrete(4)
    action_space = spaces.Discrete(2)

    def __init__(self):
        Path(sys.argv[1]).touch()
        threading.Event().wait(60)  # nothing sets it: the check is in flight at SIGTERM


gymnasium.register("GymbusTest/Stuck-v0", entry_point=Stuck)
sys.exit(main([]))
"""


def test_sigterm_stops_it_while_a_validation_is_stuck(
    broker: FakeBroker, gymbus_env: dict[str, str], tmp_path: Path, ctx: zmq.Context[Any],
    cli: Client,
) -> None:
    entered = tmp_path / "entered"
    log_path = tmp_path / "stuck-controller.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", STUCK_CONTROLLER, str(entered)],
            env={**os.environ, **gymbus_env}, stdout=log_file, stderr=subprocess.STDOUT,
        )
    stuck = ctx.socket(zmq.DEALER)
    stuck.setsockopt(zmq.LINGER, 0)
    stuck.connect(gymbus_env["GYMBUS_CONTROLLER"])
    try:
        config = {**VALID, "env": "GymbusTest/Stuck-v0"}
        stuck.send(encode_message(Command.SUBMIT, {"config": config, "idempotency_key": ""}, 1))
        wait_until(entered.exists, 30.0, what="the stuck environment's construction")
        assert cli.request(Command.PING) == {"service": "controller"}

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)
        assert time.monotonic() - started < 5
        log = log_path.read_text()
        assert "1 submission(s) still being validated" in log and "controller stopped" in log
        assert not stuck.poll(0, zmq.POLLIN)  # it was never answered
    finally:
        stuck.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sys.stderr.write(log_path.read_text())


def test_with_the_real_broker_a_run_reaches_a_worker_and_completes(
    ctx: zmq.Context[Any], gymbus_env: dict[str, str], tmp_path: Path,
    start: Callable[[], ControllerProcess], cli: Client,
) -> None:
    with (tmp_path / "broker.log").open("wb") as log_file:
        broker_proc = subprocess.Popen(
            [sys.executable, "-m", "gymbus.services.broker"],
            env={**os.environ, **gymbus_env}, stdout=log_file, stderr=subprocess.STDOUT,
        )
    worker = ctx.socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.setsockopt(zmq.IDENTITY, b"w1")
    worker.connect(gymbus_env["GYMBUS_BROKER_WORKERS"])
    runs: list[str] = []

    def beat() -> None:
        worker.send(encode_message(Command.HEARTBEAT, {"busy": len(runs), "runs": runs}))

    def received(cmd: Command) -> Message | None:
        beat()
        while worker.poll(0, zmq.POLLIN):
            msg = decode_message(worker.recv())
            if msg.cmd is cmd:
                return msg
        return None

    try:
        start()
        worker.send(encode_message(Command.READY, {"worker_id": "w1", "host": "h", "pid": 1,
                                                   "slots": 1, "runs": []}))
        wait_until(lambda: cli.request(Command.LIST_WORKERS)["workers"], 10.0, what="w1 listed")
        run_id = submit(cli)["run_id"]

        job = wait_until(lambda: received(Command.RUN), 5.0, what="the run at the worker")
        assert job is not None and job.body["run_id"] == run_id and job.body["config"]["env"] == "FrozenLake-v1"
        runs.append(run_id)
        worker.send(encode_message(Command.RUN_UPDATE, {"run_id": run_id, "state": "running"}))
        assert run_in_state(cli, run_id, RunState.RUNNING)["worker_id"] == "w1"
        worker.send(encode_message(Command.RUN_UPDATE, {
            "run_id": run_id, "state": "completed", "reason": None, "frames_emitted": 9,
            "episodes": 5, "steps": 50}))
        assert run_in_state(cli, run_id, RunState.COMPLETED)["frames_emitted"] == 9
    finally:
        broker_proc.terminate()
        assert broker_proc.wait(5) == 143  # stopped by SIGTERM
