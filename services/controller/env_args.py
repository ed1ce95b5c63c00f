"""The controller's check of a run's env_kwargs against what its environment takes.

`check` reads the parameters of what makes the environment (the registered entry point, or the
user's class or factory) and refuses, naming the field, an argument it does not take or a value
not of its parameter's type, before the environment is built. `refusal` turns what building the
environment raised for its env_kwargs into a ConfigError naming the argument where it can.
Both run on the controller's validation threads (services/controller/validation.py).
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gymbus.shared.errors import ConfigError
from gymbus.shared.runconfig import RunConfig

if TYPE_CHECKING:
    from gymbus.worker.envs import EnvSource


def check(config: RunConfig, source: EnvSource) -> None:
    """Each env argument is one the environment takes, of its parameter's type.

    What a parameter takes comes from its annotation, else from its default (the registration's
    kwargs first, then the signature's): a bool takes true or false (or 1 or 0), an int an
    integer (a number, when only its default says int), a float a number, a str a string, a
    list or tuple a list. A parameter with neither, or an environment whose maker cannot be
    inspected, is left to the environment itself.
    """
    maker = _EnvMaker.of(source) if config.env_kwargs else None
    if maker is None:
        return
    make_keywords = set() if source.factory is not None else _make_keywords()
    for key, value in config.env_kwargs.items():
        name = f"env_kwargs.{key}"
        param = maker.params.get(key)
        if param is None:
            if maker.takes_any or key in make_keywords:
                continue
            raise ConfigError(name, f"{config.env} takes no argument {key} (it takes: "
                                    f"{', '.join(sorted(maker.params)) or 'none'})")
        kind = _kind(param.annotation)
        if kind is None and param.annotation is inspect.Parameter.empty:
            default = maker.default(key)
            known = default is not None and default is not inspect.Parameter.empty
            kind = _kind(type(default)) if known else None
            kind = "float" if kind == "int" else kind  # an unannotated 0 may stand for 0.0
        problem = _KIND_CHECKS[kind](value) if kind is not None else None
        if problem:
            raise ConfigError(name, f"expected {problem}, got {value!r}")


@dataclass(frozen=True)
class _EnvMaker:
    """What makes an environment: its keyword parameters, the defaults its registration gives,
    whether it takes any keyword (**kwargs), and the module it is defined in."""

    params: dict[str, inspect.Parameter]
    defaults: dict[str, Any]
    takes_any: bool
    module: str

    @classmethod
    def of(cls, source: EnvSource) -> _EnvMaker | None:
        """The environment's maker; None when it cannot be loaded or inspected."""
        defaults: dict[str, Any] = {}
        maker: Any = source.factory
        if source.env_id is not None:
            import gymnasium as gym
            from gymnasium.envs.registration import load_env_creator

            spec = gym.envs.registry[source.env_id]
            defaults, maker = dict(spec.kwargs), spec.entry_point
            if isinstance(maker, str):
                try:
                    maker = load_env_creator(maker)
                except Exception:  # noqa: BLE001 - building it reports the same failure, named
                    return None
        if not callable(maker):
            return None
        try:
            try:
                signature = inspect.signature(maker, eval_str=True)
            except (NameError, TypeError, SyntaxError):  # annotations that do not evaluate here
                signature = inspect.signature(maker)
        except (TypeError, ValueError):  # a builtin or C callable without a signature
            return None
        params = {n: p for n, p in signature.parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        return cls(params, defaults, takes_any, getattr(maker, "__module__", "") or "")

    def default(self, key: str) -> Any:
        return self.defaults.get(key, self.params[key].default)

    def choices(self, key: str) -> list[str]:
        """The keys of the one table (a dict of str keys) in the maker's module that holds
        `key`'s string default as a key: the names the environment looks its value up in."""
        default = self.default(key) if key in self.params else None
        module = sys.modules.get(self.module)
        if module is None or not isinstance(default, str):
            return []
        tables = [sorted(v) for v in vars(module).values()
                  if isinstance(v, dict) and default in v and all(isinstance(k, str) for k in v)]
        return tables[0] if len(tables) == 1 else []


def _make_keywords() -> set[str]:
    """The keywords `gymnasium.make` takes itself (max_episode_steps, disable_env_checker)."""
    import gymnasium as gym

    return {n for n, p in inspect.signature(gym.make).parameters.items()
            if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and n != "id")}


def _kind(annotation: Any) -> str | None:
    """bool, int, float, str or list for an annotation (X | None as X); None for the rest."""
    if annotation in (bool, int, float, str):
        return str(annotation.__name__)
    if annotation in (list, tuple) or typing.get_origin(annotation) in (list, tuple):
        return "list"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = {_kind(a) for a in typing.get_args(annotation) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    return None


#: kind -> what a value of it must be, or None when it is one
_KIND_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "bool": lambda v: None if type(v) is bool or (type(v) is int and v in (0, 1))
    else "true or false",
    "int": lambda v: None if type(v) is int else "an integer",
    "float": lambda v: None if type(v) in (int, float) else "a number",
    "str": lambda v: None if isinstance(v, str) else "a string",
    "list": lambda v: None if isinstance(v, list | tuple) else "a list",
}


def refusal(config: RunConfig, source: EnvSource, exc: Exception) -> ConfigError:
    """The environment's own refusal of its env_kwargs. A KeyError of one argument's value (a
    name the environment looked up, like FrozenLake's map_name) names that argument, and what
    the environment knows when its module holds the table it looked in."""
    if isinstance(exc, KeyError) and exc.args:
        missing = exc.args[0]
        for key, value in config.env_kwargs.items():
            if type(value) is type(missing) and value == missing:
                maker = _EnvMaker.of(source)
                known = maker.choices(key) if maker is not None else []
                held = f" (it has {', '.join(repr(k) for k in known)})" if known else ""
                return ConfigError(f"env_kwargs.{key}",
                                   f"{config.env} has no {key} {value!r}{held}")
    return ConfigError("env_kwargs", f"{config.env} refused them: {exc}")
