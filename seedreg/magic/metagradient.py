"""The metagradient itself: train with checkpoints, then walk the steps backwards pulling the
adjoint through each exactly replayed step (see :mod:`seedreg.magic`)."""

from __future__ import annotations

import copy
import math
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import attrs
import torch

from ..errors import SeedregError
from .checkpoints import SCHEDULES, StepCheckpoints
from .stepper import Adjoint, Stepper
from .steps import make_steps

__all__ = ["MetagradientResult", "metagradient"]


@attrs.frozen
class MetagradientResult:
    """What :func:`metagradient` returns.

    - ``grad``: d target / d w at w = 1, a tensor with one entry per training example;
    - ``target``: the target's value after training;
    - ``model``: the trained model (its parameters and buffers as after the last step);
    - ``stats``: ``steps``, ``states_kept`` (the most training states held at once),
      ``seconds_forward`` and ``seconds_backward``;
    - ``sign``: ``"loss"``, the convention of ``grad`` (d target / d w: positive when weighting the
      example up raises the target). dattri and TRAK give "helpfulness" (the opposite sign for a
      loss): ``lds_score(..., sign=result.sign)`` scores either correctly.
    """

    grad: torch.Tensor
    target: float
    model: torch.nn.Module
    stats: Dict[str, Any]
    sign: str = "loss"


def _check_buffers(model: torch.nn.Module, before: Dict[str, torch.Tensor]) -> None:
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


class _BatchCache:
    """The training pass's batches, kept for the reverse pass while they fit in `budget` bytes
    (fetching a batch again, with its per-example streams, costs about as much as a small model's
    step); past it the reverse pass fetches them again with ``loader.batch_at``."""

    def __init__(self, budget: int = 256 << 20) -> None:
        self.budget = budget
        self.used = 0
        self.kept: Dict[int, Tuple[torch.Tensor, Any]] = {}

    def keep(self, step: int, indices: torch.Tensor, batch: Any) -> None:
        size = sum(t.numel() * t.element_size() for t in _tensors(batch))
        if self.used + size <= self.budget:
            self.kept[step] = (indices, batch)
            self.used += size


def _tensors(value: Any) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class _Checkpoints(StepCheckpoints):
    """StepCheckpoints that takes a step's batch from the training pass's cache when it is there."""

    batches: _BatchCache

    def _batch(self, step: int) -> Tuple[torch.Tensor, Any]:
        kept = self.batches.kept.get(step)
        return kept if kept is not None else super()._batch(step)


def _check_loader(loader: Any) -> Any:
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
    if loader._session is None:
        raise SeedregError("`loader` was not built by SeedSession.build_dataloader (it has no session).")
    return loader._session


class _Progress:
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


def _losses(loss: Any, example_losses: Any) -> Callable[[torch.nn.Module, Any], torch.Tensor]:
    """The per-example losses of a batch, from `example_losses(model, batch)` or `loss(model(x), y)`."""
    if (loss is None) == (example_losses is None):
        raise TypeError("pass exactly one of `loss` (loss(output, y) for (x, y) batches) and `example_losses` "
                        "(example_losses(model, batch) -> one loss per example, for any batch structure).")
    fn = loss if loss is not None else example_losses
    if not callable(fn):
        raise TypeError(f"`{'loss' if loss is not None else 'example_losses'}` must be callable, got {fn!r:.60}.")
    if example_losses is not None:
        return example_losses

    def from_pairs(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            what = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            raise SeedregError(f"`loss=` takes (x, y) batches, but the loader yields {what}; pass example_losses=(model, "
                               f"batch) -> one loss per example instead (any batch structure: extras, dicts).")
        x, y = batch
        return loss(model(x), y)

    return from_pairs


def _check_options(epochs: Any, accumulate: Any, max_grad_norm: Any, scheduler: Any, optimizer: Any, target: Any,
                   schedule: Any) -> None:
    if type(epochs) is not int or epochs < 1:
        raise ValueError(f"`epochs` must be an int >= 1, got {epochs!r}.")
    if type(accumulate) is not int or accumulate < 1:
        raise ValueError(f"`accumulate` must be an int >= 1 (loader batches per optimizer step), got {accumulate!r}.")
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                      or not math.isfinite(max_grad_norm) or max_grad_norm <= 0):
        raise ValueError(f"`max_grad_norm` must be a finite float > 0 (clip_grad_norm_'s max_norm) or None, got {max_grad_norm!r}.")
    if scheduler is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("`scheduler` goes with a torch.optim optimizer; magic.SGD/Adam/AdamW take lr as a callable step -> lr.")
        if getattr(scheduler, "optimizer", None) is not optimizer or not hasattr(scheduler, "state_dict"):
            raise TypeError(f"`scheduler` must be a torch.optim.lr_scheduler built on `optimizer`, got {type(scheduler).__name__}.")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise TypeError("`scheduler` is ReduceLROnPlateau, which steps on a metric the training loop does not have; use a "
                            "scheduler that steps once per optimizer step.")
    if not callable(target):
        raise TypeError(f"`target` must be callable, got {target!r}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {schedule!r}.")


def metagradient(
    model: torch.nn.Module,
    loader: Any,
    optimizer: Any,
    *,
    epochs: int,
    target: Callable[[Callable[..., Any]], torch.Tensor],
    loss: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    example_losses: Optional[Callable[[torch.nn.Module, Any], torch.Tensor]] = None,
    scheduler: Any = None,
    max_grad_norm: Optional[float] = None,
    accumulate: int = 1,
    schedule: str = "sqrt",
    allow_low_precision: bool = False,
) -> MetagradientResult:
    """Train `model` for `epochs` on `loader` with `optimizer`, as a plain loop does, then return
    d target / d w, with w a weight per training example (all 1).

    - `loader`: a map-style loader from ``session.build_dataloader``. The training loss of a batch
      is ``mean(w[indices] * losses) / accumulate``: the counterfactual is the same run with the
      same batches, an example's loss weighted by its w (w = 0: dropped, its batch otherwise
      unchanged).
    - `optimizer`: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` built on the model's parameters
      (every param group with its own hyperparameters; its state if it has stepped), or
      ``magic.SGD``/``magic.Adam``/``magic.AdamW``. Parameters with ``requires_grad=False`` or
      in no group stay constant and are not differentiated.
    - `loss(output, y)`: one loss per example (``reduction="none"``), for ``(x, y)`` batches; or
      `example_losses(model, batch)`: the per-example losses of any batch (tuples with extras,
      dicts for Hugging Face models).
    - `scheduler`: a ``torch.optim.lr_scheduler`` on `optimizer`, stepped after each optimizer
      step; every hyperparameter it changes (lr, momentum, betas) is followed.
    - `max_grad_norm`: ``clip_grad_norm_`` over the trainable parameters before each optimizer
      step; `accumulate`: loader batches per optimizer step (counted within an epoch; an epoch's
      last partial group steps too).
    - `target(f)`: a scalar tensor from ``f``, the model in eval mode as a function of its final
      parameters and buffers (``f(x_test)``, or ``f(**inputs)``). A target that does not depend
      on the model has metagradient 0.
    - `schedule`: how :class:`~seedreg.StepCheckpoints` keeps states for the reverse pass
      (``"sqrt"``: about 2 sqrt(steps) states and two forward passes; ``"log"``; ``"uniform"``).

    The model trains in place and is returned as ``result.model``, with the optimizer and scheduler
    left as the plain loop leaves them. A non-finite training loss raises naming the step and the
    examples; low precision (half-precision parameters, or autocast inside ``forward``) needs
    ``allow_low_precision=True``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    _check_options(epochs, accumulate, max_grad_norm, scheduler, optimizer, target, schedule)
    losses = _losses(loss, example_losses)
    steps = make_steps(optimizer, model)
    params = steps.params
    if not params:
        raise ValueError("`model` has no trainable parameter (each has requires_grad=False, or is in no param group).")
    low = sorted({str(p.dtype) for p in params if p.dtype in (torch.float16, torch.bfloat16)})
    if low and not allow_low_precision:
        raise SeedregError(
            f"`model` has {', '.join(low)} parameters: a metagradient sums thousands of steps' adjoints, which half "
            f"precision loses. Train in float32 or float64 (model.double()), or pass allow_low_precision=True."
        )
    session = _check_loader(loader)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ValueError("`loader` yields no batch per epoch (drop_last with fewer examples than a batch).")
    total = epochs * steps_per_epoch
    weights = torch.ones(len(loader.dataset), dtype=params[0].dtype, device=params[0].device, requires_grad=True)
    stepper = Stepper(model, steps, losses, weights, steps_per_epoch=steps_per_epoch, accumulate=accumulate,
                      max_grad_norm=None if max_grad_norm is None else float(max_grad_norm), scheduler=scheduler,
                      allow_low_precision=allow_low_precision)
    progress = _Progress(total)
    was_training = model.training
    model.train()
    opt, extra = steps.checkpointed()
    batches = _BatchCache()
    checkpoints = _Checkpoints(session, model, opt, loader, schedule=schedule, every=1 if schedule == "uniform" else None,
                               steps=None if schedule == "uniform" else total,
                               extra=extra + ([scheduler] if scheduler is not None else []))
    checkpoints.batches = batches

    others = {n: b.detach().clone() for n, b in model.named_buffers() if n not in stepper.tracked}
    started = time.perf_counter()
    checkpoints.maybe_save(0)
    step = 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            indices = torch.tensor(loader.indices_at(step)[1], dtype=torch.long)
            batches.keep(step, indices, batch)
            stepper.take(step, indices, batch)
            if step == 0:
                _check_buffers(model, others)
            step += 1
            checkpoints.maybe_save(step)
            progress("forward", step)
    forward_seconds = time.perf_counter() - started

    started = time.perf_counter()
    model.eval()
    try:
        final = {n: p.detach().clone().requires_grad_() for n, p in zip(stepper.names, params)}
        stats = {n: b.detach().clone().requires_grad_() for n, b in model.named_buffers() if n in stepper.stat_names}
        with torch.enable_grad():
            def f(*args: Any, **kwargs: Any) -> Any:
                return stepper.evaluate(final, stats, args, kwargs)

            value = target(f)
            if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
                raise SeedregError(f"`target(f)` must return a scalar floating-point tensor, got {value!r:.80}.")
            inputs = [*final.values(), *stats.values()]
            raw = (torch.autograd.grad(value.reshape(()), inputs, allow_unused=True) if value.requires_grad
                   else (None,) * len(inputs))
    finally:
        model.train()
    grads = [torch.zeros_like(i) if g is None else g.detach() for i, g in zip(inputs, raw)]
    k = len(final)  # `stats` follows stepper.stat_names (both in named_buffers() order)
    adjoint = Adjoint(grads[:k], grads[k:], weights)
    if value.requires_grad:  # a target that ignores the model: its metagradient is exactly 0
        trained = checkpoints.capture()
        backward_done = [0]

        def pull(s: int, indices: torch.Tensor, batch: Any) -> None:
            stepper.pull(s, indices, batch, adjoint)
            backward_done[0] += 1
            progress("backward", backward_done[0])

        checkpoints.reverse(pull, forward=stepper.take)
        # the reverse pass left the state before step 0: put the trained one back (model, gradients,
        # optimizer, scheduler, generators and loader positions as the plain loop leaves them)
        checkpoints._apply(copy.deepcopy(trained))
    model.train(was_training)
    backward_seconds = time.perf_counter() - started
    stats_out = {"steps": total, "states_kept": checkpoints.peak_states, "seconds_forward": forward_seconds,
                 "seconds_backward": backward_seconds}
    return MetagradientResult(grad=adjoint.grad.detach(), target=float(value.detach()), model=model, stats=stats_out)
