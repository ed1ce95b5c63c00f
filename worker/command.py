"""Command runs (`gymbus submit --command`): a user's own script, launched where a run child would be.

The script runs in a session of its own (its process group is its pid, so that a cancel reaches
whatever it started), with stdout and stderr in the run folder's run.log, in the directory it
was submitted from when this host has it (else the run folder), and with the worker's GYMBUS_*
settings and the variables that make its `gymbus.run()` attach to the run: GYMBUS_RUN_ID,
GYMBUS_WORKER_ID, GYMBUS_RUN_DIR and GYMBUS_TELEMETRY (gymbus/launched.py). Its run writes
result.json when it ends, as a run child does; `outcome` reads that with the exit code: the
run's state follows the process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from gymbus.launched import TELEMETRY_VAR, telemetry_word
from gymbus.session import RUN_DIR_VAR, RUN_ID_VAR, WORKER_ID_VAR
from gymbus.shared.protocol import RunState
from gymbus.shared.runconfig import RunConfig
from gymbus.worker.child import tail

log = logging.getLogger("gymbus.worker")

#: the reason of a script that exited 0 without ending its run (no result.json)
NOT_ENDED = "exited without ending its run"
#: lines at the end of run.log searched for the last one that is not blank
LOG_TAIL_LINES = 20


class LaunchError(Exception):
    """The script's program could not be started (not found, not executable): the run fails
    at once, with this as its reason, instead of being dispatched again."""


def working_dir(config: RunConfig, run_dir: Path) -> Path:
    """Where the script runs: the directory it was submitted from, if this host has it."""
    if config.cwd and os.path.isdir(config.cwd):
        return Path(config.cwd)
    return run_dir


def script_env(config: RunConfig, run_id: str, worker_id: str, run_dir: Path,
               base: Mapping[str, str]) -> dict[str, str]:
    """The script's environment: `base` (the worker's, with its settings), the run's variables,
    and unbuffered Python output (run.log shows prints as they happen) unless `base` says."""
    env = {"PYTHONUNBUFFERED": "1", **base}
    env.update({RUN_ID_VAR: run_id, WORKER_ID_VAR: worker_id, RUN_DIR_VAR: str(run_dir),
                TELEMETRY_VAR: telemetry_word(config.telemetry, config.every)})
    return env


def launch(config: RunConfig, run_id: str, worker_id: str, run_dir: Path,
           base_env: Mapping[str, str], log_file: IO[bytes],
           preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """Start the script with its output in `log_file`; LaunchError when it cannot start.
    `preexec_fn` runs in the child before it executes (its limits: worker/limits.py)."""
    argv = list(config.command or ())
    cwd = working_dir(config, run_dir)
    if config.cwd and cwd != Path(config.cwd):
        log.info("run %s: %s is not a directory here; the script runs in its run folder",
                 run_id, config.cwd)
    try:
        return subprocess.Popen(argv, cwd=cwd, env=script_env(config, run_id, worker_id,
                                                              run_dir, base_env),
                                stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=preexec_fn)  # noqa: PLW1509 - no threads there
    except OSError as exc:
        reason = f"could not start {argv[0]!r} in {cwd}: {exc.strerror or exc}"
        log_file.write(f"{reason}\n".encode())
        raise LaunchError(reason) from None


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """Send `signum` to the script's whole process group (the group id is the script's pid)."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass  # every process of it exited just now; the reaper reports it


def end_group(process: subprocess.Popen[bytes]) -> None:
    """Kill what an exited script left running in its process group, so that a run's
    processes end with it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left


def outcome(code: int, result: dict[str, Any] | None, cancelled: bool,
            last: str) -> tuple[RunState, str | None]:
    """The run's state and reason from the script's exit code, the result.json its run wrote
    (None: it did not end its run), whether a cancel was asked for, and the last line of its
    output.

    A run it ended is as it said, but `completed` needs exit code 0 too; a cancel asked for
    makes anything but a completed run and exit 0 `cancelled`.
    """
    status = RunState(result["status"]) if result is not None else None
    if status is RunState.COMPLETED and code == 0:
        return RunState.COMPLETED, None
    if cancelled:
        said = result.get("reason") if result is not None and status is RunState.CANCELLED \
            else None
        return RunState.CANCELLED, said or f"stopped (exit code {code})"
    if result is None or status is None:
        return RunState.FAILED, NOT_ENDED if code == 0 else exit_reason(code, last)
    if status is RunState.COMPLETED:  # it ended its run, then failed
        return RunState.FAILED, exit_reason(code, last)
    return status, result.get("reason") or exit_reason(code, last)


def last_line(log_path: Path) -> str:
    """The last line of the script's output that is not blank ('' when there is none)."""
    lines = [line.strip() for line in tail(log_path, LOG_TAIL_LINES).splitlines()]
    return next((line for line in reversed(lines) if line), "")


def exit_reason(code: int, last: str) -> str:
    """Why a script failed, from its exit: the signal that killed it, else its output's last
    line (a traceback's ends with the exception), else the exit code."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return last or f"exited with code {code}"
