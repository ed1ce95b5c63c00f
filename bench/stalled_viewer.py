"""What a stalled viewer costs training: steps/s of one run while a `gymbus watch` of it is
stopped (SIGSTOP: it reads nothing), against the same run with no viewer.

    python bench/stalled_viewer.py [--stall 10] [--free 6] [--stalls 2] [--json FILE]

On a shared machine the speed of separate runs drifts by far more than the effect measured, so
the comparison is made inside one long run, in alternating windows: no viewer (--free s) /
viewer stopped (--stall s) / no viewer / ... , with guard bands left out around the viewer's
start and its catching up. Compared: the run's own `charts/SPS` samples (one a second), the
median of the stalled windows against the median of the others; the ratio is printed with the
target (at least 0.95). Also shown: the broker's and the run process's memory growth, and the
viewer's accounting of the frames it missed (the broker dropped them for it). The run explores
at a constant rate (its epsilon decays over an episode budget it never reaches), so its speed is
steady. About a minute with the defaults. `tests/test_stalled_viewer.py` checks the behaviour
(Ctrl-C after a stall, every frame stored); this script measures the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gymbus.services.broker.telemetry_proxy import LIVE_HWM
from gymbus.services.ingest.client import StoreClient
from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.shared.protocol import TERMINAL_STATES, Command
from gymbus.shared.transport import Client

#: seconds left out after the viewer starts (its imports and snapshot) and after it resumes
START_GUARD = 1.5
RESUME_GUARD = 2.5
#: the least ratio of steps/s with a stalled viewer to steps/s without one
TARGET_RATIO = 0.95
#: explores throughout: epsilon falls over half of an episode budget the run never reaches
CONFIG = {"env": "FrozenLake-v1", "algo": "q-learning", "seed": 7, "telemetry": "full",
          "episodes": 100_000_000}


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc/<pid>/status (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_pid(run_id: str) -> int | None:
    """The run's child process (its command line names the run)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"gymbus.worker.child" in cmdline and run_id.encode() in cmdline:
                return int(entry.name)
    return None


def connected_to(port: int) -> bool:
    """Whether a TCP connection to this loopback port is established (the viewer's SUB)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_for(what: str, predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise SystemExit(f"error: timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)  # poll interval, toward the deadline
    return value


def sps_samples(stack: Stack, run_id: str) -> list[tuple[int, float]]:
    """The run's own `charts/SPS` values, (epoch ns, steps/s): each covers the second before."""
    with StoreClient(stack.settings) as reader:
        rows = reader.rows(f"SELECT epoch_us(ts) AS t, value FROM metrics WHERE run_id = "
                           f"'{run_id}' AND name = 'charts/SPS' ORDER BY t")
    return [(r["t"] * 1000, r["value"]) for r in rows]


def window(broker: int, run: int, seconds: float) -> dict[str, Any]:
    """Sample the broker's and the run's memory for `seconds` (the loop paces the samples)."""
    start_ns = time.time_ns()
    brokers, runs = [rss_mb(broker)], [rss_mb(run)]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)  # the sampling period, until the window's deadline
        brokers.append(rss_mb(broker))
        runs.append(rss_mb(run))
    return {"start_ns": start_ns, "end_ns": time.time_ns(), "broker_start": brokers[0],
            "broker_max": max(brokers), "run_max": max(runs)}


def stalled_viewer(stack: Stack, run_id: str, pids: tuple[int, int],
                   stall: float) -> dict[str, Any]:
    """Start `gymbus watch`, stop it for `stall` s, resume it, Ctrl-C it: the stalled window
    and what the viewer reported."""
    viewer = subprocess.Popen(
        [sys.executable, "-m", "gymbus.services.cli", "watch", run_id, "--until-done", "--json"],
        env=stack.process_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(stack.settings.telemetry_live.rsplit(":", 1)[1])
        wait_for("the viewer to connect", lambda: connected_to(port), 30)
        window(*pids, START_GUARD)  # its snapshot, and frames flowing to it
        os.kill(viewer.pid, signal.SIGSTOP)
        stalled = window(*pids, stall)
        os.kill(viewer.pid, signal.SIGCONT)
        window(*pids, RESUME_GUARD)  # it catches up
        viewer.send_signal(signal.SIGINT)
        out, err = viewer.communicate(timeout=30)
        if not out.strip():
            raise SystemExit(f"error: the viewer printed nothing (exit {viewer.returncode}): {err}")
        return {**stalled, "seen": json.loads(out)["runs"][0]}
    finally:
        if viewer.poll() is None:
            os.kill(viewer.pid, signal.SIGCONT)
            viewer.kill()
            viewer.wait()


def measure(home: Path, stall: float, free: float, stalls: int) -> dict[str, Any]:
    # default heartbeats: a minute under full load must not lose the worker on a busy machine
    stack = Stack({**free_endpoints(home), "GYMBUS_HEARTBEAT_INTERVAL": "1.0",
                   "GYMBUS_WORKER_SLOTS": "1"})
    try:
        stack.start()
        with Client(stack.settings.controller, "controller") as client:
            run_id = str(client.request(Command.SUBMIT, {"config": CONFIG,
                                                         "idempotency_key": ""})["run_id"])
        pid = wait_for("the run's process", lambda: run_pid(run_id), 30)
        wait_for("the first steps/s sample", lambda: sps_samples(stack, run_id), 30)
        pids = (stack.services["broker"].process.pid, pid)
        free_windows, stalled = [window(*pids, free)], []
        for i in range(stalls):
            print(f"stall {i + 1}/{stalls} ...", file=sys.stderr, flush=True)
            stalled.append(stalled_viewer(stack, run_id, pids, stall))
            free_windows.append(window(*pids, free))
        with Client(stack.settings.controller, "controller") as client:
            client.request(Command.CANCEL, {"run_id": run_id})
            wait_for("the run to stop", lambda: client.request(
                Command.GET_RUN, {"run_id": run_id})["run"]["state"] in TERMINAL_STATES, 30)
        samples = sps_samples(stack, run_id)
    finally:
        stack.stop()

    def within(windows: list[dict[str, Any]]) -> list[float]:
        return [v for t, v in samples for w in windows
                if w["start_ns"] + 1_000_000_000 <= t <= w["end_ns"]]

    sps_free, sps_stalled = within(free_windows), within(stalled)
    median_free, median_stalled = statistics.median(sps_free), statistics.median(sps_stalled)
    return {
        "stall_s": stall, "live_hwm": LIVE_HWM,
        "sps_median_no_viewer": round(median_free),
        "sps_median_stalled_viewer": round(median_stalled),
        "ratio": round(median_stalled / median_free, 4), "target_ratio": TARGET_RATIO,
        "samples": [len(sps_free), len(sps_stalled)],
        "broker_growth_mb_stalled": [round(w["broker_max"] - w["broker_start"], 1)
                                     for w in stalled],
        "broker_growth_mb_no_viewer": [round(w["broker_max"] - w["broker_start"], 1)
                                       for w in free_windows],
        "run_rss_max_mb_no_viewer": round(max(w["run_max"] for w in free_windows), 1),
        "run_rss_max_mb_stalled": round(max(w["run_max"] for w in stalled), 1),
        "viewer": [{k: w["seen"][k] for k in ("first_live_seq", "highest_seq", "live", "missed",
                                               "dropped", "duplicates", "from_store")}
                   for w in stalled],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stall", type=float, default=10.0, help="seconds a viewer is stopped")
    parser.add_argument("--free", type=float, default=6.0, help="seconds with no viewer")
    parser.add_argument("--stalls", type=int, default=2, help="stalled windows")
    parser.add_argument("--json", type=Path, help="write the numbers to this file too")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when the ratio is below its target")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="gymbus-stalled-viewer-")) / "home"
    report = measure(home, args.stall, args.free, args.stalls)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"steps/s with a stalled viewer / without: {report['ratio']:.3f} "
          f"(target >= {TARGET_RATIO})", file=sys.stderr)
    return 1 if args.strict and report["ratio"] < TARGET_RATIO else 0


if __name__ == "__main__":
    sys.exit(main())
