"""SeedSession: the one object an experiment holds.

It owns the global deterministic setup, derives and records a seed per component, and hands out
builders bound to itself, so that everything random in a run is seeded, independent, recorded and
replayable. Constructing a session changes no global state; ``setup()`` does, once.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import threading
import warnings
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import attrs

import numpy as np
import torch

from . import distributed as _dist
from .masks import make_subset_mask, mask_digest
from .data import STREAMS, SeededDataLoader
from .streaming import SeededIterableLoader, check_iterable_args
from .derive import DEFAULT_SCHEME, InstanceId, check_instance_id, check_master_seed, check_scheme
from .determinism import DeterminismSettings, ViolationLog, apply_settings, environment
from .errors import ReplayMismatchError, SeedregError, SeedregWarning, StateError
from .fingerprint import fingerprint, result_entry
from .manifest import Manifest, PathLike, atomic_write
from .records import SeedRecord, record_from_dict, record_to_dict
from .registry import Registry
from .replay import Replay
from .rng import Fork, capture_global, decode_global, restore_global, seed_globals
from .sampler import DeterministicSampler, subset_indices
from .trace import Trace
from .tracefile import load_trace, trace_entry

__all__ = ["SeedSession"]

from ._log import enabled as log_enabled
from ._log import logger as log

STATE_FORMAT = "seedreg-state"
STATE_VERSION = 2
_READABLE_STATES = (1, 2)  # 1: seedreg 0.1.0 (records with one ``details``, loaders in build order)
_REFUSED_LOADER_ARGS = {
    "sampler": "the session supplies a DeterministicSampler; pass shuffle= and subset= instead",
    "batch_sampler": "the session batches its own sampler; pass batch_size= and drop_last= instead",
    "generator": "the session supplies a generator seeded from the loader's seed",
}


def _jsonable(value: Any) -> Any:
    """Best-effort JSON-native copy of small config values (tuples become lists, others their repr)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _copy_rng(rng: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of a validated generator state (``capture_global``'s layout: two levels of dicts over
    strings and numbers), so that neither the caller's dict nor the session's is shared."""
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in rng.items()}


def _check_loader_identity(loader_state: Any, i: int, version: int) -> None:
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


def _check_device(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"`device` must name a torch device such as 'cpu' or 'cuda:0', got {device!r}.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` is {device!r} but this process sees no CUDA device; use device='cpu'.")
    return dev


def _check_cuda_devices(devices: Any) -> List[int]:
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


class SeedSession:
    """Seeds, records and replays every source of randomness in one experiment.

    >>> session = SeedSession(42)
    >>> session.seed("model", "training")
    1958051794
    >>> [r.kind for r in session.records]
    ['seed']

    Parameters mirror what ``setup()`` applies: `deterministic` turns on PyTorch's deterministic
    algorithms, cuDNN's deterministic mode and ``CUBLAS_WORKSPACE_CONFIG``; `warn_only` lets ops
    without a deterministic kernel run (recorded as violations) instead of raising;
    `fill_uninitialized_memory` is torch's setting of that name (its largest cost on GPUs).
    `rank` / `world_size` default to torch.distributed's, then torchrun's environment, then 0 / 1.

    Every request for a seed is a *use* of its key, recorded in order with what it seeded; a
    session made by :meth:`from_manifest` checks each use, and each :meth:`record_result`, against
    the recorded run. Seeds are requested in the session's own process: a DataLoader worker that
    asks for one gets a :class:`SeedregError` saying what to do instead.
    """

    def __init__(
        self,
        master_seed: int,
        *,
        deterministic: bool = True,
        warn_only: bool = True,
        fill_uninitialized_memory: bool = True,
        scheme: str = DEFAULT_SCHEME,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        self.master_seed = check_master_seed(master_seed)
        self.scheme = check_scheme(scheme)
        for name, value in (
            ("deterministic", deterministic),
            ("warn_only", warn_only),
            ("fill_uninitialized_memory", fill_uninitialized_memory),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__}).")
        self.settings = DeterminismSettings(
            deterministic=deterministic, warn_only=warn_only, fill_uninitialized_memory=fill_uninitialized_memory
        )
        self.rank, self.world_size = _dist.resolve_rank(rank, world_size)
        self._registry = Registry(self.master_seed, self.scheme)
        self._violations = ViolationLog()
        self._applied: Dict[str, Any] = {}
        self._is_set_up = False
        # Held weakly: a loader the program dropped is freed and leaves state_dict().
        self._loaders: "weakref.WeakValueDictionary[int, SeededDataLoader]" = weakref.WeakValueDictionary()
        self._loaders_lock = threading.Lock()  # a thread building a loader while another takes state_dict()
        self._loaders_built = 0
        self._pending_rng: Optional[Tuple[Dict[str, Any], Dict[str, Any]]] = None
        self._replay: Optional[Replay] = None
        self._results: Dict[str, Dict[str, Any]] = {}
        self._warned_setup = False
        self._trace: Optional[Trace] = None

    def __repr__(self) -> str:
        return (
            f"SeedSession({self.master_seed}, scheme={self.scheme!r}, deterministic={self.settings.deterministic}, "
            f"rank={self.rank}, world_size={self.world_size})"
        )

    def __getstate__(self) -> Dict[str, Any]:
        # A copy sent to a spawned worker: it keeps the registry (which then refuses uses) but
        # neither the loaders nor the violation log of this process.
        state = dict(self.__dict__)
        state["_loaders"] = None
        state["_loaders_lock"] = None
        state["_violations"] = None
        state["_trace"] = None  # it holds the model
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._loaders = weakref.WeakValueDictionary()
        self._loaders_lock = threading.Lock()
        self._violations = ViolationLog()

    # -- global setup ------------------------------------------------------------------------------

    def setup(self) -> "SeedSession":
        """Seed python, numpy, torch and CUDA and apply the deterministic settings; once per session.

        With one process the global generators get `master_seed` itself; with several, each rank
        gets a seed derived from (master seed, rank), so dropout differs across ranks.
        """
        if self._is_set_up:
            return self
        seed = self.master_seed if self.world_size == 1 else self.rank_seed("global")
        seed_globals(seed)
        self._applied = {"global_seed": seed, **apply_settings(self.settings, self._violations)}
        self._is_set_up = True
        if log_enabled(logging.INFO):
            log.info("seedreg_setup", master_seed=self.master_seed, rank=self.rank, world_size=self.world_size)
        return self

    @property
    def violations(self) -> List[Dict[str, str]]:
        """Nondeterminism that happened: ops without a deterministic kernel, late CUBLAS settings."""
        return list(self._violations)

    # -- seeds -------------------------------------------------------------------------------------

    def seed(self, purpose: str, instance_id: InstanceId = None) -> int:
        """The seed of (purpose, instance_id): derived once, memoized; every call is a recorded use."""
        return self._registry.get(purpose, instance_id, "seed")

    def _check_set_up(self, builder: str) -> None:
        """Warn (once a session) that a builder runs before setup(): its own draws are seeded, but
        everything the run draws from the global generators (dropout, augmentation in the main
        process, weight init outside build_model) and the deterministic kernels are not."""
        if self._is_set_up or self._warned_setup:
            return
        self._warned_setup = True
        warnings.warn(
            f"SeedSession({self.master_seed}).{builder}() was called before setup(): the global generators (python, "
            f"numpy, torch, CUDA) are not seeded and deterministic algorithms are off, so dropout and other draws outside "
            f"seedreg's builders differ between runs. Call session.setup() first (SeedSession({self.master_seed}).setup()).",
            SeedregWarning,
            stacklevel=3,
        )

    def _seed(self, purpose: str, instance_id: InstanceId, kind: str) -> int:
        return self._registry.get(purpose, instance_id, kind)

    def rank_seed(self, purpose: str, instance_id: InstanceId = None) -> int:
        """A seed for (purpose, instance_id) that differs across ranks (dropout, augmentation noise)."""
        return self._seed(f"{purpose}/rank{self.rank}", instance_id, "rank_seed")

    def generator(self, purpose: str, instance_id: InstanceId = None, device: Union[str, torch.device] = "cpu") -> torch.Generator:
        """A new ``torch.Generator`` on `device`, at the start of the stream of (purpose, instance_id)."""
        dev = _check_device(device)
        seed = self._seed(purpose, instance_id, "generator")
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        return g

    def numpy_rng(self, purpose: str, instance_id: InstanceId = None) -> np.random.Generator:
        """A new ``numpy.random.Generator`` (PCG64) at the start of the stream of (purpose, instance_id)."""
        return np.random.default_rng(self._seed(purpose, instance_id, "numpy_rng"))

    def fork(
        self,
        purpose: str,
        instance_id: InstanceId = None,
        *,
        devices: Optional[Sequence[int]] = None,
        python: bool = False,
        numpy: bool = False,
        enabled: bool = True,
    ) -> Fork:
        """A context manager that seeds torch's CPU generator (and the current CUDA device's, or
        `devices`) from the seed of (purpose, instance_id), then restores them on exit, also on error.
        `python` / `numpy` cover ``random`` and numpy's global RNG too (they cost ~10-70 us more).

        >>> session = SeedSession(0)
        >>> with session.fork("noise"):
        ...     a = torch.rand(2)
        >>> with session.fork("noise"):
        ...     b = torch.rand(2)
        >>> torch.equal(a, b)
        True
        """
        if devices is not None:
            devices = _check_cuda_devices(devices)
        return Fork(self._seed(purpose, instance_id, "fork"), devices=devices, python=python, numpy=numpy, enabled=enabled)

    def scope(self, instance_id: InstanceId, *, devices: Optional[Sequence[int]] = None, enabled: bool = True) -> Fork:
        """A block in which python's `random`, numpy's global RNG, torch's CPU generator and the
        current CUDA device's (or `devices`) are seeded from the seed of ("scope", instance_id); the
        outer state comes back on exit, also on error. Scopes nest and are recorded.

        Everything drawn inside (dropout, augmentation in the main process, ``torch.randn``) then
        depends only on (master seed, instance_id), not on what ran before: model 7 of an LDS job
        trains the same alone as at position 7.

        >>> session = SeedSession(0)
        >>> with session.scope(7):
        ...     a = torch.nn.functional.dropout(torch.ones(4))
        >>> _ = torch.rand(3)  # anything in between
        >>> with session.scope(7):
        ...     b = torch.nn.functional.dropout(torch.ones(4))
        >>> torch.equal(a, b)
        True
        """
        if devices is not None:
            devices = _check_cuda_devices(devices)
        return Fork(self._seed("scope", instance_id, "scope"), devices=devices, python=True, numpy=True, enabled=enabled)

    @property
    def records(self) -> Tuple[SeedRecord, ...]:
        """Every key used so far, in order, with its uses."""
        return self._registry.records()

    # -- results -----------------------------------------------------------------------------------

    def record_result(self, name: str, value: Any) -> Dict[str, Any]:
        """Record an outcome of the run under `name`: a module, state dict, tensor or numpy array as
        a SHA-256 fingerprint (dtype, shape and bytes), a number or string as itself. It goes into
        the manifest; a replaying session compares it with the recorded one (strict: a difference
        raises :class:`ReplayMismatchError`; the report lists matched, mismatched and missing).

        >>> s = SeedSession(0)
        >>> s.record_result("final_loss", 0.125)
        {'name': 'final_loss', 'kind': 'value', 'value': 0.125}
        """
        if type(name) is not str or not name:
            raise TypeError(f"`name` must be a non-empty str such as 'final_weights', got {name!r}.")
        if name in self._results:
            raise ValueError(f"result {name!r} was already recorded in this session; give each result its own name (e.g. f'weights_{{model_id}}').")
        entry = result_entry(name, value)
        self._results[name] = entry
        if self._replay is not None:
            self._replay.check_result(entry)
        return dict(entry)

    def _adopt_results(self, entries: Any) -> None:
        """Take over results a checkpointed process recorded (integrations' resume): each entry
        not yet recorded here is added, and checked when replaying."""
        for entry in entries or ():
            if not isinstance(entry, Mapping) or type(entry.get("name")) is not str:
                raise StateError(f"a saved result must be a dict with a 'name', got {entry!r:.60}.")
            if entry["name"] not in self._results:
                self._results[entry["name"]] = dict(entry)
                if self._replay is not None:
                    self._replay.check_result(dict(entry))

    @property
    def results(self) -> List[Dict[str, Any]]:
        """Every result recorded so far, in order."""
        return [dict(r) for r in self._results.values()]

    # -- step traces -------------------------------------------------------------------------------

    def trace(self, model: torch.nn.Module, *, every: int = 1, grads: bool = True) -> Trace:
        """A step trace of `model`: call ``trace.step(step, loss=loss)`` after each
        ``optimizer.step()``. Every `every`-th step keeps an exact fingerprint of the loss, each
        parameter and (with `grads`) each ``.grad``; :meth:`dump` writes them beside the manifest.
        In a session made by :meth:`from_manifest` each step is compared as it is traced, and the
        first difference is ``replay_report()["first_divergence"]`` (strict: it raises there).

        >>> s = SeedSession(0)
        >>> model = s.build_model(torch.nn.Linear, None, in_features=2, out_features=1)
        >>> trace = s.trace(model)
        >>> trace.step(0, loss=model(torch.ones(2)).sum())
        True
        """
        if self._trace is not None:
            raise SeedregError("this session already traces a model (one trace per session: use one session per run).")
        replay = self._replay
        if replay is not None and replay.trace_unavailable is not None:
            raise SeedregError(replay.trace_unavailable)
        expected = replay.trace_expected if replay is not None else None
        self._trace = Trace(model, every=every, grads=grads, expected=expected,
                            on_divergence=None if replay is None else replay.trace_diverged)
        if replay is not None:
            replay.trace = self._trace
        return self._trace

    # -- builders ----------------------------------------------------------------------------------

    def build_model(self, factory: Callable[..., Any], instance_id: InstanceId = None, **kwargs: Any) -> Any:
        """``factory(**kwargs)`` inside a fork of python, numpy and torch seeded with the seed of
        ("model", instance_id): the weights do not depend on anything drawn before, and the global
        generators are as they were afterwards. A module's class, size and fingerprint are recorded
        with the use (and checked against the manifest when replaying)."""
        if not callable(factory):
            raise TypeError(f"`factory` must be callable (a model class or a function), got {factory!r}.")
        instance_id = check_instance_id(instance_id)
        self._check_set_up("build_model")
        seed, use = self._registry.use("model", instance_id, "model")
        with Fork(seed, python=True, numpy=True):
            model = factory(**kwargs)
        if isinstance(model, torch.nn.Module):
            details = {
                "class": f"{type(model).__module__}.{type(model).__qualname__}",
                "compiled": hasattr(model, "_orig_mod"),
                "fingerprint": fingerprint(model),
                "parameters": int(sum(p.numel() for p in model.parameters())),
            }
            self._registry.detail("model", instance_id, use, details)
        return model

    def build_optimizer(
        self, optimizer_class: Type[torch.optim.Optimizer], params: Any, instance_id: InstanceId = None, **kwargs: Any
    ) -> torch.optim.Optimizer:
        """``optimizer_class(params, **kwargs)`` inside a fork seeded with the seed of ("optimizer", instance_id).
        Its class and every hyperparameter of each parameter group are recorded with the use."""
        if not callable(optimizer_class):
            raise TypeError(f"`optimizer_class` must be an optimizer class such as torch.optim.SGD, got {optimizer_class!r}.")
        instance_id = check_instance_id(instance_id)
        self._check_set_up("build_optimizer")
        seed, use = self._registry.use("optimizer", instance_id, "optimizer")
        with Fork(seed, python=True, numpy=True):
            optimizer = optimizer_class(params, **kwargs)
        groups = [
            {**{k: _jsonable(v) for k, v in g.items() if k != "params"}, "params": len(g.get("params", ()))}
            for g in getattr(optimizer, "param_groups", ())
        ]
        details = {
            "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "defaults": _jsonable(getattr(optimizer, "defaults", {})),
            "param_groups": groups,
        }
        self._registry.detail("optimizer", instance_id, use, details)
        return optimizer

    def build_dataloader(
        self,
        dataset: Any,
        instance_id: InstanceId = None,
        *,
        batch_size: Optional[int] = 1,
        shuffle: bool = False,
        num_workers: int = 0,
        drop_last: bool = False,
        seed_per_example: bool = True,
        subset: Any = None,
        subset_mode: str = "drop",
        with_indices: bool = False,
        example_weights: Optional[torch.Tensor] = None,
        **dataloader_kwargs: Any,
    ) -> SeededDataLoader:
        """A DataLoader whose order, augmentation and position are determined by the seed of
        ("dataloader", instance_id).

        - ``.sampler`` is a :class:`DeterministicSampler` (sharded across ranks when world_size > 1);
          a loop that forgets ``set_epoch`` still reshuffles each epoch, deterministically.
        - With `seed_per_example` (default), ``random``, numpy and torch are seeded per example from
          (loader seed, epoch, index) in whichever process fetches it, so ``num_workers`` does not
          change results; otherwise each worker is seeded from (loader seed, epoch, worker id).
        - `subset` (a bool mask or indices) keeps only those examples, in the order they have in
          the full loader, with the same per-example streams; ``subset_mode="weight"`` keeps every
          batch of the full run and yields ``(batch, weights)`` (float32) with 0.0 for removed examples.
          Several loaders may share one key (the LDS pattern): each is its own recorded use.
        - `with_indices` yields ``(indices, batch)`` (a LongTensor of dataset indices);
          `example_weights` (a float tensor over the dataset, which may require grad) yields
          ``weights[indices]`` after the batch (times the subset's 0/1 weights in weight mode), so a
          loss can be weighted differentiably. ``loader.batch_at(step)`` and
          ``loader.batch_indices(epoch)`` give any batch, or its indices, at random.
        - The loader reports to the session while the program holds it: ``state_dict()`` and the
          manifest include it.
        """
        if dataloader_kwargs and not _REFUSED_LOADER_ARGS.keys().isdisjoint(dataloader_kwargs):
            name = next(n for n in _REFUSED_LOADER_ARGS if n in dataloader_kwargs)
            raise TypeError(f"build_dataloader() does not take `{name}`: {_REFUSED_LOADER_ARGS[name]}.")
        iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        if not iterable and (not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__")):
            raise TypeError(
                f"`dataset` must be a map-style dataset (with __getitem__ and __len__) or a torch IterableDataset, "
                f"got {type(dataset).__name__}."
            )
        instance_id = check_instance_id(instance_id)
        self._check_set_up("build_dataloader")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"`batch_size` must be an int >= 1 or None, got {batch_size!r}.")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be an int >= 0, got {num_workers!r}.")
        flags = (("shuffle", shuffle), ("drop_last", drop_last), ("seed_per_example", seed_per_example), ("with_indices", with_indices))
        for name, value in flags:
            if type(value) is not bool:
                raise TypeError(f"`{name}` must be a bool, got {value!r}.")
        if subset_mode not in ("drop", "weight"):
            raise ValueError(f"`subset_mode` must be 'drop' or 'weight', got {subset_mode!r}.")
        if iterable:
            return self._build_iterable_loader(
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
        streams = 1 if self._replay is not None and self._replay.legacy else STREAMS
        seed, use = self._registry.use("dataloader", instance_id, "dataloader")
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
            **dataloader_kwargs,
        )
        loader._use = use
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
        self._registry.detail("dataloader", instance_id, use, details, ignore=("num_workers",) if seed_per_example else ())
        return self._register(loader)

    def _register(self, loader: Any) -> Any:
        """Hold `loader` weakly, so that state_dict() and a pending resume reach it while the program does."""
        with self._loaders_lock:
            self._loaders[self._loaders_built] = loader
            self._loaders_built += 1
        loader.__dict__["_session"] = self  # for tools that take a loader and need its session (magic.metagradient)
        if self._pending_rng is not None:
            loader._before_batch = self._apply_pending_rng
        return loader

    def _build_iterable_loader(self, dataset: Any, instance_id: InstanceId, *, batch_size: Optional[int], shuffle: bool,
                               num_workers: int, drop_last: bool, subset: Any, with_indices: bool, example_weights: Any,
                               **dataloader_kwargs: Any) -> SeededIterableLoader:
        check_iterable_args(shuffle=shuffle, subset=subset, with_indices=with_indices, example_weights=example_weights)
        seed, use = self._registry.use("dataloader", instance_id, "dataloader")
        loader = SeededIterableLoader(
            dataset, seed=seed, instance_id=instance_id, batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
            rank=self.rank, world_size=self.world_size, **dataloader_kwargs,
        )
        loader._use = use
        details = {
            "dataset_kind": "iterable",
            "batch_size": batch_size,
            "drop_last": drop_last,
            "num_workers": num_workers,
            "world_size": self.world_size,
            "worker_split": f"{self.world_size} rank(s) x {max(1, num_workers)} stream(s)",
            "resume_mode": loader.resume_mode,
        }
        self._registry.detail("dataloader", instance_id, use, details)
        return self._register(loader)

    def subset_mask(self, num_examples: int, alpha: float, instance_id: InstanceId, *, mode: str = "fixed") -> np.ndarray:
        """A deterministic bool mask over `num_examples` for LDS model `instance_id`: "fixed" keeps
        exactly ``round(alpha * n)``, "bernoulli" keeps each with probability `alpha`. Recorded,
        with a digest of the mask."""
        from .masks import check_mask_args

        check_mask_args(num_examples, alpha, mode)
        seed, use = self._registry.use("subset_mask", instance_id, "subset_mask")
        mask = make_subset_mask(seed, int(num_examples), float(alpha), mode)
        details = {"num_examples": int(num_examples), "alpha": float(alpha), "mode": mode, "kept": int(mask.sum()), "digest": mask_digest(mask)}
        self._registry.detail("subset_mask", check_instance_id(instance_id), use, details)
        return mask

    # -- replay ------------------------------------------------------------------------------------

    @classmethod
    def from_manifest(cls, source: Union[PathLike, Manifest], *, strict: bool = True, rank: Optional[int] = None, world_size: Optional[int] = None) -> "SeedSession":
        """A session that replays the run `source` recorded: same master seed, scheme and settings.

        Every seed is re-derived and checked against the manifest (a changed derivation always
        raises :class:`ReplayMismatchError`). Use k of each key is checked against recorded use k
        (its kind and details: model fingerprints, loader settings, optimizer hyperparameters), and
        each :meth:`record_result` against the recorded result. With `strict` a difference, or a
        key the manifest lacks, raises at once; otherwise it is listed in :meth:`replay_report`.
        """
        manifest = source if isinstance(source, Manifest) else Manifest.load(source)
        if not isinstance(strict, bool):
            raise TypeError(f"`strict` must be a bool, got {strict!r}.")
        settings = manifest.settings
        session = cls(
            manifest.master_seed,
            scheme=manifest.scheme,
            deterministic=settings["deterministic"],
            warn_only=settings["warn_only"],
            fill_uninitialized_memory=settings["fill_uninitialized_memory"],
            rank=rank,
            world_size=world_size,
        )
        if strict and session.world_size != manifest.world_size:
            raise ReplayMismatchError(
                f"the manifest was written by a run of world_size={manifest.world_size}, this process has "
                f"world_size={session.world_size}; launch with the same number of ranks, or replay with strict=False."
            )
        expected = manifest.records_for_rank(session.rank) if manifest.world_size == session.world_size else manifest.records
        session._replay = Replay(manifest, expected, strict=strict, legacy=manifest.read_version < 2,
                                 environment=functools.partial(environment, session.world_size))
        session._registry.replay_against(session._replay)
        if manifest.trace is not None:
            if isinstance(source, Manifest):
                session._replay.trace_unavailable = (
                    f"the manifest has a step trace ({manifest.trace['file']}) but the session was made from a Manifest "
                    f"object, which does not say where the trace lies: pass the manifest's path to from_manifest().")
            else:
                session._replay.trace_expected = load_trace(source, manifest.trace)
        return session

    def replay_report(self) -> Dict[str, Any]:
        """What the replay used and produced against what was recorded, and the verdict:
        ``bitwise``, ``diverged`` (a use or result differs) or ``statistical`` (the environment does)."""
        if self._replay is None:
            raise SeedregError("replay_report() needs a session made by SeedSession.from_manifest(...).")
        return self._replay.report(list(self._registry), environment(self.world_size), set_up=self._is_set_up)

    # -- manifest ----------------------------------------------------------------------------------

    def manifest(self) -> Manifest:
        """The manifest of this session (this rank's records)."""
        return Manifest(
            master_seed=self.master_seed,
            scheme=self.scheme,
            records=self.records,
            settings=self.settings.to_dict(),
            applied=self._applied,
            environment=environment(self.world_size),
            violations=tuple(self.violations),
            world_size=self.world_size,
            replay=self.replay_report() if self._replay is not None else None,
            results=self.results,
        )

    def dump(self, path: PathLike) -> pathlib.Path:
        """Write the manifest atomically to `path` and return the path. A step trace (:meth:`trace`)
        is written first, beside it, as `path` + ``.trace``, and named with its SHA-256 in the manifest.

        With world_size > 1 this is collective: every rank must call it; rank 0 gathers every
        rank's records and writes one manifest for the job (others return the same path).
        """
        path = pathlib.Path(path)
        manifest = self.manifest()
        if self._trace is not None and self.rank == 0:  # after DDP's all-reduce every rank holds the same weights
            data = self._trace.data()
            payload = data.encode()
            trace_path = path.with_name(path.name + ".trace")
            atomic_write(trace_path, payload)
            manifest = attrs.evolve(manifest, trace=trace_entry(trace_path.name, payload, data))
        if self.world_size == 1:
            return manifest.write(path)
        if not _dist.is_initialized():
            raise SeedregError(
                f"dump() with world_size={self.world_size} is collective and needs an initialised "
                f"torch.distributed process group; call torch.distributed.init_process_group() first."
            )
        gathered = _dist.gather_json([record_to_dict(r) for r in manifest.records], dst=0)
        error = None
        if self.rank == 0:
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

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The whole random state of this rank, JSON-native: the registry (every key and its uses),
        the global generators (python, numpy, torch CPU, CUDA devices in use) and the position of
        each loader the program still holds (by instance id and use)."""
        rng = _copy_rng(self._pending_rng[1]) if self._pending_rng is not None else capture_global()
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "master_seed": self.master_seed,
            "scheme": self.scheme,
            "rank": self.rank,
            "world_size": self.world_size,
            "records": self._registry.state_dict(),
            "rng": rng,
            "loaders": [loader.state_dict() for loader in self._live_loaders()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`. Everything is validated before anything changes.

        Each loader in `state` must have been built again (same instance id, same use) before
        loading; it continues at the first batch not yet consumed. The global generators are
        restored right before the next batch is drawn from any of this session's loaders (so
        nothing that runs in between can consume them), or at once if the session has no loaders.
        """
        self._load_state(state)

    def _rewind_state(self) -> Dict[str, Any]:
        """The random state and loader positions alone (JSON-native), for an in-process rewind."""
        rng = _copy_rng(self._pending_rng[1]) if self._pending_rng is not None else capture_global()
        return {"rng": rng, "loaders": [loader.state_dict() for loader in self._live_loaders()]}

    def _rewind(self, state: Mapping[str, Any]) -> None:
        """Put back :meth:`_rewind_state` at once (StepCheckpoints): the registry and its uses stay
        as they are, and loaders built since are left alone. Validated whole before anything changes."""
        if not isinstance(state, Mapping) or set(state) != {"rng", "loaders"}:
            raise StateError("a rewind state must be a dict with 'rng' and 'loaders' (from a StepCheckpoints checkpoint).")
        rng = decode_global(state["rng"])
        self._load_loaders(self._match_loaders(state["loaders"], STATE_VERSION))
        self._pending_rng = None
        for loader in self._live_loaders():
            loader._before_batch = None
        restore_global(rng)

    def _load_state(self, state: Mapping[str, Any]) -> None:
        """Validate `state` whole, then apply it."""
        version, memo, rng = self._check_state(state)
        self._load_loaders(self._match_loaders(state["loaders"], version))
        self._registry.install(memo)
        loaders = self._live_loaders()
        if loaders:
            self._pending_rng = (rng, _copy_rng(state["rng"]))  # the caller's dict stays the caller's
            for loader in loaders:
                loader._before_batch = self._apply_pending_rng
        else:
            restore_global(rng)

    def _check_state(self, state: Any) -> Tuple[int, Any, Any]:
        """Everything about `state` that can be checked before its loaders exist, changing nothing:
        returns its version, the registry memo and the decoded generators. Each loader entry's
        identity is checked here; its position when it is matched to a loader."""
        if not isinstance(state, Mapping):
            raise StateError(f"`state` must be a dict from SeedSession.state_dict(), got {type(state).__name__}.")
        version = state.get("version")
        if state.get("format") != STATE_FORMAT or version not in _READABLE_STATES or type(version) is not int:
            raise StateError(
                f"`state` is not a seedreg state of version {STATE_VERSION} (format={state.get('format')!r:.40}, "
                f"version={version!r:.20})."
            )
        for key in ("master_seed", "scheme", "world_size", "rank"):
            if key not in state:
                raise StateError(f"`state` is missing {key!r}.")
            mine = getattr(self, key)
            if state[key] != mine or type(state[key]) is not type(mine):
                raise StateError(
                    f"`state` has {key}={state[key]!r:.40} but this session has {key}={mine!r}; a state only "
                    f"resumes the run that saved it (same master seed, scheme, world size and rank)."
                )
        for key in ("records", "rng", "loaders"):
            if key not in state:
                raise StateError(f"`state` is missing {key!r}.")
        if not isinstance(state["records"], list):
            raise StateError("`state['records']` must be a list.")
        try:
            records = [record_from_dict(r, f"state['records'][{i}]", schema=version) for i, r in enumerate(state["records"])]
        except SeedregError as exc:
            raise StateError(str(exc)) from None
        memo = self._registry.memo_from_records(records)
        if self._replay is not None:
            try:
                self._replay.check_state(records)
            except ReplayMismatchError as exc:
                raise StateError(f"`state` does not belong to the run being replayed: {exc}") from None
        rng = decode_global(state["rng"])
        loaders = state["loaders"]
        if not isinstance(loaders, list):
            raise StateError(f"`state['loaders']` must be a list, got {type(loaders).__name__}.")
        for i, loader_state in enumerate(loaders):
            _check_loader_identity(loader_state, i, version)
        return version, memo, rng

    @staticmethod
    def _load_loaders(pairs: List[Tuple[Any, Mapping[str, Any]]]) -> None:
        """Load each loader's state; if one refuses its state, put the others back as they were."""
        snapshots = [(loader, loader.state_dict()) for loader, _ in pairs]
        try:
            for loader, loader_state in pairs:
                loader.load_state_dict(loader_state)
        except SeedregError:
            for loader, snapshot in snapshots:
                loader.load_state_dict(snapshot)
            raise

    def _live_loaders(self) -> List[SeededDataLoader]:
        with self._loaders_lock:
            return list(self._loaders.values())

    def _match_loaders(self, states: Any, version: int) -> List[Tuple[SeededDataLoader, Mapping[str, Any]]]:
        """Pair each loader state with the live loader of the same (instance id, use)."""
        if not isinstance(states, list):
            raise StateError(f"`state['loaders']` must be a list, got {type(states).__name__}.")
        live = {}
        for loader in self._live_loaders():
            live[(type(loader.instance_id), loader.instance_id, loader._use)] = loader
        pairs = []
        seen: Dict[Any, int] = {}
        for i, loader_state in enumerate(states):
            _check_loader_identity(loader_state, i, version)
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

    def _apply_pending_rng(self) -> None:
        pending, self._pending_rng = self._pending_rng, None
        for loader in self._live_loaders():
            loader._before_batch = None
        if pending is not None:
            restore_global(pending[0])
