"""LDS subset masks: pure functions of (seed, n, alpha, mode), and their digests (numpy only)."""

from __future__ import annotations

import hashlib
import math

import numpy as np

__all__ = ["MASK_MODES", "check_mask_args", "make_subset_mask", "mask_digest"]

MASK_MODES = ("fixed", "bernoulli")


def check_mask_args(num_examples: object, alpha: object, mode: object) -> None:
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        raise TypeError(f"`num_examples` must be an int >= 1, got {num_examples!r} ({type(num_examples).__name__}).")
    if num_examples < 1:
        raise ValueError(f"`num_examples` must be >= 1, got {num_examples}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise TypeError(f"`alpha` must be a float in (0, 1], got {alpha!r} ({type(alpha).__name__}).")
    if not (math.isfinite(float(alpha)) and 0.0 < float(alpha) <= 1.0):
        raise ValueError(f"`alpha` must be in (0, 1] (the fraction of examples kept), got {alpha!r}.")
    if mode not in MASK_MODES:
        raise ValueError(f"`mode` must be one of {list(MASK_MODES)}, got {mode!r}.")


def make_subset_mask(seed: int, num_examples: int, alpha: float, mode: str = "fixed") -> np.ndarray:
    """A bool mask over `num_examples` examples, a pure function of its arguments.

    "fixed" keeps exactly ``round(alpha * num_examples)`` examples (at least one); "bernoulli" keeps
    each with probability `alpha` (the datamodels convention). Uses numpy's PCG64 stream.

    >>> m = make_subset_mask(1234, 10, 0.5)
    >>> int(m.sum()), m.dtype
    (5, dtype('bool'))
    """
    check_mask_args(num_examples, alpha, mode)
    n = int(num_examples)
    rng = np.random.Generator(np.random.PCG64(seed))
    if mode == "fixed":
        k = max(1, int(round(float(alpha) * n)))
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[:k]] = True
        return mask
    return rng.random(n) < float(alpha)


def mask_digest(mask: np.ndarray) -> str:
    """A SHA-256 of a bool mask (its length and bits): how a manifest names a subset.

    >>> mask_digest(np.array([True, False, True]))[:7]
    'sha256:'
    """
    mask = np.asarray(mask, dtype=bool)
    h = hashlib.sha256(b"seedreg/mask\x00%d\x00" % mask.size)
    h.update(np.packbits(mask, bitorder="little").tobytes())
    return "sha256:" + h.hexdigest()
