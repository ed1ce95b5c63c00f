"""A worker's run process, as the daemon (worker/daemon.py) holds it: its signals, and how its
end is judged (result.json, a command run's exit code, a cancel, or a crash)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from gymbus.shared.protocol import RunState
from gymbus.worker import command, orphans
from gymbus.worker.child import LOG_FILE, RESULT_FILE, read_result, tail

#: lines of run.log quoted in the reason of a run process that died without a result
LOG_TAIL_LINES = 20


@dataclass
class Child:
    """A run's child process and what the daemon knows about it."""

    run_id: str
    process: subprocess.Popen[bytes]
    run_dir: Path
    log_file: IO[bytes]
    cancel_requested: bool = False
    #: when a cancelled child that is still alive gets SIGKILL (monotonic seconds)
    kill_at: float | None = None
    #: a command run's script: signals go to its process group, its end is judged by command.py
    script: bool = False
    #: a command run's watchdog: it kills the script's group if this daemon dies (orphans.py)
    watchdog: subprocess.Popen[bytes] | None = None

    def signal(self, signum: int) -> None:
        """Signal the run process (a command run's whole process group), if it is alive."""
        if self.process.poll() is not None:
            return
        if self.script:
            command.signal_group(self.process, signum)
            return
        try:
            self.process.send_signal(signum)
        except ProcessLookupError:
            pass  # it exited just now; the reaper reports it

    def outcome(self) -> tuple[RunState, str | None, dict[str, Any]]:
        """The exited run's state, reason and result (result.json, or empty): a command run
        by its exit code (its process group and watchdog ended first), a run child by the
        result it wrote, else cancelled (if asked) or failed with the end of its log."""
        code = self.process.returncode
        result = read_result(self.run_dir / RESULT_FILE)
        if self.script:
            command.end_group(self.process)
            orphans.release(self.watchdog)
            state, reason = command.outcome(code, result, self.cancel_requested,
                                            command.last_line(self.run_dir / LOG_FILE))
        elif result is not None:
            state, reason = RunState(result["status"]), result.get("reason")
        elif self.cancel_requested:
            state, reason = RunState.CANCELLED, f"stopped (exit code {code})"
        else:
            state = RunState.FAILED
            reason = (f"run process exited with code {code} without a result; "
                      f"end of {LOG_FILE}:\n{tail(self.run_dir / LOG_FILE, LOG_TAIL_LINES)}")
        return state, reason, result or {}
