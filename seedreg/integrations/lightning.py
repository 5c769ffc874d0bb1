"""PyTorch Lightning: one callback that makes a ``Trainer.fit`` seeded, resumable and audited.

    session = SeedSession(42)
    callback = SeedregCallback(session)       # calls session.setup(): do this before building the model
    model = MyModule(session)                 # builds its layers with session.build_model, its
                                              # loaders with session.build_dataloader
    trainer = Trainer(callbacks=[callback], max_epochs=3)
    trainer.fit(model)                        # writes seedreg-manifest.json into the log directory
    trainer.fit(model, ckpt_path="last.ckpt") # resumes mid-epoch exactly

What it does:

- every checkpoint carries the session's state (its registry, the global generators, each
  loader's position; with several processes, every rank's, gathered into the file rank 0 writes)
  under ``checkpoint["seedreg"]``, with each training loader's position set to
  the batches the training loop took (the loader's own count can differ: Lightning fetches ahead
  of the loop for loaders without a length, and calls ``set_epoch`` after it created the epoch's
  iterator);
- on resume it restores that state once the loaders exist (at ``on_train_start``) and restarts the
  training iterator at the first batch not taken (Lightning created it, before that hook, from the
  loaders as they were built), so a fit interrupted mid-epoch and resumed ends
  with the same weights, byte for byte, as one that was never interrupted;
- a checkpoint saved after a fit that ``max_steps`` stopped mid-epoch (``trainer.save_checkpoint``)
  is written as a mid-epoch one, so a longer fit continued from it equals one fit of that length;
- it validates the checkpoint's seedreg state whole before anything is applied (a
  :class:`~seedreg.StateError` naming the field otherwise), and never takes ``final_weights``
  from it: the run records its own where it ends;
- it records the initial and final weights as results (``initial_weights``, ``final_weights``)
  and dumps the manifest into ``trainer.log_dir`` (or ``default_root_dir``) at the end of fit,
  and again at the end of ``validate``, ``test`` and ``predict``, so that the manifest covers
  every stage the script ran and a replay of the script checks them all;
- ``predict`` takes a session loader built in ``predict_dataloader()`` (Lightning re-creates it to
  note each batch's indices; it keeps its order and per-example streams).

With several processes, launch with ``torchrun`` (the session reads its rank and world size from
the environment torchrun sets) and pass ``Trainer(strategy="ddp", use_distributed_sampler=False)``.

It refuses, with the fix in the message, what would silently break reproducibility: Lightning's
distributed sampler replacing seedreg's (``use_distributed_sampler=False`` is needed with several
processes: seedreg's loaders shard across ranks themselves), a session whose rank or world size is
not the trainer's, ``Trainer(deterministic=False)`` undoing ``setup()``, a checkpoint without
seedreg's state, and streaming (``IterableDataset``) training loaders, whose mid-epoch resume under
Lightning's prefetching is not supported yet.

Exact resume holds for checkpoints taken at the end of a training batch or of an epoch (what
``ModelCheckpoint`` does with ``every_n_train_steps`` or per epoch), with per-example random streams
(the default ``seed_per_example=True``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the older package name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError:
        raise ImportError(
            "seedreg.integrations.lightning needs PyTorch Lightning: pip install \"seedreg[lightning]\" "
            "(or pip install lightning)."
        ) from None

import torch

from ..data import SeededDataLoader
from ..errors import SeedregError
from ..session import SeedSession
from ..streaming import SeededIterableLoader
from ._common import carried_state, check_manifest_name, check_session, check_trace_every, record_weights_once

__all__ = ["SeedregCallback"]

_KEY = "seedreg"
_FORMAT = "seedreg-lightning"


def _train_loaders(trainer: Any) -> List[Any]:
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    return [] if combined is None else list(combined.flattened)


class SeedregCallback(pl.Callback):
    """Seeds, checkpoints, resumes and audits a Lightning fit through `session`.

    Args:
        session: the run's :class:`~seedreg.SeedSession`; its ``setup()`` is called here (once),
            so construct the callback before the model.
        manifest: file name of the manifest written into the trainer's log directory at the end of
            fit (``None`` writes none).
        record_weights: record ``initial_weights`` and ``final_weights`` as results.
        trace_every: trace every N-th optimizer step (``session.trace``; the step is
            ``trainer.global_step``, the loss the training step's), written beside the manifest;
            ``None`` traces nothing.
    """

    def __init__(self, session: SeedSession, *, manifest: Optional[str] = "seedreg-manifest.json", record_weights: bool = True,
                 trace_every: Optional[int] = None) -> None:
        self.session = check_session(session).setup()
        self.manifest = check_manifest_name(manifest)
        self.record_weights = record_weights
        self.trace_every = check_trace_every(trace_every)
        self._trace_state: Optional[Mapping[str, Any]] = None
        self.manifest_path: Optional[pathlib.Path] = None
        self._resume: Optional[Tuple[Mapping[str, Any], List[Dict[str, Any]]]] = None

    # -- checks ------------------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        s = self.session
        if (s.world_size, s.rank) != (trainer.world_size, trainer.global_rank):
            raise SeedregError(
                f"the session has rank {s.rank} of {s.world_size} but the trainer runs rank {trainer.global_rank} of "
                f"{trainer.world_size}; create the SeedSession in each process after the process group exists, or pass "
                f"rank= and world_size= to it."
            )
        connector = trainer._accelerator_connector
        if trainer.world_size > 1 and connector.use_distributed_sampler:
            raise SeedregError(
                "Trainer(use_distributed_sampler=True) would replace seedreg's sampler with a DistributedSampler; "
                "seedreg's loaders already shard across ranks. Pass Trainer(use_distributed_sampler=False)."
            )
        if s.settings.deterministic and not torch.are_deterministic_algorithms_enabled():
            raise SeedregError(
                "deterministic algorithms were switched off after SeedSession.setup() (Trainer(deterministic=False)?); "
                "leave Trainer's `deterministic` unset: the session applies it."
            )

    @staticmethod
    def _seeded(loaders: List[Any]) -> List[SeededDataLoader]:
        """The seeded ones among the training loaders; a streaming one is refused."""
        for loader in loaders:
            if isinstance(loader, SeededIterableLoader):
                raise SeedregError(
                    "a streaming (IterableDataset) training loader cannot be resumed exactly under Lightning yet: Lightning "
                    "fetches a batch ahead of the loop and the loader's per-worker positions cannot be wound back. Use a "
                    "map-style dataset, or a hand-written loop (seedreg resumes streaming loaders there)."
                )
        return [loader for loader in loaders if isinstance(loader, SeededDataLoader)]

    # -- checkpoints -------------------------------------------------------------------------------

    def _taken_state(self, loader: SeededDataLoader, taken: int) -> Dict[str, Any]:
        """`loader`'s state as if it had handed out only the `taken` batches the loop used."""
        state = loader.state_dict()
        sampler = dict(state["sampler"])
        n = loader.sampler.num_samples
        if taken >= len(loader):
            sampler.update(position=n, exhausted=True)
        else:
            sampler.update(position=min(taken * (loader.batch_size or 1), n), exhausted=False)
        state["sampler"] = sampler
        return state

    @staticmethod
    def _reopen_stopped_epoch(checkpoint: Dict[str, Any]) -> None:
        """A fit that `max_steps` stopped mid-epoch marks that epoch complete, so a checkpoint saved
        after it (``trainer.save_checkpoint``) would make a longer fit start the next epoch while the
        loaders stand mid-epoch. Write the loop's progress as a checkpoint taken at that batch's end
        (what ``ModelCheckpoint(every_n_train_steps=...)`` saves), which Lightning resumes mid-epoch. One
        stopped on an epoch's last batch is written as the next epoch's start."""
        fit = checkpoint.get("loops", {}).get("fit_loop")
        if not isinstance(fit, dict) or "epoch_progress" not in fit or "epoch_loop.batch_progress" not in fit:
            return
        epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
        done = batches["total"]["ready"]
        if (batches.get("is_last_batch") and batches["current"]["ready"] == batches["current"]["completed"] > 0
                and epochs["current"]["completed"] == epochs["current"]["ready"] == epochs["current"]["processed"]):
            # stopped by max_steps on an epoch's last batch, saved after the fit: the epoch is complete, but the
            # batch progress still stands at its end, which a resumed fit takes for the end of the *next* epoch
            # (and skips it). Write it as the next epoch's start.
            for key in batches["current"]:
                batches["current"][key] = 0
            batches["is_last_batch"] = False
            return
        if (batches.get("is_last_batch") or batches["current"]["ready"] == 0 or batches["total"]["completed"] != done
                or epochs["current"]["completed"] != epochs["current"]["ready"]):
            return  # saved inside the fit, or after a whole epoch: Lightning resumes it right
        for progress in (epochs["total"], epochs["current"]):
            progress["processed"] -= 1
            progress["completed"] -= 1
        for progress in (batches["total"], batches["current"]):
            progress["completed"] -= 1
        stepped = fit.get("epoch_loop.state_dict", {})
        if "_batches_that_stepped" in stepped:
            stepped["_batches_that_stepped"] -= 1
        if isinstance(checkpoint.get("epoch"), int):
            checkpoint["epoch"] = epochs["current"]["completed"]

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        self._reopen_stopped_epoch(checkpoint)
        state = self.session.state_dict()
        loaders = _train_loaders(trainer)
        train = self._seeded(loaders)
        combined = None
        if train:
            taken = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
            fixed = {id(loader): self._taken_state(loader, taken) for loader in train}
            by_key = {(loader.instance_id, loader.use): fixed[id(loader)] for loader in train}
            state["loaders"] = [by_key.get((ls["instance_id"], ls["use"]), ls) for ls in state["loaders"]]
            # Lightning keeps each stateful loader's own state_dict() too; keep the two in agreement
            stateful = [l for l in loaders if hasattr(l, "state_dict") and hasattr(l, "load_state_dict")]
            combined = [fixed.get(id(l)) or l.state_dict() for l in stateful]
            fit = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
            if "combined_loader" in fit:
                fit["combined_loader"] = combined
        mine = {"rank": self.session.rank, "session": state, "results": self.session.results, "combined_loader": combined}
        if self.trace_every is not None and self.session.current_trace is not None:
            mine["trace"] = self.session.current_trace.state_dict()
        # Every rank runs this hook, only rank 0 writes the file: gather each rank's state into it
        ranks: List[Any] = [mine]
        if self.session.world_size > 1:
            ranks = [None] * self.session.world_size
            torch.distributed.all_gather_object(ranks, mine)
        checkpoint[_KEY] = {"format": _FORMAT, "version": 1, "ranks": ranks}

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        saved = checkpoint.get(_KEY)
        if not isinstance(saved, dict) or saved.get("format") != _FORMAT or saved.get("version") != 1:
            raise SeedregError(
                "this checkpoint holds no seedreg state (it was saved without SeedregCallback, or by another version), so "
                "the run cannot resume exactly; resume from a checkpoint saved with SeedregCallback, or start the fit afresh."
            )
        if trainer.state.fn != "fit":
            return  # validate/test/predict from a checkpoint: Lightning restores the weights, nothing is resumed
        ranks = saved.get("ranks")
        s = self.session
        if not isinstance(ranks, list) or len(ranks) != s.world_size or not isinstance(ranks[s.rank], dict):
            raise SeedregError(
                f"this checkpoint holds seedreg states for {len(ranks) if isinstance(ranks, list) else 0} rank(s) but the run "
                f"has {s.world_size}; resume with as many processes as the run that saved it."
            )
        mine = ranks[s.rank]
        # validated whole here, applied at on_train_start (once the loaders exist)
        self._resume = carried_state(s, {k: v for k, v in mine.items() if k != "trace"}, f"checkpoint['seedreg']['ranks'][{s.rank}]")
        if self.trace_every is not None:
            if "trace" not in mine:
                raise SeedregError("this checkpoint was saved without a step trace (SeedregCallback without trace_every), so "
                                   "the resumed run's trace would miss its first steps; resume without trace_every, or start afresh.")
            self._trace_state = mine["trace"]
        # Lightning restores its copy of the training loaders' states (rank 0's) before our hook:
        # hand it this rank's
        fit = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        if "combined_loader" in fit and mine.get("combined_loader") is not None:
            fit["combined_loader"] = mine["combined_loader"]

    # -- the fit -------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.record_weights and self._resume is None:
            record_weights_once(self.session, "initial_weights", pl_module)
        if self.trace_every is not None:
            trace = self.session.current_trace
            if trace is None:
                trace = self.session.trace(pl_module, every=self.trace_every)
            elif trace.model is not pl_module:
                raise SeedregError("the session already traces another model; trace_every traces the LightningModule being fit.")
            if self._trace_state is not None:
                state, self._trace_state = self._trace_state, None
                trace.load_state_dict(state)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        trace = self.session.current_trace
        if self.trace_every is not None and trace is not None and (trainer.global_step + 1) % self.trace_every == 0:
            trace.take_grads()  # the gradients of the step about to be taken, before anything clears them

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        trace = self.session.current_trace
        step = trainer.global_step
        if self.trace_every is None or trace is None or (trace.last_step is not None and step <= trace.last_step) or step == 0:
            return  # no optimizer step since the last one traced (gradient accumulation)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs if isinstance(outputs, torch.Tensor) else None
        trace.step(step, loss=loss)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._seeded(_train_loaders(trainer))
        if self._resume is None:
            return
        (state, results), self._resume = self._resume, None
        # the registry, every loader's position (the training loaders' as the loop took them) and
        # the global generators, which are put back right before the next batch is drawn
        self.session.load_state_dict(state)
        self.session.adopt_results(results)
        # Lightning created the training iterator before this hook, from the loaders as they were
        # built: start it again at the first batch not taken
        fetcher = trainer.fit_loop._data_fetcher
        if fetcher is not None:
            iter(fetcher)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.record_weights:
            record_weights_once(self.session, "final_weights", pl_module)
        self._dump(trainer)

    # validate, test and predict after (or without) a fit: the manifest is written again at the end
    # of each, so it covers every stage the script ran and a replay of the script checks them all

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "validate":  # not the validation inside a fit
            self._dump(trainer)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._dump(trainer)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._dump(trainer)

    def _dump(self, trainer: Any) -> None:
        if self.manifest is not None:
            directory = trainer.log_dir or trainer.default_root_dir
            self.manifest_path = self.session.dump(pathlib.Path(directory) / self.manifest)
