"""Writing a session's manifest, its step trace beside it, and, with several processes, every
rank's records gathered into the one file rank 0 writes."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

import attrs

from . import distributed as _dist
from .errors import SeedregError
from .files import atomic_write
from .determinism import environment
from .manifest import Manifest, PathLike
from .records import record_from_dict, record_to_dict
from .tracefile import trace_entry

if TYPE_CHECKING:
    from .session import SeedSession

__all__ = ["dump", "manifest_of"]


def manifest_of(session: "SeedSession") -> Manifest:
    """``SeedSession.manifest()``: this rank's records, settings, environment, results, replay report."""
    return Manifest(
        master_seed=session.master_seed,
        scheme=session.scheme,
        records=session.records,
        settings=session.settings.to_dict(),
        applied=session._applied,
        environment=environment(session.world_size),
        violations=tuple(session.violations),
        world_size=session.world_size,
        replay=session.replay_report() if session._replay is not None else None,
        results=session.results,
    )


def dump(session: "SeedSession", path: PathLike) -> pathlib.Path:
    """``SeedSession.dump``."""
    path = pathlib.Path(path)
    manifest = session.manifest()
    if session._trace is not None and session.rank == 0:  # after DDP's all-reduce every rank holds the same weights
        data = session._trace.data()
        payload = data.encode()
        trace_path = path.with_name(path.name + ".trace")
        atomic_write(trace_path, payload)
        manifest = attrs.evolve(manifest, trace=trace_entry(trace_path.name, payload, data))
    if session.world_size == 1:
        return manifest.write(path)
    if not _dist.is_initialized():
        raise SeedregError(
            f"dump() with world_size={session.world_size} is collective and needs an initialised "
            f"torch.distributed process group; call torch.distributed.init_process_group() first."
        )
    gathered = _dist.gather_json([record_to_dict(r) for r in manifest.records], dst=0)
    error = None
    if session.rank == 0:
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
