"""One service of the Procfile stack, stopped in the stack's order: `python -m
gymbus.services.stack.ordered ROLE` (ROLE: ingest, broker, controller or worker).

honcho sends SIGTERM to every process at once, and kills them all 5 s after the first one has
exited. Stopped together, the ingest and the broker would be gone while the worker's runs still
flush their last frames and the worker reports them cancelled. So each Procfile entry runs its
service through this supervisor, which holds a lock under GYMBUS_HOME/stack while its service
runs and, on SIGTERM or SIGINT, passes the signal on only once no service before its role in
STOP_ORDER (worker, controller, broker, ingest) holds one: the worker stops its runs and waits
until the ingest has stored their frames; then the controller, which has their final states;
then the broker; the ingest last drains, flushes and checkpoints. The wait is at most ORDER_WAIT
seconds; a second signal is passed on at once.

The service runs in a session of its own, so that honcho's signal to this process group reaches
only the supervisor; it gets SIGTERM if the supervisor dies (PR_SET_PDEATHSIG). The exit code is
the service's (143 after SIGTERM: shared/service.py).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from gymbus.services.stack.launcher import SERVICES, STOP_ORDER
from gymbus.shared import settings as settings_mod
from gymbus.shared.errors import ConfigError
from gymbus.worker import orphans

#: seconds a service waits, after the stop signal, for the services before it to exit
ORDER_WAIT = 15.0
#: seconds between two looks at the service and at the locks
POLL_S = 0.05
LOCK_DIR = "stack"


def hold_lock(folder: Path, role: str) -> IO[bytes]:
    """A lock file of this role, held (flock) until the returned file is closed."""
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / f"{role}.{os.getpid()}.lock", "wb")  # noqa: SIM115 - held for the lifetime
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    return f


def running_before(folder: Path, role: str) -> list[str]:
    """Lock files of the roles before `role` in STOP_ORDER whose services still run (those of
    services gone are removed)."""
    before = STOP_ORDER[:STOP_ORDER.index(role)]
    held = []
    for path in sorted(folder.glob("*.lock")):
        if path.name.split(".", 1)[0] not in before:
            continue
        try:
            with open(path, "rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(path.name)
            continue
        except FileNotFoundError:
            continue
        path.unlink(missing_ok=True)  # its holder is gone
    return held


def supervise(role: str, folder: Path, order_wait: float = ORDER_WAIT) -> int:
    """Run the role's service until it exits; returns its exit code (128 + N after signal N)."""
    signals: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda n, _frame: signals.append(n))
    me = os.getpid()
    lock = hold_lock(folder, role)
    try:
        # preexec_fn is safe: this process runs no threads
        service = subprocess.Popen(
            [sys.executable, "-m", SERVICES[role]], start_new_session=True,
            preexec_fn=lambda: orphans.die_with_parent(me, signal.SIGTERM))  # noqa: PLW1509
        signalled: float | None = None
        passed = False
        while True:
            try:
                code = service.wait(POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if not signals or passed:
                continue
            signalled = signalled or time.monotonic()
            if (len(signals) > 1 or time.monotonic() - signalled >= order_wait
                    or not running_before(folder, role)):
                service.send_signal(signals[0])
                passed = True
    finally:
        lock.close()
        (folder / f"{role}.{me}.lock").unlink(missing_ok=True)
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gymbus.services.stack.ordered",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=list(SERVICES), help="the service to run")
    args = parser.parse_args(argv)
    try:
        home = settings_mod.load().home
    except ConfigError as exc:
        print(f"gymbus {args.role}: {exc}", file=sys.stderr)
        return 1
    return supervise(args.role, home / LOCK_DIR)


if __name__ == "__main__":
    sys.exit(main())
