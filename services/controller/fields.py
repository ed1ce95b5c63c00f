"""Fields of a request or broker message body, checked where the controller reads them."""

from __future__ import annotations

import logging
from typing import Any

from gymbus.shared.errors import RequestError
from gymbus.shared.protocol import ErrorCode

log = logging.getLogger("gymbus.controller")


def require(body: dict[str, Any], name: str, kind: type) -> Any:
    """A field of a request body, of the given type, or a bad_request error naming it."""
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(ErrorCode.BAD_REQUEST, f"{name} must be {kind.__name__}, got {value!r}")
    return value


def optional(body: dict[str, Any], name: str, kind: type) -> Any:
    """A field that may be nil; a value of the wrong type counts as nil (logged)."""
    value = body.get(name)
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    log.warning("ignoring %s=%r: expected %s or nil", name, value, kind.__name__)
    return None
