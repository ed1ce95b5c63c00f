"""Runs that a recorded script opened itself (`gymbus.run()` outside a worker).

Such a run is `running` from `open_run` on and ends with the script's `close_run`. Between the
two the script says `run_alive` once a heartbeat interval (`GYMBUS_HEARTBEAT_INTERVAL`); a run
not heard of for `liveness` seconds (the same heartbeat settings as workers) is `lost`: its process is
gone, or cannot reach the controller any more. A controller that restarts gives the runs it
finds `running` one liveness period from its start before it marks them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gymbus.services.controller.registry import Registry
from gymbus.shared.errors import RequestError
from gymbus.shared.protocol import (
    MAX_FRAME_BYTES,
    TERMINAL_STATES,
    ErrorCode,
    RunState,
    TelemetryMode,
)

log = logging.getLogger("gymbus.controller")

#: the `worker_id` of a script's run starts with this (then HOST:PID)
OWNER_PREFIX = "script:"
MAX_TEXT = 200


def _text(body: dict[str, Any], name: str, limit: int = MAX_TEXT) -> str:
    value = body.get(name, "")
    if not isinstance(value, str) or len(value) > limit:
        raise RequestError(ErrorCode.BAD_REQUEST,
                           f"{name} must be a string of at most {limit} characters")
    return value


class ScriptRuns:
    """The controller's handlers of open_run, run_alive and close_run, and their liveness."""

    def __init__(self, registry: Registry, liveness: float, clock: Callable[[], float], *,
                 max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        """`max_frame_bytes`: the services' frame limit, told to each script that opens a
        run (its own setting may differ: it was started from another shell)."""
        self.registry = registry
        self.max_frame_bytes = max_frame_bytes
        self.liveness = liveness
        self.clock = clock
        now = clock()
        #: runs a `gymbus cancel` asked to stop: told so in the answer to their next run_alive
        self.cancelling: set[str] = set()
        #: run id -> when it was last heard of (monotonic seconds)
        self.seen: dict[str, float] = {
            run.run_id: now for run in registry.active()
            if (run.worker_id or "").startswith(OWNER_PREFIX)}

    def open_run(self, body: dict[str, Any]) -> dict[str, Any]:
        run_id = _text(body, "run_id", 64)
        if not run_id:
            raise RequestError(ErrorCode.BAD_REQUEST, "run_id is required")
        telemetry = _text(body, "telemetry") or TelemetryMode.FULL.value
        config = body.get("config", {})
        if not isinstance(config, dict):
            raise RequestError(ErrorCode.BAD_REQUEST, "config must be a map")
        host, pid = _text(body, "host"), body.get("pid", 0)
        owner = f"{OWNER_PREFIX}{host}:{pid if type(pid) is int else 0}"
        run, created = self.registry.open(run_id, _text(body, "name"), _text(body, "env"),
                                          telemetry, config, owner)
        if created:
            self.seen[run_id] = self.clock()
        elif run.terminal:  # an offline run being synced: it ended already
            pass
        elif not (run.worker_id or "").startswith(OWNER_PREFIX):
            raise RequestError(ErrorCode.BAD_REQUEST,
                               f"run {run_id} is a submitted run, not a script's")
        return {"run": run.to_wire(), "created": created, "max_frame_bytes": self.max_frame_bytes}

    def run_alive(self, body: dict[str, Any]) -> dict[str, Any]:
        run_id = _text(body, "run_id", 64)
        run = self.registry.get(run_id)
        if run is None:
            raise RequestError(ErrorCode.UNKNOWN_RUN, f"no run {run_id}")
        if not run.terminal:
            self.seen[run_id] = self.clock()
        return {"state": run.state.value, "cancel": run_id in self.cancelling}

    def cancel(self, run_id: str) -> dict[str, Any]:
        """Ask a script's run to stop: its next run_alive answer says so, and the script ends
        the run `cancelled` (as on Ctrl-C)."""
        self.cancelling.add(run_id)
        return {"cancelling": True}

    def close_run(self, body: dict[str, Any]) -> dict[str, Any]:
        run_id = _text(body, "run_id", 64)
        run = self.registry.get(run_id)
        if run is None:
            raise RequestError(ErrorCode.UNKNOWN_RUN, f"no run {run_id}")
        try:
            state = RunState(_text(body, "status"))
        except ValueError:
            raise RequestError(ErrorCode.BAD_REQUEST, "status must be completed, failed or "
                               "cancelled") from None
        if state not in TERMINAL_STATES or state is RunState.LOST:
            raise RequestError(ErrorCode.BAD_REQUEST, "status must be completed, failed or "
                               "cancelled")
        self.seen.pop(run_id, None)
        self.cancelling.discard(run_id)
        counts = {k: body[k] for k in ("frames_emitted", "episodes", "steps")
                  if type(body.get(k)) is int}
        reason = body.get("reason") if isinstance(body.get("reason"), str) else None
        if not run.terminal:
            run = self.registry.finish(run_id, state, reason=reason, **counts) or run
        return {"run": run.to_wire()}

    def expire(self) -> None:
        """Mark `lost` every script run not heard of for `liveness` seconds."""
        now = self.clock()
        for run_id, seen in list(self.seen.items()):
            if now - seen > self.liveness:
                del self.seen[run_id]
                self.cancelling.discard(run_id)
                log.warning("run %s: its script was not heard of for %.1f s: lost",
                            run_id, now - seen)
                self.registry.finish(run_id, RunState.LOST,
                                     reason=f"its script was not heard of for {now - seen:.0f} s")
