"""`gymbus watch`: a live terminal dashboard of runs (rich), over SSH or in a plain terminal.

Everything runs on the main thread except the `LiveFeed`'s receiver: the loop polls the feed,
refreshes from the controller and ingest once a second, reads keys (n/p select a run, q quits)
and redraws a few times a second. `--once` draws one frame and returns.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live as RichLive
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gymbus.services.cli.output import bucket_means
from gymbus.services.viewers.grid import action_name, to_rich
from gymbus.services.viewers.live import Live
from gymbus.services.viewers.live_runs import RunView, short_id

FRAMES_PER_SECOND = 4
REFRESH_SECONDS = 1.0
#: seconds `--once` listens to the stream after the snapshot (frames in flight)
ONCE_SETTLE = 0.5
CURVE_HEIGHT = 8
BLOCKS = " ▁▂▃▄▅▆▇█"
#: characters of a run id the table shows where the whole id does not fit (its end: the random
#: part of a ULID)
RUN_CHARS = 8
#: the run table's columns, left to right: header, priority, right-aligned. Where the terminal
#: is too narrow for all of them, the highest priority numbers are left out first; those of
#: priority 0 are always shown. A column is never cut: it is shown whole or not at all.
COLUMNS: tuple[tuple[str, int, bool], ...] = (
    ("RUN", 0, False), ("NAME", 6, False), ("TAGS", 7, False), ("AGENT", 10, False),
    ("ENV", 1, False), ("ALGO", 2, False), ("MODE", 4, False), ("STATE", 0, False),
    ("EPISODES", 0, True), ("STEPS/S", 0, True), ("LAST RET", 8, True), ("MEAN RET", 0, True),
    ("STORED", 9, True), ("GAPS", 5, True), ("MISSED", 3, True),
)
#: the columns shown only where a run has something in them
OPTIONAL_COLUMNS = ("NAME", "TAGS")
#: columns of space between two of the table's columns
GUTTER = 2
#: the widest a run's name, and its tags, are shown (longer ones end in an ellipsis)
NAME_CHARS = 24
TAGS_CHARS = 32


def curve_lines(values: Sequence[float], width: int, height: int = CURVE_HEIGHT) -> list[str]:
    """A curve drawn with block characters: `values` averaged into `width` columns, `height` rows
    (the top line first); the lowest value sits on the bottom row, the highest fills a column."""
    if not values or width <= 0 or height <= 0:
        return []
    means = bucket_means(values, width)
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    eighths = [1 + round((m - lo) / span * (height * 8 - 1)) for m in means]
    lines = []
    for row in range(height - 1, -1, -1):
        base = row * 8
        lines.append("".join(BLOCKS[max(0, min(8, e - base))] for e in eighths))
    return lines


def _num(value: float | None) -> str:
    """A number in at most 6 characters: 0.53, -148, 65.3k, -1.8M."""
    if value is None:
        return "-"
    size = abs(value)
    if size >= 1e6:
        return f"{value / 1e6:.1f}M"
    if size >= 1e4:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}" if size >= 100 else f"{value:.3g}"


def _int(value: Any) -> str:
    return "-" if value is None else str(value)


def _cell_len(cell: str | Text) -> int:
    return (Text(cell) if isinstance(cell, str) else cell).cell_len


def fit_columns(widths: Sequence[int], priorities: Sequence[int], width: int) -> list[int]:
    """The columns (their indexes, in order) shown in `width`: those of priority 0, then the
    others in priority order for as long as the next one fits."""
    shown = [i for i, p in enumerate(priorities) if p == 0]
    used = sum(widths[i] for i in shown) + GUTTER * (len(shown) - 1)
    for i in sorted((i for i, p in enumerate(priorities) if p > 0), key=lambda i: priorities[i]):
        if used + GUTTER + widths[i] > width:
            break
        shown.append(i)
        used += GUTTER + widths[i]
    return sorted(shown)


class Dashboard:
    """What `gymbus watch` draws from a `Live`; the selection moves with n/p."""

    def __init__(self, live: Live, selected: str | None = None) -> None:
        self.live = live
        self.selected = selected

    def views(self) -> list[RunView]:
        """The shown runs in the controller's order (oldest first), then any others."""
        order = {run_id: i for i, run_id in enumerate(self.live.order)}
        return sorted(self.live.runs.values(), key=lambda v: (order.get(v.run_id, len(order)),
                                                              v.run_id))

    def current(self) -> RunView | None:
        views = self.views()
        if not views:
            return None
        if self.selected not in self.live.runs:
            active = [v for v in views if not v.ended]
            self.selected = (active or views)[-1].run_id
        return self.live.runs[self.selected]

    def move(self, step: int) -> None:
        ids = [v.run_id for v in self.views()]
        if ids:
            i = ids.index(self.selected) if self.selected in ids else 0
            self.selected = ids[(i + step) % len(ids)]

    # --- drawing --------------------------------------------------------------------------------

    def render(self, width: int = 120) -> RenderableType:
        current = self.current()
        parts: list[RenderableType] = [self.header(width), self.table(width)]
        if current is not None:
            parts.append(self.detail(current, width))
        elif not self.live.controller_ok:
            parts.append(Text("no runs: the controller does not answer and the store holds none "
                              "(start the stack with `make up` or `honcho start`)\n", style="dim"))
        else:
            parts.append(Text("no runs yet: submit one with `gymbus submit`\n", style="dim"))
        parts.append(self.footer(width))
        return Group(*parts)

    def header(self, width: int = 120) -> Text:
        """One line: the services' state, then the live endpoint and the time where they fit."""
        live = self.live
        text = Text("gymbus watch", style="bold")
        text.append(f"  {len(live.runs)} runs  ")
        for name, ok in (("controller", live.controller_ok), ("ingest", live.ingest_ok)):
            text.append(f"{name} {'ok' if ok else 'down'}  ", style="green" if ok else "bold red")
        clock, endpoint = time.strftime("%H:%M:%S"), f"live {live.settings.telemetry_live}  "
        if text.cell_len + len(endpoint) + len(clock) <= width:
            text.append(endpoint, style="dim")
        text.append(clock, style="dim")
        return text

    def table(self, width: int = 120) -> Table:
        """The runs, one a line, with the columns that fit in `width` (COLUMNS)."""
        views = self.views()
        cells: list[list[str | Text]] = []
        for v in views:
            state = v.status if v.status and v.state in ("", "running") else v.state or "?"
            missed = v.seqs.missed
            cells.append([
                f"{'▶' if v.run_id == self.selected else ' '} {v.run_id}", v.name,
                v.tags_text(), v.agent_id, v.env, v.algo, v.telemetry, Text(state, style=_state_style(state)),
                str(v.episodes), _num(v.sps), _num(v.returns[-1] if v.returns else None),
                _num(v.mean_return()), _int(v.stats.get("frames_stored")),
                _int(v.stats.get("gaps")), Text(str(missed), style="bold yellow" if missed else ""),
            ])
        widths = [max([len(header)] + [_cell_len(c[i]) for c in cells])
                  for i, (header, _, _) in enumerate(COLUMNS)]
        whole_id = widths[0]
        widths[0] = min(whole_id, 2 + max(len(short_id(v.run_id, RUN_CHARS)) for v in views)
                        if views else 2 + RUN_CHARS)
        widths[1], widths[2] = min(widths[1], NAME_CHARS), min(widths[2], TAGS_CHARS)
        candidates = [i for i, (header, _, _) in enumerate(COLUMNS)
                      if header not in OPTIONAL_COLUMNS or any(c[i] for c in cells)]
        shown = [candidates[i] for i in fit_columns(
            [widths[i] for i in candidates], [COLUMNS[i][1] for i in candidates], width)]
        used = sum(widths[i] for i in shown) + GUTTER * (len(shown) - 1)
        if len(shown) == len(candidates) and used + whole_id - widths[0] <= width:
            widths[0] = whole_id  # every column fits, and the whole run id too
        table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False,
                      padding=(0, GUTTER // 2), collapse_padding=True)
        for i in shown:
            header, _, right = COLUMNS[i]
            table.add_column(header, justify="right" if right else "left", no_wrap=True,
                             width=widths[i], overflow="ellipsis")
        for row in cells:
            if widths[0] < whole_id:  # the end of the id, after the selection mark
                row[0] = f"{str(row[0])[:2]}{short_id(str(row[0])[2:], RUN_CHARS)}"
            table.add_row(*(row[i] for i in shown))
        return table

    def detail(self, v: RunView, width: int) -> RenderableType:
        """The selected run: its return curve, and the board of a grid world."""
        returns = v.returns
        # the panel's inside: 3/5 of the width beside a board, less borders, padding, labels
        panel_width = width * 3 // 5 if v.world else width
        curve_width = max(10, panel_width - 4 - 9)
        lines = curve_lines(returns, curve_width)
        mean, tail = _num(v.mean_return()), short_id(v.run_id, RUN_CHARS)
        titles = [f"returns of {run}, last {len(returns)} episodes (mean of 100: {mean})"
                  for run in (v.run_id, tail)] + [f"returns of {tail}, mean(100) {mean}"]
        # the first that fits beside the border's corners and the title's padding
        title = next((t for t in titles if len(t) + 6 <= panel_width), titles[-1])
        if lines:
            curve = Text(no_wrap=True, overflow="crop")
            hi, lo = max(returns), min(returns)
            for i, line in enumerate(lines):
                label = f"{_num(hi):>7} " if i == 0 else f"{_num(lo):>7} " if i == len(lines) - 1 \
                    else " " * 8
                curve.append(label, style="dim")
                curve.append(line + "\n", style="cyan")
        else:
            curve = Text("no episodes yet", style="dim")
        panels: list[RenderableType] = [Panel(curve, title=title, title_align="left")]
        board = self.board(v)
        if board is not None:
            table = Table.grid(expand=True)
            table.add_column(ratio=3)
            table.add_column(ratio=2)
            table.add_row(panels[0], board)
            return table
        return panels[0]

    def board(self, v: RunView) -> RenderableType | None:
        if v.world is None:
            return None
        scene, step = v.scene(), v.last_step
        if scene is None or step is None:
            why = "fast mode: no steps" if v.telemetry == "fast" else "no steps yet"
            return Panel(Text(why, style="dim"), title="board", title_align="left")
        body = to_rich(scene)
        body.append(f"\nepisode {step.episode} step {step.step}  "
                    f"{action_name(v.env, step.action)}  reward {step.reward:g}")
        if step.label:
            body.append(f"  {step.label}", style="italic")
        return Panel(body, title=f"board: {v.env}", title_align="left")

    def footer(self, width: int = 120) -> Text:
        t = self.live.totals()
        text = Text(f"viewer: {t['live']} live frames, {t['duplicates']} duplicates discarded, "
                    f"{t['from_store']} from the store; missed {t['missed']} "
                    f"(dropped here {t['dropped']}), rejected {t['rejected']}", style="dim")
        keys = "n/p: select  q: quit"
        text.append("    " if text.cell_len + 4 + len(keys) <= width else "\n")
        text.append(keys, style="dim")
        return text

    def to_json(self) -> dict[str, Any]:
        """The dashboard's numbers, for `--json`."""
        runs = [{
            "run_id": v.run_id, "name": v.name, "tags": v.tags, "agent_id": v.agent_id,
            "env": v.env,
            "algo": v.algo,
            "telemetry": v.telemetry, "state": v.state, "status": v.status,
            "episodes": v.episodes, "sps": v.sps,
            "last_return": v.returns[-1] if v.returns else None, "mean_return": v.mean_return(),
            "frames_emitted": v.frames_emitted, "frames_stored": v.stats.get("frames_stored"),
            "gaps": v.stats.get("gaps"), "held": v.seqs.held, "live": v.seqs.live,
            "missed": v.seqs.missed, "dropped": self.live.feed.dropped_by_run.get(v.run_id, 0),
            "duplicates": v.seqs.duplicates, "from_store": v.seqs.from_store,
            "first_live_seq": v.seqs.first_live, "highest_seq": v.seqs.highest,
        } for v in self.views()]
        return {"runs": runs, "viewer": self.live.totals()}


def _state_style(state: str) -> str:
    return {"running": "bold green", "completed": "green", "failed": "bold red",
            "cancelled": "yellow", "lost": "bold red", "queued": "dim"}.get(state, "")


# --- the loop -------------------------------------------------------------------------------------


@contextlib.contextmanager
def keys() -> Iterator[Any]:
    """Single keys from a terminal's stdin (cbreak mode, restored after); None off a terminal."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def read_key(fd: int | None, timeout: float) -> str:
    """One key pressed within `timeout` seconds ('' if none); sleeps the timeout off a terminal."""
    if fd is None:
        time.sleep(timeout)  # nothing to read: this paces the loop
        return ""
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 1).decode(errors="ignore") if ready else ""


def settle(live: Live, seconds: float) -> None:
    """Take what the stream delivers for `seconds` (frames in flight at the snapshot), then
    refresh. Not when neither the controller nor the ingest answered the last time: no run is
    under way that they know of, what the store's file holds was read then, and asking again
    would only wait out their timeouts."""
    if live.controller_ok or live.ingest_ok:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            live.poll()
            time.sleep(0.05)  # paces the poll; the feed queues meanwhile
        live.refresh()
    live.poll()


def watch(dash: Dashboard, console: Console, *, once: bool = False, until_done: bool = False,
          draw: bool = True) -> None:
    """Draw the dashboard until q or Ctrl-C (or once, or until every shown run has ended and its
    frames are accounted for). With `draw` false it only follows, for `--json`."""
    live = dash.live
    live.start()
    settle(live, ONCE_SETTLE)
    if once:
        if draw:
            console.print(dash.render(console.width))
        return
    display: Any = (RichLive(dash.render(console.width), console=console, auto_refresh=False,
                             redirect_stdout=False) if draw else contextlib.nullcontext())
    last_refresh = time.monotonic()
    with keys() if draw else contextlib.nullcontext() as fd, display:
        while True:
            key = read_key(fd, 1.0 / FRAMES_PER_SECOND)
            if key in ("q", "Q"):
                break
            if key in ("n", "\t", "j"):
                dash.move(1)
            elif key in ("p", "k"):
                dash.move(-1)
            live.poll()
            if time.monotonic() - last_refresh >= REFRESH_SECONDS:
                live.refresh()
                last_refresh = time.monotonic()
            if until_done and live.runs and not live.active():
                settle(live, ONCE_SETTLE)  # the last frames still in flight
                break
            if draw:
                display.update(dash.render(console.width), refresh=True)
