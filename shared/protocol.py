"""The gymbus wire protocol: topics, frame kinds, commands, states and the version, nothing else.

Every process imports its names from here; no other module spells a topic, a command or a
state as a string literal. `docs/protocol.md` describes the same protocol in prose.
"""

from __future__ import annotations

from enum import StrEnum

PROTOCOL_VERSION = 1

#: Seconds between heartbeats, both ways, broker <-> worker and broker -> controller.
HEARTBEAT_INTERVAL = 1.0
#: Heartbeats a peer may miss before it is declared gone.
HEARTBEAT_LIVENESS = 3

#: Largest telemetry or control payload accepted, in bytes (settings may lower or raise it).
MAX_FRAME_BYTES = 8 * 1024 * 1024

#: ZeroMQ identity of the controller's DEALER on the broker's controller ROUTER.
CONTROLLER_IDENTITY = b"controller"

#: Separator between a topic's kind and its run id: b"step.01J..." (subscribe by prefix).
TOPIC_SEPARATOR = "."


class FrameKind(StrEnum):
    """Kinds of telemetry frame; each topic starts with one of these."""

    LIFECYCLE = "lifecycle"
    EPISODE = "episode"
    STEP = "step"
    METRIC = "metric"


class LifecycleEvent(StrEnum):
    """The `event` field of a lifecycle frame's body."""

    RUN_STARTED = "run_started"
    ARTIFACT = "artifact"
    #: Always the last frame of a run; its `status` is completed, failed or cancelled.
    RUN_COMPLETED = "run_completed"


class TelemetryMode(StrEnum):
    """How much per-step telemetry a run produces."""

    FULL = "full"  # every step, batched into step frames
    FAST = "fast"  # no step frames at all; lifecycle, episode and metric frames still flow
    SAMPLED = "sampled"  # every Nth episode's steps in full


class RunState(StrEnum):
    """Run states held by the controller."""

    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"


TERMINAL_STATES = frozenset(
    {RunState.COMPLETED, RunState.FAILED, RunState.CANCELLED, RunState.LOST}
)


class Command(StrEnum):
    """Control-plane commands; the `cmd` field of every control message."""

    # any client <-> controller or ingest
    PING = "ping"
    REPLY = "reply"
    # CLI and viewers -> controller
    SUBMIT = "submit"
    LIST_RUNS = "list_runs"
    GET_RUN = "get_run"
    CANCEL = "cancel"
    # CLI -> controller and ingest: remove an ended run (its record, folder, rows)
    DELETE_RUN = "delete_run"
    LIST_WORKERS = "list_workers"
    # a recorded script (`gymbus.run`) -> controller: its own run, opened, alive, closed
    OPEN_RUN = "open_run"
    RUN_ALIVE = "run_alive"
    CLOSE_RUN = "close_run"
    # CLI and viewers -> ingest
    QUERY = "query"
    RUN_STATS = "run_stats"
    INGEST_STATS = "ingest_stats"
    # CLI -> ingest: finished runs' step rows to Parquet files and back (services/ingest/archive.py)
    ARCHIVE = "archive"
    RESTORE = "restore"
    # worker -> ingest: which frames of a spooled run are still missing
    SPOOL_STATUS = "spool_status"
    # controller -> broker
    HELLO = "hello"
    DISPATCH = "dispatch"
    GRANT = "grant"  # a script's run may be published by the key that opened it
    # broker -> controller
    WORKERS = "workers"
    DISPATCH_FAILED = "dispatch_failed"
    WORKER_LOST = "worker_lost"
    # worker <-> broker (CANCEL and RUN_UPDATE travel on to/from the controller)
    READY = "ready"
    HEARTBEAT = "heartbeat"
    RUN = "run"
    RUN_UPDATE = "run_update"
    DISCONNECT = "disconnect"


class ErrorCode(StrEnum):
    """The `code` of an error reply."""

    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID_CONFIG = "invalid_config"
    UNKNOWN_RUN = "unknown_run"
    NOT_CANCELLABLE = "not_cancellable"
    RUN_ACTIVE = "run_active"  # refused: the run is queued or running
    WORKER_GONE = "worker_gone"
    READ_ONLY = "read_only"
    QUERY_FAILED = "query_failed"
    TOO_LARGE = "too_large"
    FORBIDDEN = "forbidden"  # the client's key has a role that does not allow the request
    INTERNAL = "internal"


def topic(kind: FrameKind, run_id: str) -> bytes:
    """The topic of a telemetry frame: kind, separator, run id, as ASCII bytes."""
    return f"{kind.value}{TOPIC_SEPARATOR}{run_id}".encode("ascii")


def topic_prefix(kind: FrameKind, run_id: str = "") -> bytes:
    """A subscription prefix: every frame of one kind, or of one kind and one run."""
    if not run_id:
        return kind.value.encode("ascii")
    return topic(kind, run_id)
