"""Checks of a config's values one field at a time, each failure a ConfigError naming the field:
strings, integers within 64 bits, positive counts, tables, and values the wire and the stores
can carry at any depth. The run-config schema (shared/runconfig.py) is built from them."""

from __future__ import annotations

import re
from typing import Any

from gymbus.shared.errors import ConfigError


def string(values: dict[str, Any], name: str, default: str | None = None) -> str:
    value = values.get(name, default)
    if not isinstance(value, str):
        raise ConfigError(name, f"expected a string, got {value!r}")
    return value


#: the integers a config may hold: 64-bit signed, what msgpack, SQLite and DuckDB all take
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


def integer(values: dict[str, Any], name: str, default: int, lo: int = INT_MIN) -> int:
    """An integer field up to INT_MAX; `lo`, the caller's lower bound (which it checks itself,
    in its own words), is named when the value is too large."""
    value = values.get(name, default)
    if type(value) is not int:
        raise ConfigError(name, f"expected an integer, got {value!r}")
    if value > INT_MAX:
        raise ConfigError(name, f"must be between {lo} and {INT_MAX}, got {value}")
    return value


def positive_int(values: dict[str, Any], name: str) -> int | None:
    if name not in values:
        return None
    value = integer(values, name, 0, lo=1)
    if value <= 0:
        raise ConfigError(name, f"must be > 0, got {value}")
    return value


#: a tag's key, and a run group's id: what a filter on the command line can spell
LABEL_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
#: longest tag value
TAG_VALUE_MAX = 256


def tags(values: dict[str, Any], name: str) -> dict[str, str]:
    """A table of string labels: keys as LABEL_RE allows, values strings of at most
    TAG_VALUE_MAX characters (a number or boolean becomes its TOML text)."""
    raw = table(values, name)
    result: dict[str, str] = {}
    for key, value in raw.items():
        if not LABEL_RE.match(key):
            raise ConfigError(f"{name}.{key}", "a tag key is 1 to 64 letters, digits, and . _ : / -")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int | float):
            value = str(value)
        if not isinstance(value, str) or len(value) > TAG_VALUE_MAX:
            raise ConfigError(f"{name}.{key}", f"expected a string of at most {TAG_VALUE_MAX} "
                                               f"characters, got {value!r}")
        result[key] = value
    return result


def label(values: dict[str, Any], name: str) -> str:
    """An optional id such as a run group's: empty, or as LABEL_RE allows."""
    value = string(values, name, "")
    if value and not LABEL_RE.match(value):
        raise ConfigError(name, f"use 1 to 64 letters, digits, and . _ : / -, got {value!r}")
    return value


def table(values: dict[str, Any], name: str) -> dict[str, Any]:
    value = values.get(name, {})
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(name, f"expected a table of named values, got {value!r}")
    return dict(value)


def checked(table: dict[str, Any], name: str) -> dict[str, Any]:
    """The table, once `check_value` passed it (what the environment takes is the controller's
    check)."""
    check_value(name, table)
    return table


def check_value(name: str, value: Any) -> None:
    """A value the wire and the stores can carry, at any depth: strings, booleans, numbers
    (integers within INT_MIN..INT_MAX), lists and tables of them. `name` is its field's path."""
    if value is None or isinstance(value, bool | float | str):
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise ConfigError(name, f"must be between {INT_MIN} and {INT_MAX} (a 64-bit integer), "
                                    f"got {value}")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_value(f"{name}[{i}]", item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            check_value(f"{name}.{key}", item)
        return
    raise ConfigError(name, f"expected a string, boolean, number, list or table, got {value!r}")


# --- resource limits: sizes and durations as people write them ------------------------------------

#: a size's unit -> bytes: binary for K, Ki, KiB (and M, G, T), decimal for KB, MB, GB, TB
_SIZE_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _SIZE_UNITS.update({_p: 1024**_i, f"{_p}i": 1024**_i, f"{_p}ib": 1024**_i, f"{_p}b": 1000**_i})
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
#: a duration's unit -> seconds; a duration is one or more of them: 90s, 30m, 1h30m, 500ms
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_size(text: str) -> int | None:
    """Bytes of a size such as 512MiB, 2GiB, 2G or 1500MB (None if it is not one)."""
    match = _SIZE_RE.match(text)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        return None
    return int(float(match.group(1)) * unit)


def memory_size(values: dict[str, Any], name: str) -> int | None:
    """A size in bytes, given as an integer or a string with a unit; None when absent."""
    if name not in values:
        return None
    value = values[name]
    size = parse_size(value) if isinstance(value, str) else value
    if type(size) is not int:
        raise ConfigError(name, f"expected a size such as 512MiB or 2GiB (or bytes), "
                                f"got {value!r}")
    if not 0 < size <= INT_MAX:
        raise ConfigError(name, f"must be more than 0 bytes, got {value!r}")
    return size


def parse_duration(text: str) -> float | None:
    """Seconds of a duration such as 90s, 30m, 1h30m, 1.5h or 500ms (None if not one)."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    if not text or _DURATION_PART.sub("", text):
        return None
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


def duration(values: dict[str, Any], name: str) -> float | None:
    """A duration in seconds, given as a number of seconds or a string; None when absent."""
    if name not in values:
        return None
    value = values[name]
    if isinstance(value, str):
        seconds = parse_duration(value)
    else:
        seconds = float(value) if type(value) in (int, float) else None
    if seconds is None:
        raise ConfigError(name, f"expected a duration such as 90s, 30m or 2h (or seconds), "
                                f"got {value!r}")
    if not 0 < seconds < float(INT_MAX) / 1e9:  # nanoseconds fit in 64 bits
        raise ConfigError(name, f"must be more than 0 seconds, got {value!r}")
    return seconds


def count(values: dict[str, Any], name: str) -> int | None:
    """A count that may be 0 (GPUs); None when absent."""
    if name not in values:
        return None
    value = integer(values, name, 0, lo=0)
    if value < 0:
        raise ConfigError(name, f"must be >= 0, got {value}")
    return value


def format_size(size: int) -> str:
    """A size as people read it: 2 GiB, 200 MiB, 1.5 GiB, 512 B."""
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        scaled = size / 1024**power
        if scaled >= 1:
            return f"{scaled:.0f} {unit}" if size % 1024**power == 0 else f"{scaled:.1f} {unit}"
    return f"{size} B"


def format_duration(seconds: float) -> str:
    """A duration as `parse_duration` reads it: 2s, 30m, 1h30m, 1.5s."""
    if seconds != int(seconds):
        return f"{seconds:g}s"
    rest, parts = int(seconds), list[str]()
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= length:
            parts.append(f"{rest // length}{unit}")
            rest %= length
    return "".join(parts) or "0s"
