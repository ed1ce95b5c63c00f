"""Fault tests, "no frame lost, no run stuck", with real processes on loopback.

Each test injects one fault into a running stack and asserts the pass criterion: every
frame a run emitted is stored exactly once (the spools repair what the fault cost), and no run
stays `running`. Measured numbers are printed as `MEASURED ...` lines (`pytest -s` shows them).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import msgpack
import pytest
import zmq
from conftest import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    STACK_ENV,
    free_endpoint,
    gymbus_cli,
    make_stack,
    wait_until,
)
from test_integration import child_pids

from gymbus.services.stack.launcher import Stack
from gymbus.shared.errors import RemoteError, ServiceUnavailable
from gymbus.shared.protocol import Command, RunState
from gymbus.shared.transport import Client
from gymbus.worker.telemetry import spool
from gymbus.worker.telemetry.spool import SpoolReader

pytestmark = pytest.mark.integration

INTERVAL, LIVENESS = HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS  # the stack's, from STACK_ENV
LONG = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 10_000_000, "seed": 1}
ACTIVE = {RunState.QUEUED.value, RunState.DISPATCHED.value, RunState.RUNNING.value}


class Bus:
    """Clients to a stack's controller and ingest; both survive a restart of their service."""

    def __init__(self, stack: Stack) -> None:
        s = stack.settings
        self.settings = s
        self.controller = Client(s.controller, "controller", timeout=5.0)
        self.ingest = Client(s.ingest, "ingest", timeout=5.0)

    def submit(self, **config: Any) -> str:
        reply = self.controller.request(Command.SUBMIT, {"config": config, "idempotency_key": ""})
        return str(reply["run_id"])

    def run(self, run_id: str) -> dict[str, Any]:
        return self.controller.request(Command.GET_RUN, {"run_id": run_id})["run"]  # type: ignore[no-any-return]

    def state(self, run_id: str) -> str:
        return str(self.run(run_id)["state"])

    def cancel(self, run_id: str) -> None:
        self.controller.request(Command.CANCEL, {"run_id": run_id})

    def stats(self, run_id: str) -> dict[str, Any]:
        """The ingest's RunStats, {} while the ingest is down or holds nothing of the run."""
        try:
            runs = self.ingest.request(Command.RUN_STATS, {"run_id": run_id}, timeout=1.0)["runs"]
        except (ServiceUnavailable, RemoteError):
            return {}
        return runs[0]  # type: ignore[no-any-return]

    def sql(self, sql: str) -> list[list[Any]]:
        return self.ingest.request(Command.QUERY, {"sql": sql})["rows"]  # type: ignore[no-any-return]

    def spooled(self, run_id: str) -> int:
        """Frames in the run's spool (0 once it is removed)."""
        return SpoolReader(spool.spool_path(self.settings.run_dir(run_id))).refresh()

    def close(self) -> None:
        self.controller.close()
        self.ingest.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = make_stack(tmp_path / "home", **STACK_ENV)
    try:
        yield s
    finally:
        s.stop()
        for pid in run_children(s):  # a run process whose worker was killed
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def bus(stack: Stack) -> Iterator[Bus]:
    b = Bus(stack)
    yield b
    b.close()


def run_children(stack: Stack) -> list[int]:
    runs = stack.settings.runs_dir
    return [pid for run_dir in (runs.iterdir() if runs.is_dir() else [])
            for pid in child_pids(run_dir.name)]


def kill9(stack: Stack, role: str) -> None:
    svc = stack.services.pop(role)
    svc.process.kill()
    svc.process.wait(10)
    svc.log_file.close()


def restart(stack: Stack, role: str) -> float:
    """Start a role again and wait until it answers; returns when it was started (monotonic)."""
    started = time.monotonic()
    stack.start_one(role)
    if role in ("ingest", "controller"):
        stack.wait_ready((role,), 30)
    return started


def gymbus(stack: Stack, *args: str) -> str:
    """The real `gymbus` command's output (it must exit 0)."""
    result = gymbus_cli(stack.process_env(), *args, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def steps_stored(bus: Bus, run_id: str) -> int:
    return int(bus.stats(run_id).get("steps") or 0)


def assert_stored_exactly_once(bus: Bus, run_id: str, steps: int | None = None) -> dict[str, Any]:
    """The criterion: step rows = steps emitted, none twice, every seq exactly once."""
    stats = wait_until(lambda: (st := bus.stats(run_id)).get("complete") and st, 30,
                       f"run {run_id} complete in the ingest")
    emitted = stats["frames_emitted"]
    rows, distinct = bus.sql(f"SELECT count(*), (SELECT count(*) FROM (SELECT DISTINCT run_id, "
                             f"episode, step FROM steps WHERE run_id = '{run_id}')) FROM steps "
                             f"WHERE run_id = '{run_id}'")[0]
    n, d, lo, hi = bus.sql(f"SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM frames "
                           f"WHERE run_id = '{run_id}'")[0]
    assert (n, d, lo, hi) == (emitted, emitted, 0, emitted - 1)
    assert rows == distinct == stats["steps"]
    if steps is not None:
        assert rows == steps
    assert stats["gaps"] == 0 and stats["frames_stored"] == emitted
    print(f"\n  run {run_id}: {emitted} frames emitted and stored, {rows} steps, "
          f"{stats['duplicates']} duplicates dropped")
    wait_until(lambda: spool.is_confirmed(bus.settings.run_dir(run_id)), 10, "spool confirmed")
    return stats  # type: ignore[no-any-return]


def result_steps(bus: Bus, run_id: str) -> int:
    return int(json.loads((bus.settings.run_dir(run_id) / "result.json").read_text())["steps"])


# --- 1: the ingest killed mid-run -------------------------------------------------------------


def test_1_ingest_killed_mid_run_loses_nothing(stack: Stack, bus: Bus) -> None:
    stack.start()
    run_id = bus.submit(**LONG)
    wait_until(lambda: steps_stored(bus, run_id) > 0, 20, "the first steps stored")
    kill9(stack, "ingest")
    at_kill = bus.spooled(run_id)
    wait_until(lambda: bus.spooled(run_id) > at_kill + 10, 10, "frames sent while it is down")
    started = restart(stack, "ingest")
    ready = time.monotonic()
    at_restart = bus.spooled(run_id)

    def recovered() -> bool:
        st = bus.stats(run_id)
        return bool(st) and st["last_seq"] >= at_restart and st["gaps"] == 0 and \
            st["frames_stored"] == st["last_seq"] + 1
    wait_until(recovered, 30, "every frame up to the restart stored")
    repaired = time.monotonic()
    bus.cancel(run_id)
    wait_until(lambda: bus.state(run_id) == RunState.CANCELLED.value, 10, "the run to end")
    stats = assert_stored_exactly_once(bus, run_id, result_steps(bus, run_id))
    gaps = bus.sql(f"SELECT count(*) FROM gaps WHERE run_id = '{run_id}' AND filled_at IS NULL")
    assert gaps == [[0]]
    print(f"\nMEASURED test 1: {at_restart - at_kill} frames sent while the ingest was down, "
          f"{stats['frames_emitted']} emitted, 0 lost; recovered {repaired - started:.2f} s after "
          f"the restart ({repaired - ready:.2f} s after it answered)")


# --- 2: a worker killed, the broker restarted -------------------------------------------------


def test_2_killed_worker_makes_its_run_lost_and_a_new_worker_repairs_it(
        stack: Stack, bus: Bus) -> None:
    """Extends test_integration's killed-worker test: then a new worker repairs its telemetry."""
    stack.start()
    run_id = bus.submit(**LONG)
    wait_until(lambda: bus.state(run_id) == RunState.RUNNING.value and steps_stored(bus, run_id),
               20, "the run to be running")
    assert child_pids(run_id)
    kill9(stack, "worker")  # its run child dies with it (worker/orphans.py)
    killed = time.monotonic()
    wait_until(lambda: bus.state(run_id) == RunState.LOST.value, 10, "the run to become lost")
    assert child_pids(run_id) == []  # no orphan: the run process is gone once the run is lost
    detected = time.monotonic() - killed
    window = INTERVAL * LIVENESS
    assert detected < window + 4 * INTERVAL  # the liveness window, give or take the polling
    runs = bus.controller.request(Command.LIST_RUNS)["runs"]
    assert not [r["run_id"] for r in runs if r["state"] in ACTIVE]
    spooled = bus.spooled(run_id)
    restart(stack, "worker")  # finds the run's spool, unconfirmed
    stats = assert_stored_exactly_once(bus, run_id)
    assert stats["frames_emitted"] == spooled  # the spool holds all it sent: none lost
    text = gymbus(stack, "status", run_id)
    assert re.search(r"stored\s+complete", text), text  # `gymbus status` says so
    record = json.loads(gymbus(stack, "status", run_id, "--json"))
    assert (record["status"], record["complete"], record["gaps"]) == ("lost", True, 0)
    assert record["frames_emitted"] == record["frames_stored"] == spooled
    print(f"\nMEASURED test 2: lost worker detected in {detected:.2f} s (window {window:.2f} s); "
          f"its run's {spooled} frames all stored after a new worker started")


def test_2b_broker_restart_keeps_the_queue_and_the_running_runs_telemetry(
        stack: Stack, bus: Bus) -> None:
    stack.env["GYMBUS_WORKER_SLOTS"] = "1"
    stack.start()
    first = bus.submit(env="FrozenLake-v1", algo="q-learning", episodes=8000, seed=2)
    wait_until(lambda: steps_stored(bus, first) > 0, 20, "the first run's steps")
    queued = bus.submit(env="FrozenLake-v1", algo="q-learning", episodes=300, seed=3)
    assert bus.state(queued) == RunState.QUEUED.value
    kill9(stack, "broker")
    at_kill = bus.spooled(first)
    wait_until(lambda: bus.spooled(first) > at_kill + 5, 10, "frames sent while it is down")
    down = bus.spooled(first) - at_kill
    restart(stack, "broker")
    for run_id in (first, queued):
        wait_until(lambda r=run_id: bus.state(r) not in ACTIVE, 60, f"run {run_id} to end")
        assert bus.state(run_id) == RunState.COMPLETED.value, bus.run(run_id)
        stats = assert_stored_exactly_once(bus, run_id, result_steps(bus, run_id))
    print(f"\nMEASURED test 2b: the broker was down for {down}+ frames of a running run; it "
          f"completed and all its frames are stored; the queued run ran after "
          f"({stats['duplicates']} duplicates dropped)")


# --- 3: the slow joiner -----------------------------------------------------------------------


def test_3_a_run_started_before_the_ingest_loses_nothing(stack: Stack, bus: Bus) -> None:
    stack.start(("broker", "controller", "worker"))
    run_id = bus.submit(env="FrozenLake-v1", algo="q-learning", episodes=3000, seed=4)
    # the run waits for a subscriber, then publishes into the void
    wait_until(lambda: bus.spooled(run_id) > 5, 20, "the run to publish with no ingest")
    restart(stack, "ingest")
    wait_until(lambda: bus.state(run_id) not in ACTIVE, 30, "the run to end")
    assert bus.state(run_id) == RunState.COMPLETED.value, bus.run(run_id)
    assert_stored_exactly_once(bus, run_id, result_steps(bus, run_id))


# --- 4: a range of frames dropped on purpose --------------------------------------------------


class DroppingProxy:
    """XSUB -> XPUB forwarder between run processes and the broker that drops the first copy of
    seqs `first`..`last` (replays of them pass). Subscriptions flow upstream untouched."""

    def __init__(self, ctx: zmq.Context[Any], upstream: str, first: int, last: int) -> None:
        self.endpoint = free_endpoint()
        self.first, self.last = first, last
        self.dropped: set[tuple[str, int]] = set()
        self.xsub = ctx.socket(zmq.XSUB)
        self.xsub.setsockopt(zmq.LINGER, 0)
        self.xsub.bind(self.endpoint)
        self.xpub = ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.LINGER, 0)
        self.xpub.connect(upstream)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.xsub, zmq.POLLIN)
        poller.register(self.xpub, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(20))
            if self.xpub in ready:
                self.xsub.send(self.xpub.recv())  # a subscription, on its way to the publishers
            if self.xsub in ready:
                parts = self.xsub.recv_multipart()
                head = msgpack.unpackb(parts[1])
                key = (head["run_id"], head["seq"])
                if self.first <= key[1] <= self.last and key not in self.dropped:
                    self.dropped.add(key)
                    continue
                self.xpub.send_multipart(parts)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.xsub.close()
        self.xpub.close()


def test_4_a_dropped_range_is_recorded_as_a_gap_then_repaired(stack: Stack, bus: Bus) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    proxy = DroppingProxy(ctx, stack.settings.telemetry_in, 5, 14)
    try:
        stack.start(("ingest", "broker", "controller"))
        stack.start_one("worker", {"GYMBUS_TELEMETRY_IN": proxy.endpoint})
        stack.wait_ready(("controller", "worker"), 30)
        run_id = bus.submit(env="FrozenLake-v1", algo="q-learning", episodes=4000, seed=5)
        wait_until(lambda: bus.state(run_id) not in ACTIVE, 30, "the run to end")
        assert_stored_exactly_once(bus, run_id, result_steps(bus, run_id))
        assert proxy.dropped == {(run_id, seq) for seq in range(5, 15)}
        gaps = bus.sql(f"SELECT first_seq, last_seq, filled_at >= detected_at FROM gaps "
                       f"WHERE run_id = '{run_id}'")
        assert gaps == [[5, 14, True]]
    finally:
        proxy.close()
        ctx.destroy(linger=0)


# --- 6: SIGTERM to honcho ---------------------------------------------------------------------


def start_honcho(stack: Stack, folder: Path, log: Path) -> subprocess.Popen[bytes]:
    procfile = folder / "Procfile"
    procfile.write_text("".join(f"{role}: exec python -m {module}\n" for role, module in (
        ("ingest", "gymbus.services.ingest"), ("broker", "gymbus.services.broker"),
        ("controller", "gymbus.services.controller"), ("worker", "gymbus.worker"))))
    venv_bin = str(Path(sys.executable).parent)
    env = stack.process_env({"PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")})
    with open(log, "ab") as out:
        return subprocess.Popen([os.path.join(venv_bin, "honcho"), "start", "-f", str(procfile),
                                 "-d", str(folder)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def service_pids(log: Path) -> dict[str, int]:
    """role -> pid, from honcho's `<role>.1 started (pid=N)` lines (the latest start)."""
    return {m[1]: int(m[2]) for m in re.finditer(r"(\w+)\.1 started \(pid=(\d+)\)",
                                                 log.read_text(errors="replace"))}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_6_sigterm_to_honcho_stops_every_service_cleanly(stack: Stack, bus: Bus,
                                                         tmp_path: Path) -> None:
    log = tmp_path / "honcho.log"
    honcho = start_honcho(stack, tmp_path, log)
    try:
        stack.wait_ready(("ingest", "controller", "worker"), 30)
        run_id = bus.submit(**LONG)
        wait_until(lambda: steps_stored(bus, run_id) > 0, 20, "the run's first steps")
        pids = wait_until(lambda: len(p := service_pids(log)) == 4 and p, 10, "four pids")
        honcho.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        exited: dict[str, float] = {}
        while len(exited) < 4 and time.monotonic() - signalled < 8:
            for role, pid in pids.items():
                if role not in exited and not alive(pid):
                    exited[role] = time.monotonic() - signalled
            time.sleep(0.02)  # poll interval, bounded by the 8 s above
        honcho.wait(10)
        text = log.read_text(errors="replace")
        assert "SIGKILL" not in text, text[-3000:]
        assert set(exited) == set(pids) and max(exited.values()) < 5.0, exited
        assert all(f"{role}.1 stopped (rc=143)" in text for role in pids), text[-3000:]
        db = stack.settings.db_path
        wal = db.with_name(db.name + ".wal")
        assert not wal.exists() or wal.stat().st_size == 0  # checkpointed at stop
        with duckdb.connect(str(db), read_only=True) as conn:
            assert conn.execute("SELECT count(*) FROM frames").fetchone()[0] > 0  # type: ignore[index]
        # everything up again: the run's frames (cancelled by the stop) are all there
        honcho = start_honcho(stack, tmp_path, log)
        stack.wait_ready(("ingest", "controller", "worker"), 30)
        stats = assert_stored_exactly_once(bus, run_id, result_steps(bus, run_id))
        assert stats["status"] == RunState.CANCELLED.value
        wait_until(lambda: bus.state(run_id) not in ACTIVE, 10, "the run to end in the controller")
        print(f"\nMEASURED test 6: exit times after SIGTERM {', '.join(f'{r} {t:.2f} s' for r, t in sorted(exited.items()))}")
    finally:
        if honcho.poll() is None:
            honcho.send_signal(signal.SIGTERM)
            try:
                honcho.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(honcho.pid, signal.SIGKILL)
                honcho.wait()
        for pid in service_pids(log).values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- 8: the DuckDB WAL damaged while the ingest is down ---------------------------------------


def refused_damage(db: Path, wal: Path, scratch: Path) -> int:
    """Where 256 bytes of 0xff make a WAL that DuckDB refuses to replay: tried on copies of the
    file and its WAL. Not every place does: where the bytes fall on an entry's header, DuckDB
    takes the log as cut there and replays it up to that point, silently (the truncate case)."""
    size = wal.stat().st_size
    for tenth in (5, 4, 6, 3, 7, 2, 8):
        at = size * tenth // 10
        probe = scratch / f"probe-{tenth}"
        probe.mkdir()
        copy = probe / db.name
        copy.write_bytes(db.read_bytes())
        damaged = bytearray(wal.read_bytes())
        damaged[at:at + 256] = b"\xff" * 256
        copy.with_name(wal.name).write_bytes(bytes(damaged))
        try:
            duckdb.connect(str(copy)).close()
        except duckdb.Error as exc:
            if "WAL" in str(exc):
                return at
    raise AssertionError(f"DuckDB replayed the WAL ({size} bytes) damaged at every place tried")


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_8_a_damaged_wal_is_reported_loudly_and_the_spools_refill(stack: Stack, bus: Bus,
                                                                  damage: str,
                                                                  tmp_path: Path) -> None:
    stack.start()
    run_id = bus.submit(**LONG)
    wal = stack.settings.db_path.with_name(stack.settings.db_path.name + ".wal")
    wait_until(lambda: steps_stored(bus, run_id) > 0 and wal.exists() and wal.stat().st_size > 4096,
               20, "steps stored and held in the WAL")
    kill9(stack, "ingest")  # no checkpoint: what was stored since the last one is in the WAL only
    size = wal.stat().st_size
    if damage == "corrupt":  # DuckDB refuses such a WAL
        at = refused_damage(stack.settings.db_path, wal, tmp_path)
        with open(wal, "r+b") as f:
            f.seek(at)
            f.write(b"\xff" * 256)
    else:  # DuckDB replays such a WAL up to the cut, silently
        os.truncate(wal, size // 2)
    restart(stack, "ingest")
    text = stack.services["ingest"].log_path.read_text(errors="replace")
    if damage == "corrupt":
        assert re.search(r" ERROR DuckDB could not replay the write-ahead log .* MOVED IT ASIDE",
                         text)
        assert list(wal.parent.glob(wal.name + ".corrupt-*"))
    else:
        assert re.search(r" WARNING .*\.wal \(\d+ bytes\) was left by an ingest that did not "
                         r"stop cleanly; replayed it", text)
    # the frames the run had spooled by now include every one the damaged WAL lost; the run goes
    # on spooling new ones, so the target is read once (a moving target is never reached)
    spooled_before = bus.spooled(run_id)
    assert spooled_before > 0

    def refilled() -> bool:
        s = bus.stats(run_id)
        return bool(s) and s["gaps"] == 0 and s["frames_stored"] == s["last_seq"] + 1 \
            and s["frames_stored"] >= spooled_before

    wait_until(refilled, 90, "the spool to refill the lost frames")
    # the damage did cost frames, and the gap they left was recorded and then filled
    filled = bus.sql(f"SELECT count(*) FROM gaps WHERE run_id = '{run_id}' "
                     "AND filled_at IS NOT NULL")
    assert filled[0][0] >= 1
    bus.cancel(run_id)
    wait_until(lambda: bus.state(run_id) == RunState.CANCELLED.value, 10, "the run to end")
    assert_stored_exactly_once(bus, run_id, result_steps(bus, run_id))


def test_8b_a_damaged_database_file_stops_the_ingest_and_changes_nothing(
        stack: Stack, tmp_path: Path) -> None:
    db = stack.settings.db_path
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"not a database" * 1000)
    stack.start_one("ingest")
    code = stack.services["ingest"].process.wait(30)
    text = stack.services["ingest"].log_path.read_text(errors="replace")
    assert code == 1 and "Nothing was changed" in text and "file itself is damaged" in text
    assert db.read_bytes() == b"not a database" * 1000
