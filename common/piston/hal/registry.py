"""Platform discovery through the ``piston.platforms`` entry-point group."""

from __future__ import annotations

import functools
import logging
import os
from importlib.metadata import entry_points

from piston.hal.interface import PLATFORM_INTERFACE_VERSION, Platform

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "piston.platforms"
# Automatic choice: the first available platform in this order.
PREFERENCE = ("cuda", "tpu", "cpu")


class PlatformError(RuntimeError):
    """The requested platform is unknown or cannot run here."""


def installed_platforms() -> dict[str, object]:
    """Entry points of every installed platform plugin, by name (nothing imported)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load(name: str, ep) -> type[Platform]:
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Platform)):
        raise PlatformError(f"Platform plugin {name!r} ({ep.value}) is not a piston Platform subclass.")
    if cls.interface_version != PLATFORM_INTERFACE_VERSION:
        raise PlatformError(
            f"Platform plugin {name!r} implements interface version {cls.interface_version}, "
            f"but this piston needs version {PLATFORM_INTERFACE_VERSION}; upgrade the plugin."
        )
    return cls


def _describe(found: dict[str, object]) -> str:
    lines = []
    for name in sorted(found):
        try:
            cls = _load(name, found[name])
            state = "available" if cls.is_available() else f"unavailable: {cls.unavailable_reason()}"
        except Exception as e:  # a broken plugin must not hide the others
            state = f"failed to load: {e}"
        lines.append(f"  {name} ({state})")
    return "\n".join(lines) or "  (none: install piston[cpu], piston[cuda] or piston[tpu])"


@functools.lru_cache(maxsize=None)
def get_platform(name: str | None = None) -> type[Platform]:
    """The platform named by ``name`` or ``PISTON_PLATFORM``, else the first available one.

    Raises PlatformError listing the installed platforms when the name is unknown or
    the platform is not available on this machine.
    """
    name = name or os.environ.get("PISTON_PLATFORM") or None
    found = installed_platforms()
    if name is not None:
        name = name.strip().lower()
        if name not in found:
            raise PlatformError(f"Unknown platform {name!r}. Installed platforms:\n{_describe(found)}")
        cls = _load(name, found[name])
        if not cls.is_available():
            raise PlatformError(
                f"Platform {name!r} is not available: {cls.unavailable_reason()}. "
                f"Installed platforms:\n{_describe(found)}"
            )
        return cls
    for candidate in [p for p in PREFERENCE if p in found] + sorted(set(found) - set(PREFERENCE)):
        try:
            cls = _load(candidate, found[candidate])
        except Exception as e:
            logger.warning("Skipping platform %s: %s", candidate, e)
            continue
        if cls.is_available():
            logger.info("Using platform %s (%s)", cls.name, cls.device_name())
            return cls
    raise PlatformError(f"No available platform. Installed platforms:\n{_describe(found)}")
