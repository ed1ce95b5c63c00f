"""The run child: one training run in its own process, publishing telemetry to the broker.

    python -m gymbus.worker.child --run-dir DIR --run-id ID --worker-id WID [--no-telemetry]
        [--parent-pid PID]

Reads `DIR/config.json` (written by the worker daemon), trains, saves artifacts under
`DIR/artifacts/`, emits `run_started` ... `run_completed`, writes `DIR/result.json` and exits:

    0  completed
    1  failed: the reason is in result.json and run_completed, the traceback on stderr
    3  cancelled: SIGTERM or SIGINT stops the run before its next step, flushes and reports

(2 is argparse's exit code for bad arguments.) The telemetry mode, by precedence: `--no-telemetry`,
then `DISABLE_TELEMETRY` in {1, true, yes} (any case), force fast mode, which builds no step frames;
otherwise the config's `telemetry` (full, fast, or sampled with `every`). Both switches can only
turn per-step telemetry off, never on. Every run, in every mode, writes TensorBoard event files
into its folder (`gymbus.worker.telemetry.tensorboard`), complete before `run_completed` is sent.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from gymbus.shared import logs
from gymbus.shared import settings as settings_mod
from gymbus.shared.policy_files import ARTIFACTS_DIR
from gymbus.shared.protocol import LifecycleEvent, RunState, TelemetryMode
from gymbus.shared.runconfig import RunConfig, parse_config
from gymbus.worker import orphans
from gymbus.worker.agents.base import Artifact
from gymbus.worker.telemetry.emitter import Emitter
from gymbus.worker.telemetry.publisher import CLOSE_LINGER_MS
from gymbus.worker.telemetry.spool import SpoolWriter
from gymbus.worker.telemetry.tensorboard import ScalarLog

CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
LOG_FILE = "run.log"
DISABLE_TELEMETRY_VAR = "DISABLE_TELEMETRY"
_TRUE_WORDS = frozenset({"1", "true", "yes"})
_FALSE_WORDS = frozenset({"", "0", "false", "no"})
#: linger after a cancel: short, since the daemon kills a cancelled run after 1.5 s
CANCEL_LINGER_MS = 1000
#: allocations between two young collections in a run process (CPython's default: 700)
GC_THRESHOLD = 10_000

if TYPE_CHECKING:
    from gymbus.worker.recorded_spaces import RecordedSpaces

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


class RunStop(list[int]):
    """Truthy once SIGTERM or SIGINT has arrived (it holds the signal numbers).

    A list, not an Event: the training loop tests it before every step, and the truth test of a
    list is done in C (~15 ns) where a Python `__bool__` costs ~80 ns, 0.5% of a FrozenLake step.
    """

    if TYPE_CHECKING:  # for type checkers only: a Python-level __bool__ would slow the test
        def __bool__(self) -> bool: ...

    def install(self) -> RunStop:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.append(signum)


def quiet_garbage_collector() -> None:
    """Keep the garbage collector out of the training loop's way.

    Telemetry holds a few thousand row tuples between flushes. With CPython's default threshold
    (700 allocations) that starts ~100 young collections a second, measured at 1.5% of a fast
    FrozenLake run and 3% of a full one; at GC_THRESHOLD they nearly vanish. `freeze` moves what
    the imports and the set-up made out of reach of the (then rare) full collections.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def telemetry_mode(
    configured: TelemetryMode, no_telemetry: bool, environ: Mapping[str, str]
) -> TelemetryMode:
    """The effective mode: `--no-telemetry`, then DISABLE_TELEMETRY, force fast; else the config's.

    DISABLE_TELEMETRY is true for 1, true or yes and false for 0, false, no or empty (any case,
    spaces ignored); any other value is ignored with a warning, so a typo never fails a run.
    """
    if no_telemetry:
        return TelemetryMode.FAST
    word = environ.get(DISABLE_TELEMETRY_VAR, "").strip().lower()
    if word in _TRUE_WORDS:
        return TelemetryMode.FAST
    if word not in _FALSE_WORDS:
        log.warning("%s=%r is neither true (1, true, yes) nor false (0, false, no): ignored",
                    DISABLE_TELEMETRY_VAR, environ[DISABLE_TELEMETRY_VAR])
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
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="the worker daemon's pid: the run is killed when it dies")
    parser.add_argument(
        "--no-telemetry",
        action="store_true",
        help="fast mode: no per-step telemetry (lifecycle, episode and metric frames still flow)",
    )
    return parser.parse_args(argv)


class RunProcess:
    """One run, top to bottom, on the process's main thread."""

    def __init__(self, args: argparse.Namespace, stop: RunStop) -> None:
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
        self.tensorboard: ScalarLog | None = None
        self.started = time.monotonic()
        #: (monotonic, process CPU) seconds when run_started was sent: the training's own time
        self.train_clock: tuple[float, float] | None = None
        #: the API's recorder, for an env of spaces the loop's own step columns do not take
        self.recorded: RecordedSpaces | None = None

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
            worker_id=self.worker_id, stop=lambda: bool(self.stop),
            max_frame_bytes=settings.max_frame_bytes,
        )
        self.emitter.spool = SpoolWriter.create(self.run_dir)  # kept until the ingest has all
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
        self.tensorboard = ScalarLog(self.run_dir)
        self.emitter.observe_metrics(self.tensorboard.add_rows, self.tensorboard.add_episodes)
        started.update(env=config.env, algo=config.algo, telemetry=self.mode.value,
                       seed=config.seed)
        # gymnasium is imported here, not at the top, so that the daemon can import this
        # module's constants without paying for it; before run_started, so that the run's
        # timing (run_started to run_completed) holds the training and not the import
        from gymbus.worker import training

        rng = training.seed_everything(config.seed)
        try:
            env = training.make_env(config)
        except Exception:
            self.emitter.lifecycle(LifecycleEvent.RUN_STARTED, config=config.to_dict(),
                                   **started)
            raise
        try:
            described = config.to_dict()
            # the random agent acts in any space; the learning agents' spaces (checked at
            # submit) are those the loop's own step columns hold
            if not training.loop_columns_fit(env):
                from gymbus.worker.recorded_spaces import RecordedSpaces

                self.recorded = RecordedSpaces(env, self.emitter, self.tensorboard, self.mode,
                                               config.every, settings.max_frame_bytes)
                described["spaces"] = self.recorded.spaces
            quiet_garbage_collector()
            self.train_clock = (time.monotonic(), time.process_time())
            self.emitter.lifecycle(LifecycleEvent.RUN_STARTED, config=described, **started)
            self._train(config, self.mode, self.emitter, rng, env)
        finally:
            env.close()

    def _train(self, config: RunConfig, mode: TelemetryMode, emitter: Emitter,
               rng: Any, env: Any) -> None:
        from gymbus.worker import training

        agent = training.make_agent(config, env, rng, emitter)
        evaluation = training.make_evaluation(config, agent, emitter)
        recorded = self.recorded
        if recorded is None:
            training.configure_steps(emitter, env, agent)
        progress = training.LoopResult()
        try:
            training.run_training(
                env if recorded is None else recorded.env, agent,
                emitter if recorded is None else recorded.telemetry,
                training.budget_of(config), seed=config.seed,
                mode=mode if recorded is None else TelemetryMode.FAST, every=config.every,
                stop=self.stop, progress=progress, evaluation=evaluation,
            )
        finally:  # how far it got, also when the loop raised
            self.episodes, self.steps = progress.episodes, progress.steps
            if recorded is not None:  # the episode under way, and the buffered steps
                recorded.finish()
        self._save_artifacts(agent.artifacts(), emitter)
        self.status = RunState.CANCELLED if progress.stopped else RunState.COMPLETED

    def _save_artifacts(self, artifacts: list[Artifact], emitter: Emitter) -> None:
        """Write each artifact under `artifacts/` and announce it with an artifact frame."""
        from gymbus.worker.agents.policies import write_artifact

        folder = self.run_dir / ARTIFACTS_DIR
        for artifact in artifacts:
            path = write_artifact(folder, artifact)
            emitter.artifact(artifact.name, path.relative_to(self.run_dir).as_posix(),
                             artifact.format)

    def _finish_telemetry(self) -> int:
        """Complete the TensorBoard file, then flush and send run_completed.

        TensorBoard comes first: it never waits on the network, so a cancelled run's events are
        on disk even when the last sends block. A broken socket fails the run but not the report.
        """
        if self.emitter is None:
            return 0
        self._close_tensorboard(self.emitter)
        try:
            counts = self.recorded.recorder.not_stored() if self.recorded is not None else {}
            return self.emitter.finish(self.status.value, self.reason, self.episodes, self.steps,
                                       **counts)
        except Exception as exc:  # noqa: BLE001 - result.json must still be written
            traceback.print_exc(file=sys.stderr)
            self.status = RunState.FAILED
            self.reason = self.reason or f"{type(exc).__name__}: {exc}"
            return self.emitter.seq

    def _close_tensorboard(self, emitter: Emitter) -> None:
        """Hand the metrics not yet sent to TensorBoard, then flush and close its event file."""
        if self.tensorboard is None:
            return
        try:
            emitter.feed_observers()
        except Exception:  # TensorBoard never fails a run, nor its report
            log.exception("the last metrics could not be written to TensorBoard")
        finally:
            self.tensorboard.close()

    def _write_result(self, frames_emitted: int, code: RunExit) -> None:
        """Write result.json: how the run ended, its counts, timing and telemetry stats."""
        stats = self.emitter.stats() if self.emitter is not None else {}
        timing = {}
        if self.train_clock is not None:  # from run_started to now, wall and CPU seconds
            timing = {"train_s": round(time.monotonic() - self.train_clock[0], 4),
                      "train_cpu_s": round(time.process_time() - self.train_clock[1], 4)}
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
            **timing,
            "tensorboard": self.tensorboard.stats() if self.tensorboard is not None else None,
            "pid": os.getpid(),
        }
        write_result(self.run_dir, result)


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    """Write a run folder's result.json atomically, so that the daemon never reads half of it
    (a run child's, and a launched script's: gymbus/launched.py)."""
    tmp = run_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / RESULT_FILE)


def read_result(path: Path) -> dict[str, Any] | None:
    """A run's result.json, or None when it is missing, unreadable or has no valid status."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    status = data.get("status")
    if not isinstance(status, str) or status not in {s.value for s in EXIT_CODES}:
        return None
    return data


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a text file such as run.log ('' when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 16384, 0))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m gymbus.worker.child`; returns the exit code."""
    args = parse_args(argv)
    if args.parent_pid is not None:  # before anything else: a run never outlives its worker
        orphans.die_with_parent(args.parent_pid)
    stop = RunStop().install()
    logs.setup("run")
    return RunProcess(args, stop).run()


if __name__ == "__main__":
    sys.exit(main())
