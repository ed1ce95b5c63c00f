"""`gymbus.run(...)`: a recorded run around a user's own training loop.

    with gymbus.run(name="ppo-cartpole", config=vars(args)) as run:
        envs = run.record(envs)                 # every step and episode, for any env
        ...
        run.log({"losses/value_loss": v}, step=global_step)
        run.save("agent.pt")

Opening a run registers it with the controller (it is `running` in `gymbus runs`, `gymbus
watch` and the Qt viewer while the block runs), connects an emitter to the broker and spools
every frame in the run's folder. The block's end ends the run: `completed`, `failed` with the
exception's last line as reason (the exception goes on), or `cancelled` on Ctrl-C. A run
started by a worker (`gymbus submit --command`) attaches to the run the worker made, through
the variables the worker sets. With no controller answering, or `GYMBUS_MODE=offline`, the run
records to its spool alone, and `gymbus sync` stores it later.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import zmq
from gymnasium.vector import VectorEnv
from ulid import ULID

# every module a run uses is imported with `import gymbus`, not inside a run: imported at its
# start and end they took ~5 ms of each run, and ~3 ms of a vector env's record() (profiled)
from gymbus import launched, spaces
from gymbus.recorder import EpisodeColumns, Recorder, StepPolicy
from gymbus.recording import RecordedEnv
from gymbus.registration import KeepAlive, close_run, open_run
from gymbus.shared import settings as settings_mod
from gymbus.shared.errors import GymbusError
from gymbus.shared.protocol import FrameKind, LifecycleEvent, RunState, TelemetryMode
from gymbus.shared.settings import Settings
from gymbus.sync import Confirmation, store_at_end
from gymbus.vector import RecordedVectorEnv
from gymbus.worker.telemetry.emitter import Emitter
from gymbus.worker.telemetry.spool import SpoolWriter
from gymbus.worker.telemetry.tensorboard import ScalarLog

log = logging.getLogger("gymbus.api")

#: variables a worker sets for a script it launches (`gymbus submit --command`)
RUN_ID_VAR, WORKER_ID_VAR, RUN_DIR_VAR = "GYMBUS_RUN_ID", "GYMBUS_WORKER_ID", "GYMBUS_RUN_DIR"
MODE_VAR = "GYMBUS_MODE"
DISABLE_TELEMETRY_VAR = "DISABLE_TELEMETRY"
#: seconds to wait for the broker to forward the first subscription
SUBSCRIBE_WAIT = 2.0
BACKENDS = ("gymbus", "sb3", "cleanrl", "custom")

class UsageError(GymbusError):
    """The Python API used in a way that cannot work; the message says what to do instead."""


def _true(word: str | None) -> bool:
    return (word or "").strip().lower() in {"1", "true", "yes"}


class Run:
    """One recorded run; made by `gymbus.run()`, used as a context manager."""

    def __init__(self, *, name: str = "", config: Mapping[str, Any] | None = None,
                 telemetry: str = "full", every: int = 1, agent_id: str = "agent-0",
                 tags: Mapping[str, str] | None = None, backend: str = "custom",
                 policy_label: str = "", render_hint: str = "",
                 settings: Settings | None = None) -> None:
        try:
            mode = TelemetryMode(telemetry)
        except ValueError:
            raise UsageError(f"telemetry={telemetry!r} is not one of "
                             f"{', '.join(m.value for m in TelemetryMode)}") from None
        if type(every) is not int or every < 1:
            raise UsageError(f"every={every!r} must be a positive integer")
        if backend not in BACKENDS:
            raise UsageError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
        if _true(os.environ.get(DISABLE_TELEMETRY_VAR)):
            mode = TelemetryMode.FAST
        if RUN_ID_VAR in os.environ:  # launched by a worker: the submitted mode, if it stores less
            mode, every = launched.fewer_steps(mode, every, os.environ.get(launched.TELEMETRY_VAR))
        self.settings = settings or settings_mod.load()
        self.name, self.agent_id, self.mode, self.every = name, agent_id, mode, every
        self.config = dict(config or {})
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.meta = {"backend": backend, "policy_label": policy_label, "render_hint": render_hint}
        self.attached = RUN_ID_VAR in os.environ
        self.run_id = os.environ.get(RUN_ID_VAR) or str(ULID())
        self.worker_id = os.environ.get(WORKER_ID_VAR, "")
        self.run_dir = Path(os.environ.get(RUN_DIR_VAR) or self.settings.run_dir(self.run_id))
        self.offline = os.environ.get(MODE_VAR, "").strip().lower() == "offline"
        self.status: RunState | None = None
        self.reason: str | None = None
        self._envs: list[Any] = []
        self._spaces: dict[str, Any] = {}
        self._emitter: Any = None
        self._tensorboard: Any = None
        self._ctx: zmq.Context[Any] | None = None
        self._alive: KeepAlive | None = None
        #: the frame limit this run keeps to: its setting, or the services' if lower
        self.max_frame_bytes = self.settings.max_frame_bytes
        self.recorder = Recorder(self._send, on_episodes=self._episodes_to_tensorboard,
                                 max_frame_bytes=self.max_frame_bytes)
        self._policy = StepPolicy.of_mode(mode, every)
        self._started = False
        self._announced = False
        #: why the run is to stop (empty: go on): the recorded envs' `step` and `log` raise
        #: KeyboardInterrupt at the next call once it holds a reason (a list: its truth test
        #: is done in C, once per step)
        self.stop: list[str] = []
        #: how the ended run's spool is being stored (`wait_stored`)
        self._stored: Confirmation | bool = False
        self._previous_sigint: Any = None
        self._previous_sigterm: Any = None

    # --- opening and ending -----------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.finish(RunState.COMPLETED)
        elif issubclass(kind, KeyboardInterrupt):
            self.finish(RunState.CANCELLED, self.stop[0] if self.stop else "interrupted (Ctrl-C)")
        else:
            lines = traceback.format_exception_only(kind, exc)
            self.finish(RunState.FAILED, lines[-1].strip() if lines else kind.__name__)

    def start(self) -> Run:
        """Register the run, connect its telemetry and send run_started (once)."""
        if self._started:
            raise UsageError(f"run {self.run_id} was started already")
        if self.attached:
            if launched.ended_already(self.run_dir):
                raise UsageError(f"run {self.run_id} has ended: a script launched by `gymbus "
                                 "submit --command` records one run (one gymbus.run())")
            self._previous_sigterm = launched.catch_sigterm(self.stop)
        self._started = True
        self._catch_sigint()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._ctx = zmq.Context()
        if not self.attached and not self.offline:
            self.offline = not self._open()
        elif self.offline:
            log.warning("%s=offline: recording run %s to its spool in %s (store it later with "
                        "`gymbus sync %s`)", MODE_VAR, self.run_id, self.run_dir, self.run_id)
        # offline, frames go to the spool alone: the socket is connected to nothing
        endpoint = f"inproc://gymbus-offline-{self.run_id}" if self.offline else \
            self.settings.telemetry_in
        self._emitter = Emitter.connect(
            self._ctx, endpoint, self.run_id, agent_id=self.agent_id,
            worker_id=self.worker_id, subscribe_wait=None if self.offline else SUBSCRIBE_WAIT,
            max_frame_bytes=self.max_frame_bytes)
        self._emitter.spool = SpoolWriter.create(self.run_dir)
        self._tensorboard = ScalarLog(self.run_dir)
        self._emitter.observe_metrics(self._tensorboard.add_rows)
        if not self.offline and not self.attached:
            self._alive = KeepAlive(self.settings, self._ctx, self.run_id, self.stop)
        return self

    def _catch_sigint(self) -> None:
        """Ctrl-C stops the run at the next `step` or `log` call, never inside gymbus's own
        writing (a spool record half written); a second Ctrl-C raises at once. Only when the
        script has not set a handler of its own, and on the main thread."""
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return

        def on_sigint(signum: int, frame: Any) -> None:
            if self.stop:
                raise KeyboardInterrupt
            self.stop.append("interrupted (Ctrl-C)")

        self._previous_sigint = signal.signal(signal.SIGINT, on_sigint)

    def _announce(self) -> None:
        """Send run_started before the run's first other frame, so that it holds the spaces of
        every environment recorded before the first step."""
        if self._announced:
            return
        self._announced = True
        self._emitter.lifecycle(LifecycleEvent.RUN_STARTED, config=self._config(),
                                telemetry=self.mode.value, pid=os.getpid(),
                                host=socket.gethostname(), env=self._env_id(), algo="",
                                **self.meta)

    def _config(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config, "tags": self.tags,
                "telemetry": self.mode.value, "every": self.every, "agent_id": self.agent_id,
                "spaces": self._spaces, **self.meta}

    def _env_id(self) -> str:
        return str(self.config.get("env", self.config.get("env_id", "")) or "")

    def _open(self) -> bool:
        """Register with the controller; False (offline) when it does not answer."""
        assert self._ctx is not None
        opened = open_run(self.settings, self._ctx, {
            "run_id": self.run_id, "name": self.name, "env": self._env_id(),
            "telemetry": self.mode.value, "config": self._config(),
            "host": socket.gethostname(), "pid": os.getpid()})
        if opened is None:
            log.warning("no controller at %s: recording run %s offline, to %s (store it "
                        "later with `gymbus sync %s`)", self.settings.controller, self.run_id,
                        self.run_dir, self.run_id)
            return False
        services = opened.get("max_frame_bytes")
        if type(services) is int and 0 < services < self.max_frame_bytes:
            # this shell's GYMBUS_MAX_FRAME_BYTES is not the services': frames over theirs
            # would be refused whole
            log.info("the services take frames of at most %d bytes (GYMBUS_MAX_FRAME_BYTES; "
                     "%d here): run %s keeps to theirs", services, self.max_frame_bytes,
                     self.run_id)
            self.max_frame_bytes = services
            self.recorder.value_bytes = services // 2  # before any env is recorded
        return True

    def finish(self, status: RunState = RunState.COMPLETED, reason: str | None = None) -> None:
        """End the run (the context manager does it): flush, run_completed, tell the controller."""
        if not self._started or self.status is not None:
            return
        self.status, self.reason = status, reason
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        self._announce()
        for env in self._envs:
            env.finish()
        self.recorder.flush()
        emitter = self._emitter
        try:
            emitter.feed_observers()
        finally:
            self._tensorboard.close()
        rec = self.recorder
        emitter.finish(status.value, reason, rec.episode_count, rec.steps, **rec.not_stored())
        if self.attached:  # for the worker, which reads it when the script exits
            launched.write_end(self.run_dir, status, reason, emitter.seq, rec.episode_count,
                               rec.steps, self.mode)
        if self._alive is not None:
            self._alive.close()
        assert self._ctx is not None
        if not self.offline and not self.attached:
            close_run(self.settings, self._ctx, {
                "run_id": self.run_id, "status": status.value, "reason": reason,
                "frames_emitted": emitter.seq, "episodes": rec.episode_count,
                "steps": rec.steps})
        emitter.close()
        if emitter.spool is not None:  # drops the writer lock: the run's spool is final now
            emitter.spool.close()
        if not self.offline and not self.attached:  # a worker's run: its repair stores it
            self._stored = store_at_end(self.settings, self.run_id, self.run_dir, self._ctx,
                                        emitter.seq, close=self._ctx.term)
        else:
            self._ctx.term()

    def wait_stored(self, timeout: float | None = None) -> bool:
        """Wait until the ingest holds the ended run in its main file and its spool is gone.

        The `with` block waits only until the ingest holds every frame (a query sees them
        all); its checkpoint follows within about a second, on a thread, and the script's exit
        waits for it. True once the spool is confirmed; False after `timeout` seconds, for a
        run recorded offline, one the ingest could not take whole (its spool stays for `gymbus
        sync`, said on stderr), or one launched by `gymbus submit --command` (its worker stores
        it once the script has exited)."""
        if self.status is None:
            raise UsageError("wait_stored() is for a run that has ended: call it after its "
                             "`with` block")
        stored = self._stored
        return stored if isinstance(stored, bool) else stored.wait(timeout)

    # --- recording --------------------------------------------------------------------------

    def _send(self, kind: FrameKind, body: dict[str, Any], rows: int) -> None:
        if not self._announced:
            self._announce()
        self._emitter.send_columns(kind, body, rows)

    def _episodes_to_tensorboard(self, episodes: EpisodeColumns) -> None:
        """CleanRL's episode curves in the run's TensorBoard files, from a batch of episodes."""
        if self._tensorboard is not None:
            self._tensorboard.add_episode_columns(episodes)

    def _require_open(self, what: str) -> None:
        if not self._started:
            raise UsageError(f"{what} needs a started run: use `with gymbus.run(...) as run:`")
        if self.status is not None:
            raise UsageError(f"{what}: run {self.run_id} has ended ({self.status.value})")

    def record(self, env: Any, *, info_keys: Sequence[str] = (),
               store_large_obs: bool = False) -> Any:
        """Wrap a Gymnasium env or vector env so that every step and episode is recorded.

        `info_keys` names the `info` entries stored with each step (as JSON text). Observations
        of more than `gymbus.spaces.MAX_STORED_VALUES` numbers (pixels) are stored only
        with `store_large_obs=True`; otherwise their rows hold NULL and are counted.
        """
        self._require_open("record()")
        if _is_recorded(env):
            raise UsageError("this environment is recorded already: call record() once per env")
        vector = isinstance(env, VectorEnv)
        obs_space = env.single_observation_space if vector else env.observation_space
        act_space = env.single_action_space if vector else env.action_space
        obs, action, described = spaces.env_layouts(
            obs_space, act_space, store_large_obs=store_large_obs,
            num_envs=env.num_envs if vector else 1, info_keys=info_keys)
        self._spaces[f"env{len(self._envs)}" if self._envs else "env"] = described
        wrapped: RecordedEnv | RecordedVectorEnv
        if vector:
            wrapped = RecordedVectorEnv(env, self.recorder, self._policy, obs, action, info_keys,
                                        self.stop)
        else:  # several single envs of one run (SB3's wrapper_class): one env_index each
            index = sum(isinstance(e, RecordedEnv) for e in self._envs)
            wrapped = RecordedEnv(env, self.recorder, self._policy, obs, action, info_keys, index,
                                  self.stop)
        self._envs.append(wrapped)
        return wrapped

    def log(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Metrics (name -> number) at `step` (the global step; default: steps recorded so far),
        into the `metrics` table and the run's TensorBoard files."""
        self._require_open("log()")
        if self.stop:
            raise KeyboardInterrupt(self.stop[0])
        if not isinstance(values, Mapping):
            raise UsageError(f"log() takes a mapping of names to numbers, got {type(values).__name__}")
        self._announce()
        at = self.recorder.steps if step is None else step
        if type(at) is not int and not isinstance(at, np.integer):
            raise UsageError(f"log(step={step!r}): the step must be an integer")
        metric = self._emitter.metric
        for name, value in values.items():
            if not isinstance(name, str) or not name:
                raise UsageError(f"log(): metric names are non-empty strings, got {name!r}")
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                value = _scalar(name, value)
            metric(name, int(at), float(value))

    def save(self, path: str | os.PathLike[str], name: str | None = None) -> Path:
        """Copy a file into the run's `artifacts/` folder and announce it (an artifact frame)."""
        self._require_open("save()")
        source = Path(path)
        if not source.is_file():
            raise UsageError(f"save({str(path)!r}): no such file")
        folder = self.run_dir / "artifacts"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / (name or source.name)
        shutil.copyfile(source, target)
        self._announce()
        self._emitter.artifact(target.name, target.relative_to(self.run_dir).as_posix(),
                               source.suffix.lstrip(".") or "file")
        return target

    def stats(self) -> dict[str, Any]:
        """What was recorded and sent so far: the emitter's counters and the recorder's."""
        rec = self.recorder
        return {**(self._emitter.stats() if self._emitter is not None else {}),
                "steps": rec.steps, "episodes": rec.episode_count,
                "obs_not_stored": rec.obs_not_stored, "rows_refused": rec.refused,
                "offline": self.offline}


def _scalar(name: str, value: Any) -> float:
    """A metric value that is not a plain number: a 0-d array or tensor, else UsageError."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0 and not isinstance(value, bool):
        out = item()
        if isinstance(out, int | float) and not isinstance(out, bool):
            return float(out)
    raise UsageError(f"log(): {name!r} is a {type(value).__name__}, not a number; log a float "
                     "(for a tensor: .item(); for an array: a scalar of it)")


def _is_recorded(env: Any) -> bool:
    while env is not None:
        if isinstance(env, RecordedEnv | RecordedVectorEnv):
            return True
        env = getattr(env, "env", None)
    return False


def run(name: str = "", config: Mapping[str, Any] | None = None, *, telemetry: str = "full",
        every: int = 1, agent_id: str = "agent-0", tags: Mapping[str, str] | None = None,
        backend: str = "custom", policy_label: str = "", render_hint: str = "") -> Run:
    """A recorded run: use it as `with gymbus.run(...) as run:` (see the module's docstring)."""
    return Run(name=name, config=config, telemetry=telemetry, every=every, agent_id=agent_id,
               tags=tags, backend=backend, policy_label=policy_label, render_hint=render_hint)
