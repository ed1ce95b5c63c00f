"""A viewer never slows training: a `gymbus watch` process is stopped (SIGSTOP: it reads nothing)
for 10 s while a run trains with full telemetry, against the same run with no viewer.

On a shared 2-core machine the speed of separate runs drifts by far more than 5% (other work
comes and goes), so the comparison is made inside one long run, in alternating windows:
no viewer (6 s) / viewer stopped (10 s) / no viewer / viewer stopped / no viewer, with guard
bands excluded around the viewer's start and its catching up. Compared: the run's own
`charts/SPS` samples (one a second), median of the stalled windows against median of the others.
The run explores at a constant rate (its epsilon decays over an episode budget it never reaches),
so its speed is steady. Also checked: the broker's and the run process's memory stay bounded, and
the viewer reports the frames it missed (the broker dropped them for it), with exact accounting.
Takes about 60 s; the numbers are printed (`pytest -s`) and written to the test's tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_stack, wait_until
from test_live import run_state, stored

from gymbus.services.broker.telemetry_proxy import LIVE_HWM
from gymbus.services.ingest.client import StoreClient
from gymbus.services.stack.launcher import Stack
from gymbus.shared.protocol import TERMINAL_STATES, Command
from gymbus.shared.transport import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

STALL_SECONDS = 10.0
FREE_SECONDS = 6.0
STALLS = 2
#: seconds left out after the viewer starts (its imports and snapshot) and after it resumes
START_GUARD = 1.5
RESUME_GUARD = 2.5
#: the drop in steps/s a stalled viewer may cause at most
MAX_SLOWDOWN = 0.05
#: the broker's growth while a viewer is stalled: LIVE_HWM frames of ~25 KB, and slack
BROKER_GROWTH_LIMIT_MB = 48.0
RUN_GROWTH_LIMIT_MB = 16.0
#: explores throughout: epsilon falls over half of an episode budget the test never reaches
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


def submit(stack: Stack) -> str:
    with Client(stack.settings.controller, "controller") as client:
        reply = client.request(Command.SUBMIT, {"config": CONFIG, "idempotency_key": ""})
    return str(reply["run_id"])


def sps_samples(stack: Stack, run_id: str) -> list[tuple[int, float]]:
    """The run's own `charts/SPS` values, (epoch ns, steps/s): each covers the second before."""
    reader = StoreClient(stack.settings)
    try:
        rows = reader.rows(f"SELECT epoch_us(ts) AS t, value FROM metrics WHERE run_id = "
                           f"'{run_id}' AND name = 'charts/SPS' ORDER BY t")
    finally:
        reader.close()
    return [(r["t"] * 1000, r["value"]) for r in rows]


class Probe:
    """Memory of the broker and of the run process, sampled over a window."""

    def __init__(self, broker: int, run: int) -> None:
        self.broker, self.run = broker, run

    def window(self, seconds: float) -> dict[str, Any]:
        """Sample for `seconds` (this is the window: the loop paces the samples)."""
        start_ns = time.time_ns()
        broker = [rss_mb(self.broker)]
        run = [rss_mb(self.run)]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.2)  # the sampling period, until the window's deadline
            broker.append(rss_mb(self.broker))
            run.append(rss_mb(self.run))
        return {"start_ns": start_ns, "end_ns": time.time_ns(), "broker_start": broker[0],
                "broker_max": max(broker), "run_max": max(run)}


def stalled_viewer(stack: Stack, run_id: str, probe: Probe) -> dict[str, Any]:
    """Start `gymbus watch`, stop it for STALL_SECONDS, resume it, Ctrl-C it: its report."""
    viewer = subprocess.Popen(
        [sys.executable, "-m", "gymbus.services.cli", "watch", run_id, "--until-done", "--json"],
        env=stack.process_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(stack.settings.telemetry_live.rsplit(":", 1)[1])
        wait_until(lambda: connected_to(port), 30, "the viewer to connect")
        probe.window(START_GUARD)  # its snapshot, and frames flowing to it
        os.kill(viewer.pid, signal.SIGSTOP)
        window = probe.window(STALL_SECONDS)
        os.kill(viewer.pid, signal.SIGCONT)
        probe.window(RESUME_GUARD)  # it catches up
        viewer.send_signal(signal.SIGINT)
        out, err = viewer.communicate(timeout=120)  # a loaded machine: it first catches up
        assert viewer.returncode == 0, err
        return {**window, "seen": json.loads(out)["runs"][0]}
    finally:
        if viewer.poll() is None:
            os.kill(viewer.pid, signal.SIGCONT)
            viewer.kill()
            viewer.wait()


def test_a_stalled_viewer_does_not_slow_training(tmp_path: Path) -> None:
    # default heartbeats: a minute under full load must not lose the worker on a busy machine
    stack = make_stack(tmp_path / "home", GYMBUS_HEARTBEAT_INTERVAL="1.0", GYMBUS_WORKER_SLOTS="1")
    try:
        stack.start()
        run_id = submit(stack)
        pid = wait_until(lambda: run_pid(run_id), 30, "the run's process")
        wait_until(lambda: sps_samples(stack, run_id), 30, "the first steps/s sample")
        probe = Probe(stack.services["broker"].process.pid, pid)
        free, stalls = [probe.window(FREE_SECONDS)], []
        for _ in range(STALLS):
            stalls.append(stalled_viewer(stack, run_id, probe))
            free.append(probe.window(FREE_SECONDS))
        with Client(stack.settings.controller, "controller") as client:
            client.request(Command.CANCEL, {"run_id": run_id})
        wait_until(lambda: run_state(stack, run_id) in TERMINAL_STATES, 30, "the run to stop")
        wait_until(lambda: stored(stack, run_id).get("complete"), 30, "the run to be stored")
        samples = sps_samples(stack, run_id)
    finally:
        stack.stop()

    def within(windows: list[dict[str, Any]]) -> list[float]:
        return [v for t, v in samples for w in windows
                if w["start_ns"] + 1_000_000_000 <= t <= w["end_ns"]]

    sps_free, sps_stalled = within(free), within(stalls)
    median_free, median_stalled = statistics.median(sps_free), statistics.median(sps_stalled)
    report = {
        "stall_s": STALL_SECONDS, "live_hwm": LIVE_HWM,
        "sps_median_no_viewer": round(median_free), "sps_median_stalled_viewer":
            round(median_stalled), "ratio": round(median_stalled / median_free, 4),
        "samples": [len(sps_free), len(sps_stalled)],
        "sps_no_viewer": [round(v) for v in sps_free],
        "sps_stalled": [round(v) for v in sps_stalled],
        "broker_rss_mb_before_stall": [round(w["broker_start"], 1) for w in stalls],
        "broker_growth_mb_stalled": [round(w["broker_max"] - w["broker_start"], 1)
                                     for w in stalls],
        "broker_growth_mb_no_viewer": [round(w["broker_max"] - w["broker_start"], 1)
                                       for w in free],
        "run_rss_max_mb_no_viewer": round(max(w["run_max"] for w in free), 1),
        "run_rss_max_mb_stalled": round(max(w["run_max"] for w in stalls), 1),
        "viewer": [{k: w["seen"][k] for k in ("first_live_seq", "highest_seq", "live", "missed",
                                               "dropped", "duplicates", "from_store")}
                   for w in stalls],
    }
    (tmp_path / "stalled_viewer.json").write_text(json.dumps(report, indent=2))
    print("\nstalled viewer:", json.dumps(report))

    assert len(sps_free) >= 10 and len(sps_stalled) >= 10, report
    assert median_stalled >= (1 - MAX_SLOWDOWN) * median_free, report
    assert report["run_rss_max_mb_stalled"] < report["run_rss_max_mb_no_viewer"] + \
        RUN_GROWTH_LIMIT_MB, report
    for w in stalls:
        assert w["broker_max"] - w["broker_start"] < BROKER_GROWTH_LIMIT_MB, report
        seen = w["seen"]
        # every seq the viewer knows of is accounted for: before its first live frame (the
        # snapshot's part), received live, or missed (the broker dropped it for the viewer)
        assert seen["first_live_seq"] + seen["live"] + seen["missed"] == seen["highest_seq"] + 1
        assert seen["missed"] > 0, report  # 10 s of a run's frames overflow the live queues
