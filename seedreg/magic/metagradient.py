"""The metagradient itself: train with checkpoints, then walk the steps backwards pulling the
adjoint through each exactly replayed step (see :mod:`seedreg.magic`)."""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Callable, Dict, List, Tuple, Union

import attrs
import torch
from torch.func import functional_call

from ..errors import SeedregError
from .checkpoints import SCHEDULES, StepCheckpoints
from .optimizers import _OPTIMIZERS, AdamW, SGD

__all__ = ["MetagradientResult", "metagradient"]


@attrs.frozen
class MetagradientResult:
    """What :func:`metagradient` returns.

    - ``grad``: d target / d w at w = 1, a tensor with one entry per training example;
    - ``target``: the target's value after training;
    - ``model``: the trained model (its parameters and buffers as after the last step);
    - ``stats``: ``steps``, ``states_kept`` (the most training states held at once),
      ``seconds_forward`` and ``seconds_backward``.
    """

    grad: torch.Tensor
    target: float
    model: torch.nn.Module
    stats: Dict[str, Any]


class _Stepper:
    """One training step as a function of the state: the model's parameters and buffers (read
    from and written back to the module) and the optimizer's state."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, loss: Callable[..., Any], weights: torch.Tensor) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss = loss
        self.weights = weights
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.opt_state: List[torch.Tensor] = optimizer.init([p.detach() for p in self.params])
        self.norms = [(name, m) for name, m in model.named_modules()
                      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]
        self.tracked = {f"{p}.{b}" if p else b for p, _ in self.norms for b in ("running_mean", "running_var", "num_batches_tracked")}
        buffers = dict(model.named_buffers())
        self.stat_names = [n for n in buffers if n in self.tracked and buffers[n].is_floating_point()]

    # the optimizer's state, for StepCheckpoints (a (get, set) pair)
    def get_state(self) -> List[torch.Tensor]:
        return [s.detach().clone() for s in self.opt_state]

    def set_state(self, state: List[torch.Tensor]) -> None:
        self.opt_state = [s.detach().clone() for s in state]

    def _call(self, params: Dict[str, torch.Tensor], x: Any, hook: Callable[..., Any], *, pre: bool) -> Any:
        """``functional_call`` of the model with `params` and copies of its buffers (which the
        kernels may update), with `hook(module, args[, output], name=...)` on each BatchNorm layer."""
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        handles = []
        for prefix, norm in self.norms:
            bound = functools.partial(hook, name=(prefix + ".") if prefix else "", buffers=buffers)
            handles.append(norm.register_forward_pre_hook(bound) if pre else norm.register_forward_hook(bound))
        try:
            return functional_call(self.model, {**buffers, **params}, (x,), strict=False)
        finally:
            for h in handles:
                h.remove()

    def _forward(self, params: Dict[str, torch.Tensor], stats: Dict[str, torch.Tensor], x: Any) -> Tuple[Any, Dict[str, torch.Tensor]]:
        """The model's output in training mode, and the BatchNorm running statistics it leads to,
        as differentiable functions of `params` and `stats`."""
        new_stats: Dict[str, torch.Tensor] = {}

        def hook(module: Any, args: Tuple[Any, ...], *, name: str, buffers: Dict[str, torch.Tensor]) -> None:
            inp = args[0]
            dims = [0] + list(range(2, inp.dim()))
            count = inp.numel() // inp.shape[1]
            mean = inp.mean(dims)
            var = inp.var(dims, unbiased=False) * (count / max(count - 1, 1))
            tracked = buffers[name + "num_batches_tracked"]
            factor = module.momentum if module.momentum is not None else 1.0 / float(tracked.item() + 1)
            new_stats[name + "running_mean"] = (1 - factor) * stats[name + "running_mean"] + factor * mean
            new_stats[name + "running_var"] = (1 - factor) * stats[name + "running_var"] + factor * var

        return self._call(params, x, hook, pre=True), new_stats

    def evaluate(self, params: Dict[str, torch.Tensor], stats: Dict[str, torch.Tensor], x: Any) -> Any:
        """The model in eval mode as a differentiable function of `params` and the BatchNorm running
        statistics `stats` (torch's kernel takes no gradient for those: normalised here instead)."""
        def hook(module: Any, args: Tuple[Any, ...], output: Any, *, name: str, buffers: Dict[str, torch.Tensor]) -> Any:
            inp = args[0]
            shape = [1, inp.shape[1]] + [1] * (inp.dim() - 2)
            mean, var = stats[name + "running_mean"].reshape(shape), stats[name + "running_var"].reshape(shape)
            out = (inp - mean) / torch.sqrt(var + module.eps)
            if module.affine:
                out = out * module.weight.reshape(shape) + module.bias.reshape(shape)
            return out

        return self._call(params, x, hook, pre=False)

    def _batch_loss(self, out: Any, y: Any, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        per_example = self.loss(out, y)
        if not isinstance(per_example, torch.Tensor) or per_example.shape != (len(indices),):
            got = tuple(per_example.shape) if isinstance(per_example, torch.Tensor) else type(per_example).__name__
            raise SeedregError(
                f"`loss(output, y)` must return one value per example, a tensor of shape ({len(indices)},), got {got}; "
                f"pass reduction='none' (e.g. F.cross_entropy(out, y, reduction='none'))."
            )
        return (weights[indices.to(weights.device)] * per_example).mean()

    def take(self, step: int, indices: torch.Tensor, batch: Any) -> None:
        """Step `step` as training takes it: the module's own forward (its BatchNorm layers update
        their running statistics in place, as in a plain run), the gradient, the optimizer's step."""
        x, y = batch
        with torch.enable_grad():
            loss = self._batch_loss(self.model(x), y, indices, self.weights.detach())
            raw = torch.autograd.grad(loss, self.params, allow_unused=True)
        with torch.no_grad():
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, raw)]
            new_params, new_state = self.optimizer.step([p.detach() for p in self.params], grads, self.opt_state, step)
            for p, new in zip(self.params, new_params):
                p.copy_(new)
        self.opt_state = list(new_state)

    def pull(self, step: int, indices: torch.Tensor, batch: Any, adjoint: "_Adjoint") -> None:
        """Pull `adjoint` back through step `step` (the state before it restored): the step again as
        a differentiable function of the state and the weights, then a vector-Jacobian product."""
        x, y = batch
        params = {n: p.detach().clone().requires_grad_() for n, p in zip(self.names, self.params)}
        current = dict(self.model.named_buffers())
        stats = {n: current[n].detach().clone().requires_grad_() for n in self.stat_names}
        opt_state = [s.detach().clone().requires_grad_() for s in self.opt_state]
        weights = self.weights
        with torch.enable_grad():
            out, new_stats = self._forward(params, stats, x)
            loss = self._batch_loss(out, y, indices, weights)
            raw = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), raw)]
            new_params, new_state = self.optimizer.step(list(params.values()), grads, opt_state, step)
            adjoint.pull(new_params, [new_stats.get(n, stats[n]) for n in self.stat_names], new_state,
                         list(params.values()), [stats[n] for n in self.stat_names], opt_state, weights)


class _Adjoint:
    """The adjoint of the training state (parameters, BatchNorm statistics, optimizer state) and the
    metagradient accumulated so far."""

    def __init__(self, params: List[torch.Tensor], stats: List[torch.Tensor], opt_state: List[torch.Tensor], weights: torch.Tensor) -> None:
        self.params, self.stats, self.opt_state = params, stats, opt_state
        self.grad = torch.zeros_like(weights)

    def pull(self, new_params: List[torch.Tensor], new_stats: List[torch.Tensor], new_state: List[torch.Tensor],
             params: List[torch.Tensor], stats: List[torch.Tensor], opt_state: List[torch.Tensor], weights: torch.Tensor) -> None:
        outputs = [*new_params, *new_stats, *new_state]
        adjoints = [*self.params, *self.stats, *self.opt_state]
        pairs = [(o, a) for o, a in zip(outputs, adjoints) if o.requires_grad]
        inputs = [*params, *stats, *opt_state, weights]
        raw = torch.autograd.grad([o for o, _ in pairs], inputs, grad_outputs=[a for _, a in pairs], allow_unused=True)
        grads = [torch.zeros_like(i) if g is None else g.detach() for i, g in zip(inputs, raw)]
        k, s = len(params), len(stats)
        self.params, self.stats, self.opt_state = grads[:k], grads[k : k + s], grads[k + s : -1]
        self.grad += grads[-1]


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
        size = sum(t.numel() * t.element_size() for t in batch if isinstance(t, torch.Tensor))
        if self.used + size <= self.budget:
            self.kept[step] = (indices, batch)
            self.used += size


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
            "`loader` must yield plain (x, y) batches: build it without with_indices, subset_mode='weight' or "
            "example_weights (metagradient weights each example's loss itself)."
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


def metagradient(
    model: torch.nn.Module,
    loader: Any,
    optimizer: Union[SGD, AdamW],
    *,
    epochs: int,
    loss: Callable[[Any, Any], torch.Tensor],
    target: Callable[[Callable[[Any], Any]], torch.Tensor],
    schedule: str = "sqrt",
    allow_low_precision: bool = False,
) -> MetagradientResult:
    """Train `model` for `epochs` on `loader` with `optimizer`, then return d target / d w.

    - `loader`: a map-style loader from ``session.build_dataloader`` yielding ``(x, y)``; a
      batch's training loss is ``mean(w[indices] * loss(model(x), y))`` with `w` a weight per
      example of the loader's dataset (all 1 here: the derivative is taken at w = 1).
    - `loss(output, y)`: one loss per example (``reduction="none"``).
    - `target(f)`: a scalar tensor from ``f``, the model as a function of its final parameters
      and buffers, in eval mode (``f(x_test)``).
    - `schedule`: how :class:`~seedreg.StepCheckpoints` keeps states for the reverse pass
      (``"sqrt"``: about 2 sqrt(steps) states and two forward passes; ``"log"``; ``"uniform"``
      keeps every state).

    The model trains in place and is returned as ``result.model``; its parameters equal those of a
    plain training loop with the torch.optim optimizer of the same settings and the same session.
    """

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(optimizer, _OPTIMIZERS):
        raise TypeError(
            f"`optimizer` must be one of seedreg.magic's functional steps (magic.SGD, magic.AdamW), got "
            f"{type(optimizer).__name__}: a torch.optim optimizer updates in place, which cannot be differentiated. "
            f"magic.SGD(lr, momentum=..., weight_decay=...) and magic.AdamW(lr, ...) take torch.optim's arguments."
        )
    if type(epochs) is not int or epochs < 1:
        raise ValueError(f"`epochs` must be an int >= 1, got {epochs!r}.")
    for name, fn in (("loss", loss), ("target", target)):
        if not callable(fn):
            raise TypeError(f"`{name}` must be callable, got {fn!r}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {schedule!r}.")
    params = list(model.parameters())
    if not params:
        raise ValueError("`model` has no parameters to train.")
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
    dtype = params[0].dtype
    weights = torch.ones(len(loader.dataset), dtype=dtype, device=params[0].device, requires_grad=True)
    stepper = _Stepper(model, optimizer, loss, weights)
    progress = _Progress(total)
    was_training = model.training
    model.train()
    every = 1 if schedule == "uniform" else None
    batches = _BatchCache()
    checkpoints = _Checkpoints(session, model, None, loader, schedule=schedule, every=every,
                               steps=None if schedule == "uniform" else total, extra=[(stepper.get_state, stepper.set_state)])
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
        final = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        stats = {n: b.detach().clone().requires_grad_() for n, b in model.named_buffers() if n in stepper.stat_names}
        with torch.enable_grad():
            def f(x: Any) -> Any:
                return stepper.evaluate(final, stats, x)

            value = target(f)
            if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
                raise SeedregError(f"`target(f)` must return a scalar floating-point tensor, got {value!r:.80}.")
            inputs = [*final.values(), *stats.values()]
            raw = torch.autograd.grad(value.reshape(()), inputs, allow_unused=True)
    finally:
        model.train()
    grads = [torch.zeros_like(i) if g is None else g.detach() for i, g in zip(inputs, raw)]
    k = len(final)  # `stats` follows stepper.stat_names (both in named_buffers() order)
    adjoint = _Adjoint(grads[:k], grads[k:], [torch.zeros_like(s) for s in stepper.opt_state], weights)
    trained = {k2: v.detach().clone() for k2, v in model.state_dict().items()}
    trained_state = stepper.get_state()
    backward_done = [0]

    def pull(s: int, indices: torch.Tensor, batch: Any) -> None:
        stepper.pull(s, indices, batch, adjoint)
        backward_done[0] += 1
        progress("backward", backward_done[0])

    checkpoints.reverse(pull, forward=stepper.take)
    with torch.no_grad():  # the reverse pass left the state before step 0: put the trained one back
        model.load_state_dict(trained)
    stepper.set_state(trained_state)
    model.train(was_training)
    backward_seconds = time.perf_counter() - started
    stats_out = {"steps": total, "states_kept": checkpoints.peak_states, "seconds_forward": forward_seconds,
                 "seconds_backward": backward_seconds}
    return MetagradientResult(grad=adjoint.grad.detach(), target=float(value.detach()), model=model, stats=stats_out)
