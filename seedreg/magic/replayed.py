"""The training run a metagradient replays: its loop, the checkpoints it keeps (in memory, or in a
run store's directory), the batches it caches, and the reverse pass over it, each segment taken
once with its graphs kept when it reproduces the run (see :mod:`seedreg.magic`)."""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import SeedregError
from ..nondeterminism import tensors_in
from .checkpoints import StepCheckpoints
from .statestore import StateStore
from .stepper import Adjoint, Stepper

__all__ = ["BatchCache", "Progress", "RunCheckpoints", "check_buffers", "check_loader", "train_loop"]


def check_buffers(model: torch.nn.Module, before: Dict[str, torch.Tensor]) -> None:
    """Refuse a model whose buffers other than BatchNorm's running statistics change in training:
    they would be outside the differentiated state."""
    now = dict(model.named_buffers())
    for name, old in before.items():
        if not torch.equal(now[name], old):
            raise SeedregError(
                f"buffer {name!r} of `model` changes during a training step; metagradient differentiates through "
                f"BatchNorm's running statistics only, so this one would be left out and the metagradient wrong. "
                f"Keep it constant in training (or make it a parameter)."
            )


class BatchCache:
    """The training pass's batches, kept for the reverse pass while they fit in `budget` bytes
    (fetching a batch again, with its per-example streams, costs about as much as a small model's
    step); past it the reverse pass fetches them again with ``loader.batch_at``."""

    def __init__(self, budget: int = 256 << 20) -> None:
        self.budget = budget
        self.used = 0
        self.kept: Dict[int, Tuple[torch.Tensor, Any]] = {}

    def keep(self, step: int, indices: torch.Tensor, batch: Any) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors_in(batch))
        if self.used + size <= self.budget:
            self.kept[step] = (indices, batch)
            self.used += size


class RunCheckpoints(StepCheckpoints):
    """StepCheckpoints that takes a step's batch from the training pass's cache when it is there,
    and keeps its states in a run store's directory (claimed, or adopted from another process)."""

    batches: BatchCache

    def claim(self, directory: pathlib.Path) -> None:
        """Keep states in `directory`, replacing the states of an interrupted run of this store."""
        self._disk = StateStore(directory, self.run_id)
        self._disk.claim(True)

    kept_graphs = True  # False once a kept segment did not reproduce the run (then: recomputed exactly)

    def reverse_kept(self, stepper: Stepper, adjoint: Adjoint, progress: "Progress", final: Dict[str, Any]) -> Dict[str, float]:
        """The reverse pass, each segment's steps taken once with their graphs kept and then pulled
        back in reverse, when the segment reproduces the run bit for bit (checked against the next
        checkpoint, or the trained state); otherwise, and for the log schedule, recomputed exactly
        (the state before each step restored, the step differentiated again). Returns the seconds
        spent re-running steps (``"replay"``) and differentiating them and pulling back (``"vjp"``)."""
        done = [0]
        seconds = {"replay": 0.0, "vjp": 0.0}

        def timed(part: str, fn: Callable[..., Any], *args: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                seconds[part] += time.perf_counter() - started

        def pull(s: int, indices: torch.Tensor, batch: Any) -> None:
            timed("vjp", stepper.pull, s, indices, batch, adjoint)
            done[0] += 1
            progress("backward", done[0])

        def take(s: int, indices: torch.Tensor, batch: Any) -> None:
            timed("replay", stepper.take, s, indices, batch)

        if self.every is None:
            self.reverse(pull, forward=take)
            return seconds
        # the state each kept segment must end in: the trained state, then each later segment's start
        # (read once: a store's states are not read from disk twice)
        expected = self._get(self.done)["model"] if self.done in self.saved else final["model"]
        for lo, hi in reversed(self._segments()):
            records: Optional[List[Any]] = None
            if self.kept_graphs:
                start = self._get(lo)
                self.apply_state(start)
                records = []
                for s in range(lo, hi):
                    indices, batch = self._batch(s)
                    records.append(timed("replay", stepper.advance, s, indices, batch))
                    self.peak_states = max(self.peak_states, len(self.saved) + len(records))
                now = self.model.state_dict()
                if not stepper.ranks.all_agree(all(torch.equal(now[k], v) for k, v in expected.items())):
                    records, self.kept_graphs = None, False
                expected = start["model"]
            if records is None:
                self._reverse_segment(lo, hi, pull, take)
                continue
            for s in reversed(range(lo, hi)):
                timed("vjp", adjoint.pull, records.pop(), stepper.weights)
                done[0] += 1
                progress("backward", done[0])
        self.loader.seek(0)
        return seconds

    def adopt(self, directory: pathlib.Path, run: str, saved: List[int], done: int) -> None:
        """Read the states another process wrote for this run (each checked against its digest)."""
        self.run_id, self.done = run, done
        self._disk = StateStore(directory, run)
        self.saved = {step: None for step in saved}

    def _batch(self, step: int) -> Tuple[torch.Tensor, Any]:
        kept = self.batches.kept.get(step)
        return kept if kept is not None else super()._batch(step)


def check_loader(loader: Any) -> Any:
    from ..data import SeededDataLoader

    if not isinstance(loader, SeededDataLoader):
        raise SeedregError(
            f"`loader` must be a map-style loader built by SeedSession.build_dataloader, got {type(loader).__name__}: "
            f"metagradient re-fetches each step's batch with loader.batch_at(step)."
        )
    if not loader.dataset.per_example:
        raise SeedregError("`loader` needs per-example streams (build_dataloader(..., seed_per_example=True), the default).")
    if loader.dataset.indexed:
        raise SeedregError(
            "`loader` must yield the dataset's batches as they are: build it without with_indices, subset_mode='weight' "
            "or example_weights (metagradient weights each example's loss itself)."
        )
    if loader.session is None:
        raise SeedregError("`loader` was not built by SeedSession.build_dataloader (it has no session).")
    return loader.session


class Progress:
    """A line on a terminal for long runs; nothing when stderr is not a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.shown = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, phase: str, done: int) -> None:
        now = time.monotonic()
        if self.shown and (now - self.last > 0.5 or done == self.total):
            self.last = now
            sys.stderr.write(f"\rmetagradient: {phase} {done}/{self.total} steps")
            if phase == "backward" and done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def train_loop(loader: Any, epochs: int, stepper: Stepper, checkpoints: Any, batches: BatchCache, progress: "Progress",
           model: torch.nn.Module) -> None:
    """The plain loop, keeping checkpoints and batches."""
    others = {n: b.detach().clone() for n, b in model.named_buffers() if n not in stepper.tracked}
    checkpoints.maybe_save(0)
    step = 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            indices = torch.tensor(loader.indices_at(step)[1], dtype=torch.long)
            batches.keep(step, indices, batch)
            stepper.take(step, indices, batch)
            if step == 0:
                check_buffers(model, others)
            step += 1
            checkpoints.maybe_save(step)
            progress("forward", step)


