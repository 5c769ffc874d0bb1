"""Streaming data: iterable datasets, seeded per item, sharded, resumable and replayable.

``SeedSession.build_dataloader`` hands an :class:`~torch.utils.data.IterableDataset` to a
:class:`SeededIterableLoader`. Item k that worker w of rank r draws in epoch e is drawn with
python's ``random``, numpy's and torch's global generators seeded from a hash of (loader seed,
e, r, w, k), so every item's randomness is fixed wherever the stream is cut. The dataset sees the
epoch (its ``set_epoch`` is called, as torch's and Hugging Face's shuffling iterables expect) and,
inside a worker, ``get_worker_info()`` reports ``id = rank * num_workers + w`` and
``num_workers = world_size * num_workers``: a dataset that shards by torch's convention reads
every item once per epoch across ranks and workers. Without workers, ranks take every
``world_size``-th item.

Each batch carries, to the main process, which worker made it, how many items that worker had
drawn, and (for a dataset with ``state_dict``/``load_state_dict``, the torchdata ``Stateful``
protocol) the dataset's state right after: the loader's ``state_dict`` counts what the training
loop consumed, not what was prefetched. Resuming restores each worker's dataset state in the
matching worker, or, for a dataset without state, fast-forwards it by the items consumed.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import struct
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, default_convert, get_worker_info

from .derive import mix_seed
from .loaderkey import LoaderKey
from .errors import StateError
from .rng import seed_numpy_global

__all__ = ["SeededIterableLoader"]

_ITEM_STREAM = 0x5EED_0005
_CONTROL_BYTES = 1 << 20  # the epoch and resume plan, shared with (persistent) workers; grows when needed
#: The most items a resume re-draws and discards to fast-forward a dataset without state_dict: a
#: state claiming more is refused (an endless stream would otherwise be drawn without end).
MAX_FAST_FORWARD = 10**8
_SEED_MASK = (1 << 63) - 1
_default_generator = torch.default_generator


def jsonable_state(state: Any, where: str) -> Any:
    """`state` if it is JSON-native data that survives a round trip, else a StateError naming it."""
    try:
        text = json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StateError(
            f"{where} is not JSON-native data ({exc}); a dataset's state_dict must return dicts, lists, strings, "
            f"numbers, bools and None so that seedreg's state stays JSON."
        ) from None
    if json.loads(text) != state:
        raise StateError(f"{where} changes in a JSON round trip (tuples, non-str keys?); return lists and str keys.")
    return state


class _Tagged:
    """A batch on its way to the main process, with which worker made it and where it stood."""

    __slots__ = ("batch", "worker", "count", "position", "state")

    def __init__(self, batch: Any, worker: int, count: int, position: int, state: Any) -> None:
        self.batch, self.worker, self.count, self.position, self.state = batch, worker, count, position, state

    def pin_memory(self) -> "_Tagged":
        from torch.utils.data._utils.pin_memory import pin_memory

        return _Tagged(pin_memory(self.batch), self.worker, self.count, self.position, self.state)


class _Stream(IterableDataset):
    """The user's iterable, drawn item by item with per-item random streams."""

    def __init__(self, dataset: Any, seed: int, rank: int, world_size: int, num_workers: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.stateful = hasattr(dataset, "state_dict") and hasattr(dataset, "load_state_dict")
        self.control = multiprocessing.Array("c", _CONTROL_BYTES, lock=False) if num_workers > 0 else None
        self.plan: Dict[str, Any] = {"epoch": 0, "resume": {}}
        self.last: Tuple[int, int, int, Any] = (0, 0, 0, None)  # (worker, count, position, state) after the last item

    def set_plan(self, plan: Dict[str, Any], *, can_grow: bool = True) -> None:
        """Hand the epoch and resume plan to the workers. The shared buffer grows to hold any plan
        while workers are still to be started (always, but for persistent workers already running)."""
        self.plan = plan
        if self.control is not None:
            data = json.dumps(plan).encode()
            need = len(data) + 4
            if need > len(self.control):
                if not can_grow:
                    raise StateError(
                        f"the resume plan ({len(data)} bytes of dataset states) does not fit the {len(self.control)} bytes "
                        f"shared with this loader's running persistent workers; load the state into a loader before its "
                        f"first iteration (as a resumed run does), or build it with persistent_workers=False."
                    )
                self.control = multiprocessing.Array("c", max(need, 2 * len(self.control)), lock=False)
            self.control[:need] = struct.pack("<I", len(data)) + data

    def _read_plan(self) -> Dict[str, Any]:
        if self.control is None or get_worker_info() is None:
            return self.plan
        (size,) = struct.unpack("<I", bytes(self.control[:4]))
        return json.loads(bytes(self.control[4 : 4 + size]))

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        plan = self._read_plan()
        worker = 0
        if info is not None:
            physical = getattr(self, "_physical", None)
            if physical is None:
                physical = self._physical = info.id
            # torch hands tasks to workers 0, 1, ... in turn: a resumed epoch starts its turn at the
            # stream whose batch was due next, so physical worker 0 plays stream `rotation`
            worker = (physical + plan.get("rotation", 0)) % self.num_workers
            object.__setattr__(info, "id", self.rank * self.num_workers + worker)  # torch's convention, across ranks too
            object.__setattr__(info, "num_workers", self.world_size * self.num_workers)
            object.__setattr__(info, "dataset", self.dataset)
        epoch = plan["epoch"]
        resume = plan["resume"].get(str(worker))
        dataset = self.dataset
        set_epoch = getattr(dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        state_mode = resume is not None and resume.get("state") is not None
        count = position = 0
        if state_mode:
            dataset.load_state_dict(resume["state"])
            count, position = resume["count"], resume["position"]
        skip = resume["count"] if resume is not None and not state_mode else 0
        it = iter(dataset)
        main = info is None
        stride = self.world_size if main else 1  # without workers, ranks take every world_size-th item
        while True:
            s = mix_seed(_ITEM_STREAM, self.seed, epoch, self.rank, worker, position) & _SEED_MASK
            if main:
                saved = (random.getstate(), np.random.get_state(), _default_generator.get_state())
            try:
                random.seed(s)
                seed_numpy_global(s)
                _default_generator.manual_seed(s)
                item = next(it)
            except StopIteration:
                return
            finally:
                if main:
                    random.setstate(saved[0])
                    np.random.set_state(saved[1])
                    _default_generator.set_state(saved[2])
            position += 1
            if main and (position - 1) % stride != self.rank:
                continue
            count += 1
            if count <= skip:  # fast-forward: drawn as before (same streams), not yielded again
                continue
            self.last = (worker, count, position, dataset.state_dict() if self.stateful else None)
            yield item


class _TaggingCollate:
    def __init__(self, stream: _Stream, collate: Callable[[Any], Any]) -> None:
        self.stream = stream
        self.collate = collate

    def __call__(self, items: Any) -> _Tagged:
        worker, count, position, state = self.stream.last
        return _Tagged(self.collate(items), worker, count, position, state)


class _Consumed:
    """The iterator a SeededIterableLoader hands out: unwraps batches and counts what the loop took."""

    def __init__(self, loader: "SeededIterableLoader", it: Any) -> None:
        self._loader = loader
        self._it = it

    def __iter__(self) -> "_Consumed":
        return self

    def __next__(self) -> Any:
        loader = self._loader
        if loader._before_batch is not None:
            loader._before_batch()
        try:
            tagged = next(self._it)
        except StopIteration:
            loader._exhausted = True
            raise
        key = str(tagged.worker)
        loader._consumed[key] = {"count": tagged.count, "position": tagged.position, "state": tagged.state}
        loader._last_worker = tagged.worker
        return tagged.batch


class SeededIterableLoader(LoaderKey, DataLoader):
    """A DataLoader over an iterable dataset whose randomness, sharding and position are seedreg's.

    ``set_epoch``, ``state_dict`` and ``load_state_dict`` work as for map-style loaders. Iterating
    again without ``set_epoch`` moves on to the next epoch.
    """

    dataset: _Stream

    def __init__(
        self,
        dataset: Any,
        *,
        seed: int,
        instance_id: Any = None,
        batch_size: Optional[int] = 1,
        drop_last: bool = False,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        use: int = 1,
        session: Any = None,
        before_batch: Optional[Callable[[], None]] = None,
        **kwargs: Any,
    ) -> None:
        self._instance_id = instance_id
        self._use = use
        self._session = session
        self._before_batch = before_batch
        self._seed = seed
        self._epoch = 0
        self._started = False
        self._exhausted = False
        self._consumed: Dict[str, Dict[str, Any]] = {}
        self._pending: Dict[str, Dict[str, Any]] = {}
        self._last_worker = -1  # the stream that made the last batch consumed (-1: none this epoch)
        self._pending_last = -1
        stream = _Stream(dataset, seed, rank, world_size, num_workers)
        collate = kwargs.pop("collate_fn", None) or (default_collate if batch_size is not None else default_convert)
        gen = torch.Generator()
        gen.manual_seed(seed & _SEED_MASK)
        super().__init__(stream, batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
                         collate_fn=_TaggingCollate(stream, collate), generator=gen, **kwargs)

    @property
    def seed(self) -> int:
        """The loader's seed, from which every worker's stream and every epoch's draws are derived."""
        return self._seed

    @property
    def epoch(self) -> int:
        """The epoch the next iteration draws."""
        return self._epoch

    @property
    def resume_mode(self) -> str:
        """``"state"`` (the dataset's own state_dict) or ``"fast_forward"`` (re-draw and discard)."""
        return "state" if self.dataset.stateful else "fast_forward"

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch `epoch` next (an int >= 0), as PyTorch's ``DistributedSampler.set_epoch``."""
        if type(epoch) is not int or not 0 <= epoch < 2**63:
            raise ValueError(f"`epoch` must be an int in [0, 2**63 - 1], got {epoch!r}.")
        if epoch == self._epoch and not self._started:
            return
        self._epoch, self._started, self._exhausted = epoch, False, False
        self._consumed, self._pending = {}, {}
        self._last_worker = self._pending_last = -1

    def __iter__(self) -> _Consumed:  # type: ignore[override]
        if self._started:
            self._epoch += 1
            self._consumed, self._pending = {}, {}
            self._pending_last = -1
        self._started, self._exhausted = True, False
        resume, self._pending = self._pending, {}
        self._consumed = {k: dict(v) for k, v in resume.items()}
        self._last_worker, self._pending_last = self._pending_last, -1
        rotation = (self._last_worker + 1) % self.num_workers if self.num_workers else 0
        running = self.persistent_workers and getattr(self, "_iterator", None) is not None
        self.dataset.set_plan({"epoch": self._epoch, "resume": resume, "rotation": rotation}, can_grow=not running)
        return _Consumed(self, super().__iter__())

    def state_dict(self) -> Dict[str, Any]:
        """JSON-native: the epoch, and per worker the items consumed and the dataset's state."""
        return {
            "instance_id": self._instance_id,
            "use": self._use,
            "kind": "iterable",
            "epoch": self._epoch,
            "num_workers": self.num_workers,
            "resume_mode": self.resume_mode,
            "exhausted": self._exhausted,
            "last_worker": self._last_worker if self._started else self._pending_last,
            "workers": {
                k: {**v, "state": jsonable_state(v.get("state"), f"the state_dict() of worker {k}'s dataset")}
                for k, v in (self._consumed if self._started else self._pending).items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at the first batch not consumed when `state` was taken."""
        if not isinstance(state, Mapping) or state.get("kind") != "iterable":
            raise StateError("an iterable loader's state must be a dict from its state_dict() (kind 'iterable').")
        for key in ("instance_id",):
            if state.get(key) != self._instance_id or type(state.get(key)) is not type(self._instance_id):
                raise StateError(f"loader state has {key}={state.get(key)!r} but this loader has {key}={self._instance_id!r}.")
        if state.get("num_workers") != self.num_workers:
            raise StateError(
                f"loader state was taken with num_workers={state.get('num_workers')!r} but this loader has "
                f"{self.num_workers}: an iterable dataset's stream is split by worker, so resume with the same number."
            )
        epoch = state.get("epoch")
        if type(epoch) is not int or not 0 <= epoch < 2**63:
            raise StateError(f"loader state['epoch'] must be an int in [0, 2**63 - 1], got {epoch!r:.40}.")
        if state.get("resume_mode") != self.resume_mode:
            raise StateError(f"loader state was taken in resume mode {state.get('resume_mode')!r}, this dataset resumes by {self.resume_mode!r}.")
        workers = state.get("workers")
        ids = {str(i) for i in range(max(1, self.num_workers))}  # canonical: "1", never "01" or "١"
        if not isinstance(workers, Mapping) or not all(isinstance(k, str) and k in ids for k in workers):
            raise StateError(
                f"loader state['workers'] must map worker ids ({', '.join(sorted(ids, key=int))}, written as by "
                f"state_dict()) to their positions."
            )
        bound = MAX_FAST_FORWARD if self.resume_mode == "fast_forward" else 2**63 - 1
        checked = {}
        for k, w in workers.items():
            if not isinstance(w, Mapping) or any(type(w.get(n)) is not int or not 0 <= w[n] < 2**63 for n in ("count", "position")):
                raise StateError(f"loader state['workers'][{k!r}] must hold ints 'count' and 'position' in [0, 2**63).")
            if w["count"] > w["position"]:
                raise StateError(f"loader state['workers'][{k!r}] took {w['count']} items of the {w['position']} it drew; "
                                 f"a worker takes at most what it draws.")
            if w["position"] > bound:
                raise StateError(
                    f"loader state['workers'][{k!r}] stands at item {w['position']}, past the {bound:,} items a resume "
                    f"re-draws to fast-forward (seedreg.streaming.MAX_FAST_FORWARD); give the dataset state_dict/"
                    f"load_state_dict to resume by its own state."
                )
            checked[k] = {"count": w["count"], "position": w["position"],
                          "state": jsonable_state(w.get("state"), f"loader state['workers'][{k!r}]['state']")}
        exhausted = state.get("exhausted")
        if type(exhausted) is not bool:
            raise StateError("loader state['exhausted'] must be a bool.")
        last = state.get("last_worker")
        if type(last) is not int or not -1 <= last < max(1, self.num_workers):
            raise StateError(f"loader state['last_worker'] must be an int in [-1, {max(1, self.num_workers) - 1}], got {last!r:.40}.")
        self._epoch = epoch
        self._exhausted = exhausted
        self._started = exhausted  # an exhausted epoch moves on at the next iteration
        self._pending = {} if exhausted else checked
        self._pending_last = -1 if exhausted else last
        self._consumed = dict(checked)


def check_iterable_args(*, shuffle: bool, subset: Any, with_indices: bool, example_weights: Any) -> None:
    """The arguments a map-style loader takes that an iterable dataset cannot honour."""
    if shuffle:
        raise ValueError(
            "`shuffle=True` needs a map-style dataset: an iterable dataset has no order for seedreg to permute. "
            "Shuffle inside the dataset (its set_epoch is called each epoch), or use a map-style dataset."
        )
    if subset is not None:
        raise ValueError("`subset` needs a map-style dataset (indices to keep); filter inside the iterable dataset instead.")
    if with_indices or example_weights is not None:
        raise ValueError("`with_indices` and `example_weights` need a map-style dataset (items have no indices in a stream).")

