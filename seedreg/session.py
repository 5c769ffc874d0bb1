"""SeedSession: the one object an experiment holds.

It owns the global deterministic setup, derives and records a seed per component, and hands out
builders bound to itself, so that everything random in a run is seeded, independent, recorded and
replayable. Constructing a session changes no global state; ``setup()`` does, once.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch

from . import distributed as _dist
from . import rng as _rng
from ._log import enabled as log_enabled
from ._log import logger as log
from .builders import Builders
from .data import SeededDataLoader
from .devices import check_cuda_devices, check_device
from .derive import DEFAULT_SCHEME, InstanceId, check_master_seed, check_scheme
from .determinism import DeterminismSettings, GlobalSetup, environment
from .dump import write_manifest
from .errors import SeedregError
from .loaders import LoaderBook
from .manifest import Manifest, PathLike
from .records import SeedRecord
from .registry import Registry
from .replay import Replay, open_replay
from .results import Results
from .resume import SessionState
from .rng import Fork
from .trace import Trace

__all__ = ["SeedSession"]


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

    def __init__(self, master_seed: int, *, deterministic: bool = True, warn_only: bool = True,
                 fill_uninitialized_memory: bool = True, scheme: str = DEFAULT_SCHEME, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        self.master_seed = check_master_seed(master_seed)
        self.scheme = check_scheme(scheme)
        self.settings = DeterminismSettings.checked(deterministic=deterministic, warn_only=warn_only,
                                                    fill_uninitialized_memory=fill_uninitialized_memory)
        self.rank, self.world_size = _dist.resolve_rank(rank, world_size)
        # the collaborators, each given what it needs; a replay is handed to those that check against it
        self._registry = Registry(self.master_seed, self.scheme)
        self._setup = GlobalSetup(self.master_seed, self.settings)
        self._builders = Builders(self._registry, self._setup)
        self._results = Results()
        self._replay: Optional[Replay] = None
        self._trace: Optional[Trace] = None
        self._compose()
        self.resumed = False  # load_state_dict was called: this run continues another

    def _compose(self) -> None:
        """The collaborators that hold this process's loaders (made again in a spawned copy)."""
        self._book = LoaderBook(self._registry, self._setup, rank=self.rank, world_size=self.world_size, owner=self)
        identity = {"master_seed": self.master_seed, "scheme": self.scheme, "rank": self.rank, "world_size": self.world_size}
        self._state = SessionState(identity, self._registry, self._book)
        self._book.replay = self._state.replay = self._replay

    def _start_replay(self, replay: Replay) -> None:
        self._replay = replay
        self._registry.replay_against(replay)
        self._book.replay = self._state.replay = self._results.replay = replay

    def __repr__(self) -> str:
        return (f"SeedSession({self.master_seed}, scheme={self.scheme!r}, deterministic={self.settings.deterministic}, "
                f"rank={self.rank}, world_size={self.world_size})")

    def __getstate__(self) -> Dict[str, Any]:
        # A copy sent to a spawned worker: it keeps the registry (which then refuses uses) but
        # neither the loaders nor the violation log of this process.
        state = dict(self.__dict__)
        state["_book"] = state["_state"] = None
        state["_trace"] = None  # it holds the model
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._compose()

    # -- global setup ------------------------------------------------------------------------------

    def setup(self) -> "SeedSession":
        """Seed python, numpy, torch and CUDA and apply the deterministic settings; once per session.

        With one process the global generators get `master_seed` itself; with several, each rank
        gets a seed derived from (master seed, rank), so dropout differs across ranks.
        """
        if self._setup.is_set_up:
            return self
        self._setup.apply(self.master_seed if self.world_size == 1 else self.rank_seed("global"))
        if log_enabled(logging.INFO):
            log.info("seedreg_setup", master_seed=self.master_seed, rank=self.rank, world_size=self.world_size)
        return self

    @property
    def violations(self) -> List[Dict[str, str]]:
        """Nondeterminism that happened: ops without a deterministic kernel, late CUBLAS settings."""
        return list(self._setup.violations)

    # -- seeds -------------------------------------------------------------------------------------

    def seed(self, purpose: str, instance_id: InstanceId = None) -> int:
        """The seed of (purpose, instance_id): derived once, memoized; every call is a recorded use."""
        return self._registry.get(purpose, instance_id, "seed")

    def _seed(self, purpose: str, instance_id: InstanceId, kind: str) -> int:
        return self._registry.get(purpose, instance_id, kind)

    def rank_seed(self, purpose: str, instance_id: InstanceId = None) -> int:
        """A seed for (purpose, instance_id) that differs across ranks (dropout, augmentation noise)."""
        return self._seed(f"{purpose}/rank{self.rank}", instance_id, "rank_seed")

    def generator(self, purpose: str, instance_id: InstanceId = None, device: Union[str, torch.device] = "cpu") -> torch.Generator:
        """A new ``torch.Generator`` on `device`, at the start of the stream of (purpose, instance_id)."""
        dev = check_device(device)
        seed = self._seed(purpose, instance_id, "generator")
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        return _rng.issue(g)

    def numpy_rng(self, purpose: str, instance_id: InstanceId = None) -> np.random.Generator:
        """A new ``numpy.random.Generator`` (PCG64) at the start of the stream of (purpose, instance_id)."""
        return np.random.default_rng(self._seed(purpose, instance_id, "numpy_rng"))

    def fork(self, purpose: str, instance_id: InstanceId = None, *, devices: Optional[Sequence[int]] = None,
             python: bool = False, numpy: bool = False, enabled: bool = True) -> Fork:
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
            devices = check_cuda_devices(devices)
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
            devices = check_cuda_devices(devices)
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
        return self._results.record(name, value)

    def adopt_results(self, entries: Any) -> None:
        """Take over results a checkpointed run recorded (entries of :attr:`results`, as saved with a
        checkpoint): each one not yet recorded here is added, and checked when replaying. The
        integrations call it when they resume; a hand-written resume can too."""
        self._results.adopt(entries)

    def has_result(self, name: str) -> bool:
        """Whether a result named `name` was recorded (or adopted) in this session."""
        return name in self._results

    @property
    def results(self) -> List[Dict[str, Any]]:
        """Every result recorded so far, in order."""
        return self._results.entries()

    # -- step traces -------------------------------------------------------------------------------

    def trace(self, model: torch.nn.Module, *, every: int = 1, grads: bool = True, buffers: bool = True) -> Trace:
        """A step trace of `model`: call ``trace.step(step, loss=loss)`` after each
        ``optimizer.step()``. Every `every`-th step keeps an exact fingerprint of the loss, (with
        `grads`) each ``.grad``, each parameter and (with `buffers`) each buffer (BatchNorm's running
        statistics, persistent or not), read from the model at that step; :meth:`dump` writes them
        beside the manifest.
        In a session made by :meth:`from_manifest` each step is compared as it is traced, and the
        first difference is ``replay_report()["first_divergence"]`` (strict: it raises there).

        >>> s = SeedSession(0).setup()
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
        self._trace = Trace(model, every=every, grads=grads, buffers=buffers,
                            expected=None if replay is None else replay.trace_expected,
                            on_divergence=None if replay is None else replay.trace_diverged,
                            resumed=lambda: self.resumed)
        if replay is not None:
            replay.trace = self._trace
        return self._trace

    @property
    def current_trace(self) -> Optional[Trace]:
        """The trace :meth:`trace` started, or None."""
        return self._trace

    # -- builders ----------------------------------------------------------------------------------

    def build_model(self, factory: Callable[..., Any], instance_id: InstanceId = None, **kwargs: Any) -> Any:
        """``factory(**kwargs)`` inside a fork of python, numpy and torch seeded with the seed of
        ("model", instance_id): the weights do not depend on anything drawn before, and the global
        generators are as they were afterwards. A module's class, size and fingerprint are recorded
        with the use (and checked against the manifest when replaying)."""
        return self._builders.model(factory, instance_id, kwargs)

    def build_optimizer(
        self, optimizer_class: Type[torch.optim.Optimizer], params: Any, instance_id: InstanceId = None, **kwargs: Any
    ) -> torch.optim.Optimizer:
        """``optimizer_class(params, **kwargs)`` inside a fork seeded with the seed of ("optimizer", instance_id).
        Its class and every hyperparameter of each parameter group are recorded with the use."""
        return self._builders.optimizer(optimizer_class, params, instance_id, kwargs)

    def build_dataloader(self, dataset: Any, instance_id: InstanceId = None, *, batch_size: Optional[int] = 1,
                         shuffle: bool = False, num_workers: int = 0, drop_last: bool = False, seed_per_example: bool = True,
                         subset: Any = None, subset_mode: str = "drop", with_indices: bool = False,
                         example_weights: Optional[torch.Tensor] = None, **dataloader_kwargs: Any) -> SeededDataLoader:
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
        return self._book.build(dataset, instance_id, batch_size, shuffle, num_workers, drop_last, seed_per_example, subset,
                                subset_mode, with_indices, example_weights, dataloader_kwargs)

    def subset_mask(self, num_examples: int, alpha: float, instance_id: InstanceId, *, mode: str = "fixed") -> np.ndarray:
        """A deterministic bool mask over `num_examples` for LDS model `instance_id`: "fixed" keeps
        exactly ``round(alpha * n)``, "bernoulli" keeps each with probability `alpha`. Recorded,
        with a digest of the mask."""
        return self._builders.subset_mask(num_examples, alpha, instance_id, mode)

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
        session = cls(manifest.master_seed, scheme=manifest.scheme, deterministic=settings["deterministic"],
                      warn_only=settings["warn_only"], fill_uninitialized_memory=settings["fill_uninitialized_memory"],
                      rank=rank, world_size=world_size)
        session._start_replay(open_replay(manifest, source, strict=strict, rank=session.rank, world_size=session.world_size))
        return session

    def replay_report(self) -> Dict[str, Any]:
        """What the replay used and produced against what was recorded, and the verdict:
        ``bitwise``, ``diverged`` (a use or result differs) or ``statistical`` (the environment does)."""
        if self._replay is None:
            raise SeedregError("replay_report() needs a session made by SeedSession.from_manifest(...).")
        return self._replay.report(list(self._registry), environment(self.world_size), set_up=self._setup.is_set_up)

    # -- manifest ----------------------------------------------------------------------------------

    def manifest(self) -> Manifest:
        """The manifest of this session (this rank's records)."""
        return Manifest(master_seed=self.master_seed, scheme=self.scheme, records=self.records, settings=self.settings.to_dict(),
                        applied=self._setup.applied, environment=environment(self.world_size), violations=tuple(self.violations),
                        world_size=self.world_size, results=self.results,
                        replay=self.replay_report() if self._replay is not None else None)

    def dump(self, path: PathLike) -> pathlib.Path:
        """Write the manifest atomically to `path` and return the path. A step trace (:meth:`trace`)
        is written first, beside it, as `path` + ``.trace``, and named with its SHA-256 in the manifest.
        With world_size > 1 this is collective: every rank must call it; rank 0 gathers every
        rank's records and writes one manifest for the job (others return the same path)."""
        return write_manifest(self.manifest(), path, trace=self._trace, rank=self.rank, world_size=self.world_size)

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The whole random state of this rank, JSON-native: the registry (every key and its uses),
        the global generators (python, numpy, torch CPU, CUDA devices in use) and the position of
        each loader the program still holds (by instance id and use)."""
        return self._state.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`. Everything is validated before anything changes.

        Each loader in `state` must have been built again (same instance id, same use) before
        loading; it continues at the first batch not yet consumed. The global generators are
        restored right before the next batch is drawn from any of this session's loaders (so
        nothing that runs in between can consume them), or at once if the session has no loaders.
        """
        self._state.load(state)
        self.resumed = True

    def check_state_dict(self, state: Any) -> None:
        """Check `state` as :meth:`load_state_dict` would before its loaders exist (its identity,
        records, generators and each loader entry), changing nothing; raises :class:`StateError`."""
        self._state.check(state)

    def rewind_point(self) -> Dict[str, Any]:
        """The global generators and every live loader's position (JSON-native), to go back to in
        this process with :meth:`rewind` (``magic.StepCheckpoints`` keeps one per checkpoint)."""
        return self._state.rewind_point()

    def rewind(self, point: Mapping[str, Any]) -> None:
        """Put the generators and loader positions of :meth:`rewind_point` back at once. The
        registry's uses stay as they are, and loaders built since are left alone."""
        self._state.rewind(point)

    def live_loaders(self) -> List[Any]:
        """The loaders this session built that the program still holds, in the order they were built."""
        return self._book.live()
