"""The Qt viewer's requests to the services, made off the GUI thread.

One thread ("viewer-requests") runs the jobs the GUI thread hands it, one at a time and in the
order given, so that every client socket a job uses stays on that thread. A job's result, or
the exception it raised, comes back to the GUI thread through a queued Qt signal, and its
callback runs there. A service that does not answer holds up this thread, for a request timeout
at a time, never the GUI.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PySide6 import QtCore

log = logging.getLogger(__name__)

#: seconds `close` waits for the job in progress; one that takes longer (a request waiting out
#: its timeout) runs `close`'s last job when it ends, and the thread stops then
CLOSE_TIMEOUT = 1.0


@dataclass
class _Job:
    run: Callable[[], Any]
    on_done: Callable[[Any], None]
    on_error: Callable[[Exception], None] | None
    #: run even once the queue is closed (the last job: closing the job's sockets)
    always: bool = False
    result: Any = None
    error: Exception | None = None


class Requests(QtCore.QObject):
    """The request thread and its queue of jobs. `call` and `close` run on the GUI thread."""

    _finished = QtCore.Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        #: jobs handed over whose callback has not run yet
        self.pending = 0
        # emitted on the request thread, delivered on this object's (the GUI) thread
        self._finished.connect(self._deliver, QtCore.Qt.ConnectionType.QueuedConnection)
        self._thread = threading.Thread(target=self._serve, name="viewer-requests", daemon=True)
        self._thread.start()

    def call(self, run: Callable[[], Any], on_done: Callable[[Any], None],
             on_error: Callable[[Exception], None] | None = None) -> None:
        """Run `run()` on the request thread, then `on_done(result)` on the GUI thread, or
        `on_error(exc)` if it raised (without `on_error`, the exception is raised there)."""
        if self._closed:
            return
        self.pending += 1
        self._jobs.put(_Job(run, on_done, on_error))

    def _serve(self) -> None:
        """The request thread: run each job, hand it back; until `close`."""
        while (job := self._jobs.get()) is not None:
            if self._closed and not job.always:
                continue  # closing: what is still queued is not wanted any more
            try:
                job.result = job.run()
            except Exception as exc:  # noqa: BLE001 - handed to the GUI thread, which decides
                job.error = exc
            if job.always:
                continue
            try:
                self._finished.emit(job)
            except RuntimeError:  # the window is gone already
                return

    def _deliver(self, job: _Job) -> None:
        """A job is done (GUI thread): its callback."""
        self.pending -= 1
        if self._closed:
            return
        if job.error is None:
            job.on_done(job.result)
        elif job.on_error is not None:
            job.on_error(job.error)
        else:
            raise job.error

    def close(self, last: Callable[[], Any] | None = None) -> None:
        """Drop the jobs not started, run `last` on the request thread (closing its sockets)
        and stop the thread, waiting CLOSE_TIMEOUT at most; idempotent. No callback runs after
        this."""
        if self._closed:
            return
        self._closed = True
        if last is not None:
            self._jobs.put(_Job(last, lambda _: None, None, always=True))
        self._jobs.put(None)
        self._thread.join(CLOSE_TIMEOUT)
        if self._thread.is_alive():
            log.info("a request of the viewer is still waiting; its thread stops when it ends")
