"""DeterministicSampler: the order of an epoch as a pure function of (seed, epoch).

Each epoch's permutation comes from a generator seeded with a hash of (seed, epoch), never
``seed + epoch``, so two loaders whose seeds differ by one do not replay each other's orders.
It follows :class:`torch.utils.data.DistributedSampler` where the two overlap: ``set_epoch``,
``num_replicas``/``rank`` sharding of one global permutation, padding unless ``drop_last``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sized
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import RandomSampler, Sampler

from .derive import mix_seed
from .errors import StateError

__all__ = ["DeterministicSampler"]

_EPOCH_STREAM = 0x5EED_0001
_EPOCH_MAX = 2**63 - 1


def _check_int(name: str, value: object, low: int, high: Optional[int] = None) -> int:
    if type(value) is int and value >= low and (high is None or value <= high):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be {bound}, got {value}.")
    return value


def subset_indices(subset: object, dataset_size: int) -> np.ndarray:
    """Sorted unique example indices from a bool mask of length `dataset_size` or an index list."""
    arr = np.asarray(subset)
    if arr.dtype == bool:
        if arr.shape != (dataset_size,):
            raise ValueError(
                f"`subset` as a bool mask must have shape ({dataset_size},) like the dataset, got {arr.shape}."
            )
        return np.flatnonzero(arr)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"`subset` must be a bool mask or a 1-d sequence of int indices, got dtype {arr.dtype}, shape {arr.shape}.")
    arr = np.unique(arr.astype(np.int64))
    if arr.size and (arr[0] < 0 or arr[-1] >= dataset_size):
        raise ValueError(f"`subset` indices must lie in [0, {dataset_size - 1}], got {int(arr[0])}..{int(arr[-1])}.")
    return arr


class DeterministicSampler(Sampler[int]):
    """Yield a permutation of ``range(dataset_size)`` that depends only on (seed, epoch).

    Iterating again without ``set_epoch`` moves on to the next epoch (a loop that forgets
    ``set_epoch`` still reshuffles, deterministically); ``set_epoch(e)`` picks epoch `e`. A sampler
    resumed from a state saved after the last sample of an epoch, before the loop saw it end,
    yields that epoch's (empty) rest first, then the next epoch.
    With `subset`, only those examples are yielded, in the order they have in the full epoch.

    >>> s = DeterministicSampler(5, seed=7)
    >>> first, second = list(s), list(s)
    >>> sorted(first) == list(range(5)) and first != second
    True
    >>> s.set_epoch(0); list(s) == first
    True

    A shuffling sampler is also a ``torch.utils.data.RandomSampler``, so that tools which check
    whether a loader shuffles that way (dattri, Lightning) see that it does:

    >>> isinstance(s, torch.utils.data.RandomSampler), isinstance(DeterministicSampler(5, shuffle=False), torch.utils.data.RandomSampler)
    (True, False)
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "DeterministicSampler":
        if cls is DeterministicSampler and kwargs.get("shuffle", True) is True and args:
            cls = _ShufflingSampler
        return super().__new__(cls)

    def __init__(
        self,
        dataset_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        subset: Union[None, Sequence[int], np.ndarray] = None,
    ) -> None:
        self.dataset_size = _check_int("dataset_size", dataset_size, 0)
        self.data_source: Sized = range(self.dataset_size)  # what a RandomSampler holds (a shuffling one is seen as one)
        if not isinstance(shuffle, bool):
            raise TypeError(f"`shuffle` must be a bool, got {shuffle!r}.")
        self.shuffle = shuffle
        self.seed = _check_int("seed", seed, 0, 2**64 - 1)
        self.epoch = _check_int("epoch", epoch, 0, 2**63 - 1)
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.num_replicas:
            raise ValueError(f"`rank` must be an int in [0, {self.num_replicas - 1}] (num_replicas={self.num_replicas}), got {rank!r}.")
        self.rank = int(rank)
        self.drop_last = bool(drop_last)
        self.subset = None if subset is None else subset_indices(subset, self.dataset_size)
        self._mask = None
        if self.subset is not None:
            mask = torch.zeros(self.dataset_size, dtype=torch.bool)
            mask[torch.from_numpy(self.subset)] = True
            self._mask = mask
        total = self.dataset_size if self.subset is None else len(self.subset)
        if self.drop_last and total % self.num_replicas:
            self.num_samples = total // self.num_replicas
        else:
            self.num_samples = math.ceil(total / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self._total = total
        #: samples of `epoch` already consumed (kept up to date by the seedreg loader that owns it)
        self.position = 0
        self._started = False  # an iteration of `epoch` has begun since set_epoch/load
        self._exhausted = False  # an iteration of `epoch` ran to its end
        self._resumed_at_end = False  # loaded at the end of `epoch` before its iteration was seen to end

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"DeterministicSampler({self.dataset_size}, shuffle={self.shuffle}, seed={self.seed}, "
            f"epoch={self.epoch}, num_replicas={self.num_replicas}, rank={self.rank})"
        )

    def epoch_seed(self, epoch: int) -> int:
        """The seed of `epoch`'s permutation: a hash of (seed, epoch)."""
        return mix_seed(_EPOCH_STREAM, self.seed, epoch)

    def order(self, epoch: Optional[int] = None) -> List[int]:
        """This rank's indices for `epoch` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.epoch_seed(epoch))
            perm = torch.randperm(self.dataset_size, generator=g)
        elif self.num_replicas == 1 and self._mask is None:
            return list(range(self.dataset_size))
        else:
            perm = torch.arange(self.dataset_size)
        if self._mask is not None:
            perm = perm[self._mask[perm]]
        if self.num_replicas > 1:
            if not self.drop_last and self.total_size > self._total and self._total:
                pad = self.total_size - self._total
                perm = torch.cat([perm] + [perm] * (pad // self._total) + [perm[: pad % self._total]])
            perm = perm[self.rank : self.total_size : self.num_replicas]
        return perm.tolist()

    def set_epoch(self, epoch: int) -> None:
        """Iterate epoch `epoch` next. Setting the epoch a resumed sampler stands in keeps its position."""
        epoch = _check_int("epoch", epoch, 0, 2**63 - 1)
        self._resumed_at_end = False
        if epoch == self.epoch and not self._started:
            return
        self.epoch = epoch
        self.position = 0
        self._started = False
        self._exhausted = False

    def seek(self, epoch: int, position: int) -> None:
        """Stand at `position` (samples already taken) of `epoch`, as if loaded from a state saved there."""
        self.set_epoch(epoch)
        self.position = _check_int("position", position, 0, self.num_samples)
        self._started = False
        self._exhausted = False

    def finish_epoch(self) -> None:
        """The epoch's iteration ran to its end (a loader says so when its iterator is exhausted)."""
        self.position = len(self)
        self._exhausted = True

    @property
    def resumed_at_end(self) -> bool:
        """Loaded at the end of `epoch` before its iteration was seen to end: iterating without
        ``set_epoch`` yields that epoch's empty rest first."""
        return self._resumed_at_end

    def begin_epoch(self) -> List[int]:
        """Start an iteration: advance the epoch if the current one was already iterated, then
        return the indices still to come in it (all of them, or the rest after a resume)."""
        if self._started:
            self.epoch += 1
            self.position = 0
        self._resumed_at_end = False
        self._started = True
        self._exhausted = False
        start = self.position
        indices = self.order()
        return indices[start:] if start else indices

    def __iter__(self) -> Iterator[int]:
        """The rest of the epoch's indices; ``position`` counts each one as it is yielded (a
        seedreg loader instead counts what the training loop consumed, not what was prefetched)."""
        indices = self.begin_epoch()
        position = self.position
        for i in indices:
            position += 1
            self.position = position
            yield i
        self._exhausted = True

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """JSON-native state: what identifies the sampler, and where it stands."""
        return {
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "shuffle": self.shuffle,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "subset_size": None if self.subset is None else int(len(self.subset)),
            "epoch": self.epoch,
            "position": self.position,
            "exhausted": self._exhausted,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where `state` stood: the next iteration yields the first sample not consumed."""
        if not isinstance(state, Mapping):
            raise StateError(f"sampler state must be a dict, got {type(state).__name__}.")
        mine = self.state_dict()
        missing = sorted(set(mine) - set(state))
        if missing:
            raise StateError(f"sampler state is missing {missing}.")
        for key in ("seed", "dataset_size", "shuffle", "num_replicas", "rank", "subset_size"):
            if state[key] != mine[key] or type(state[key]) is not type(mine[key]):
                raise StateError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {key}={mine[key]!r}; "
                    f"a state only loads into the sampler of the same run."
                )
        for key in ("epoch", "position"):
            value = state[key]
            if type(value) is not int or not 0 <= value <= _EPOCH_MAX:
                raise StateError(f"sampler state[{key!r}] must be an int in [0, 2**63 - 1], got {value!r:.40}.")
        if state["position"] > self.num_samples:
            raise StateError(f"sampler state['position'] is {state['position']} but an epoch holds {self.num_samples} samples.")
        if not isinstance(state["exhausted"], bool):
            raise StateError(f"sampler state['exhausted'] must be a bool, got {state['exhausted']!r}.")
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._exhausted = state["exhausted"]
        self._started = self._exhausted
        self._resumed_at_end = not self._exhausted and self.position >= self.num_samples


class _ShufflingSampler(DeterministicSampler, RandomSampler):
    """A shuffling :class:`DeterministicSampler`, seen as a ``RandomSampler`` by ``isinstance``
    (tools warn that scores of a shuffled loader come in its order). Everything it does is
    DeterministicSampler's."""

    num_samples = 0  # an instance attribute (set in __init__), not RandomSampler's property
    replacement = False
    generator = None
