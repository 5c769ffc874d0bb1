"""The linear datamodeling score (LDS): how well an attribution predicts models trained on subsets."""

from __future__ import annotations

from typing import Any, Union

import numpy as np

__all__ = ["lds_score"]

CHUNK_BYTES = 16 << 20  # masks converted to float32 this many bytes at a time


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along axis 0, ties averaged (as Spearman's correlation uses them)."""
    n = values.shape[0]
    order = np.argsort(values, axis=0, kind="mergesort")
    ranks = np.empty(values.shape, dtype=np.float64)
    cols = np.arange(values.shape[1])
    ranks[order, cols] = np.arange(n, dtype=np.float64)[:, None]
    # average the ranks of tied values, column by column
    for j in range(values.shape[1]):
        col = values[:, j]
        sorted_vals = col[order[:, j]]
        if n > 1 and np.any(sorted_vals[1:] == sorted_vals[:-1]):
            _, inverse, counts = np.unique(col, return_inverse=True, return_counts=True)
            sums = np.zeros(len(counts))
            np.add.at(sums, inverse, ranks[:, j])
            ranks[:, j] = (sums / counts)[inverse]
    return ranks


def _predictions(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``masks @ scores`` in float32, the masks converted a chunk of rows at a time."""
    rows = max(1, CHUNK_BYTES // (4 * max(1, masks.shape[1])))
    out = np.empty((masks.shape[0], scores.shape[1]), dtype=np.float32)
    for start in range(0, masks.shape[0], rows):
        out[start:start + rows] = masks[start:start + rows].astype(np.float32) @ scores
    return out


SIGNS = ("loss", "helpfulness")


def lds_score(scores: Any, masks: Any, outputs: Any, *, replicates: int = 1, per_target: bool = False,
              sign: str = "loss") -> Union[float, np.ndarray]:
    """The linear datamodeling score: predictions ``masks @ scores`` against the measured
    `outputs` (averaged over each group of `replicates` models sharing a mask), Spearman's rank
    correlation across models for each output, averaged over outputs (TRAK's definition).

    `scores` is examples x outputs, `masks` models x examples (True: the example was kept),
    `outputs` models x outputs, as measured (a test loss, say). `sign` names the scores'
    convention: ``"loss"`` (seedreg's: d output / d w, positive when keeping the example raises
    the output; ``magic.metagradient``'s ``result.grad``) or ``"helpfulness"`` (dattri's and
    TRAK's: positive when the example lowers the loss; they are negated here). Either way the
    same attribution scores the same: a missed flip would give exactly -LDS. The
    product is taken in float32, the masks converted a chunk at a time (memory: one chunk beyond
    the predictions). NaN as TRAK and dattri give it (scipy's ``spearmanr`` per target): a target
    whose predictions or outputs are constant, or hold a NaN, scores NaN, and the plain mean
    over targets is then NaN; ``per_target=True`` returns the per-target array (take
    ``np.nanmean`` of it to skip them).

    >>> rng = np.random.default_rng(0)
    >>> masks = rng.random((20, 10)) < 0.5
    >>> scores = rng.normal(size=(10, 3))
    >>> round(lds_score(scores, masks, masks @ scores), 6)
    1.0
    >>> round(lds_score(-scores, masks, masks @ scores, sign="helpfulness"), 6)
    1.0
    """
    if sign not in SIGNS:
        raise ValueError(f"`sign` must be one of {list(SIGNS)} (the scores' convention: d output / d w, or helpfulness "
                         f"as dattri and TRAK give it), got {sign!r:.40}.")
    scores = np.asarray(scores, dtype=np.float32)
    if sign == "helpfulness":
        scores = -scores
    masks = np.asarray(masks)
    outputs = np.asarray(outputs, dtype=np.float64)
    if masks.ndim != 2 or scores.ndim != 2 or outputs.ndim != 2:
        raise ValueError(f"`scores`, `masks` and `outputs` must be 2-d, got {scores.shape}, {masks.shape}, {outputs.shape}.")
    if masks.shape[1] != scores.shape[0] or outputs.shape != (masks.shape[0], scores.shape[1]):
        raise ValueError(
            f"shapes disagree: masks {masks.shape} (models x examples), scores {scores.shape} (examples x outputs), "
            f"outputs {outputs.shape} (models x outputs)."
        )
    if type(replicates) is not int or replicates < 1 or masks.shape[0] % replicates:
        raise ValueError(f"`replicates` must be an int >= 1 dividing the number of models ({masks.shape[0]}), got {replicates!r}.")
    groups = masks.shape[0] // replicates
    if replicates > 1:
        for g in range(groups):
            first = masks[g * replicates]
            for k in range(1, replicates):
                if not np.array_equal(masks[g * replicates + k], first):
                    raise ValueError(
                        f"`masks` rows {g * replicates} and {g * replicates + k} differ, but they are replicate group {g} "
                        f"(replicates={replicates}): models of one group train on one mask. Check the order of the rows."
                    )
    predictions = _predictions(masks[::replicates], scores)
    outputs = outputs.reshape(groups, replicates, -1).mean(axis=1)
    rho = np.full(scores.shape[1], np.nan)
    valid = np.isfinite(outputs).all(axis=0) & np.isfinite(predictions).all(axis=0)
    if valid.any():
        a, b = _ranks(predictions[:, valid]), _ranks(outputs[:, valid])
        a -= a.mean(axis=0)
        b -= b.mean(axis=0)
        denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            rho[valid] = np.where(denom > 0, (a * b).sum(axis=0) / np.where(denom > 0, denom, 1.0), np.nan)
    return rho if per_target else float(np.mean(rho))
