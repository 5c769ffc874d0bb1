"""Where a step is not deterministic: run it several times from one state and name the first module
(in execution order) whose output or gradient differs.

PyTorch's ``use_deterministic_algorithms`` reports only the ops that declare themselves
nondeterministic; this compares what actually ran, bit for bit.
"""

from __future__ import annotations

import copy
import random
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import rng
from .errors import SeedregWarning, user_stacklevel
from .wordsums import checksum, checksums

__all__ = ["checksum", "checksums", "find_nondeterminism"]

def tensors_in(value: Any) -> List[torch.Tensor]:
    """Every tensor in `value` (a tensor, or lists, tuples and dicts of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def _capture(model: torch.nn.Module, optimizers: Sequence[Any]) -> Dict[str, Any]:
    """Everything a training step may change that can be put back: parameters and every buffer
    (persistent or not) as tensors, gradients, the optimizers' states, the global generators and
    every generator a session handed out."""
    state = {
        "params": [(p, p.detach().clone()) for p in model.parameters()],
        "buffers": [(m, name, b.detach().clone()) for m in model.modules() for name, b in m.named_buffers(recurse=False)],
        "grads": [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()],
        "optimizers": [copy.deepcopy(opt.state_dict()) for opt in optimizers],
        "generators": [(g, g.get_state()) for g in rng.issued_generators()],
        "attributes": _attributes(model),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(model: torch.nn.Module, optimizers: Sequence[Any], state: Dict[str, Any]) -> None:
    with torch.no_grad():
        for p, value in state["params"]:
            p.copy_(value)
        for module, name, value in state["buffers"]:
            current = getattr(module, name, None)
            if not isinstance(current, torch.Tensor) or current.shape != value.shape or current.dtype != value.dtype:
                setattr(module, name, value.clone())  # a buffer the step replaced (or set to None)
            else:
                current.copy_(value)
    for p, g in state["grads"]:
        p.grad = None if g is None else g.clone()
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(copy.deepcopy(opt_state))
    for g, g_state in state["generators"]:
        g.set_state(g_state)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _unrestored(model: torch.nn.Module, before: Dict[str, Any], optimizers: Sequence[Any]) -> List[str]:
    """What a run of the step changed that find_nondeterminism cannot put back: the model's
    weights moved (an optimizer stepped) while no optimizer was given, or a module's plain
    attribute (a counter, a flag) changed."""
    found = []
    if not optimizers and any(not torch.equal(p.detach(), v) for p, v in before["params"]):
        found.append("the model's parameters changed (an optimizer stepped) but no optimizer was given: its state "
                     "(momentum, Adam's step count) moved on each run; pass optimizers=[optimizer]")
    now = _attributes(model)
    for (name, key), old in before["attributes"].items():
        if now.get((name, key), old) != old:
            found.append(f"{name or '(model)'}.{key} changed from {old!r:.40} to {now[(name, key)]!r:.40}")
    return found


def _attributes(model: torch.nn.Module) -> Dict[Tuple[str, str], Any]:
    """The modules' plain public attributes (bool, int, float, str), by (module name, attribute)."""
    return {(name, key): value for name, module in model.named_modules() for key, value in vars(module).items()
            if not key.startswith("_") and isinstance(value, (bool, int, float, str))}


def _record(model: torch.nn.Module, step_fn: Callable[[], Any]) -> Tuple[List[Tuple[str, str, Any]], List[str]]:
    """One run of `step_fn` with every module's inputs, outputs and output gradients fingerprinted."""
    records: List[Tuple[str, str, Any]] = []
    handles = []

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
            records.append((name, "input", [checksum(t) for t in tensors_in((args, kwargs))]))

        return hook

    def forward_hook(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            tensors = tensors_in(output)
            records.append((name, "forward", [checksum(t) for t in tensors]))
            for t in tensors:
                if t.requires_grad:
                    t.register_hook(lambda g, n=name: records.append((n, "backward", [checksum(g)])))

        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre_hook(name or "(model)"), with_kwargs=True))
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


def find_nondeterminism(model: torch.nn.Module, step_fn: Callable[[], Any], *, runs: int = 2,
                        optimizers: Sequence[Any] = ()) -> Optional[Dict[str, Any]]:
    """Run `step_fn()` (a forward and backward pass of `model`, as you train it; it may step
    `optimizers`) `runs` times from one captured state, fingerprinting every module's inputs,
    outputs and output gradients, and each parameter's gradient at the end.

    The state captured before the first run and put back before each run and after the last:
    the parameters, every buffer (persistent or not), the gradients, the state of each of
    `optimizers`, python's, numpy's, torch's and CUDA's global generators, and every generator a
    seedreg session handed out (``session.generator``) that is still alive. A change it cannot put
    back (weights stepped by an optimizer not in `optimizers`, a module's plain attribute) is
    warned about once, naming it.

    Returns None when every run agrees bit for bit, else the first difference in execution order:
    ``{"module", "kind", "position", "run", "violations"}``. `kind` is ``"input"`` when what a
    module received already differed (the data, not the module, is the cause: the model's own
    input, or code of its parent between submodules), ``"forward"`` (its output), ``"backward"``
    (the gradient of its output), ``"grad"`` (a parameter's gradient) or ``"structure"``;
    `violations` are the messages torch gave for ops without a deterministic kernel (under
    ``use_deterministic_algorithms(True, warn_only=True)``).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(step_fn):
        raise TypeError(f"`step_fn` must be callable (a forward and backward pass), got {type(step_fn).__name__}.")
    if type(runs) is not int or runs < 2:
        raise ValueError(f"`runs` must be an int >= 2 (differences need two runs to show), got {runs!r}.")
    optimizers = [optimizers] if hasattr(optimizers, "state_dict") else list(optimizers)
    for i, opt in enumerate(optimizers):
        if not (hasattr(opt, "state_dict") and hasattr(opt, "load_state_dict")):
            raise TypeError(f"`optimizers[{i}]` ({type(opt).__name__}) has no state_dict/load_state_dict; pass torch.optim "
                            f"optimizers (their state is put back before each run).")
    state = _capture(model, optimizers)
    unrestored: List[str] = []
    try:
        first: Optional[List[Tuple[str, str, Any]]] = None
        alerts: List[str] = []
        for run in range(runs):
            _restore(model, optimizers, state)
            records, found = _record(model, step_fn)
            unrestored += [u for u in _unrestored(model, state, optimizers) if u not in unrestored]
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
        _restore(model, optimizers, state)
        if unrestored:
            warnings.warn("find_nondeterminism could not put back what step_fn changed, so the runs may not have started "
                          "alike: " + "; ".join(unrestored) + ".", SeedregWarning, stacklevel=user_stacklevel())
