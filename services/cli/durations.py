"""Durations on the command line (`--wait-timeout 10m`, `--since 2h`): a number of seconds, or parts
such as 90s, 5m, 2h, 1d and 1h30m."""

from __future__ import annotations

from typing import Any

import click

from gymbus.shared import config_values


def parse_duration(text: str) -> float:
    """Seconds (the run files' durations: `shared/config_values.py`); ValueError saying what is
    accepted for anything else."""
    seconds = config_values.parse_duration(text)
    if seconds is None:
        raise ValueError(f"{text!r} is not a duration: give seconds or e.g. 90s, 5m, 2h, 1d, "
                         "1h30m")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{text!r}: a duration must be more than 0 seconds")
    return seconds


class Duration(click.ParamType[float, Any]):
    """A click option's duration, in seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


def short(seconds: float) -> str:
    """A duration for people: 45s, 3m20s, 1h05m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
