"""Per-example and per-worker random streams.

:class:`ExampleSeededDataset` wraps the user's dataset. Before ``dataset[i]`` is fetched it seeds
python's `random`, numpy's global RNG and torch's CPU generator from a hash of (loader seed,
epoch, i), so augmentation depends on the example and the epoch alone: not on the worker, the
batch or ``num_workers``. In the main process the global state is put back after each batch, so
data loading never shifts the training loop's own random draws (dropout). Without per-example
streams, :class:`WorkerInit` seeds each worker from (loader seed, epoch, rank, worker id).
"""

from __future__ import annotations

import hashlib
import random
import struct
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .derive import mix_seed
from .rng import seed_numpy_global

__all__ = ["ExampleSeededDataset", "STREAMS"]

_EXAMPLE_STREAM = 0x5EED_0002
_WORKER_STREAM = 0x5EED_0003
BASE_STREAM = 0x5EED_0004
_default_generator = torch.default_generator

_pack4 = struct.Struct("<4Q").pack
_sha256 = hashlib.sha256
_from_bytes = int.from_bytes


#: Stream versions of what a loader installs in the global generators. 1 (seedreg 0.1.0): torch's
#: per-example and per-worker seeds were full 64-bit (a dataset returning ``torch.initial_seed()``
#: then broke default collation) and per-worker seeds ignored the rank. 2: seeds below 2**63, as
#: torch keeps its own, and per-worker seeds keyed by rank. A replay of a 0.1.0 manifest uses 1.
STREAMS = 2
_TORCH_SEED_MASK = {1: (1 << 64) - 1, 2: (1 << 63) - 1}


def _seeded_fetch(dataset: Any, seed: int, epoch: int, indices: List[int], mask: int = _TORCH_SEED_MASK[STREAMS]) -> List[Any]:
    """Fetch `indices`, seeding random, numpy and torch before each from a hash of
    (seed, epoch, index): three slices of one SHA-256 (the hot loop of per-example streams)."""
    out: List[Any] = []
    append = out.append
    pack, sha, from_bytes = _pack4, _sha256, _from_bytes
    py_seed, np_seed, torch_seed = random.seed, np.random.seed, _default_generator.manual_seed
    for i in indices:
        d = sha(pack(_EXAMPLE_STREAM, seed, epoch, i)).digest()
        py_seed(from_bytes(d[0:8], "little"))
        np_seed(from_bytes(d[8:12], "little"))
        torch_seed(from_bytes(d[16:24], "little") & mask)
        append(dataset[i])
    return out


class ExampleSeededDataset(torch.utils.data.Dataset):
    """The user's map-style dataset, fetched with per-example random streams.

    Keys are ``(epoch, index)`` for one example or ``(epoch, [indices])`` for a batch. Attributes
    not found here are looked up on the wrapped `dataset`. With `indexed`, each example comes back
    as ``(index, example)`` (the loader's collate turns the indices into a LongTensor).
    """

    def __init__(self, dataset: Any, seed: int, *, per_example: bool = True, indexed: bool = False, streams: int = STREAMS) -> None:
        self.dataset = dataset
        self.seed = seed
        self.per_example = per_example
        self._mask = _TORCH_SEED_MASK[streams]
        self.indexed = indexed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "seed", "per_example", "indexed", "_mask") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _fetch(self, epoch: int, indices: List[int]) -> List[Any]:
        dataset = self.dataset
        if not self.per_example:
            getitems = getattr(dataset, "__getitems__", None)
            return list(getitems(indices)) if getitems else [dataset[i] for i in indices]
        if get_worker_info() is not None:
            return _seeded_fetch(dataset, self.seed, epoch, indices, self._mask)
        py, npst, cpu = random.getstate(), np.random.get_state(), _default_generator.get_state()
        try:
            return _seeded_fetch(dataset, self.seed, epoch, indices, self._mask)
        finally:
            random.setstate(py)
            np.random.set_state(npst)
            _default_generator.set_state(cpu)

    def __getitems__(self, key: Tuple[int, List[int]]) -> List[Any]:
        epoch, indices = key
        items = self._fetch(epoch, indices)
        return list(zip(indices, items)) if self.indexed else items

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        epoch, index = key
        item = self._fetch(epoch, [index])[0]
        return (index, item) if self.indexed else item


class IndexedCollate:
    """Collates ``(index, example)`` pairs into ``(LongTensor of indices, the user's batch)``."""

    def __init__(self, collate: Callable[[Any], Any], batched: bool) -> None:
        self.collate = collate
        self.batched = batched

    def __call__(self, samples: Any) -> Tuple[torch.Tensor, Any]:
        if not self.batched:
            index, item = samples
            return torch.tensor(index, dtype=torch.long), self.collate(item)
        return torch.tensor([i for i, _ in samples], dtype=torch.long), self.collate([x for _, x in samples])


class WorkerInit:
    """Seeds a worker from (loader seed, epoch, rank, worker id), shows the user's dataset (not
    seedreg's wrapper) in ``get_worker_info().dataset``, then runs the user's worker_init_fn."""

    def __init__(self, seed: int, user_fn: Optional[Callable[[int], None]], *, rank: int = 0, streams: int = STREAMS) -> None:
        self.seed = seed
        self.epoch = 0
        self.rank = rank
        self.streams = streams
        self.user_fn = user_fn

    def worker_seed(self, worker_id: int) -> int:
        if self.streams == 1:
            return mix_seed(_WORKER_STREAM, self.seed, self.epoch, worker_id)
        return mix_seed(_WORKER_STREAM, self.seed, self.epoch, self.rank, worker_id) & _TORCH_SEED_MASK[2]

    def __call__(self, worker_id: int) -> None:
        s = self.worker_seed(worker_id)
        random.seed(s)
        seed_numpy_global(s)
        _default_generator.manual_seed(s)
        info = get_worker_info()
        if info is not None and isinstance(info.dataset, ExampleSeededDataset):
            # WorkerInfo is frozen; this copy lives in this worker only
            object.__setattr__(info, "dataset", info.dataset.dataset)
        if self.user_fn is not None:
            self.user_fn(worker_id)
