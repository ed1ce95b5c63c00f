"""The run spool: what the writer appends the reader gets back, byte for byte; a torn or damaged
record is never replayed; a killed writer leaves every completed record readable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import wait_until

from gymbus.shared.codec import decode_frame, encode_frame
from gymbus.shared.protocol import FrameKind, LifecycleEvent
from gymbus.worker.telemetry import spool
from gymbus.worker.telemetry.emitter import Emitter
from gymbus.worker.telemetry.spool import HEADER, MAGIC, SpoolError, SpoolReader, SpoolWriter

RUN = "01SPOOLTEST"


def frame(seq: int, rows: int = 3) -> tuple[bytes, bytes]:
    body = {"name": ["charts/x"] * rows, "step": list(range(rows)),
            "value": [float(seq)] * rows, "ts_ns": [seq] * rows}
    return encode_frame(FrameKind.METRIC, RUN, seq, body)


def write(run_dir: Path, n: int) -> list[tuple[bytes, bytes]]:
    frames = [frame(seq, rows=1 + seq % 7) for seq in range(n)]
    writer = SpoolWriter.create(run_dir)
    for seq, parts in enumerate(frames):
        writer.append(seq, parts)
    writer.close()
    return frames


def test_what_is_written_is_read_back_exactly(tmp_path: Path) -> None:
    frames = write(tmp_path, 50)
    reader = SpoolReader(spool.spool_path(tmp_path))
    assert reader.refresh() == 50 and reader.exhausted and reader.damage is None
    assert [reader.read(seq) for seq in range(50)] == frames
    assert [(t, p) for _, t, p in reader.read_range(10, 19)] == frames[10:20]
    assert [seq for seq, _, _ in reader.read_range(45, 99)] == list(range(45, 50))
    with pytest.raises(SpoolError):
        reader.read(50)


def test_indexing_is_incremental_and_bounded(tmp_path: Path) -> None:
    frames = [frame(seq) for seq in range(30)]
    writer = SpoolWriter.create(tmp_path)
    reader = SpoolReader(spool.spool_path(tmp_path))
    for seq, parts in enumerate(frames[:10]):
        writer.append(seq, parts)
    assert reader.refresh(max_records=4) == 4 and not reader.exhausted
    assert reader.refresh() == 10 and reader.exhausted
    for seq, parts in enumerate(frames[10:], start=10):
        writer.append(seq, parts)
    assert reader.refresh() == 30
    assert reader.read(29) == frames[29]
    writer.close()


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size + 5])
def test_a_torn_last_record_is_ignored(tmp_path: Path, cut: int) -> None:
    frames = write(tmp_path, 5)
    path = spool.spool_path(tmp_path)
    last = HEADER.size + sum(map(len, frames[-1]))
    os.truncate(path, path.stat().st_size - last + cut)
    reader = SpoolReader(path)
    assert reader.refresh() == 4 and reader.exhausted
    assert reader.read(3) == frames[3]


def test_a_damaged_record_is_refused_and_a_bad_header_stops_the_index(tmp_path: Path) -> None:
    frames = write(tmp_path, 5)
    path = spool.spool_path(tmp_path)
    data = bytearray(path.read_bytes())
    second = len(MAGIC) + HEADER.size + sum(map(len, frames[0]))
    data[second + HEADER.size + 3] ^= 0xFF  # a byte of frame 1's topic
    path.write_bytes(bytes(data))
    reader = SpoolReader(path)
    assert reader.refresh() == 5
    with pytest.raises(SpoolError, match="damaged"):
        reader.read(1)
    assert reader.read(2) == frames[2]
    assert [seq for seq, _, _ in reader.read_range(0, 4)] == [0, 2, 3, 4]  # never replayed
    assert reader.bad_records == {1}

    data[second:second + 8] = (7).to_bytes(8, "little")  # frame 1's header claims seq 7
    path.write_bytes(bytes(data))
    reader = SpoolReader(path)
    assert reader.refresh() == 1
    assert reader.damage is not None and "seq 7" in reader.damage


def test_the_writer_keeps_order_and_its_lock(tmp_path: Path) -> None:
    writer = SpoolWriter.create(tmp_path)
    path = spool.spool_path(tmp_path)
    assert spool.writer_alive(path)
    with pytest.raises(SpoolError, match="seq 1 after 0"):
        writer.append(1, frame(1))
    with pytest.raises(SpoolError, match="another process"):
        SpoolWriter.create(tmp_path)
    writer.close()
    assert not spool.writer_alive(path)
    with pytest.raises(SpoolError, match="closed"):
        writer.append(0, frame(0))


def test_confirm_and_reset(tmp_path: Path) -> None:
    write(tmp_path, 3)
    spool.confirm(tmp_path, 3)
    assert spool.is_confirmed(tmp_path) and not spool.spool_path(tmp_path).exists()
    spool.reset(tmp_path)
    assert not spool.spool_dir(tmp_path).exists()


WRITER_SCRIPT = """
import sys
from pathlib import Path
from gymbus.shared.codec import encode_frame
from gymbus.shared.protocol import FrameKind
from gymbus.worker.telemetry.spool import SpoolWriter
writer = SpoolWriter.create(Path(sys.argv[1]))
seq = 0
while True:
    body = {"name": ["x"] * 500, "step": list(range(500)), "value": [1.5] * 500,
            "ts_ns": [seq] * 500}
    writer.append(seq, encode_frame(FrameKind.METRIC, "01KILLED", seq, body))
    seq += 1
    if seq == 200:
        print("ready", flush=True)
"""


def test_a_writer_killed_mid_write_leaves_every_completed_record(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path)],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        path = spool.spool_path(tmp_path)
        assert spool.writer_alive(path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not spool.writer_alive(path)
    reader = SpoolReader(path)
    count = reader.refresh()
    assert count >= 200 and reader.exhausted and reader.damage is None
    seqs = [decode_frame([t, p]).seq for _, t, p in reader.read_range(0, count - 1)]
    assert seqs == list(range(count))


def test_the_emitter_spools_every_frame_it_sends_before_sending(tmp_path: Path) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.PUB)  # no subscriber: sends go nowhere, the spool keeps them
    sock.setsockopt(zmq.LINGER, 0)
    try:
        emitter = Emitter(sock, RUN, agent_id="a0", worker_id="w0")
        emitter.spool = SpoolWriter.create(tmp_path)
        emitter.lifecycle(LifecycleEvent.RUN_STARTED, config={"env": "x"})
        for step in range(3000):
            emitter.step(0, step, 1, step % 16, 0.0, False, False)
        emitter.metric("charts/epsilon", 1, 0.5)
        emitted = emitter.finish("completed", None, 1, 3000)
        emitter.close(0)
        emitter.spool.close()
    finally:
        ctx.term()
    reader = SpoolReader(spool.spool_path(tmp_path))
    assert reader.refresh() == emitted
    frames = [decode_frame([t, p]) for _, t, p in reader.read_range(0, emitted - 1)]
    assert [f.seq for f in frames] == list(range(emitted))
    assert sum(f.rows for f in frames if f.kind is FrameKind.STEP) == 3000
    assert frames[-1].body["event"] == LifecycleEvent.RUN_COMPLETED
    assert frames[-1].body["frames_emitted"] == emitted
    wait_until(lambda: not spool.writer_alive(spool.spool_path(tmp_path)), 1, "lock released")


def test_segments_are_read_across_and_trimmed_whole(tmp_path: Path) -> None:
    """A spool of small segments reads back exactly; `trim` deletes whole segments below the
    confirmed seq (never the one being written), and a new reader sees what is left."""
    frames = [frame(seq, rows=1 + seq % 7) for seq in range(300)]
    writer = SpoolWriter(spool.spool_path(tmp_path), max_segment_bytes=2048)
    for seq, parts in enumerate(frames[:200]):
        writer.append(seq, parts)
    reader = SpoolReader(spool.spool_path(tmp_path))
    assert reader.refresh() == 200
    held = spool.segments(spool.spool_dir(tmp_path))
    assert len(held) > 5 and held[0][0] == 0
    assert [(s, (t, p)) for s, t, p in reader.read_range(0, 199)] == list(enumerate(frames[:200]))
    before = spool.spool_bytes(tmp_path)
    freed = reader.trim(150)
    assert freed > 0 and spool.spool_bytes(tmp_path) == before - freed
    assert 0 < reader.first <= 150 and reader.count == 200
    assert spool.spool_path(tmp_path).stat().st_size == len(MAGIC)  # the first one stays, cut
    with pytest.raises(SpoolError, match="trimmed"):
        reader.read(0)
    assert reader.trim(10**9) >= 0 and len(reader.segments) == 1  # the last one is kept
    for seq, parts in enumerate(frames[200:], start=200):
        writer.append(seq, parts)
    writer.close()
    fresh = SpoolReader(spool.spool_path(tmp_path))
    assert fresh.refresh() == 300 and fresh.damage is None and fresh.first == reader.first
    assert [(s, (t, p)) for s, t, p in fresh.read_range(0, 299)] == \
        list(enumerate(frames))[fresh.first:]
    spool.confirm(tmp_path, 300)
    assert spool.segments(spool.spool_dir(tmp_path)) == [] and spool.is_confirmed(tmp_path)


def test_a_bad_segment_size_is_refused_naming_the_variable() -> None:
    with pytest.raises(SpoolError, match="GYMBUS_SPOOL_SEGMENT_BYTES"):
        spool.segment_bytes({"GYMBUS_SPOOL_SEGMENT_BYTES": "12"})
    assert spool.segment_bytes({}) == spool.DEFAULT_SEGMENT_BYTES


def test_a_second_reader_sees_the_trim_of_the_first(tmp_path: Path) -> None:
    writer = SpoolWriter(spool.spool_path(tmp_path), max_segment_bytes=2048)
    for seq in range(120):
        writer.append(seq, frame(seq))
    trimmer, follower = (SpoolReader(spool.spool_path(tmp_path)) for _ in range(2))
    assert trimmer.refresh() == follower.refresh() == 120 and follower.first == 0
    assert trimmer.trim(100) > 0
    assert follower.refresh() == 120 and follower.first == trimmer.first > 0
    writer.close()


def test_gymbus_sync_reads_a_trimmed_spool(tmp_path: Path) -> None:
    """A spool whose first segments were trimmed (the ingest held them, run_started included)
    still names its run and its frames for `gymbus sync`."""
    from gymbus.sync import read_spool

    run_dir = tmp_path / RUN
    writer = SpoolWriter(spool.spool_path(run_dir), max_segment_bytes=2048)
    frames = [encode_frame(FrameKind.LIFECYCLE, RUN, 0,
                           {"event": LifecycleEvent.RUN_STARTED.value, "config": {}})]
    frames += [frame(seq, rows=3) for seq in range(1, 120)]
    for seq, parts in enumerate(frames):
        writer.append(seq, parts)
    writer.close()
    reader = SpoolReader(spool.spool_path(run_dir))
    reader.refresh()
    assert reader.trim(100) > 0 and reader.first > 0
    spooled = read_spool(run_dir)
    assert (spooled.run_id, spooled.frames, spooled.status) == (RUN, 120, None)
