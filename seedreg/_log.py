"""seedreg's logger: structlog over the stdlib logger "seedreg", quiet unless the application
turns it up (``logging.getLogger("seedreg").setLevel(logging.DEBUG)`` plus a handler, or
``logging.basicConfig(level=logging.DEBUG)``). Importing seedreg configures nothing globally.
"""

from __future__ import annotations

import logging

import structlog

# A library's logger gets a NullHandler (the logging HOWTO's advice for libraries), so that
# seedreg's warnings stay quiet unless the application configures logging.
logging.getLogger("seedreg").addHandler(logging.NullHandler())

logger = structlog.wrap_logger(
    logging.getLogger("seedreg"),
    wrapper_class=structlog.stdlib.BoundLogger,
    processors=[
        structlog.stdlib.filter_by_level,
        structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True),
    ],
)


_stdlib = logging.getLogger("seedreg")


def enabled(level: int) -> bool:
    """Whether seedreg's logger would emit at `level` (skip building an event nobody reads:
    structlog builds it before its level filter drops it, about 0.1 ms an event)."""
    return _stdlib.isEnabledFor(level)
