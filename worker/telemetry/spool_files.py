"""The spool's files: their names, the record header, the segments of a run's spool.

Shared by the writer (worker/telemetry/spool.py) and the reader (spool_reader.py); the layout is
described in spool.py.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from pathlib import Path

from gymbus.shared.errors import GymbusError

SPOOL_DIR = "spool"
SPOOL_FILE = "frames.bin"
CONFIRMED_FILE = "confirmed"
MAGIC = b"GBSPOOL1"
HEADER = struct.Struct("<QIII")


class SpoolError(GymbusError):
    """The spool could not be written or read (disk full, permissions, a damaged file).

    A run that cannot spool fails with this reason: its frames could no longer be repaired.
    """


def spool_dir(run_dir: Path) -> Path:
    return run_dir / SPOOL_DIR


def spool_path(run_dir: Path) -> Path:
    """The spool's first segment, which stays while the spool is unconfirmed."""
    return run_dir / SPOOL_DIR / SPOOL_FILE


def segment_path(folder: Path, first: int) -> Path:
    """The segment whose first record has seq `first`, in the spool folder `folder`."""
    return folder / (SPOOL_FILE if first == 0 else f"frames.{first:012d}.bin")


def segments(folder: Path) -> list[tuple[int, Path]]:
    """(first seq, path) of every segment in the spool folder, by first seq."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            name = entry.name
            if name == SPOOL_FILE:
                found.append((0, Path(entry.path)))
            elif name.startswith("frames.") and name.endswith(".bin") and name[7:-4].isdigit():
                found.append((int(name[7:-4]), Path(entry.path)))
    return sorted(found)


def spool_bytes(run_dir: Path) -> int:
    """Bytes the run's spool holds on disk now (every segment)."""
    total = 0
    for _, path in segments(spool_dir(run_dir)):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def crc(topic: bytes, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(topic))
