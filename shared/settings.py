"""Resolved settings: every endpoint, path and knob, from `GYMBUS_*` environment variables."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gymbus.shared import protocol
from gymbus.shared.errors import ConfigError

PREFIX = "GYMBUS_"
DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Settings:
    """Every value here comes from `GYMBUS_<NAME>` (upper case), else the default."""

    #: the data directory: DuckDB file, run folders, spools, the controller's registry
    home: Path
    #: controller's ROUTER API, for the CLI and viewers
    controller: str
    #: broker's ROUTER for the controller
    broker_controller: str
    #: broker's ROUTER for workers
    broker_workers: str
    #: broker's XSUB: run processes publish telemetry here
    telemetry_in: str
    #: broker's XPUB: the ingest subscribes here (deep queues: a briefly slow ingest loses nothing)
    telemetry_out: str
    #: broker's PUB: the live stream for viewers (shallow queues: drops for a slow viewer)
    telemetry_live: str
    #: ingest's ROUTER query API
    ingest: str
    heartbeat_interval: float
    heartbeat_liveness: int
    #: seconds a CLI request waits for a reply
    request_timeout: float
    max_frame_bytes: int
    #: run slots of a worker started with these settings
    worker_slots: int
    #: DuckDB threads of the ingest: 1 leaves the other cores to training (a write costs ~10%
    #: less CPU on one thread); more make large queries faster
    ingest_threads: int
    worker_id: str
    #: this process's secret CURVE certificate; set: every tcp/ipc socket authenticates
    #: (docs/security.md, `gymbus keys`)
    curve_secret: str
    #: the services' public CURVE certificate, which connecting sockets verify
    curve_server: str
    #: folder of the public certificates of the clients that bound sockets admit
    curve_authorized: str
    #: 1: binding beyond loopback without CURVE keys is allowed (a network you trust)
    insecure: int

    @property
    def db_path(self) -> Path:
        return self.home / "gymbus.duckdb"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    @property
    def registry_path(self) -> Path:
        return self.home / "controller.sqlite"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["home"] = str(self.home)
        out["db_path"] = str(self.db_path)
        out["runs_dir"] = str(self.runs_dir)
        return out


def _endpoint(port: int) -> str:
    return f"tcp://{DEFAULT_HOST}:{port}"


DEFAULTS: dict[str, Any] = {
    "home": "./var",
    "controller": _endpoint(5550),
    "broker_controller": _endpoint(5551),
    "broker_workers": _endpoint(5552),
    "telemetry_in": _endpoint(5553),
    "telemetry_out": _endpoint(5554),
    "telemetry_live": _endpoint(5556),
    "ingest": _endpoint(5555),
    "heartbeat_interval": protocol.HEARTBEAT_INTERVAL,
    "heartbeat_liveness": protocol.HEARTBEAT_LIVENESS,
    "request_timeout": 5.0,
    "max_frame_bytes": protocol.MAX_FRAME_BYTES,
    "worker_slots": 2,
    "ingest_threads": 1,
    "worker_id": "",
    "curve_secret": "",
    "curve_server": "",
    "curve_authorized": "",
    "insecure": 0,
}


def load(env: dict[str, str] | None = None) -> Settings:
    """Settings from the environment (`os.environ` unless given). Bad values raise ConfigError."""
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name, default in DEFAULTS.items():
        var = PREFIX + name.upper()
        raw = source.get(var)
        if raw is None or raw == "":
            values[name] = default
            continue
        try:
            values[name] = type(default)(raw)
        except ValueError:
            raise ConfigError(var, f"expected a {type(default).__name__}, got {raw!r}") from None
    for name in ("heartbeat_interval", "request_timeout", "max_frame_bytes", "worker_slots",
                 "ingest_threads"):
        if values[name] <= 0:
            raise ConfigError(PREFIX + name.upper(), f"must be > 0, got {values[name]!r}")
    if values["heartbeat_liveness"] < 1:
        raise ConfigError("GYMBUS_HEARTBEAT_LIVENESS", "must be >= 1")
    values["home"] = Path(values["home"]).expanduser().resolve()
    if not values["worker_id"]:
        values["worker_id"] = f"{socket.gethostname()}-{os.getpid()}"
    return Settings(**values)


def env_for(settings: Settings) -> dict[str, str]:
    """The `GYMBUS_*` variables that reproduce `settings` in a child process."""
    out = {}
    for name in DEFAULTS:
        out[PREFIX + name.upper()] = str(getattr(settings, name))
    return out
