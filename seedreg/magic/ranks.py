"""Data-parallel ranks for :func:`~seedreg.magic.metagradient`: gradients averaged across ranks as
``DistributedDataParallel`` averages them (each rank's gradient divided by the world size, then
summed), through an all-reduce that is itself differentiated.

The adjoint of the training state is kept split across ranks (rank r holds a_r, the true adjoint is
their sum): the target's adjoint starts divided by the world size on every rank, each reverse step
pulls each rank's share back through its own batch and the differentiable all-reduce (whose
backward sums across ranks), and the example weights' metagradients are summed across ranks at the
end, so every rank returns the full dataset's metagradient, the same on each.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import SeedregError

__all__ = ["Ranks"]


class _AllReduceSum(torch.autograd.Function):
    """A sum across ranks whose backward is the sum across ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


class Ranks:
    """The process group a metagradient runs in (world size 1 when there is none)."""

    def __init__(self) -> None:
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0

    def check(self, model: torch.nn.Module, loader: Any, stat_names: Sequence[str], definition: Any) -> None:
        """Refuse what would make the ranks' runs differ from one DDP run: a loader that does not
        shard by rank, BatchNorm statistics (DDP broadcasts rank 0's), and ranks that disagree on
        the run's definition (checked before training)."""
        session = getattr(loader, "session", None)
        if session is None or session.world_size != self.world or session.rank != self.rank:
            raise SeedregError(f"`loader` must shard the data by rank (a loader of a SeedSession made after the process "
                               f"group exists: rank {self.rank} of {self.world}).")
        if stat_names:
            raise SeedregError(f"`model` has BatchNorm running statistics ({stat_names[0]}, ...) and the run has {self.world} "
                               f"ranks: DistributedDataParallel broadcasts rank 0's buffers, which metagradient does not "
                               f"differentiate yet. Use GroupNorm or LayerNorm, or track_running_stats=False.")
        mine = hashlib.sha256(json.dumps(definition, sort_keys=True, default=repr).encode()).digest()
        everyone = [torch.zeros(32, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(everyone, torch.frombuffer(bytearray(mine), dtype=torch.uint8))
        differ = [r for r, d in enumerate(everyone) if bytes(d.tolist()) != mine]
        if differ:
            raise SeedregError(f"ranks {differ} define another run than rank {self.rank} (master seed, initial weights, "
                               f"optimizer and scheduler settings, epochs, dataset size or loop options differ); every rank "
                               f"must build the same run.")

    def average_(self, grads: List[Optional[torch.Tensor]], params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """DDP's gradient average, in place (training)."""
        out = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        for g in out:
            g.div_(self.world)
            dist.all_reduce(g)
        return out

    def average(self, grads: Sequence[Optional[torch.Tensor]], params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """DDP's gradient average as a differentiable function (the reverse pass)."""
        return [_AllReduceSum.apply((torch.zeros_like(p) if g is None else g) / self.world) for g, p in zip(grads, params)]

    def all_agree(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor
