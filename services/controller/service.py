"""The controller: validates and stores runs, schedules them onto workers, tracks their states.

A ROUTER serves the CLI and viewers; a DEALER (identity `controller`) talks to the broker, says
`hello` every heartbeat interval, and is closed and recreated when the broker falls silent. One
loop, `serve()`, polls both, dispatches through tables keyed by Command, and on every pass does its
housekeeping: hello, broker liveness, dispatches never acknowledged, and scheduling.

Run it with `python -m gymbus.services.controller`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import zmq

from gymbus.services.controller.listing import list_runs
from gymbus.services.controller.placement import Resources
from gymbus.services.controller.registry import Registry, Run
from gymbus.services.controller.removal import delete_run
from gymbus.services.controller.scheduler import Scheduler, parse_workers
from gymbus.services.controller.scripts import OWNER_PREFIX, ScriptRuns
from gymbus.services.controller.validation import Submission, Validator
from gymbus.shared.codec import decode_message, encode_message
from gymbus.shared.errors import DecodeError, RequestError
from gymbus.shared.gate import RoleRequestTable
from gymbus.shared.protocol import (
    CONTROLLER_IDENTITY,
    TERMINAL_STATES,
    Command,
    ErrorCode,
    RunState,
)
from gymbus.shared.runconfig import parse_config
from gymbus.shared.service import StopFlag, run_until_stopped
from gymbus.shared.settings import Settings
from gymbus.shared.transport import (
    LINGER_MS,
    bind,
    connect,
    new_socket,
)

log = logging.getLogger("gymbus.controller")

#: messages taken from one socket per pass, so that housekeeping runs under any load
MAX_BATCH = 1000

ApiHandler = Callable[[dict[str, Any]], dict[str, Any]]
BrokerHandler = Callable[[dict[str, Any], float], None]


def require(body: dict[str, Any], name: str, kind: type) -> Any:
    """A field of a request body, of the given type, or a bad_request error naming it."""
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(ErrorCode.BAD_REQUEST, f"{name} must be {kind.__name__}, got {value!r}")
    return value


def optional(body: dict[str, Any], name: str, kind: type) -> Any:
    """A field that may be nil; a value of the wrong type counts as nil (logged)."""
    value = body.get(name)
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    log.warning("ignoring %s=%r: expected %s or nil", name, value, kind.__name__)
    return None


class Controller:
    """The controller's sockets, registry and scheduler. Everything runs on the loop thread but
    a submission's environment and policy checks, which run on the validator's threads."""

    def __init__(
        self,
        settings: Settings,
        ctx: zmq.Context[Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.ctx = ctx or zmq.Context()
        self.window = settings.heartbeat_interval * settings.heartbeat_liveness
        self.scheduler = Scheduler(settings.heartbeat_interval, settings.heartbeat_liveness)
        self.malformed = 0
        #: active runs a cancel was asked for: if their dispatch fails they end, not requeue
        self.cancelling: set[str] = set()
        #: lost runs their worker lists again: said once in the log, cancelled at every view
        self.stopping_lost: set[str] = set()
        self._closed = False
        self.poller = zmq.Poller()
        self.registry = Registry(settings.registry_path)
        try:
            self.api = new_socket(self.ctx, zmq.ROUTER)
            bind(self.api, settings.controller, "controller API (ROUTER)")
            self.poller.register(self.api, zmq.POLLIN)
            self.broker: zmq.Socket[Any] | None = None
            self._connect_broker()
        except BaseException:
            self.registry.close()
            self.ctx.destroy(linger=0)
            raise
        self.validator = Validator(settings)
        self.poller.register(self.validator.wakeup_fd, zmq.POLLIN)
        now = self.clock()
        self.broker_seen_at = now
        self.broker_lost = False
        self.next_hello = now
        # runs dispatched before a restart wait for their acknowledgement like new ones
        for run in self.registry.active():
            if run.state is RunState.DISPATCHED and run.worker_id is not None:
                self.scheduler.sent(run.run_id, run.worker_id, now)
        self.scripts = ScriptRuns(self.registry, self.window, clock,
                                  max_frame_bytes=settings.max_frame_bytes)
        self._api: dict[Command, ApiHandler] = {
            Command.OPEN_RUN: self.scripts.open_run,
            Command.RUN_ALIVE: self.scripts.run_alive,
            Command.CLOSE_RUN: self.scripts.close_run,
            Command.PING: self.ping,
            Command.LIST_RUNS: functools.partial(list_runs, self.registry,
                                                 self.scheduler.annotate),
            Command.GET_RUN: self.get_run,
            Command.CANCEL: self.cancel,
            Command.LIST_WORKERS: self.list_workers,
            Command.DELETE_RUN: functools.partial(delete_run, self.registry, settings),
        }
        self._from_broker: dict[Command, BrokerHandler] = {
            Command.WORKERS: self.on_workers,
            Command.RUN_UPDATE: self.on_run_update,
            Command.DISPATCH_FAILED: self.on_dispatch_failed,
            Command.WORKER_LOST: self.on_worker_lost,
        }
        self.requests = RoleRequestTable("controller", self._api, log, peer="client",
                                         later={Command.SUBMIT: self.submit},
                                         max_bytes=settings.max_frame_bytes, batch=MAX_BATCH,
                                         on_open=self.grant)

    def _connect_broker(self) -> None:
        """Open a fresh DEALER to the broker (closing the old one: no stale replies)."""
        if self.broker is not None:
            self.poller.unregister(self.broker)
            self.broker.close(linger=0)
        self.broker = new_socket(self.ctx, zmq.DEALER, identity=CONTROLLER_IDENTITY)
        connect(self.broker, self.settings.broker_controller, "broker")
        self.poller.register(self.broker, zmq.POLLIN)

    # --- the loop -------------------------------------------------------------------------------

    def serve(self, stop: StopFlag) -> None:
        """Answer requests, follow the broker and schedule until `stop` is set."""
        log.info(
            "controller up: API %s, broker %s, registry %s (%d queued, %d active)",
            self.settings.controller, self.settings.broker_controller, self.registry.path,
            len(self.registry.queued()), len(self.registry.active()),
        )
        while not stop:
            timeout_ms = max(0, math.ceil((self.next_hello - self.clock()) * 1000))
            events = dict(self.poller.poll(timeout_ms))
            if self.api in events:
                self.requests.answer_waiting(self.api)
            if self.broker in events:
                self._drain_broker()
            if self.validator.wakeup_fd in events:
                self.finish_submissions()
            self.housekeeping()

    def _drain_broker(self) -> None:
        sock = self.broker
        for _ in range(MAX_BATCH):
            if sock is None or not sock.poll(0, zmq.POLLIN):
                return
            data = sock.recv()
            now = self.clock()
            if self.broker_lost:
                log.info("the broker answers again")
                self.broker_lost = False
            self.broker_seen_at = now
            try:
                msg = decode_message(data, self.settings.max_frame_bytes)
                handler = self._from_broker.get(msg.cmd)
                if handler is None:
                    raise DecodeError(f"unexpected command {msg.cmd.value!r}")
                handler(msg.body, now)
            except (DecodeError, RequestError) as exc:
                self.malformed += 1
                log.warning("malformed message from the broker (%d so far): %s", self.malformed, exc)
            except Exception:  # a bug must cost one message, not the service
                log.exception("handling a message from the broker failed")

    def housekeeping(self) -> None:
        """Hello on schedule, reconnect a silent broker, take back lost dispatches, schedule."""
        now = self.clock()
        if now - self.broker_seen_at >= self.window:
            log.warning(
                "the broker at %s has been silent for %.2f s; reconnecting",
                self.settings.broker_controller, now - self.broker_seen_at,
            )
            self._connect_broker()
            self.scheduler.clear_view()
            self.broker_lost = True
            self.broker_seen_at = now
            self.next_hello = now
        self.scripts.expire()
        if now >= self.next_hello:
            self.send_broker(Command.HELLO, {})
            self.next_hello = now + self.settings.heartbeat_interval
        for late in self.scheduler.unacknowledged(now):
            run = self.registry.get(late.run_id)
            if run is not None and run.state is RunState.DISPATCHED and run.worker_id == late.worker_id:
                self.take_back(run.run_id, late.worker_id, f"worker {late.worker_id} did not "
                               f"acknowledge the dispatch within {self.scheduler.ack_timeout:.1f} s")
        self.schedule(now)

    def take_back(self, run_id: str, worker_id: str, reason: str) -> None:
        """A dispatch failed: queue the run again (or end it, if a cancel was asked for)."""
        log.warning("dispatch of run %s to worker %s failed: %s", run_id, worker_id, reason)
        self.scheduler.acknowledged(run_id)
        self.scheduler.refused(worker_id)
        if run_id in self.cancelling:
            self.cancelling.discard(run_id)
            self.registry.finish(run_id, RunState.CANCELLED, reason="cancelled before it started")
        else:
            self.registry.requeue(run_id, reason)

    def schedule(self, now: float) -> None:
        """Dispatch queued runs, oldest first, each to the worker with the most free slots that
        has the cpus, memory and GPUs it asks for; a run that fits none waits, saying why."""
        free = sum(self.scheduler.free_slots().values())
        if free <= 0:
            return
        queued = self.registry.queued(limit=free + len(self.scheduler.waiting))
        placement = self.scheduler.placement(
            (r.worker_id, r.config) for r in (self.registry.active() if queued else ()))
        for run in queued:
            if not any(self.scheduler.free_slots().values()):
                break
            asked = Resources.asked(run.config)
            worker_id = self.scheduler.pick_worker(lambda w: placement.fits(w, asked))  # noqa: B023
            if worker_id is None:
                placement.wait(run.run_id, run.config)
                continue
            if self.registry.mark_dispatched(run.run_id, worker_id) is None:
                continue
            placement.placed(run.run_id, worker_id, run.config)
            self.scheduler.sent(run.run_id, worker_id, now)
            self.send_broker(
                Command.DISPATCH, {"run_id": run.run_id, "worker_id": worker_id, "config": run.config}
            )
        self.scheduler.settle(placement, (run.run_id for run in queued))

    def grant(self, run_id: str, key: str) -> None:
        """A script's run opened with a restricted key: the broker lets that key publish it."""
        self.send_broker(Command.GRANT, {"run_id": run_id, "key": key})

    def send_broker(self, cmd: Command, body: dict[str, Any]) -> None:
        if self.broker is None:
            return
        try:
            self.broker.send(encode_message(cmd, body), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("the broker's queue is full; %s dropped", cmd.value)

    # --- the API (CLI and viewers) --------------------------------------------------------------

    def ping(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"service": "controller"}

    def submit(self, identity: bytes, req: int, body: dict[str, Any]) -> None:
        """Validate (ConfigError naming the field; nothing stored) and queue a run.

        A key already used, or a config that fails to parse, is answered at once; a parsed
        config goes to the validator, and `finish_submissions` answers once it is checked.
        """
        key = body.get("idempotency_key") or ""
        if not isinstance(key, str):
            raise RequestError(ErrorCode.BAD_REQUEST, f"idempotency_key must be a string, got {key!r}")
        existing = self.registry.by_idempotency_key(key) if key else None
        if existing is not None:
            reply = {"run_id": existing.run_id, "created": False, "run": existing.to_wire()}
            self.requests.answer(self.api, identity, req, Command.SUBMIT, lambda: reply)
            return
        self.validator.start(Submission(identity, req, key, parse_config(body.get("config"))))

    def finish_submissions(self) -> None:
        """Answer the submissions the validator has checked: its error, or the run now queued."""
        for sub, error in self.validator.finished():
            self.requests.answer(self.api, sub.identity, sub.req, Command.SUBMIT,
                                 functools.partial(self._queue_checked, sub, error))

    def _queue_checked(self, sub: Submission, error: Exception | None) -> dict[str, Any]:
        if error is not None:
            raise error
        run, created = self.registry.submit(sub.config, sub.key)
        if created:
            log.info("run %s queued: %s %s %s", run.run_id, sub.config.algo, sub.config.env,
                     sub.config.name)
        return {"run_id": run.run_id, "created": created, "run": run.to_wire()}

    def get_run(self, body: dict[str, Any]) -> dict[str, Any]:
        run = self._require_run(require(body, "run_id", str))
        return {"run": self.scheduler.annotate(run.to_wire())}

    def cancel(self, body: dict[str, Any]) -> dict[str, Any]:
        """Cancel a queued run at once; ask the worker of an active one (the CLI then polls)."""
        run = self._require_run(require(body, "run_id", str))
        if run.terminal:
            raise RequestError(
                ErrorCode.NOT_CANCELLABLE, f"run {run.run_id} is already {run.state.value}"
            )
        if run.state is RunState.QUEUED:
            cancelled = self.registry.finish(
                run.run_id, RunState.CANCELLED, reason="cancelled before it was dispatched"
            )
            return {"run": (cancelled or self._require_run(run.run_id)).to_wire()}
        if (run.worker_id or "").startswith(OWNER_PREFIX):  # a script's own run
            return {"run": run.to_wire(), **self.scripts.cancel(run.run_id)}
        if run.worker_id not in self.scheduler.workers:
            raise RequestError(ErrorCode.WORKER_GONE, (
                f"run {run.run_id} is {run.state.value} on worker {run.worker_id}, which is not "
                "connected; the run will be marked lost"))
        self.send_broker(Command.CANCEL, {"run_id": run.run_id, "worker_id": run.worker_id})
        self.cancelling.add(run.run_id)
        log.info("cancel of run %s sent to worker %s", run.run_id, run.worker_id)
        return {"run": run.to_wire()}

    def list_workers(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"workers": self.scheduler.records()}

    def _require_run(self, run_id: str) -> Run:
        run = self.registry.get(run_id)
        if run is None:
            raise RequestError(ErrorCode.UNKNOWN_RUN, f"no run {run_id!r}")
        return run

    # --- from the broker ------------------------------------------------------------------------

    def on_workers(self, body: dict[str, Any], now: float) -> None:
        """A fresh worker view; also the moment to notice workers that vanished from it."""
        views = parse_workers(body)
        self.scheduler.update_view(views, now)
        # a run keeps its publishing grant across a broker restart: the broker remembers none,
        # and a worker's runs are its own only as this registry says (roles, grants.py)
        # a worker back with a run given up as lost (the broker cancels those it knew the worker
        # held; one dispatched just before the worker fell silent it may not have): stop it, so
        # that a lost run has really stopped
        for view in views:
            for run_id in view.runs:
                run = self.registry.get(run_id)
                if run is None or run.worker_id != view.worker_id:
                    continue
                if not run.terminal:
                    self.send_broker(Command.GRANT, {"run_id": run_id,
                                                     "worker_id": view.worker_id})
                elif run.state is RunState.LOST:
                    if run_id not in self.stopping_lost:
                        self.stopping_lost.add(run_id)
                        log.warning("worker %s lists run %s, which is lost: cancelling it",
                                    view.worker_id, run_id)
                    self.send_broker(Command.CANCEL, {"run_id": run_id,
                                                      "worker_id": view.worker_id})
        self.stopping_lost &= {run_id for view in views for run_id in view.runs}
        holding = {run.worker_id for run in self.registry.active()
                   if run.worker_id is not None and not run.worker_id.startswith(OWNER_PREFIX)}
        for worker_id in self.scheduler.absent_workers(holding, now):
            self._lose_runs(worker_id, f"worker {worker_id} is gone: absent from the broker's "
                            f"worker list for {self.scheduler.absence_window:.1f} s")

    def on_run_update(self, body: dict[str, Any], now: float) -> None:
        run_id = require(body, "run_id", str)
        worker_id = require(body, "worker_id", str)
        try:
            state = RunState(require(body, "state", str))
        except ValueError:
            raise DecodeError(f"run_update with unknown state {body.get('state')!r}") from None
        run = self.registry.get(run_id)
        if run is None:
            log.warning("update %s for unknown run %s from worker %s", state.value, run_id, worker_id)
            return
        if run.terminal:
            log.info("ignoring %s for run %s: it is already %s", state.value, run_id, run.state.value)
            return
        if run.worker_id != worker_id:
            log.warning("run %s: %s from worker %s, but the run is %s on %s", run_id, state.value,
                        worker_id, run.state.value, run.worker_id)
            if state is RunState.RUNNING:  # a stray copy (its dispatch was taken back): stop it
                self.send_broker(Command.CANCEL, {"run_id": run_id, "worker_id": worker_id})
            return
        if state is RunState.RUNNING:
            # the slot stays counted as in flight until the worker view lists the run: the
            # view's `busy` may still predate it, and the slot would look free twice
            self.registry.mark_running(run_id)
        elif state in TERMINAL_STATES:
            self.scheduler.acknowledged(run_id)
            self.cancelling.discard(run_id)
            self.registry.finish(
                run_id, state, reason=optional(body, "reason", str),
                frames_emitted=optional(body, "frames_emitted", int),
                episodes=optional(body, "episodes", int), steps=optional(body, "steps", int),
            )
        else:
            log.warning("run %s: a worker cannot report %s; ignored", run_id, state.value)

    def on_dispatch_failed(self, body: dict[str, Any], now: float) -> None:
        run_id = require(body, "run_id", str)
        worker_id = require(body, "worker_id", str)
        reason = str(body.get("reason") or "dispatch failed")
        run = self.registry.get(run_id)
        if run is None or run.state is not RunState.DISPATCHED or run.worker_id != worker_id:
            log.info("ignoring dispatch_failed for run %s on %s: %s", run_id, worker_id, reason)
            return
        self.take_back(run_id, worker_id, reason)

    def on_worker_lost(self, body: dict[str, Any], now: float) -> None:
        worker_id = require(body, "worker_id", str)
        log.warning("worker %s lost (its runs: %s)", worker_id, body.get("runs"))
        self.scheduler.drop_worker(worker_id)
        self._lose_runs(worker_id, f"worker {worker_id} stopped answering heartbeats")

    def _lose_runs(self, worker_id: str, reason: str) -> None:
        for run in self.registry.active(worker_id):
            self.scheduler.acknowledged(run.run_id)
            self.cancelling.discard(run.run_id)
            self.registry.finish(run.run_id, RunState.LOST, reason=reason)

    # --- shutdown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the sockets with a bounded linger, the registry and the context. Idempotent.
        Submissions still being validated get no reply (their clients time out and retry)."""
        if self._closed:
            return
        self._closed = True
        self.validator.close()
        for sock in (self.api, self.broker):
            if sock is not None:
                sock.close(linger=LINGER_MS)
        self.registry.close()
        self.ctx.term()
        log.info("controller stopped (%d malformed broker messages dropped)", self.malformed)


def main(argv: list[str] | None = None) -> int:
    """Run the controller until SIGTERM or SIGINT; the exit code (shared/service.py) says which."""
    return run_until_stopped("controller", "Validate, store and schedule runs.", argv,
                             Controller, Controller.serve)

