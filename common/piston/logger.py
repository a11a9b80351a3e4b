"""Piston's log handler: INFO to stderr by default, so users see what the engine does."""

from __future__ import annotations

import logging
import os
import sys


def configure_logging() -> None:
    """Give the ``piston`` logger a handler unless the user configured one already.

    ``PISTON_LOG_LEVEL`` sets the level; ``PISTON_CONFIGURE_LOGGING=0`` leaves logging
    entirely to the application.
    """
    if os.environ.get("PISTON_CONFIGURE_LOGGING", "1") == "0":
        return
    root = logging.getLogger("piston")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s",
                                           datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(os.environ.get("PISTON_LOG_LEVEL", "INFO").upper())
    root.propagate = False
