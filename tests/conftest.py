"""Fixtures shared by the whole suite: a temporary GYMBUS_HOME, free loopback endpoints, polling,
private stacks of real processes and the real `gymbus` command."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq

from gymbus.services.stack.launcher import Stack, free_endpoints
from gymbus.shared import settings as settings_mod
from gymbus.shared.settings import Settings

T = TypeVar("T")

#: heartbeats fast enough that a silent peer is noticed within a second
HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS = 0.25, 3
FAST_HEARTBEATS = {"GYMBUS_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL),
                   "GYMBUS_HEARTBEAT_LIVENESS": str(HEARTBEAT_LIVENESS)}
#: what most private stacks run with: fast heartbeats and two run slots a worker
STACK_ENV = {**FAST_HEARTBEATS, "GYMBUS_WORKER_SLOTS": "2"}


def free_endpoint() -> str:
    """A tcp endpoint on a loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy; fail loudly at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)  # poll interval, bounded by the deadline above


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    """A private ZeroMQ context, destroyed with linger 0 after the test."""
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def gymbus_env(tmp_path: Path) -> dict[str, str]:
    """GYMBUS_* variables for a private stack: temp home, free ports, fast heartbeats."""
    return {
        **free_endpoints(tmp_path / "home"),
        **FAST_HEARTBEATS,
        "GYMBUS_REQUEST_TIMEOUT": "5",
    }


@pytest.fixture
def gymbus_settings(gymbus_env: dict[str, str]) -> Iterator[Settings]:
    """Resolved Settings for `gymbus_env`, with the home directory created."""
    s = settings_mod.load(gymbus_env)
    s.home.mkdir(parents=True, exist_ok=True)
    yield s


# --- a whole stack of real processes, and the real `gymbus` command --------------------------------


def make_stack(home: Path, **env: str) -> Stack:
    """A stack (not started yet) on free loopback ports under `home`, with `env`'s GYMBUS_*
    variables on top: `make_stack(home, **STACK_ENV)`, `make_stack(home, GYMBUS_WORKER_SLOTS="1")`."""
    return Stack({**free_endpoints(home), **env})


def stack_fixture(folder: str, *, start: Callable[[Stack], object] = Stack.start,
                  **env: str) -> Any:
    """A module-scoped `stack` fixture: `make_stack(<a temporary folder>/home, **env)`, started by
    `start` (the whole stack by default) and stopped after the module's last test.

    A test module takes it with one assignment: `stack = stack_fixture("watch", **env)`.
    """

    @pytest.fixture(scope="module", name="stack")
    def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
        with make_stack(tmp_path_factory.mktemp(folder) / "home", **env) as s:
            start(s)
            yield s

    return stack


def gymbus_cli(env: dict[str, str], *args: str,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real `gymbus` command with `env` as its whole environment (usually a stack's
    `process_env()`); the exit code is the caller's to check."""
    return subprocess.run([sys.executable, "-m", "gymbus.services.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def gymbus_cli_json(env: dict[str, str], *args: str, timeout: float = 60) -> Any:
    """What `gymbus ... --json` prints, parsed; the command must exit 0."""
    result = gymbus_cli(env, *args, "--json", timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def store_query(stack: Stack, sql: str) -> list[dict[str, Any]]:
    """The rows of a read-only statement on the stack's store, through the real `gymbus query`."""
    rows: list[dict[str, Any]] = gymbus_cli_json(stack.process_env(), "query", sql)
    return rows


def stored_run(stack: Stack, run_id: str, timeout: float = 20) -> dict[str, Any]:
    """The run's `runs` row once the ingest holds every frame of it."""
    def complete() -> dict[str, Any] | None:
        rows = store_query(stack, f"SELECT * FROM runs WHERE run_id = '{run_id}'")
        return rows[0] if rows and rows[0]["complete"] else None
    return wait_until(complete, timeout, f"run {run_id} stored complete")
