"""Run processes end with their worker daemon, also when it is killed with SIGKILL.

A run child asks the kernel to SIGKILL it when the daemon dies (`die_with_parent`, Linux's
PR_SET_PDEATHSIG through prctl). A launched script's process group gets a watchdog
(`watch_group`): a small process, outside the group and the daemon's session, that reads a pipe
whose only write end the daemon holds. The kernel closes that end when the daemon dies, however
it dies; the watchdog then reads end-of-file and SIGKILLs the group, which reaches what the
script started too (the death signal would reach only the script). The spool survives either
kill whole (worker/telemetry/spool.py), so a later worker still stores what the run sent.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("gymbus.worker")

#: prctl's option that sets the signal a process gets when its parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1
#: the watchdog: a script of its own, run without site packages, so that it starts in ~20 ms
WATCHDOG = Path(__file__).with_name("watchdog.py")
#: what the daemon writes to a watchdog whose group ended normally (anything else: kill it)
RELEASE = b"x"
#: seconds a released watchdog may take to exit before it is killed
RELEASE_WAIT = 1.0


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """Get `signum` when the parent dies; at once if `parent_pid` is gone already (it died
    before the request was made, and this process was handed to another parent)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):  # not Linux: the daemon's close still stops its runs
        log.warning("prctl is not available here: a run outlives a worker killed with SIGKILL")
        return
    if prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)


def watch_group(pgid: int) -> subprocess.Popen[bytes]:
    """Start the watchdog of process group `pgid` (a launched script's; its id is the script's
    pid); the returned process's stdin is the pipe that keeps it waiting."""
    return subprocess.Popen([sys.executable, "-I", "-S", str(WATCHDOG), str(pgid)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def release(watchdog: subprocess.Popen[bytes] | None) -> None:
    """Stop a watchdog without its kill: its group ended and was reaped, and the group id may
    be reused from now on."""
    if watchdog is None:
        return
    try:
        if watchdog.stdin is not None:
            watchdog.stdin.write(RELEASE)
            watchdog.stdin.close()
    except (BrokenPipeError, ValueError):
        pass  # it exited already
    try:
        watchdog.wait(RELEASE_WAIT)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()
