"""The one warn-once helper of the package: a warning logged the first time its key is seen.

    warn_once(log, "decoder %r is not installed; falling back to PyAV", name)          # once per process
    warn_once(log, "rank %d: streams re-read their shards", rank, key="short", seen=self._warned)  # once per object
"""
from __future__ import annotations

import logging
from typing import Any

__all__ = ["warn_once"]

_SEEN: set = set()


def warn_once(logger: logging.Logger, message: str, *args: Any, key: Any = None, seen: set | None = None) -> bool:
    """Log ``message % args`` at warning level unless ``key`` (default: the formatted message) was seen before in
    ``seen`` (default: one process-wide set). Returns whether it logged."""
    seen = _SEEN if seen is None else seen
    key = (message % args if args else message) if key is None else key
    if key in seen:
        return False
    seen.add(key)
    logger.warning(message, *args)
    return True
