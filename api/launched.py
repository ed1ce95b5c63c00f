"""A script that a worker launched (`gymbus submit --command`): what its `gymbus.run()` does
differently from a script someone started by hand.

The worker names the run in the script's environment (GYMBUS_RUN_ID, GYMBUS_WORKER_ID,
GYMBUS_RUN_DIR) and the telemetry mode it was submitted with (GYMBUS_TELEMETRY). The script's
run attaches to that run instead of opening one with the controller, and then:

- it records with the submitted mode wherever that stores fewer steps than the script's own
  `telemetry` argument (a run submitted `--fast` stores no steps, whatever the script asks);
- SIGTERM, which the worker sends to the script's process group to cancel it, stops the run as
  Ctrl-C does: at the next `step` of a recorded env or `log` call;
- its end is written to the run folder's result.json, as a run child writes it, which the
  worker reads once the script has exited; the worker's spool repair stores what the ingest
  misses, so the script does not wait for the ingest.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from gymbus.shared.protocol import RunState, TelemetryMode

log = logging.getLogger("gymbus.api")

#: the submitted run's telemetry mode: full, fast, or sampled:N
TELEMETRY_VAR = "GYMBUS_TELEMETRY"
#: the reason of a launched run that SIGTERM stopped
SIGTERM_REASON = "stopped by the worker (SIGTERM)"

#: how few steps a mode stores, from most to fewest
_FEWER = {TelemetryMode.FULL: 0, TelemetryMode.SAMPLED: 1, TelemetryMode.FAST: 2}


def telemetry_word(mode: TelemetryMode, every: int | None) -> str:
    """GYMBUS_TELEMETRY's value for a run's mode."""
    return f"{mode.value}:{every or 1}" if mode is TelemetryMode.SAMPLED else mode.value


def parse_telemetry_word(word: str) -> tuple[TelemetryMode, int] | None:
    """GYMBUS_TELEMETRY's value as (mode, every); None (logged) for a value it cannot be."""
    name, _, count = word.strip().lower().partition(":")
    try:
        mode = TelemetryMode(name)
        every = int(count) if count else 1
    except ValueError:
        mode, every = TelemetryMode.FULL, 0
    if every < 1 or (count and mode is not TelemetryMode.SAMPLED):
        log.warning("%s=%r is not full, fast or sampled:N: ignored", TELEMETRY_VAR, word)
        return None
    return mode, every


def fewer_steps(mode: TelemetryMode, every: int, word: str | None) -> tuple[TelemetryMode, int]:
    """The script's own mode, or the submitted one (`word`) where it stores fewer steps: fast
    over sampled over full, and of two sampled modes the one with the larger `every`."""
    submitted = parse_telemetry_word(word) if word else None
    if submitted is None:
        return mode, every
    other, other_every = submitted
    if _FEWER[other] > _FEWER[mode]:
        return other, other_every
    if other is mode is TelemetryMode.SAMPLED:
        return mode, max(every, other_every)
    return mode, every


def catch_sigterm(stop: list[str]) -> Any:
    """SIGTERM puts SIGTERM_REASON in the run's `stop` list (the next `step` or `log` raises
    KeyboardInterrupt); the handler it replaces, or None where it left SIGTERM alone (off the
    main thread, or the script has a handler of its own)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def on_sigterm(signum: int, frame: Any) -> None:
        if not stop:
            stop.append(SIGTERM_REASON)

    return signal.signal(signal.SIGTERM, on_sigterm)


def ended_already(run_dir: Path) -> bool:
    """Whether the launched run has ended: a script records one run (its frames are numbered
    from the first), so a second `gymbus.run()` in it is refused."""
    from gymbus.worker.child import RESULT_FILE

    return (run_dir / RESULT_FILE).exists()


def write_end(run_dir: Path, status: RunState, reason: str | None, frames_emitted: int,
              episodes: int, steps: int, mode: TelemetryMode) -> None:
    """The run's end in result.json, with the fields the worker reports as a run child's."""
    from gymbus.worker.child import write_result

    write_result(run_dir, {
        "status": status.value, "reason": reason, "frames_emitted": frames_emitted,
        "episodes": episodes, "steps": steps, "telemetry": mode.value, "pid": os.getpid()})
