"""No orphans: a run's processes do not outlive its worker daemon, also after SIGKILL.

A real stack runs a built-in agent's run, or a launched script that started a process of its own;
the worker daemon is killed with SIGKILL mid-run; once the controller marks the run `lost`, the
process table (/proc) holds no process of the run: not the run child, not the script, nothing
in the script's process group. The run's folder then stops growing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import STACK_ENV, make_stack, wait_until

from gymbus.services.stack.launcher import Stack
from gymbus.shared.protocol import Command, RunState
from gymbus.shared.transport import Client
from gymbus.worker import orphans

pytestmark = pytest.mark.integration

#: seconds the run's folder is watched, after the kill, for any write
QUIET_WINDOW = 1.0

#: a recording script that starts a helper of its own (in its process group, ignoring SIGTERM)
#: that keeps writing into the run folder, as a data loader or a simulator might
SCRIPT = """
    import os, signal, subprocess, sys, gymnasium as gym, gymbus
    helper = subprocess.Popen([sys.executable, "-c", "import os, signal\\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
        "f = open(os.path.join(os.environ['GYMBUS_RUN_DIR'], 'helper.log'), 'a')\\n"
        "signal.signal(signal.SIGALRM, lambda *_: (f.write('x'), f.flush()))\\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)\\n"
        "for _ in range(6000):\\n    signal.pause()\\n"])  # a write every 10 ms, 60 s at most
    with gymbus.run(name="spawns-a-helper") as run:
        env = run.record(gym.make("CartPole-v1"))
        env.reset(seed=0)
        open("started", "w").close()
        while True:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                env.reset()
"""


def run_processes(run_id: str) -> set[int]:
    """Live processes (zombies excluded) of a run: those whose command line or environment
    names it, and every member of their process groups."""
    named: set[int] = set()
    groups: dict[int, int] = {}
    needle = run_id.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            groups[int(entry.name)] = int(fields[2])
            if needle in (entry / "cmdline").read_bytes() or \
                    b"GYMBUS_RUN_ID=" + needle in (entry / "environ").read_bytes():
                named.add(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue  # it exited while being read, or it is not ours to read
    pgids = {groups[pid] for pid in named if pid in groups}
    return named | {pid for pid, pgid in groups.items() if pgid in pgids and pgid != os.getpgid(0)}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    s = make_stack(tmp_path / "home", **STACK_ENV, PATH=path)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        for run_dir in s.settings.runs_dir.glob("*"):  # what a failed test left running
            for pid in run_processes(run_dir.name):
                os.kill(pid, signal.SIGKILL)


def state(stack: Stack, run_id: str) -> str:
    with Client(stack.settings.controller, "controller", timeout=5.0) as client:
        return str(client.request(Command.GET_RUN, {"run_id": run_id})["run"]["state"])


def kill_worker_and_check(stack: Stack, run_id: str) -> None:
    """SIGKILL the worker daemon; once the run is `lost` none of its processes is alive, and
    its folder no longer grows."""
    before = run_processes(run_id)
    assert before, "the run has no process to begin with"
    worker = stack.services.pop("worker")
    worker.process.kill()
    worker.process.wait(10)
    worker.log_file.close()
    wait_until(lambda: state(stack, run_id) == RunState.LOST.value, 15, "the run to be lost")
    left = run_processes(run_id)
    assert not left, f"alive after the worker's SIGKILL: {sorted(left)} (of {sorted(before)})"
    folder = stack.settings.run_dir(run_id)
    size = folder_bytes(folder)
    deadline = time.monotonic() + QUIET_WINDOW
    while time.monotonic() < deadline:  # polls for any write until the window ends
        assert folder_bytes(folder) == size, "the run folder still grows"
        time.sleep(0.05)  # polls until the window's deadline (the while above)
    print(f"\nMEASURED orphans: {len(before)} processes of run {run_id} before the kill, "
          "0 after it")


def test_a_run_child_dies_with_its_killed_worker(stack: Stack) -> None:
    with Client(stack.settings.controller, "controller", timeout=5.0) as client:
        config = {"env": "FrozenLake-v1", "algo": "q-learning", "episodes": 10_000_000,
                  "seed": 1, "telemetry": "full"}
        run_id = str(client.request(Command.SUBMIT, {"config": config,
                                                     "idempotency_key": ""})["run_id"])
    spool = stack.settings.run_dir(run_id) / "spool" / "frames.bin"
    wait_until(lambda: spool.exists() and spool.stat().st_size > 100_000, 30,
               "the run to be well under way")
    kill_worker_and_check(stack, run_id)


def test_a_launched_script_and_its_process_group_die_with_its_killed_worker(
        stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(textwrap.dedent(SCRIPT))
    result = subprocess.run(
        [sys.executable, "-m", "gymbus.services.cli", "submit", "--command", "python train.py",
         "--json"], env=stack.process_env(), cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    run_id = json.loads(result.stdout)["run_id"]
    wait_until(lambda: (tmp_path / "started").exists(), 30, "the script to record steps")
    wait_until(lambda: (stack.settings.run_dir(run_id) / "helper.log").exists(), 10,
               "the script's helper to write")
    assert len(run_processes(run_id)) >= 2  # the script and its helper (and the watchdog)
    kill_worker_and_check(stack, run_id)


def test_the_watchdog_kills_the_group_at_end_of_file_and_spares_it_when_released() -> None:
    """The pipe's end of file (the daemon died) kills the whole group; a release does not."""
    # the leader and its child wait for a signal; each ends by itself after 60 s (SIGALRM)
    script = "import signal, subprocess, sys; subprocess.Popen([sys.executable, '-c', " \
             "'import signal; signal.alarm(60); signal.pause()']); signal.alarm(60); " \
             "signal.pause()"
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        released = orphans.watch_group(leader.pid)
        orphans.release(released)
        assert released.returncode == 0 and leader.poll() is None
        wait_until(lambda: len(run_group(leader.pid)) == 2, 10, "the leader and its child")
        watchdog = orphans.watch_group(leader.pid)
        assert watchdog.stdin is not None
        watchdog.stdin.close()  # what the kernel does when the daemon dies
        assert watchdog.wait(10) == 0
        assert leader.wait(10) == -signal.SIGKILL
        wait_until(lambda: not run_group(leader.pid), 10, "the whole group gone")
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait()


def run_group(pgid: int) -> list[int]:
    """Live members (zombies excluded) of process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members
