"""A recorded script's own run at the controller: opened, kept alive, closed.

`open_run` registers the run (`running` from then on); a `KeepAlive` thread says `run_alive`
once a heartbeat interval, so that the controller marks the run `lost` when the script dies
without ending it, and takes back a `gymbus cancel` (the run's `stop` list then holds the
reason, and the next `step` or `log` raises KeyboardInterrupt); `close_run` ends it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import zmq

from gymbus.shared.errors import GymbusError, ServiceUnavailable
from gymbus.shared.protocol import Command
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client

log = logging.getLogger("gymbus.api")

#: seconds to wait for the controller when opening or closing a run
TIMEOUT = 2.0
CANCELLED = "cancelled (gymbus cancel)"


def open_run(settings: Settings, ctx: zmq.Context[Any], body: dict[str, Any]
             ) -> dict[str, Any] | None:
    """Register a run with the controller: its answer (the services' `max_frame_bytes`
    among it), or None when no controller answers (offline)."""
    client = Client(settings.controller, "controller", TIMEOUT, ctx=ctx)
    try:
        return client.request(Command.OPEN_RUN, body)
    except ServiceUnavailable:
        return None
    finally:
        client.close()


def close_run(settings: Settings, ctx: zmq.Context[Any], body: dict[str, Any]) -> None:
    """Tell the controller how the run ended (logged, not raised, when it does not answer:
    the controller then marks the run lost)."""
    client = Client(settings.controller, "controller", TIMEOUT, ctx=ctx)
    try:
        client.request(Command.CLOSE_RUN, body)
    except GymbusError as exc:
        log.warning("could not tell the controller that run %s ended: %s", body["run_id"], exc)
    finally:
        client.close()


class KeepAlive:
    """`run_alive` once a heartbeat interval, on a thread of its own, until `close`."""

    def __init__(self, settings: Settings, ctx: zmq.Context[Any], run_id: str,
                 stop: list[str]) -> None:
        self.settings, self.ctx, self.run_id, self.stop = settings, ctx, run_id, stop
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gymbus-alive", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.settings.heartbeat_interval
        client = Client(self.settings.controller, "controller", interval, ctx=self.ctx)
        try:
            while not self._done.wait(interval):
                try:
                    reply = client.request(Command.RUN_ALIVE, {"run_id": self.run_id})
                except GymbusError:
                    continue  # the controller is away: it marks the run when it is back
                if reply.get("cancel") and not self.stop:
                    self.stop.append(CANCELLED)  # the run stops as on Ctrl-C
        finally:
            client.close()

    def close(self) -> None:
        self._done.set()
        self._thread.join(self.settings.heartbeat_interval * 2)
