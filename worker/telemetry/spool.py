"""A run's spool: every telemetry frame it sent, kept on disk until the ingest has stored them.

The run child appends (`SpoolWriter`, on its main thread); the worker daemon reads
(`SpoolReader`, on its loop) to replay the frames the ingest reports missing, and removes the
spool once the ingest confirms the run complete (`confirm`). Layout, under the run folder:

    spool/frames.bin     MAGIC, then one record per frame, in seq order from 0
    spool/confirmed      written once the ingest confirmed the run; frames.bin is then removed

A record is a header `<QIII` (seq, topic length, payload length, CRC-32 of topic and payload)
followed by the topic and the payload, the exact bytes that were published. Each record is
written with one `writev` on an unbuffered descriptor, so a run process killed at any moment
leaves every completed record readable and at most one torn record at the end, which the reader
ignores (its length runs past the end of the file). The writer holds an exclusive `flock` on the
file for its lifetime: the daemon tells a spool still being written from one whose writer is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
import time
import zlib
from array import array
from collections.abc import Generator, Iterator
from pathlib import Path

from gymbus.shared.errors import GymbusError

SPOOL_DIR = "spool"
SPOOL_FILE = "frames.bin"
CONFIRMED_FILE = "confirmed"
MAGIC = b"GBSPOOL1"
HEADER = struct.Struct("<QIII")
#: records indexed per `refresh` call, so that a huge spool never holds the daemon's loop long
INDEX_BATCH = 100_000


class SpoolError(GymbusError):
    """The spool could not be written or read (disk full, permissions, a damaged file).

    A run that cannot spool fails with this reason: its frames could no longer be repaired.
    """


def spool_dir(run_dir: Path) -> Path:
    return run_dir / SPOOL_DIR


def spool_path(run_dir: Path) -> Path:
    return run_dir / SPOOL_DIR / SPOOL_FILE


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
    (folder / SPOOL_FILE).unlink(missing_ok=True)


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


def _crc(topic: bytes, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(topic))


class SpoolWriter:
    """Appends frames to one run's spool. Runs on the run process's main thread.

    `append` raises SpoolError when the disk refuses the write: the emitter then fails the run
    rather than send a frame that could never be repaired.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.frames = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                         0o644)
        except OSError as exc:
            raise SpoolError(f"cannot create the spool {path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._write(fd, [MAGIC])
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(f"another process is writing the spool {path}") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

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
        header = HEADER.pack(seq, len(topic), len(payload), _crc(topic, payload))
        self._write(self._fd, [header, topic, payload])
        self.frames += 1

    def _write(self, fd: int, buffers: list[bytes]) -> None:
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
            raise SpoolError(f"cannot write the spool {self.path}: {exc}") from None

    def close(self) -> None:
        """Close the file (and drop the writer lock). Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SpoolReader:
    """Reads a spool that its run child may still be appending to. Runs on the daemon's loop.

    `refresh` indexes the records written since the last call (bounded per call); `count` is how
    many complete records are indexed. Records are checked against their CRC when read, so a
    damaged record is never replayed: `read` raises SpoolError for it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offsets = array("q")  # offsets[seq] = where the record of seq starts
        self._scanned = 0  # bytes indexed so far (past MAGIC once checked)
        self._inode: int | None = None
        #: why indexing stopped before the end of the file (a damaged record), else None
        self.damage: str | None = None
        #: the last `refresh` indexed every complete record there was (none was left for later)
        self.exhausted = True
        #: seqs whose record failed its checksum in `read_range` (skipped, never replayed)
        self.bad_records: set[int] = set()

    @property
    def count(self) -> int:
        return len(self.offsets)

    def refresh(self, max_records: int = INDEX_BATCH) -> int:
        """Index complete records appended since the last call; returns `count`.

        At most `max_records` per call: `exhausted` says whether the end was reached.
        """
        self.exhausted = True
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self._inode or st.st_size < self._scanned:
                    self._restart(st.st_ino)  # the spool was replaced: index it again
                if self._scanned == 0:
                    if st.st_size < len(MAGIC):
                        return 0
                    if f.read(len(MAGIC)) != MAGIC:
                        self.damage = f"{self.path} is not a gymbus spool (bad magic)"
                        return 0
                    self._scanned = len(MAGIC)
                if self.damage is None:
                    self._index(f.fileno(), st.st_size, max_records)
        except FileNotFoundError:
            return self.count
        except OSError as exc:
            raise SpoolError(f"cannot read the spool {self.path}: {exc}") from None
        return self.count

    def _restart(self, inode: int) -> None:
        self.offsets = array("q")
        self._scanned = 0
        self._inode = inode
        self.damage = None

    def _index(self, fd: int, size: int, max_records: int) -> None:
        """Index records from `_scanned` on, by their headers only (payloads are checked when
        read): cheap even for a spool of gigabytes."""
        pos = self._scanned
        for indexed in range(max_records + 1):
            if indexed == max_records:
                self.exhausted = False  # more may follow: the next call goes on
                break
            if pos + HEADER.size > size:
                break
            seq, topic_len, payload_len, _ = HEADER.unpack(os.pread(fd, HEADER.size, pos))
            end = pos + HEADER.size + topic_len + payload_len
            if end > size:
                break  # torn, or still being written
            if seq != len(self.offsets):
                self.damage = f"record at byte {pos} has seq {seq}, expected {len(self.offsets)}"
                break
            self.offsets.append(pos)
            pos = end
        self._scanned = pos

    def read(self, seq: int) -> tuple[bytes, bytes]:
        """The (topic, payload) of frame `seq`; SpoolError when it is damaged or not indexed."""
        with self._open() as fd:
            return self._read_at(fd, seq)

    def read_range(self, first: int, last: int) -> Generator[tuple[int, bytes, bytes], None, None]:
        """(seq, topic, payload) for seq first..last that are indexed, in order, from one open
        file. A damaged record is skipped and kept in `bad_records`; SpoolError when the file
        cannot be read at all."""
        with self._open() as fd:
            for seq in range(max(first, 0), min(last, self.count - 1) + 1):
                try:
                    topic, payload = self._read_at(fd, seq)
                except OSError as exc:
                    raise SpoolError(f"cannot read the spool {self.path}: {exc}") from None
                except SpoolError:
                    self.bad_records.add(seq)
                    continue
                yield seq, topic, payload

    @contextlib.contextmanager
    def _open(self) -> Iterator[int]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SpoolError(f"cannot read the spool {self.path}: {exc}") from None
        try:
            yield fd
        finally:
            os.close(fd)

    def _read_at(self, fd: int, seq: int) -> tuple[bytes, bytes]:
        if not 0 <= seq < self.count:
            raise SpoolError(f"spool {self.path} holds no frame {seq} ({self.count} indexed)")
        pos = self.offsets[seq]
        head = os.pread(fd, HEADER.size, pos)
        stored_seq, topic_len, payload_len, crc = HEADER.unpack(head)
        body = os.pread(fd, topic_len + payload_len, pos + HEADER.size)
        topic, payload = body[:topic_len], body[topic_len:]
        if stored_seq != seq or len(body) != topic_len + payload_len or _crc(topic, payload) != crc:
            raise SpoolError(f"spool {self.path}: frame {seq} is damaged (checksum mismatch)")
        return topic, payload
