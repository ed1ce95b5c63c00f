"""Checks of a config's values one field at a time, each failure a ConfigError naming the field:
strings, integers within 64 bits, positive counts, tables, and values the wire and the stores
can carry at any depth. The run-config schema (shared/runconfig.py) is built from them."""

from __future__ import annotations

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
