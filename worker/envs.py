"""Where a run's environment comes from: a registered id, or a user's own Env class or factory.

A config's `env` is a Gymnasium id (`FrozenLake-v1`), Gymnasium's `module:EnvId-v0` (the module
is imported, and registers the id), or an entry point `module:Attr` naming an Env class or a
function that returns an Env; `env_module`, when given, is imported first, so that the ids it
registers can be named. `resolve` reads both and `build` makes the environment: the run child
(worker/training.py) and the controller's validation (services/controller/validation.py) go
through them alike, so that a config the controller accepts is one a worker can build, and a
config it refuses gets a ConfigError naming the field.

Both import the user's module in their own process: it must be importable there (installed, or
on PYTHONPATH). The controller's process keeps what one config's module registered, so an id
that a user's module registered is accepted only from a config that names a module, as a worker
would need.
"""

from __future__ import annotations

import difflib
import importlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import gymnasium as gym

from gymbus.shared.errors import ConfigError
from gymbus.shared.runconfig import MODULE_NAME_RE, RunConfig

#: close registered ids offered for an unknown one
SUGGESTIONS = 3
#: ids that users' modules imported here registered (a config naming none cannot use them)
_USER_IDS: set[str] = set()
_USER_IDS_LOCK = threading.Lock()


@dataclass(frozen=True)
class EnvSource:
    """How to build a run's environment: `gymnasium.make(env_id)`, or calling `factory`."""

    env_id: str | None = None
    factory: Callable[..., Any] | None = None


def import_module(name: str, field: str) -> ModuleType:
    """Import a user's module; a ConfigError naming `field` when it is missing or fails."""
    before = set(gym.envs.registry)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise ConfigError(field, f"no module named {missing!r}") from None
        raise ConfigError(field, f"importing {name} failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a user's module may raise anything on import
        raise ConfigError(field, f"importing {name} failed: {type(exc).__name__}: {exc}") from None
    finally:
        with _USER_IDS_LOCK:
            _USER_IDS.update(set(gym.envs.registry) - before)


def resolve(config: RunConfig) -> EnvSource:
    """Import `env_module`, then find `env`: a registered id first (Gymnasium's own
    `module:EnvId` form included), else an entry point's class or factory."""
    if config.env_module:
        import_module(config.env_module, "env_module")
    env = config.env
    if env in gym.envs.registry:
        if not config.env_module and env in _USER_IDS:
            raise ConfigError("env", f"{env!r} is registered by a module this run does not "
                                     "import: name it with --env-module")
        return EnvSource(env_id=env)
    module_name, sep, attr = env.partition(":")
    if not sep:
        raise ConfigError("env", unknown_env_message(env, gym.envs.registry, config.env_module))
    if not MODULE_NAME_RE.match(module_name) or not attr:
        raise ConfigError("env", f"expected an environment id, module:EnvId or module:Attr, "
                                 f"got {env!r}")
    module = import_module(module_name, "env")
    if attr in gym.envs.registry:  # `module:EnvId-v0`: importing the module registered it
        return EnvSource(env_id=attr)
    if not attr.isidentifier():
        raise ConfigError("env", unknown_env_message(attr, gym.envs.registry, module_name))
    target = getattr(module, attr, None)
    if target is None:
        raise ConfigError("env", f"{module_name} has no attribute {attr}")
    if not callable(target):
        raise ConfigError("env", f"{env} is a {type(target).__name__}, not an Env class or a "
                                 "function that returns an Env")
    return EnvSource(factory=target)


def build(config: RunConfig, source: EnvSource | None = None) -> gym.Env[Any, Any]:
    """The environment, made with the config's env_kwargs and episode limit.

    A registered id gets `max_episode_steps` from `gymnasium.make`; an entry point's
    environment is wrapped in TimeLimit for it. What the environment's own code raises is
    left to the caller (the run fails with it; the controller names env_kwargs or env).
    """
    source = source or resolve(config)
    if source.env_id is not None:
        kwargs = dict(config.env_kwargs)
        if config.max_episode_steps is not None:
            kwargs["max_episode_steps"] = config.max_episode_steps
        return gym.make(source.env_id, **kwargs)
    if source.factory is None:
        raise ValueError("an EnvSource needs an env_id or a factory")
    made = source.factory(**config.env_kwargs)
    if not isinstance(made, gym.Env):
        raise ConfigError("env", f"{config.env} returned a {type(made).__name__}, not a "
                                 "gymnasium.Env")
    env: gym.Env[Any, Any] = made
    if config.max_episode_steps is not None:
        env = gym.wrappers.TimeLimit(env, config.max_episode_steps)
    return env


def unknown_env_message(env_id: str, known: Iterable[str], module: str | None = None) -> str:
    """Why `env_id` cannot be made: the current version when only the version is off, else
    the closest registered ids and where ids come from (`module`: the one imported for them)."""
    known = tuple(known)
    base = env_id.rsplit("-v", 1)[0]
    same_base = sorted(k for k in known if k.rsplit("-v", 1)[0] == base)
    if same_base:
        return f"{env_id!r} is not in this Gymnasium; use {same_base[-1]!r}"
    close = difflib.get_close_matches(env_id, known, n=SUGGESTIONS)
    hints = [f"did you mean {' or '.join(repr(k) for k in close)}?"] if close else []
    if module:
        hints.append(f"importing {module} did not register it")
    else:
        hints.append("register it in a module named with --env-module")
    return f"{env_id!r} is not a registered environment ({' '.join(hints)})"
