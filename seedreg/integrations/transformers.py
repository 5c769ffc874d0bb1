"""Hugging Face ``transformers``: a ``Trainer`` whose loaders, checkpoints and resume are seedreg's.

    session = SeedSession(42).setup()
    model = session.build_model(lambda: BertForSequenceClassification(config), "model")
    trainer = SeedregTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, session=session)
    trainer.train()                                    # writes OUTPUT_DIR/seedreg-manifest.json
    trainer.train(resume_from_checkpoint=True)         # resumes mid-epoch exactly

What changes from ``transformers.Trainer``:

- the train, eval and test loaders are ``session.build_dataloader`` loaders (instance ids
  ``"train"``, ``"eval"`` or ``"eval:NAME"``, ``"test"``), with the Trainer's batch sizes, collator
  (unused columns removed as usual) and worker settings; they are not handed to Accelerate, which
  would rebuild them around a sampler of its own;
- each checkpoint folder gets ``seedreg_state.json`` (the session's registry, global generators and
  loader positions) beside the Trainer's own files; on resume the training loader continues at the
  first batch not trained on (the Trainer's own batch skipping, which rebuilds the loader, is not
  used) and the generators are restored before the next batch; the state is validated whole
  (registry, generators, loader identities, results) before anything is applied, and the final
  weights are recorded where the resumed run ends, never taken from the checkpoint;
- ``set_seed(args.seed)``, which ``Trainer.__init__`` calls, does not override the session's
  seeding: the global generators are put back as they were before it. ``args.seed`` and
  ``args.data_seed`` are not used; the session's master seed is, and a value of either other
  than its default or the master seed is refused (a sweep over ``args.seed`` would train one run
  N times: sweep ``SeedSession(seed)``);
- the initial and final weights are recorded as results, and the manifest is written to
  ``args.output_dir`` when ``train()`` ends.

A checkpoint saved at the last step of an epoch is written before that epoch's evaluation, and the
Trainer does not run that evaluation again on resume: the weights are the same, the manifest lists
one use of the evaluation loader fewer.

Refused, with the fix in the message: ``model_init`` (it builds the model outside the session,
after reseeding with ``args.seed``), ``ignore_data_skip=True`` (a resumed epoch would be counted
from its start), an ``IterableDataset`` for training, a session whose world size is not the
Trainer's, and a checkpoint without ``seedreg_state.json``.
"""

from __future__ import annotations

import io
import json
import pathlib
from typing import Any, Dict, Optional

try:
    import transformers
    import transformers.trainer as _trainer_module
except ImportError:  # pragma: no cover
    raise ImportError(
        "seedreg.integrations.transformers needs Hugging Face transformers: pip install \"seedreg[transformers]\" "
        "(or pip install transformers)."
    ) from None

import torch

from ..data import SeededDataLoader
from ..errors import ManifestError, SeedregError, StateError
from ..manifest import atomic_write, read_regular_file
from ..rng import capture_raw, restore_raw
from ..session import SeedSession
from ._common import carried_state, check_manifest_name, check_session, check_trace_every, record_weights_once

__all__ = ["SeedregTrainer", "STATE_FILE", "TRACE_FILE"]

#: The file each checkpoint folder gets beside the Trainer's own.
STATE_FILE = "seedreg_state.json"
TRACE_FILE = "seedreg_trace.pt"
_FORMAT = "seedreg-transformers"
_MAX_STATE_BYTES = 1 << 30  # a session state is a few KiB a loader and ~200 bytes a seed


def _check_seeds(args: Any, session: SeedSession) -> None:
    """`args.seed` and `args.data_seed` are not used (the session's master seed is): refuse values
    that say otherwise, so that a sweep over them does not train N copies of one run."""
    fields = type(args).__dataclass_fields__
    for name in ("seed", "data_seed"):
        value, default = getattr(args, name, None), fields[name].default if name in fields else None
        if value != default and value != session.master_seed:
            raise SeedregError(
                f"TrainingArguments({name}={value!r}) would not change this run: SeedregTrainer seeds everything from the "
                f"session's master seed ({session.master_seed}). Sweep seeds with SeedSession(seed) instead, and leave "
                f"`{name}` at its default ({default!r}) or equal to the master seed."
            )


class SeedregTrainer(transformers.Trainer):
    """A :class:`transformers.Trainer` seeded, checkpointed and resumed through `session`.

    Takes the Trainer's arguments, plus `session` (keyword only), `manifest` (the file name
    written into ``args.output_dir`` when ``train()`` ends; ``None`` writes none) and
    `trace_every` (trace every N-th optimizer step with ``session.trace``: the step is
    ``state.global_step``, the loss that of the step's last micro-batch; ``None`` traces nothing).
    """

    def __init__(self, *args: Any, session: SeedSession, manifest: Optional[str] = "seedreg-manifest.json",
                 trace_every: Optional[int] = None, **kwargs: Any) -> None:
        check_session(session)
        trace_every = check_trace_every(trace_every)
        if not (hasattr(transformers.Trainer, "_run_epoch") and hasattr(_trainer_module, "skip_first_batches")):
            raise SeedregError(
                f"SeedregTrainer needs transformers >= 5.24 (it resumes through Trainer._run_epoch); this is "
                f"{transformers.__version__}. pip install -U \"seedreg[transformers]\"."
            )
        if kwargs.get("model_init") is not None:
            raise SeedregError(
                "SeedregTrainer does not take `model_init`: it builds the model outside the session after reseeding with "
                "args.seed. Build the model with session.build_model(...) and pass model=."
            )
        manifest = check_manifest_name(manifest)
        session.setup()
        generators = capture_raw()
        super().__init__(*args, **kwargs)
        restore_raw(generators)  # Trainer.__init__ reseeded python, numpy and torch with args.seed
        _check_seeds(self.args, session)
        if self.args.ignore_data_skip:
            raise SeedregError(
                "SeedregTrainer resumes its training loader at the first batch not trained on; ignore_data_skip=True would "
                "make the Trainer count the resumed epoch from its start. Leave ignore_data_skip=False."
            )
        if self.args.world_size != session.world_size:
            raise SeedregError(
                f"the session has world size {session.world_size} but the Trainer runs {self.args.world_size} processes; "
                f"create the SeedSession in each process (it reads the rank and world size torchrun sets)."
            )
        self.session = session
        self.manifest = manifest
        self.manifest_path: Optional[pathlib.Path] = None
        self._seedreg_train_loader: Optional[SeededDataLoader] = None
        self._seedreg_checkpoint: Optional[str] = None
        self.trace_every = trace_every
        self._seedreg_loss: Any = None
        self._seedreg_hooked: Any = None
        if trace_every is not None:
            self.add_callback(_TraceSteps(self))

    # -- loaders -----------------------------------------------------------------------------------

    def _seeded_loader(self, dataset: Any, instance_id: str, description: str, batch_size: int, *, shuffle: bool,
                       drop_last: bool = False) -> SeededDataLoader:
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise SeedregError(
                f"SeedregTrainer's {description.lower()} loader needs a map-style dataset (with __len__ and __getitem__); "
                f"got an IterableDataset. Stream through a hand-written loop with session.build_dataloader instead."
            )
        collator = self.data_collator
        if _trainer_module.is_datasets_available() and isinstance(dataset, _trainer_module.datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description=description)
        else:
            collator = self._get_collator_with_removed_columns(collator, description=description)
        a = self.args
        workers = a.dataloader_num_workers
        extra: Dict[str, Any] = {"pin_memory": a.dataloader_pin_memory}
        if workers:
            extra.update(persistent_workers=a.dataloader_persistent_workers, prefetch_factor=a.dataloader_prefetch_factor,
                         multiprocessing_context=a.dataloader_multiprocessing_context)
        return self.session.build_dataloader(dataset, instance_id, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                             drop_last=drop_last, collate_fn=collator, **extra)

    def get_train_dataloader(self) -> SeededDataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        loader = self._seeded_loader(self.train_dataset, "train", "Training", self._train_batch_size, shuffle=True,
                                     drop_last=self.args.dataloader_drop_last)
        self._seedreg_train_loader = loader
        return loader

    def get_eval_dataloader(self, eval_dataset: Any = None) -> SeededDataLoader:
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        name = eval_dataset if isinstance(eval_dataset, str) else None
        eval_sets: Any = self.eval_dataset
        dataset = eval_sets[name] if name is not None else eval_dataset if eval_dataset is not None else self.eval_dataset
        return self._seeded_loader(dataset, "eval" if name is None else f"eval:{name}", "Evaluation", self.args.eval_batch_size,
                                   shuffle=False, drop_last=self.args.dataloader_drop_last)

    def get_test_dataloader(self, test_dataset: Any) -> SeededDataLoader:
        return self._seeded_loader(test_dataset, "test", "test", self.args.eval_batch_size, shuffle=False)

    # -- checkpoints ---------------------------------------------------------------------------------

    def _state_file(self, checkpoint: str) -> pathlib.Path:
        s = self.session
        return pathlib.Path(checkpoint) / (STATE_FILE if s.world_size == 1 else f"seedreg_state_{s.rank}.json")

    def _trace_file(self, checkpoint: str) -> pathlib.Path:
        s = self.session
        return pathlib.Path(checkpoint) / (TRACE_FILE if s.world_size == 1 else f"seedreg_trace_{s.rank}.pt")

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        state = {"format": _FORMAT, "version": 1, "session": self.session.state_dict(), "results": self.session.results}
        if self.trace_every is not None and self.session.current_trace is not None:
            buffer = io.BytesIO()
            torch.save(self.session.current_trace.state_dict(), buffer)
            atomic_write(self._trace_file(output_dir), buffer.getvalue())
        atomic_write(self._state_file(output_dir), json.dumps(state).encode())

    def _seedreg_resume_trace(self, checkpoint: str) -> None:
        """The trace of the steps before the checkpoint, so that the resumed run's trace is whole."""
        path = self._trace_file(checkpoint)
        if not path.exists():
            raise SeedregError(f"{path} does not exist: the checkpoint was saved without trace_every, so the resumed run's "
                               f"trace would miss its first steps; resume without trace_every, or start afresh.")
        try:
            state = torch.load(io.BytesIO(read_regular_file(path, _MAX_STATE_BYTES)), weights_only=True)
        except ManifestError as exc:
            raise StateError(f"{path}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - whatever torch says of a damaged file
            raise StateError(f"{path} cannot be loaded ({type(exc).__name__}); the checkpoint is damaged.") from None
        self._seedreg_start_trace().load_state_dict(state)

    def _seedreg_start_trace(self) -> Any:
        trace = self.session.current_trace
        if trace is None:
            assert self.model is not None and self.trace_every is not None
            trace = self.session.trace(self.model, every=self.trace_every)
        elif trace.model is not self.model:
            raise SeedregError("the session already traces another model; trace_every traces the Trainer's model.")
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        if optimizer is not None and self._seedreg_hooked is not optimizer:
            optimizer.register_step_pre_hook(self._seedreg_before_step)
            self._seedreg_hooked = optimizer
        return trace

    def _seedreg_before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        trace = self.session.current_trace
        if trace is not None and self.trace_every is not None and (self.state.global_step + 1) % self.trace_every == 0:
            trace.take_grads()  # the Trainer clears .grad after the step, before on_step_end

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(*args, **kwargs)
        if self.trace_every is not None:
            self._seedreg_start_trace()
            self._seedreg_loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
        return loss

    def _seedreg_resume(self) -> None:
        """Apply the resumed checkpoint's session state, once: registry, results, the position of
        every loader this process holds; the global generators before the next batch."""
        checkpoint, self._seedreg_checkpoint = self._seedreg_checkpoint, None
        if checkpoint is None:
            return
        s = self.session
        path = self._state_file(checkpoint)
        if not path.exists():
            raise SeedregError(
                f"{path} does not exist: the checkpoint was not saved by SeedregTrainer, so the run cannot resume exactly. "
                f"Resume from a checkpoint SeedregTrainer saved, or start afresh."
            )
        try:
            saved = json.loads(read_regular_file(path, _MAX_STATE_BYTES))
        except ManifestError as exc:
            raise StateError(f"{path}: {exc}") from None
        except RecursionError:
            raise StateError(f"{path} is nested too deeply to be a seedreg state; the checkpoint is damaged.") from None
        except ValueError as exc:
            raise StateError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged.") from None
        if not isinstance(saved, dict) or saved.get("format") != _FORMAT or saved.get("version") != 1:
            raise StateError(f"{path} is not a seedreg checkpoint state (format {_FORMAT!r}, version 1).")
        # validated whole before anything is applied
        try:
            state, results = carried_state(s, saved, STATE_FILE)
        except StateError as exc:
            raise StateError(f"{path}: {exc}") from None
        train = self._seedreg_train_loader
        live = {(type(loader.instance_id), loader.instance_id, loader.use) for loader in s.live_loaders()}
        # evaluation loaders are built afresh for each evaluation: only those this process holds are restored
        kept = [ls for ls in state["loaders"] if (type(ls["instance_id"]), ls["instance_id"], ls.get("use")) in live]
        if train is not None and not any((ls["instance_id"], ls["use"]) == (train.instance_id, train.use) for ls in kept):
            raise StateError(f"{path} holds no position for the training loader; build the loaders as the run that saved it did.")
        s.load_state_dict({**state, "loaders": kept})
        s.adopt_results(results)
        if self.trace_every is not None:
            self._seedreg_resume_trace(checkpoint)

    def _load_rng_state(self, checkpoint: Optional[str]) -> None:
        # the session's state holds the generators (CUDA included) and the loaders' positions
        self._seedreg_resume()

    def _inner_training_loop(self, *args: Any, **kwargs: Any) -> Any:
        checkpoint = kwargs.get("resume_from_checkpoint", args[2] if len(args) > 2 else None)
        self._seedreg_checkpoint = checkpoint
        if checkpoint is None:
            record_weights_once(self.session, "initial_weights", self.model)
        return super()._inner_training_loop(*args, **kwargs)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # The Trainer resumes mid-epoch by rebuilding the loader around a batch-skipping sampler
        # (accelerate's skip_first_batches). The seeded loader resumes from the session state
        # instead, so for it the skip puts that state in place and hands the loader back.
        original = _trainer_module.skip_first_batches

        def skip_first_batches(loader: Any, num_batches: int = 0) -> Any:
            if loader is not self._seedreg_train_loader:
                return original(loader, num_batches)
            self._seedreg_resume()
            seeded: Any = loader
            where = seeded.sampler.position, seeded.sampler.num_samples
            expected = min(num_batches * (seeded.batch_size or 1), where[1])
            if where[0] != expected:
                raise StateError(
                    f"the checkpoint's training loader stands at sample {where[0]} of its epoch but the Trainer resumes after "
                    f"{num_batches} batches ({expected} samples); the checkpoint and trainer_state.json disagree."
                )
            return loader

        _trainer_module.skip_first_batches = skip_first_batches
        try:
            return super()._run_epoch(*args, **kwargs)
        finally:
            _trainer_module.skip_first_batches = original

    def train(self, *args: Any, **kwargs: Any) -> Any:
        output = super().train(*args, **kwargs)
        record_weights_once(self.session, "final_weights", self.model)
        if self.manifest is not None:
            self.manifest_path = self.session.dump(pathlib.Path(str(self.args.output_dir)) / self.manifest)
        return output


class _TraceSteps(transformers.TrainerCallback):
    """Traces each optimizer step once the Trainer has counted it."""

    def __init__(self, trainer: SeedregTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trace = self.trainer.session.current_trace
        if trace is not None and (trace.last_step is None or state.global_step > trace.last_step):
            trace.step(state.global_step, loss=self.trainer._seedreg_loss)
