"""A stalled viewer: `gymbus watch` is stopped (SIGSTOP: it reads nothing) for a few seconds while
a run publishes full telemetry, then resumed (SIGCONT) and at once interrupted (SIGINT), when
the backlog it has to catch up on is largest. It exits within 2 s with exit code 130, its
accounting adds up, and the run's frames are all stored: a viewer never costs the store a frame.
What a stalled viewer costs the run's speed is measured by bench/stalled_viewer.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_stack, wait_until
from test_live import run_state, stored
from test_watch import EXIT_WITHIN, Watcher

from gymbus.services.cli.view import INTERRUPTED
from gymbus.services.stack.launcher import Stack
from gymbus.shared.protocol import TERMINAL_STATES, Command
from gymbus.shared.transport import Client

pytestmark = pytest.mark.integration

STALL_SECONDS = 4.0
#: publishes until cancelled: epsilon decays over an episode budget the test never reaches
CONFIG = {"env": "FrozenLake-v1", "algo": "q-learning", "seed": 7, "telemetry": "full",
          "episodes": 100_000_000}


def connected_to(port: int) -> bool:
    """Whether a TCP connection to this loopback port is established (a viewer's SUB)."""
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


@pytest.fixture(scope="module")
def publishing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    """A stack and a run under way with full telemetry; at the end the run is cancelled and
    every frame it sent must be stored."""
    # default heartbeats: under full load a busy machine must not lose the worker
    stack = make_stack(tmp_path_factory.mktemp("stalled") / "home",
                       GYMBUS_HEARTBEAT_INTERVAL="1.0", GYMBUS_WORKER_SLOTS="1")
    try:
        stack.start()
        with Client(stack.settings.controller, "controller") as client:
            run_id = str(client.request(Command.SUBMIT, {"config": CONFIG,
                                                         "idempotency_key": ""})["run_id"])
        wait_until(lambda: (stored(stack, run_id).get("frames_stored") or 0) > 100, 60,
                   "the run to publish")
        yield stack, run_id
        with Client(stack.settings.controller, "controller") as client:
            client.request(Command.CANCEL, {"run_id": run_id})
        wait_until(lambda: run_state(stack, run_id) in TERMINAL_STATES, 30, "the run to stop")
        stats = wait_until(lambda: (s := stored(stack, run_id)).get("complete") and s, 60,
                           "the run to be stored whole")
        assert stats["frames_stored"] == stats["frames_emitted"] and stats["gaps"] == 0, stats
    finally:
        stack.stop()


#: seconds the watcher follows the run before it is stopped (its snapshot, then live frames)
FOLLOW_SECONDS = 2.0


def hold(seconds: float, what: str) -> None:
    """Let `seconds` pass while the run goes on publishing (a window of the test, not a wait)."""
    until = time.monotonic() + seconds
    wait_until(lambda: time.monotonic() >= until, seconds + 5, what, interval=0.1)


def stall(w: Watcher, seconds: float) -> None:
    """Stop the watcher for `seconds` while the run goes on publishing, then resume it."""
    os.kill(w.proc.pid, signal.SIGSTOP)
    hold(seconds, "the stall")
    os.kill(w.proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("args", [
    (), pytest.param(("--until-done", "--json"), marks=pytest.mark.slow)],
    ids=["dashboard", "json"])
def test_ctrl_c_ends_a_watch_resumed_after_a_stall(publishing: tuple[Stack, str],
                                                   args: tuple[str, ...]) -> None:
    stack, run_id = publishing
    w = Watcher(stack.process_env(), run_id, *args)
    try:
        port = int(stack.settings.telemetry_live.rsplit(":", 1)[1])
        wait_until(lambda: connected_to(port), 60, "the watcher to subscribe")
        if not args:
            wait_until(lambda: w.shows("controller ok"), 60, "the dashboard to be drawn")
        hold(FOLLOW_SECONDS, "the watcher to follow the run")
        stall(w, STALL_SECONDS)
        code, took = w.interrupt()  # at once: the backlog is at its largest
        assert (code, took < EXIT_WITHIN) == (INTERRUPTED, True), (code, took)
        if args:  # the numbers where it stood: every seq it knows of is accounted for
            w.close()
            (seen,) = json.loads(w.output.decode())["runs"]
            assert seen["first_live_seq"] is not None, seen
            assert seen["first_live_seq"] + seen["live"] + seen["missed"] == \
                seen["highest_seq"] + 1, seen
    finally:
        w.close()
