"""What each client key may do: its role, read from its certificate, and what each role allows.

A role is stored with the public key, in the `metadata` section of its certificate (ZeroMQ's
ZPL format, the one `zmq.auth` writes and reads, which ignores the section):

    metadata
        role = "worker"
    curve
        public-key = "..."

A certificate without a role (any made before roles existed, and the services' own) keeps full
access. Roles are checked twice: when a connection is made (the ZAP answer, shared/security.py:
a key may not even connect to a socket its role has no use for) and per request (shared/gate.py:
a command its role does not allow gets a `forbidden` error reply). docs/security.md has the table.
"""

from __future__ import annotations

import logging
import re
import threading
from enum import StrEnum
from pathlib import Path

import zmq
import zmq.auth

from gymbus.shared.protocol import Command

log = logging.getLogger("gymbus.security")


class Role(StrEnum):
    """The role of a client key; a key without one has full access."""

    #: takes runs from the broker and publishes their telemetry; scripts recording their own
    #: runs (`gymbus.run`), which register them with the controller and publish
    WORKER = "worker"
    #: submits and cancels runs, and reads everything a reader reads
    SUBMITTER = "submitter"
    #: watches live telemetry and queries runs and the store
    READER = "reader"


#: the name of the certificate's metadata property that holds the role
ROLE_PROPERTY = "role"

#: the `what` (the ZAP domain) of each bound socket, as the services name them
CONTROLLER_API = "controller API (ROUTER)"
INGEST_API = "ingest query API"
BROKER_WORKERS = "worker ROUTER"
BROKER_CONTROLLER = "controller ROUTER"
TELEMETRY_IN = "telemetry input (XSUB)"
TELEMETRY_OUT = "telemetry output (XPUB)"
TELEMETRY_LIVE = "live telemetry output (PUB)"

_READ = frozenset({Command.PING, Command.LIST_RUNS, Command.GET_RUN, Command.LIST_WORKERS,
                   Command.QUERY, Command.RUN_STATS, Command.INGEST_STATS})

#: the requests (to the controller and the ingest) each role may make: allow-lists, so that the
#: administrative ones (delete_run, archive, restore) and any added later need a key without a role
COMMANDS: dict[Role, frozenset[Command]] = {
    Role.WORKER: frozenset({Command.PING, Command.OPEN_RUN, Command.RUN_ALIVE, Command.CLOSE_RUN,
                            Command.SPOOL_STATUS, Command.RUN_STATS}),
    Role.SUBMITTER: _READ | {Command.SUBMIT, Command.CANCEL},
    Role.READER: _READ,
}

#: the bound sockets each role may connect to; the others refuse it at the handshake. The
#: broker's controller ROUTER and its telemetry output (the ingest's feed) admit full keys only.
SOCKETS: dict[Role, frozenset[str]] = {
    Role.WORKER: frozenset({BROKER_WORKERS, TELEMETRY_IN, CONTROLLER_API, INGEST_API}),
    Role.SUBMITTER: frozenset({CONTROLLER_API, INGEST_API, TELEMETRY_LIVE}),
    Role.READER: frozenset({CONTROLLER_API, INGEST_API, TELEMETRY_LIVE}),
}

#: what a role is for, in words, for error messages and `gymbus keys`
PURPOSE: dict[Role, str] = {
    Role.WORKER: "take runs and publish telemetry",
    Role.SUBMITTER: "submit, cancel and read runs",
    Role.READER: "watch and query runs",
}


class RoleError(ValueError):
    """A certificate names a role gymbus does not know."""


def parse_role(value: str | None) -> Role | None:
    """The Role named by `value` (None or empty: full access); RoleError for an unknown name."""
    if not value:
        return None
    try:
        return Role(value)
    except ValueError:
        known = ", ".join(r.value for r in Role)
        raise RoleError(f"unknown role {value!r} (known: {known})") from None


_PROPERTY = re.compile(r'^\s+([A-Za-z0-9_.-]+)\s*=\s*"?([^"]*)"?\s*$')


def certificate_role(path: Path) -> Role | None:
    """The role in a certificate's metadata section (None: no role, full access).

    Raises OSError when it cannot be read and RoleError when its role is unknown: a typo must
    not grant full access.
    """
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            section = line.strip()
            continue
        match = _PROPERTY.match(line)
        if section == "metadata" and match and match.group(1) == ROLE_PROPERTY:
            return parse_role(match.group(2))
    return None


def with_role(text: str, role: Role) -> str:
    """A certificate's text with `role` written into its metadata section."""
    lines = text.splitlines()
    entry = f'    {ROLE_PROPERTY} = "{role.value}"'
    for i, line in enumerate(lines):
        if line.strip() == "metadata":
            return "\n".join([*lines[: i + 1], entry, *lines[i + 1:]]) + "\n"
    return "\n".join(["metadata", entry, *lines]) + "\n"


def may_connect(role: Role | None, what: str) -> bool:
    """May a key of `role` connect to the bound socket named `what`?"""
    return role is None or what in SOCKETS[role]


def may_request(role: Role | None, cmd: Command) -> bool:
    """May a key of `role` make request `cmd`?"""
    return role is None or cmd in COMMANDS[role]


def authorized_keys(folder: Path) -> dict[bytes, Role | None]:
    """The public keys of the certificates (`*.key`) in `folder` and their roles.

    A certificate that cannot be read, or names an unknown role, is left out (logged): a typo
    in a role must not grant full access.
    """
    keys: dict[bytes, Role | None] = {}
    try:
        paths = sorted(folder.glob("*.key"))
    except OSError as exc:
        log.error("cannot read the authorized certificates in %s: %s", folder, exc)
        return keys
    for path in paths:
        try:
            public, _ = zmq.auth.load_certificate(path)
            keys[public] = certificate_role(path)
        except (OSError, ValueError, RoleError) as exc:
            log.error("ignoring the authorized certificate %s: %s", path, exc)
    return keys


# --- the keys admitted in this process ------------------------------------------------------------

_lock = threading.Lock()
#: the role of every key this process's guards admitted, by its z85 text (the ZAP User-Id)
_admitted: dict[str, Role | None] = {}


def admit(user_id: str, role: Role | None) -> None:
    """Record the role of a key the guard admitted (on the guard's thread)."""
    with _lock:
        _admitted[user_id] = role


def role_of(user_id: str) -> Role | None:
    """The role of the peer whose messages carry ZAP User-Id `user_id` (its z85 key).

    None, full access, for a key without a role and for a peer without a User-Id (CURVE is off,
    or the socket is inproc). The guard records every key it admits before the connection is
    made, so every message on a CURVE socket has an entry.
    """
    with _lock:
        return _admitted.get(user_id)


def user_id(frame: zmq.Frame) -> str:
    """The ZAP User-Id of the connection a received frame came on ('' without one)."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return ""
    return value if isinstance(value, str) else ""
