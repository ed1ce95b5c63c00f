"""The controller's `delete_run`: an ended run's record and its run folder removed.

Runs on the controller's loop. A queued or active run is refused (`run_active`): cancel it first.
`missing_ok` removes the folder of a run the registry does not know (one imported, or fed to the
ingest by hand) instead of refusing with `unknown_run`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from gymbus.services.controller.registry import Registry
from gymbus.shared.errors import RequestError
from gymbus.shared.protocol import ErrorCode
from gymbus.shared.settings import Settings

log = logging.getLogger("gymbus.controller")


def run_folder(settings: Settings, run_id: str) -> Path:
    """The run's folder under the runs folder; bad_request for an id that would leave it."""
    folder = settings.run_dir(run_id)
    if not run_id or "/" in run_id or "\\" in run_id or run_id in (".", ".."):
        raise RequestError(ErrorCode.BAD_REQUEST, f"run_id {run_id!r} is not a run id")
    return folder


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 when there is none)."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def delete_run(registry: Registry, settings: Settings, body: dict[str, Any]) -> dict[str, Any]:
    """Remove an ended run's record and folder; the reply says what was removed."""
    run_id = body.get("run_id")
    if not isinstance(run_id, str):
        raise RequestError(ErrorCode.BAD_REQUEST, f"run_id must be str, got {run_id!r}")
    folder = run_folder(settings, run_id)
    run = registry.get(run_id)
    if run is None and not body.get("missing_ok"):
        raise RequestError(ErrorCode.UNKNOWN_RUN, f"no run {run_id!r}")
    if run is not None and not run.terminal:
        raise RequestError(ErrorCode.RUN_ACTIVE, f"run {run_id} is {run.state.value}: cancel it "
                                                 f"first (`gymbus cancel {run_id}`)")
    size = folder_bytes(folder)
    if folder.is_dir():
        shutil.rmtree(folder)
    record = run is not None and registry.delete(run_id)
    log.info("deleted run %s: record %s, folder %s (%d bytes)", run_id,
             "removed" if record else "none", folder, size)
    return {"run_id": run_id, "record": record, "folder": str(folder) if size else None,
            "folder_bytes": size}
