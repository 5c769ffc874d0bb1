"""What ``SeedSession.build_dataloader`` assembles (the per-example streams are
:mod:`seedreg.example_streams`'s).

- The loader's index sampler yields ``(epoch, indices)`` per batch: the epoch travels with the
  indices, so it reaches persistent workers too (a plain ``set_epoch`` never does).
- :class:`SeededDataLoader` counts the batches the training loop actually took (not what workers
  prefetched); that count is the position a ``state_dict`` resumes from.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate, default_convert

from .derive import mix_seed
from .loaderkey import LoaderKey
from .errors import SeedregError, SeedregWarning, StateError, user_stacklevel
from .example_streams import BASE_STREAM, STREAMS, ExampleSeededDataset, IndexedCollate, WorkerInit
from .sampler import DeterministicSampler
from .streaming import jsonable_state

__all__ = ["ExampleSeededDataset", "SeededDataLoader", "STREAMS"]

class _KeyedBatches:
    """The loader's index sampler: the sampler's indices, batched, each batch tagged with its epoch.

    It holds its loader weakly: a persistent-workers iterator keeps it, and the loader keeps that
    iterator, so a strong reference would leave the loader (and its workers) to the cyclic collector.
    """

    def __init__(self, loader: "SeededDataLoader") -> None:
        self._loader = weakref.ref(loader)

    @property
    def loader(self) -> "SeededDataLoader":
        loader = self._loader()
        if loader is None:
            raise RuntimeError("the SeededDataLoader this iterator belongs to was garbage-collected.")
        return loader

    def __len__(self) -> int:
        loader = self.loader
        n, bs = len(loader.sampler), loader.batch_size
        if bs is None:
            return n
        return n // bs if loader.drop_last else -(-n // bs)

    def __iter__(self) -> Iterator[Any]:
        # DataLoader's iterators may call iter() on this more than once per epoch (the
        # multi-process one does, in __init__ and _reset): the epoch is planned once, by the loader.
        loader = self.loader
        if loader._plan is None:
            loader._plan_epoch()
        epoch, indices = loader._plan  # type: ignore[misc]
        batches = self._batches(epoch, indices, loader.batch_size, loader.drop_last)
        return batches if loader._batch_recorder is None else self._noted(batches, loader._batch_recorder)

    @staticmethod
    def _noted(batches: Iterator[Any], recorder: Any) -> Iterator[Any]:
        recorder.seen_batch_indices = []
        for key in batches:
            recorder.seen_batch_indices.append(list(key[1]) if isinstance(key[1], list) else [key[1]])
            yield key

    @staticmethod
    def _batches(epoch: int, indices: List[int], bs: Optional[int], drop_last: bool) -> Iterator[Any]:
        if bs is None:
            for i in indices:
                yield (epoch, i)
            return
        stop = len(indices) - len(indices) % bs if drop_last else len(indices)
        for start in range(0, stop, bs):
            yield (epoch, indices[start : start + bs])


class _Tracked:
    """The iterator a SeededDataLoader hands out: counts what the loop took."""

    __slots__ = ("_loader", "_it")

    def __init__(self, loader: "SeededDataLoader", it: Any) -> None:
        self._loader = loader
        self._it = it

    def __iter__(self) -> "_Tracked":
        return self

    def __len__(self) -> int:
        return len(self._it)

    def __next__(self) -> Any:
        loader = self._loader
        if loader._before_batch is not None:
            loader._before_batch()
        try:
            batch = loader._finish(next(self._it))
        except StopIteration:
            loader.sampler.finish_epoch()
            raise
        sampler = loader.sampler
        step = 1 if loader.batch_size is None else loader.batch_size
        sampler.position = min(sampler.position + step, sampler.num_samples)
        return batch


class SeededDataLoader(LoaderKey, DataLoader):
    """A :class:`~torch.utils.data.DataLoader` whose order, augmentation and position are seedreg's.

    Built by ``SeedSession.build_dataloader``; ``.sampler`` is its :class:`DeterministicSampler`.
    ``set_epoch``, ``state_dict`` and ``load_state_dict`` work as in PyTorch.

    With per-example streams a batch is fetched one example at a time, even when the dataset has
    ``__getitems__``: each example's streams are seeded right before it is fetched, which a bulk
    fetch (drawing for many examples at once) cannot honour. With ``seed_per_example=False`` the
    dataset's ``__getitems__`` is used.
    """

    # Defaults as class attributes: DataLoader routes every instance assignment through a Python
    # __setattr__, and building a loader is something LDS studies do thousands of times.
    _before_batch: Optional[Callable[[], None]] = None  # the session's hook, called before each batch
    _plan: Optional[Tuple[int, List[int]]] = None
    _order: Optional[Tuple[int, List[int]]] = None  # (epoch, its indices), for random access
    _with_indices = False
    _subset_weights: Optional[torch.Tensor] = None
    _example_weights: Optional[torch.Tensor] = None
    _batch_recorder: Any = None  # a framework's batch sampler that notes each batch's indices
    # what DataLoader types loosely, as this loader builds them
    sampler: DeterministicSampler
    dataset: ExampleSeededDataset
    worker_init_fn: WorkerInit
    generator: Optional[torch.Generator]
    _keyed: _KeyedBatches
    _instance_id: Any

    def __init__(
        self,
        dataset: Any,
        *,
        sampler: Optional[DeterministicSampler] = None,
        seed: Optional[int] = None,
        instance_id: Any = None,
        batch_size: Optional[int] = 1,
        drop_last: bool = False,
        seed_per_example: bool = True,
        weights: Optional[np.ndarray] = None,
        with_indices: bool = False,
        example_weights: Optional[torch.Tensor] = None,
        worker_init_fn: Optional[Callable[[int], None]] = None,
        streams: int = STREAMS,
        use: int = 1,
        session: Any = None,
        before_batch: Optional[Callable[[], None]] = None,
        **kwargs: Any,
    ) -> None:
        recorder: Any = kwargs.get("batch_sampler")
        if sampler is None and type(seed) is int and isinstance(getattr(recorder, "sampler", None), DeterministicSampler):
            # A framework re-creating this loader around a batch sampler over ours: Lightning's
            # Trainer.predict does, to note each batch's indices. The loader stays itself (same
            # order, batches and per-example streams) and reports each batch's indices to it.
            sampler, batch_size, drop_last = recorder.sampler, recorder.batch_size, bool(recorder.drop_last)
            for name in ("batch_sampler", "shuffle"):
                kwargs.pop(name, None)
        else:
            recorder = None
        if not isinstance(sampler, DeterministicSampler) or type(seed) is not int:
            raise SeedregError(
                "a SeededDataLoader is built by SeedSession.build_dataloader, not rebuilt from its attributes: a framework "
                "that re-creates loaders from their attributes can re-create it only from the arguments it was built "
                "with, which Lightning keeps for loaders built inside its hooks: build it with session.build_dataloader "
                "inside the LightningModule's predict_dataloader() (or the DataModule's), or give that step a plain DataLoader."
            )
        if kwargs.get("in_order", True) is not True:
            raise ValueError(
                "`in_order=False` is not supported: batches would arrive out of order, so neither the order a "
                "replay checks nor the position a resume continues from would be defined. Leave in_order=True."
            )
        # straight into __dict__: DataLoader routes every assignment through a Python __setattr__
        attributes = self.__dict__
        attributes["_keyed"] = _KeyedBatches(self)  # it holds the loader weakly: no reference cycle
        attributes["_instance_id"] = instance_id
        attributes["_use"], attributes["_session"], attributes["_before_batch"] = use, session, before_batch
        indexed = with_indices or weights is not None or example_weights is not None
        if indexed:
            self._with_indices = with_indices
            if weights is not None:
                self._subset_weights = torch.from_numpy(np.asarray(weights, dtype=np.float32))
            self._example_weights = example_weights
            collate = kwargs.pop("collate_fn", None)
            if collate is None:
                collate = default_collate if batch_size is not None else default_convert
            kwargs["collate_fn"] = IndexedCollate(collate, batch_size is not None)
        wrapped = ExampleSeededDataset(dataset, seed, per_example=seed_per_example, indexed=indexed, streams=streams)
        super().__init__(
            wrapped,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            worker_init_fn=WorkerInit(seed, worker_init_fn, rank=sampler.rank, streams=streams),
            **kwargs,
        )
        if recorder is not None:
            self._batch_recorder = recorder
            object.__setattr__(self, "batch_sampler", recorder)  # where the framework looks for the indices

    @property
    def _index_sampler(self) -> _KeyedBatches:
        return self._keyed

    def _finish(self, raw: Any) -> Any:
        """What the loop receives: the batch, with its indices and weights when asked for."""
        if not self.dataset.indexed:
            return raw
        indices, batch = raw
        weights = None
        if self._subset_weights is not None:
            weights = self._subset_weights[indices]
        if self._example_weights is not None:
            ew = self._example_weights[indices.to(self._example_weights.device)]
            weights = ew if weights is None else ew * weights.to(ew)
        out = ((indices,) if self._with_indices else ()) + (batch,) + (() if weights is None else (weights,))
        return out if len(out) > 1 else batch

    def batch_indices(self, epoch: int) -> List[torch.Tensor]:
        """The dataset indices of every batch of `epoch` on this rank, in order, without loading data."""
        indices = self.sampler.order(epoch)
        if self.batch_size is None:
            return [torch.tensor([i], dtype=torch.long) for i in indices]
        return [torch.tensor(b, dtype=torch.long) for _, b in _KeyedBatches._batches(epoch, indices, self.batch_size, self.drop_last)]

    def indices_at(self, step: int) -> Tuple[int, List[int]]:
        """The epoch and dataset indices of global step `step`'s batch (epochs in order). The
        order of the last epoch asked for is kept, so walking the steps of an epoch permutes once."""
        per_epoch = len(self)
        if per_epoch == 0:
            raise SeedregError("this loader yields no batch per epoch (drop_last with fewer samples than a batch).")
        epoch, b = divmod(step, per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.sampler.order(epoch))
        bs = self.batch_size or 1
        return epoch, self._order[1][b * bs : (b + 1) * bs]

    def batch_at(self, step: int) -> Any:
        """The batch of global step `step` (epochs in order: epoch ``step // len(loader)``), equal
        byte for byte to what iteration yielded at that step, random streams included; with
        ``with_indices`` as ``(indices, batch)``. Nothing about the loader or the global
        generators changes. Needs per-example streams (``seed_per_example=True``)."""
        if type(step) is not int or step < 0:
            raise ValueError(f"`step` must be an int >= 0, got {step!r}.")
        if not self.dataset.per_example:
            raise SeedregError(
                "batch_at() needs seed_per_example=True: with per-worker streams a batch's random draws depend on "
                "which worker fetched it and what it fetched before."
            )
        epoch, indices = self.indices_at(step)
        if self.batch_size is None:
            raw = self.collate_fn(self.dataset[(epoch, indices[0])])
        else:
            raw = self.collate_fn(self.dataset.__getitems__((epoch, indices)))
        return self._finish(raw)

    def seek(self, step: int) -> None:
        """Continue at global step `step` (epochs in order): the next batch drawn is ``batch_at(step)``."""
        if type(step) is not int or step < 0:
            raise ValueError(f"`step` must be an int >= 0, got {step!r}.")
        per_epoch = len(self)
        epoch, b = divmod(step, per_epoch) if per_epoch else (0, 0)
        self.sampler.seek(epoch, min(b * (self.batch_size or 1), self.sampler.num_samples))

    @property
    def seed(self) -> int:
        """The loader's seed (purpose "dataloader" in the session's registry)."""
        return self.sampler.seed

    @property
    def with_indices(self) -> bool:
        """Whether it yields ``(indices, batch)``."""
        return self._with_indices

    def _plan_epoch(self) -> None:
        sampler: DeterministicSampler = self.sampler
        if sampler.resumed_at_end:
            warnings.warn(
                f"loader {self._instance_id!r} was resumed at the end of epoch {sampler.epoch} (its state was saved after "
                f"the epoch's last batch), and is iterated without set_epoch: this pass yields that epoch's empty rest "
                f"and the next pass epoch {sampler.epoch + 1}. A loop that resumes at the next epoch loses one this way: "
                f"call loader.set_epoch(epoch) at the top of each epoch (or resume the loop at epoch {sampler.epoch}).",
                SeedregWarning,
                stacklevel=user_stacklevel(),
            )
        indices = sampler.begin_epoch()
        epoch = sampler.epoch
        self._plan = (epoch, indices)
        # DataLoader draws its workers' base seed from our generator right after this: derive it
        # from (seed, epoch) so that nothing about an epoch depends on what came before it.
        generator = self.generator
        if generator is None:  # made at the first iteration: building a loader is what LDS studies do by the thousand
            generator = self.generator = torch.Generator()
        generator.manual_seed(mix_seed(BASE_STREAM, sampler.seed, epoch))
        self.worker_init_fn.epoch = epoch

    def __iter__(self) -> _Tracked:  # type: ignore[override]
        self._plan_epoch()  # fixes the epoch before workers start
        return _Tracked(self, super().__iter__())

    def set_epoch(self, epoch: int) -> None:
        """Iterate `epoch` next (as ``DistributedSampler.set_epoch``); reaches workers too."""
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration draws (set by :meth:`set_epoch`, or advanced by a full pass)."""
        return self.sampler.epoch

    def state_dict(self) -> Dict[str, Any]:
        """JSON-native: which loader of the session it is (instance id and use), the sampler's
        state (seed, epoch, position) and the batch size."""
        return {
            "instance_id": self._instance_id,
            "use": self._use,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "sampler": self.sampler.state_dict(),
            "dataset_state": self._dataset_state(),
        }

    def _dataset_state(self) -> Any:
        """The user's dataset's own state (a curriculum, a cache), when it has ``state_dict``."""
        user = self.dataset.dataset
        if not (hasattr(user, "state_dict") and hasattr(user, "load_state_dict")):
            return None
        return jsonable_state(user.state_dict(), "the dataset's state_dict()")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at the first batch not consumed when `state` was taken."""
        if not isinstance(state, Mapping):
            raise StateError(f"loader state must be a dict, got {type(state).__name__}.")
        for key in ("instance_id", "batch_size", "drop_last"):
            if key not in state:
                raise StateError(f"loader state is missing {key!r}.")
            mine = self._instance_id if key == "instance_id" else getattr(self, key)
            if state[key] != mine or type(state[key]) is not type(mine):
                raise StateError(
                    f"loader state has {key}={state[key]!r} but this loader has {key}={mine!r}; "
                    f"rebuild the loader as the run that saved the state did."
                )
        if "sampler" not in state:
            raise StateError("loader state is missing 'sampler'.")
        dataset_state = state.get("dataset_state")
        user = self.dataset.dataset
        if dataset_state is not None:
            if not hasattr(user, "load_state_dict"):
                raise StateError("loader state holds a dataset state but this loader's dataset has no load_state_dict.")
                jsonable_state(dataset_state, "loader state['dataset_state']")
        self.sampler.load_state_dict(state["sampler"])
        if dataset_state is not None:
            user.load_state_dict(dataset_state)
