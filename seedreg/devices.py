"""Device arguments checked the way the session's generators and forks need them."""

from __future__ import annotations

from typing import Any, List, Optional

import torch

__all__ = ["check_cuda_devices", "check_device"]


def check_device(device: Any) -> torch.device:
    """`device` as a ``torch.device`` this process has (a ValueError naming it otherwise)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"`device` must name a torch device such as 'cpu' or 'cuda:0', got {device!r}.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` is {device!r} but this process sees no CUDA device; use device='cpu'.")
    return dev


def check_cuda_devices(devices: Any) -> List[int]:
    """`devices` as the CUDA device indices they name, each one this process sees."""
    out: List[Optional[int]]
    try:
        out = [int(d) if isinstance(d, int) and not isinstance(d, bool) else torch.device(d).index for d in devices]
    except (RuntimeError, TypeError, ValueError):
        out = [None]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if any(d is None or not 0 <= d < count for d in out):
        raise ValueError(
            f"`devices` must list CUDA device indices in [0, {count - 1}] (this process sees {count}), got {devices!r}; "
            f"pass devices=[] to fork no CUDA generator."
        )
    return out  # type: ignore[return-value]
