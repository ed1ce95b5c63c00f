"""The run registry: run records in SQLite, and the one table of legal state transitions.

Every state change goes through `Registry.transition`, which checks `TRANSITIONS` inside a write
transaction: an illegal change is logged and refused, and a terminal run never changes again.
The clock (Unix nanoseconds) is injected so that tests can replay histories.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from ulid import ULID

from gymbus.shared.errors import GymbusError
from gymbus.shared.protocol import TERMINAL_STATES, RunState
from gymbus.shared.runconfig import RunConfig

log = logging.getLogger("gymbus.controller")

S = RunState
#: state -> the states it may change to. Terminal states map to nothing: they never change.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    S.QUEUED: frozenset({S.DISPATCHED, S.CANCELLED}),
    # back to QUEUED when a dispatch fails; straight to an end when `running` was missed
    S.DISPATCHED: frozenset({S.QUEUED, S.RUNNING, S.COMPLETED, S.FAILED, S.CANCELLED, S.LOST}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.LOST}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.LOST: frozenset(),
}
ACTIVE_STATES = (S.DISPATCHED, S.RUNNING)
#: failed dispatches of one run before it is marked failed instead of queued again
MAX_DISPATCH_ATTEMPTS = 5

#: columns a transition may set besides state and updated_ns
_CHANGEABLE = frozenset(
    {"worker_id", "reason", "started_ns", "ended_ns", "frames_emitted", "episodes", "steps"}
)
_RUN_COLUMNS = (
    "run_id", "name", "env", "algo", "telemetry", "config", "state", "created_ns", "updated_ns",
    "started_ns", "ended_ns", "worker_id", "reason", "frames_emitted", "episodes", "steps",
)
#: the labels, after _RUN_COLUMNS in every SELECT: tags (JSON text) and the group's id
_LABEL_COLUMNS = (("tags", "TEXT NOT NULL DEFAULT '{}'"), ("group_id", "TEXT NOT NULL DEFAULT ''"))
_SELECT = f"SELECT {', '.join(_RUN_COLUMNS)}, tags, group_id FROM runs"
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id          TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    env             TEXT NOT NULL,
    algo            TEXT NOT NULL,
    telemetry       TEXT NOT NULL,
    config          BLOB NOT NULL,            -- msgpack of the validated config
    state           TEXT NOT NULL,
    created_ns      INTEGER NOT NULL,
    updated_ns      INTEGER NOT NULL,
    started_ns      INTEGER,
    ended_ns        INTEGER,
    worker_id       TEXT,
    reason          TEXT,
    frames_emitted  INTEGER,
    episodes        INTEGER,
    steps           INTEGER,
    idempotency_key TEXT UNIQUE,              -- NULL when the submit gave none
    dispatch_failures INTEGER NOT NULL DEFAULT 0,
    last_dispatch_error TEXT,
    tags            TEXT NOT NULL DEFAULT '{}',   -- JSON object of the run's tags
    group_id        TEXT NOT NULL DEFAULT ''      -- its group's id ('' for none)
);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs (state, created_ns);
CREATE INDEX IF NOT EXISTS runs_by_worker ON runs (worker_id, state);
"""


def can_transition(src: RunState, dst: RunState) -> bool:
    """Whether a run in `src` may change to `dst`."""
    return dst in TRANSITIONS[src]


@dataclass(frozen=True, slots=True)
class Run:
    """A run record; its fields are exactly those of `Run` in docs/protocol.md."""

    run_id: str
    name: str
    env: str
    algo: str
    telemetry: str
    config: dict[str, Any]
    state: RunState
    created_ns: int
    updated_ns: int
    started_ns: int | None = None
    ended_ns: int | None = None
    worker_id: str | None = None
    reason: str | None = None
    frames_emitted: int | None = None
    episodes: int | None = None
    steps: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    group: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_wire(self) -> dict[str, Any]:
        """The record as a reply body's `run`."""
        out = {name: getattr(self, name) for name in _RUN_COLUMNS}
        out["state"] = self.state.value
        out["config"] = dict(self.config)
        out["tags"] = dict(self.tags)
        out["group"] = self.group
        return out


class Registry:
    """Runs in a SQLite file (WAL), so that a controller restart keeps the queue and the history.

    Used from the controller's loop thread only.
    """

    def __init__(self, path: Path, clock: Callable[[], int] = time.time_ns) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.clock = clock
        self._db = sqlite3.connect(path, isolation_level=None)  # transactions are explicit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=2000")
        self._create_schema()

    def _create_schema(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, _SCHEMA_VERSION):
            raise GymbusError(
                f"{self.path} holds registry schema {version}; this controller reads "
                f"{_SCHEMA_VERSION} (move the file aside to start a new registry)"
            )
        self._db.executescript(_SCHEMA)
        # a registry written before runs had labels gains their columns, empty for old runs
        have = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        for name, kind in _LABEL_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
        self._db.execute("CREATE INDEX IF NOT EXISTS runs_by_group ON runs (group_id, created_ns)")
        self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database (checkpointing the WAL). Idempotent."""
        try:
            self._db.close()
        except sqlite3.ProgrammingError:
            pass

    # --- reading ------------------------------------------------------------------------------

    def get(self, run_id: str) -> Run | None:
        row = self._db.execute(f"{_SELECT} WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else _run(row)

    def runs(self, group: str | None = None) -> list[Run]:
        """Every run, or those of one group, oldest first."""
        if group is None:
            rows = self._db.execute(f"{_SELECT} ORDER BY created_ns, rowid")
        else:
            rows = self._db.execute(f"{_SELECT} WHERE group_id = ? ORDER BY created_ns, rowid",
                                    (group,))
        return [_run(row) for row in rows]

    def queued(self, limit: int = -1) -> list[Run]:
        """Queued runs, oldest first (at most `limit`; all with -1)."""
        rows = self._db.execute(
            f"{_SELECT} WHERE state = ? ORDER BY created_ns, rowid LIMIT ?",
            (S.QUEUED.value, limit),
        )
        return [_run(row) for row in rows]

    def active(self, worker_id: str | None = None) -> list[Run]:
        """Dispatched and running runs, of one worker or of all, oldest first."""
        sql = f"{_SELECT} WHERE state IN (?, ?)"
        args: list[Any] = [state.value for state in ACTIVE_STATES]
        if worker_id is not None:
            sql += " AND worker_id = ?"
            args.append(worker_id)
        return [_run(row) for row in self._db.execute(sql + " ORDER BY created_ns, rowid", args)]

    def dispatch_failures(self, run_id: str) -> int:
        row = self._db.execute(
            "SELECT dispatch_failures FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    # --- writing ------------------------------------------------------------------------------

    def submit(self, config: RunConfig, idempotency_key: str = "") -> tuple[Run, bool]:
        """Store a validated config as a queued run; `(run, created)`.

        A key already used returns the run it made, with created False.
        """
        key = idempotency_key or None
        if key is not None:
            existing = self.by_idempotency_key(key)
            if existing is not None:
                return existing, False
        now = self.clock()
        run_id = str(ULID())
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO runs (run_id, name, env, algo, telemetry, config, state,"
                    " created_ns, updated_ns, idempotency_key, tags, group_id)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (run_id, config.name, config.env, config.algo, config.telemetry.value,
                     msgpack.packb(config.to_dict(), use_bin_type=True), S.QUEUED.value,
                     now, now, key, json.dumps(config.tags, sort_keys=True), config.group),
                )
        except sqlite3.IntegrityError:
            existing = self.by_idempotency_key(key) if key is not None else None
            if existing is None:
                raise
            return existing, False  # another writer used the key between our read and insert
        run = self.get(run_id)
        if run is None:
            raise RuntimeError(f"run {run_id} vanished right after it was stored")
        return run, True

    def by_idempotency_key(self, key: str) -> Run | None:
        """The run a submit with this idempotency key made, if any."""
        row = self._db.execute(f"{_SELECT} WHERE idempotency_key = ?", (key,)).fetchone()
        return None if row is None else _run(row)

    def transition(self, run_id: str, to: RunState, **changes: Any) -> Run | None:
        """Change a run's state (and the given columns) if TRANSITIONS allows it.

        Returns the updated run, or None when the run is unknown or the change is illegal
        (logged, and nothing is written).
        """
        unknown = set(changes) - _CHANGEABLE
        if unknown:
            raise ValueError(f"transition cannot set {sorted(unknown)}")
        with self._tx() as db:
            applied = self._apply(db, run_id, to, changes)
        return self.get(run_id) if applied else None

    def _apply(
        self, db: sqlite3.Connection, run_id: str, to: RunState, changes: dict[str, Any]
    ) -> bool:
        """The one place a state is written; call inside a transaction."""
        row = db.execute("SELECT state FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            log.warning("refused %s for run %s: no such run", to.value, run_id)
            return False
        src = RunState(row[0])
        if not can_transition(src, to):
            log.warning("refused transition of run %s: %s -> %s", run_id, src.value, to.value)
            return False
        columns = {"state": to.value, "updated_ns": self.clock(), **changes}
        assignments = ", ".join(f"{name} = ?" for name in columns)
        db.execute(f"UPDATE runs SET {assignments} WHERE run_id = ?", (*columns.values(), run_id))
        log.info("run %s: %s -> %s", run_id, src.value, to.value)
        return True

    def mark_dispatched(self, run_id: str, worker_id: str) -> Run | None:
        return self.transition(run_id, S.DISPATCHED, worker_id=worker_id)

    def mark_running(self, run_id: str) -> Run | None:
        return self.transition(run_id, S.RUNNING, started_ns=self.clock())

    def finish(
        self,
        run_id: str,
        state: RunState,
        reason: str | None = None,
        frames_emitted: int | None = None,
        episodes: int | None = None,
        steps: int | None = None,
    ) -> Run | None:
        """End a run in a terminal state with what its worker reported."""
        if state not in TERMINAL_STATES:
            raise ValueError(f"{state.value} is not a terminal state")
        return self.transition(
            run_id, state, reason=reason, frames_emitted=frames_emitted, episodes=episodes,
            steps=steps, ended_ns=self.clock(),
        )

    def requeue(self, run_id: str, reason: str) -> Run | None:
        """A dispatch failed: queue the run again, or fail it after MAX_DISPATCH_ATTEMPTS."""
        with self._tx() as db:
            row = db.execute(
                "SELECT state, dispatch_failures FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None or not can_transition(RunState(row[0]), S.QUEUED):
                applied = self._apply(db, run_id, S.QUEUED, {})  # refused and logged there
            else:
                failures = int(row[1]) + 1
                db.execute(
                    "UPDATE runs SET dispatch_failures = ?, last_dispatch_error = ?"
                    " WHERE run_id = ?",
                    (failures, reason, run_id),
                )
                if failures >= MAX_DISPATCH_ATTEMPTS:
                    applied = self._apply(db, run_id, S.FAILED, {
                        "reason": f"dispatch failed {failures} times; last: {reason}",
                        "ended_ns": self.clock(),
                    })
                else:
                    applied = self._apply(db, run_id, S.QUEUED, {"worker_id": None})
        return self.get(run_id) if applied else None

    def open(self, run_id: str, name: str, env: str, telemetry: str, config: dict[str, Any],
             owner: str) -> tuple[Run, bool]:
        """Store a run that a recorded script opened itself, `running` from now; `(run,
        created)`. `owner` (e.g. script:HOST:PID) takes the worker's place in the record.
        Opening the same run id again returns the stored run, with created False."""
        existing = self.get(run_id)
        if existing is not None:
            return existing, False
        now = self.clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO runs (run_id, name, env, algo, telemetry, config, state,"
                " created_ns, updated_ns, started_ns, worker_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, name, env, str(config.get("backend", "custom")), telemetry,
                 msgpack.packb(config, use_bin_type=True, default=repr), S.RUNNING.value,
                 now, now, now, owner),
            )
        run = self.get(run_id)
        if run is None:
            raise RuntimeError(f"run {run_id} vanished right after it was stored")
        return run, True

    def delete(self, run_id: str) -> bool:
        """Remove an ended run's record; False when there is none, or the run has not ended
        (a queued or active run is never removed: it would come back from its worker)."""
        ended = tuple(state.value for state in TERMINAL_STATES)
        with self._tx() as db:
            cursor = db.execute(f"DELETE FROM runs WHERE run_id = ? AND state IN "
                                f"({', '.join('?' * len(ended))})", (run_id, *ended))
        return cursor.rowcount > 0


def _run(row: tuple[Any, ...]) -> Run:
    values = dict(zip(_RUN_COLUMNS, row))
    values["state"] = RunState(values["state"])
    values["config"] = msgpack.unpackb(values["config"], raw=False)
    tags, group = row[len(_RUN_COLUMNS):]
    return Run(**values, tags=json.loads(tags), group=group)
