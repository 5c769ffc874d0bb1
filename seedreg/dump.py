"""Writing a session's manifest, its step trace beside it, and, with several processes, every
rank's records gathered into the one file rank 0 writes."""

from __future__ import annotations

import pathlib
from typing import Optional

import attrs

from . import distributed as _dist
from .errors import SeedregError
from .files import atomic_write
from .manifest import Manifest, PathLike
from .records import record_from_dict, record_to_dict
from .trace import Trace
from .tracefile import trace_entry

__all__ = ["write_manifest"]


def write_manifest(manifest: Manifest, path: PathLike, *, trace: Optional[Trace], rank: int, world_size: int) -> pathlib.Path:
    """``SeedSession.dump``: `manifest` (this rank's) written to `path`, with `trace` beside it; with
    several ranks, collectively, every rank's records in the one file rank 0 writes."""
    path = pathlib.Path(path)
    if trace is not None and rank == 0:  # after DDP's all-reduce every rank holds the same weights
        data = trace.data()
        payload = data.encode()
        trace_path = path.with_name(path.name + ".trace")
        atomic_write(trace_path, payload)
        manifest = attrs.evolve(manifest, trace=trace_entry(trace_path.name, payload, data))
    if world_size == 1:
        return manifest.write(path)
    if not _dist.is_initialized():
        raise SeedregError(
            f"dump() with world_size={world_size} is collective and needs an initialised "
            f"torch.distributed process group; call torch.distributed.init_process_group() first."
        )
    gathered = _dist.gather_json([record_to_dict(r) for r in manifest.records], dst=0)
    error = None
    if rank == 0:
        assert gathered is not None
        ranks = tuple(tuple(record_from_dict(r, f"rank {i} record") for r in recs) for i, recs in enumerate(gathered))
        try:
            attrs.evolve(manifest, ranks=ranks).write(path)
        except SeedregError as exc:
            error = str(exc)
    error = _dist.broadcast_json(error, src=0)
    if error is not None:
        raise SeedregError(f"rank 0 could not write the manifest: {error}")
    return path
