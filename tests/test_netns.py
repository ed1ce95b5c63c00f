"""Hosts on a real network: Linux network namespaces joined by veth pairs, CURVE on every socket.

Broker, controller and ingest run in one namespace (binding 0.0.0.0, which the loopback rule
allows only with keys), each worker in its own, with a worker key of its own; the test talks to
the services from the root namespace with a submitter key over a third link. All traffic is real
TCP between namespaces. Faults injected: a worker's link taken down mid-run and brought back,
and a host with a key the services do not know. Needs root and `ip`; skipped otherwise.
Measured numbers are printed as `MEASURED ...` lines (`pytest -s` shows them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import FAST_HEARTBEATS, HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, wait_until

from gymbus.services.cli.keys import make_keys, make_role_key
from gymbus.shared import security
from gymbus.shared.errors import RemoteError, ServiceUnavailable
from gymbus.shared.protocol import Command, RunState
from gymbus.shared.roles import Role
from gymbus.shared.transport import Client
from gymbus.worker.telemetry import spool, spool_files

pytestmark = pytest.mark.integration

if os.geteuid() != 0 or shutil.which("ip") is None:
    pytest.skip("needs root and the `ip` command (iproute2) to build network namespaces",
                allow_module_level=True)

#: the port of each endpoint (every namespace has its own port space)
PORTS = {"controller": 25550, "broker_controller": 25551, "broker_workers": 25552,
         "telemetry_in": 25553, "telemetry_out": 25554, "telemetry_live": 25555,
         "ingest": 25556}
WINDOW = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
SHORT = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 150, "seed": 3}
LONG = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 10_000_000, "seed": 1}
TAG = f"gb{os.getpid() % 100000}"
NET = f"10.{100 + os.getpid() % 100}"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def endpoints(host: str, **overrides: str) -> dict[str, str]:
    env = {f"GYMBUS_{name.upper()}": f"tcp://{host}:{port}" for name, port in PORTS.items()}
    return {**env, **{f"GYMBUS_{k.upper()}": f"tcp://{v}:{PORTS[k]}" for k, v in overrides.items()}}


@dataclass
class Net:
    """The namespaces, links and processes of the test; `close` undoes them all."""

    base: Path
    namespaces: list[str] = field(default_factory=list)
    procs: dict[str, tuple[subprocess.Popen[bytes], IO[bytes], Path]] = field(default_factory=dict)

    def namespace(self, name: str) -> str:
        ns = f"{TAG}{name}"
        if ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                timeout=10, check=False).stdout.split():
            ip("netns", "delete", ns)  # left by an earlier, killed run with the same pid
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def link(self, ns_a: str | None, addr_a: str, ns_b: str, addr_b: str, name: str) -> str:
        """A veth pair between two namespaces (None: the root one); returns b's device."""
        dev_a, dev_b = f"{TAG}{name}a", f"{TAG}{name}b"
        ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
        try:
            ip("link", "set", dev_b, "netns", ns_b)  # from now on the namespace owns the pair
        except subprocess.CalledProcessError:
            ip("link", "delete", dev_a)
            raise
        ip("-n", ns_b, "addr", "add", f"{addr_b}/24", "dev", dev_b)
        ip("-n", ns_b, "link", "set", dev_b, "up")
        side = ["-n", ns_a] if ns_a else []
        if ns_a:
            ip("link", "set", dev_a, "netns", ns_a)
        ip(*side, "addr", "add", f"{addr_a}/24", "dev", dev_a)
        ip(*side, "link", "set", dev_a, "up")
        return dev_b

    def start(self, name: str, ns: str, module: str, env: dict[str, str]) -> None:
        log_path = self.base / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        clean = {k: v for k, v in os.environ.items() if not k.startswith("GYMBUS_")}
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", module],
                                env={**clean, **FAST_HEARTBEATS, **env}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs[name] = (proc, log, log_path)

    def log(self, name: str) -> str:
        return self.procs[name][2].read_text(errors="replace")

    def check_alive(self) -> None:
        for name, (proc, _, path) in self.procs.items():
            if proc.poll() is not None:
                tail = "\n".join(path.read_text(errors="replace").splitlines()[-20:])
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{tail}")

    def pids(self, ns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                             timeout=10, check=False).stdout
        return [int(p) for p in out.split()]

    def training(self, ns: str, run_id: str) -> list[int]:
        """Run processes of `run_id` in the namespace's process table."""
        found = []
        for pid in self.pids(ns):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"gymbus.worker.child" in cmdline and run_id.encode() in cmdline:
                found.append(pid)
        return found

    def close(self) -> None:
        for proc, log, _ in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, log, _ in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()
        for ns in self.namespaces:
            for pid in self.pids(ns):  # run processes of a worker that did not stop them
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=10,
                           check=False)


@dataclass
class Hosts:
    net: Net
    services: str
    workers: dict[str, tuple[str, str, Path]]  # worker id -> namespace, device, home
    controller: Client
    ingest: Client

    def run(self, run_id: str) -> dict[str, Any]:
        return self.controller.request(Command.GET_RUN, {"run_id": run_id})["run"]  # type: ignore[no-any-return]

    def stats(self, run_id: str) -> dict[str, Any]:
        try:
            return self.ingest.request(Command.RUN_STATS, {"run_id": run_id}, timeout=2.0)[  # type: ignore[no-any-return]
                "runs"][0]
        except (RemoteError, ServiceUnavailable):
            return {}

    def submit(self, config: dict[str, Any]) -> str:
        reply = self.controller.request(Command.SUBMIT, {"config": config, "idempotency_key": ""})
        return str(reply["run_id"])


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    base = tmp_path_factory.mktemp("netns")
    folder = base / "keys"
    env = make_keys(folder)
    # its own client pair; the services' public key, which is no secret
    intruder = {**make_keys(base / "intruder")["clients"],
                "GYMBUS_CURVE_SERVER": env["clients"]["GYMBUS_CURVE_SERVER"]}
    net = Net(base)
    controller = ingest = None
    try:
        services = net.namespace("s")
        net.link(None, f"{NET}.0.1", services, f"{NET}.0.2", "r")
        workers = {}
        for i in (1, 2):
            ns = net.namespace(f"w{i}")
            dev = net.link(services, f"{NET}.{i}.1", ns, f"{NET}.{i}.2", f"w{i}")
            home = base / f"home-w{i}"
            keys = make_role_key(folder, Role.WORKER, f"w{i}")["clients"]
            net.start(f"w{i}", ns, "gymbus.worker", {
                **keys, **endpoints(f"{NET}.{i}.1"), "GYMBUS_HOME": str(home),
                "GYMBUS_WORKER_ID": f"w{i}", "GYMBUS_WORKER_SLOTS": "1"})
            workers[f"w{i}"] = (ns, dev, home)
        intruder_ns = net.namespace("x")
        net.link(services, f"{NET}.3.1", intruder_ns, f"{NET}.3.2", "x")
        home = str(base / "home-s")
        for name, module, extra in (
                ("ingest", "gymbus.services.ingest", {"telemetry_out": "127.0.0.1"}),
                ("broker", "gymbus.services.broker", {}),
                ("controller", "gymbus.services.controller", {"broker_controller": "127.0.0.1"})):
            net.start(name, services, module, {**env["services"], "GYMBUS_HOME": home,
                                               **endpoints("0.0.0.0", **extra)})
        net.start("intruder", intruder_ns, "gymbus.worker", {
            **intruder, **endpoints(f"{NET}.3.1"), "GYMBUS_HOME": str(base / "home-x"),
            "GYMBUS_WORKER_ID": "intruder"})
        submitter = make_role_key(folder, Role.SUBMITTER)["clients"]
        security.install(security.load(submitter))
        here = endpoints(f"{NET}.0.2")
        controller = Client(here["GYMBUS_CONTROLLER"], "controller", timeout=5.0)
        ingest = Client(here["GYMBUS_INGEST"], "ingest", timeout=5.0)

        def ready() -> bool:
            net.check_alive()
            try:
                workers_seen = controller.request(Command.LIST_WORKERS, timeout=1.0)["workers"]
                ingest.request(Command.PING, timeout=1.0)
            except ServiceUnavailable:
                return False
            return {w["worker_id"] for w in workers_seen} >= {"w1", "w2"}

        wait_until(ready, 40, "services and both workers over the veth links")
        yield Hosts(net, services, workers, controller, ingest)
    finally:
        for client in (controller, ingest):
            if client is not None:
                client.close()
        security.install(None)
        net.close()


def assert_stored_whole(h: Hosts, run_id: str, home: Path) -> int:
    """Every frame the run emitted stored once, and step rows = the steps it took; the steps."""
    stats = wait_until(lambda: (st := h.stats(run_id)).get("complete") and st, 40,
                       f"run {run_id} stored complete")
    steps = json.loads((home / "runs" / run_id / "result.json").read_text())["steps"]
    rows = h.ingest.request(Command.QUERY, {"sql": f"SELECT count(*), count(DISTINCT seq) FROM "
                                                   f"frames WHERE run_id = '{run_id}'"})["rows"][0]
    step_rows = h.ingest.request(Command.QUERY, {"sql": f"SELECT count(*) FROM steps WHERE "
                                                        f"run_id = '{run_id}'"})["rows"][0][0]
    assert rows == [stats["frames_emitted"], stats["frames_emitted"]], (rows, stats)
    assert step_rows == stats["steps"] == steps, (step_rows, stats, steps)
    assert stats["gaps"] == 0
    return int(steps)


def test_runs_on_two_hosts_complete_whole(hosts: Hosts) -> None:
    run_ids = [hosts.submit(SHORT) for _ in range(2)]
    done = wait_until(lambda: all(hosts.run(r)["state"] == RunState.COMPLETED.value
                                  for r in run_ids) and [hosts.run(r) for r in run_ids], 60,
                      "both runs to complete")
    assert {r["worker_id"] for r in done} == {"w1", "w2"}  # one on each host
    assert "refused telemetry" not in hosts.net.log("broker")  # each worker key's own runs
    for record in done:
        steps = assert_stored_whole(hosts, record["run_id"], hosts.workers[record["worker_id"]][2])
        print(f"\nMEASURED netns: run {record['run_id']} on {record['worker_id']}: {steps} steps "
              "stored, 0 frames lost")


def stopped(pid: int) -> bool:
    """Whether the process is stopped (state T) or gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "TtXZ"
    except OSError:
        return True


def spool_size(run_dir: Path) -> int:
    """Bytes the run's spool holds (nothing is trimmed while the ingest is out of reach)."""
    return spool_files.spool_bytes(run_dir)


def test_a_host_whose_link_goes_down_loses_its_run_then_repairs_it(hosts: Hosts) -> None:
    run_id = hosts.submit(LONG)
    wait_until(lambda: hosts.run(run_id)["state"] == RunState.RUNNING.value
               and hosts.stats(run_id).get("steps"), 30, "the long run to be running")
    worker = hosts.run(run_id)["worker_id"]
    ns, dev, home = hosts.workers[worker]
    assert hosts.net.training(ns, run_id)
    registered = hosts.net.log("broker").count(f"worker {worker} ready")
    ip("-n", ns, "link", "set", dev, "down")
    down = time.monotonic()
    wait_until(lambda: hosts.run(run_id)["state"] == RunState.LOST.value, 20,
               "the cut-off worker's run to become lost")
    detected = time.monotonic() - down
    assert detected < WINDOW + 8 * HEARTBEAT_INTERVAL, detected
    # cut off, the worker holds its runs (SIGSTOP) once it stops hearing the broker: a lost run
    # trains no further while the link is down
    wait_until(lambda: all(stopped(pid) for pid in hosts.net.training(ns, run_id)),
               WINDOW + 8 * HEARTBEAT_INTERVAL, "the cut-off run's processes to be held")
    held = len(hosts.net.training(ns, run_id))
    spooled = spool_size(home / "runs" / run_id)
    deadline = time.monotonic() + 3 * HEARTBEAT_INTERVAL
    while time.monotonic() < deadline:  # polls for any write until the window ends: held,
        assert spool_size(home / "runs" / run_id) == spooled  # the run spools nothing more
        time.sleep(0.05)  # polls until the window's deadline (the while above)
    ip("-n", ns, "link", "set", dev, "up")
    up = time.monotonic()
    wait_until(lambda: hosts.net.log("broker").count(f"worker {worker} ready") > registered, 30,
               f"{worker} to register again")
    wait_until(lambda: not hosts.net.training(ns, run_id), 30,
               "no process of the lost run left training on its host")
    # stopped by the broker, which remembers the runs a lost worker held, or, for a run
    # dispatched just before the link went down (not in the worker's last heartbeat yet), by
    # the controller, which cancels a lost run its worker lists again
    assert (f"is back with run {run_id}, which was lost with it" in hosts.net.log("broker")
            or f"lists run {run_id}, which is lost: cancelling it" in hosts.net.log("controller"))
    steps = assert_stored_whole(hosts, run_id, home)
    wait_until(lambda: spool.is_confirmed(home / "runs" / run_id), 20, "the spool confirmed")
    assert hosts.run(run_id)["state"] == RunState.LOST.value
    print(f"\nMEASURED netns: link down -> run lost in {detected:.2f} s (window {WINDOW:.2f} s); "
          f"{held} run process(es) held (stopped) while cut off; "
          f"re-registered and repaired {time.monotonic() - up:.2f} s after link up; "
          f"{steps} steps emitted before it was stopped, all stored, 0 frames lost")


def test_a_host_with_the_wrong_key_is_refused_and_named(hosts: Hosts) -> None:
    address = f"{NET}.3.2"
    wait_until(lambda: f"from {address}: unknown key" in hosts.net.log("broker"), 20,
               "the broker to log the intruder host")
    workers = hosts.controller.request(Command.LIST_WORKERS)["workers"]
    assert "intruder" not in {w["worker_id"] for w in workers}
    assert "refused a peer of the worker ROUTER" in hosts.net.log("broker")
