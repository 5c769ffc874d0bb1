"""seedreg: exactly reproducible, auditable PyTorch training.

One :class:`SeedSession` per experiment derives a seed per component from (master seed, purpose,
instance id), records it, hands out seeded builders, and writes a manifest a run can be replayed
and verified from. Importing seedreg changes no global state.
"""

from ._version import __version__
from .attribution import StepCheckpoints, make_subset_mask
from .data import SeededDataLoader
from .derive import SCHEMES, derive_seed
from .determinism import DeterminismSettings
from .errors import (
    ManifestError,
    ManifestWriteError,
    ReplayMismatchError,
    SeedCollisionError,
    SeedregError,
    StateError,
)
from .fingerprint import fingerprint
from .manifest import Manifest
from .records import SeedRecord, Use
from .sampler import DeterministicSampler
from .session import SeedSession
from .streaming import SeededIterableLoader
from .study import Study, StudyError, StudyRun, lds_score

__all__ = [
    "DeterminismSettings",
    "DeterministicSampler",
    "Manifest",
    "ManifestError",
    "ManifestWriteError",
    "ReplayMismatchError",
    "SCHEMES",
    "SeedCollisionError",
    "SeedRecord",
    "SeedSession",
    "SeededDataLoader",
    "SeededIterableLoader",
    "SeedregError",
    "StateError",
    "StepCheckpoints",
    "Study",
    "StudyError",
    "StudyRun",
    "Use",
    "__version__",
    "derive_seed",
    "fingerprint",
    "lds_score",
    "make_subset_mask",
]
