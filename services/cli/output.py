"""Output helpers for the CLI: aligned tables, JSON, CSV, the `runs` table and the `status`
lines, progress lines and sparklines."""

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


def bucket_means(values: Sequence[float], buckets: int) -> list[float]:
    """`values` averaged into `buckets` runs of consecutive values (fewer when there are
    fewer values), in order: the points of a curve drawn `buckets` characters wide."""
    n = len(values)
    buckets = min(buckets, n)
    means = []
    for b in range(buckets):
        chunk = values[b * n // buckets:(b + 1) * n // buckets]
        means.append(sum(chunk) / len(chunk))
    return means


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """A tiny curve: the values averaged into `width` buckets, drawn with block characters."""
    if not values:
        return ""
    means = bucket_means(values, width)
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((m - lo) / span * len(SPARK)))] for m in means)


def format_ns(ns: int | None) -> str:
    if not ns:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def progress_line(run: dict[str, Any], stats: dict[str, Any] | None,
                  steps_taken: int | None = None) -> str:
    """One line of progress for a run: state, steps taken of a step budget, episodes done (of
    their budget), steps and frames stored. `steps_taken` counts while the run has not ended;
    at its end the controller's count is the run's."""
    config = run.get("config", {})
    episodes = (stats or {}).get("episodes") or run.get("episodes") or 0
    parts = [f"{run['run_id']}  {run['state']:<10}"]
    if config.get("total_steps"):
        steps = run.get("steps") if run.get("steps") is not None else steps_taken
        parts.append(f"steps {done_of(steps or 0, config['total_steps'], percent=True)}")
    parts.append(f"episodes {done_of(episodes, config.get('episodes'), percent=True)}")
    if stats:
        parts.append(f"steps stored {stats.get('steps', 0)}")
        parts.append(f"frames {stats.get('frames_stored', 0)}")
    return "  ".join(parts)


def done_of(done: int | None, budget: int | None, percent: bool = False) -> str:
    """`done/budget` (with the percentage), or `done` alone for no budget; `-` when unknown."""
    if done is None:
        return "-"
    if not budget:
        return str(done)
    return f"{done}/{budget}" + (f" ({100 * done / budget:.0f}%)" if percent else "")


def shown_algo(record: dict[str, Any]) -> str:
    """The algo, as `eval:ALGO` for an evaluation run."""
    return f"eval:{record['algo']}" if record.get("evaluation") else str(record["algo"])


def runs_table(records: list[dict[str, Any]]) -> str:
    """The `runs` table of `status_record`s."""
    return table(
        ["RUN", "NAME", "ENV", "ALGO", "MODE", "STATUS", "EPISODES", "STEPS", "STEPS STORED",
         "CREATED"],
        [[r["run_id"], r["name"], r["env"], shown_algo(r), r["telemetry"], r["status"],
          done_of(r["episodes"] or 0, r["episodes_budget"]),
          done_of(r["steps"], r["steps_budget"]), r["steps_stored"],
          format_ns(r["created_ns"])] for r in records])


#: `status` rows: label, and the record's key (None: made from several)
STATUS_ROWS: tuple[tuple[str, str | None], ...] = (
    ("run", "run_id"), ("name", "name"), ("status", "status"), ("reason", "reason"),
    ("env", "env"), ("algo", None), ("evaluates", None), ("mode", "telemetry"),
    ("worker", "worker_id"), ("created", "created_ns"), ("started", "started_ns"),
    ("ended", "ended_ns"), ("episodes", None), ("steps", None), ("steps stored", "steps_stored"),
    ("frames emitted", "frames_emitted"), ("frames stored", "frames_stored"), ("gaps", "gaps"),
    ("duplicates", "duplicates"), ("stored", None),
)
#: record keys that the rows above show in their own way, or that only JSON carries
_SHOWN_OTHERWISE = frozenset({"algo", "evaluation", "eval_from", "policy", "episodes",
                              "episodes_budget", "steps", "steps_budget", "complete"})


def status_lines(record: dict[str, Any]) -> str:
    """A `status_record` for people: one labelled row each, times as dates; then what the
    record holds beyond these rows, labelled by its key."""
    made = {
        "algo": shown_algo(record),
        "evaluates": (f"run {record['eval_from']}" if record.get("eval_from")
                      else record.get("policy")),
        "episodes": done_of(record["episodes"], record["episodes_budget"]),
        "steps": done_of(record["steps"], record["steps_budget"]),
        "stored": _stored(record),
    }
    rows: list[tuple[str, Any]] = []
    for label, key in STATUS_ROWS:
        if key is None:
            value = made[label]
        elif key.endswith("_ns"):
            value = format_ns(record.get(key))
        else:
            value = record.get(key)
        if label != "evaluates" or value:
            rows.append((label, value))
    keys = {key for _, key in STATUS_ROWS} | _SHOWN_OTHERWISE
    rows += [(key.replace("_", " "), value) for key, value in record.items()
             if key not in keys and value is not None]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:>{width}}  {'-' if value is None else value}"
                     for label, value in rows)


def _stored(record: dict[str, Any]) -> str | None:
    """Whether the ingest holds every frame the run emitted (None: not known yet)."""
    if record["complete"]:
        return "complete"
    emitted, stored = record["frames_emitted"], record["frames_stored"]
    if emitted is not None and stored is not None:
        return f"{emitted - stored} frames missing"
    return None


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

    def note(self, line: str) -> None:
        """A line of its own between progress lines (on a terminal, the progress line is drawn
        again below it)."""
        if self.tty and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            self._width = 0
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self, line: str) -> None:
        if self.tty:
            sys.stderr.write("\r" + line + " " * max(0, self._width - len(line)) + "\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
