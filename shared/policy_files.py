"""Where a run saves its policy, and how an evaluation run, the worker and the CLI find it again.

The names of the policy files live here so that the controller, the CLI and the run process agree
on them. Nothing here loads a policy: `policy_path` and `read_network_meta` look at files and
raise ConfigError naming the config field that pointed at them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gymbus.shared.errors import ConfigError
from gymbus.shared.runconfig import RunConfig

#: the folder, inside a run's folder, that holds what the run saved
ARTIFACTS_DIR = "artifacts"
#: algo -> the file (in a run's artifacts folder) that holds its policy
POLICY_FILES: dict[str, str] = {"q-learning": "q_table.npy", "bdi": "q_table.npy",
                                "dqn": "q_network.pt"}
#: beside a BDI run's Q-table: what its plans remember (route, holes found, routes dropped)
BDI_MEMORY_FILE = "bdi_memory.json"


def policy_path(config: RunConfig, runs_dir: Path) -> Path:
    """The file an evaluation run loads its policy from; ConfigError naming the field if none.

    `eval_from` names a run whose `artifacts/` folder holds the algorithm's file; `policy` is
    that file itself, an artifacts folder, or a run folder.
    """
    field_name = "eval_from" if config.eval_from is not None else "policy"
    want = POLICY_FILES[config.algo]
    if config.eval_from is not None:
        where = runs_dir / config.eval_from / ARTIFACTS_DIR
        if not where.is_dir():
            raise ConfigError("eval_from", f"run {config.eval_from} saved no policy ({where} is "
                                           "missing): is it a finished training run of this home?")
    else:
        where = Path(str(config.policy))
        if not where.exists():
            raise ConfigError("policy", f"no such file or folder: {where}")
        if (where / ARTIFACTS_DIR).is_dir():
            where = where / ARTIFACTS_DIR
    if where.is_dir():
        if not (where / want).is_file():
            held = ", ".join(sorted(p.name for p in where.iterdir())) or "nothing"
            raise ConfigError(field_name, f"{config.algo} loads {want}, and {where} holds {held}")
        return where / want
    if where.suffix != Path(want).suffix:
        raise ConfigError(field_name, f"{where.name} is not a {config.algo} policy: "
                                      f"{config.algo} loads a {Path(want).suffix} file ({want})")
    return where


def guess_policy_algo(path: Path) -> str | None:
    """The algorithm whose policy `path` holds (a file, an artifacts folder or a run folder)."""
    if (path / ARTIFACTS_DIR).is_dir():
        path = path / ARTIFACTS_DIR
    folder, suffix = (path, "") if path.is_dir() else (path.parent, path.suffix)
    if suffix == ".pt" or (not suffix and (folder / POLICY_FILES["dqn"]).is_file()):
        return "dqn"
    if suffix == ".npy" or (not suffix and (folder / POLICY_FILES["q-learning"]).is_file()):
        return "bdi" if (folder / BDI_MEMORY_FILE).is_file() else "q-learning"
    return None


def read_network_meta(weights: Path, field_name: str = "policy") -> dict[str, Any]:
    """The JSON beside a network's weights (`q_network.pt` -> `q_network.json`)."""
    meta_path = weights.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except OSError:
        raise ConfigError(field_name, f"{meta_path.name}, the network's shape, is missing "
                                      f"beside {weights.name}") from None
    except ValueError as exc:
        raise ConfigError(field_name, f"{meta_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ConfigError(field_name, f"{meta_path} should hold a JSON object")
    return meta
