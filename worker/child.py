"""The run child: one training run in its own process, publishing telemetry to the broker.

    python -m gymbus.worker.child --run-dir DIR --run-id ID --worker-id WID [--no-telemetry]

Reads `DIR/config.json` (written by the worker daemon), trains, saves artifacts under
`DIR/artifacts/`, emits `run_started` ... `run_completed`, writes `DIR/result.json` and exits:

    0  completed
    1  failed: the reason is in result.json and run_completed, the traceback on stderr
    3  cancelled: SIGTERM or SIGINT stops the run before its next step, flushes and reports

(2 is argparse's exit code for bad arguments.) Fast mode, chosen by `telemetry = "fast"` in the
config, by `--no-telemetry`, or by `DISABLE_TELEMETRY` in {1, true, yes}, builds no step frames.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from gymbus.shared import logs
from gymbus.shared import settings as settings_mod
from gymbus.shared.protocol import LifecycleEvent, RunState, TelemetryMode
from gymbus.shared.runconfig import RunConfig, parse_config
from gymbus.shared.transport import StopFlag
from gymbus.worker.emitter import CLOSE_LINGER_MS, Emitter

CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
LOG_FILE = "run.log"
ARTIFACTS_DIR = "artifacts"
DISABLE_TELEMETRY_VAR = "DISABLE_TELEMETRY"
_TRUE_WORDS = frozenset({"1", "true", "yes"})
#: linger after a cancel: short, since the daemon kills a cancelled run after 1.5 s
CANCEL_LINGER_MS = 1000

log = logging.getLogger("gymbus.run")


class RunExit(IntEnum):
    """Exit codes of the run child, by final status."""

    COMPLETED = 0
    FAILED = 1
    CANCELLED = 3


EXIT_CODES = {
    RunState.COMPLETED: RunExit.COMPLETED,
    RunState.FAILED: RunExit.FAILED,
    RunState.CANCELLED: RunExit.CANCELLED,
}


def telemetry_mode(
    configured: TelemetryMode, no_telemetry: bool, environ: Mapping[str, str]
) -> TelemetryMode:
    """The effective mode: `--no-telemetry` or DISABLE_TELEMETRY force fast; else the config's."""
    if no_telemetry or environ.get(DISABLE_TELEMETRY_VAR, "").strip().lower() in _TRUE_WORDS:
        return TelemetryMode.FAST
    return configured


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gymbus.worker.child",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", required=True, type=Path, help="the run's folder")
    parser.add_argument("--run-id", required=True, help="the run's id (telemetry topics)")
    parser.add_argument("--worker-id", default="", help="the worker that runs it")
    parser.add_argument(
        "--no-telemetry",
        action="store_true",
        help="fast mode: no per-step telemetry (lifecycle, episode and metric frames still flow)",
    )
    return parser.parse_args(argv)


class RunProcess:
    """One run, top to bottom, on the process's main thread."""

    def __init__(self, args: argparse.Namespace, stop: StopFlag) -> None:
        self.run_id: str = args.run_id
        self.worker_id: str = args.worker_id
        self.no_telemetry: bool = args.no_telemetry
        self.run_dir: Path = args.run_dir
        self.stop = stop
        self.status = RunState.FAILED
        self.reason: str | None = None
        self.episodes = 0
        self.steps = 0
        self.mode: TelemetryMode | None = None
        self.emitter: Emitter | None = None
        self.started = time.monotonic()

    def run(self) -> int:
        """Train, report, clean up; returns the exit code."""
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            self._start_and_train(ctx)
        except Exception as exc:  # noqa: BLE001 - any exception fails the run, as its reason
            traceback.print_exc(file=sys.stderr)
            self.status = RunState.FAILED
            self.reason = f"{type(exc).__name__}: {exc}"
        frames_emitted = self._finish_telemetry()
        code = EXIT_CODES.get(self.status, RunExit.FAILED)
        self._write_result(frames_emitted, code)
        log.info(
            "run %s %s: %d episodes, %d steps, %d frames%s", self.run_id, self.status.value,
            self.episodes, self.steps, frames_emitted, f" ({self.reason})" if self.reason else "",
        )
        if self.emitter is not None:
            cancelled = self.status is RunState.CANCELLED
            self.emitter.close(CANCEL_LINGER_MS if cancelled else CLOSE_LINGER_MS)
        ctx.term()
        return int(code)

    def _start_and_train(self, ctx: zmq.Context[Any]) -> None:
        settings = settings_mod.load()
        raw = json.loads((self.run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        agent_id = raw.get("agent_id", "agent-0") if isinstance(raw, dict) else "agent-0"
        self.emitter = Emitter.connect(
            ctx, settings.telemetry_in, self.run_id, agent_id=str(agent_id),
            worker_id=self.worker_id, stop=self.stop.__bool__,
        )
        started: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname()}
        try:
            config = parse_config(raw)
        except Exception:
            # say that the run started, with what was submitted, before it fails
            self.emitter.lifecycle(
                LifecycleEvent.RUN_STARTED, config=raw if isinstance(raw, dict) else {}, **started
            )
            raise
        self.mode = telemetry_mode(config.telemetry, self.no_telemetry, os.environ)
        self.emitter.lifecycle(
            LifecycleEvent.RUN_STARTED, config=config.to_dict(), env=config.env, algo=config.algo,
            telemetry=self.mode.value, seed=config.seed, **started,
        )
        self._train(config, self.mode, self.emitter)

    def _train(self, config: RunConfig, mode: TelemetryMode, emitter: Emitter) -> None:
        # gymnasium is imported here, not at the top, so that the daemon can import this
        # module's constants without paying for it
        from gymbus.worker import training

        rng = training.seed_everything(config.seed)
        env = training.make_env(config)
        try:
            agent = training.make_agent(config, env, rng, emitter)
            emitter.configure_steps(vector_obs=training.has_vector_obs(env), labels=agent.has_labels)
            progress = training.LoopResult()
            try:
                training.run_training(
                    env, agent, emitter, training.budget_of(config), seed=config.seed,
                    mode=mode, every=config.every, stop=self.stop, progress=progress,
                )
            finally:  # how far it got, also when the loop raised
                self.episodes, self.steps = progress.episodes, progress.steps
            self._save_artifacts(agent.artifacts(), emitter)
            self.status = RunState.CANCELLED if progress.stopped else RunState.COMPLETED
        finally:
            env.close()

    def _save_artifacts(self, arrays: dict[str, np.ndarray], emitter: Emitter) -> None:
        """Write each array as `artifacts/<name>.npy` and announce it with an artifact frame."""
        if not arrays:
            return
        folder = self.run_dir / ARTIFACTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            path = folder / f"{name}.npy"
            np.save(path, array)
            emitter.artifact(name, path.relative_to(self.run_dir).as_posix(), "npy")

    def _finish_telemetry(self) -> int:
        """Flush and send run_completed; a broken socket fails the run but not the report."""
        if self.emitter is None:
            return 0
        try:
            return self.emitter.finish(self.status.value, self.reason, self.episodes, self.steps)
        except Exception as exc:  # noqa: BLE001 - result.json must still be written
            traceback.print_exc(file=sys.stderr)
            self.status = RunState.FAILED
            self.reason = self.reason or f"{type(exc).__name__}: {exc}"
            return self.emitter.seq

    def _write_result(self, frames_emitted: int, code: RunExit) -> None:
        """Write result.json atomically, so the daemon never reads half of it."""
        stats = self.emitter.stats() if self.emitter is not None else {}
        result = {
            **stats,
            "status": self.status.value,
            "reason": self.reason,
            "frames_emitted": frames_emitted,
            "episodes": self.episodes,
            "steps": self.steps,
            "blocked_sends": stats.get("blocked_sends", 0),
            "telemetry": self.mode.value if self.mode is not None else None,
            "exit_code": int(code),
            "duration_s": round(time.monotonic() - self.started, 3),
            "pid": os.getpid(),
        }
        tmp = self.run_dir / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
        os.replace(tmp, self.run_dir / RESULT_FILE)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m gymbus.worker.child`; returns the exit code."""
    args = parse_args(argv)
    stop = StopFlag().install()
    logs.setup("run")
    return RunProcess(args, stop).run()


if __name__ == "__main__":
    sys.exit(main())
