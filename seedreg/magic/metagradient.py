"""The metagradient itself: train with checkpoints, then walk the steps backwards pulling the
adjoint through each exactly replayed step (see :mod:`seedreg.magic`)."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import attrs
import torch

from ..errors import SeedregError
from .checkpoints import SCHEDULES
from .replayed import BatchCache, Progress, RunCheckpoints, check_loader, train_loop
from .runstore import RunStore, definition
from .stepper import Adjoint, Stepper, vjp
from .steps import make_steps

__all__ = ["MetagradientResult", "Trained", "metagradient", "train"]


@attrs.frozen
class MetagradientResult:
    """What :func:`metagradient` returns.

    - ``grad``: d target / d w at w = 1, a tensor with one entry per training example, or
      ``(k, examples)`` for a target of k values;
    - ``target``: the target's value after training (a list of k values for a vector target);
    - ``model``: the trained model (its parameters and buffers as after the last step);
    - ``stats``: ``steps``, ``states_kept`` (the most training states held at once),
      ``seconds_forward``, ``seconds_backward`` (of which ``seconds_replay`` re-ran training steps
      from their checkpoints and ``seconds_vjp`` pulled the adjoint back through them),
      ``reverse_passes``, ``graphs_kept`` (whether the reverse pass kept each segment's graphs, or
      recomputed its steps exactly because the kept steps did not reproduce the run bit for bit)
      and ``trained`` (whether this call trained: False when a :class:`Trained` run is asked again);
    - ``sign``: ``"loss"``, the convention of ``grad`` (d target / d w: positive when weighting the
      example up raises the target). dattri and TRAK give "helpfulness" (the opposite sign for a
      loss): ``lds_score(..., sign=result.sign)`` scores either correctly.
    """

    grad: torch.Tensor
    target: Any
    model: torch.nn.Module
    stats: Dict[str, Any]
    sign: str = "loss"


def _losses(loss: Any, example_losses: Any) -> Callable[[torch.nn.Module, Any], torch.Tensor]:
    """The per-example losses of a batch, from `example_losses(model, batch)` or `loss(model(x), y)`."""
    if (loss is None) == (example_losses is None):
        raise TypeError("pass exactly one of `loss` (loss(output, y) for (x, y) batches) and `example_losses` "
                        "(example_losses(model, batch) -> one loss per example, for any batch structure).")
    fn = loss if loss is not None else example_losses
    if not callable(fn):
        raise TypeError(f"`{'loss' if loss is not None else 'example_losses'}` must be callable, got {fn!r:.60}.")
    if example_losses is not None:
        return example_losses

    def from_pairs(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            what = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            raise SeedregError(f"`loss=` takes (x, y) batches, but the loader yields {what}; pass example_losses=(model, "
                               f"batch) -> one loss per example instead (any batch structure: extras, dicts).")
        x, y = batch
        return loss(model(x), y)

    return from_pairs


def _check_options(epochs: Any, accumulate: Any, max_grad_norm: Any, scheduler: Any, optimizer: Any, schedule: Any) -> None:
    if type(epochs) is not int or epochs < 1:
        raise ValueError(f"`epochs` must be an int >= 1, got {epochs!r}.")
    if type(accumulate) is not int or accumulate < 1:
        raise ValueError(f"`accumulate` must be an int >= 1 (loader batches per optimizer step), got {accumulate!r}.")
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                      or not math.isfinite(max_grad_norm) or max_grad_norm <= 0):
        raise ValueError(f"`max_grad_norm` must be a finite float > 0 (clip_grad_norm_'s max_norm) or None, got {max_grad_norm!r}.")
    if scheduler is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("`scheduler` goes with a torch.optim optimizer; magic.SGD/Adam/AdamW take lr as a callable step -> lr.")
        if getattr(scheduler, "optimizer", None) is not optimizer or not hasattr(scheduler, "state_dict"):
            raise TypeError(f"`scheduler` must be a torch.optim.lr_scheduler built on `optimizer`, got {type(scheduler).__name__}.")
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise TypeError("`scheduler` is ReduceLROnPlateau, which steps on a metric the training loop does not have; use a "
                            "scheduler that steps once per optimizer step.")
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {schedule!r}.")


class Trained:
    """A training run kept for attribution: :func:`train` made it. ``model`` is the trained model
    (the plain loop's), ``stats`` what training cost; :meth:`metagradient` computes the
    metagradients of any target through the run, as often as asked, without training again."""

    def __init__(self, *, model: torch.nn.Module, stepper: Stepper, checkpoints: Any, batches: BatchCache, total: int,
                 stats: Dict[str, Any], was_training: bool) -> None:
        self.model = model
        self.stats = stats
        self._stepper = stepper
        self._checkpoints = checkpoints
        self._batches = batches
        self._total = total
        self._was_training = was_training

    def __repr__(self) -> str:
        return f"Trained({type(self.model).__name__}, {self._total} steps, trained={self.stats.get('trained')})"

    def _target(self, target: Callable[..., Any]) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        """The target's value (a scalar or k values) and its gradients, k rows each, with respect
        to the final trainable parameters and BatchNorm statistics (zeros where it ignores them)."""
        stepper, model = self._stepper, self.model
        model.eval()
        try:
            final = {n: p.detach().clone().requires_grad_() for n, p in zip(stepper.names, stepper.params)}
            stats = {n: b.detach().clone().requires_grad_() for n, b in model.named_buffers() if n in stepper.stat_names}
            with torch.enable_grad():
                def f(*args: Any, **kwargs: Any) -> Any:
                    return stepper.evaluate(final, stats, args, kwargs)

                value = target(f)
                if (not isinstance(value, torch.Tensor) or value.dim() > 1 or value.numel() < 1
                        or not value.is_floating_point()):
                    raise SeedregError(f"`target(f)` must return a floating-point scalar, or a 1-d tensor of k values (one "
                                       f"per test example), got {value!r:.80}.")
                inputs = [*final.values(), *stats.values()]
                rows = value.reshape(-1)
                k = len(rows)
                raw = vjp([rows], inputs, [torch.eye(k, dtype=rows.dtype, device=rows.device)], k) if value.requires_grad \
                    else [None] * len(inputs)
        finally:
            model.train()
        grads = [torch.zeros((k, *i.shape), dtype=i.dtype, device=i.device) if g is None else g.detach() for i, g in zip(inputs, raw)]
        return value.detach(), grads[: len(final)], grads[len(final) :]

    def metagradient(self, target: Callable[..., Any], *, chunk: Optional[int] = None) -> MetagradientResult:
        """d target / d w through the run. `target(f)` returns a scalar (``grad`` has one entry per
        training example) or k values, one per test example (``grad`` is ``(k, examples)``, row j
        the metagradient of entry j): the k adjoints travel the reverse pass together, `chunk` of
        them at a time to bound memory (each chunk is one reverse pass)."""
        if not callable(target):
            raise TypeError(f"`target` must be callable, got {target!r}.")
        if chunk is not None and (type(chunk) is not int or chunk < 1):
            raise ValueError(f"`chunk` must be an int >= 1 (targets per reverse pass) or None (all at once), got {chunk!r}.")
        started = time.perf_counter()
        value, param_grads, stat_grads = self._target(target)
        k = param_grads[0].shape[0]
        weights = self._stepper.weights
        grad = torch.zeros((k, *weights.shape), dtype=weights.dtype, device=weights.device)
        passes = 0
        seconds = {"replay": 0.0, "vjp": 0.0}  # the reverse passes' time re-running steps and in their VJPs
        if any(bool(g.any()) for g in (*param_grads, *stat_grads)):  # else exactly 0: the reverse pass is linear
            size = k if chunk is None else chunk
            for lo in range(0, k, size):
                grad[lo : lo + size], spent = self._reverse([g[lo : lo + size] for g in param_grads],
                                                            [g[lo : lo + size] for g in stat_grads])
                for part, took in spent.items():
                    seconds[part] += took
                passes += 1
        self.model.train(self._was_training)
        stats = {**self.stats, "seconds_backward": time.perf_counter() - started, "seconds_replay": seconds["replay"],
                 "seconds_vjp": seconds["vjp"], "reverse_passes": passes, "states_kept": self._checkpoints.peak_states,
                 "graphs_kept": self._checkpoints.kept_graphs}
        return MetagradientResult(grad=grad[0] if value.dim() == 0 else grad,
                                  target=float(value) if value.dim() == 0 else value.tolist(), model=self.model, stats=stats)

    def _reverse(self, param_grads: List[torch.Tensor], stat_grads: List[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """One reverse pass for a chunk of adjoints, and its seconds by part; the trained state is
        put back after it."""
        checkpoints, stepper = self._checkpoints, self._stepper
        world = stepper.ranks.world  # each rank holds its share of the adjoint (ranks.py)
        adjoint = Adjoint([g / world for g in param_grads] if world > 1 else param_grads,
                          [g / world for g in stat_grads] if world > 1 else stat_grads, stepper.weights)
        trained = checkpoints.capture()
        self.model.train()
        seconds = checkpoints.reverse_kept(stepper, adjoint, Progress(self._total), trained)
        # the reverse pass left the state before step 0: put the trained one back (model, gradients,
        # optimizer, scheduler, generators and loader positions as the plain loop leaves them)
        checkpoints.apply_state(trained, last_use=True)
        return stepper.ranks.sum_(adjoint.grad), seconds


def train(
    model: torch.nn.Module,
    loader: Any,
    optimizer: Any,
    *,
    epochs: int,
    loss: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    example_losses: Optional[Callable[[torch.nn.Module, Any], torch.Tensor]] = None,
    scheduler: Any = None,
    max_grad_norm: Optional[float] = None,
    accumulate: int = 1,
    schedule: str = "sqrt",
    allow_low_precision: bool = False,
    store: Any = None,
    offload: bool = True,
) -> Trained:
    """Train `model` as :func:`metagradient` does (the arguments are its own) and keep the run for
    attribution: ``trained.metagradient(target)`` for any number of targets, without retraining.

    With `store` (a directory) the checkpoints live on disk, with the run's definition (master
    seed, initial weights, loader key and data, optimizer and scheduler settings, epochs, schedule,
    accumulation, clipping). Another process that builds the same run and calls ``train(...,
    store=DIR)`` gets ``stats["trained"] is False``, the trained weights (and optimizer, scheduler
    and loader positions) and bit-identical metagradients; a store of another definition is a
    StateError naming what differs; a run killed while training is trained again; a second process
    calling while one trains is told so. `offload` keeps the checkpoints of a model on a GPU in host
    memory (the default: the device would hold 2 sqrt(steps) copies of the weights and optimizer
    state); ``offload=False`` keeps them on the device. The bits are the same either way.

    >>> import torch.nn.functional as F
    >>> from seedreg import SeedSession, magic
    >>> s = SeedSession(0).setup()
    >>> model = s.build_model(torch.nn.Linear, "m", in_features=3, out_features=2).double()
    >>> data = torch.utils.data.TensorDataset(torch.randn(8, 3, dtype=torch.float64), torch.arange(8) % 2)
    >>> loader = s.build_dataloader(data, "train", batch_size=4, shuffle=True)
    >>> run = magic.train(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), epochs=2,
    ...                   loss=lambda out, y: F.cross_entropy(out, y, reduction="none"))
    >>> x, y = torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 1, 1])
    >>> scores = run.metagradient(lambda f: F.cross_entropy(f(x), y, reduction="none"))  # 3 test examples
    >>> tuple(scores.grad.shape)
    (3, 8)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise SeedregError("`model` is wrapped in DistributedDataParallel; pass the plain module (ddp.module): "
                           "metagradient averages the gradients across ranks itself, as DDP does, and differentiates that.")
    _check_options(epochs, accumulate, max_grad_norm, scheduler, optimizer, schedule)
    losses = _losses(loss, example_losses)
    steps = make_steps(optimizer, model)
    params = steps.params
    if not params:
        raise ValueError("`model` has no trainable parameter (each has requires_grad=False, or is in no param group).")
    low = sorted({str(p.dtype) for p in params if p.dtype in (torch.float16, torch.bfloat16)})
    if low and not allow_low_precision:
        raise SeedregError(
            f"`model` has {', '.join(low)} parameters: a metagradient sums thousands of steps' adjoints, which half "
            f"precision loses. Train in float32 or float64 (model.double()), or pass allow_low_precision=True."
        )
    session = check_loader(loader)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ValueError("`loader` yields no batch per epoch (drop_last with fewer examples than a batch).")
    total = epochs * steps_per_epoch
    weights = torch.ones(len(loader.dataset), dtype=params[0].dtype, device=params[0].device, requires_grad=True)
    stepper = Stepper(model, steps, losses, weights, steps_per_epoch=steps_per_epoch, accumulate=accumulate,
                      max_grad_norm=None if max_grad_norm is None else float(max_grad_norm), scheduler=scheduler,
                      allow_low_precision=allow_low_precision)
    progress = Progress(total)
    was_training = model.training
    model.train()
    if stepper.ranks.world > 1:
        agreed = definition(session=session, model=model, loader=loader, optimizer=optimizer, scheduler=scheduler,
                            epochs=epochs, schedule=schedule, accumulate=accumulate, max_grad_norm=max_grad_norm,
                            data=False)  # each rank's shard differs
        stepper.ranks.check(model, loader, stepper.stat_names, agreed)
    opt, extra = steps.checkpointed()
    batches = BatchCache()
    runstore = None
    if store is not None:
        runstore = RunStore(store, definition(session=session, model=model, loader=loader, optimizer=optimizer,
                                              scheduler=scheduler, epochs=epochs, schedule=schedule, accumulate=accumulate,
                                              max_grad_norm=max_grad_norm))
        stored = runstore.complete()
    checkpoints = RunCheckpoints(session, model, opt, loader, schedule=schedule, every=1 if schedule == "uniform" else None,
                               steps=None if schedule == "uniform" else total,
                               extra=extra + ([scheduler] if scheduler is not None else []))
    checkpoints.batches = batches
    checkpoints.offload = offload
    started = time.perf_counter()
    if runstore is not None and stored is not None:  # trained by another process: its final state
        checkpoints.adopt(runstore.states, stored["run"], stored["saved"], stored["steps"])
        checkpoints.apply_state(checkpoints.read_stored(total))
        stats = {"steps": total, "states_kept": len(stored["saved"]), "seconds_forward": time.perf_counter() - started,
                 "trained": False}
        return Trained(model=model, stepper=stepper, checkpoints=checkpoints, batches=batches, total=total, stats=stats,
                       was_training=was_training)
    if runstore is not None:
        runstore.begin()
        checkpoints.claim(runstore.states)
    try:
        train_loop(loader, epochs, stepper, checkpoints, batches, progress, model)
        if runstore is not None:
            if total not in checkpoints.saved:  # the trained state, for the processes that reuse the run
                checkpoints.store_state(total, checkpoints.capture())
            runstore.finish(checkpoints.run_id, sorted(checkpoints.saved), total)
    finally:
        if runstore is not None:
            runstore.release()
    model.train(was_training)
    stats = {"steps": total, "states_kept": checkpoints.peak_states, "seconds_forward": time.perf_counter() - started,
             "trained": True}
    return Trained(model=model, stepper=stepper, checkpoints=checkpoints, batches=batches, total=total, stats=stats,
                   was_training=was_training)


def metagradient(
    model: torch.nn.Module,
    loader: Any,
    optimizer: Any,
    *,
    epochs: int,
    target: Callable[[Callable[..., Any]], torch.Tensor],
    loss: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    example_losses: Optional[Callable[[torch.nn.Module, Any], torch.Tensor]] = None,
    scheduler: Any = None,
    max_grad_norm: Optional[float] = None,
    accumulate: int = 1,
    schedule: str = "sqrt",
    allow_low_precision: bool = False,
    chunk: Optional[int] = None,
    offload: bool = True,
) -> MetagradientResult:
    """Train `model` for `epochs` on `loader` with `optimizer`, as a plain loop does, then return
    d target / d w, with w a weight per training example (all 1): ``train(...).metagradient(target)``.

    - `loader`: a map-style loader from ``session.build_dataloader``. The training loss of a batch
      is ``mean(w[indices] * losses) / accumulate``: the counterfactual is the same run with the
      same batches, an example's loss weighted by its w (w = 0: dropped, its batch otherwise
      unchanged).
    - `optimizer`: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` built on the model's parameters
      (every param group with its own hyperparameters; its state if it has stepped), or
      ``magic.SGD``/``magic.Adam``/``magic.AdamW``. Parameters with ``requires_grad=False`` or
      in no group stay constant and are not differentiated.
    - `loss(output, y)`: one loss per example (``reduction="none"``), for ``(x, y)`` batches; or
      `example_losses(model, batch)`: the per-example losses of any batch (tuples with extras,
      dicts for Hugging Face models).
    - `scheduler`: a ``torch.optim.lr_scheduler`` on `optimizer`, stepped after each optimizer
      step; every hyperparameter it changes (lr, momentum, betas) is followed.
    - `max_grad_norm`: ``clip_grad_norm_`` over the trainable parameters before each optimizer
      step; `accumulate`: loader batches per optimizer step (counted within an epoch; an epoch's
      last partial group steps too).
    - `target(f)`: a scalar tensor from ``f``, the model in eval mode as a function of its final
      parameters and buffers (``f(x_test)``, or ``f(**inputs)``), or a 1-d tensor of k values (one
      per test example: ``grad`` is then ``(k, examples)``, in chunks of `chunk` targets). A target
      that does not depend on the model has metagradient 0.
    - `schedule`: how :class:`~seedreg.StepCheckpoints` keeps states for the reverse pass
      (``"sqrt"``: about 2 sqrt(steps) states and two forward passes; ``"log"``; ``"uniform"``);
      `offload`: keep the states of a model on a GPU in host memory (default) or on the device.

    The model trains in place and is returned as ``result.model``, with the optimizer and scheduler
    left as the plain loop leaves them. A non-finite training loss raises naming the step and the
    examples; low precision (half-precision parameters, or autocast inside ``forward``) needs
    ``allow_low_precision=True``.
    """
    if not callable(target):
        raise TypeError(f"`target` must be callable, got {target!r}.")
    run = train(model, loader, optimizer, epochs=epochs, loss=loss, example_losses=example_losses, scheduler=scheduler,
                max_grad_norm=max_grad_norm, accumulate=accumulate, schedule=schedule, allow_low_precision=allow_low_precision,
                offload=offload)
    return run.metagradient(target, chunk=chunk)
