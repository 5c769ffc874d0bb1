"""SHA-256 fingerprints of tensors: how a manifest tells whether two models started (or ended) alike."""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping, Tuple, Union

import torch

__all__ = ["fingerprint"]


def _items(obj: Union[torch.nn.Module, Mapping[str, Any]]) -> Iterable[Tuple[str, Any]]:
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict(keep_vars=False).items()
    if isinstance(obj, Mapping):
        return obj.items()
    raise TypeError(f"`obj` must be a torch.nn.Module or a state dict (a mapping of tensors), got {type(obj).__name__}.")


def fingerprint(obj: Union[torch.nn.Module, Mapping[str, Any]]) -> str:
    """A SHA-256 over every entry of a module's state dict (parameters and buffers): name, dtype,
    shape and raw bytes. Equal fingerprints mean bitwise-equal weights.

    >>> a = torch.nn.Linear(2, 2); b = torch.nn.Linear(2, 2)
    >>> _ = b.load_state_dict(a.state_dict())
    >>> fingerprint(a) == fingerprint(b)
    True
    """
    h = hashlib.sha256()
    for name, value in _items(obj):
        h.update(name.encode())
        h.update(b"\0")
        if isinstance(value, torch.Tensor):
            t = value.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            if t.layout != torch.strided:
                t = t.to_dense()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(repr(value).encode())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()
