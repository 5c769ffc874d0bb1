"""Exact replay of a training run for MAGIC: :class:`StepCheckpoints` keeps the whole training
state every k steps (model, gradients, optimizer, extra state, random generators and loader
positions) and re-runs any step from the nearest checkpoint, or visits every step backwards."""

from __future__ import annotations

import copy
import math
import os
import secrets
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import rng
from .statestore import StateStore

__all__ = ["SCHEDULES", "StepCheckpoints"]

SCHEDULES = ("uniform", "sqrt", "log")
"""The checkpoint schedules, by name (``schedule=``): ``"uniform"`` (a state every `every` steps),
``"sqrt"`` (every ``ceil(sqrt(steps))`` steps; ``magic.metagradient``'s default) and ``"log"``
(the first state only, reversed by recursive bisection)."""


class StepCheckpoints:
    """MAGIC-style exact replay of a training run: checkpoints of the whole training state, any
    step replayed, any state before a step restored, every step visited backwards.

    A state is the model's state dict (parameters, buffers) and the ``.grad`` of each parameter
    (a loop that accumulates gradients over steps replays exactly), the optimizer's state (or each
    optimizer's, given a list), each of `extra`
    (objects with ``state_dict``/``load_state_dict`` such as LR schedulers, GradScaler or EMA, or a
    ``(get, set)`` pair of callables for functional optimizer state), and the session's random
    state and loader positions. The training loop calls ``maybe_save(step)`` with the number of
    steps done (``maybe_save(0)`` before the first). Steps are re-run with
    ``step_fn(step, indices, batch)`` on ``loader.batch_at(step)``, so the loader needs per-example
    streams; `batch` is what iterating the loader yields, without the indices.

    - `schedule`: ``"uniform"`` keeps a state every `every` steps; ``"sqrt"`` every
      ``ceil(sqrt(steps))`` of a run of `steps` steps (a reverse pass then holds about
      ``2 * sqrt(steps)`` states and costs about two forward passes); ``"log"`` keeps only the first
      state and reverses by recursive bisection (at most ``log2(steps) + 2`` states at a time, about
      ``log2(steps)`` forward passes).
    - `store`: None keeps states in memory; a directory keeps them on disk (tensors with
      ``torch.save``, read back with ``weights_only=True``; the session's state as JSON). A store
      belongs to one run: it is claimed at creation (``seedreg-store.json``), another run's store
      is refused unless ``overwrite=True``, and every state file names its run and step and the
      digest of its tensors, checked before anything is restored (a ``StateError`` otherwise).

    >>> import torch
    >>> from seedreg import SeedSession
    >>> s = SeedSession(0).setup()
    >>> model = s.build_model(torch.nn.Linear, None, in_features=2, out_features=1)
    >>> opt = s.build_optimizer(torch.optim.SGD, model.parameters(), lr=0.1)
    >>> loader = s.build_dataloader(torch.randn(8, 2), batch_size=2, shuffle=True)
    >>> def step_fn(step, indices, x):
    ...     opt.zero_grad(); model(x).pow(2).mean().backward(); opt.step()
    >>> ckpt = StepCheckpoints(s, model, opt, loader, every=2)
    >>> after = {}
    >>> _ = ckpt.maybe_save(0)
    >>> for t, x in enumerate(loader):
    ...     step_fn(t, None, x); after[t] = model.weight.clone(); _ = ckpt.maybe_save(t + 1)
    >>> _ = torch.rand(5)  # disturb the global generator
    >>> ckpt.replay(3, step_fn)  # restores the checkpoint of step 2, runs steps 2 and 3
    2
    >>> torch.equal(model.weight, after[3])
    True
    """

    def __init__(
        self,
        session: Any,
        model: torch.nn.Module,
        optimizer: Any,
        loader: Any,
        *,
        every: Optional[int] = None,
        schedule: str = "uniform",
        steps: Optional[int] = None,
        extra: Sequence[Any] = (),
        store: Union[None, str, "os.PathLike[str]"] = None,
        overwrite: bool = False,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {schedule!r}.")
        if steps is not None and (type(steps) is not int or steps < 1):
            raise ValueError(f"`steps` must be an int >= 1 (the number of training steps), got {steps!r}.")
        if schedule == "uniform":
            if type(every) is not int or every < 1:
                raise ValueError(f"`every` must be an int >= 1 with schedule='uniform', got {every!r}.")
        else:
            if steps is None:
                raise ValueError(f"schedule={schedule!r} needs `steps`, the number of training steps it spreads states over.")
            if every is not None:
                raise ValueError(f"`every` goes with schedule='uniform' only; schedule={schedule!r} derives it from `steps`.")
            every = max(1, math.ceil(math.sqrt(steps))) if schedule == "sqrt" else None
        self.extra = list(extra)
        for i, e in enumerate(self.extra):
            pair = isinstance(e, tuple) and len(e) == 2 and all(callable(f) for f in e)
            if not pair and not (hasattr(e, "state_dict") and hasattr(e, "load_state_dict")):
                raise TypeError(
                    f"`extra[{i}]` ({type(e).__name__}) has no state_dict/load_state_dict; pass such an object (an LR "
                    f"scheduler, GradScaler, EMA) or a (get_state, set_state) pair of callables."
                )
        optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [] if optimizer is None else [optimizer]
        for i, opt in enumerate(optimizers):
            if not (hasattr(opt, "state_dict") and hasattr(opt, "load_state_dict")):
                where = "`optimizer`" if not isinstance(optimizer, (list, tuple)) else f"`optimizer[{i}]`"
                raise TypeError(f"{where} ({type(opt).__name__}) has no state_dict/load_state_dict; pass a torch.optim "
                                f"optimizer, a list of them, or None.")
        if not isinstance(overwrite, bool):
            raise TypeError(f"`overwrite` must be a bool, got {overwrite!r}.")
        self.run_id = secrets.token_hex(16)  # this run's identity, written into the store and every state file
        self._disk = None if store is None else StateStore(store, self.run_id)
        if self._disk is not None:
            self._disk.claim(overwrite)
        self.session = session
        self.model = model
        self.optimizer = optimizer
        self._optimizers = optimizers
        self.loader = loader
        self.schedule = schedule
        self.every = every
        self.steps = steps
        self.done = 0  # steps run, as the loop reported them
        self.saved: Dict[int, Any] = {}  # step -> state (memory) or None (on disk)
        self.peak_states = 0  # the most states held at once (checkpoints and a reverse pass's)
        self._extra_states: Dict[int, Dict[str, Any]] = {}  # the log schedule's bisection points
        self._trace_offset: Optional[int] = None  # the session's trace number of step 0, once seen

    @property
    def store(self) -> Optional[Any]:
        """The directory the states are kept in (a ``pathlib.Path``), or None (in memory)."""
        return None if self._disk is None else self._disk.root

    # -- states ----------------------------------------------------------------------------------

    def capture(self) -> Dict[str, Any]:
        """The whole training state now (copies: later training does not change it)."""
        return {**self._capture_training(), "session": self.session.rewind_point()}

    def _capture_fast(self) -> Dict[str, Any]:
        """A state held only for the length of a reverse pass: the global generators as the
        libraries give them (no encoding, nothing to validate coming back); loader positions are
        not needed (steps are fetched with batch_at)."""
        state = self._capture_training()
        state["rng"] = rng.capture_raw()
        return state

    #: where states of tensors on an accelerator are kept: on the host (the default; a GPU's memory
    #: would hold 2 sqrt(steps) copies of the weights and optimizer state) or on their device
    offload = True

    def _copy(self, value: Any) -> Any:
        """A copy of `value` (a tensor, or containers of them), on the host when `offload`."""
        if isinstance(value, torch.Tensor):
            t = value.detach()
            return t.to("cpu", copy=True) if self.offload and t.device.type != "cpu" else t.clone()
        if isinstance(value, dict):
            return {k: self._copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(v) for v in value)
        return copy.deepcopy(value)

    def _capture_training(self) -> Dict[str, Any]:
        return {
            "model": {k: self._copy(v) for k, v in self.model.state_dict().items()},
            # gradients a loop accumulates across steps are part of the state (None: no gradient)
            "grads": [None if p.grad is None else self._copy(p.grad) for p in self.model.parameters()],
            "optimizer": [self._copy(opt.state_dict()) for opt in self._optimizers],
            "extra": [self._copy(e[0]() if isinstance(e, tuple) else e.state_dict()) for e in self.extra],
        }

    def apply_state(self, state: Mapping[str, Any], *, last_use: bool = False) -> None:
        """Put `state` back; with `last_use` (a reverse pass's own state, used once) without copying it."""
        if "rng" in state:
            rng.restore_raw(state["rng"])
        else:
            self.session.rewind(state["session"])  # validated first: a bad state changes nothing
        keep = (lambda x: x) if last_use else copy.deepcopy
        with torch.no_grad():
            self.model.load_state_dict(state["model"])
        for p, grad in zip(self.model.parameters(), state["grads"]):
            if grad is not None and grad.device != p.device:  # kept on the host
                p.grad = grad.to(p.device)
            else:
                p.grad = None if grad is None else (grad if last_use else grad.clone())
        for opt, opt_state in zip(self._optimizers, state["optimizer"]):
            opt.load_state_dict(keep(opt_state))
        for e, st in zip(self.extra, state["extra"]):
            if isinstance(e, tuple):
                e[1](keep(st))
            else:
                e.load_state_dict(keep(st))

    def store_state(self, step: int, state: Dict[str, Any]) -> None:
        """Keep `state` (from :meth:`capture`) as the state before step `step`: in memory, or in the store."""
        if self._disk is None:
            self.saved[step] = state
        else:
            self._disk.write(step, state)
            self.saved[step] = None
        self.peak_states = max(self.peak_states, len(self.saved))

    def _get(self, step: int) -> Dict[str, Any]:
        state = self.saved[step]
        if state is not None:
            return state
        return self.read_stored(step)

    def read_stored(self, step: int) -> Dict[str, Any]:
        """State `step` from the store, whole and checked before anything is restored."""
        assert self._disk is not None
        return self._disk.read(step)

    def maybe_save(self, step: int) -> bool:
        """Record that `step` steps are done; keep the state if the schedule asks. Returns whether it did."""
        if type(step) is not int or step < 0:
            raise ValueError(f"`step` must be an int >= 0 (steps done), got {step!r}.")
        self.done = max(self.done, step)
        trace = self._trace()
        if trace is not None and step >= 1 and trace.last_step is not None:
            self._trace_offset = trace.last_step - (step - 1)  # the loop traced step `step - 1` as trace.last_step
        if self.every is None:
            keep = step == 0
        else:
            keep = step % self.every == 0
        if keep:
            self.store_state(step, self.capture())
        return keep

    # -- replay ----------------------------------------------------------------------------------

    def _check_step(self, step: Any, name: str = "step") -> int:
        if type(step) is not int or not 0 <= step < self.done:
            raise ValueError(
                f"`{name}` must be a step that was run, an int in [0, {self.done - 1}] ({self.done} steps run), got {step!r}."
            )
        return step

    def _batch(self, step: int) -> Tuple[torch.Tensor, Any]:
        loader = self.loader
        raw = loader.batch_at(step)
        if loader.with_indices:
            return raw[0], (raw[1] if len(raw) == 2 else raw[1:])
        return torch.tensor(loader.indices_at(step)[1], dtype=torch.long), raw

    def _trace(self) -> Any:
        trace = self.session.current_trace
        return trace if trace is not None and trace.model is self.model else None

    def _run(self, start: int, stop: int, step_fn: Callable[..., Any], *, check: bool = False) -> None:
        trace = self._trace() if check and self._trace_offset is not None else None
        for s in range(start, stop):
            indices, batch = self._batch(s)
            out = step_fn(s, indices, batch)
            if trace is not None:  # a re-run step must reproduce the traced one bit for bit
                loss = out if isinstance(out, (torch.Tensor, float)) and not isinstance(out, bool) else None
                trace.check(s + (self._trace_offset or 0), loss=loss)

    def restore(self, step: int) -> int:
        """Restore the nearest checkpoint at or before `step`; return its step."""
        candidates = [s for s in self.saved if s <= step]
        if not candidates:
            raise ValueError(f"no checkpoint at or before step {step}; saved steps: {sorted(self.saved)}.")
        start = max(candidates)
        self.apply_state(self._get(start))
        return start

    def state_before(self, step: int, step_fn: Callable[..., Any]) -> int:
        """Restore the state before step `step` (from the nearest checkpoint, re-running the steps
        in between); the loader then continues at step `step`. Returns the checkpoint's step."""
        if type(step) is not int or not 0 <= step <= self.done:
            raise ValueError(f"`step` must be an int in [0, {self.done}] ({self.done} steps run), got {step!r}.")
        start = self.restore(step)
        self._run(start, step, step_fn, check=True)
        self.loader.seek(step)
        return start

    def replay(self, step: int, step_fn: Callable[..., Any]) -> int:
        """Re-run training up to and including step `step`: the whole state is then exactly as after
        it, and the loader continues at step ``step + 1``. Returns the checkpoint's step.

        When the session traces this model (``session.trace(model)``, ``trace.step`` after each
        training step), every re-run step is checked against its trace (parameters, gradients, and
        the loss if `step_fn` returns it): a replay that is not exact raises
        :class:`~seedreg.ReplayMismatchError` naming the step and tensor, instead of corrupting
        what is computed from it."""
        self._check_step(step)
        start = self.restore(step)
        self._run(start, step + 1, step_fn, check=True)
        self.loader.seek(step + 1)
        return start

    def reverse(self, step_fn: Callable[..., Any], *, forward: Callable[..., Any]) -> None:
        """Visit steps ``done - 1 .. 0``, calling ``step_fn(step, indices, batch)`` with the state
        before each step restored. Segments between checkpoints are recomputed with `forward` (the
        training step, as given to :meth:`replay`), with memory bounded by the schedule; `step_fn`
        may leave the state as it likes (a VJP of the step, say)."""
        if self.done < 1:
            raise ValueError("reverse() needs a run: no step was reported to maybe_save().")
        if not callable(step_fn) or not callable(forward):
            raise TypeError("`step_fn` and `forward` must be callables taking (step, indices, batch).")
        if self.every is None:
            self._reverse_log(0, self.done, step_fn, forward, 1)
            self.loader.seek(0)
            return
        for lo, hi in reversed(self._segments()):
            self._reverse_segment(lo, hi, step_fn, forward)
        self.loader.seek(0)

    def _segments(self) -> List[Tuple[int, int]]:
        """(first step, end) of each stretch between checkpoints, in order."""
        starts = sorted(s for s in self.saved if s < self.done)
        return [(lo, starts[i + 1] if i + 1 < len(starts) else self.done) for i, lo in enumerate(starts)]

    def _reverse_segment(self, lo: int, hi: int, step_fn: Callable[..., Any], forward: Callable[..., Any]) -> None:
        """Steps hi-1 .. lo, each with the state before it restored (recomputed from checkpoint lo)."""
        self.apply_state(self._get(lo))
        segment = []
        for s in range(lo, hi):
            indices, batch = self._batch(s)
            segment.append((self._capture_fast(), indices, batch))
            self.peak_states = max(self.peak_states, len(self.saved) + len(segment))
            forward(s, indices, batch)
        for s in reversed(range(lo, hi)):
            state, indices, batch = segment.pop()
            self.apply_state(state, last_use=True)
            step_fn(s, indices, batch)

    def _reverse_log(self, lo: int, hi: int, step_fn: Callable[..., Any], forward: Callable[..., Any], held: int) -> None:
        """Visit steps hi-1 .. lo; the state before `lo` is checkpoint `lo` (bisection, O(log) states)."""
        self.peak_states = max(self.peak_states, held)
        if hi - lo == 1:
            self.apply_state(self._state_at(lo))
            indices, batch = self._batch(lo)
            step_fn(lo, indices, batch)
            return
        mid = (lo + hi) // 2
        self.apply_state(self._state_at(lo))
        self._run(lo, mid, forward)
        self._extra_states[mid] = self._capture_fast()
        self._reverse_log(mid, hi, step_fn, forward, held + 1)
        del self._extra_states[mid]
        self._reverse_log(lo, mid, step_fn, forward, held)

    def _state_at(self, step: int) -> Dict[str, Any]:
        return self._extra_states[step] if step in self._extra_states else self._get(step)
