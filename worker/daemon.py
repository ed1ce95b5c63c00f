"""The worker daemon: takes runs from the broker and executes each in its own child process
(a run child, or a command run's script: worker/command.py).

One loop (`Worker.serve`), read top to bottom: poll the broker's socket with a timeout no longer
than the heartbeat interval, dispatch each message through a table keyed by `Command`, then do
the housekeeping on every pass: reap finished children, escalate cancels, heartbeat, count the
broker's liveness down (re-registering with a fresh socket when it runs out), and repair: ask the
ingest about spooled runs and replay what it misses (worker/telemetry/repair.py, never blocking the loop).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq

from gymbus.shared import settings as settings_mod
from gymbus.shared.codec import Message, decode_message, encode_message
from gymbus.shared.errors import ConfigError, DecodeError
from gymbus.shared.protocol import Command, RunState
from gymbus.shared.runconfig import RunConfig, parse_config
from gymbus.shared.service import StopFlag
from gymbus.shared.settings import Settings
from gymbus.shared.transport import connect, new_socket
from gymbus.worker import command, orphans
from gymbus.worker.child import CONFIG_FILE, LOG_FILE, RESULT_FILE
from gymbus.worker.children import Child
from gymbus.worker.limits import RunLimits
from gymbus.worker.telemetry import spool
from gymbus.worker.telemetry.repair import Repairer

log = logging.getLogger("gymbus.worker")

#: seconds between SIGTERM and SIGKILL for a cancelled run (it must be gone within 2 s)
CANCEL_GRACE = 1.5
#: seconds the daemon's own shutdown waits for its children before killing them
SHUTDOWN_GRACE = 2.5
#: seconds the daemon's shutdown waits, after its children, for the ingest to confirm their
#: spools (the launcher allows a service 5 s to stop)
DRAIN_GRACE = 1.5
#: longest poll while children run, so that an exit is reported promptly
REAP_INTERVAL = 0.1
#: longest poll at all, so that a stop signal is seen promptly
MAX_POLL = 0.25
#: poll while frames wait to be replayed: the loop turns at once, replaying a batch per pass
REPAIR_POLL = 0.002
LINGER_MS = 500
#: lines of run.log quoted as the reason of a run that left no result.json
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
_FINAL_STATES = frozenset({RunState.COMPLETED, RunState.FAILED, RunState.CANCELLED})


class Worker:
    """The daemon's state and its loop; everything runs on the main thread."""

    def __init__(
        self,
        settings: Settings,
        ctx: zmq.Context[Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.ctx = ctx or zmq.Context()
        self.clock = clock
        self.identity = settings.worker_id.encode("utf-8")
        self.children: dict[str, Child] = {}
        self.sock: zmq.Socket[Any] | None = None
        self.liveness = settings.heartbeat_liveness
        self.heard = False
        #: the runs are held (SIGSTOP) while the broker is silent: see `hold_runs`
        self.holding = False
        self.next_heartbeat = 0.0
        self._closed = False
        #: final run_updates sent since the broker was last heard, re-sent after a reconnect
        self.unconfirmed: list[dict[str, Any]] = []
        #: spooled runs: the ingest is asked what it misses, and it is replayed
        self.repair = Repairer(settings, self.ctx, clock)
        #: the capacity advertised, and each run's cores, memory, GPUs and deadline
        self.limits = RunLimits.detect()
        self.handlers: dict[Command, Callable[[dict[str, Any]], None]] = {
            Command.RUN: self.on_run,
            Command.CANCEL: self.on_cancel,
            Command.HEARTBEAT: self.on_heartbeat,
        }

    # --- the loop -----------------------------------------------------------------------------

    def serve(self, stop: StopFlag) -> None:
        """Run until `stop` is set (SIGTERM/SIGINT); `close` then stops every child."""
        log.info("worker %s: %d slots, broker at %s", self.settings.worker_id,
                 self.settings.worker_slots, self.settings.broker_workers)
        self.connect_to_broker()
        self.repair.scan()
        while not stop:
            sock = self.require_socket()
            if sock.poll(int(self.poll_timeout() * 1000), zmq.POLLIN):
                self.receive_all(sock)
            self.reap_children()
            self.escalate_cancels()
            self.limits.enforce(self.clock())
            self.heartbeat()
            self.repair_spools()

    def poll_timeout(self) -> float:
        """Seconds until the next thing to do, at most MAX_POLL."""
        now = self.clock()
        timeout = min(MAX_POLL, self.settings.heartbeat_interval, self.next_heartbeat - now)
        if self.children:
            timeout = min(timeout, REAP_INTERVAL)
        if self.repair.busy():
            timeout = min(timeout, REPAIR_POLL)
        return max(timeout, 0.0)

    def repair_spools(self) -> None:
        """One repair pass; a bug in it costs the pass, never the worker's heartbeats."""
        try:
            self.repair.tick()
        except Exception:
            log.exception("spool repair pass failed")

    def receive_all(self, sock: zmq.Socket[Any]) -> None:
        """Handle every message waiting on the socket; any message proves the broker alive."""
        while True:
            try:
                parts = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self.liveness = self.settings.heartbeat_liveness
            self.heard = True
            self.unconfirmed.clear()
            if self.holding:
                self.hold_runs(False)
            try:
                msg = decode_message(parts[-1], self.settings.max_frame_bytes)
            except DecodeError as exc:
                log.warning("dropped a malformed message from the broker: %s", exc)
                continue
            self.dispatch(msg)

    def dispatch(self, msg: Message) -> None:
        handler = self.handlers.get(msg.cmd)
        if handler is None:
            log.warning("ignored %s: not a broker-to-worker command", msg.cmd.value)
            return
        handler(msg.body)

    # --- handlers -----------------------------------------------------------------------------

    def on_heartbeat(self, body: dict[str, Any]) -> None:
        return None  # receiving it was the point

    def on_run(self, body: dict[str, Any]) -> None:
        run_id = body.get("run_id")
        if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
            log.warning("refused a run with a bad run_id: %r", run_id)
            if isinstance(run_id, str):
                self.dispatch_failed(run_id, f"bad run_id {run_id!r}")
            return
        if run_id in self.children:
            # a repeated dispatch (e.g. after a reconnect): the run is already going
            self.send_run_update(run_id, RunState.RUNNING)
            return
        if len(self.children) >= self.settings.worker_slots:
            self.dispatch_failed(run_id, f"no free slot: {len(self.children)} of "
                                         f"{self.settings.worker_slots} busy")
            return
        try:
            config = parse_config(body.get("config"))
        except ConfigError as exc:
            self.dispatch_failed(run_id, f"invalid config: {exc}")
            return
        refusal = self.limits.refusal(config)
        if refusal is not None:
            self.dispatch_failed(run_id, refusal)
            return
        services = body.get("max_frame_bytes")
        try:
            self.children[run_id] = self.spawn(
                run_id, config, services if type(services) is int and services > 0 else None)
        except command.LaunchError as exc:  # the same on any worker: the run fails
            self.send_run_update(run_id, RunState.FAILED, reason=str(exc))
            return
        except (OSError, TypeError, ValueError) as exc:
            self.dispatch_failed(run_id, f"could not start the run process: {exc}")
            return
        log.info("run %s started (pid %d, %s on %s)", run_id,
                 self.children[run_id].process.pid, config.algo, config.env)
        self.send_run_update(run_id, RunState.RUNNING)

    def on_cancel(self, body: dict[str, Any]) -> None:
        run_id = body.get("run_id")
        child = self.children.get(run_id) if isinstance(run_id, str) else None
        if child is None:
            log.info("cancel for a run this worker does not hold: %r (ignored)", run_id)
            return
        if child.cancel_requested:
            return
        log.info("cancelling run %s (pid %d)", run_id, child.process.pid)
        child.cancel_requested = True
        child.kill_at = self.clock() + CANCEL_GRACE
        self.signal_child(child, signal.SIGTERM)

    # --- children -----------------------------------------------------------------------------

    def spawn(self, run_id: str, config: RunConfig, max_frame_bytes: int | None = None) -> Child:
        """Create the run folder, write config.json, start the child (or the command run's
        script) with output to run.log. `max_frame_bytes`: the services' frame limit (the
        broker's, with the dispatch); the run keeps to it when it is lower than this worker's."""
        run_dir = self.settings.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RESULT_FILE).unlink(missing_ok=True)
        spool.reset(run_dir)  # an earlier attempt's spool: the child starts a new one
        (run_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2), "utf-8")
        log_file = open(run_dir / LOG_FILE, "ab")  # noqa: SIM115 - closed when the child is reaped
        cmd = [sys.executable, "-m", "gymbus.worker.child", "--run-dir", str(run_dir),
               "--run-id", run_id, "--worker-id", self.settings.worker_id,
               "--parent-pid", str(os.getpid())]
        allocation = self.limits.allocate(run_id, config, run_dir)
        env = {**os.environ, **settings_mod.env_for(self.settings), **allocation.env()}
        if max_frame_bytes is not None and max_frame_bytes < self.settings.max_frame_bytes:
            env[settings_mod.PREFIX + "MAX_FRAME_BYTES"] = str(max_frame_bytes)
        # in a session of its own: a Ctrl-C in the terminal reaches the daemon, which stops runs
        try:
            if config.launches:
                process = command.launch(config, run_id, self.settings.worker_id, run_dir, env,
                                         log_file, allocation.preexec())
            else:
                process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                           stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True,
                                           # the daemon runs no Python threads; the
                                           # function makes system calls only
                                           preexec_fn=allocation.preexec())  # noqa: PLW1509
        except BaseException:
            log_file.close()
            self.limits.finish(run_id, RunState.FAILED, None)  # frees what it took
            raise
        allocation.started(process.pid, self.clock())
        self.repair.track(run_id, run_dir, running=True)
        watchdog = orphans.watch_group(process.pid) if config.launches else None
        return Child(run_id, process, run_dir, log_file, script=config.launches,
                     watchdog=watchdog)

    def signal_child(self, child: Child, signum: int) -> None:
        child.signal(signum)

    def reap_children(self) -> None:
        """Report every child that has exited."""
        for child in list(self.children.values()):
            if child.process.poll() is not None:
                self.finish_child(child)

    def escalate_cancels(self) -> None:
        """SIGKILL cancelled children that outlived their grace period."""
        now = self.clock()
        for child in self.children.values():
            if child.kill_at is not None and now >= child.kill_at:
                log.warning("run %s did not stop within %.1f s of SIGTERM: killing it",
                            child.run_id, CANCEL_GRACE)
                self.signal_child(child, signal.SIGKILL)
                child.kill_at = None

    def finish_child(self, child: Child) -> None:
        """Send the final run_update of an exited child, from its result.json if it left one."""
        del self.children[child.run_id]
        child.log_file.close()
        self.repair.run_ended(child.run_id)
        code = child.process.returncode
        state, reason, result = child.outcome()
        state, reason = self.limits.finish(child.run_id, state, reason)  # over a limit: failed
        log.info("run %s %s (exit code %s)", child.run_id, state.value, code)
        self.send_run_update(
            child.run_id, state, reason=reason, frames_emitted=result.get("frames_emitted"),
            episodes=result.get("episodes"), steps=result.get("steps"),
        )

    # --- the broker ---------------------------------------------------------------------------

    def connect_to_broker(self) -> None:
        """A fresh DEALER to the broker, then `ready` with the runs this worker still holds."""
        sock = new_socket(self.ctx, zmq.DEALER, identity=self.identity, linger=LINGER_MS)
        connect(sock, self.settings.broker_workers, "broker")
        self.sock = sock
        self.liveness = self.settings.heartbeat_liveness
        self.heard = False
        self.next_heartbeat = self.clock() + self.settings.heartbeat_interval
        self.send(Command.READY, {
            "worker_id": self.settings.worker_id, "host": socket.gethostname(),
            "pid": os.getpid(), "slots": self.settings.worker_slots, "runs": list(self.children),
            "capacity": self.limits.capacity.to_wire(),
        })
        for update in self.unconfirmed:
            self.send(Command.RUN_UPDATE, update)

    def heartbeat(self) -> None:
        """Every interval: count liveness down unless the broker was heard, then heartbeat."""
        now = self.clock()
        if now < self.next_heartbeat:
            return
        self.next_heartbeat = now + self.settings.heartbeat_interval
        if not self.heard:
            self.liveness -= 1
        self.heard = False
        if self.liveness <= 0:
            log.warning("broker silent for %d heartbeats: reconnecting and re-registering "
                        "(%d runs held)", self.settings.heartbeat_liveness, len(self.children))
            self.hold_runs(True)
            self.require_socket().close(linger=0)
            self.connect_to_broker()
            return
        self.send(Command.HEARTBEAT, {"busy": len(self.children), "runs": list(self.children)})

    def hold_runs(self, hold: bool) -> None:
        """Stop (SIGSTOP) every run while the broker is silent, or let them go on (SIGCONT).

        By now the broker has stopped hearing this worker too, and tells the controller that
        its runs are `lost`: a lost run must not train on. Held, it neither trains nor
        publishes; when the broker is heard again the runs go on, and the broker cancels those
        the controller holds lost (a cut link), while after a broker restart they continue.
        """
        if hold and self.children and not self.holding:
            log.warning("holding %d runs until the broker is heard again", len(self.children))
        elif not hold and self.holding:
            log.info("the broker is back: %d held runs go on", len(self.children))
        if hold == self.holding or not self.children:
            return
        self.holding = hold
        for child in self.children.values():
            self.signal_child(child, signal.SIGSTOP if hold else signal.SIGCONT)

    def require_socket(self) -> zmq.Socket[Any]:
        if self.sock is None:
            raise RuntimeError("the worker has no broker socket (connect_to_broker not called)")
        return self.sock

    def send(self, cmd: Command, body: dict[str, Any]) -> None:
        """Send without blocking; a message the queue cannot take is logged and dropped."""
        try:
            self.require_socket().send(encode_message(cmd, body), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("dropped %s: the queue to the broker is full", cmd.value)

    def send_run_update(self, run_id: str, state: RunState, *, reason: str | None = None,
                        frames_emitted: int | None = None, episodes: int | None = None,
                        steps: int | None = None) -> None:
        update = {"run_id": run_id, "state": state.value, "reason": reason,
                  "frames_emitted": frames_emitted, "episodes": episodes, "steps": steps}
        if state in _FINAL_STATES:
            self.unconfirmed.append(update)
        self.send(Command.RUN_UPDATE, update)

    def dispatch_failed(self, run_id: str, reason: str) -> None:
        log.warning("refused run %s: %s", run_id, reason)
        self.send(Command.DISPATCH_FAILED, {"run_id": run_id, "reason": reason})

    # --- shutdown -----------------------------------------------------------------------------

    def close(self) -> None:
        """SIGTERM every child, SIGKILL stragglers after SHUTDOWN_GRACE, report, disconnect.
        Idempotent; also after a failed start (no broker socket yet)."""
        if self._closed:
            return
        self._closed = True
        log.info("stopping: %d runs to cancel", len(self.children))
        self.hold_runs(False)
        for child in self.children.values():
            child.cancel_requested = True
            self.signal_child(child, signal.SIGTERM)
        deadline = self.clock() + SHUTDOWN_GRACE
        for child in list(self.children.values()):
            try:
                child.process.wait(timeout=max(deadline - self.clock(), 0.0))
            except subprocess.TimeoutExpired:
                log.warning("run %s ignored SIGTERM: killing it", child.run_id)
                self.signal_child(child, signal.SIGKILL)
                try:
                    child.process.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    log.error("run %s (pid %d) survived SIGKILL", child.run_id, child.process.pid)
                    continue
            self.finish_child(child)
        # what the runs sent is stored before the worker goes (the ingest outlives it in an
        # ordered stop): what the ingest still misses is replayed from the spools
        left = self.repair.drain(DRAIN_GRACE)
        if left:
            log.warning("stopping with %d spools the ingest has not confirmed", left)
        if self.sock is not None:
            self.send(Command.DISCONNECT, {})
            self.sock.close(linger=LINGER_MS)
            self.sock = None
        self.repair.close()
        self.ctx.term()
