"""The telemetry fan-out: XSUB (run processes publish in) -> XPUB (the ingest) and a live PUB
(viewers), inside libzmq.

Frames never pass through Python: `zmq.proxy_steerable` forwards them on its own thread, and the
broker's loop only steers it (statistics, terminate). The XPUB queues deeply, so that a briefly
slow ingest loses nothing; the live PUB is the proxy's capture socket and queues shallowly, so
that a stalled viewer costs the broker at most LIVE_HWM frames of memory and then misses frames
(viewers count the missing seqs) instead of growing the broker by gigabytes.

With CURVE keys the same fan-out runs in Python instead (services/broker/grants.py), because
each frame's sender key must be checked against the runs it may publish.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Any

import zmq

from gymbus.services.broker.grants import PublishGrants, forward
from gymbus.shared import security
from gymbus.shared.errors import GymbusError
from gymbus.shared.settings import Settings
from gymbus.shared.transport import bind, new_socket

log = logging.getLogger("gymbus.broker")

#: high-water marks of the telemetry proxy, so that a briefly slow ingest does not drop frames
TELEMETRY_HWM = 200_000
#: frames the live PUB queues per viewer before it drops for that viewer: about 2 s of one
#: run's full telemetry; step frames are 10-40 KB, so a stalled viewer holds at most ~8 MB here
LIVE_HWM = 200
#: kernel send buffer of each viewer connection, in bytes (bounded, instead of autotuned to MBs)
LIVE_SNDBUF = 256 * 1024
#: what libzmq's proxy_steerable understands on its control socket
PROXY_TERMINATE = b"TERMINATE"
PROXY_STATISTICS = b"STATISTICS"
#: the order of libzmq's STATISTICS reply; "in" is the XSUB side, "out" the XPUB side, in parts
PROXY_STAT_NAMES = (
    "in_recv_parts", "in_recv_bytes", "in_sent_parts", "in_sent_bytes",
    "out_recv_parts", "out_recv_bytes", "out_sent_parts", "out_sent_bytes",
    "refused_frames",  # only with CURVE keys: frames of runs that are not their key's
)


class TelemetryProxy:
    """XSUB (run processes publish in) -> XPUB (ingest) + live PUB (viewers) in libzmq, on its own
    thread.

    The proxy's sockets are created, bound and closed on that thread; the loop thread only holds
    the inproc PAIR that steers it (STATISTICS, TERMINATE).
    """

    def __init__(self, ctx: zmq.Context[Any], settings: Settings,
                 grants: PublishGrants | None = None) -> None:
        self._ctx = ctx
        self.grants = grants if grants is not None else PublishGrants()
        self._settings = settings
        self._control_endpoint = f"inproc://gymbus-broker-proxy-{id(self):x}"
        self._control = new_socket(ctx, zmq.PAIR, linger=0)
        self._control.bind(self._control_endpoint)
        self._ready = threading.Event()
        self._error: GymbusError | None = None
        self._thread = threading.Thread(target=self._run, name="telemetry-proxy", daemon=True)
        self._stopped = False

    def start(self, timeout: float = 5.0) -> None:
        """Start the proxy thread; raises the thread's EndpointError if it could not bind."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise GymbusError("the telemetry proxy did not start")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error

    def _run(self) -> None:
        """Runs on the proxy thread until TERMINATE."""
        s = self._settings
        xsub = new_socket(self._ctx, zmq.XSUB, linger=0)
        xsub.setsockopt(zmq.RCVHWM, TELEMETRY_HWM)
        xpub = new_socket(self._ctx, zmq.XPUB, linger=0)
        xpub.setsockopt(zmq.SNDHWM, TELEMETRY_HWM)
        # the capture socket gets every message the proxy forwards, both ways: frames, and the
        # subscriptions going upstream (one part, starting with 0 or 1: no kind prefix matches)
        live = new_socket(self._ctx, zmq.PUB, linger=0)
        live.setsockopt(zmq.SNDHWM, LIVE_HWM)
        live.setsockopt(zmq.SNDBUF, LIVE_SNDBUF)
        control = new_socket(self._ctx, zmq.PAIR, linger=0)
        try:
            control.connect(self._control_endpoint)
            bind(xsub, s.telemetry_in, "telemetry input (XSUB)")
            bind(xpub, s.telemetry_out, "telemetry output (XPUB)")
            bind(live, s.telemetry_live, "live telemetry output (PUB)")
        except GymbusError as exc:
            self._error = exc
        self._ready.set()
        try:
            if self._error is None:
                log.info("telemetry proxy: %s -> %s (ingest), %s (viewers)",
                         s.telemetry_in, s.telemetry_out, s.telemetry_live)
                if security.policy().curve:
                    forward(xsub, xpub, live, control, self.grants)
                else:
                    zmq.proxy_steerable(xsub, xpub, live, control)
        except zmq.ZMQError as exc:
            log.error("telemetry proxy stopped: %s", exc)
        finally:
            for sock in (xsub, xpub, live, control):
                sock.close(linger=0)

    def statistics(self, timeout_ms: int = 500) -> dict[str, int]:
        """libzmq's counters of the proxy (messages and bytes in and out); {} if it is not up."""
        if not self._thread.is_alive() or self._stopped:
            return {}
        self._control.send(PROXY_STATISTICS)
        if not self._control.poll(timeout_ms, zmq.POLLIN):
            return {}
        parts = self._control.recv_multipart()
        values = [struct.unpack("=Q", part)[0] for part in parts if len(part) == 8]
        return dict(zip(PROXY_STAT_NAMES, values))

    def stop(self, timeout: float = 2.0) -> bool:
        """Terminate the proxy and join its thread; True when the thread is gone. Idempotent."""
        if not self._stopped:
            self._stopped = True
            if self._thread.is_alive():
                self._control.send(PROXY_TERMINATE)
        if self._thread.ident is not None:
            self._thread.join(timeout)
        self._control.close(linger=0)
        return not self._thread.is_alive()
