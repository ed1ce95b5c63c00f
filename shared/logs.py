"""Logging for services: one line per record on stderr, with the service's name."""

from __future__ import annotations

import logging
import os


def setup(service: str) -> logging.Logger:
    """Configure the root logger once (level from GYMBUS_LOG_LEVEL, default INFO)."""
    level = os.environ.get("GYMBUS_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s {service}[%(process)d] %(levelname)s %(message)s",
    )
    return logging.getLogger(f"gymbus.{service}")
