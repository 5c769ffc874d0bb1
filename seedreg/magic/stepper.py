"""One training step of :func:`~seedreg.magic.metagradient`, taken as a plain loop takes it and
again as a differentiable function of the state, and the adjoint pulled back through it.

A *step* here is one loader batch (a micro-batch when gradients accumulate). The state before it
is the trainable parameters, the gradients accumulated so far in the current optimizer step
(``accumulate > 1``), BatchNorm's running statistics and the optimizer's slots; frozen parameters
(``requires_grad=False``, or in no param group) and every other buffer are constants.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.func import functional_call

from ..errors import SeedregError
from .ranks import Ranks
from .steps import clip

__all__ = ["Adjoint", "Stepper", "vjp"]

Losses = Callable[[torch.nn.Module, Any], torch.Tensor]
_LOW = (torch.float16, torch.bfloat16)
_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)  # lazy ones become these on their first forward


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """The composite attention kernel, which is twice differentiable (the fused ones are not)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - every torch seedreg supports has it
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _nonfinite_examples(batch: Any, indices: torch.Tensor) -> List[int]:
    """The dataset indices of the examples whose data holds a NaN or infinity (any floating-point
    tensor of the batch, rows by its first dimension)."""
    rows = torch.zeros(len(indices), dtype=torch.bool)
    stack = [batch]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.dim() >= 1 and value.shape[0] == len(indices):
                rows |= ~torch.isfinite(value.detach()).reshape(len(indices), -1).all(1).cpu()
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return indices[rows].tolist()


class _Call(torch.nn.Module):
    """`fn(model, *args)` as a module, so that ``functional_call`` can swap the model's tensors."""

    def __init__(self, model: torch.nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.model, *args, **kwargs)


class Stepper:
    """The training step of one metagradient run (see the module's docstring)."""

    def __init__(self, model: torch.nn.Module, steps: Any, losses: Losses, weights: torch.Tensor, *, steps_per_epoch: int,
                 accumulate: int, max_grad_norm: Optional[float], scheduler: Any, allow_low_precision: bool) -> None:
        self.model = model
        self.steps = steps
        self.losses = losses
        self.weights = weights
        self.per_epoch = steps_per_epoch
        self.accumulate = accumulate
        self.max_grad_norm = max_grad_norm
        self.scheduler = scheduler
        self.allow_low_precision = allow_low_precision
        self.params: List[torch.Tensor] = steps.params
        named = {id(p): n for n, p in model.named_parameters()}
        self.names = [named[id(p)] for p in self.params]  # in the optimizer's order
        self.norms = [(name, m) for name, m in model.named_modules()
                      if isinstance(m, _BATCH_NORMS) and m.track_running_stats and m.running_mean is not None]
        self.tracked = {f"{p}.{b}" if p else b for p, _ in self.norms for b in ("running_mean", "running_var", "num_batches_tracked")}
        buffers = dict(model.named_buffers())
        self.stat_names = [n for n in buffers if n in self.tracked and buffers[n].is_floating_point()]
        self.checked_precision = False
        self.ranks = Ranks()

    # -- where a loader step stands ----------------------------------------------------------------

    def position(self, step: int) -> Tuple[int, bool, int]:
        """(micro-batch position in its optimizer step, whether it ends that step, the optimizer
        step's number): `accumulate` batches per step, counted within an epoch, the epoch's last
        partial group stepping too."""
        epoch, j = divmod(step, self.per_epoch)
        groups_per_epoch = -(-self.per_epoch // self.accumulate)
        micro = j % self.accumulate
        last = micro == self.accumulate - 1 or j == self.per_epoch - 1
        return micro, last, epoch * groups_per_epoch + j // self.accumulate

    # -- training, as a plain loop ------------------------------------------------------------------

    def _check_precision(self) -> Callable[[], None]:
        """Hooks that refuse a forward running in half precision (autocast inside ``forward``, or a
        cast): the metagradient sums thousands of steps' adjoints, which half precision loses."""
        found: List[str] = []

        def hook(module: torch.nn.Module, args: Any, name: str) -> None:
            for device in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in _LOW:
                    found.append(f"{name or '(model)'} runs under autocast to {torch.get_autocast_dtype(device)}")
            for t in args:
                if isinstance(t, torch.Tensor) and t.dtype in _LOW:
                    found.append(f"{name or '(model)'} receives a {t.dtype} tensor")

        handles = [m.register_forward_pre_hook(functools.partial(hook, name=n)) for n, m in self.model.named_modules()]

        def done() -> None:
            for h in handles:
                h.remove()
            if found and not self.allow_low_precision:
                raise SeedregError(
                    f"the training step runs in low precision ({found[0]}): a metagradient sums thousands of steps' "
                    f"adjoints, which half precision loses (bf16 autocast moved it by 1.6%). Train in float32 or float64, "
                    f"or pass allow_low_precision=True."
                )

        return done

    def _loss(self, per_example: Any, indices: torch.Tensor, weights: torch.Tensor, step: int) -> torch.Tensor:
        if not isinstance(per_example, torch.Tensor) or per_example.shape != (len(indices),):
            got = tuple(per_example.shape) if isinstance(per_example, torch.Tensor) else type(per_example).__name__
            raise SeedregError(
                f"the per-example losses must be a tensor of shape ({len(indices)},) (one per example of the batch), got "
                f"{got}; with `loss=` pass reduction='none' (F.cross_entropy(out, y, reduction='none'))."
            )
        loss = (weights[indices.to(weights.device)] * per_example).mean()
        return loss if self.accumulate == 1 else loss / self.accumulate

    def take(self, step: int, indices: torch.Tensor, batch: Any) -> None:
        """Step `step` as a plain loop takes it: zero the gradients at an optimizer step's first
        micro-batch, backward, then (at its last) clip, the optimizer's step and the scheduler's."""
        micro, last, number = self.position(step)
        if micro == 0:
            for p in self.model.parameters():
                p.grad = None
        done = self._check_precision() if not self.checked_precision else None
        try:
            with torch.enable_grad():
                per_example = self.losses(self.model, batch)
                if done is not None:
                    done()
                    done = None
                    self.checked_precision = True
                loss = self._loss(per_example, indices, self.weights.detach(), step)
                if not self.ranks.all_agree(bool(torch.isfinite(loss))):
                    bad = _nonfinite_examples(batch, indices) or indices[~torch.isfinite(per_example.detach()).cpu()].tolist()
                    where = f" on rank {self.ranks.rank}" if self.ranks.world > 1 else ""
                    raise SeedregError(
                        f"the training loss is not finite at step {step}{where} (dataset indices {bad or indices.tolist()} of "
                        f"that batch): a NaN or infinity in those examples or in the model; the metagradient would be NaN."
                    )
                if self.ranks.world > 1:  # DistributedDataParallel's average, accumulated into .grad
                    raw = torch.autograd.grad(loss, self.params, allow_unused=True)
                    with torch.no_grad():
                        for t, g in zip(self.params, self.ranks.average_(list(raw), self.params)):
                            t.grad = g if t.grad is None else t.grad.add_(g)
                else:
                    loss.backward()
        finally:
            if done is not None:
                done()
        if last:
            self._optimizer_step(number)

    def _optimizer_step(self, number: int) -> None:
        """The end of an optimizer step of a plain loop: clip, the optimizer's step, the scheduler's."""
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.steps.take(number)
        if self.scheduler is not None:
            self.scheduler.step()

    # -- the step as a function ----------------------------------------------------------------------

    def _call(self, params: Dict[str, torch.Tensor], fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any],
              hook: Callable[..., Any], *, pre: bool, live: bool = False) -> Any:
        """`fn(model, *args, **kwargs)` with the model's trainable parameters replaced by `params`,
        copies of its buffers (which BatchNorm updates in place; with `live`, its own buffers), and
        `hook` on each BatchNorm layer."""
        buffers = {n: b if live else b.detach().clone() for n, b in self.model.named_buffers()}
        handles = []
        for prefix, norm in self.norms:
            bound = functools.partial(hook, name=(prefix + ".") if prefix else "", buffers=buffers)
            handles.append(norm.register_forward_pre_hook(bound) if pre else norm.register_forward_hook(bound))
        tensors = {"model." + n: t for n, t in {**buffers, **params}.items()}
        try:
            with _math_attention():
                return functional_call(_Call(self.model, fn), tensors, args, kwargs, strict=False)
        finally:
            for h in handles:
                h.remove()

    def _forward(self, params: Dict[str, torch.Tensor], stats: Dict[str, torch.Tensor], batch: Any, *,
                 live: bool = False) -> Tuple[Any, Dict[str, torch.Tensor]]:
        """The per-example losses in training mode and the BatchNorm running statistics they lead
        to, as differentiable functions of `params` and `stats`."""
        new_stats: Dict[str, torch.Tensor] = {}

        def hook(module: Any, args: Tuple[Any, ...], *, name: str, buffers: Dict[str, torch.Tensor]) -> None:
            inp = args[0]
            dims = [0, *range(2, inp.dim())]
            mean = inp.mean(dims, keepdim=True)
            # the unbiased variance running_var tracks, spelled out: torch's var over several
            # dimensions is several times slower on the CPU (only its derivative is used here)
            var = (inp - mean).square().sum(dims) / max(inp.numel() // inp.shape[1] - 1, 1)
            factor = module.momentum
            if factor is None:  # a cumulative average
                factor = 1.0 / float(buffers[name + "num_batches_tracked"].item() + 1)
            new_stats[name + "running_mean"] = torch.lerp(stats[name + "running_mean"], mean.reshape(-1), factor)
            new_stats[name + "running_var"] = torch.lerp(stats[name + "running_var"], var, factor)

        return self._call(params, self.losses, (batch,), {}, hook, pre=True, live=live), new_stats

    def evaluate(self, params: Dict[str, torch.Tensor], stats: Dict[str, torch.Tensor], args: Tuple[Any, ...],
                 kwargs: Dict[str, Any]) -> Any:
        """The model in eval mode as a differentiable function of `params` and the BatchNorm running
        statistics `stats` (torch's kernel takes no gradient for those: normalised here instead)."""
        def hook(module: Any, inputs: Tuple[Any, ...], output: Any, *, name: str, buffers: Dict[str, torch.Tensor]) -> Any:
            inp = inputs[0]
            shape = [1, inp.shape[1]] + [1] * (inp.dim() - 2)
            mean, var = stats[name + "running_mean"].reshape(shape), stats[name + "running_var"].reshape(shape)
            out = (inp - mean) / torch.sqrt(var + module.eps)
            if module.affine:
                out = out * module.weight.reshape(shape) + module.bias.reshape(shape)
            return out

        return self._call(params, lambda model, *a, **k: model(*a, **k), args, kwargs, hook, pre=False)

    def differentiate(self, step: int, indices: torch.Tensor, batch: Any, *, live: bool = False) -> Tuple[Tuple[Any, ...], Any]:
        """Step `step` from the state it stands in, as a differentiable function of that state and
        the weights: (the record :meth:`Adjoint.pull` takes, the raw gradients). With `live`, the
        model's own buffers take BatchNorm's in-place updates, as in training."""
        micro, last, number = self.position(step)
        params = {n: p.detach().clone().requires_grad_() for n, p in zip(self.names, self.params)}
        plist = list(params.values())
        current = dict(self.model.named_buffers())
        stats = {n: current[n].detach().clone().requires_grad_() for n in self.stat_names}
        # the gradients accumulated earlier in this optimizer step (none at its first micro-batch)
        acc: List[Optional[torch.Tensor]] = [None] * len(plist)
        if micro > 0:
            acc = [None if p.grad is None else p.grad.detach().clone().requires_grad_() for p in self.params]
        slots = [None if s is None else s.detach().clone().requires_grad_() for s in self.steps.slots()]
        with torch.enable_grad():
            per_example, new_stats = self._forward(params, stats, batch, live=live)
            loss = self._loss(per_example, indices, self.weights, step)
            raw = torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True)
            if self.ranks.world > 1:
                raw = tuple(self.ranks.average(raw, plist))
            new_acc = [g if a is None else (a if g is None else a + g) for a, g in zip(acc, raw)]
            if last:
                grads = clip(new_acc, self.max_grad_norm) if self.max_grad_norm is not None else new_acc
                new_params, new_slots = self.steps.functional(plist, grads, slots, number)
            else:
                new_params, new_slots = plist, slots
        record = (new_params, new_acc, [new_stats.get(n, stats[n]) for n in self.stat_names], new_slots,
                  plist, acc, [stats[n] for n in self.stat_names], slots)
        return record, raw

    def pull(self, step: int, indices: torch.Tensor, batch: Any, adjoint: "Adjoint") -> None:
        """Pull `adjoint` back through step `step` (the state before it restored): the step again as
        a differentiable function of the state and the weights, then a vector-Jacobian product."""
        record, _ = self.differentiate(step, indices, batch)
        adjoint.pull(record, self.weights)

    def advance(self, step: int, indices: torch.Tensor, batch: Any) -> Tuple[Any, ...]:
        """Step `step` as :meth:`take` takes it, its gradient computed once with the graph kept:
        the state moves on (the optimizer's own step, the scheduler's), and the step's record is
        returned for a later :meth:`Adjoint.pull` (no recomputation in the reverse pass)."""
        micro, last, number = self.position(step)
        if micro == 0:
            for q in self.model.parameters():
                q.grad = None
        record, raw = self.differentiate(step, indices, batch, live=True)
        with torch.no_grad():
            for p, g in zip(self.params, raw):
                if g is not None:
                    p.grad = g.detach().clone() if p.grad is None else p.grad.add_(g.detach())
        if last:
            self._optimizer_step(number)
        return record


def vjp(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], adjoints: Sequence[torch.Tensor],
        k: int) -> List[Optional[torch.Tensor]]:
    """The vector-Jacobian products of `k` adjoints at once (each adjoint has a leading dimension
    of k): one batched backward pass, or k passes over the one graph where an op has no batching rule."""
    if not outputs:
        return [None] * len(inputs)
    if k == 1:
        raw = torch.autograd.grad(outputs, inputs, grad_outputs=[a[0] for a in adjoints], allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in raw]
    try:
        return list(torch.autograd.grad(outputs, inputs, grad_outputs=list(adjoints), allow_unused=True,
                                        is_grads_batched=True, retain_graph=True))
    except RuntimeError:  # an op without a batching rule: the same products one adjoint at a time
        rows = [torch.autograd.grad(outputs, inputs, grad_outputs=[a[j] for a in adjoints], allow_unused=True,
                                    retain_graph=True) for j in range(k)]
        return [None if all(r[i] is None for r in rows) else
                torch.stack([torch.zeros_like(inputs[i]) if r[i] is None else r[i] for r in rows]) for i in range(len(inputs))]


class Adjoint:
    """The adjoints of the training state for `k` targets at once (parameters, accumulated
    gradients, BatchNorm statistics, optimizer slots; each with a leading dimension of k; None
    where a slot holds no tensor), and the metagradients accumulated so far, ``(k, examples)``."""

    def __init__(self, params: List[torch.Tensor], stats: List[torch.Tensor], weights: torch.Tensor) -> None:
        self.k = params[0].shape[0] if params else stats[0].shape[0]
        self.params: List[Optional[torch.Tensor]] = list(params)
        self.acc: List[Optional[torch.Tensor]] = [None] * len(params)
        self.stats: List[Optional[torch.Tensor]] = list(stats)
        self.slots: List[Optional[torch.Tensor]] = []
        self.grad = torch.zeros((self.k, *weights.shape), dtype=weights.dtype, device=weights.device)

    def pull(self, record: Tuple[Any, ...], weights: torch.Tensor) -> None:
        """Pull the adjoints back through one step's `record` (from :meth:`Stepper.differentiate`):
        its outputs (new parameters, accumulated gradients, statistics, slots) and inputs."""
        new_params, new_acc, new_stats, new_slots, params, acc, stats, slots = record
        slots_adjoint = self.slots + [None] * (len(new_slots) - len(self.slots))
        outputs = [*new_params, *new_acc, *new_stats, *new_slots]
        adjoints = [*self.params, *self.acc, *self.stats, *slots_adjoint]
        pairs = [(o, a) for o, a in zip(outputs, adjoints) if o is not None and a is not None and o.requires_grad]
        groups: List[List[Optional[torch.Tensor]]] = [list(params), list(acc), list(stats), list(slots)]
        inputs = [t for g in groups for t in g if t is not None] + [weights]
        raw = vjp([o for o, _ in pairs], inputs, [a for _, a in pairs], self.k)
        found = iter([None if g is None else g.detach() for g in raw])
        out: List[List[Optional[torch.Tensor]]] = []
        for group in groups:
            row: List[Optional[torch.Tensor]] = []
            for t in group:
                if t is None:
                    row.append(None)
                    continue
                a = next(found)
                # no gradient: a zero adjoint
                row.append(torch.zeros((self.k, *t.shape), dtype=t.dtype, device=t.device) if a is None else a)
            out.append(row)
        self.params, self.acc, self.stats, self.slots = out
        last = next(found)
        if last is not None:
            self.grad += last
