"""Where a step is not deterministic: run it several times from one state and name the first module
(in execution order) whose output or gradient differs.

PyTorch's ``use_deterministic_algorithms`` reports only the ops that declare themselves
nondeterministic; this compares what actually ran, bit for bit.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["checksum", "find_nondeterminism"]

Fingerprint = Tuple[str, Tuple[int, ...], int, int]


def checksum(tensor: torch.Tensor) -> Fingerprint:
    """An exact fingerprint of a tensor's raw bits, computed on its device without copying it to
    the host: (dtype, shape, sum of its 32-bit words, sum of the words weighted by position), both
    sums in int64 with wrap-around. Integer sums do not depend on the order of addition, so the
    fingerprint is itself deterministic; any single changed bit changes the first sum, a swap of
    two words the second.

    >>> a = torch.tensor([1.0, 2.0])
    >>> checksum(a) == checksum(a.clone()), checksum(a) == checksum(torch.tensor([2.0, 1.0]))
    (True, False)
    """
    t = tensor.detach()
    head = (str(t.dtype), tuple(t.shape))
    if t.numel() == 0:
        return (*head, 0, 0)  # type: ignore[return-value]
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    words = raw.view(torch.int32).to(torch.int64)
    weights = torch.arange(1, 2 * words.numel(), 2, device=words.device, dtype=torch.int64)
    return (*head, int(words.sum()), int((words * weights).sum()))  # type: ignore[return-value]


def _tensors(value: Any) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _capture(model: torch.nn.Module) -> Dict[str, Any]:
    state = {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()},
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(model: torch.nn.Module, state: Dict[str, Any]) -> None:
    with torch.no_grad():
        current = model.state_dict()
        for k, v in state["weights"].items():
            current[k].copy_(v)
    for n, p in model.named_parameters():
        g = state["grads"][n]
        p.grad = None if g is None else g.clone()
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _record(model: torch.nn.Module, step_fn: Callable[[], Any]) -> Tuple[List[Tuple[str, str, Any]], List[str]]:
    """One run of `step_fn` with every module's outputs and output gradients fingerprinted."""
    records: List[Tuple[str, str, Any]] = []
    handles = []

    def forward_hook(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            tensors = _tensors(output)
            records.append((name, "forward", [checksum(t) for t in tensors]))
            for t in tensors:
                if t.requires_grad:
                    t.register_hook(lambda g, n=name: records.append((n, "backward", [checksum(g)])))

        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(forward_hook(name or "(model)")))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step_fn()
    finally:
        for h in handles:
            h.remove()
    for name, p in model.named_parameters():
        records.append((name, "grad", None if p.grad is None else [checksum(p.grad)]))
    alerts = [str(w.message) for w in caught if "deterministic" in str(w.message)]
    return records, alerts


def find_nondeterminism(model: torch.nn.Module, step_fn: Callable[[], Any], *, runs: int = 2) -> Optional[Dict[str, Any]]:
    """Run `step_fn()` (a forward and backward pass of `model`, as you train it) `runs` times from
    one captured state (weights, buffers, gradients, and the python, numpy, torch and CUDA random
    states), fingerprinting every module's outputs and their gradients, and each parameter's
    gradient at the end. Returns None when every run agrees bit for bit, else the first difference
    in execution order: ``{"module", "kind" ("forward", "backward" or "grad"), "position", "run",
    "violations"}``, the last the messages torch gave for ops without a deterministic kernel (under
    ``use_deterministic_algorithms(True, warn_only=True)``). The captured state is restored after.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(step_fn):
        raise TypeError(f"`step_fn` must be callable (a forward and backward pass), got {type(step_fn).__name__}.")
    if type(runs) is not int or runs < 2:
        raise ValueError(f"`runs` must be an int >= 2 (differences need two runs to show), got {runs!r}.")
    state = _capture(model)
    try:
        first: Optional[List[Tuple[str, str, Any]]] = None
        alerts: List[str] = []
        for run in range(runs):
            _restore(model, state)
            records, found = _record(model, step_fn)
            alerts += [a for a in found if a not in alerts]
            if first is None:
                first = records
                continue
            for position, (a, b) in enumerate(zip(first, records)):
                if a != b:
                    return {"module": b[0], "kind": b[1], "position": position, "run": run, "violations": alerts}
            if len(first) != len(records):
                position = min(len(first), len(records))
                where = (first + records)[position] if position < len(first) else records[position]
                return {"module": where[0], "kind": "structure", "position": position, "run": run, "violations": alerts}
        return None
    finally:
        _restore(model, state)
