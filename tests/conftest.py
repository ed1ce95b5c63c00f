"""Fixtures shared by the whole suite: a temporary GYMBUS_HOME, free loopback endpoints, polling."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq

from gymbus.services.stack.launcher import free_endpoints
from gymbus.shared import settings as settings_mod
from gymbus.shared.settings import Settings

T = TypeVar("T")


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
        "GYMBUS_HEARTBEAT_INTERVAL": "0.25",
        "GYMBUS_HEARTBEAT_LIVENESS": "3",
        "GYMBUS_REQUEST_TIMEOUT": "5",
    }


@pytest.fixture
def gymbus_settings(gymbus_env: dict[str, str]) -> Iterator[Settings]:
    """Resolved Settings for `gymbus_env`, with the home directory created."""
    s = settings_mod.load(gymbus_env)
    s.home.mkdir(parents=True, exist_ok=True)
    yield s
