"""MAGIC in a few lines: the metagradient of a target through a whole training run.

MAGIC (Ilyas & Engstrom, 2025) attributes a model's behaviour to its training data by
differentiating a target (a loss on a test example, say) through the whole, deterministic training
run with respect to a weight per training example: the REPLAY algorithm of "Optimizing ML Training
with Metagradient Descent" (Engstrom et al., 2025). :func:`metagradient` trains, keeping
checkpoints on a schedule (:class:`~seedreg.StepCheckpoints`), then walks the steps backwards,
restoring the exact state before each one (parameters, buffers, optimizer state, random
generators) and pulling the adjoint through it::

    session = SeedSession(0).setup()
    model = session.build_model(MLP, "model").double()
    loader = session.build_dataloader(train, "train", batch_size=32, shuffle=True)
    result = magic.metagradient(model, loader, magic.SGD(0.1, momentum=0.9), epochs=4,
                                loss=lambda out, y: F.cross_entropy(out, y, reduction="none"),
                                target=lambda f: F.cross_entropy(f(x_test), y_test))
    result.grad      # d target / d w_i at w = 1, one per training example

A batch's training loss is ``mean(w[indices] * loss(model(x), y))``. The optimizer steps here are
functional and differentiable, with the forward math of torch.optim's, and finite metagradients
where a gradient or a second moment is exactly zero. BatchNorm's running statistics are part of
the differentiated state (a target evaluated in eval mode depends on them), and dropout or any
other global random draw inside the forward pass is replayed exactly.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import attrs
import torch
from torch.func import functional_call

from .attribution import SCHEDULES, StepCheckpoints
from .errors import SeedregError

__all__ = ["AdamW", "MetagradientResult", "SGD", "metagradient"]

LR = Union[float, Callable[[int], float]]


def _lr_at(lr: LR, step: int) -> float:
    value = lr(step) if callable(lr) else lr
    if isinstance(value, torch.Tensor):
        value = value.item()
    return float(value)


def _check_lr(lr: Any) -> LR:
    if callable(lr):
        return lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"`lr` must be a finite float >= 0 or a callable step -> lr, got {lr!r}.")
    return float(lr)


def _check_coefficient(name: str, value: Any, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high or math.isnan(value):
        raise ValueError(f"`{name}` must be a float in [{low}, {high}], got {value!r}.")
    return float(value)


class SGD:
    """torch.optim.SGD as a differentiable function of (parameters, gradients, state).

    The same math as ``torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov)``:
    the momentum buffer starts as the first step's gradient. `lr` is a float or a callable
    ``step -> lr`` (the step counted from 0).

    >>> import torch
    >>> sgd = SGD(0.1, momentum=0.9)
    >>> p, g = [torch.tensor([1.0], dtype=torch.float64)], [torch.tensor([0.5], dtype=torch.float64)]
    >>> state = sgd.init(p)
    >>> p, state = sgd.step(p, g, state, 0)          # the buffer starts as the gradient
    >>> p, state = sgd.step(p, g, state, 1)          # buffer 0.9 * 0.5 + 0.5 = 0.95
    >>> round(p[0].item(), 6), round(state[0].item(), 6)
    (0.855, 0.95)
    """

    def __init__(self, lr: LR, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False) -> None:
        self.lr = _check_lr(lr)
        self.momentum = _check_coefficient("momentum", momentum)
        self.dampening = _check_coefficient("dampening", dampening)
        self.weight_decay = _check_coefficient("weight_decay", weight_decay)
        if not isinstance(nesterov, bool):
            raise TypeError(f"`nesterov` must be a bool, got {nesterov!r}.")
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening 0 (as torch.optim.SGD).")
        self.nesterov = nesterov

    def __repr__(self) -> str:
        return (f"SGD(lr={self.lr!r}, momentum={self.momentum}, dampening={self.dampening}, "
                f"weight_decay={self.weight_decay}, nesterov={self.nesterov})")

    def init(self, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The state before the first step: a momentum buffer per parameter (unused at step 0)."""
        return [torch.zeros_like(p) for p in params] if self.momentum else []

    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: Sequence[torch.Tensor],
             step: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """(new parameters, new state) after step `step`; differentiable in all of its tensors."""
        lr = _lr_at(self.lr, step)
        new_params, new_state = [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            d = g + self.weight_decay * p if self.weight_decay else g
            if self.momentum:
                buf = d if step == 0 else state[i] * self.momentum + d * (1 - self.dampening)
                new_state.append(buf)
                d = d + self.momentum * buf if self.nesterov else buf
            new_params.append(p - lr * d)
        return new_params, new_state


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with the same values, and derivative 0 (not infinity) where x is exactly 0."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


class AdamW:
    """torch.optim.AdamW as a differentiable function of (parameters, gradients, state).

    The same math as ``torch.optim.AdamW(params, lr, betas, eps, weight_decay)`` (decoupled weight
    decay, bias correction). The square root of the second moment has derivative 0 where the
    moment is exactly 0, so a parameter whose gradient is always zero gives finite (zero)
    metagradients instead of NaN.
    """

    def __init__(self, lr: LR, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        self.lr = _check_lr(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"`betas` must be a pair (beta1, beta2), got {betas!r}.")
        self.betas = (_check_coefficient("betas[0]", betas[0], 0.0, 1.0), _check_coefficient("betas[1]", betas[1], 0.0, 1.0))
        self.eps = _check_coefficient("eps", eps)
        self.weight_decay = _check_coefficient("weight_decay", weight_decay)

    def __repr__(self) -> str:
        return f"AdamW(lr={self.lr!r}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay})"

    def init(self, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The state before the first step: first and second moments per parameter."""
        return [torch.zeros_like(p) for p in params] + [torch.zeros_like(p) for p in params]

    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: Sequence[torch.Tensor],
             step: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """(new parameters, new state) after step `step` (counted from 0); differentiable."""
        lr = _lr_at(self.lr, step)
        beta1, beta2 = self.betas
        n = len(params)
        t = step + 1
        bias1 = 1 - beta1**t
        bias2_sqrt = (1 - beta2**t) ** 0.5
        new_params, firsts, seconds = [], [], []
        for p, g, m, v in zip(params, grads, state[:n], state[n:]):
            p = p * (1 - lr * self.weight_decay)
            m = m + (1 - beta1) * (g - m)  # torch's lerp(m, g, 1 - beta1) for weights below 0.5
            v = v * beta2 + (1 - beta2) * g * g
            denom = _safe_sqrt(v) / bias2_sqrt + self.eps
            new_params.append(p - (lr / bias1) * m / denom)
            firsts.append(m)
            seconds.append(v)
        return new_params, firsts + seconds


_OPTIMIZERS = (SGD, AdamW)


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
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        with torch.no_grad():
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
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
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]
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
        grads = torch.autograd.grad([o for o, _ in pairs], inputs, grad_outputs=[a for _, a in pairs], allow_unused=True)
        grads = [torch.zeros_like(i) if g is None else g.detach() for i, g in zip(inputs, grads)]
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
    from .data import SeededDataLoader

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
            grads = torch.autograd.grad(value.reshape(()), inputs, allow_unused=True)
    finally:
        model.train()
    grads = [torch.zeros_like(i) if g is None else g.detach() for i, g in zip(inputs, grads)]
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
