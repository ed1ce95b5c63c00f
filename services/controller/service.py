"""The controller: validates and stores runs, schedules them onto workers, tracks their states.

A ROUTER serves the CLI and viewers; a DEALER (identity `controller`) talks to the broker, says
`hello` every heartbeat interval, and is closed and recreated when the broker falls silent. One
loop, `serve()`, polls both, dispatches through tables keyed by Command, and on every pass does its
housekeeping: hello, broker liveness, dispatches never acknowledged, and scheduling. What the
broker says of workers and runs, and the scheduling, are the `Dispatcher`'s (dispatch.py); the
requests of the CLI and viewers are answered here.

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

from gymbus.services.controller.dispatch import Dispatcher
from gymbus.services.controller.fields import require
from gymbus.services.controller.listing import list_runs
from gymbus.services.controller.registry import Registry, Run
from gymbus.services.controller.removal import delete_run
from gymbus.services.controller.scheduler import Scheduler
from gymbus.services.controller.scripts import OWNER_PREFIX, ScriptRuns
from gymbus.services.controller.validation import Submission, Validator
from gymbus.shared.codec import decode_message, encode_message
from gymbus.shared.errors import DecodeError, RequestError
from gymbus.shared.gate import RoleRequestTable
from gymbus.shared.protocol import (
    CONTROLLER_IDENTITY,
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
        self.dispatcher = Dispatcher(self.registry, self.scheduler, self.send_broker)
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
            Command.WORKERS: self.dispatcher.on_workers,
            Command.RUN_UPDATE: self.dispatcher.on_run_update,
            Command.DISPATCH_FAILED: self.dispatcher.on_dispatch_failed,
            Command.WORKER_LOST: self.dispatcher.on_worker_lost,
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
        self.dispatcher.take_back_unacknowledged(now)
        self.dispatcher.schedule(now)

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
        self.dispatcher.cancelling.add(run.run_id)
        log.info("cancel of run %s sent to worker %s", run.run_id, run.worker_id)
        return {"run": run.to_wire()}

    def list_workers(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"workers": self.scheduler.records()}

    def _require_run(self, run_id: str) -> Run:
        run = self.registry.get(run_id)
        if run is None:
            raise RequestError(ErrorCode.UNKNOWN_RUN, f"no run {run_id!r}")
        return run

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

