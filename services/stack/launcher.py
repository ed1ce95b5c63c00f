"""Start and stop a whole gymbus stack as child processes: used by the demo and the integration tests.

`honcho start` does the same from the Procfile for people; this module exists so that a program
can bring a stack up on chosen endpoints, wait until it answers, and take it down in order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

from gymbus.shared import settings as settings_mod
from gymbus.shared.errors import GymbusError, ServiceUnavailable
from gymbus.shared.protocol import Command
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client

#: role -> module run with `python -m`; the order is the start order
SERVICES: dict[str, str] = {
    "ingest": "gymbus.services.ingest",
    "broker": "gymbus.services.broker",
    "controller": "gymbus.services.controller",
    "worker": "gymbus.worker",
}
#: stop order: workers first (their runs end and flush), the ingest last (it stores the tail)
STOP_ORDER = ("worker", "controller", "broker", "ingest")
GRACE_SECONDS = 5.0


class StackError(GymbusError):
    """A service of the stack did not start or died; its log file says why."""


@dataclass
class Service:
    role: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    """A private stack. `env` holds the GYMBUS_* variables every service gets."""

    env: dict[str, str]
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return settings_mod.load(self.env)

    def process_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(settings_mod.PREFIX)}
        env.update(self.env)
        env.update(extra or {})
        return env

    def start(self, roles: tuple[str, ...] = tuple(SERVICES), ready_timeout: float = 30.0) -> None:
        """Start the roles given and wait until the stack answers (or raise StackError)."""
        for role in roles:
            self.start_one(role)
        self.wait_ready(roles, ready_timeout)

    def start_one(self, role: str, extra_env: dict[str, str] | None = None) -> Service:
        logs = self.settings.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{role}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            [sys.executable, "-m", SERVICES[role]],
            env=self.process_env(extra_env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # a Ctrl-C in the terminal reaches the program alone, which stops them in order
            start_new_session=True,
        )
        service = Service(role, proc, log_path, log_file)
        self.services[role] = service
        return service

    def wait_ready(self, roles: tuple[str, ...], timeout: float) -> None:
        """Poll until the controller and ingest answer and every started worker is registered."""
        s = self.settings
        deadline = time.monotonic() + timeout
        checks: list[tuple[str, Any]] = []
        if "ingest" in roles:
            checks.append(("ingest", lambda c: c.request(Command.PING, timeout=1.0)))
        if "controller" in roles:
            want = 1 if "worker" in roles else 0
            checks.append(
                ("controller",
                 lambda c: len(c.request(Command.LIST_WORKERS, timeout=1.0)["workers"]) >= want)
            )
        for service, check in checks:
            endpoint = s.ingest if service == "ingest" else s.controller
            with Client(endpoint, service, timeout=1.0) as client:
                while True:
                    self.check_alive()
                    try:
                        if check(client):
                            break
                    except ServiceUnavailable:
                        pass
                    if time.monotonic() > deadline:
                        raise StackError(f"the stack was not ready within {timeout:g} s "
                                         f"(waiting for the {service}); logs in {s.home / 'logs'}")
                    time.sleep(0.1)  # poll interval, bounded by the deadline

    def check_alive(self) -> None:
        """Raise StackError if a started service has exited."""
        for svc in self.services.values():
            code = svc.process.poll()
            if code is not None:
                raise StackError(
                    f"the {svc.role} exited with code {code}; the end of {svc.log_path}:\n"
                    f"{svc.log_tail()}"
                )

    def stop_one(self, role: str, sig: int = signal.SIGTERM) -> int | None:
        """Signal one service and wait up to the grace period; kill it after. Returns its exit
        code: 128 + the signal's number when it stopped on it (143 after SIGTERM, 130 after
        SIGINT: see shared/service.py), -9 when it had to be killed, None for a role not started.
        """
        svc = self.services.pop(role, None)
        if svc is None:
            return None
        if svc.process.poll() is None:
            svc.process.send_signal(sig)
            try:
                svc.process.wait(GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                svc.process.kill()
                svc.process.wait()
        svc.log_file.close()
        return svc.process.returncode

    def stop(self) -> dict[str, int | None]:
        """Stop every service in STOP_ORDER with SIGTERM; returns each one's exit code (143
        for each that stopped cleanly)."""
        codes = {}
        for role in STOP_ORDER:
            if role in self.services:
                codes[role] = self.stop_one(role)
        for role in list(self.services):
            codes[role] = self.stop_one(role)
        return codes

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_endpoints(home: Path, host: str = "127.0.0.1") -> dict[str, str]:
    """GYMBUS_* variables naming `home` and a free loopback port for every endpoint."""
    import socket

    env = {"GYMBUS_HOME": str(home)}
    held = []
    for name in ("controller", "broker_controller", "broker_workers",
                 "telemetry_in", "telemetry_out", "telemetry_live", "ingest"):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((host, 0))
        held.append(s)
        env[settings_mod.PREFIX + name.upper()] = f"tcp://{host}:{s.getsockname()[1]}"
    for s in held:
        s.close()
    return env
