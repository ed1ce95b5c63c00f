"""The step and episode buffers of a recorded run: rows in, columnar frames out.

The environment wrappers (`gymbus.recording`, `gymbus.vector`) append to these buffers on the
training thread: a single environment one value per column per step (its action, observation
and reward; the episode, step and flag columns are made at the frame from where each episode's
rows begin), a vector environment one chunk of arrays per `step` call. At `STEP_BATCH_ROWS`
rows, or about `FLUSH_INTERVAL` after the first, the rows become one step frame: every numeric
column a typed array in its own dtype (docs/protocol.md). Episode rows are batched the same
way. Frames go out through `send(kind, body, rows)`, which the run provides (its emitter: seq,
spool, delivery).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gymbus.shared.codec import typed_array
from gymbus.shared.protocol import MAX_FRAME_BYTES, FrameKind, TelemetryMode
from gymbus.spaces import Layout
from gymbus.worker.telemetry.columns import FRAME_VALUE_BYTES, finite_rows, narrowest, rows_within

#: rows of a step frame: 4,096 (as a vector env's block holds values) costs ~0.06 us a
#: CartPole step less than 1,024 (its Python per frame, ~0.1 ms, spread over more rows), and
#: the ingest stores fewer, larger frames; at 160,000 steps a second that is a frame per 25 ms
STEP_BATCH_ROWS = 4096
EPISODE_BATCH_ROWS = 256
#: seconds the first buffered row waits at most
FLUSH_INTERVAL = 0.1

Send = Callable[[FrameKind, dict[str, Any], int], None]
#: an ended episode as the recorder buffers it, a plain tuple (0.13 us to make, a named one
#: 0.35): (episode, return, length, terminated, truncated, env_index, seed,
#: reset_obs, reset_info, obs_layout, ts_ns); env_index to reset_info are None when the episode
#: has none. Its global step is worked out when its batch is taken, from the lengths in order.
EpisodeRow = tuple[Any, ...]
#: the optional fields of an EpisodeRow, each a column a frame holds in all its rows or in none
_OPTIONAL = (5, 6, 7, 8)
#: a batch of ended episodes, as `on_episodes` gets it: numpy columns "episode", "return",
#: "length", "ts_ns" and "global_step" (the run's steps taken when the episode ended)
EpisodeColumns = dict[str, np.ndarray[Any, Any]]


class StepPolicy:
    """Per episode: record its steps or not. `every`: 1 records every episode (full), N every
    Nth (sampled), 0 none (fast). The env wrappers ask it through `per_episode` and
    `per_block`, which also take any function of an episode id."""

    __slots__ = ("every",)

    def __init__(self, every: int) -> None:
        self.every = every

    @classmethod
    def of_mode(cls, mode: TelemetryMode, every: int = 1) -> StepPolicy:
        """The policy of a telemetry mode: fast records no step, sampled every `every`th
        episode's, full every episode's."""
        if mode is TelemetryMode.FAST:
            return cls(0)
        return cls(every if mode is TelemetryMode.SAMPLED else 1)

    def __call__(self, episode: int) -> bool:
        every = self.every
        return every == 1 or (every > 1 and episode % every == 0)

    def function(self) -> Callable[[int], bool]:
        """The same answer as a plain function: ~70 ns a call where calling the policy costs
        ~170 (an env's reset asks it once an episode)."""
        every = self.every
        if every == 1:
            return lambda episode: True
        if every < 1:
            return lambda episode: False
        return lambda episode: episode % every == 0

    def of(self, episodes: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The answers for an array of episode ids at once."""
        if self.every == 1:
            return np.ones(episodes.size, np.bool_)
        if self.every < 1:
            return np.zeros(episodes.size, np.bool_)
        return np.asarray(episodes % self.every == 0)


def per_episode(policy: Callable[[int], bool]) -> Callable[[int], bool]:
    """The cheapest function that answers as `policy` does: a StepPolicy's plain function."""
    return policy.function() if isinstance(policy, StepPolicy) else policy


def per_block(policy: Callable[[int], bool], episodes: np.ndarray[Any, Any]
              ) -> np.ndarray[Any, Any]:
    """`policy`'s answers for an array of episode ids: a StepPolicy's at once."""
    if isinstance(policy, StepPolicy):
        return policy.of(episodes)
    return np.fromiter(map(policy, episodes.tolist()), np.bool_, episodes.size)


def _column(values: Any, layout: Layout, n: int) -> np.ndarray[Any, Any]:
    """An obs or action column from its buffered rows: ints, or the bytes of its rows in
    `layout.dtype` (a bytearray, or a list of bytes), copied."""
    if layout.kind == "int":
        return np.fromiter(values, np.int64, n)
    data = values if isinstance(values, bytearray) else b"".join(values)
    if len(data) != n * layout.size * layout.dtype.itemsize:
        raise ValueError(f"the environment's values changed size within a run: expected "
                         f"{layout.size} values of {layout.dtype} per step")
    return np.frombuffer(data, layout.dtype).reshape(n, layout.size).copy()


def info_json(info: dict[str, Any], keys: Sequence[str]) -> str:
    """The `info` values the user named, as JSON text (numpy values as numbers or lists)."""
    return json.dumps({k: _plain(info[k]) for k in keys if k in info}, default=repr)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class Steps:
    """The step buffer of one recorded env, with the env's layouts. Frames never mix two envs'
    rows.

    A single env buffers one list (or bytearray) per column, appended to by its step closure,
    and where each of its episodes' rows begin (`segments`): the episode and step columns are
    made from those at `take`, as are terminated and truncated (True on an episode's last row
    only, `ended`). A vector env adds whole chunks of columns (`chunks`) instead.
    """

    def __init__(self, obs: Layout, action: Layout, info: bool, env_index: int = 0,
                 value_bytes: int = FRAME_VALUE_BYTES) -> None:
        self.obs, self.action, self.info = obs, action, info
        self.env_index = env_index
        #: rows per frame: STEP_BATCH_ROWS, fewer when the values would pass `value_bytes`
        self.max_rows = rows_within(STEP_BATCH_ROWS, obs.row_bytes + action.row_bytes,
                                    value_bytes)
        self.rewards: list[Any] = []
        #: an int layout's values, a list; a stored row layout's, the bytes of its rows; else None
        self.actions = _values(action)
        self.observations = _values(obs)
        self.infos: list[str] | None = [] if info else None
        #: [first row, episode, its first row's step] per episode with rows in the buffer
        self.segments: list[list[int]] = []
        #: (row, terminated, truncated) of each episode's last row in the buffer
        self.ended: list[tuple[int, bool, bool]] = []
        #: the last segment's episode goes on (its rows after `take` start the next buffer)
        self.open = False
        self.chunks: list[dict[str, Any]] = []
        self.chunk_rows = 0
        #: the step closure calls `Recorder.check` when the buffer holds this many rows
        self.check_at = 1

    def __len__(self) -> int:
        return len(self.rewards) + self.chunk_rows

    def begin(self, episode: int) -> None:
        """The env's next rows are episode `episode`'s, from its step 0."""
        self.segments.append([len(self.rewards), episode, 0])
        self.open = True

    def end(self, terminated: bool, truncated: bool) -> None:
        """The episode under way has ended (flags on its last row, if it has one here)."""
        if self.open and self.segments and len(self.rewards) > self.segments[-1][0]:
            self.ended.append((len(self.rewards) - 1, terminated, truncated))
        self.open = False

    def drop_partial(self) -> None:
        """Undo a row half added (its observation buffered, its action refused)."""
        n = len(self.rewards)
        for values, layout in ((self.actions, self.action), (self.observations, self.obs)):
            if values is not None:
                del values[n if isinstance(values, list) else n * layout.row_bytes:]

    def take(self) -> tuple[dict[str, Any], int]:
        """The buffered rows as a step body of numpy columns (and how many), emptied."""
        n = len(self.rewards)
        segments = self.segments
        if not segments or segments[0][0] != 0:
            raise RuntimeError("recorded rows without an episode: the env stepped before reset")
        starts = np.fromiter((seg[0] for seg in segments), np.int64, len(segments))
        lengths = np.diff(starts, append=n)
        first_steps = np.fromiter((seg[2] for seg in segments), np.int64, len(segments))
        body: dict[str, Any] = {
            "episode": np.repeat(np.fromiter((seg[1] for seg in segments), np.int64,
                                             len(segments)), lengths),
            "step": np.arange(n, dtype=np.int64) - np.repeat(starts - first_steps, lengths),
            "reward": np.fromiter(self.rewards, np.float64, n),
        }
        terminated, truncated = np.zeros(n, np.bool_), np.zeros(n, np.bool_)
        for row, term, trunc in self.ended:
            terminated[row], truncated[row] = term, trunc
        body.update(terminated=terminated, truncated=truncated,
                    env_index=np.full(n, self.env_index, np.int64))
        if self.actions is not None:
            body["action"] = _column(self.actions, self.action, n)
        if self.observations is not None:
            body["obs"] = _column(self.observations, self.obs, n)
        if self.infos is not None:
            body["info"] = self.infos[:]
        last = segments[-1]
        # emptied in place: the step closure holds these lists' bound methods
        self.rewards.clear()
        for values in (self.actions, self.observations, self.infos):
            if values is not None:
                values.clear()
        self.ended.clear()
        segments.clear()
        if self.open:
            segments.append([0, last[1], last[2] + n - last[0]])
        return body, n


def _values(layout: Layout) -> list[Any] | bytearray | None:
    if layout.kind == "int":
        return []
    return bytearray() if layout.stored else None


class Recorder:
    """The buffers of one run, for any number of recorded environments."""

    def __init__(self, send: Send, *, clock: Callable[[], float] = time.monotonic,
                 on_episodes: Callable[[EpisodeColumns], None] | None = None,
                 max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        """`max_frame_bytes`: the frame limit the services keep (`GYMBUS_MAX_FRAME_BYTES`); a
        frame's observations and actions stay within half of it."""
        self._send = send
        #: bytes of observations and actions a frame holds at most
        self.value_bytes = max_frame_bytes // 2
        #: episode rows a frame holds: EPISODE_BATCH_ROWS, fewer for large reset observations
        self.max_episode_rows = EPISODE_BATCH_ROWS
        self._on_episodes = on_episodes
        self._clock = clock
        self._steps: list[Steps] = []
        #: when the oldest buffered step is due (FLUSH_INTERVAL after it), for every env
        self.deadline = math.inf
        #: ended episodes, one row each, in the order they ended (`episode`); the clock is
        #: looked at when they reach `_episode_check_at` rows
        self.episodes: list[EpisodeRow] = []
        self._episode_check_at = 1
        #: a vector env's ended episodes, a block's at a time, as numpy columns (`add_episodes`),
        #: and the rows before them, as columns too (`_settle`)
        self._episode_blocks: list[dict[str, Any]] = []
        self._episode_deadline = math.inf
        self._next_episode = 0
        #: steps recorded, steps whose observation was not stored, rows refused
        self.steps = 0
        #: steps the recorded envs took, stored or not (a fast run stores none), up to the last
        #: episode taken from `episodes`: the global step of an episode row is its end's
        self.steps_taken = 0
        self._episodes_settled = 0
        self.obs_not_stored = 0
        self.refused = 0

    def not_stored(self) -> dict[str, int]:
        """What run_completed counts as not stored: observations left out, rows refused."""
        return {"obs_not_stored": self.obs_not_stored, "rows_refused": self.refused}

    @property
    def episode_count(self) -> int:
        """Episodes ended so far, by every recorded env."""
        return self._episodes_settled + len(self.episodes)

    def new_episode(self) -> int:
        """The next episode id of the run (ids are unique across every recorded env)."""
        self._next_episode += 1
        return self._next_episode - 1

    def new_episodes(self, count: int) -> int:
        """Ids for `count` episodes at once, from the one returned."""
        self._next_episode += count
        return self._next_episode - count

    def buffer(self, obs: Layout, action: Layout, info: bool, env_index: int = 0) -> Steps:
        """A step buffer for one more recorded env."""
        steps = Steps(obs, action, info, env_index, self.value_bytes)
        self._steps.append(steps)
        self.max_episode_rows = rows_within(self.max_episode_rows, obs.row_bytes,
                                            self.value_bytes)
        return steps

    # --- steps ------------------------------------------------------------------------------

    def check(self, steps: Steps) -> None:
        """A single env's rows have reached `steps.check_at`: send them if they are enough
        for a frame or the oldest has waited FLUSH_INTERVAL, else check again at twice as
        many rows. The step closure asks no clock per step: a buffer's clock checks fall at
        rows 1, 2, 4, ..., so a frame is sent at most about twice FLUSH_INTERVAL after its
        first row, and a fast env's 4,096-row frame costs thirteen clock calls."""
        n = len(steps)
        now = self._clock()
        if self.deadline == math.inf:
            self.deadline = now + FLUSH_INTERVAL
        if n >= steps.max_rows or now >= self.deadline:
            self.flush_steps()
        else:
            steps.check_at = min(steps.max_rows, 2 * n)

    def add_chunk(self, steps: Steps, chunk: dict[str, Any], n: int) -> None:
        """Add `n` rows of a vector env: arrays with a first axis of `n`. A frame never holds
        more than the buffer's `max_rows` (a block of stored pixels is a frame's worth)."""
        if n <= 0:
            return
        if steps.chunk_rows and steps.chunk_rows + n > steps.max_rows:
            self.flush_steps()
        if self.deadline == math.inf:
            self.deadline = self._clock() + FLUSH_INTERVAL
        steps.chunks.append(chunk)
        steps.chunk_rows += n
        if steps.chunk_rows >= steps.max_rows or self._clock() >= self.deadline:
            self.flush_steps()

    def flush_steps(self) -> None:
        """Send each env's buffered steps as a step frame; rows with NaN are refused, counted."""
        for steps in self._steps:
            if steps.rewards:
                self._send_rows(steps)
            if steps.chunks:
                self._send_chunks(steps)
            steps.check_at = 1
        self.deadline = math.inf

    def _send_rows(self, steps: Steps) -> None:
        body, n = steps.take()
        if "obs" not in body:
            self.obs_not_stored += n
        self._emit_steps(body, n)

    def _send_chunks(self, steps: Steps) -> None:
        chunks, n = steps.chunks, steps.chunk_rows
        steps.chunks, steps.chunk_rows = [], 0
        body: dict[str, Any] = dict(chunks[0])  # a block's chunk: a frame as it is
        if len(chunks) > 1:
            for name in body:
                parts = [c[name] for c in chunks]
                body[name] = (list(np.concatenate(parts)) if name == "info"
                              else np.concatenate(parts))
        elif "info" in body:
            body["info"] = list(body["info"])
        if "obs" not in body:
            self.obs_not_stored += n
        self._emit_steps(body, n)

    def _emit_steps(self, body: dict[str, Any], n: int) -> None:
        """Send a step body of numpy columns; rows with a NaN or infinite number are refused
        (the protocol refuses them: one would turn the whole frame into a dead letter) and
        counted in `refused`."""
        body, refused = finite_rows(body, n)
        self.refused += refused
        n -= refused
        if not n:
            return
        for name, value in list(body.items()):
            if isinstance(value, np.ndarray):
                if value.dtype.kind == "i" and value.ndim == 1 and n:
                    value = narrowest(value)  # episode, step, env_index: 2-4 bytes, not 8
                body[name] = typed_array(np.ascontiguousarray(value))
        self.steps += n
        self._send(FrameKind.STEP, body, n)

    # --- episodes ---------------------------------------------------------------------------

    def episode(self, episode: int, ret: float, length: int, terminated: bool, truncated: bool,
                env_index: int | None = None, seed: int | None = None, reset_obs: Any = None,
                reset_info: str | None = None, obs_layout: Layout | None = None) -> None:
        """Buffer one ended episode; `reset_obs` is an int or the bytes of a row of
        `obs_layout`, and None (like seed and reset_info) leaves its column out. The batch is
        sent when full or when its first row has waited FLUSH_INTERVAL: the clock is looked at
        when the batch doubles (1, 2, 4, ... rows), not per episode."""
        episodes = self.episodes
        episodes.append((episode, ret, length, terminated, truncated, env_index, seed, reset_obs,
                         reset_info, obs_layout, time.time_ns()))
        n = len(episodes)
        if n < self._episode_check_at:
            return
        now = self._clock()
        if self._episode_deadline == math.inf:
            self._episode_deadline = now + FLUSH_INTERVAL
        if n >= self.max_episode_rows or now >= self._episode_deadline:
            self.flush()
        else:
            self._episode_check_at = min(self.max_episode_rows, 2 * n)

    def add_episodes(self, columns: dict[str, Any], n: int) -> None:
        """Buffer `n` ended episodes of a vector env's block, in call order, as columns: numpy
        arrays "episode", "return", "length", "terminated", "truncated", "env_index", and
        optionally "seed" and "reset_obs" (ints, or rows of the observation layout's dtype).
        An optional column held by some rows only comes with a mask of those rows, named
        "has:" and the column's name. Their global steps follow on from the run's steps taken,
        and they share one timestamp: the block's, when its episodes are worked out."""
        if n <= 0:
            return
        self._settle()  # rows that ended before these: their global steps come first
        global_step = np.cumsum(columns["length"]) + self.steps_taken
        self.steps_taken = int(global_step[-1])
        columns["global_step"] = global_step
        columns["ts_ns"] = np.full(n, time.time_ns(), np.int64)
        if self._episode_deadline == math.inf:
            self._episode_deadline = self._clock() + FLUSH_INTERVAL
        self._episode_blocks.extend(_by_masks(columns))
        self._episodes_settled += n
        if (sum(len(c["episode"]) for c in self._episode_blocks) >= self.max_episode_rows
                or self._clock() >= self._episode_deadline):
            self.flush()

    def _settle(self) -> None:
        """The buffered episode rows as column groups in `_episode_blocks`, each row's global
        step the run's steps taken when it ended."""
        rows, self.episodes = self.episodes, []
        if not rows:
            return
        self._episode_check_at = 1
        groups, self.steps_taken = _row_groups(rows, self.steps_taken)
        self._episodes_settled += len(rows)
        self._episode_blocks.extend(groups)

    def flush(self) -> None:
        """Send every buffered step, then every buffered episode."""
        self.flush_steps()
        self._settle()
        if not self._episode_blocks:
            return
        groups, self._episode_blocks = self._episode_blocks, []
        self._episode_deadline = math.inf
        if len(groups) == 1:
            self._send_episodes(groups[0])
            return
        # a frame's optional columns are present in all its rows or in none: one frame a set
        by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for group in groups:
            by_keys.setdefault(tuple(sorted(group)), []).append(group)
        for parts in by_keys.values():
            self._send_episodes(parts[0] if len(parts) == 1 else {
                name: (np.concatenate([p[name] for p in parts]) if name != "reset_info"
                       else [v for p in parts for v in p[name]]) for name in parts[0]})

    def _send_episodes(self, columns: dict[str, Any]) -> None:
        """One episode frame of `columns` (numpy arrays, "reset_info" a list of JSON text).
        An episode whose return or reset observation holds a NaN or an infinity is refused, as
        a step row with one is (the protocol stores no such number), and counted in
        `refused`; its steps are kept."""
        columns, refused = finite_rows(columns, len(columns["episode"]))
        self.refused += refused
        n = len(columns["episode"])
        if not n:
            return
        if self._on_episodes is not None:
            self._on_episodes({name: columns[name] for name in
                               ("episode", "return", "length", "ts_ns", "global_step")})
        body: dict[str, Any] = {}
        for name in ("episode", "return", "length", "terminated", "truncated", "ts_ns",
                     "env_index", "seed", "reset_obs"):
            if name in columns:
                body[name] = typed_array(np.ascontiguousarray(columns[name]))
        if "reset_info" in columns:
            body["reset_info"] = list(columns["reset_info"])
        self._send(FrameKind.EPISODE, body, n)


def _by_masks(columns: dict[str, Any]) -> list[dict[str, Any]]:
    """Columns with "has:NAME" masks split into groups of rows that hold the same optional
    columns (a frame's optional column is in all its rows or in none)."""
    masks = {name[4:]: columns.pop(name) for name in [c for c in columns if c.startswith("has:")]}
    if not masks:
        return [columns]
    key = np.zeros(len(columns["episode"]), np.int64)
    for bit, mask in enumerate(masks.values()):
        key |= mask.astype(np.int64) << bit
    groups = []
    for value in range(1 << len(masks)):  # not np.unique: its first call imports numpy.ma
        rows = key == value
        if not rows.any():
            continue
        held = {name for bit, name in enumerate(masks) if value >> bit & 1}
        groups.append({name: column[rows] for name, column in columns.items()
                       if name not in masks or name in held})
    return groups


def _row_groups(rows: list[EpisodeRow], steps_taken: int) -> tuple[list[dict[str, Any]], int]:
    """Buffered episode rows as columns, one dict per set of optional fields present, and the
    steps taken after the last of them: their global steps follow on from `steps_taken`, in
    the rows' order."""
    n = len(rows)
    fields = list(zip(*rows))
    global_step = np.cumsum(np.fromiter(fields[2], np.int64, n)) + steps_taken
    taken = int(global_step[-1])
    if all(fields[i].count(None) in (0, n) for i in _OPTIONAL):
        return [_row_columns(fields, global_step, n)], taken
    groups: dict[tuple[bool, ...], list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(tuple(row[i] is not None for i in _OPTIONAL), []).append(index)
    return [_row_columns(list(zip(*[rows[i] for i in group])),
                         global_step[np.asarray(group, np.intp)], len(group))
            for group in groups.values()], taken


def _row_columns(fields: list[tuple[Any, ...]], global_step: np.ndarray[Any, Any],
                 n: int) -> dict[str, Any]:
    """Episode rows holding the same optional fields (`fields`: their values field by field)
    as the columns `Recorder.add_episodes` takes, with their global steps."""
    episode, ret, length, terminated, truncated, env_index, seed, reset_obs, reset_info, \
        layouts, ts_ns = fields
    columns: dict[str, Any] = {
        "episode": np.fromiter(episode, np.int64, n), "return": np.fromiter(ret, np.float64, n),
        "length": np.fromiter(length, np.int64, n),
        "terminated": np.fromiter(terminated, np.bool_, n),
        "truncated": np.fromiter(truncated, np.bool_, n),
        "ts_ns": np.fromiter(ts_ns, np.int64, n), "global_step": global_step}
    if env_index[0] is not None:
        columns["env_index"] = np.fromiter(env_index, np.int64, n)
    if seed[0] is not None:
        columns["seed"] = np.fromiter(seed, np.int64, n)
    if reset_obs[0] is not None:
        layout = layouts[0]
        assert layout is not None
        columns["reset_obs"] = _column(reset_obs, layout, n)
    if reset_info[0] is not None:
        columns["reset_info"] = list(reset_info)
    return columns

