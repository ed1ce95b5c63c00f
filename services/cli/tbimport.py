"""`gymbus import-tb`: TensorBoard event files into the `metrics` table, through the ingest.

The files are read with TensorBoard's own reader (`plugin_event_accumulator`, which turns the
old `simple_value` scalars of torch's SummaryWriter, CleanRL and gymbus, and the tensor scalars
of TF2 and Stable-Baselines3, into one form) and published as metric frames on the telemetry
bus, so that the ingest stays the only writer of the DuckDB file.

Each folder holding event files becomes one run of its own, with an id derived from the folder:
`tb-<run id>` for a gymbus run folder, `tb-<folder name>-<hash of its path>` for any other. Its
frames are numbered deterministically: seq 0 `run_started` (config: source path, files, and a
digest of the points), seqs 1..n metric frames of POINTS_PER_FRAME points each in (tag, step)
order, seq n+1 `run_completed`. Importing the same files again sends the same (run_id, seq)s,
and the ingest drops every one as a duplicate: nothing is stored twice. Files that changed since
(a run still writing) give another digest: that import is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from gymbus.shared import queries
from gymbus.shared.codec import encode_frame
from gymbus.shared.errors import ExitCode, GymbusError, RemoteError
from gymbus.shared.protocol import Command, ErrorCode, FrameKind, LifecycleEvent
from gymbus.shared.settings import Settings
from gymbus.shared.transport import Client
from gymbus.worker.telemetry.publisher import Publisher, TelemetryError

RUN_ID_PREFIX = "tb-"
POINTS_PER_FRAME = 1024
EVENT_FILE_MARKER = "tfevents"
#: seconds to wait for the broker to forward the ingest's subscription: nothing spools an
#: import's frames, so it refuses to send them to nobody
SUBSCRIBE_WAIT = 5.0
#: frames queued before a send waits: the import notices a stalled broker while it sends
SEND_HWM = 10_000
#: seconds a send may wait for room in the queue before the import gives up
SEND_TIMEOUT = 5.0
#: milliseconds the closing socket may spend delivering what is queued: the CLI exits next
LINGER_MS = 5000
POLL_SECONDS = 0.05
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class TensorBoardImportError(GymbusError):
    """The import cannot be done as asked; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = ExitCode.REFUSED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Point:
    """One scalar: a tag's value at a step, with the wall-clock time it was written."""

    tag: str
    step: int
    value: float
    wall_ns: int


@dataclass
class Source:
    """One folder of event files, imported as one run."""

    folder: Path
    files: list[Path]
    run_id: str
    #: the gymbus run the folder belongs to, if it is a run folder
    of_run: str | None = None
    points: list[Point] = field(default_factory=list)
    #: values the protocol cannot carry (NaN, infinity) and steps out of int64, left out
    skipped: int = 0


# --- finding and reading event files --------------------------------------------------------------


def find_sources(target: str, settings: Settings) -> list[Source]:
    """The folders of event files under `target`: a run id, a run folder, any folder or file."""
    path = Path(target).expanduser()
    if not path.exists():
        run_dir = settings.run_dir(target)
        if not _is_run_id(target) or not run_dir.is_dir():
            raise TensorBoardImportError(
                f"{target!r} is neither a run of {settings.runs_dir} nor a path",
                ExitCode.NOT_FOUND)
        path = run_dir
    path = path.resolve()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob(f"*{EVENT_FILE_MARKER}*") if p.is_file())
    if not files or EVENT_FILE_MARKER not in files[0].name:
        raise TensorBoardImportError(
            f"no TensorBoard event files (*{EVENT_FILE_MARKER}*) in {path}", ExitCode.NOT_FOUND)
    by_folder: dict[Path, list[Path]] = {}
    for file in files:
        by_folder.setdefault(file.parent, []).append(file)
    runs_dir = settings.runs_dir.resolve()
    sources = []
    for folder, folder_files in sorted(by_folder.items()):
        of_run = folder.name if folder.parent == runs_dir else None
        sources.append(Source(folder, folder_files, run_id_for(folder, of_run), of_run))
    return sources


def _is_run_id(text: str) -> bool:
    return bool(text) and _UNSAFE.search(text) is None


def run_id_for(folder: Path, of_run: str | None) -> str:
    """`tb-<run id>` for a gymbus run folder, else `tb-<folder name>-<10 hex of its path>`."""
    if of_run is not None and _is_run_id(of_run):
        return f"{RUN_ID_PREFIX}{of_run}"[:128]
    name = _UNSAFE.sub("_", folder.name).strip("_")[:60] or "events"
    digest = hashlib.sha1(str(folder).encode("utf-8")).hexdigest()[:10]
    return f"{RUN_ID_PREFIX}{name}-{digest}"


def read_points(source: Source) -> None:
    """Fill `source.points` with every scalar of its event files, by TensorBoard's reader.

    One file at a time (in name order), so that two files never merge under TensorBoard's
    purge rules; points come out sorted by (tag, step, file, order in the file).
    """
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    points: list[tuple[str, int, int, int, Point]] = []
    for index, file in enumerate(source.files):
        acc = pea.EventAccumulator(str(file), size_guidance={pea.TENSORS: 0})
        acc.Reload()
        for tag in acc.Tags()[pea.TENSORS]:
            if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
                continue  # text, histograms, images: not metrics
            for order, event in enumerate(acc.Tensors(tag)):
                value = float(tensor_util.make_ndarray(event.tensor_proto).item())
                step = int(event.step)
                if not math.isfinite(value) or not -(2**63) <= step < 2**63:
                    source.skipped += 1
                    continue
                point = Point(tag, step, value, int(event.wall_time * 1e9))
                points.append((tag, step, index, order, point))
    points.sort(key=lambda p: p[:4])
    source.points = [p[-1] for p in points]


def digest_of(points: list[Point]) -> str:
    """A digest of the points: another digest for the same run id means the files changed."""
    h = hashlib.sha256()
    for p in points:
        h.update(f"{p.tag}\x00{p.step}\x00{p.value!r}\x00{p.wall_ns}\n".encode())
    return h.hexdigest()[:32]


# --- frames ---------------------------------------------------------------------------------------


def build_frames(source: Source) -> list[tuple[bytes, bytes]]:
    """Every frame of the imported run, in seq order, the same for the same files."""
    points = source.points
    first_ns = min((p.wall_ns for p in points), default=0)
    last_ns = max((p.wall_ns for p in points), default=0)
    config: dict[str, Any] = {
        "source": "tensorboard", "path": str(source.folder),
        "files": [f.name for f in source.files], "points": len(points),
        "skipped": source.skipped, "digest": digest_of(points), "of_run": source.of_run,
    }
    started: dict[str, Any] = {"event": LifecycleEvent.RUN_STARTED.value, "config": config}
    started.update(_run_fields(source))
    frames = [encode_frame(FrameKind.LIFECYCLE, source.run_id, 0, started, ts_ns=first_ns)]
    for start in range(0, len(points), POINTS_PER_FRAME):
        chunk = points[start:start + POINTS_PER_FRAME]
        body = {"name": [p.tag for p in chunk], "step": [p.step for p in chunk],
                "value": [p.value for p in chunk], "ts_ns": [p.wall_ns for p in chunk]}
        frames.append(encode_frame(FrameKind.METRIC, source.run_id, len(frames), body,
                                   ts_ns=chunk[-1].wall_ns))
    completed = {"event": LifecycleEvent.RUN_COMPLETED.value, "status": "completed",
                 "frames_emitted": len(frames) + 1, "reason": None}
    frames.append(encode_frame(FrameKind.LIFECYCLE, source.run_id, len(frames), completed,
                               ts_ns=last_ns))
    return frames


def _run_fields(source: Source) -> dict[str, Any]:
    """env, algo and seed of the gymbus run the folder belongs to, from its config.json."""
    try:
        config = json.loads((source.folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    out = {k: config[k] for k in ("env", "algo") if isinstance(config.get(k), str)}
    if type(config.get("seed")) is int:
        out["seed"] = config["seed"]
    return out


# --- publishing -----------------------------------------------------------------------------------


def publish(settings: Settings, frames: list[tuple[bytes, bytes]],
            subscribe_wait: float = SUBSCRIBE_WAIT) -> None:
    """Send the frames to the broker's telemetry XSUB once a subscription has come through."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    publisher = Publisher.connect(ctx, settings.telemetry_in, hwm=SEND_HWM, linger_ms=LINGER_MS,
                                  block_timeout=SEND_TIMEOUT)
    try:
        if not publisher.wait_for_subscriber(subscribe_wait):
            raise TensorBoardImportError(
                f"no subscriber reached {settings.telemetry_in} within {subscribe_wait:g} s: "
                f"is the broker running?", ExitCode.UNAVAILABLE)
        for seq, parts in enumerate(frames):
            publisher.publish(seq, parts)
    except TelemetryError as exc:  # PublishTimeout: the broker took no frame for SEND_TIMEOUT
        raise TensorBoardImportError(str(exc), ExitCode.UNAVAILABLE) from None
    finally:
        publisher.close()


# --- one import, checked against the ingest -------------------------------------------------------


@dataclass
class ImportResult:
    """What one folder's import did, as `gymbus import-tb --json` prints it."""

    run_id: str
    path: str
    files: int
    tags: int
    points: int
    skipped: int
    frames: int
    new_rows: int
    already_stored: int


def stored_digest(ingest: Client, run_id: str) -> str | None:
    """The digest recorded by an earlier import of `run_id`, or None if there was none."""
    reply = ingest.request(Command.QUERY, {
        "sql": queries.run_config(run_id), "max_rows": 1})
    if not reply["rows"] or reply["rows"][0][0] is None:
        return None
    try:
        config = json.loads(reply["rows"][0][0])
    except ValueError:
        return None
    return config.get("digest") if isinstance(config, dict) else None


def run_stats(ingest: Client, run_id: str) -> dict[str, Any] | None:
    try:
        runs = ingest.request(Command.RUN_STATS, {"run_id": run_id})["runs"]
    except RemoteError as exc:
        if exc.code is ErrorCode.UNKNOWN_RUN:
            return None
        raise
    return runs[0] if runs else None


def import_source(source: Source, settings: Settings, ingest: Client,
                  timeout: float) -> ImportResult:
    """Read, publish and wait until the ingest has taken every frame (stored or duplicate)."""
    read_points(source)
    frames = build_frames(source)
    digest = digest_of(source.points)
    before = run_stats(ingest, source.run_id)
    if before is not None:
        earlier = stored_digest(ingest, source.run_id)
        if earlier is not None and earlier != digest:
            raise TensorBoardImportError(
                f"{source.folder} was imported before as run {source.run_id} with other "
                f"contents (the files changed since); nothing was stored")
    publish(settings, frames)
    stored0 = before["frames_stored"] if before else 0
    dups0 = before["duplicates"] if before else 0
    rows0 = before["metrics"] if before else 0
    deadline = time.monotonic() + timeout
    while True:
        after = run_stats(ingest, source.run_id)
        taken = 0 if after is None else (
            after["frames_stored"] - stored0 + after["duplicates"] - dups0)
        if after is not None and taken >= len(frames):
            break
        if time.monotonic() > deadline:
            raise TensorBoardImportError(
                f"the ingest took {taken} of {len(frames)} frames of run {source.run_id} "
                f"within {timeout:g} s", ExitCode.UNAVAILABLE)
        time.sleep(POLL_SECONDS)  # poll interval, bounded by the deadline
    new_rows = after["metrics"] - rows0
    return ImportResult(
        run_id=source.run_id, path=str(source.folder), files=len(source.files),
        tags=len({p.tag for p in source.points}), points=len(source.points),
        skipped=source.skipped, frames=len(frames), new_rows=new_rows,
        already_stored=len(source.points) - new_rows,
    )
