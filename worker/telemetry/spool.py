"""A run's spool: every telemetry frame it sent, kept on disk until the ingest has stored them.

The run child appends (`SpoolWriter`, on its main thread); the worker daemon reads
(`SpoolReader`, on its loop) to replay the frames the ingest reports missing, deletes the
segments whose frames the ingest holds durably (`SpoolReader.trim`), so that a long run's spool
holds only what is not confirmed yet, and removes the spool once the ingest confirms the run
complete (`confirm`). Layout, under the run folder:

    spool/frames.bin         the first segment: MAGIC, then one record per frame from seq 0
    spool/frames.<N>.bin     a later segment: MAGIC, then records from seq N (12 digits)
    spool/confirmed          written once the ingest confirmed the run; the segments are removed

The writer starts a new segment once the current one holds GYMBUS_SPOOL_SEGMENT_BYTES (8 MiB
unless set). A trimmed first segment is cut back to MAGIC rather than deleted: frames.bin stays,
saying that the run has an unconfirmed spool, and its lock says whether the writer is alive.

A record is a header `<QIII` (seq, topic length, payload length, CRC-32 of topic and payload)
followed by the topic and the payload, the exact bytes that were published. Each record is
written with one `writev` on an unbuffered descriptor, so a run process killed at any moment
leaves every completed record readable and at most one torn record at the end, which the reader
ignores (its length runs past the end of the file). The writer holds an exclusive `flock` on
frames.bin for its lifetime: the daemon tells a spool still being written from one whose writer
is gone.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from gymbus.worker.telemetry.spool_files import (
    CONFIRMED_FILE,
    HEADER,
    MAGIC,
    SPOOL_DIR,
    SPOOL_FILE,
    SpoolError,
    crc,
    segment_path,
    segments,
    spool_bytes,
    spool_dir,
    spool_path,
)
from gymbus.worker.telemetry.spool_reader import INDEX_BATCH, SpoolReader

__all__ = ["CONFIRMED_FILE", "HEADER", "INDEX_BATCH", "MAGIC", "SPOOL_DIR", "SPOOL_FILE",
           "SpoolError", "SpoolReader", "SpoolWriter", "confirm", "is_confirmed", "reset",
           "segment_bytes", "segment_path", "segments", "spool_bytes", "spool_dir", "spool_path",
           "writer_alive"]

#: the variable that sets a segment's size in bytes (a segment is deleted whole, when trimmed)
SEGMENT_BYTES_VAR = "GYMBUS_SPOOL_SEGMENT_BYTES"
DEFAULT_SEGMENT_BYTES = 8 * 2**20


def segment_bytes(environ: Mapping[str, str] = os.environ) -> int:
    """A segment's size from GYMBUS_SPOOL_SEGMENT_BYTES (SpoolError for a bad value)."""
    raw = environ.get(SEGMENT_BYTES_VAR, "").strip()
    if not raw:
        return DEFAULT_SEGMENT_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1024:
        raise SpoolError(f"{SEGMENT_BYTES_VAR} must be a whole number of bytes >= 1024, "
                         f"got {raw!r}")
    return value


def is_confirmed(run_dir: Path) -> bool:
    return (run_dir / SPOOL_DIR / CONFIRMED_FILE).exists()


def reset(run_dir: Path) -> None:
    """Remove a run's spool and confirmation (a run started again under the same id)."""
    shutil.rmtree(spool_dir(run_dir), ignore_errors=True)


def confirm(run_dir: Path, frames: int) -> None:
    """Mark the run confirmed by the ingest, then remove its frames (the marker stays)."""
    folder = spool_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)  # a run that died before creating its spool
    marker = folder / CONFIRMED_FILE
    tmp = folder / (CONFIRMED_FILE + ".tmp")
    tmp.write_text(json.dumps({"frames": frames, "confirmed_ns": time.time_ns()}), encoding="utf-8")
    os.replace(tmp, marker)
    for _, path in reversed(segments(folder)):  # the first last: it says a spool is there
        path.unlink(missing_ok=True)


def writer_alive(path: Path) -> bool:
    """True while a process holds the spool's writer lock (its run child is still running)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops the shared lock, if it was taken
    return False


def _write(path: Path, fd: int, buffers: list[bytes]) -> None:
    """All of `buffers`, in one writev unless the kernel takes them in parts."""
    try:
        left = sum(len(b) for b in buffers)
        while left:
            done = os.writev(fd, buffers)
            left -= done
            if left:  # a short write: go on with what remains
                joined = b"".join(buffers)[done:]
                buffers = [joined]
    except OSError as exc:
        raise SpoolError(f"cannot write the spool {path}: {exc}") from None


class SpoolWriter:
    """Appends frames to one run's spool. Runs on the run process's main thread.

    `append` raises SpoolError when the disk refuses the write: the emitter then fails the run
    rather than send a frame that could never be repaired.
    """

    def __init__(self, path: Path, max_segment_bytes: int | None = None) -> None:
        self.path = path
        self.frames = 0
        self.max_segment_bytes = max_segment_bytes or segment_bytes()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SpoolError(f"cannot create the spool {path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # before emptying: it may be in use
            os.ftruncate(fd, 0)
            for first, old in segments(path.parent):  # an earlier attempt's later segments
                if first:
                    old.unlink(missing_ok=True)
            _write(path, fd, [MAGIC])
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(f"another process is writing the spool {path}") from None
        except BaseException:
            os.close(fd)
            raise
        #: the first segment's descriptor holds the lock; `_fd` is the segment being written
        self._lock_fd: int | None = fd
        self._fd: int | None = fd
        self._segment = path
        self._size = len(MAGIC)

    @classmethod
    def create(cls, run_dir: Path) -> SpoolWriter:
        """A new, empty spool in the run folder (replacing one left by an earlier attempt)."""
        return cls(spool_path(run_dir))

    def append(self, seq: int, parts: tuple[bytes, bytes] | list[bytes]) -> None:
        """Write one frame (topic, payload) as one record; seq must follow the previous one."""
        if self._fd is None:
            raise SpoolError(f"the spool {self.path} is closed")
        topic, payload = parts
        if seq != self.frames:
            raise SpoolError(f"spool {self.path}: frame seq {seq} after {self.frames} records")
        if self._size >= self.max_segment_bytes:
            self._next_segment(seq)
        header = HEADER.pack(seq, len(topic), len(payload), crc(topic, payload))
        _write(self._segment, self._fd, [header, topic, payload])
        self._size += HEADER.size + len(topic) + len(payload)
        self.frames += 1

    def _next_segment(self, first: int) -> None:
        """Go on in a new segment whose first record is `first` (the old one is complete)."""
        path = segment_path(self.path.parent, first)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                         0o644)
        except OSError as exc:
            raise SpoolError(f"cannot create the spool segment {path}: {exc}") from None
        if self._fd is not None and self._fd != self._lock_fd:
            os.close(self._fd)
        self._fd, self._segment, self._size = fd, path, len(MAGIC)
        _write(path, fd, [MAGIC])

    def close(self) -> None:
        """Close the files (and drop the writer lock). Idempotent."""
        if self._fd is not None and self._fd != self._lock_fd:
            os.close(self._fd)
        self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
