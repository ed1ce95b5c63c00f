"""Reading a run's spool while its run child may still append to it: `SpoolReader`.

Runs on the worker daemon's loop (the spool repair) and in `gymbus sync`; the layout is described
in worker/telemetry/spool.py.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from array import array
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gymbus.worker.telemetry.spool_files import HEADER, MAGIC, SpoolError, crc, segments

#: records indexed per `refresh` call, so that a huge spool never holds the daemon's loop long
INDEX_BATCH = 100_000


@dataclass(eq=False)
class _Segment:
    """One segment file as the reader has indexed it."""

    first: int
    path: Path
    offsets: array[int] = field(default_factory=lambda: array("q"))
    scanned: int = 0  # bytes indexed so far (past MAGIC once checked)
    inode: int | None = None
    #: a later segment exists and this one is indexed to its end: it will not grow
    done: bool = False

    @property
    def end(self) -> int:
        """The seq after its last indexed record."""
        return self.first + len(self.offsets)


class SpoolReader:
    """Reads a spool that its run child may still be appending to. Runs on the daemon's loop.

    `refresh` indexes the records written since the last call (bounded per call); `count` is the
    seq after the last complete record (how many frames the run spooled), `first` the lowest seq
    the spool still holds (0 until `trim` deleted segments). Records are checked against their
    CRC when read, so a damaged record is never replayed: `read` raises SpoolError for it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.folder = path.parent
        self.segments: list[_Segment] = []
        #: the seq below which the segments were trimmed (or found trimmed)
        self.trimmed = 0
        self._head_inode: int | None = None
        #: why indexing stopped before the end of the file (a damaged record), else None
        self.damage: str | None = None
        #: the last `refresh` indexed every complete record there was (none was left for later)
        self.exhausted = True
        #: seqs whose record failed its checksum in `read_range` (skipped, never replayed)
        self.bad_records: set[int] = set()

    @property
    def count(self) -> int:
        return self.segments[-1].end if self.segments else self.trimmed

    @property
    def first(self) -> int:
        return self.segments[0].first if self.segments else self.trimmed

    def refresh(self, max_records: int = INDEX_BATCH) -> int:
        """Index complete records appended since the last call; returns `count`.

        At most `max_records` per call: `exhausted` says whether the end was reached.
        """
        self.exhausted = True
        try:
            head = os.stat(self.path)
        except FileNotFoundError:
            return self.count
        except OSError as exc:
            raise SpoolError(f"cannot read the spool {self.path}: {exc}") from None
        if head.st_ino != self._head_inode:  # a new spool (a new attempt): index it again
            self.segments, self.trimmed, self.damage = [], 0, None
            self._head_inode = head.st_ino
        self._find_segments()
        budget, i = max_records, 0
        while i < len(self.segments) and self.damage is None:
            seg = self.segments[i]
            later = self.segments[i + 1] if i + 1 < len(self.segments) else None
            if not seg.done:
                budget -= self._index(seg, budget)
                if budget <= 0:
                    self.exhausted = False  # more may follow: the next call goes on
                    return self.count
                if later is None:
                    break
                seg.done = True  # the writer went on to `later`: this one is complete
                if i == 0 and seg.first == 0 and not seg.offsets:  # cut back to MAGIC: trimmed
                    self.segments.pop(0)
                    self.trimmed = later.first
                    continue
                if later.first != seg.end:
                    self.damage = (f"{seg.path.name} ends at frame {seg.end} but "
                                   f"{later.path.name} starts at {later.first}")
            i += 1
        return self.count

    def _find_segments(self) -> None:
        """Add the segments the writer started since the last call; drop those trimmed."""
        known = {seg.first: seg for seg in self.segments}
        self.segments = [known.get(first) or _Segment(first, path)
                         for first, path in segments(self.folder) if first >= self.trimmed]
        if len(self.segments) > 1 and self.segments[0].first == 0 and self.segments[0].done:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.segments[0].path).st_size < self.segments[0].scanned:
                    del self.segments[0]  # cut back to MAGIC by another reader's trim
        if self.segments and self.segments[0].first > self.trimmed:
            self.trimmed = self.segments[0].first  # trimmed by another reader

    def _index(self, seg: _Segment, max_records: int) -> int:
        """Index `seg`'s records from where it stopped, by their headers only (payloads are
        checked when read): cheap even for a spool of gigabytes. Returns the records indexed."""
        try:
            with open(seg.path, "rb") as f:
                st = os.fstat(f.fileno())
                if seg.inode is not None and (st.st_ino != seg.inode or st.st_size < seg.scanned):
                    seg.offsets, seg.scanned = array("q"), 0  # replaced or cut: index it again
                seg.inode = st.st_ino
                if seg.scanned == 0:
                    if st.st_size < len(MAGIC):
                        return 0
                    if f.read(len(MAGIC)) != MAGIC:
                        self.damage = f"{seg.path} is not a gymbus spool (bad magic)"
                        return 0
                    seg.scanned = len(MAGIC)
                return self._index_records(seg, f.fileno(), st.st_size, max_records)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise SpoolError(f"cannot read the spool {seg.path}: {exc}") from None

    def _index_records(self, seg: _Segment, fd: int, size: int, max_records: int) -> int:
        pos, indexed = seg.scanned, 0
        while indexed < max_records and pos + HEADER.size <= size:
            seq, topic_len, payload_len, _ = HEADER.unpack(os.pread(fd, HEADER.size, pos))
            end = pos + HEADER.size + topic_len + payload_len
            if end > size:
                break  # torn, or still being written
            if seq != seg.end:
                self.damage = (f"record at byte {pos} of {seg.path.name} has seq {seq}, "
                               f"expected {seg.end}")
                break
            seg.offsets.append(pos)
            pos = end
            indexed += 1
        seg.scanned = pos
        return indexed

    def trim(self, below: int) -> int:
        """Delete the segments whose every frame is below `below` (the ingest holds those
        durably), never the one being written; the first is cut back to MAGIC. Returns the
        bytes freed."""
        freed = 0
        while len(self.segments) > 1 and self.segments[0].done and self.segments[1].first <= below:
            seg = self.segments.pop(0)
            try:
                freed += os.stat(seg.path).st_size - (len(MAGIC) if seg.first == 0 else 0)
                if seg.first == 0:
                    os.truncate(seg.path, len(MAGIC))
                else:
                    seg.path.unlink()
            except FileNotFoundError:
                pass  # trimmed by another reader
            except OSError as exc:
                self.segments.insert(0, seg)
                raise SpoolError(f"cannot trim the spool segment {seg.path}: {exc}") from None
            self.trimmed = self.segments[0].first
        return max(freed, 0)

    def read(self, seq: int) -> tuple[bytes, bytes]:
        """The (topic, payload) of frame `seq`; SpoolError when it is damaged, trimmed or not
        indexed."""
        seg = self._segment_of(seq)
        with self._open(seg.path) as fd:
            return self._read_at(fd, seg, seq)

    def read_range(self, first: int, last: int) -> Generator[tuple[int, bytes, bytes], None, None]:
        """(seq, topic, payload) for seq first..last that are indexed and not trimmed, in order.
        A damaged record is skipped and kept in `bad_records`; SpoolError when a file cannot be
        read at all."""
        seq = max(first, self.first)
        while seq <= min(last, self.count - 1):
            seg = self._segment_of(seq)
            with self._open(seg.path) as fd:
                for seq in range(seq, min(last, seg.end - 1) + 1):  # noqa: B020 - goes on after
                    try:
                        topic, payload = self._read_at(fd, seg, seq)
                    except OSError as exc:
                        raise SpoolError(f"cannot read the spool {seg.path}: {exc}") from None
                    except SpoolError:
                        self.bad_records.add(seq)
                        continue
                    yield seq, topic, payload
            seq = seg.end

    def _segment_of(self, seq: int) -> _Segment:
        if not self.first <= seq < self.count:
            what = "trimmed (the ingest holds it)" if seq < self.first else "not indexed"
            raise SpoolError(f"spool {self.path}: frame {seq} is {what} ({self.first}-"
                             f"{self.count - 1} held)")
        i = bisect.bisect_right(self.segments, seq, key=lambda s: s.first) - 1
        return self.segments[i]

    @contextlib.contextmanager
    def _open(self, path: Path) -> Iterator[int]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SpoolError(f"cannot read the spool {path}: {exc}") from None
        try:
            yield fd
        finally:
            os.close(fd)

    def _read_at(self, fd: int, seg: _Segment, seq: int) -> tuple[bytes, bytes]:
        pos = seg.offsets[seq - seg.first]
        head = os.pread(fd, HEADER.size, pos)
        stored_seq, topic_len, payload_len, check = HEADER.unpack(head)
        body = os.pread(fd, topic_len + payload_len, pos + HEADER.size)
        topic, payload = body[:topic_len], body[topic_len:]
        whole = len(body) == topic_len + payload_len
        if stored_seq != seq or not whole or crc(topic, payload) != check:
            raise SpoolError(f"spool {self.path}: frame {seq} is damaged (checksum mismatch)")
        return topic, payload
