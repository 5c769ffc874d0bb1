"""The optimizers :func:`~seedreg.magic.metagradient` trains and differentiates with, behind one
interface: which parameters train, the state a step carries (as a list of tensor slots, ``None``
where torch keeps none yet), the step as training takes it (in place), and the same step as a
differentiable function of (parameters, gradients, slots).

- :class:`TorchSteps` reads a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` instance whole: every
  param group with its own hyperparameters, read from the groups at each step (so a scheduler's
  changes to lr, momentum or betas are followed), and its state if it has stepped before.
  Training calls the optimizer's own ``step()``: the trained model is the plain loop's.
- :class:`FunctionalSteps` wraps seedreg's functional ``magic.SGD``/``Adam``/``AdamW``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import SeedregError
from .optimizers import OPTIMIZERS, safe_sqrt

__all__ = ["FunctionalSteps", "TorchSteps", "clip", "make_steps"]

Slots = List[Optional[torch.Tensor]]
_TORCH = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_KNOWN = {
    "sgd": {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "differentiable", "fused"},
    "adam": {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
             "decoupled_weight_decay"},
}


def clip(grads: Sequence[Optional[torch.Tensor]], max_norm: float) -> List[Optional[torch.Tensor]]:
    """``torch.nn.utils.clip_grad_norm_`` as a differentiable function: the 2-norm over all
    gradients, each scaled by ``min(1, max_norm / (norm + 1e-6))``."""
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2) for g in present]), 2)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return [None if g is None else g * coef for g in grads]


class TorchSteps:
    """A torch.optim SGD, Adam or AdamW optimizer, read whole (see the module's docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
        if type(optimizer) not in _TORCH:
            raise TypeError(f"`optimizer` is a {type(optimizer).__name__}; metagradient differentiates torch.optim.SGD, Adam "
                            f"and AdamW (and magic.SGD, magic.Adam, magic.AdamW). Use one of those.")
        self.optimizer = optimizer
        self.kind = "sgd" if type(optimizer) is torch.optim.SGD else "adam"
        owned = {id(p) for p in model.parameters()}
        self.params: List[torch.Tensor] = []
        self.group_of: List[int] = []
        for g, group in enumerate(optimizer.param_groups):
            unknown = sorted(set(group) - _KNOWN[self.kind] - {"params", "initial_lr", "max_lr", "min_lr", "base_momentum",
                                                                "max_momentum"})
            if unknown:
                raise SeedregError(f"`optimizer.param_groups[{g}]` has the option(s) {unknown}, which metagradient does not "
                                   f"differentiate; remove them, or train with a plain loop.")
            if group.get("differentiable"):
                raise SeedregError(f"`optimizer.param_groups[{g}]` has differentiable=True; metagradient differentiates the "
                                   f"step itself: build the optimizer without it.")
            for p in group["params"]:
                if id(p) not in owned:
                    raise SeedregError(f"`optimizer.param_groups[{g}]` holds a tensor of shape {tuple(p.shape)} that is not a "
                                       f"parameter of `model`; build the optimizer on model.parameters().")
                if p.requires_grad:
                    self.params.append(p)
                    self.group_of.append(g)

    # -- training --------------------------------------------------------------------------------

    def take(self, step: int) -> None:
        """The optimizer step of a plain loop (``.grad`` as backward left it)."""
        self.optimizer.step()

    def checkpointed(self) -> Tuple[Any, List[Any]]:
        """(optimizer, extra) for StepCheckpoints."""
        return self.optimizer, []

    # -- the step as a function --------------------------------------------------------------------

    def slots(self) -> Slots:
        """The state before the next step: SGD's momentum buffers; Adam's first, second (and
        AMSGrad's maximum) moments; None where torch keeps none yet."""
        state = self.optimizer.state
        if self.kind == "sgd":
            return [state.get(p, {}).get("momentum_buffer") for p in self.params]
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return [state.get(p, {}).get(k) for k in keys for p in self.params]

    def _steps_done(self) -> List[float]:
        state = self.optimizer.state
        out = []
        for p in self.params:
            s = state.get(p, {}).get("step")
            out.append(0.0 if s is None else float(s))
        return out

    def functional(self, params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], slots: Slots,
                   step: int) -> Tuple[List[torch.Tensor], Slots]:
        """The optimizer's step from the state it stands in now, as a function of `params`,
        `grads` (None: the parameter has no gradient and is skipped, as torch skips it) and `slots`."""
        groups = [self.optimizer.param_groups[g] for g in self.group_of]
        if self.kind == "sgd":
            return self._sgd(params, grads, slots, groups)
        return self._adam(params, grads, slots, groups)

    @staticmethod
    def _sgd(params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], slots: Slots,
             groups: Sequence[Dict[str, Any]]) -> Tuple[List[torch.Tensor], Slots]:
        new_params: List[torch.Tensor] = []
        new_slots: Slots = []
        for p, g, buf, h in zip(params, grads, slots, groups):
            if g is None:
                new_params.append(p)
                new_slots.append(buf)
                continue
            g = -g if h["maximize"] else g
            if h["weight_decay"] != 0:
                g = torch.add(g, p, alpha=float(h["weight_decay"]))
            momentum, dampening = float(h["momentum"]), float(h["dampening"])
            if momentum != 0:  # (fused multiply-adds: fewer graph nodes for the reverse pass to walk)
                if buf is None:
                    buf = g
                elif dampening == 0:
                    buf = torch.add(g, buf, alpha=momentum)
                else:
                    buf = torch.add(buf * momentum, g, alpha=1 - dampening)
                g = torch.add(g, buf, alpha=momentum) if h["nesterov"] else buf
            new_slots.append(buf)
            new_params.append(torch.add(p, g, alpha=-float(h["lr"])))
        return new_params, new_slots

    def _adam(self, params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], slots: Slots,
              groups: Sequence[Dict[str, Any]]) -> Tuple[List[torch.Tensor], Slots]:
        """Adam/AdamW for all parameters at once: one flat vector each of parameters, gradients and
        moments (per dtype and device), with per-element hyperparameters, split back at the end:
        some twenty graph nodes for the reverse pass to walk instead of ten a parameter."""
        n = len(params)
        firsts, seconds, maxima = list(slots[:n]), list(slots[n : 2 * n]), list(slots[2 * n :])
        new_params = list(params)
        done = self._steps_done()
        adamw = type(self.optimizer) is torch.optim.AdamW
        kinds: Dict[Any, List[int]] = {}  # the parameters with a gradient (torch skips the others), by dtype and device
        for i in range(n):
            if grads[i] is not None:
                kinds.setdefault((params[i].dtype, params[i].device), []).append(i)
        for active in kinds.values():
            like = params[active[0]]
            sizes = [params[i].numel() for i in active]
            counts = torch.tensor(sizes, device=like.device)

            def per_element(values: Sequence[float]) -> Any:
                """A float when every parameter has the same value, else one value per element."""
                if all(v == values[0] for v in values):
                    return float(values[0])
                return torch.tensor(values, dtype=like.dtype, device=like.device).repeat_interleave(counts)

            def flat(tensors: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
                """One vector of `tensors` (zeros where torch keeps no state yet), or None if none is kept."""
                if all(t is None for t in tensors):
                    return None
                return torch.cat([(torch.zeros_like(params[i]) if t is None else t).reshape(-1) for i, t in zip(active, tensors)])

            hs = [groups[i] for i in active]
            lr = [float(h["lr"]) for h in hs]
            beta1, beta2 = [float(h["betas"][0]) for h in hs], [float(h["betas"][1]) for h in hs]
            wd = [float(h["weight_decay"]) for h in hs]
            decoupled = [bool(h.get("decoupled_weight_decay", adamw)) for h in hs]
            t = [done[i] + 1 for i in active]
            p0 = flat([params[i] for i in active])
            g = flat([grads[i] for i in active])
            assert p0 is not None and g is not None
            if any(h["maximize"] for h in hs):
                g = g * per_element([-1.0 if h["maximize"] else 1.0 for h in hs])
            l2 = [0.0 if d else w for d, w in zip(decoupled, wd)]
            if any(l2):
                g = g + per_element(l2) * p0
            decay = [1 - r * w if d else 1.0 for r, w, d in zip(lr, wd, decoupled)]
            p = p0 * per_element(decay) if any(f != 1.0 for f in decay) else p0
            m0, v0 = flat([firsts[i] for i in active]), flat([seconds[i] for i in active])
            b1, b2 = per_element(beta1), per_element(beta2)
            m = g * (1 - b1) if m0 is None else torch.lerp(m0, g, 1 - b1)
            v = g * g * (1 - b2) if v0 is None else v0 * b2 + (1 - b2) * g * g
            second = v
            ams = [bool(h["amsgrad"]) for h in hs]
            if any(ams):  # the running maximum of v (from zeros), where the group asks for it
                tops = flat([maxima[i] for i in active])
                top = torch.maximum(torch.zeros_like(v) if tops is None else tops, v)
                second = top if all(ams) else torch.where(per_element([float(a) for a in ams]) > 0, top, v)
            denom = safe_sqrt(second) / per_element([(1 - b**k) ** 0.5 for b, k in zip(beta2, t)]) + per_element(
                [float(h["eps"]) for h in hs])
            new_p = p - per_element([r / (1 - b**k) for r, b, k in zip(lr, beta1, t)]) * m / denom
            for i, a, b, c, e in zip(active, new_p.split(sizes), m.split(sizes), v.split(sizes), second.split(sizes)):
                shape = params[i].shape
                new_params[i], firsts[i], seconds[i] = a.view(shape), b.view(shape), c.view(shape)
                if groups[i]["amsgrad"]:
                    maxima[i] = e.view(shape)
        return new_params, firsts + seconds + maxima

class FunctionalSteps:
    """seedreg's functional ``magic.SGD``/``Adam``/``AdamW``: every trainable parameter of the model,
    one set of hyperparameters, the state held here."""

    def __init__(self, optimizer: Any, model: torch.nn.Module) -> None:
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.state: List[torch.Tensor] = optimizer.init([p.detach() for p in self.params])

    def take(self, step: int) -> None:
        with torch.no_grad():
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
            new_params, new_state = self.optimizer.step([p.detach() for p in self.params], grads, self.state, step)
            for p, new in zip(self.params, new_params):
                p.copy_(new)
        self.state = list(new_state)

    def get_state(self) -> List[torch.Tensor]:
        return [s.detach().clone() for s in self.state]

    def set_state(self, state: List[torch.Tensor]) -> None:
        device = self.params[0].device  # a state kept on the host comes back to the parameters' device
        self.state = [s.detach().to(device, copy=True) for s in state]

    def checkpointed(self) -> Tuple[Any, List[Any]]:
        return None, [(self.get_state, self.set_state)]

    def slots(self) -> Slots:
        return list(self.state)

    def functional(self, params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], slots: Slots,
                   step: int) -> Tuple[List[torch.Tensor], Slots]:
        full = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        new_params, new_state = self.optimizer.step(list(params), full, slots, step)
        return list(new_params), list(new_state)


def make_steps(optimizer: Any, model: torch.nn.Module) -> Any:
    """The steps of `optimizer` on `model`, or a TypeError naming what is accepted."""
    if isinstance(optimizer, OPTIMIZERS):
        return FunctionalSteps(optimizer, model)
    if isinstance(optimizer, torch.optim.Optimizer):
        return TorchSteps(optimizer, model)
    raise TypeError(
        f"`optimizer` must be a torch.optim.SGD, Adam or AdamW built on the model's parameters, or one of seedreg.magic's "
        f"functional steps (magic.SGD, magic.Adam, magic.AdamW), got {type(optimizer).__name__}."
    )
