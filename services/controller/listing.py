"""The controller's `list_runs`: its run records, those of one group or passing a `RunFilter`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gymbus.services.controller.registry import Registry
from gymbus.shared.run_filters import RunFilter


def list_runs(registry: Registry, annotate: Callable[[dict[str, Any]], dict[str, Any]],
              body: dict[str, Any]) -> dict[str, Any]:
    """Every run record, oldest first, or those the body's `filter` lets through (a group's
    runs are read by the registry's index), each `annotate`d (a queued run that fits no
    worker says why). Loop thread."""
    wanted = RunFilter.from_wire(body.get("filter"))
    records = (annotate(run.to_wire()) for run in registry.runs(group=wanted.group))
    return {"runs": [record for record in records if wanted.matches(record)]}
