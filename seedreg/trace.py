"""Step traces: where a run diverged, not only that it did.

``session.trace(model)`` returns a :class:`Trace`; the training loop calls ``trace.step(step,
loss=loss)`` after ``optimizer.step()``. Each traced step keeps an exact fingerprint of the loss,
of every parameter's ``.grad`` and of every parameter (:func:`~seedreg.nondeterminism.checksums`:
integer sums of the raw bits, computed on the tensor's device, so one changed bit shows). A replay
compares each step as it is recorded and names the first step and tensor that differ. The file
format is :mod:`seedreg.tracefile`'s.
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import ManifestError, ReplayMismatchError, SeedregError, SeedregWarning, StateError, user_stacklevel
from .nondeterminism import checksums
from .tracefile import TraceData, differs, tensor_kind

__all__ = ["Trace"]


class Trace:
    """The step trace of one model in one session (make it with ``session.trace(model)``).

    Call :meth:`step` after each ``optimizer.step()`` with the number of the step and its loss.
    Steps are traced when ``step % every == 0`` and must increase. In a replaying session each
    traced step is compared with the recorded one as it is taken; the first difference is
    ``replay_report()["first_divergence"]``, and a strict replay raises
    :class:`~seedreg.ReplayMismatchError` there.
    """

    def __init__(self, model: torch.nn.Module, *, every: int = 1, grads: bool = True, buffers: bool = True,
                 expected: Optional[TraceData] = None, on_divergence: Optional[Callable[[Dict[str, Any]], None]] = None,
                 resumed: Optional[Callable[[], bool]] = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        if type(every) is not int or every < 1:
            raise ValueError(f"`every` must be an int >= 1 (trace every N-th step), got {every!r}.")
        if not isinstance(grads, bool):
            raise TypeError(f"`grads` must be a bool, got {grads!r}.")
        if not isinstance(buffers, bool):
            raise TypeError(f"`buffers` must be a bool, got {buffers!r}.")
        self.model = model
        self.every = every
        self.grads = grads
        self.buffers = buffers
        named = list(model.named_parameters())
        if not named:
            raise ValueError("`model` has no parameters to trace.")
        self._param_names = [n for n, _ in named]
        bufs = list(model.named_buffers()) if buffers else []
        self._buffer_names = [n for n, _ in bufs]
        params, kept = [p for _, p in named], [b for _, b in bufs]
        self.names: Tuple[str, ...] = (("loss",) + tuple(f"grad/{n}" for n in self._param_names if grads)
                                       + tuple(f"param/{n}" for n in self._param_names) + tuple(f"buffer/{n}" for n in self._buffer_names))
        self.dtypes: Tuple[str, ...] = (("",) + tuple(str(p.dtype) for p in params if grads) + tuple(str(p.dtype) for p in params)
                                        + tuple(str(b.dtype) for b in kept))
        self.shapes: Tuple[Tuple[int, ...], ...] = (((),) + tuple(tuple(p.shape) for p in params if grads)
                                                    + tuple(tuple(p.shape) for p in params) + tuple(tuple(b.shape) for b in kept))
        self._steps: List[int] = []
        self._losses: List[float] = []
        self._present: List[np.ndarray] = []
        self._sums: List[np.ndarray] = []
        self._last: Optional[int] = None
        self._stashed: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self._columns = [(c, c) for c in range(len(self.names))]
        self._all_present = np.ones(len(self.names), dtype=bool)
        self.expected = expected
        self._on_divergence = on_divergence
        self._resumed = resumed
        self._restored = False
        self.first_divergence: Optional[Dict[str, Any]] = None
        if expected is not None:
            self._check_matches(expected, "the recorded trace")

    def _current(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The model's parameters and buffers now (a checkpoint loaded with ``assign=True`` puts
        new tensors in the modules: the trace follows them), checked against the traced names."""
        named = list(self.model.named_parameters())
        params: List[torch.Tensor] = [p for _, p in named]
        if [n for n, _ in named] != self._param_names:
            raise ReplayMismatchError(self._changed("parameters", self._param_names, [n for n, _ in named]))
        if not self.buffers:
            return params, []
        bufs = list(self.model.named_buffers())
        if [n for n, _ in bufs] != self._buffer_names:
            raise ReplayMismatchError(self._changed("buffers", self._buffer_names, [n for n, _ in bufs]))
        return params, [b for _, b in bufs]

    @staticmethod
    def _changed(what: str, before: List[str], now: List[str]) -> str:
        missing = [n for n in before if n not in now]
        new = [n for n in now if n not in before]
        return (f"the model's {what} changed since trace() (missing {missing[:5]}, new {new[:5]}"
                f"{', the order changed' if not missing and not new else ''}); a trace follows one model's structure: "
                f"start a new session and trace for another model.")

    def __repr__(self) -> str:
        return f"Trace({len(self._steps)} steps, {len(self.names)} tensors, every={self.every}, grads={self.grads})"

    @property
    def steps(self) -> List[int]:
        """The steps traced so far."""
        return list(self._steps)

    @property
    def last_step(self) -> Optional[int]:
        """The last step given to :meth:`step` (traced or not), None before the first."""
        return self._last

    # -- recording ---------------------------------------------------------------------------------

    def _check_step(self, step: Any) -> int:
        if type(step) is not int or step < 0:
            raise ValueError(f"`step` must be an int >= 0 (the number of the training step), got {step!r}.")
        return step

    def _fingerprint(self, loss: Any, grads: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Tuple[np.ndarray, np.ndarray, float]:
        """(present, sums, loss value) of the model now: one row of the trace, in :attr:`names` order."""
        params, bufs = self._current()
        tensors: List[torch.Tensor] = []
        value = math.nan
        if loss is not None:
            if isinstance(loss, torch.Tensor):
                if loss.numel() != 1:
                    raise ValueError(f"`loss` must be a scalar (one element), got a tensor of shape {tuple(loss.shape)}.")
                loss = loss.detach()
                tensors.append(loss)
            elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
                tensors.append(torch.tensor(float(loss), dtype=torch.float64))
            else:
                raise TypeError(f"`loss` must be a scalar tensor, a float or None, got {type(loss).__name__}.")
        computed = None  # the gradients' presence, when they are fingerprinted now (not taken before the step)
        if self.grads and grads is None:
            computed = np.array([q.grad is not None for q in params], dtype=bool)
            tensors += [q.grad for q in params if q.grad is not None]
        tensors += params
        tensors += bufs
        sums = checksums(tensors).cpu().numpy()
        if loss is not None:
            value = float(loss.item()) if isinstance(loss, torch.Tensor) else float(loss)
            if len(tensors) == len(self.names):  # the loss and every gradient (or none traced): already in names order
                return self._all_present.copy(), sums, value
        present = np.ones(len(self.names), dtype=bool)
        out = np.zeros((len(self.names), 2), dtype=np.int64)
        present[0] = loss is not None
        at = 1 if loss is not None else 0
        out[:at] = sums[:at]
        p = len(params)
        if self.grads:
            if computed is not None:
                there, grad_sums = computed, sums[at : at + int(computed.sum())]
                at += len(grad_sums)
            else:
                there, grad_sums = grads  # type: ignore[misc]
            present[1 : 1 + p] = there
            out[1 : 1 + p][there] = grad_sums
        out[len(self.names) - p - len(bufs) :] = sums[at:]
        return present, out, value

    def take_grads(self) -> None:
        """Fingerprint the gradients now, for the next :meth:`step` (integrations whose loop clears
        ``.grad`` between ``optimizer.step()`` and the point where the step is traced)."""
        if not self.grads:
            return
        params, _ = self._current()
        there = np.array([q.grad is not None for q in params], dtype=bool)
        grads = [q.grad for q in params if q.grad is not None]
        sums = checksums(grads).cpu().numpy() if grads else np.zeros((0, 2), dtype=np.int64)
        self._stashed = (there, sums if len(sums) else np.zeros((0, 2), dtype=np.int64))

    def step(self, step: int, *, loss: Any = None) -> bool:
        """Trace step `step` (call it after ``optimizer.step()``) if ``step % every == 0``.
        Returns whether it was traced. In a replay the step is compared with the recorded one."""
        step = self._check_step(step)
        if self._last is not None and step <= self._last:
            raise ValueError(
                f"trace.step({step}) after step {self._last}: steps must increase. A run resumed from a checkpoint must "
                f"restore the trace too (trace.load_state_dict(state) with the state saved by trace.state_dict())."
            )
        if self._last is None and not self._restored and step > 0 and self._resumed is not None and self._resumed():
            warnings.warn(
                f"trace.step({step}) starts an empty trace in a resumed run (session.load_state_dict was called): the "
                f"steps before {step} are missing from it, so a replay compares nothing before them and the trace file "
                f"differs from an uninterrupted run's. Save trace.state_dict() with the checkpoint and call "
                f"trace.load_state_dict(state) after resuming.", SeedregWarning, stacklevel=user_stacklevel())
        self._last = step
        stashed, self._stashed = self._stashed, None
        if step % self.every:
            return False
        present, sums, value = self._fingerprint(loss, stashed)
        self._steps.append(step)
        self._losses.append(value)
        self._present.append(present)
        self._sums.append(sums)
        if self.expected is not None:
            self._compare(len(self._steps) - 1)
        return True

    def check(self, step: int, *, loss: Any = None) -> None:
        """Compare the model now with traced step `step` of this run (without recording anything):
        a re-run of that step (``StepCheckpoints.replay``) must reproduce it bit for bit, else a
        :class:`~seedreg.ReplayMismatchError` names the first tensor that differs."""
        step = self._check_step(step)
        i = bisect.bisect_left(self._steps, step)
        if i == len(self._steps) or self._steps[i] != step:
            return
        present, sums, _ = self._fingerprint(loss)
        if loss is None:  # nothing to compare the recorded loss with
            present[0], sums[0] = self._present[i][0], self._sums[i][0]
        name = differs(self.names, present, sums, self._present[i], self._sums[i], self._columns)
        if name is not None:
            raise ReplayMismatchError(
                f"re-running step {step} did not reproduce the traced run: {name} differs first; the replay is not exact "
                f"(state missing from the checkpoint, or a nondeterministic op: see seedreg.find_nondeterminism)."
            )

    # -- replay --------------------------------------------------------------------------------------

    def _check_matches(self, other: TraceData, what: str) -> None:
        if other.every != self.every or other.grads != self.grads:
            raise ValueError(
                f"{what} was taken with every={other.every}, grads={other.grads}; this trace has every={self.every}, "
                f"grads={self.grads}: pass the same values."
            )
        if other.names != self.names:
            missing = [n for n in other.names if n not in self.names]
            new = [n for n in self.names if n not in other.names]
            raise ReplayMismatchError(
                f"the model's parameters differ from {what}'s: missing {missing[:5]}, new {new[:5]}"
                f"{' (the order changed)' if not missing and not new else ''}; trace the same model."
            )
        for name, a, b, sa, sb in zip(self.names, self.dtypes, other.dtypes, self.shapes, other.shapes):
            if (a, sa) != (b, sb):
                raise ReplayMismatchError(f"{name} is {a} {list(sa)} here but {b} {list(sb)} in {what}; trace the same model.")

    def _compare(self, i: int) -> None:
        assert self.expected is not None
        if self.first_divergence is not None:
            return
        step = self._steps[i]
        row = self.expected.row(step)
        if row is None:
            return
        name = differs(self.names, self._present[i], self._sums[i], self.expected.present[row], self.expected.sums[row], self._columns)
        if name is not None:
            self.first_divergence = {"step": step, "tensor": name, "kind": tensor_kind(name)}
            if self._on_divergence is not None:
                self._on_divergence(self.first_divergence)

    # -- data and state ------------------------------------------------------------------------------

    def data(self) -> TraceData:
        """What was traced, as :class:`TraceData`."""
        k, n = len(self.names), len(self._steps)
        return TraceData(
            names=self.names, dtypes=self.dtypes, shapes=self.shapes, every=self.every, grads=self.grads,
            steps=np.array(self._steps, dtype=np.int64), losses=np.array(self._losses, dtype=np.float64),
            present=np.array(self._present, dtype=bool).reshape(n, k), sums=np.array(self._sums, dtype=np.int64).reshape(n, k, 2),
        )

    def state_dict(self) -> Dict[str, Any]:
        """What was traced so far and the last step, to save with a checkpoint (``torch.save``
        loads it back with ``weights_only=True``)."""
        payload = self.data().encode()
        return {"format": "seedreg-trace-state", "last_step": self._last,
                "data": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a trace from :meth:`state_dict` (a resumed run). Checked whole first."""
        if not isinstance(state, Mapping) or state.get("format") != "seedreg-trace-state" or set(state) != {"format", "last_step", "data"}:
            raise StateError("a trace state must be what Trace.state_dict() returned.")
        last, payload = state["last_step"], state["data"]
        if not (last is None or (type(last) is int and last >= 0)):
            raise StateError(f"the trace state's last_step must be an int >= 0 or None, got {last!r:.40}.")
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
            raise StateError("the trace state's data must be a uint8 tensor (from Trace.state_dict()).")
        try:
            data = TraceData.decode(payload.numpy().tobytes(), "the trace state")
        except ManifestError as exc:
            raise StateError(str(exc)) from None
        try:
            self._check_matches(data, "the saved trace")
        except (ValueError, ReplayMismatchError) as exc:
            raise StateError(str(exc)) from None
        if len(data.steps) and (last is None or last < int(data.steps[-1])):
            raise StateError("the trace state's last_step is before its last traced step.")
        self._steps = [int(s) for s in data.steps]
        self._losses = [float(v) for v in data.losses]
        self._present = list(data.present)
        self._sums = list(data.sums)
        self._last = last
        self._stashed = None
        self._restored = True
        if self.expected is not None:
            self.first_divergence = None
            for i in range(len(self._steps)):
                self._compare(i)

