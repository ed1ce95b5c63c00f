"""`gymbus watch`: the terminal dashboard, drawn once (`--once`) or followed to the end, on a stack."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import gymbus_cli, stack_fixture, wait_until
from test_live import VIEWER_ENV, stored, submit

from gymbus.services.cli.view import INTERRUPTED
from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.services.viewers.watch import curve_lines

pytestmark = pytest.mark.integration


stack = stack_fixture("watch", **VIEWER_ENV)


@pytest.fixture(scope="module")
def runs(stack: Stack) -> dict[str, str]:
    """A finished Taxi run (full telemetry) and a finished fast-mode FrozenLake run."""
    made = {"taxi": submit(stack, env="Taxi-v4", episodes=200),
            "fast": submit(stack, env="FrozenLake-v1", episodes=300, telemetry="fast")}
    for run_id in made.values():
        wait_until(lambda r=run_id: stored(stack, r).get("complete"), 60, "the runs to be stored")
    return made


def gymbus(stack: Stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return gymbus_cli(stack.process_env({"COLUMNS": "160"}), *args, timeout=timeout)


def test_once_prints_one_frame_of_every_run(stack: Stack, runs: dict[str, str]) -> None:
    result = gymbus(stack, "watch", "--once", runs["taxi"], runs["fast"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for header in ("RUN", "STATE", "EPISODES", "STEPS/S", "LAST RET", "MEAN RET", "STORED",
                   "GAPS", "MISSED"):
        assert header in out
    lines = {run: next(line for line in out.splitlines() if runs[run][-10:] in line)
             for run in runs}
    assert "Taxi-v4" in lines["taxi"] and "completed" in lines["taxi"]
    assert " 200 " in lines["taxi"] and "fast" in lines["fast"] and " 300 " in lines["fast"]
    assert f"returns of {runs['taxi']}" in out  # the first named run is selected
    assert "board: Taxi-v4" in out and "destination" in out  # its last stored step, drawn
    assert "+---" in out  # Taxi's walls
    assert "viewer:" in out and "missed 0" in out


def test_once_prints_at_120_columns_off_a_terminal_or_at_columns(stack: Stack,
                                                                 runs: dict[str, str]) -> None:
    env = {k: v for k, v in stack.process_env().items() if k != "COLUMNS"}
    for columns, width in ((None, 120), ("80", 80)):
        result = gymbus_cli({**env, "COLUMNS": columns} if columns else env, "watch", "--once",
                            runs["taxi"], runs["fast"], timeout=60)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert max(len(line) for line in lines) == width, result.stdout
        for run_id, episodes in ((runs["taxi"], "200"), (runs["fast"], "300")):
            row = next(line for line in lines if run_id[-8:] in line)
            assert f" {episodes} " in row and "completed" in row, row
        print(f"--- gymbus watch --once at {width} columns\n{result.stdout}")


def test_once_json_matches_what_is_stored(stack: Stack, runs: dict[str, str]) -> None:
    result = gymbus(stack, "watch", "--once", "--json", runs["taxi"])
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    (run,) = data["runs"]
    stats = stored(stack, runs["taxi"])
    assert run["run_id"] == runs["taxi"] and run["state"] == "completed"
    assert run["episodes"] == stats["episodes"] == 200
    assert run["frames_stored"] == run["held"] == run["frames_emitted"] == stats["frames_emitted"]
    assert run["from_store"] == run["held"] and run["live"] == 0  # all from the snapshot
    assert run["mean_return"] is not None
    assert data["viewer"]["missed"] == 0


def test_until_done_follows_a_run_live_to_its_end(stack: Stack) -> None:
    run_id = submit(stack, env="FrozenLake-v1", episodes=3000)
    result = gymbus(stack, "watch", run_id, "--until-done", "--json", timeout=90)
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(result.stdout)["runs"]
    assert run["status"] == "completed" and run["episodes"] == 3000
    assert run["held"] == run["frames_emitted"]
    assert run["live"] > 0 and run["missed"] == 0
    # joined a little late: what came before its first live frame is from the store
    assert run["live"] + run["from_store"] == run["frames_emitted"]


def test_the_live_dashboard_draws_until_done(stack: Stack, runs: dict[str, str]) -> None:
    result = gymbus(stack, "watch", runs["fast"], "--until-done")
    assert result.returncode == 0, result.stderr
    assert runs["fast"][-10:] in result.stdout and "fast mode: no steps" in result.stdout


def test_an_unknown_run_exits_4(stack: Stack) -> None:
    result = gymbus(stack, "watch", "--once", "01NOTARUN0000000000000000")
    assert result.returncode == 4
    assert "01NOTARUN0000000000000000" in result.stderr


def test_the_return_curve_is_drawn_in_blocks() -> None:
    lines = curve_lines([0.0, 1.0, 2.0, 3.0], width=4, height=2)
    assert lines == ["  ▃█", "▁▆██"]  # 1, 6, 11 and 16 eighths of two rows
    assert curve_lines(list(map(float, range(1000))), width=50, height=8)[0].endswith("█")
    assert len(curve_lines([1.0] * 10, width=5, height=3)) == 3
    assert curve_lines([], 10) == []



# --- runs the controller never made, names and tags ----------------------------------------------


def test_runs_imported_from_tensorboard_are_watched_beside_the_controllers(
        stack: Stack, runs: dict[str, str]) -> None:
    imported = gymbus(stack, "import-tb", runs["fast"], "--json")
    assert imported.returncode == 0, imported.stderr
    tb_run = str(json.loads(imported.stdout)[0]["run_id"])  # in the store, not the controller
    result = gymbus(stack, "watch", "--once", "--json")
    assert result.returncode == 0, result.stderr
    listed = {r["run_id"]: r for r in json.loads(result.stdout)["runs"]}
    assert runs["fast"] in listed  # the controller's runs are still there
    run = listed[tb_run]
    assert run["status"] == "completed" and run["env"] == "FrozenLake-v1", run
    assert run["frames_stored"] == run["held"] > 0
    assert tb_run[-8:] in gymbus(stack, "watch", "--once").stdout


def test_watch_shows_a_runs_name_and_tags(stack: Stack) -> None:
    run_id = submit(stack, env="FrozenLake-v1", episodes=20, name="tagged-lake",
                    tags={"team": "blue", "lr": "0.1"})
    wait_until(lambda: stored(stack, run_id).get("complete"), 60, "the run to be stored")
    (run,) = json.loads(gymbus(stack, "watch", "--once", "--json", run_id).stdout)["runs"]
    assert (run["name"], run["tags"]) == ("tagged-lake", {"team": "blue", "lr": "0.1"})
    row = next(line for line in gymbus(stack, "watch", "--once", run_id).stdout.splitlines()
               if run_id[-8:] in line)
    assert "tagged-lake" in row and "lr=0.1,team=blue" in row, row


# --- Ctrl-C: `gymbus watch` ends within 2 s, exit code 130, whatever it is doing ------------------

#: seconds from SIGINT to the watcher's exit
EXIT_WITHIN = 2.0


class Watcher:
    """`gymbus watch ARGS` on a pseudo-terminal (as a person runs it: keys, the live drawing),
    its output read on a thread of its own."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        master, terminal = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gymbus.services.cli", "watch", *args],
            env={**env, "COLUMNS": "120", "LINES": "40", "TERM": "xterm"}, stdin=terminal,
            stdout=terminal, stderr=subprocess.PIPE)
        os.close(terminal)
        self.master = master
        self.closed = False
        self.output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the terminal's other end closed: the watcher exited
                return
            if not chunk:
                return
            self.output += chunk

    def shows(self, text: str) -> bool:
        return text.encode() in self.output

    def interrupt(self) -> tuple[int, float]:
        """Send SIGINT: the exit code and the seconds it took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            code = -1
        return code, time.monotonic() - started

    def close(self) -> None:
        """Kill the watcher if it still runs, and keep what it wrote; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        os.close(self.master)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def watcher() -> Iterator[list[Watcher]]:
    """The watchers a test starts, killed at its end if they are still running."""
    started: list[Watcher] = []
    yield started
    for w in started:
        w.close()


def dead_env(tmp_path: Path) -> tuple[dict[str, str], str]:
    """The environment of a `gymbus` pointed at endpoints where nothing listens, and the
    controller's endpoint."""
    bare = Stack(free_endpoints(tmp_path / "home"))
    return bare.process_env({"GYMBUS_REQUEST_TIMEOUT": "2"}), bare.settings.controller


def test_ctrl_c_ends_an_idle_watch(stack: Stack, runs: dict[str, str],
                                   watcher: list[Watcher]) -> None:
    w = Watcher(stack.process_env(), runs["taxi"])
    watcher.append(w)
    wait_until(lambda: w.shows("controller ok"), 60, "the dashboard to be drawn")
    code, took = w.interrupt()
    assert (code, took < EXIT_WITHIN) == (INTERRUPTED, True), (code, took)


def test_ctrl_c_ends_a_watch_with_the_services_down(tmp_path: Path,
                                                    watcher: list[Watcher]) -> None:
    env, _ = dead_env(tmp_path)
    w = Watcher(env)
    watcher.append(w)
    wait_until(lambda: w.shows("controller down"), 60, "the dashboard to be drawn")
    code, took = w.interrupt()
    assert (code, took < EXIT_WITHIN) == (INTERRUPTED, True), (code, took)


def test_ctrl_c_ends_a_watch_waiting_for_an_answer(tmp_path: Path,
                                                   watcher: list[Watcher]) -> None:
    env, controller = dead_env(tmp_path)
    ctx: zmq.Context[Any] = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # a controller that takes requests and never answers
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind(controller)
    try:
        w = Watcher(env)
        watcher.append(w)
        asked = []

        def asked_twice() -> bool:  # the first, then the dashboard loop's
            while silent.poll(0):
                asked.append(silent.recv_multipart())
            return len(asked) >= 2

        wait_until(asked_twice, 60, "the watcher to ask the controller twice")
        code, took = w.interrupt()  # within the request's 2 s timeout
        assert (code, took < EXIT_WITHIN) == (INTERRUPTED, True), (code, took)
    finally:
        ctx.destroy(linger=0)


def test_a_refresh_with_the_services_down_waits_one_timeout(tmp_path: Path) -> None:
    from gymbus.services.viewers.live import Live
    from gymbus.shared import settings as settings_mod

    env, _ = dead_env(tmp_path)
    live = Live(settings_mod.load(env), timeout=2.0)
    try:
        started = time.monotonic()
        live.refresh()
        took = time.monotonic() - started
    finally:
        live.close()
    assert not live.controller_ok and not live.ingest_ok
    assert took < 2.0 + 1.5, f"a refresh took {took:.1f} s: the two requests one after the other"
