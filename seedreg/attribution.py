"""Data-attribution workflows, by the names of seedreg 0.1 and 0.2: LDS subset masks (from
:mod:`seedreg.masks`) and MAGIC's step checkpoints (from :mod:`seedreg.magic`)."""

from __future__ import annotations

from .magic.checkpoints import SCHEDULES, StepCheckpoints
from .masks import MASK_MODES, check_mask_args, make_subset_mask, mask_digest

__all__ = ["make_subset_mask", "mask_digest", "StepCheckpoints", "MASK_MODES", "check_mask_args", "SCHEDULES"]
