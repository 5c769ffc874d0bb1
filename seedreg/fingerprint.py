"""SHA-256 fingerprints of tensors and arrays: how a manifest tells whether two models started (or
ended) alike, and how a run's results are recorded and compared."""

from __future__ import annotations

import hashlib
import math
import numbers
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Dict, Iterable, Tuple, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

# torch is imported only by functions handed torch objects: `seedreg study audit` fingerprints
# numpy rows without loading torch.

__all__ = ["fingerprint", "result_entry"]


def _torch() -> Any:
    """torch if this process has imported it (a torch object can only exist then), else None."""
    return sys.modules.get("torch")


def _items(obj: Union["torch.nn.Module", Mapping[str, Any]]) -> Iterable[Tuple[str, Any]]:
    torch = _torch()
    if torch is not None and isinstance(obj, torch.nn.Module):
        return obj.state_dict(keep_vars=False).items()
    if isinstance(obj, Mapping):
        return obj.items()
    raise TypeError(f"`obj` must be a torch.nn.Module or a state dict (a mapping of tensors), got {type(obj).__name__}.")


def _update_tensor(h: Any, value: "torch.Tensor") -> None:
    import torch

    t = value.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.layout != torch.strided:
        t = t.to_dense()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _update_array(h: Any, value: np.ndarray) -> None:
    if value.dtype.hasobject:
        raise TypeError("`value` is a numpy array of Python objects; record a numeric array, or a number or string per result.")
    h.update(f"{value.dtype.str}{value.shape}".encode())
    h.update(np.ascontiguousarray(value).tobytes())


def fingerprint(obj: Union["torch.nn.Module", Mapping[str, Any]]) -> str:
    """A SHA-256 over every entry of a module's state dict (parameters and buffers): name, dtype,
    shape and raw bytes. Equal fingerprints mean bitwise-equal weights.

    >>> import torch
    >>> a = torch.nn.Linear(2, 2); b = torch.nn.Linear(2, 2)
    >>> _ = b.load_state_dict(a.state_dict())
    >>> fingerprint(a) == fingerprint(b)
    True
    """
    h = hashlib.sha256()
    torch = _torch()
    for name, value in _items(obj):
        h.update(str(name).encode())
        h.update(b"\0")
        if torch is not None and isinstance(value, torch.Tensor):
            _update_tensor(h, value)
        elif isinstance(value, np.ndarray):
            _update_array(h, value)
        else:
            h.update(repr(value).encode())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def result_entry(name: str, value: Any) -> Dict[str, Any]:
    """How ``SeedSession.record_result`` records `value`: a fingerprint of a module, state dict,
    tensor or array (dtype, shape and bytes), or a number or string itself.

    >>> import torch
    >>> result_entry("loss", 0.25)
    {'name': 'loss', 'kind': 'value', 'value': 0.25}
    >>> result_entry("w", torch.zeros(2))["value"][:7]
    'sha256:'
    """
    torch = _torch()
    if torch is not None and isinstance(value, torch.nn.Module):
        return {"name": name, "kind": "module", "value": fingerprint(value)}
    if isinstance(value, Mapping):
        return {"name": name, "kind": "state_dict", "value": fingerprint(value)}
    is_tensor = torch is not None and isinstance(value, torch.Tensor)
    if is_tensor or isinstance(value, np.ndarray):
        h = hashlib.sha256()
        kind = "tensor" if is_tensor else "array"
        (_update_tensor if kind == "tensor" else _update_array)(h, value)
        return {"name": name, "kind": kind, "value": "sha256:" + h.hexdigest()}
    if isinstance(value, (np.generic,)) and not isinstance(value, np.object_):
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return {"name": name, "kind": "value", "value": value}
    if isinstance(value, numbers.Integral):
        return {"name": name, "kind": "value", "value": int(value)}
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"result {name!r} is {value!r}; JSON holds finite numbers only: record a string such as 'nan' instead.")
        return {"name": name, "kind": "value", "value": value}
    raise TypeError(
        f"`value` of result {name!r} must be a module, state dict, tensor, numpy array, number or string, "
        f"got {type(value).__name__}."
    )
