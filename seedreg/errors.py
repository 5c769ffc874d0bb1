"""The exceptions seedreg raises.

Every error is a :class:`SeedregError` and also the builtin a caller would expect, so that
``except ValueError`` keeps working around seedreg calls.
"""

from __future__ import annotations

import os
import inspect

__all__ = [
    "ManifestError",
    "ManifestWriteError",
    "ReplayMismatchError",
    "SeedCollisionError",
    "SeedregError",
    "SeedregWarning",
    "StateError",
]


class SeedregError(Exception):
    """Base class of every error raised by seedreg."""


class SeedCollisionError(SeedregError, ValueError):
    """Two different components would receive the same seed (or the same derivation input)."""


class ManifestError(SeedregError, ValueError):
    """A manifest is malformed, corrupt, of an unknown version, or fails its checksum."""


class ManifestWriteError(SeedregError, OSError):
    """A manifest could not be written; the file that was there before is left untouched."""


class ReplayMismatchError(SeedregError, ValueError):
    """A replayed run asked for something the recorded run did not have, or got a different value."""


class StateError(SeedregError, ValueError):
    """A ``state_dict`` is malformed or belongs to a different run (seed, scheme, world size)."""



class SeedregWarning(UserWarning):
    """A likely mistake that does not stop the run: a builder used before ``setup()``, one key
    built again with other settings. Shown by Python once per place; silence one kind with
    ``warnings.filterwarnings("ignore", category=seedreg.SeedregWarning)``."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller of this function point at the
    first line outside seedreg (the user's call), however deep inside seedreg it is raised."""
    frame = inspect.currentframe().f_back  # type: ignore[union-attr]
    assert frame is not None
    level = 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame = frame.f_back
        level += 1
    return level
