"""Data-attribution workflows: LDS subset masks, and MAGIC-style step checkpoints and replay.

LDS (linear datamodeling) trains many models on random subsets of the training set; each mask is
a deterministic function of (master seed, instance id), so model i can be retrained alone.
MAGIC replays training exactly to differentiate through it; :class:`StepCheckpoints` keeps the
whole state every k steps (model, optimizer, buffers, RNG and loader positions) and re-runs any
step from the nearest checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import math
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch

__all__ = ["make_subset_mask", "mask_digest", "StepCheckpoints", "MASK_MODES"]

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


class StepCheckpoints:
    """MAGIC-style exact step replay: keep the full training state every `every` steps in memory.

    `capture` (called by :meth:`maybe_save`) takes the model's and optimizer's state dicts
    (parameters, BN buffers, optimizer moments) and ``session.state_dict()`` (global RNGs, every
    loader's epoch and position, the registry). :meth:`replay` restores the checkpoint at or before
    step `t` and runs `step_fn` until step `t` is done, whatever happened to the RNGs in between.

    The training loop calls ``maybe_save(step)`` whenever `step` steps are done (``maybe_save(0)``
    before the loop), that is, before the batch of step `step` is drawn; `step_fn(batch)` runs one
    step on the batch the loader hands out. Replay uses the same model, optimizer and loader: run
    it after training (or on objects built the same way), not inside the training loop.

    >>> import torch
    >>> from seedreg import SeedSession
    >>> s = SeedSession(0)
    >>> model = s.build_model(torch.nn.Linear, None, in_features=2, out_features=1)
    >>> opt = s.build_optimizer(torch.optim.SGD, model.parameters(), lr=0.1)
    >>> loader = s.build_dataloader(torch.randn(8, 2), batch_size=2, shuffle=True)
    >>> def step_fn(x):
    ...     opt.zero_grad(); model(x).pow(2).mean().backward(); opt.step()
    >>> ckpt = StepCheckpoints(s, model, opt, loader, every=2)
    >>> after, step = {}, 0
    >>> _ = ckpt.maybe_save(0)
    >>> for x in loader:
    ...     step_fn(x); after[step] = model.weight.clone(); step += 1; _ = ckpt.maybe_save(step)
    >>> _ = torch.rand(5)  # disturb the global generator
    >>> ckpt.replay(3, step_fn)  # restores the checkpoint of step 2, runs steps 2 and 3
    2
    >>> torch.equal(model.weight, after[3])
    True
    """

    def __init__(self, session: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Any, *, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be an int >= 1, got {every!r}.")
        self.session = session
        self.model = model
        self.optimizer = optimizer
        self.loader = loader
        self.every = every
        self.saved: Dict[int, Dict[str, Any]] = {}

    def capture(self) -> Dict[str, Any]:
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "session": self.session.state_dict(),
        }

    def maybe_save(self, step: int) -> bool:
        """Save the state with `step` steps done if `step` is a multiple of `every`; return whether it did."""
        if step % self.every:
            return False
        self.saved[step] = self.capture()
        return True

    def restore(self, step: int) -> int:
        """Restore the nearest checkpoint at or before `step`; return its step."""
        candidates = [s for s in self.saved if s <= step]
        if not candidates:
            raise ValueError(f"no checkpoint at or before step {step}; saved steps: {sorted(self.saved)}.")
        start = max(candidates)
        state = self.saved[start]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        # a rewind in this process: random state and loader positions only; the registry keeps
        # every use made since (an eval loader built after training stays, and stays recorded)
        self.session._load_state(state["session"], registry=False)
        return start

    def replay(self, step: int, step_fn: Callable[[Any], Any]) -> int:
        """Re-run training up to and including `step`: the model then holds the state after `step`."""
        start = self.restore(step)
        batches: Optional[Iterator[Any]] = None
        current = start
        while current <= step:
            if batches is None:
                batches = iter(self.loader)
            try:
                batch = next(batches)
            except StopIteration:
                batches = None
                continue
            step_fn(batch)
            current += 1
        return start
