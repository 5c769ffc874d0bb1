"""Where a step is not deterministic: run it several times from one state and name the first module
(in execution order) whose output or gradient differs.

PyTorch's ``use_deterministic_algorithms`` reports only the ops that declare themselves
nondeterministic; this compares what actually ran, bit for bit.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["checksum", "checksums", "find_nondeterminism"]

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
        return (*head, 0, 0)
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    words = raw.view(torch.int32).to(torch.int64)
    weights = torch.arange(1, 2 * words.numel(), 2, device=words.device, dtype=torch.int64)
    return (*head, int(words.sum()), int((words * weights).sum()))


_PLANS: Dict[Tuple[Tuple[torch.dtype, int, torch.device], ...], "_Plan"] = {}
_SMALL = 1 << 16  # tensors of fewer 32-bit words are fingerprinted together, with prefix sums
_CHUNK = 1 << 22  # words per pass over a large tensor: bounds the int64 scratch buffer (32 MiB)
_SCRATCH: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}


def checksums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The two sums of :func:`checksum` for each of `tensors`, as an int64 tensor of shape
    ``(len(tensors), 2)`` on the first tensor's device, without a host copy and with a bounded
    scratch buffer: small tensors together (one concatenation, two prefix sums), large ones a
    chunk at a time. A step trace fingerprints every parameter and gradient of a model this way.

    >>> a, b = torch.tensor([1.0, 2.0]), torch.arange(3, dtype=torch.int16)
    >>> [tuple(row) for row in checksums([a, b]).tolist()] == [checksum(a)[2:], checksum(b)[2:]]
    True
    """
    if not tensors:
        return torch.zeros(0, 2, dtype=torch.int64)
    signature = tuple([(t.dtype, t.numel(), t.device) for t in tensors])
    plan = _PLANS.get(signature)
    if plan is None:
        if len(_PLANS) >= 16:
            _PLANS.pop(next(iter(_PLANS)))
        plan = _PLANS[signature] = _Plan(signature)
    return plan(tensors)


def _words(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as 32-bit words (zero-padded to a whole word)."""
    raw = t.detach().reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    return raw.view(torch.int32)


def _scratch(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """An int64 buffer of _CHUNK words and the odd weights 1, 3, 5, ... for `device`, made once."""
    if device not in _SCRATCH:
        _SCRATCH[device] = (torch.empty(_CHUNK, dtype=torch.int64, device=device),
                            torch.arange(1, 2 * _CHUNK, 2, dtype=torch.int64, device=device))
    return _SCRATCH[device]


def _large_sums(t: torch.Tensor) -> torch.Tensor:
    """(plain, weighted) of one large tensor, a chunk at a time through the scratch buffer."""
    words = _words(t)
    buffer, weights = _scratch(words.device)
    plain: Optional[torch.Tensor] = None
    weighted: Optional[torch.Tensor] = None
    for start in range(0, words.numel(), _CHUNK):
        chunk = words[start : start + _CHUNK]
        n = chunk.numel()
        wide = buffer[:n].copy_(chunk)
        s = wide.sum()
        w = torch.dot(wide, weights[:n]) if wide.device.type == "cpu" else wide.mul_(weights[:n]).sum()
        # word `start + j` weighs 2(start + j) + 1 = (2j + 1) + 2 * start
        w = w + 2 * start * s
        plain, weighted = (s, w) if plain is None or weighted is None else (plain + s, weighted + w)
    assert plain is not None and weighted is not None  # a large tensor has at least one chunk
    return torch.stack([plain, weighted]).reshape(1, 2)


def _numpy_segments(words: np.ndarray, index: Tuple[np.ndarray, ...]) -> np.ndarray:
    """The batch path of :class:`_Plan` in numpy (CPU tensors): prefix sums of the words and of the
    weighted words, differenced at each tensor's bounds, in buffers made once per plan (fresh
    ones cost page faults after a training step has returned its memory). int64 arithmetic wraps
    as torch's does."""
    ends, shift, weights, wide, prefix = index
    n = len(shift)
    np.copyto(wide, words, casting="safe")
    plain = np.cumsum(wide, out=prefix)[ends]
    weighted = np.cumsum(np.multiply(wide, weights, out=wide), out=prefix)[ends]
    out = np.empty((n, 2), dtype=np.int64)
    np.subtract(plain[:n], plain[n:], out=out[:, 0])
    np.subtract(weighted[:n], weighted[n:], out=out[:, 1])
    out[:, 1] -= shift * out[:, 0]
    return out


class _Plan:
    """How to fingerprint tensors of one signature (dtype, size, device of each): which go
    together, where each one's words start, and the index tensors, made once."""

    def __init__(self, signature: Tuple[Tuple[torch.dtype, int, torch.device], ...]) -> None:
        self.out_device = signature[0][2]
        self.parts: List[Tuple[str, Any]] = []  # ("batch", (members, index tensors)) or ("large", i)
        order: List[int] = []
        words = [-(-numel * dtype.itemsize // 4) for dtype, numel, _ in signature]
        batches: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
        for i, (dtype, numel, device) in enumerate(signature):
            # on a GPU every launch costs more than the arithmetic: batch all but the largest
            if words[i] >= (_SMALL if device.type == "cpu" else _CHUNK) or numel * dtype.itemsize % 4:
                self.parts.append(("large", i))
                order.append(i)
                continue
            members = batches.setdefault((device, dtype), [])
            if sum(words[j] for j in members) + words[i] > _CHUNK:
                self._add_batch(members, words, signature, order)
                members = batches[(device, dtype)] = []
            members.append(i)
        for members in batches.values():
            if members:
                self._add_batch(members, words, signature, order)
        self.inverse = None if order == list(range(len(order))) else torch.argsort(torch.tensor(order)).to(self.out_device)

    def _add_batch(self, members: List[int], words: List[int], signature: Any, order: List[int]) -> None:
        dtype, _, device = signature[members[0]]
        lead = torch.zeros(max(1, 4 // dtype.itemsize), dtype=dtype, device=device)  # a zero word first
        lead_words = lead.numel() * dtype.itemsize // 4
        sizes = torch.tensor([words[i] for i in members], dtype=torch.int64)
        starts = lead_words + torch.cumsum(sizes, 0) - sizes
        ends = starts + sizes
        index = {
            "ends": torch.cat([ends - 1, starts - 1]).to(device),
            "shift": (2 * starts).to(device),
            "weights": torch.arange(1, 2 * int(ends[-1]), 2, dtype=torch.int64, device=device),
            "lead": lead,
        }
        if device.type == "cpu":
            total = len(index["weights"])
            index["numpy"] = (*(index[k].numpy() for k in ("ends", "shift", "weights")),
                              np.empty(total, dtype=np.int64), np.empty(total, dtype=np.int64))
        self.parts.append(("batch", (list(members), index)))
        order.extend(members)

    def __call__(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        results = []
        with torch.no_grad():
            for kind, what in self.parts:
                if kind == "large":
                    results.append(_large_sums(tensors[what]).to(self.out_device))
                    continue
                members, index = what
                words = torch._C._nn.flatten_dense_tensors([index["lead"]] + [tensors[i] for i in members]).view(torch.int32)
                if words.device.type == "cpu":  # numpy: the same sums, a third of torch's cost per call on small arrays
                    results.append(torch.from_numpy(_numpy_segments(words.numpy(), index["numpy"])).to(self.out_device))
                    continue
                wide = words.to(torch.int64)
                n = len(members)
                plain = torch.cumsum(wide, 0).index_select(0, index["ends"])
                seg_plain = plain[:n] - plain[n:]
                weighted = torch.cumsum(wide.mul_(index["weights"]), 0).index_select(0, index["ends"])
                # word j of a tensor starting at s has the global weight 2(s + j) + 1; checksum weighs it 2j + 1
                seg_weighted = weighted[:n] - weighted[n:] - index["shift"] * seg_plain
                results.append(torch.stack([seg_plain, seg_weighted], 1).to(self.out_device))
            sums = torch.cat(results) if len(results) > 1 else results[0]
            return sums if self.inverse is None else sums.index_select(0, self.inverse)


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
