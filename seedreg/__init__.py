"""seedreg: exactly reproducible, auditable PyTorch training.

One :class:`SeedSession` per experiment derives a seed per component from (master seed, purpose,
instance id), records it, hands out seeded builders, and writes a manifest a run can be replayed
and verified from. Importing seedreg changes no global state.
"""

from typing import Any

from ._version import __version__
from .fingerprint import fingerprint  # a function named like its module: bound here, once (no torch)

# Where each public name lives. Importing seedreg loads none of them (and so not torch): the
# command line's derive, show, diff and study start in a fraction of a second. A name is
# imported the first time it is used (PEP 562).
_WHERE = {
    "DeterminismSettings": "determinism",
    "DeterministicSampler": "sampler",
    "Manifest": "manifest",
    "ManifestError": "errors",
    "ManifestWriteError": "errors",
    "ReplayMismatchError": "errors",
    "SCHEMES": "derive",
    "SeedCollisionError": "errors",
    "SeedRecord": "records",
    "SeedSession": "session",
    "SeededDataLoader": "data",
    "SeededIterableLoader": "streaming",
    "SeedregError": "errors",
    "SeedregWarning": "errors",
    "StateError": "errors",
    "StepCheckpoints": "magic.checkpoints",
    "Study": "study",
    "StudyError": "study",
    "StudyRun": "study",
    "Trace": "trace",
    "Use": "records",
    "derive_seed": "derive",
    "find_nondeterminism": "nondeterminism",
    "lds_score": "lds",
    "make_subset_mask": "masks",
}


_SUBMODULES = ("magic",)  # public modules, imported when first used: seedreg.magic.metagradient


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        import importlib

        module_object = importlib.import_module(f".{name}", __name__)
        globals()[name] = module_object
        return module_object
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'seedreg' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_WHERE) | set(_SUBMODULES))


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
    "SeedregWarning",
    "StateError",
    "StepCheckpoints",
    "Study",
    "StudyError",
    "StudyRun",
    "Trace",
    "Use",
    "__version__",
    "derive_seed",
    "find_nondeterminism",
    "fingerprint",
    "lds_score",
    "magic",
    "make_subset_mask",
]
