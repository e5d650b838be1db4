"""One switch for the value checks on ids and targets that need a device-to-host read.

Ids are checked once, where they enter the library (``EngramLM.forward`` / ``generate``, the data loader, the
hasher's public methods). On a GPU each such check reads a value back to the host and stalls the stream, which
defeats prefetching table rows ahead of the blocks; turn the checks off for tuned training or serving with
``engram.set_validation(False)`` or by setting ``ENGRAM_VALIDATE=0`` in the environment. Shape and dtype checks
(free: no device read) stay on either way.
"""

from __future__ import annotations

import os

_FALSE = {"0", "false", "no", "off"}
_enabled = os.environ.get("ENGRAM_VALIDATE", "1").strip().lower() not in _FALSE


def set_validation(enabled: bool) -> None:
    """Turn the value checks (id ranges, all-ignored targets, ...) on or off for this process."""
    global _enabled
    _enabled = bool(enabled)


def validation_enabled() -> bool:
    """Whether value checks that read device tensors back to the host are on (default: on)."""
    return _enabled
