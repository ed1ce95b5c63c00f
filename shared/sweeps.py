"""Sweep files: a base run config and the axes it varies, expanded into one run config a point.

A sweep file (TOML) holds `[run]`, a run file's fields; `seeds`, a list or `{start, count}`;
`[grid]`, lists of values under dotted run-config fields (`agent.learning_rate = [0.05, 0.1]`),
every combination taken; and `[sample]`, `n` random points drawn with their own `seed` from
`uniform`, `log_uniform` or `choice` distributions. The points are the product seeds x grid x
samples, seeds outermost. A built-in agent's run gets each axis's value in its field; a command
run's script decides its own fields, so its axes fill `{placeholders}` in the command instead
(`--seed {seed}`). `name` may hold placeholders too. Each point's config carries tags naming its
values. Every error is a ConfigError naming the sweep file's field.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass, field, fields
from typing import Any

from gymbus.shared.errors import ConfigError
from gymbus.shared.runconfig import COMMAND_ALGO, RunConfig, parse_config

#: most runs one sweep may make
MAX_POINTS = 10_000
DISTRIBUTIONS = ("uniform", "log_uniform", "choice")
_TOP_LEVEL = ("key", "name", "run", "seeds", "grid", "sample")
_RUN_FIELDS = frozenset(f.name for f in fields(RunConfig))
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its index, the value of each axis, and its run config (a dict that
    `parse_config` accepts)."""

    index: int
    values: dict[str, Any]
    config: dict[str, Any]


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file: the base config, its axes, and the sampled points' draws."""

    base: dict[str, Any]
    key: str | None = None
    name: str | None = None
    seeds: list[int] | None = None
    grid: dict[str, list[Any]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def axes(self) -> list[str]:
        """The axes' names (dotted paths), seed first."""
        sampled = list(self.samples[0]) if self.samples else []
        return (["seed"] if self.seeds is not None else []) + list(self.grid) + sampled

    @property
    def launches(self) -> bool:
        return "command" in self.base or self.base.get("algo") == COMMAND_ALGO

    def points(self) -> list[Point]:
        """Every point, seeds outermost, each config checked by `parse_config`."""
        seeds: list[dict[str, Any]] = ([{"seed": s} for s in self.seeds]
                                       if self.seeds is not None else [{}])
        grid = [dict(zip(self.grid, combo)) for combo in itertools.product(*self.grid.values())]
        samples = self.samples or [{}]
        total = len(seeds) * len(grid) * len(samples)
        if total > MAX_POINTS:
            raise ConfigError("grid", f"the sweep makes {total} runs; at most {MAX_POINTS}")
        result = []
        for index, (s, g, d) in enumerate(itertools.product(seeds, grid, samples)):
            values = {**s, **g, **d}
            result.append(Point(index, values, self._config(index, values)))
        return result

    def _config(self, index: int, values: dict[str, Any]) -> dict[str, Any]:
        config: dict[str, Any] = _deep_copy(self.base)
        fill = {**{k: _text(v) for k, v in values.items()}, "index": str(index)}
        if self.launches:
            command = config.get("command")
            if isinstance(command, list):
                config["command"] = [_substitute(a, fill) for a in command]
        else:
            for path, value in values.items():
                _set(config, path, value)
        if self.name is not None:
            config["name"] = _substitute(self.name, fill)
        config["tags"] = {**config.get("tags", {}), **{k: _text(v) for k, v in values.items()}}
        try:
            parse_config(_deep_copy(config))
        except ConfigError as exc:
            raise ConfigError(self._section(exc.field), f"{exc.message} (point {index}: "
                              f"{_describe(values)})") from None
        return config

    def _section(self, name: str) -> str:
        """The sweep file's field that a run-config error is about."""
        for axis in self.grid:
            if name == axis or name.startswith(axis + "."):
                return f"grid.{axis}"
        if self.samples and name in self.samples[0]:
            return f"sample.{name}"
        if name == "seed" and self.seeds is not None:
            return "seeds"
        return f"run.{name}"


def parse_sweep(raw: Any) -> Sweep:
    """Validate a sweep file's table into a Sweep (samples drawn here, from `sample.seed`)."""
    if not isinstance(raw, dict):
        raise ConfigError("sweep", f"expected a table, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        raise ConfigError(unknown[0], f"unknown sweep field (known: {', '.join(_TOP_LEVEL)})")
    base = raw.get("run")
    if not isinstance(base, dict) or not base:
        raise ConfigError("run", "give the base run config as a [run] table (a run file's fields)")
    for name in ("key", "name"):
        if name in raw and (not isinstance(raw[name], str) or not raw[name]):
            raise ConfigError(name, f"expected a non-empty string, got {raw[name]!r}")
    launches = "command" in base or base.get("algo") == COMMAND_ALGO
    seeds = _seeds(raw["seeds"]) if "seeds" in raw else None
    grid = _flatten(raw.get("grid", {}), "grid", _is_list)
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{axis}", f"expected a non-empty list of values, got {values!r}")
    sample = dict(raw.get("sample", {}))
    if not isinstance(raw.get("sample", {}), dict):
        raise ConfigError("sample", "expected a table: n, seed and distributions")
    samples = _samples(sample) if sample else []
    axes = (["seed"] if seeds is not None else []) + list(grid) + (list(samples[0]) if samples
                                                                   else [])
    for name in axes:
        if not _AXIS_NAME.match(name):
            raise ConfigError(_axis_field(name, grid), "an axis is a dotted name such as "
                                                       "agent.learning_rate")
        if axes.count(name) > 1:
            raise ConfigError(_axis_field(name, grid), "is given by two axes; give it once")
        if not launches and name.split(".")[0] not in _RUN_FIELDS:
            raise ConfigError(_axis_field(name, grid), f"unknown axis: not a field of the run "
                              f"config (known: {', '.join(sorted(_RUN_FIELDS))})")
        if not launches and name.split(".")[0] in ("command", "cwd", "tags", "group"):
            raise ConfigError(_axis_field(name, grid), "cannot be an axis")
    if launches:
        _check_placeholders(base, raw.get("name"), axes, grid)
    elif "name" in raw:
        _placeholders(raw["name"], axes, "name")
    return Sweep(base=base, key=raw.get("key"), name=raw.get("name"), seeds=seeds, grid=grid,
                 samples=samples)


def _axis_field(name: str, grid: dict[str, Any]) -> str:
    return "seeds" if name == "seed" and name not in grid else (
        f"grid.{name}" if name in grid else f"sample.{name}")


def _seeds(value: Any) -> list[int]:
    """`seeds = [0, 1, 2]` or `seeds = {start = 0, count = 5}`."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"start", "count"})
        if unknown:
            raise ConfigError(f"seeds.{unknown[0]}", "unknown field (known: start, count)")
        start, count = value.get("start", 0), value.get("count")
        if type(start) is not int or start < 0:
            raise ConfigError("seeds.start", f"expected an integer >= 0, got {start!r}")
        if type(count) is not int or count < 1:
            raise ConfigError("seeds.count", f"expected an integer >= 1, got {count!r}")
        return list(range(start, start + count))
    if not isinstance(value, list) or not value:
        raise ConfigError("seeds", "expected a non-empty list of seeds or {start, count}, "
                                   f"got {value!r}")
    if any(type(s) is not int or s < 0 for s in value):
        raise ConfigError("seeds", f"expected integers >= 0, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError("seeds", f"a seed is given twice in {value!r}")
    return list(value)


def _samples(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """`n` points drawn from the distributions, with a generator seeded by `seed` (0)."""
    n, seed = sample.pop("n", None), sample.pop("seed", 0)
    if type(n) is not int or n < 1:
        raise ConfigError("sample.n", f"expected the number of points to draw (>= 1), got {n!r}")
    if type(seed) is not int:
        raise ConfigError("sample.seed", f"expected an integer, got {seed!r}")
    dists = _flatten(sample, "sample", _is_draw)
    if not dists:
        raise ConfigError("sample", "give at least one distribution, e.g. "
                                    "agent.learning_rate = {log_uniform = [0.01, 0.5]}")
    for name, dist in dists.items():
        _check_distribution(f"sample.{name}", dist)
    rng = random.Random(seed)
    return [{name: _draw(rng, dist) for name, dist in dists.items()} for _ in range(n)]


def _check_distribution(name: str, dist: Any) -> None:
    if not _is_distribution(dist):
        raise ConfigError(name, f"expected one of {', '.join(DISTRIBUTIONS)}, e.g. "
                                f"{{uniform = [0.0, 1.0]}}, got {dist!r}")
    (kind, args), = dist.items()
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(name, f"choice needs a non-empty list, got {args!r}")
        return
    if (not isinstance(args, list) or len(args) != 2
            or any(type(a) not in (int, float) for a in args) or not args[0] < args[1]):
        raise ConfigError(name, f"{kind} needs [low, high] with low < high, got {args!r}")
    if kind == "log_uniform" and args[0] <= 0:
        raise ConfigError(name, f"log_uniform needs low > 0, got {args[0]}")


def _draw(rng: random.Random, dist: dict[str, Any]) -> Any:
    """One value; integer bounds draw integers, floats keep 6 significant digits (the tags
    and the config then say the same number)."""
    (kind, args), = dist.items()
    if kind == "choice":
        return rng.choice(args)
    lo, hi = args
    if kind == "uniform":
        if type(lo) is int and type(hi) is int:
            return rng.randint(lo, hi)
        return float(f"{rng.uniform(lo, hi):.6g}")
    value = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if type(lo) is int and type(hi) is int:
        return min(hi, max(lo, round(value)))
    return float(f"{value:.6g}")


def _is_list(value: Any) -> bool:
    return not isinstance(value, dict)


def _is_draw(value: Any) -> bool:
    """A leaf of [sample]: anything but a table of tables (checked as a distribution)."""
    return not isinstance(value, dict) or not any(isinstance(v, dict) for v in value.values())


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def _flatten(table: Any, section: str, is_leaf: Any) -> dict[str, Any]:
    """A TOML table's leaves by dotted path: `agent.learning_rate = [...]` inside [grid]."""
    if not isinstance(table, dict):
        raise ConfigError(section, f"expected a table, got {table!r}")
    result: dict[str, Any] = {}
    for key, value in table.items():
        if is_leaf(value):
            result[key] = value
        elif isinstance(value, dict) and value:
            for sub, leaf in _flatten(value, f"{section}.{key}", is_leaf).items():
                result[f"{key}.{sub}"] = leaf
        else:
            raise ConfigError(f"{section}.{key}", f"expected values, got {value!r}")
    return result


def _check_placeholders(base: dict[str, Any], name: Any, axes: list[str],
                        grid: dict[str, Any]) -> None:
    """A command run's axes are its command's placeholders: each one used, none unknown."""
    command = base.get("command")
    if isinstance(command, str):
        raise ConfigError("run.command", "give the command as a list of strings in a sweep")
    used: set[str] = set()
    for arg in command or []:
        if isinstance(arg, str):
            used |= _placeholders(arg, axes, "run.command")
    if isinstance(name, str):
        used |= _placeholders(name, axes, "name")
    for axis in axes:
        if axis not in used:
            raise ConfigError(_axis_field(axis, grid), f"a command run's script decides its own "
                              f"fields: put {{{axis}}} in the command to pass it")


def _placeholders(text: str, axes: list[str], where: str) -> set[str]:
    """The placeholders of `text`; ConfigError naming `where` for one that names no axis."""
    found = set()
    for match in _PLACEHOLDER.finditer(text.replace("{{", "").replace("}}", "")):
        name = match.group(1)
        if name != "index" and name not in axes:
            known = ", ".join(["index", *axes])
            raise ConfigError(where, f"bad placeholder {{{name}}}: it names no axis "
                                     f"(known: {known})")
        found.add(name)
    stripped = _PLACEHOLDER.sub("", text.replace("{{", "").replace("}}", ""))
    if "{" in stripped or "}" in stripped:
        raise ConfigError(where, f"unbalanced brace in {text!r} (write {{{{ or }}}} for one)")
    return found


def _substitute(text: str, fill: dict[str, str]) -> str:
    """`text` with its placeholders filled (checked by `_placeholders` beforehand)."""
    parts = re.split(r"(\{\{|\}\})", text)
    out = []
    for part in parts:
        if part in ("{{", "}}"):
            out.append(part[0])
        else:
            out.append(_PLACEHOLDER.sub(lambda m: fill[m.group(1)], part))
    return "".join(out)


def _set(config: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = config
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(path, f"{key} is not a table in the base run config")
        node = child
    node[last] = value


def _text(value: Any) -> str:
    """A value as a tag and a placeholder show it (TOML's spelling of booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_text(v)}" for k, v in values.items()) or "the base config"


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
