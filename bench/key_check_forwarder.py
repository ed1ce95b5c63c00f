"""What checking each frame's key costs the broker: frames/s through libzmq's proxy against the
Python forwarder of services/broker/grants.py, both on CURVE sockets, side by side.

    python bench/key_check_forwarder.py [--frames 20000] [--bytes 16384] [--rounds 3]

One XPUB publishes `--frames` frames of `--bytes` (a step frame is 10-40 KB) into the XSUB of a
fan-out run on a thread, and a SUB on its XPUB counts them; the same sockets and keys for both
fan-outs, alternating round by round. Printed: each round's frames/s and MB/s, and the median
ratio forwarder / proxy. The publisher key has a role and a grant, so the forwarder's whole
check runs for every frame.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from gymbus.services.broker.grants import PublishGrants, forward
from gymbus.services.cli.keys import make_keys, make_role_key
from gymbus.shared import roles, security
from gymbus.shared.transport import bind, connect, new_socket

HWM = 200_000


def one_round(services: dict[str, str], worker: dict[str, str], checked: bool, frames: int,
              payload: bytes) -> float:
    """Seconds to move `frames` frames from the publisher to the subscriber."""
    ctx: zmq.Context[Any] = zmq.Context()
    security.install(security.load(services))
    xsub, xpub, live = (new_socket(ctx, kind, linger=0) for kind in (zmq.XSUB, zmq.XPUB, zmq.PUB))
    xsub.setsockopt(zmq.RCVHWM, HWM)
    xpub.setsockopt(zmq.SNDHWM, HWM)
    bind(xsub, "tcp://127.0.0.1:*", roles.TELEMETRY_IN)
    bind(xpub, "tcp://127.0.0.1:*", roles.TELEMETRY_OUT)
    bind(live, "tcp://127.0.0.1:*", roles.TELEMETRY_LIVE)
    control = new_socket(ctx, zmq.PAIR, linger=0)
    control.bind("inproc://bench-control")
    steer = new_socket(ctx, zmq.PAIR, linger=0)
    steer.connect("inproc://bench-control")
    grants = PublishGrants()
    key = Path(worker["GYMBUS_CURVE_SECRET"])
    public = zmq.auth.load_certificate(key)[0].decode()
    roles.admit(public, roles.Role.WORKER)
    grants.grant(public, "bench")
    run = (lambda: forward(xsub, xpub, live, control, grants)) if checked else \
        (lambda: zmq.proxy_steerable(xsub, xpub, live, control))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    sub = new_socket(ctx, zmq.SUB, linger=0)
    sub.setsockopt(zmq.RCVHWM, HWM)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    connect(sub, xpub.getsockopt_string(zmq.LAST_ENDPOINT), "bench")
    security.install(security.load(worker))
    pub = new_socket(ctx, zmq.XPUB, linger=0)
    pub.setsockopt(zmq.SNDHWM, HWM)
    pub.setsockopt(zmq.XPUB_NODROP, 1)
    connect(pub, xsub.getsockopt_string(zmq.LAST_ENDPOINT), "bench")
    if not pub.poll(10_000):
        raise SystemExit("the publisher got no subscription")
    pub.recv()
    topic = b"step.bench"
    start = time.perf_counter()
    sender = threading.Thread(target=lambda: [pub.send_multipart([topic, payload])
                                              for _ in range(frames)], daemon=True)
    sender.start()
    for _ in range(frames):
        if not sub.poll(10_000):
            raise SystemExit("frames stopped arriving")
        sub.recv_multipart()
    elapsed = time.perf_counter() - start
    sender.join()
    steer.send(b"TERMINATE")
    thread.join(5)
    for sock in (pub, sub, steer, xsub, xpub, live, control):
        sock.close(linger=0)
    ctx.term()
    security.install(None)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--bytes", type=int, default=16_384)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gymbus-bench-keys-")) / "keys"
    services = make_keys(folder)["services"]
    worker = make_role_key(folder, roles.Role.WORKER)["clients"]
    payload = bytes(args.bytes)
    ratios = []
    for i in range(args.rounds):
        rates = {}
        for checked in (False, True):
            seconds = one_round(services, worker, checked, args.frames, payload)
            rates[checked] = args.frames / seconds
            name = "forwarder (key checked)" if checked else "libzmq proxy"
            print(f"round {i + 1}: {name:<24} {rates[checked]:>9,.0f} frames/s "
                  f"{rates[checked] * args.bytes / 1e6:>7,.1f} MB/s", flush=True)
        ratios.append(rates[True] / rates[False])
    print(f"forwarder / proxy: median {statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
