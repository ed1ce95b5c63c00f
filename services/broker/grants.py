"""Which runs each restricted key may publish, and the forwarder that holds publishers to it.

A key with a role (shared/roles.py) publishes only telemetry of runs that are its own: runs the
broker dispatched to a worker that registered with it, and script runs the controller saw it
open (`grant`). With CURVE on, the broker's telemetry fan-out is `forward` here instead of
libzmq's proxy: the same XSUB -> XPUB + live PUB, in Python, reading each frame's ZAP User-Id;
a frame of a restricted key for a run that is not its own is dropped, counted and logged. A key
without a role (and the services' key) publishes anything, as before roles existed.

Grants are held in memory. After a broker restart the controller grants again each run that a
re-registered worker holds and its registry gives to that worker; the spool repair of a run
that had ended before the restart is refused (counted and logged).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import OrderedDict
from typing import Any

import zmq

from gymbus.shared.protocol import TOPIC_SEPARATOR
from gymbus.shared.roles import role_of, user_id

log = logging.getLogger("gymbus.broker")

#: runs remembered per broker (the oldest grants are forgotten first)
MAX_GRANTS = 200_000
#: messages forwarded per socket per pass, so that the control socket is heard under load
FORWARD_BATCH = 1000
#: a refused (key, run) is logged at its first frame and then every Nth
LOG_EVERY = 1000
_SEPARATOR = TOPIC_SEPARATOR.encode("ascii")


class PublishGrants:
    """Run ids each restricted key may publish. Written on the broker's loop thread, read on
    the proxy thread; one lock guards it."""

    def __init__(self, limit: int = MAX_GRANTS) -> None:
        self.limit = limit
        self._grants: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()
        #: frames refused, in all and per (key, run id)
        self.refused = 0
        self.refused_by: dict[tuple[str, str], int] = {}

    def grant(self, key: str, run_id: str) -> None:
        """Let `key` publish `run_id` (nothing to do for a key with full access)."""
        if not key or role_of(key) is None:
            return
        with self._lock:
            self._grants[(key, run_id)] = None
            self._grants.move_to_end((key, run_id))
            while len(self._grants) > self.limit:
                self._grants.popitem(last=False)

    def allows(self, key: str, topic: bytes) -> bool:
        """May the peer with ZAP User-Id `key` publish a frame on `topic`? Counts a refusal."""
        if not key or role_of(key) is None:
            return True
        run_id = topic.partition(_SEPARATOR)[2].decode("utf-8", "replace")
        with self._lock:
            if (key, run_id) in self._grants:
                return True
            self.refused += 1
            n = self.refused_by[(key, run_id)] = self.refused_by.get((key, run_id), 0) + 1
            total = self.refused
        if n == 1 or n % LOG_EVERY == 0:
            log.warning("refused telemetry of run %s from key %s (%s): the run is not this "
                        "key's (%d of its frames; %d refused frames in all)",
                        run_id or "?", key, role_of(key), n, total)
        return False


class Counters:
    """The forwarder's counts, in the order of libzmq's proxy STATISTICS, plus the refused."""

    def __init__(self) -> None:
        self.values = [0] * 8

    def add(self, offset: int, parts: list[zmq.Frame]) -> None:
        self.values[offset] += len(parts)
        self.values[offset + 1] += sum(len(p.buffer) for p in parts)

    def reply(self, refused: int) -> list[bytes]:
        return [struct.pack("=Q", v) for v in [*self.values, refused]]


def forward(xsub: zmq.Socket[Any], xpub: zmq.Socket[Any], live: zmq.Socket[Any],
            control: zmq.Socket[Any], grants: PublishGrants) -> None:
    """XSUB -> XPUB and live PUB, subscriptions XPUB -> XSUB, until TERMINATE on `control`.

    Runs on the proxy thread, which owns the four sockets; answers STATISTICS like libzmq's
    steerable proxy (with the refused frames as a ninth counter).
    """
    counters = Counters()
    poller = zmq.Poller()
    for sock in (xsub, xpub, control):
        poller.register(sock, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if control in events:
            command = control.recv()
            if command == b"TERMINATE":
                return
            if command == b"STATISTICS":
                control.send_multipart(counters.reply(grants.refused))
        if xpub in events:
            for _ in range(FORWARD_BATCH):
                try:
                    subscription = xpub.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                counters.add(4, subscription)
                xsub.send_multipart(subscription, copy=False)
                counters.add(2, subscription)
        if xsub in events:
            for _ in range(FORWARD_BATCH):
                try:
                    parts = xsub.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                counters.add(0, parts)
                if not grants.allows(user_id(parts[-1]), parts[0].bytes):
                    continue
                xpub.send_multipart(parts, copy=False)
                counters.add(6, parts)
                try:
                    live.send_multipart(parts, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    pass  # a PUB drops for a slow viewer; so do we
