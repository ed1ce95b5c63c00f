"""Who may talk to gymbus, and how much: CURVE keys, the ZAP guard, the loopback rule, size limits.

`transport.bind` and `transport.connect` call `secure_bind` and `secure_connect` here, so no
service needs to know about keys. The policy comes once per process from the environment:

- `GYMBUS_CURVE_SECRET`: this process's secret certificate (the services' pair for broker,
  controller and ingest; a client pair for workers and the CLI). Setting it turns CURVE on.
- `GYMBUS_CURVE_SERVER`: the services' public certificate, which connecting sockets verify.
- `GYMBUS_CURVE_AUTHORIZED`: a folder of public certificates of the clients a bound socket admits
  (the services' own key is always admitted: the controller and ingest connect to the broker).
- `GYMBUS_INSECURE=1`: allow binding beyond loopback without keys.

A bound socket with CURVE on is a CURVE server whose handshakes go to one `Guard` thread per
context: it answers ZAP with 200 for authorized keys and 400 for the rest, and logs every refused
peer (rate-limited), also those that fail before ZAP (no keys, wrong server key). Without keys,
everything runs in the clear, and binding beyond loopback is refused unless `GYMBUS_INSECURE=1`.
`gymbus keys` makes the certificates; docs/security.md has the whole story.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from gymbus.shared import settings as settings_mod
from gymbus.shared.errors import ExitCode, GymbusError
from gymbus.shared.roles import Role, admit, authorized_keys, may_connect

log = logging.getLogger("gymbus.security")

#: bound sockets of these types receive application messages from their peers
RECEIVING_TYPES = frozenset({zmq.ROUTER, zmq.XSUB, zmq.PULL, zmq.REP, zmq.DEALER, zmq.PAIR,
                             zmq.SUB})
#: bound publishers receive only subscriptions from their peers
PUBLISHING_TYPES = frozenset({zmq.XPUB, zmq.PUB})
#: the socket's own cut-off (ZMQ_MAXMSGSIZE) is this many times GYMBUS_MAX_FRAME_BYTES: frames
#: between the two limits reach the decoders, which refuse, count and explain them
WIRE_LIMIT_FACTOR = 4
#: largest subscription a bound publisher accepts (topics are a kind and a run id)
SUBSCRIPTION_LIMIT = 64 * 1024
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
#: handshake failures a guard watches on every bound socket
MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
#: a refused key is logged at its 1st refusal and then every Nth (a refused client retries ~10/s)
LOG_EVERY = 100
#: the authorized folder is read again (for new keys, changed roles) at most this often, in seconds
RELOAD_INTERVAL = 1.0
GUARD_POLL_MS = 200


class SecurityError(GymbusError):
    """Keys are missing, unreadable or incomplete, or an endpoint would be exposed without them.

    Run `gymbus keys`, set the GYMBUS_CURVE_* variables it prints, and start again; or bind to a
    loopback address; or, on a network you trust, set GYMBUS_INSECURE=1.
    """

    exit_code = ExitCode.BAD_INPUT


@dataclass(frozen=True)
class Policy:
    """What this process's sockets do about authentication and size. One per process."""

    #: this process's key pair (z85 public, z85 secret); None: no CURVE, plain text
    public_key: bytes | None = None
    secret_key: bytes | None = None
    #: the services' public key, for connecting sockets
    server_key: bytes | None = None
    #: folder of authorized client certificates, for bound sockets
    authorized: Path | None = None
    insecure: bool = False
    max_frame_bytes: int = settings_mod.DEFAULTS["max_frame_bytes"]

    @property
    def curve(self) -> bool:
        return self.secret_key is not None

    @property
    def inbound_limit(self) -> int:
        """ZMQ_MAXMSGSIZE of bound receiving sockets: a peer sending more is disconnected."""
        return WIRE_LIMIT_FACTOR * self.max_frame_bytes


def load(env: Mapping[str, str] | None = None) -> Policy:
    """The policy named by the environment (`os.environ` unless given); SecurityError if broken."""
    source = os.environ if env is None else env
    s = settings_mod.load(dict(source))
    secret_path, server_path, folder = s.curve_secret, s.curve_server, s.curve_authorized
    base = Policy(insecure=bool(s.insecure), max_frame_bytes=s.max_frame_bytes)
    if not (secret_path or server_path or folder):
        return base
    if not secret_path:
        raise SecurityError("GYMBUS_CURVE_SECRET is not set, but other GYMBUS_CURVE_* variables "
                            "are: name this process's secret certificate (see `gymbus keys`)")
    public, secret = _certificate("GYMBUS_CURVE_SECRET", secret_path, need_secret=True)
    server = _certificate("GYMBUS_CURVE_SERVER", server_path)[0] if server_path else None
    authorized = None
    if folder:
        authorized = Path(folder).expanduser()
        if not authorized.is_dir():
            raise SecurityError(f"GYMBUS_CURVE_AUTHORIZED: {folder} is not a folder")
    return Policy(public, secret, server, authorized, base.insecure, base.max_frame_bytes)


def _certificate(var: str, path: str, need_secret: bool = False) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(Path(path).expanduser())
    except (OSError, ValueError) as exc:
        raise SecurityError(f"{var}: cannot read the certificate {path}: {exc}") from None
    if need_secret and not secret:
        raise SecurityError(f"{var}: {path} holds no secret key (use the .key_secret file)")
    return public, secret


_lock = threading.Lock()
_policy: Policy | None = None
_announced: set[str] = set()


def policy() -> Policy:
    """This process's policy, loaded from the environment on first use."""
    global _policy
    with _lock:
        if _policy is None:
            _policy = load()
        return _policy


def install(new: Policy | None) -> None:
    """Replace this process's policy (None: load it from the environment again). For tests and
    for programs that are not configured by environment variables."""
    global _policy
    with _lock:
        _policy = new
        _announced.clear()


def _announce_once(key: str, level: int, message: str, *args: Any) -> None:
    with _lock:
        if key in _announced:
            return
        _announced.add(key)
    log.log(level, message, *args)


# --- the loopback rule ----------------------------------------------------------------------------


def is_local(endpoint: str) -> bool:
    """True for inproc, ipc and tcp on a loopback address or interface."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("inproc", "ipc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].split(";")[-1].strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface or a host name: reachable from elsewhere


# --- sockets --------------------------------------------------------------------------------------


def secure_bind(sock: zmq.Socket[Any], endpoint: str, what: str) -> None:
    """Before `sock.bind(endpoint)`: its size limit, and CURVE server or the loopback rule."""
    if endpoint.startswith("inproc://"):
        return
    p = policy()
    if sock.type in RECEIVING_TYPES:
        sock.setsockopt(zmq.MAXMSGSIZE, p.inbound_limit)
    elif sock.type in PUBLISHING_TYPES:
        sock.setsockopt(zmq.MAXMSGSIZE, SUBSCRIPTION_LIMIT)
    if not p.curve:
        if not is_local(endpoint):
            if not p.insecure:
                raise SecurityError(
                    f"refusing to bind the {what} to {endpoint} without CURVE keys: run `gymbus "
                    "keys` and set the variables it prints (or GYMBUS_INSECURE=1 on a network "
                    "you trust)")
            log.warning("GYMBUS_INSECURE=1: the %s listens on %s without authentication; anyone "
                        "who reaches it can submit runs and inject telemetry", what, endpoint)
        _announce_once("bind", logging.WARNING,
                       "no CURVE keys: running without authentication, loopback only "
                       "(`gymbus keys` makes them; see docs/security.md)")
        return
    if p.authorized is None:
        raise SecurityError(f"cannot bind the {what}: GYMBUS_CURVE_AUTHORIZED must name the "
                            "folder of authorized client certificates")
    guard = guard_for(sock.context, p)
    sock.curve_secretkey = p.secret_key
    sock.curve_publickey = p.public_key
    sock.curve_server = True
    sock.zap_domain = what.encode("utf-8")
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no guard answering: no handshake succeeds
    guard.watch(sock, what)
    _announce_once("bind", logging.INFO, "CURVE on: services key %s, clients authorized by %s",
                   _text(p.public_key), p.authorized)


def secure_connect(sock: zmq.Socket[Any], endpoint: str, what: str) -> None:
    """Before `sock.connect(endpoint)`: make it a CURVE client when keys are configured."""
    if endpoint.startswith("inproc://"):
        return
    p = policy()
    if not p.curve:
        _announce_once("connect", logging.INFO, "no CURVE keys: connecting without authentication")
        return
    if p.server_key is None:
        raise SecurityError(f"cannot connect to the {what}: GYMBUS_CURVE_SERVER must name the "
                            "services' public certificate")
    sock.curve_secretkey = p.secret_key
    sock.curve_publickey = p.public_key
    sock.curve_serverkey = p.server_key
    _announce_once("connect", logging.INFO, "CURVE on: connecting as %s", _text(p.public_key))


def _text(key: bytes | None) -> str:
    return "" if key is None else key.decode("ascii")


# --- the guard ------------------------------------------------------------------------------------


_guards: dict[int, Guard] = {}
_monitor_ids = itertools.count()


def guard_for(ctx: zmq.Context[Any], p: Policy) -> Guard:
    """The context's guard, started on first use (one ZAP handler per context is all ZMQ allows)."""
    with _lock:
        for key in [k for k, g in _guards.items() if not g.is_alive()]:
            del _guards[key]  # their contexts are terminated
        guard = _guards.get(id(ctx))
        if guard is None or guard.context is not ctx:
            guard = Guard(ctx, p)
            guard.start_and_wait()
            _guards[id(ctx)] = guard
        return guard


class Guard(threading.Thread):
    """Answers ZAP requests of one context and watches its secure sockets' handshakes.

    Runs on its own daemon thread and owns its sockets; it ends, closing them, when the context
    is terminated, so a service's `ctx.term()` needs no extra step. Counters are read without a
    lock (ints, for reports).
    """

    def __init__(self, ctx: zmq.Context[Any], p: Policy) -> None:
        super().__init__(name="gymbus-guard", daemon=True)
        self.context = ctx
        self.folder = p.authorized
        self.own_key = p.public_key
        self.allowed = 0
        self.refused = 0
        self.failed_handshakes = 0
        #: the admitted keys and their roles (None: full access)
        self._keys: dict[bytes, Role | None] = {}
        self._loaded_at = 0.0
        self._refusals: dict[tuple[str, bytes], int] = {}
        self._failures: dict[tuple[str, str], int] = {}
        self._pending: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: Exception | None = None

    def start_and_wait(self) -> None:
        self.load_keys()
        if not set(self._keys) - {self.own_key}:
            log.warning("no client certificates in %s: only the services themselves can connect",
                        self.folder)
        self.start()
        self._ready.wait(5.0)
        if self._error is not None or not self._ready.is_set():
            raise SecurityError(f"cannot start the ZAP handler: {self._error or 'timed out'}")

    def watch(self, sock: zmq.Socket[Any], what: str) -> None:
        """Log this socket's failed handshakes (call on the socket's own thread, before bind)."""
        endpoint = f"inproc://gymbus-guard-monitor-{id(self):x}-{next(_monitor_ids)}"
        sock.monitor(endpoint, MONITOR_EVENTS)
        self._pending.put((endpoint, what))

    def load_keys(self) -> None:
        """Read the authorized folder again (it may have gained keys or changed roles)."""
        keys = authorized_keys(self.folder) if self.folder is not None else {}
        if self.own_key is not None:
            keys[self.own_key] = None
        self._keys = keys
        self._loaded_at = time.monotonic()

    def run(self) -> None:
        monitors: dict[zmq.Socket[Any], str] = {}
        poller = zmq.Poller()
        try:
            zap = self.context.socket(zmq.REP)
            zap.linger = 0
            zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        poller.register(zap, zmq.POLLIN)
        try:
            while True:
                while not self._pending.empty():
                    endpoint, what = self._pending.get()
                    mon = self.context.socket(zmq.PAIR)
                    mon.linger = 0
                    mon.connect(endpoint)
                    poller.register(mon, zmq.POLLIN)
                    monitors[mon] = what
                for sock, _ in poller.poll(GUARD_POLL_MS):
                    if sock is zap:
                        zap.send_multipart(self.answer(zap.recv_multipart()))
                    elif not self.on_event(monitors[sock], sock.recv_multipart()):
                        poller.unregister(sock)
                        del monitors[sock]
                        sock.close(linger=0)
        except zmq.ZMQError:
            pass  # the context is terminating: close our sockets so that term() can finish
        finally:
            for mon in monitors:
                mon.close(linger=0)
            zap.close(linger=0)

    def answer(self, request: list[bytes]) -> list[bytes]:
        """A ZAP reply: 200 for a CURVE client whose key is authorized, else 400 (logged)."""
        if len(request) < 6:
            return [ZAP_VERSION, request[1] if len(request) > 1 else b"", b"400", b"bad request",
                    b"", b""]
        _, request_id, domain, address, _, mechanism, *credentials = request
        if mechanism != b"CURVE" or len(credentials) != 1:
            return self.refuse(request_id, domain, address, mechanism, b"CURVE only")
        key = z85.encode(credentials[0])
        if time.monotonic() - self._loaded_at >= RELOAD_INTERVAL:
            self.load_keys()  # new keys and changed roles count from a key's next connection
        if key not in self._keys:
            return self.refuse(request_id, domain, address, key, b"unknown key")
        role = self._keys[key]
        what = domain.decode("utf-8", "replace")
        if not may_connect(role, what):
            return self.refuse(request_id, domain, address, key,
                               f"a {role} key may not use it".encode())
        self.allowed += 1
        admit(key.decode("ascii"), role)
        return [ZAP_VERSION, request_id, b"200", b"OK", key, b""]

    def refuse(self, request_id: bytes, domain: bytes, address: bytes, key: bytes,
               reason: bytes) -> list[bytes]:
        self.refused += 1
        what = domain.decode("utf-8", "replace")
        n = self._refusals[(what, key)] = self._refusals.get((what, key), 0) + 1
        level = logging.WARNING if n == 1 or n % LOG_EVERY == 0 else logging.DEBUG
        log.log(level, "refused a peer of the %s from %s: %s %s (%d times; %d refusals in all)",
                what, address.decode("ascii", "replace"), reason.decode(),
                key.decode("ascii", "replace"), n, self.refused)
        return [ZAP_VERSION, request_id, b"400", reason, b"", b""]

    def on_event(self, what: str, message: list[bytes]) -> bool:
        """Log a failed handshake; False when the monitored socket is gone."""
        event = parse_monitor_message(message)
        if event["event"] == zmq.EVENT_MONITOR_STOPPED:
            return False
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return True  # refused by `answer`, which logged it with the key
        self.failed_handshakes += 1
        detail = _describe(event)
        n = self._failures[(what, detail)] = self._failures.get((what, detail), 0) + 1
        if n == 1 or n % LOG_EVERY == 0:
            log.warning("refused a peer of the %s on %s: %s (%d times; %d failed handshakes in "
                        "all)", what, event["endpoint"].decode("utf-8", "replace"), detail, n,
                        self.failed_handshakes)
        return True


def _describe(event: Mapping[str, Any]) -> str:
    """Why a handshake failed, in words, from a monitor event."""
    value = event["value"]
    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "it has no CURVE keys (security mechanism mismatch)"
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return "its handshake does not decrypt (it uses another server key)"
        return f"ZMTP protocol error 0x{value:x}"
    return (f"the handshake broke off ({os.strerror(value)}): a peer without keys, or one that "
            "hung up")
