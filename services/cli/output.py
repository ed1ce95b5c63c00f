"""Output helpers for the CLI: aligned tables, JSON, CSV, progress lines and sparklines."""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import click

SPARK = "▁▂▃▄▅▆▇█"


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Rows as left-aligned columns under a header line."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_csv(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    writer = csv.writer(sys.stdout)
    writer.writerow(headers)
    writer.writerows(rows)


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """A tiny curve: the values averaged into `width` buckets, drawn with block characters."""
    if not values:
        return ""
    n = len(values)
    buckets = min(width, n)
    means = []
    for b in range(buckets):
        chunk = values[b * n // buckets:(b + 1) * n // buckets]
        means.append(sum(chunk) / len(chunk))
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((m - lo) / span * len(SPARK)))] for m in means)


def format_ns(ns: int | None) -> str:
    if not ns:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def progress_line(run: dict[str, Any], stats: dict[str, Any] | None) -> str:
    """One line of progress for a run: state, episodes done of the budget, steps stored."""
    budget = run.get("config", {}).get("episodes")
    episodes = (stats or {}).get("episodes") or run.get("episodes") or 0
    parts = [f"{run['run_id']}  {run['state']:<10}", f"episodes {episodes}"]
    if budget:
        parts[-1] += f"/{budget} ({100 * episodes / budget:.0f}%)"
    if stats:
        parts.append(f"steps stored {stats.get('steps', 0)}")
        parts.append(f"frames {stats.get('frames_stored', 0)}")
    return "  ".join(parts)


class Progress:
    """Progress on stderr: redrawn in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, every: float = 2.0) -> None:
        self.tty = sys.stderr.isatty()
        self.every = every
        self._last = 0.0
        self._width = 0

    def show(self, line: str, now: float) -> None:
        if self.tty:
            pad = max(0, self._width - len(line))
            sys.stderr.write("\r" + line + " " * pad)
            sys.stderr.flush()
            self._width = len(line)
        elif now - self._last >= self.every:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            self._last = now

    def done(self, line: str) -> None:
        if self.tty:
            sys.stderr.write("\r" + line + " " * max(0, self._width - len(line)) + "\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
