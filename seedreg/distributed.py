"""Rank and world size, and gathering every rank's records on rank 0, with torch.distributed.

Rank and world size come from an initialised process group, else from the ``RANK`` /
``WORLD_SIZE`` variables that ``torchrun`` sets, else 0 and 1. Gathering sends JSON bytes as
uint8 tensors (never pickled objects).
"""

from __future__ import annotations

import json
import os
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["resolve_rank", "gather_json", "broadcast_json", "is_initialized"]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an int; torchrun sets it to one.") from None


def resolve_rank(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    """(rank, world_size) from the arguments, the process group, torchrun's environment, or (0, 1)."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"`{name}` must be an int or None, got {value!r} ({type(value).__name__}).")
    if is_initialized():
        group_rank: Optional[int] = dist.get_rank()
        group_world: Optional[int] = dist.get_world_size()
    else:
        group_rank, group_world = _env_int("RANK"), _env_int("WORLD_SIZE")
    world = world_size if world_size is not None else (group_world if group_world is not None else 1)
    r = rank if rank is not None else (group_rank if group_rank is not None else 0)
    if world < 1:
        raise ValueError(f"`world_size` must be >= 1, got {world}.")
    if not 0 <= r < world:
        raise ValueError(f"`rank` must be in [0, {world - 1}] for world_size={world}, got {r}.")
    return r, world


def _device() -> torch.device:
    backend = dist.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_json(obj: Any, *, dst: int = 0) -> Optional[List[Any]]:
    """Gather one JSON-native object from every rank; `dst` gets the list in rank order, others None."""
    device = _device()
    payload = torch.tensor(list(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    rank = dist.get_rank()
    buffers = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in sizes] if rank == dst else None
    dist.gather(padded, gather_list=buffers, dst=dst)
    if buffers is None:
        return None
    return [json.loads(bytes(b[: int(s.item())].cpu().tolist()).decode()) for b, s in zip(buffers, sizes)]


def broadcast_json(obj: Any, *, src: int = 0) -> Any:
    """Send one JSON-native object from `src` to every rank (used to share errors and paths)."""
    device = _device()
    if dist.get_rank() == src:
        data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    if dist.get_rank() != src:
        data = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src)
    return json.loads(bytes(data.cpu().tolist()).decode())
