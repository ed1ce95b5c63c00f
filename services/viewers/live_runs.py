"""What viewers show of one run (`RunView`) and which of its seqs they hold (`SeqTracker`).

Filled from the controller's record, the ingest's stats, rows read from the store and frames from
the live stream (see `live.py`); everything here runs on the viewer's thread.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gymbus.services.viewers.grid import GridWorld, Scene
from gymbus.shared.codec import Frame
from gymbus.shared.protocol import TERMINAL_STATES, FrameKind, LifecycleEvent

#: episodes a view keeps per run (the oldest go first); the count stays exact
MAX_EPISODES = 20_000
SPS_METRIC = "charts/SPS"


def short_id(run_id: str, chars: int) -> str:
    """The end of a run id (a ULID's random part), after its prefix where it has one, so that a
    run imported from another's files (`tb-<run id>`) is told apart from that run."""
    prefix, dash, _ = run_id.partition("-")
    tail = run_id[-chars:]
    if dash and 0 < len(prefix) <= 4 and len(run_id) > len(prefix) + 1 + chars:
        return f"{prefix}-{tail}"
    return tail


class SeqTracker:
    """Which seqs of one run a viewer holds: every seq up to `highest` except those in `gaps`.

    A gap is `[first, last, counted, found_at, tried]`, sorted by `first`. It is `counted` in
    `missed` when the live stream skipped it after the viewer's first live frame of the run, so
    that what was sent before the viewer joined is not called missed (the snapshot has it).
    """

    def __init__(self) -> None:
        self.highest = -1
        self.gaps: list[list[Any]] = []
        self.following = False
        #: the seq of the first frame taken from the stream (what came before: the snapshot)
        self.first_live: int | None = None
        #: seqs taken from the stream, discarded as held already, skipped by the stream (net of
        #: late arrivals), and taken from the store (snapshot and backfill)
        self.live = self.duplicates = self.missed = self.from_store = 0

    def take(self, seq: int, *, live: bool, now: float) -> bool:
        """Hold `seq` (from the stream, or from the store); False when it is held already."""
        self.from_store += not live
        if seq > self.highest:
            self._open(seq - 1, counted=live and self.following, now=now)
            self.highest = seq
        else:
            i = bisect_right(self.gaps, seq, key=lambda g: g[0]) - 1
            if i < 0 or seq > self.gaps[i][1]:
                self.duplicates += live
                self.from_store -= not live
                return False
            first, last, counted, *rest = self.gaps[i]
            self.missed -= live and counted  # late, but delivered
            self.gaps[i:i + 1] = ([[first, seq - 1, counted, *rest]] if first < seq else []) + (
                [[seq + 1, last, counted, *rest]] if seq < last else [])
        if live:
            self.live += 1
            self.following = True
            self.first_live = seq if self.first_live is None else self.first_live
        return True

    def expect_end(self, frames_emitted: int, now: float) -> None:
        """The run's last seq is known: the seqs after the highest held are missing."""
        if frames_emitted - 1 > self.highest:
            self._open(frames_emitted - 1, counted=self.following, now=now)
            self.highest = frames_emitted - 1

    def _open(self, last: int, *, counted: bool, now: float) -> None:
        if last > self.highest:
            self.gaps.append([self.highest + 1, last, counted, now, False])
            self.missed += (last - self.highest) if counted else 0

    def due_gaps(self, found_before: float) -> list[list[Any]]:
        """Gaps found before the time given and not fetched yet (each is fetched once)."""
        due = [g for g in self.gaps if not g[4] and g[3] <= found_before]
        for gap in due:
            gap[4] = True
        return due

    @property
    def held(self) -> int:
        return self.highest + 1 - sum(int(g[1]) - int(g[0]) + 1 for g in self.gaps)


@dataclass
class StepRow:
    """The last step a view knows of: what the board shows."""

    episode: int
    step: int
    #: an int (Discrete), a list of numbers (every other space), None when not stored
    action: Any
    #: the same, for the step's observation
    obs: Any
    reward: float
    terminated: bool
    truncated: bool
    label: str | None


def _last(column: Any) -> Any:
    """A step column's last value as the viewers keep it: an int, a list of numbers (a vector
    column's row), or None for a column the frame does not hold (values not stored)."""
    if column is None or not len(column):
        return None
    value = column[-1]
    if getattr(value, "ndim", 0):
        return value.tolist()
    return value.item() if hasattr(value, "item") else value


class RunView:
    """One run as the viewers show it; updated on the viewer's thread only."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.agent_id = self.env = self.algo = self.telemetry = self.name = self.state = ""
        self.env_kwargs: dict[str, Any] = {}
        self.tags: dict[str, str] = {}
        self.status: str | None = None
        self.reason: str | None = None
        self.frames_emitted: int | None = None
        self.episode_ids: list[int] = []
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self.episodes_seen = 0
        self.sps: float | None = None
        self.last_step: StepRow | None = None
        self._sps_seq = self._step_seq = -1
        self.stats: dict[str, Any] = {}
        self.seqs = SeqTracker()
        self.loaded = False
        self._world: tuple[str, GridWorld | None] | None = None

    # --- from the controller, the ingest and the store --------------------------------------------

    def set_record(self, run: dict[str, Any]) -> None:
        """The controller's record of the run: state, env, config."""
        self.state = run.get("state") or self.state
        self.reason = run.get("reason") or self.reason
        self.name = run.get("name") or self.name
        self._set_config(run.get("config") or {}, run)
        if isinstance(run.get("tags"), dict):
            self.tags = {str(k): str(v) for k, v in run["tags"].items()}
        if run.get("frames_emitted") is not None:
            self.frames_emitted = run["frames_emitted"]

    def _set_config(self, config: dict[str, Any], fields: dict[str, Any]) -> None:
        self.env = str(fields.get("env") or config.get("env") or self.env)
        self.algo = str(fields.get("algo") or config.get("algo") or self.algo)
        self.telemetry = str(fields.get("telemetry") or config.get("telemetry") or self.telemetry)
        self.agent_id = self.agent_id or str(config.get("agent_id") or "")
        if isinstance(config.get("env_kwargs"), dict):
            self.env_kwargs = config["env_kwargs"]
        if isinstance(config.get("tags"), dict) and not self.tags:
            self.tags = {str(k): str(v) for k, v in config["tags"].items()}

    def set_stored_run(self, row: dict[str, Any]) -> None:
        """The ingest's `runs` row (config as JSON; name, status, reason and frames_emitted
        where the row has them: what a viewer knows of a run when the controller is down)."""
        try:
            config = json.loads(row.get("config") or "{}")
        except ValueError:
            config = {}
        self.agent_id = self.agent_id or row.get("agent_id") or ""
        self.name = row.get("name") or self.name
        self._set_config(config if isinstance(config, dict) else {}, row)
        if row.get("status"):
            self.status, self.reason = row["status"], row.get("reason") or self.reason
        if row.get("frames_emitted") is not None:
            self.frames_emitted = row["frames_emitted"]

    def set_stats(self, stats: dict[str, Any], now: float) -> None:
        """The ingest's RunStats; a known `frames_emitted` shows a missing tail as a gap."""
        self.stats = stats
        if stats.get("frames_emitted") is not None:
            self.frames_emitted = stats["frames_emitted"]
            self.status = self.status or stats.get("status")
            self.seqs.expect_end(int(stats["frames_emitted"]), now)

    def add_lifecycle(self, rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            if row["event"] == LifecycleEvent.RUN_COMPLETED.value:
                self.status, self.reason = row["status"], row["reason"] or self.reason
                self.frames_emitted = row["frames_emitted"]

    def add_episode_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        rows = sorted(rows, key=lambda r: r["episode"])
        self.add_episodes([r["episode"] for r in rows], [r["return"] for r in rows],
                          [r["length"] for r in rows])

    def add_stored_metrics(self, rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            if row["seq"] > self._sps_seq:
                self.sps, self._sps_seq = float(row["value"]), row["seq"]

    def add_stored_steps(self, rows: Sequence[dict[str, Any]]) -> None:
        for r in rows:
            if r["seq"] >= self._step_seq:
                obs = r["obs"] if r["obs"] is not None else r["obs_vec"]
                action = r["action"] if r["action"] is not None else r["action_vec"]
                self.last_step = StepRow(r["episode"], r["step"], action, obs, r["reward"],
                                         r["terminated"], r["truncated"], r["label"])
                self._step_seq = r["seq"]

    # --- from the live stream ------------------------------------------------------------------

    def apply(self, frame: Frame) -> None:
        """A new frame of this run (held for the first time)."""
        self.agent_id = self.agent_id or frame.agent_id
        body = frame.body
        if frame.kind is FrameKind.EPISODE:
            self.add_episodes(body["episode"].tolist(), body["return"].tolist(),
                              body["length"].tolist())
        elif frame.kind is FrameKind.METRIC:
            idx = [i for i, name in enumerate(body["name"]) if name == SPS_METRIC]
            if idx and frame.seq > self._sps_seq:
                self.sps, self._sps_seq = float(body["value"][idx[-1]]), frame.seq
        elif frame.kind is FrameKind.STEP and frame.seq >= self._step_seq:
            labels = body.get("label")
            self.last_step = StepRow(
                int(body["episode"][-1]), int(body["step"][-1]), _last(body.get("action")),
                _last(body.get("obs")), float(body["reward"][-1]),
                bool(body["terminated"][-1]), bool(body["truncated"][-1]),
                labels[-1] if labels else None)
            self._step_seq = frame.seq
        elif frame.kind is FrameKind.LIFECYCLE:
            if body["event"] == LifecycleEvent.RUN_STARTED.value:
                self._set_config(body["config"], body)
            elif body["event"] == LifecycleEvent.RUN_COMPLETED.value:
                self.status, self.reason = body["status"], body.get("reason") or self.reason
                self.frames_emitted = body["frames_emitted"]

    def add_episodes(self, ids: list[int], returns: list[float], lengths: list[int]) -> None:
        """Episode rows, usually in order (backfilled ones are put in place)."""
        self.episodes_seen += len(ids)
        if not self.episode_ids or not ids or ids[0] > self.episode_ids[-1]:
            self.episode_ids += ids
            self.returns += returns
            self.lengths += lengths
        else:
            for e, ret, n in zip(ids, returns, lengths, strict=True):
                i = bisect_right(self.episode_ids, e)
                self.episode_ids.insert(i, e)
                self.returns.insert(i, ret)
                self.lengths.insert(i, n)
        excess = len(self.episode_ids) - MAX_EPISODES
        if excess > MAX_EPISODES // 4:  # trim in chunks, not at every frame
            del self.episode_ids[:excess], self.returns[:excess], self.lengths[:excess]

    # --- what viewers show ----------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.status is not None or self.state in TERMINAL_STATES

    @property
    def settled(self) -> bool:
        """Ended, and every seq of the run is held or known to be missing."""
        return (self.ended and self.frames_emitted is not None
                and self.seqs.highest >= self.frames_emitted - 1)

    @property
    def episodes(self) -> int:
        return max(self.episodes_seen, int(self.stats.get("episodes") or 0))

    def tags_text(self) -> str:
        """The run's tags as `key=value`, comma-joined, in key order ('' for none)."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.tags.items()))

    def mean_return(self, last: int = 100) -> float | None:
        tail = self.returns[-last:]
        return sum(tail) / len(tail) if tail else None

    @property
    def world(self) -> GridWorld | None:
        """The grid layout of the run's environment (None for other environments)."""
        key = f"{self.env}{sorted(self.env_kwargs.items())!r}"
        if self._world is None or self._world[0] != key:
            try:
                world = GridWorld.for_env(self.env, self.env_kwargs) if self.env else None
            except ValueError:
                world = None
            self._world = (key, world)
        return self._world[1]

    def scene(self) -> Scene | None:
        """The board at the last step known, for grid worlds."""
        world, step = self.world, self.last_step
        if world is None or step is None or not isinstance(step.obs, int):
            return None
        try:
            return world.scene(step.obs)
        except ValueError:
            return None
