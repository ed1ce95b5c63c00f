"""Runs onto workers and back: scheduling, and what the broker says of workers and runs.

The controller's loop hands its `Dispatcher` the broker's messages (the worker view, run
updates, failed dispatches, lost workers) and calls `schedule` and `take_back_unacknowledged`
on each pass; the dispatcher keeps the registry's run states true to them and sends the
broker its dispatches, cancels and grants. Everything runs on the controller's loop thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gymbus.services.controller.fields import optional, require
from gymbus.services.controller.placement import Resources
from gymbus.services.controller.registry import Registry
from gymbus.services.controller.scheduler import Scheduler, parse_workers
from gymbus.services.controller.scripts import OWNER_PREFIX
from gymbus.shared.errors import DecodeError
from gymbus.shared.protocol import TERMINAL_STATES, Command, RunState

log = logging.getLogger("gymbus.controller")


class Dispatcher:
    """The registry's runs, the scheduler's workers, and `send` (a message to the broker)."""

    def __init__(self, registry: Registry, scheduler: Scheduler,
                 send: Callable[[Command, dict[str, Any]], None]) -> None:
        self.registry = registry
        self.scheduler = scheduler
        self.send = send
        #: active runs a cancel was asked for: if their dispatch fails they end, not requeue
        self.cancelling: set[str] = set()
        #: lost runs their worker lists again: said once in the log, cancelled at every view
        self.stopping_lost: set[str] = set()

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
            self.send(
                Command.DISPATCH, {"run_id": run.run_id, "worker_id": worker_id, "config": run.config}
            )
        self.scheduler.settle(placement, (run.run_id for run in queued))

    def take_back_unacknowledged(self, now: float) -> None:
        """Queue again the runs whose worker did not acknowledge their dispatch in time."""
        for late in self.scheduler.unacknowledged(now):
            run = self.registry.get(late.run_id)
            if run is not None and run.state is RunState.DISPATCHED and run.worker_id == late.worker_id:
                self.take_back(run.run_id, late.worker_id, f"worker {late.worker_id} did not "
                               f"acknowledge the dispatch within {self.scheduler.ack_timeout:.1f} s")

    # --- from the broker --------------------------------------------------------------------

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
                    self.send(Command.GRANT, {"run_id": run_id,
                                                     "worker_id": view.worker_id})
                elif run.state is RunState.LOST:
                    if run_id not in self.stopping_lost:
                        self.stopping_lost.add(run_id)
                        log.warning("worker %s lists run %s, which is lost: cancelling it",
                                    view.worker_id, run_id)
                    self.send(Command.CANCEL, {"run_id": run_id,
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
                self.send(Command.CANCEL, {"run_id": run_id, "worker_id": worker_id})
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
