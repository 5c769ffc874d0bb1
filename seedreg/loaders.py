"""The loader book: the DataLoaders a session built and the program still holds.

It builds them (validating every argument, recording each as a use of its key), holds them
weakly (a loader the program dropped is freed and leaves the state), gives their positions for
``state_dict``, matches saved positions to live loaders on load (by instance id and use), and
holds the global generators of a loaded state until the next batch is drawn.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .data import STREAMS, SeededDataLoader
from .derive import InstanceId, check_instance_id
from .determinism import GlobalSetup
from .errors import SeedregError, StateError
from .masks import mask_digest
from .registry import Registry
from .replay import Replay
from .rng import restore_global
from .sampler import DeterministicSampler, subset_indices
from .streaming import SeededIterableLoader, check_iterable_args

__all__ = ["LoaderBook"]

STATE_VERSION = 2
_ITERABLE: "weakref.WeakKeyDictionary[type, bool]" = weakref.WeakKeyDictionary()  # dataset class -> is an IterableDataset
_REFUSED_LOADER_ARGS = {
    "sampler": "the session supplies a DeterministicSampler; pass shuffle= and subset= instead",
    "batch_sampler": "the session batches its own sampler; pass batch_size= and drop_last= instead",
    "generator": "the session supplies a generator seeded from the loader's seed",
}


def check_loader_identity(loader_state: Any, i: int, version: int) -> None:
    """Entry `i` of a state's loaders names a loader: an instance id (None, str or int) and, from
    version 2 on, a use (an int >= 1)."""
    if not isinstance(loader_state, Mapping) or "instance_id" not in loader_state:
        raise StateError(f"`state['loaders'][{i}]` must be a loader state with an 'instance_id'.")
    iid = loader_state["instance_id"]
    if not (iid is None or type(iid) in (str, int)):
        raise StateError(f"`state['loaders'][{i}]['instance_id']` must be None, a str or an int, got {iid!r:.40}.")
    use = loader_state.get("use")
    if version != 1 and (type(use) is not int or use < 1):
        raise StateError(f"`state['loaders'][{i}]['use']` must be an int >= 1, got {use!r:.40}.")


class LoaderBook:
    """The loaders of one session (see the module's docstring). Each loader is built from its key's
    seed in `registry` for this process's `rank` of `world_size`, and knows `owner` (the session)."""

    def __init__(self, registry: Registry, setup: GlobalSetup, *, rank: int, world_size: int, owner: Any) -> None:
        self.registry = registry
        self.setup = setup
        self.rank = rank
        self.world_size = world_size
        self.owner = owner
        self.replay: Optional[Replay] = None  # a replay of a 0.1.0 manifest builds with 0.1.0's streams
        # Held weakly: a loader the program dropped is freed and leaves state_dict().
        self._loaders: List["weakref.ReferenceType[Any]"] = []  # in build order; dead ones pruned now and then
        self._lock = threading.Lock()  # a thread building a loader while another takes state_dict()
        self._prune_at = 1024
        #: a loaded state's global generators (decoded, as saved), put back before the next batch
        self.pending_rng: Optional[Tuple[Dict[str, Any], Dict[str, Any]]] = None

    # -- building --------------------------------------------------------------------------------

    def build(self, dataset: Any, instance_id: InstanceId, batch_size: Optional[int], shuffle: bool, num_workers: int,
              drop_last: bool, seed_per_example: bool, subset: Any, subset_mode: str, with_indices: bool,
              example_weights: Optional[torch.Tensor], dataloader_kwargs: Dict[str, Any]) -> Any:
        """``SeedSession.build_dataloader``: its arguments checked, the loader built and recorded."""
        if dataloader_kwargs and not _REFUSED_LOADER_ARGS.keys().isdisjoint(dataloader_kwargs):
            name = next(n for n in _REFUSED_LOADER_ARGS if n in dataloader_kwargs)
            raise TypeError(f"build_dataloader() does not take `{name}`: {_REFUSED_LOADER_ARGS[name]}.")
        kind = type(dataset)
        iterable = _ITERABLE.get(kind)
        if iterable is None:  # an ABC check, once per dataset class (LDS studies build loaders by the thousand)
            iterable = _ITERABLE[kind] = isinstance(dataset, torch.utils.data.IterableDataset)
        if not iterable and (not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__")):
            raise TypeError(
                f"`dataset` must be a map-style dataset (with __getitem__ and __len__) or a torch IterableDataset, "
                f"got {type(dataset).__name__}."
            )
        instance_id = check_instance_id(instance_id)
        self.setup.warn_if_not_set_up("build_dataloader")
        if batch_size is not None and not (type(batch_size) is int and batch_size >= 1) and (
                isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"`batch_size` must be an int >= 1 or None, got {batch_size!r}.")
        if not (type(num_workers) is int and num_workers >= 0) and (
                isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0):
            raise ValueError(f"`num_workers` must be an int >= 0, got {num_workers!r}.")
        if not (type(shuffle) is type(drop_last) is type(seed_per_example) is type(with_indices) is bool):
            flags = (("shuffle", shuffle), ("drop_last", drop_last), ("seed_per_example", seed_per_example), ("with_indices", with_indices))
            name, value = next((n, v) for n, v in flags if type(v) is not bool)
            raise TypeError(f"`{name}` must be a bool, got {value!r}.")
        if subset_mode not in ("drop", "weight"):
            raise ValueError(f"`subset_mode` must be 'drop' or 'weight', got {subset_mode!r}.")
        if iterable:
            return self._build_iterable(
                dataset, instance_id, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, drop_last=drop_last,
                subset=subset, with_indices=with_indices, example_weights=example_weights, **dataloader_kwargs,
            )
        size = len(dataset)
        if size < 1:
            raise ValueError("`dataset` is empty (len 0); a loader needs at least one example.")
        if example_weights is not None:
            if not isinstance(example_weights, torch.Tensor) or not example_weights.is_floating_point() or example_weights.shape != (size,):
                got = f"{example_weights.dtype} tensor of shape {tuple(example_weights.shape)}" if isinstance(example_weights, torch.Tensor) else type(example_weights).__name__
                raise ValueError(f"`example_weights` must be a floating-point tensor of shape ({size},), one weight per example, got a {got}.")
        if with_indices and "collate_fn" in dataloader_kwargs and not callable(dataloader_kwargs["collate_fn"]):
            raise TypeError(f"`collate_fn` must be callable to carry indices with `with_indices=True`, got {dataloader_kwargs['collate_fn']!r}.")
        weights = None
        sampler_subset = None
        digest = None
        if subset is not None:
            kept = subset_indices(subset, size)
            mask = np.zeros(size, dtype=bool)
            mask[kept] = True
            digest = mask_digest(mask)
            if subset_mode == "weight":
                weights = mask
            else:
                sampler_subset = kept
        # a replay of a 0.1.0 manifest installs 0.1.0's streams (full 64-bit torch seeds)
        streams = 1 if self.replay is not None and self.replay.legacy else STREAMS
        seed, use = self.registry.use("dataloader", instance_id, "dataloader")
        sampler = DeterministicSampler(
            size, shuffle=shuffle, seed=seed, num_replicas=self.world_size, rank=self.rank, drop_last=drop_last, subset=sampler_subset
        )
        loader = SeededDataLoader(
            dataset,
            sampler=sampler,
            seed=seed,
            instance_id=instance_id,
            batch_size=batch_size,
            drop_last=drop_last,
            seed_per_example=seed_per_example,
            weights=weights,
            num_workers=num_workers,
            streams=streams,
            with_indices=with_indices,
            example_weights=example_weights,
            use=use,
            session=self.owner,
            before_batch=self.apply_pending_rng,
            **dataloader_kwargs,
        )
        details = {
            "dataset_size": size,
            "batch_size": batch_size,
            "shuffle": shuffle,
            "num_workers": num_workers,
            "drop_last": drop_last,
            "seed_per_example": seed_per_example,
            "subset_size": None if subset is None else int(len(kept)),
            "subset_digest": digest,
            "subset_mode": None if subset is None else subset_mode,
            "world_size": self.world_size,
            "streams": streams,
            "with_indices": with_indices,
            "example_weights": None if example_weights is None else f"{example_weights.dtype}[{size}]",
        }
        # With per-example streams the number of workers changes nothing a replay could see.
        self.registry.detail("dataloader", instance_id, use, details, ignore=("num_workers",) if seed_per_example else ())
        return self.register(loader)

    def _build_iterable(self, dataset: Any, instance_id: InstanceId, *, batch_size: Optional[int], shuffle: bool,
                        num_workers: int, drop_last: bool, subset: Any, with_indices: bool, example_weights: Any,
                        **dataloader_kwargs: Any) -> SeededIterableLoader:
        check_iterable_args(shuffle=shuffle, subset=subset, with_indices=with_indices, example_weights=example_weights)
        seed, use = self.registry.use("dataloader", instance_id, "dataloader")
        loader = SeededIterableLoader(
            dataset, seed=seed, instance_id=instance_id, batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
            rank=self.rank, world_size=self.world_size, use=use, session=self.owner, before_batch=self.apply_pending_rng,
            **dataloader_kwargs,
        )
        details = {
            "dataset_kind": "iterable",
            "batch_size": batch_size,
            "drop_last": drop_last,
            "num_workers": num_workers,
            "world_size": self.world_size,
            "worker_split": f"{self.world_size} rank(s) x {max(1, num_workers)} stream(s)",
            "resume_mode": loader.resume_mode,
        }
        self.registry.detail("dataloader", instance_id, use, details)
        return self.register(loader)

    def register(self, loader: Any) -> Any:
        """Hold `loader` weakly, so that state_dict() and a pending resume reach it while the program does."""
        with self._lock:
            self._loaders.append(weakref.ref(loader))
            if len(self._loaders) >= self._prune_at:  # an LDS loop builds 100,000s and keeps one at a time
                self._loaders = [r for r in self._loaders if r() is not None]
                self._prune_at = max(1024, 2 * len(self._loaders))
        return loader

    # -- positions -------------------------------------------------------------------------------

    def live(self) -> List[Any]:
        """The loaders the program still holds, in the order they were built."""
        with self._lock:
            refs = list(self._loaders)
        return [loader for loader in (r() for r in refs) if loader is not None]

    def positions(self) -> List[Dict[str, Any]]:
        """Each live loader's state (instance id, use, epoch, position)."""
        return [loader.state_dict() for loader in self.live()]

    def match(self, states: Any, version: int) -> List[Tuple[Any, Mapping[str, Any]]]:
        """Pair each loader state with the live loader of the same (instance id, use)."""
        if not isinstance(states, list):
            raise StateError(f"`state['loaders']` must be a list, got {type(states).__name__}.")
        live: Dict[Any, Any] = {}
        for loader in self.live():
            live[(type(loader.instance_id), loader.instance_id, loader.use)] = loader
        pairs: List[Tuple[Any, Mapping[str, Any]]] = []
        seen: Dict[Any, int] = {}
        for i, loader_state in enumerate(states):
            check_loader_identity(loader_state, i, version)
            iid = loader_state["instance_id"]
            if version == 1:  # 0.1.0 listed loaders in build order, without their use
                use = seen[(type(iid), iid)] = seen.get((type(iid), iid), 0) + 1
            else:
                use = loader_state["use"]
            loader = live.get((type(iid), iid, use))
            if loader is None:
                raise StateError(
                    f"`state` holds the loader ('dataloader', {iid!r:.60}) use {use}, which this session has not built "
                    f"(or no longer holds); build the same loaders (same instance ids, same order) before loading."
                )
            pairs.append((loader, {k: v for k, v in loader_state.items() if k != "use"}))
        return pairs

    @staticmethod
    def load(pairs: List[Tuple[Any, Mapping[str, Any]]]) -> None:
        """Load each loader's state; if one refuses its state, put the others back as they were."""
        snapshots = [(loader, loader.state_dict()) for loader, _ in pairs]
        try:
            for loader, loader_state in pairs:
                loader.load_state_dict(loader_state)
        except SeedregError:
            for loader, snapshot in snapshots:
                loader.load_state_dict(snapshot)
            raise

    # -- the generators of a loaded state -----------------------------------------------------------

    def hold_rng(self, rng: Dict[str, Any], saved: Dict[str, Any]) -> bool:
        """Put `rng` back right before the next batch of any live loader; False (nothing held) if
        there is none, so the caller restores it at once."""
        loaders = self.live()
        if not loaders:
            return False
        self.pending_rng = (rng, saved)
        return True

    def drop_pending(self) -> None:
        """Forget a held state (a rewind puts its own generators back at once)."""
        self.pending_rng = None

    def apply_pending_rng(self) -> None:
        """Each loader calls this before it draws a batch: a held state's generators are put back, once."""
        pending = self.pending_rng
        if pending is not None:
            self.pending_rng = None
            restore_global(pending[0])
