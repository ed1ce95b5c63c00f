"""The step and episode buffers of a recorded run: rows in, columnar frames out.

The environment wrappers (`gymbus.recording`, `gymbus.vector`) append to these buffers on the
training thread: a single environment one row tuple per step, a vector environment one chunk of
arrays per `step` call. At `STEP_BATCH_ROWS` rows, or `FLUSH_INTERVAL` after the first, the rows
become one step frame: every numeric column a typed array in its own dtype (docs/protocol.md).
Episode rows are batched the same way. Frames go out through `send(kind, body, rows)`, which
the run provides (its emitter: seq, spool, delivery).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gymbus.shared.codec import typed_array
from gymbus.shared.protocol import MAX_FRAME_BYTES, FrameKind
from gymbus.spaces import Layout

STEP_BATCH_ROWS = 1024
#: a step frame holds at most this many bytes of observations and actions (half the protocol's
#: frame limit: a frame of 1,024 large observations would be refused whole)
FRAME_VALUE_BYTES = MAX_FRAME_BYTES // 2
EPISODE_BATCH_ROWS = 256
#: seconds the first buffered row waits at most
FLUSH_INTERVAL = 0.1

Send = Callable[[FrameKind, dict[str, Any], int], None]
#: a buffered step of a single environment:
#: (episode, step, action, obs, reward, terminated, truncated, info, env_index)
StepRow = tuple[int, int, Any, Any, Any, bool, bool, Any, int]


def _column(values: Any, layout: Layout, n: int) -> np.ndarray[Any, Any]:
    """An obs or action column from its buffered rows: ints, or bytes of `layout.dtype`."""
    if layout.kind == "int":
        return np.fromiter(values, np.int64, n)
    data = b"".join(values)
    if len(data) != n * layout.size * layout.dtype.itemsize:
        raise ValueError(f"the environment's values changed size within a run: expected "
                         f"{layout.size} values of {layout.dtype} per step")
    return np.frombuffer(data, layout.dtype).reshape(n, layout.size)


def _finite_rows(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
    """Which rows of a float column are finite (None: all, or not a float column)."""
    if arr.dtype.kind != "f":
        return None
    ok = np.isfinite(arr) if arr.ndim == 1 else np.isfinite(arr).all(axis=1)
    return None if ok.all() else ok


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
    """The step buffer of one recorded env: row tuples (one env) or column chunks (a vector
    env), with the env's layouts. Frames never mix two envs' rows."""

    def __init__(self, obs: Layout, action: Layout, info: bool) -> None:
        self.obs, self.action, self.info = obs, action, info
        #: rows per frame: STEP_BATCH_ROWS, fewer when the values are large
        self.max_rows = max(1, min(STEP_BATCH_ROWS, FRAME_VALUE_BYTES // max(
            1, obs.row_bytes + action.row_bytes)))
        self.rows: list[StepRow] = []
        self.chunks: list[dict[str, Any]] = []
        self.chunk_rows = 0

    def __len__(self) -> int:
        return len(self.rows) + self.chunk_rows


class Recorder:
    """The buffers of one run, for any number of recorded environments."""

    def __init__(self, send: Send, *, clock: Callable[[], float] = time.monotonic,
                 on_episodes: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        self._send = send
        self._on_episodes = on_episodes
        self._clock = clock
        self._steps: list[Steps] = []
        #: when the oldest buffered step is due (FLUSH_INTERVAL after it), for every env
        self.deadline = math.inf
        self.episodes: list[dict[str, Any]] = []
        self._episode_deadline = math.inf
        self._next_episode = 0
        #: steps recorded, episodes ended, steps whose observation was not stored, rows refused
        self.steps = 0
        #: steps the recorded envs took, stored or not (a fast run stores none): at the end of
        #: each episode, the global step of its episode row
        self.steps_taken = 0
        self.episode_count = 0
        self.obs_not_stored = 0
        self.refused = 0

    def new_episode(self) -> int:
        """The next episode id of the run (ids are unique across every recorded env)."""
        self._next_episode += 1
        return self._next_episode - 1

    def buffer(self, obs: Layout, action: Layout, info: bool) -> Steps:
        """A step buffer for one more recorded env."""
        steps = Steps(obs, action, info)
        self._steps.append(steps)
        return steps

    # --- steps ------------------------------------------------------------------------------

    def add_chunk(self, steps: Steps, chunk: dict[str, Any], n: int) -> None:
        """Add `n` rows of a vector env: arrays with a first axis of `n`."""
        if n <= 0:
            return
        if self.deadline == math.inf:
            self.deadline = self._clock() + FLUSH_INTERVAL
        steps.chunks.append(chunk)
        steps.chunk_rows += n
        if steps.chunk_rows >= steps.max_rows or self._clock() >= self.deadline:
            self.flush_steps()

    def flush_steps(self) -> None:
        """Send each env's buffered steps as a step frame; rows with NaN are refused, counted."""
        for steps in self._steps:
            if steps.rows:
                self._send_rows(steps)
            if steps.chunks:
                self._send_chunks(steps)
        self.deadline = math.inf

    def _send_rows(self, steps: Steps) -> None:
        n = len(steps.rows)
        episode, step, action, obs, reward, terminated, truncated, info, env = zip(*steps.rows)
        steps.rows.clear()
        body: dict[str, Any] = {
            "episode": np.fromiter(episode, np.int64, n),
            "step": np.fromiter(step, np.int64, n),
            "reward": np.fromiter(reward, np.float64, n),
            "terminated": np.fromiter(terminated, np.bool_, n),
            "truncated": np.fromiter(truncated, np.bool_, n),
            "env_index": np.fromiter(env, np.int64, n),
        }
        if steps.action.stored:
            body["action"] = _column(action, steps.action, n)
        if steps.obs.stored:
            body["obs"] = _column(obs, steps.obs, n)
        else:
            self.obs_not_stored += n
        if steps.info:
            body["info"] = list(info)
        self._emit_steps(body, n)

    def _send_chunks(self, steps: Steps) -> None:
        chunks, n = steps.chunks, steps.chunk_rows
        steps.chunks, steps.chunk_rows = [], 0
        body: dict[str, Any] = {}
        for name in chunks[0]:
            parts = [c[name] for c in chunks]
            body[name] = (list(np.concatenate(parts)) if name == "info"
                          else np.concatenate(parts))
        if "obs" not in body:
            self.obs_not_stored += n
        self._emit_steps(body, n)

    def _emit_steps(self, body: dict[str, Any], n: int) -> None:
        """Send a step body of numpy columns; rows with a NaN or infinite number are refused
        (the protocol refuses them: one would turn the whole frame into a dead letter) and
        counted in `refused`."""
        keep: np.ndarray[Any, Any] | None = None
        for value in body.values():
            if isinstance(value, np.ndarray):
                ok = _finite_rows(value)
                if ok is not None:
                    keep = ok if keep is None else keep & ok
        if keep is not None:
            self.refused += int(n - keep.sum())
            body = {k: _take(v, keep) for k, v in body.items()}
            n = int(keep.sum())
            if not n:
                return
        for name, value in list(body.items()):
            if isinstance(value, np.ndarray):
                body[name] = typed_array(np.ascontiguousarray(value))
        self.steps += n
        self._send(FrameKind.STEP, body, n)

    # --- episodes ---------------------------------------------------------------------------

    def episode(self, row: dict[str, Any]) -> None:
        """Buffer one ended episode: episode, return, length, terminated, truncated, and the
        optional env_index, seed, reset_obs (an int or bytes of the obs layout), reset_info."""
        row["ts_ns"] = time.time_ns()
        self.steps_taken += row["length"]
        row["_global_step"] = self.steps_taken
        if not self.episodes:
            self._episode_deadline = self._clock() + FLUSH_INTERVAL
        self.episodes.append(row)
        self.episode_count += 1
        if len(self.episodes) >= EPISODE_BATCH_ROWS or self._clock() >= self._episode_deadline:
            self.flush()

    def flush(self) -> None:
        """Send every buffered step, then every buffered episode."""
        self.flush_steps()
        if not self.episodes:
            return
        rows, self.episodes = self.episodes, []
        self._episode_deadline = math.inf
        if self._on_episodes is not None:
            self._on_episodes(rows)
        # a frame's optional columns are present in all its rows or in none: group by them
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(k for k, v in row.items() if v is not None), []).append(row)
        for keys, group in groups.items():
            self._send_episodes(keys, group)

    def _send_episodes(self, keys: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
        n = len(rows)
        body: dict[str, Any] = {}
        for key in keys:
            values = [r[key] for r in rows]
            if key == "reset_obs":
                layout = rows[0]["_obs_layout"]
                body[key] = typed_array(_column(values, layout, n))
            elif key == "reset_info":
                body[key] = values
            elif key.startswith("_"):
                continue
            elif key == "return":
                arr = np.asarray(values, np.float64)
                if not np.isfinite(arr).all():
                    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
                    self.refused += 1
                body[key] = typed_array(arr)
            elif key in ("terminated", "truncated"):
                body[key] = typed_array(np.asarray(values, np.bool_))
            else:
                body[key] = typed_array(np.asarray(values, np.int64))
        self._send(FrameKind.EPISODE, body, n)


def _take(value: Any, keep: np.ndarray[Any, Any]) -> Any:
    if isinstance(value, np.ndarray):
        return value[keep]
    return [v for v, k in zip(value, keep, strict=True) if k]
