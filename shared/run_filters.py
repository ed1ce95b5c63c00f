"""Which runs a listing shows: by group, tags, state, environment, algorithm and age.

`RunFilter` travels in a `list_runs` request's body (`filter`), where the controller applies it
to its records, and the CLI applies the same filter to the runs only the store holds. Every
field is optional; a run matches when it matches all that are given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gymbus.shared.errors import ConfigError, RequestError
from gymbus.shared.protocol import ErrorCode, RunState


@dataclass(frozen=True)
class RunFilter:
    """What a run must have to be listed; empty fields ask nothing."""

    group: str | None = None
    """the group's id (a sweep's)"""
    tags: dict[str, str] = field(default_factory=dict)
    """tags the run must carry, each with this value"""
    states: tuple[str, ...] = ()
    """states it may be in (any of them)"""
    env: str | None = None
    algo: str | None = None
    since_ns: int | None = None
    """created at or after this Unix time, in nanoseconds"""

    @property
    def empty(self) -> bool:
        return self == RunFilter()

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"group": self.group, "tags": dict(self.tags),
                                "states": list(self.states), "env": self.env,
                                "algo": self.algo, "since_ns": self.since_ns}
        return {k: v for k, v in body.items() if v not in (None, [], {})}

    @classmethod
    def from_wire(cls, body: Any) -> RunFilter:
        """The filter of a request body; RequestError (bad_request) naming a malformed field."""
        if body is None:
            return cls()
        if not isinstance(body, dict):
            raise _bad("filter", "a table", body)
        unknown = sorted(set(body) - {"group", "tags", "states", "env", "algo", "since_ns"})
        if unknown:
            raise RequestError(ErrorCode.BAD_REQUEST, f"filter.{unknown[0]}: unknown field")
        for name in ("group", "env", "algo"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise _bad(f"filter.{name}", "a string", body[name])
        tags = body.get("tags") or {}
        if not isinstance(tags, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            raise _bad("filter.tags", "a table of strings", tags)
        states = body.get("states") or []
        known = {s.value for s in RunState}
        if not isinstance(states, list) or not all(s in known for s in states):
            raise _bad("filter.states", f"a list of {', '.join(sorted(known))}", states)
        since = body.get("since_ns")
        if since is not None and (type(since) is not int):
            raise _bad("filter.since_ns", "an integer", since)
        return cls(group=body.get("group"), tags=dict(tags), states=tuple(states),
                   env=body.get("env"), algo=body.get("algo"), since_ns=since)

    def matches(self, run: dict[str, Any]) -> bool:
        """Whether a run record (the controller's wire shape) passes the filter."""
        if self.group is not None and (run.get("group") or "") != self.group:
            return False
        tags = run.get("tags") or {}
        if any(tags.get(k) != v for k, v in self.tags.items()):
            return False
        if self.states and run.get("state") not in self.states:
            return False
        if self.env is not None and run.get("env") != self.env:
            return False
        if self.algo is not None and run.get("algo") != self.algo:
            return False
        return self.since_ns is None or (run.get("created_ns") or 0) >= self.since_ns


def _bad(name: str, expected: str, value: Any) -> RequestError:
    return RequestError(ErrorCode.BAD_REQUEST, f"{name} must be {expected}, got {value!r}")


def tag_pairs(pairs: tuple[str, ...], option: str = "--tag") -> dict[str, str]:
    """`KEY=VALUE` pairs as tags (the value is text, as given)."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(option, f"expected KEY=VALUE, got {pair!r}")
        result[key] = value
    return result
