"""`gymbus tensorboard` and `gymbus import-tb`: TensorBoard on the runs folder, and event files
into the store."""

from __future__ import annotations

import dataclasses
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO

import click

from gymbus.services.cli import output as out
from gymbus.services.cli import tbimport
from gymbus.services.cli.context import Context, json_option
from gymbus.shared.errors import ExitCode, GymbusError
from gymbus.shared.protocol import Command

#: what TensorBoard prints once it serves, e.g. "TensorBoard 2.21.0 at http://127.0.0.1:6006/"
_SERVING = re.compile(r"TensorBoard \S+ at (https?://\S+)")
#: seconds a stopped TensorBoard gets before it is killed
STOP_GRACE = 5.0


class TensorBoardFailed(GymbusError):
    """TensorBoard did not start; the message holds the end of its output."""

    exit_code = ExitCode.REFUSED


@click.command("tensorboard")
@click.option("--port", default="default", show_default=True,
              help="Port to serve on: a number, 0 for any free port, or `default` for 6006 or "
                   "the next free one.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--logdir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of event files (default: the runs folder, $GYMBUS_HOME/runs).")
@click.option("--timeout", default=60.0, show_default=True,
              help="Seconds to wait for TensorBoard to serve.")
@json_option
@click.pass_obj
def tensorboard(obj: Context, port: str, host: str, logdir: Path | None, timeout: float,
                as_json: bool) -> None:
    """Start TensorBoard on the runs folder, print its address, serve until Ctrl-C.

    Each run folder is a TensorBoard run named by its run id, with `charts/episodic_return`,
    `charts/episodic_length`, `charts/epsilon`, `charts/SPS` and the agent's losses.
    """
    folder = logdir or obj.settings.runs_dir
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(folder), "--host", host,
         "--port", port],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        url = _wait_for_address(proc, timeout)
        if as_json:
            out.emit_json({"url": url, "logdir": str(folder), "pid": proc.pid})
        else:
            click.echo(url)
            click.echo(f"TensorBoard on {folder} (pid {proc.pid}); Ctrl-C stops it", err=True)
        sys.stdout.flush()
        code = proc.wait()
        if code != 0:
            raise TensorBoardFailed(f"TensorBoard exited with code {code}")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(proc)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # handled like Ctrl-C: TensorBoard is stopped, exit 0


def _wait_for_address(proc: subprocess.Popen[str], timeout: float) -> str:
    """Read TensorBoard's output until it says where it serves; the rest is drained and dropped."""
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_drain, args=(proc.stderr, lines), daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TensorBoardFailed(f"TensorBoard did not serve within {timeout:g} s:\n"
                                    + "".join(seen[-10:]))
        try:
            line = lines.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        if line is None:
            proc.wait()
            raise TensorBoardFailed(f"TensorBoard exited with code {proc.returncode}:\n"
                                    + "".join(seen[-10:]))
        seen.append(line)
        match = _SERVING.search(line)
        if match:
            return match.group(1)


def _drain(stream: IO[str] | None, lines: queue.Queue[str | None]) -> None:
    if stream is not None:
        for line in stream:
            lines.put(line)
    lines.put(None)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@click.command("import-tb")
@click.argument("target")
@click.option("--timeout", default=30.0, show_default=True,
              help="Seconds to wait for the ingest to take every frame.")
@json_option
@click.pass_obj
def import_tb(obj: Context, target: str, timeout: float, as_json: bool) -> None:
    """Import TensorBoard event files into the `metrics` table.

    TARGET is a run id, a run folder, or any folder or event file (a CleanRL or
    Stable-Baselines3 run). Each folder of event files becomes a run of its own: `tb-<run id>`
    for a gymbus run, `tb-<folder>-<hash>` otherwise. Importing again stores nothing twice.
    Needs the broker and the ingest running.
    """
    sources = tbimport.find_sources(target, obj.settings)
    obj.ingest.request(Command.PING)  # exit 3 now, rather than after reading every file
    results = [tbimport.import_source(source, obj.settings, obj.ingest, timeout)
               for source in sources]
    if as_json:
        out.emit_json([dataclasses.asdict(r) for r in results])
        return
    for r in results:
        skipped = f", {r.skipped} non-finite left out" if r.skipped else ""
        click.echo(f"{r.run_id}  {r.points} points of {r.tags} tags from {r.files} file(s) in "
                   f"{r.path}: {r.new_rows} stored, {r.already_stored} already stored{skipped}")
