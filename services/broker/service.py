"""The broker: routes runs from the controller to workers, watches worker liveness, fans telemetry out.

One ROUTER faces the controller, one faces the workers; `mediate()` polls both with the time to
the next heartbeat as its timeout, dispatches each message through a table keyed by Command (a
`MessageTable`: nothing is answered, what is malformed is counted), and does its housekeeping
(purge silent workers, send heartbeats and the worker view) on every pass.
Telemetry never touches that loop: libzmq's steerable proxy forwards XSUB -> XPUB on its own thread.

Run it with `python -m gymbus.services.broker`.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import zmq

from gymbus.services.broker.grants import PublishGrants
from gymbus.services.broker.lost_runs import LostRuns
from gymbus.services.broker.telemetry_proxy import TelemetryProxy
from gymbus.services.broker.worker_table import WorkerTable
from gymbus.shared.codec import INT64_MAX, INT64_MIN, encode_message
from gymbus.shared.errors import DecodeError
from gymbus.shared.gate import KeyedMessageTable
from gymbus.shared.protocol import CONTROLLER_IDENTITY, Command, RunState
from gymbus.shared.service import (
    MalformedCount,
    MessageHandler,
    StopFlag,
    run_until_stopped,
)
from gymbus.shared.settings import Settings
from gymbus.shared.transport import LINGER_MS, bind, new_socket, send_to

log = logging.getLogger("gymbus.broker")


#: run slots a worker may offer (a number beyond it is a malformed message, not a worker)
MAX_WORKER_SLOTS = 4096


def require(body: dict[str, Any], name: str, kind: type) -> Any:
    """A field of a message body, of the given type (an int: one of 64 bits, as the protocol's
    integers are), or DecodeError naming it."""
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DecodeError(f"{name} must be {kind.__name__}, got {value!r}")
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise DecodeError(f"{name} must be a 64-bit integer, got {value}")
    return value


def require_run_ids(body: dict[str, Any], name: str = "runs") -> list[str]:
    """A list of run ids (absent means none), or DecodeError."""
    value = body.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DecodeError(f"{name} must be a list of run ids, got {value!r}")
    return value


class Broker:
    """Routing state and the `mediate()` loop. Everything here runs on the loop thread."""

    def __init__(
        self,
        settings: Settings,
        ctx: zmq.Context[Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.ctx = ctx or zmq.Context()
        self.workers = WorkerTable(settings.heartbeat_interval, settings.heartbeat_liveness)
        #: malformed messages from both sockets, in one count
        self.malformed = MalformedCount(log, "dropped")
        self.controller_identity = CONTROLLER_IDENTITY
        self.controller_seen = False
        self._workers_dirty = False
        self._closed = False
        #: the runs each restricted key may publish, and the key each worker registered with
        self.grants = PublishGrants()
        self.worker_keys: dict[str, str] = {}
        self.lost_runs = LostRuns()
        try:
            self.proxy = TelemetryProxy(self.ctx, settings, self.grants)
            self.controller_router = self._router(settings.broker_controller, "controller ROUTER")
            self.worker_router = self._router(settings.broker_workers, "worker ROUTER")
            # an unroutable send to a vanished worker raises instead of vanishing silently
            self.worker_router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.proxy.start()
        except BaseException:
            self.ctx.destroy(linger=0)  # no thread holds a socket: the proxy's never started
            raise
        from_controller: dict[Command, MessageHandler] = {
            Command.HELLO: self.on_hello,
            Command.DISPATCH: self.on_dispatch,
            Command.CANCEL: self.on_cancel,
            Command.GRANT: self.on_grant,
        }
        from_workers: dict[Command, MessageHandler] = {
            Command.READY: self.on_ready,
            Command.HEARTBEAT: self.on_heartbeat,
            Command.RUN_UPDATE: self.on_run_update,
            Command.DISPATCH_FAILED: self.on_worker_dispatch_failed,
            Command.DISCONNECT: self.on_disconnect,
        }
        self._from_controller = KeyedMessageTable("broker", from_controller, log, peer="controller",
                                             malformed=self.malformed,
                                             max_bytes=settings.max_frame_bytes)
        self._from_workers = KeyedMessageTable("broker", from_workers, log, peer="worker",
                                          malformed=self.malformed,
                                          max_bytes=settings.max_frame_bytes)

    def _router(self, endpoint: str, what: str) -> zmq.Socket[Any]:
        sock = new_socket(self.ctx, zmq.ROUTER)
        # a peer that reconnects under the same identity takes it over from its dead connection
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        bind(sock, endpoint, what)
        return sock

    # --- the loop -------------------------------------------------------------------------------

    def mediate(self, stop: StopFlag) -> None:
        """Route messages and keep the worker table until `stop` is set."""
        poller = zmq.Poller()
        poller.register(self.controller_router, zmq.POLLIN)
        poller.register(self.worker_router, zmq.POLLIN)
        next_heartbeat = self.clock()
        log.info(
            "broker up: controller %s, workers %s",
            self.settings.broker_controller, self.settings.broker_workers,
        )
        while not stop:
            events = dict(poller.poll(self._poll_timeout_ms(next_heartbeat)))
            if self.controller_router in events:
                self._from_controller.deliver_waiting(self.controller_router, self.clock)
            if self.worker_router in events:
                self._from_workers.deliver_waiting(self.worker_router, self.clock)
            next_heartbeat = self.housekeeping(next_heartbeat)

    def _poll_timeout_ms(self, next_heartbeat: float) -> int:
        wake = next_heartbeat
        expiry = self.workers.next_expiry()
        if expiry is not None:
            wake = min(wake, expiry)
        return max(0, math.ceil((wake - self.clock()) * 1000))

    def housekeeping(self, next_heartbeat: float) -> float:
        """Purge silent workers, heartbeat on schedule, publish the worker view when it changed."""
        now = self.clock()
        for lost in self.workers.purge_expired(now):
            log.warning(
                "worker %s lost: silent for %.2f s; it held runs %s",
                lost.worker_id, self.workers.window, lost.runs,
            )
            self.send_controller(Command.WORKER_LOST, {"worker_id": lost.worker_id, "runs": lost.runs})
            self.lost_runs.note(lost.worker_id, lost.runs)
            self._workers_dirty = True
        if now >= next_heartbeat:
            for record in self.workers.records():
                self.send_worker(record["worker_id"], Command.HEARTBEAT, {})
            self._workers_dirty = True
            next_heartbeat = now + self.settings.heartbeat_interval
        if self._workers_dirty:
            self.send_workers()
        return next_heartbeat

    # --- sending --------------------------------------------------------------------------------

    def send_controller(self, cmd: Command, body: dict[str, Any]) -> None:
        send_to(self.controller_router, self.controller_identity, cmd, body)

    def send_workers(self) -> None:
        """The worker view to the controller."""
        self.send_controller(Command.WORKERS, {"workers": self.workers.records()})
        self._workers_dirty = False

    def send_worker(self, worker_id: str, cmd: Command, body: dict[str, Any]) -> bool:
        """Send to one worker; False when its connection is gone or its queue is full."""
        try:
            self.worker_router.send_multipart(
                [worker_id.encode(), encode_message(cmd, body)], flags=zmq.NOBLOCK
            )
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            return False
        return True

    # --- from the controller --------------------------------------------------------------------

    def on_hello(self, identity: bytes, body: dict[str, Any], now: float) -> None:
        if not self.controller_seen or identity != self.controller_identity:
            log.info("controller %r said hello", identity)
        self.controller_identity = identity
        self.controller_seen = True
        self.send_workers()

    def on_dispatch(self, identity: bytes, body: dict[str, Any], now: float) -> None:
        run_id = require(body, "run_id", str)
        worker_id = require(body, "worker_id", str)
        config = require(body, "config", dict)
        if worker_id not in self.workers:
            reason = f"worker {worker_id} is not connected to the broker"
        # the frame limit of the services, which the run keeps to if its worker's is higher
        elif not self.send_worker(worker_id, Command.RUN, {
                "run_id": run_id, "config": config,
                "max_frame_bytes": self.settings.max_frame_bytes}):
            reason = f"worker {worker_id} cannot be reached (connection gone or queue full)"
        else:
            self.grants.grant(self.worker_keys.get(worker_id, ""), run_id)
            log.info("run %s dispatched to worker %s", run_id, worker_id)
            return
        log.warning("dispatch of run %s failed: %s", run_id, reason)
        self.send_controller(
            Command.DISPATCH_FAILED, {"run_id": run_id, "worker_id": worker_id, "reason": reason}
        )

    def on_cancel(self, identity: bytes, body: dict[str, Any], now: float) -> None:
        """Forward a cancel; for a worker that is gone, report the run lost (nobody can stop it)."""
        run_id = require(body, "run_id", str)
        worker_id = require(body, "worker_id", str)
        if worker_id in self.workers and self.send_worker(worker_id, Command.CANCEL, {"run_id": run_id}):
            log.info("cancel of run %s sent to worker %s", run_id, worker_id)
            return
        log.warning("cannot cancel run %s: worker %s is gone", run_id, worker_id)
        self.lost_runs.note(worker_id, [run_id])
        self.send_controller(Command.RUN_UPDATE, {
            "run_id": run_id, "worker_id": worker_id, "state": RunState.LOST.value,
            "reason": f"worker {worker_id} is gone", "frames_emitted": None, "episodes": None,
            "steps": None,
        })

    def on_grant(self, identity: bytes, body: dict[str, Any], now: float) -> None:
        """A script's run opened with a restricted key, or a run the controller's registry
        gives to a worker (again, after a restart of this broker): that key may publish it."""
        run_id = require(body, "run_id", str)
        if "worker_id" in body:
            self.grants.grant(self.worker_keys.get(require(body, "worker_id", str), ""), run_id)
        else:
            self.grants.grant(require(body, "key", str), run_id)

    # --- from workers ---------------------------------------------------------------------------

    @staticmethod
    def _worker_id(identity: bytes) -> str:
        try:
            worker_id = identity.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"worker identity {identity!r} is not a UTF-8 worker id") from None
        if not worker_id or identity.startswith(b"\x00"):
            raise DecodeError("a worker must set its identity to its worker id")
        return worker_id

    def on_ready(self, identity: bytes, body: dict[str, Any], now: float) -> None:
        worker_id = self._worker_id(identity)
        claimed = body.get("worker_id", worker_id)
        host = require(body, "host", str)
        pid = require(body, "pid", int)
        slots = require(body, "slots", int)
        runs = require_run_ids(body)
        if not 0 <= slots <= MAX_WORKER_SLOTS:
            raise DecodeError(f"slots must be 0 to {MAX_WORKER_SLOTS}, got {slots}")
        if claimed != worker_id:
            log.warning("worker %s says its id is %r; routing by its identity", worker_id, claimed)
        capacity = body.get("capacity")  # checked by the controller, which schedules by it
        replaced = self.workers.register(worker_id, host, pid, slots, runs, now,
                                         capacity if isinstance(capacity, dict) else None)
        self.worker_keys[worker_id] = self._from_workers.user
        log.info(
            "worker %s ready: host %s, pid %d, %d slots, runs %s%s",
            worker_id, host, pid, slots, runs, " (replaces its older entry)" if replaced else "",
        )
        for run_id in self.lost_runs.returned(worker_id, runs):
            log.warning("worker %s is back with run %s, which was lost with it: cancelling it",
                        worker_id, run_id)
            self.send_worker(worker_id, Command.CANCEL, {"run_id": run_id})
        self.send_workers()

    def on_heartbeat(self, identity: bytes, body: dict[str, Any], now: float) -> None:
        worker_id = self._worker_id(identity)
        if worker_id not in self.workers:
            log.debug("heartbeat from unknown worker %s ignored; it will re-register", worker_id)
            return
        self.workers.touch(worker_id, now)
        busy = require(body, "busy", int)
        runs = require_run_ids(body)
        if self.workers.refresh(worker_id, busy, runs, now):
            self._workers_dirty = True

    def on_run_update(self, identity: bytes, body: dict[str, Any], now: float) -> None:
        """Forward to the controller, also from a worker not (or no longer) registered here."""
        worker_id = self._worker_id(identity)
        self.workers.touch(worker_id, now)
        run_id = require(body, "run_id", str)
        state = require(body, "state", str)
        try:
            RunState(state)
        except ValueError:
            raise DecodeError(f"unknown run state {state!r}") from None
        log.info("run %s on worker %s: %s", run_id, worker_id, state)
        self.send_controller(Command.RUN_UPDATE, {**body, "worker_id": worker_id})

    def on_worker_dispatch_failed(self, identity: bytes, body: dict[str, Any], now: float) -> None:
        worker_id = self._worker_id(identity)
        self.workers.touch(worker_id, now)
        run_id = require(body, "run_id", str)
        reason = body.get("reason") or "the worker refused the run"
        log.warning("worker %s refused run %s: %s", worker_id, run_id, reason)
        self.send_controller(
            Command.DISPATCH_FAILED, {"run_id": run_id, "worker_id": worker_id, "reason": str(reason)}
        )

    def on_disconnect(self, identity: bytes, body: dict[str, Any], now: float) -> None:
        worker_id = self._worker_id(identity)
        entry = self.workers.remove(worker_id)
        if entry is None:
            return
        log.info("worker %s disconnected (held runs %s)", worker_id, entry.runs)
        self.send_workers()

    # --- shutdown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the proxy, close the sockets with a bounded linger, end the context. Idempotent."""
        if self._closed:
            return
        self._closed = True
        stats = self.proxy.statistics()
        proxy_gone = self.proxy.stop()
        if stats:
            log.info("telemetry proxy totals: %s", stats)
        for sock in (self.controller_router, self.worker_router):
            sock.close(linger=LINGER_MS)
        if proxy_gone:
            self.ctx.term()
        else:
            log.warning("the telemetry proxy did not stop in time; leaving its context open")
        log.info("broker stopped (%d malformed messages dropped)", self.malformed.count)


def main(argv: list[str] | None = None) -> int:
    """Run the broker until SIGTERM or SIGINT; the exit code (shared/service.py) says which."""
    return run_until_stopped("broker", "Route runs to workers and fan telemetry out.", argv,
                             Broker, Broker.mediate)

