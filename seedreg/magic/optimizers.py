"""The functional, differentiable optimizer steps :func:`~seedreg.magic.metagradient` trains and
differentiates with: the forward math of torch.optim's SGD and AdamW, with finite metagradients
where a gradient or a second moment is exactly zero."""

from __future__ import annotations

import math
from typing import Any, Callable, List, Sequence, Tuple, Union

import torch

__all__ = ["Adam", "AdamW", "SGD", "LR"]

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


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with the same values, and derivative 0 (not infinity) where x is exactly 0."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


class AdamW:
    """torch.optim.AdamW as a differentiable function of (parameters, gradients, state).

    The same math as ``torch.optim.AdamW(params, lr, betas, eps, weight_decay)`` (decoupled weight
    decay, bias correction). The square root of the second moment has derivative 0 where the
    moment is exactly 0, so a parameter whose gradient is always zero gives finite (zero)
    metagradients instead of NaN.
    """

    decoupled = True

    def __init__(self, lr: LR, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        self.lr = _check_lr(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"`betas` must be a pair (beta1, beta2), got {betas!r}.")
        self.betas = (_check_coefficient("betas[0]", betas[0], 0.0, 1.0), _check_coefficient("betas[1]", betas[1], 0.0, 1.0))
        self.eps = _check_coefficient("eps", eps)
        self.weight_decay = _check_coefficient("weight_decay", weight_decay)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lr={self.lr!r}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay})"

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
            if self.weight_decay and self.decoupled:
                p = p * (1 - lr * self.weight_decay)
            elif self.weight_decay:
                g = g + self.weight_decay * p
            m = m + (1 - beta1) * (g - m)  # torch's lerp(m, g, 1 - beta1) for weights below 0.5
            v = v * beta2 + (1 - beta2) * g * g
            denom = safe_sqrt(v) / bias2_sqrt + self.eps
            new_params.append(p - (lr / bias1) * m / denom)
            firsts.append(m)
            seconds.append(v)
        return new_params, firsts + seconds


class Adam(AdamW):
    """torch.optim.Adam as a differentiable function of (parameters, gradients, state): as
    :class:`AdamW`, with L2 weight decay added to the gradient (torch.optim.Adam's, default 0)
    instead of decoupled decay."""

    decoupled = False

    def __init__(self, lr: LR, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(lr, betas, eps, weight_decay)


OPTIMIZERS = (SGD, AdamW, Adam)
