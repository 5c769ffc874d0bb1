"""A training run kept on disk for attribution (``magic.train(..., store=DIR)``): what the run is
(its definition), whether it finished, and its checkpoints, so that another process that builds
the same run gets the trained weights and bit-identical metagradients without training again.

Layout of ``DIR``::

    seedreg-magic-run.json   {"format", "version", "definition", "status": "training" | "complete",
                              "run", "saved", "steps"}   (written atomically)
    training.lock            the training process (host, pid), while it trains
    states/                  the StepCheckpoints store of the run (its own marker and digests)

A run killed while training leaves ``status: "training"``: the next call trains it again, over
the states its marker proves it wrote. A store of another definition is refused, naming what
differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import socket
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import torch

from ..errors import ManifestError, StateError
from ..files import atomic_write, read_regular_file
from ..fingerprint import fingerprint

__all__ = ["RunStore", "definition"]

FORMAT = "seedreg-magic-run"
VERSION = 1
_FILE = "seedreg-magic-run.json"
_LOCK = "training.lock"


def _digest(value: Any) -> str:
    h = hashlib.sha256()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            t = item.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(item, Mapping):
            for k in sorted(item, key=repr):
                h.update(repr(k).encode())
                stack.append(item[k])
        elif isinstance(item, (list, tuple)):
            h.update(f"[{len(item)}".encode())
            stack.extend(reversed(item))
        else:
            h.update(repr(item).encode())
    return "sha256:" + h.hexdigest()


def _plain(value: Any) -> Any:
    """JSON-native hyperparameters (a tensor lr becomes its float)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (bool, int, float, str)) or value is None else repr(value)


def definition(*, session: Any, model: torch.nn.Module, loader: Any, optimizer: Any, scheduler: Any, epochs: int,
               schedule: str, accumulate: int, max_grad_norm: Optional[float], data: bool = True) -> Dict[str, Any]:
    """What makes two runs the same run: the session's master seed, the initial weights, the
    loader's key and settings and (with `data`) a digest of its first and last batches, the
    optimizer's class, param-group settings and state, the scheduler's, and the loop's options."""
    if isinstance(optimizer, torch.optim.Optimizer):
        groups = [{k: _plain(v) for k, v in sorted(g.items()) if k != "params"} for g in optimizer.param_groups]
        opt = {"class": type(optimizer).__name__, "groups": groups, "state": _digest(optimizer.state_dict()["state"])}
    else:
        opt = {"class": type(optimizer).__name__, "settings": repr(optimizer)}
    sched = None
    if scheduler is not None:
        state = {k: v for k, v in scheduler.state_dict().items() if not callable(v) and k != "lr_lambdas"}
        sched = {"class": type(scheduler).__name__, "state": _digest(state)}
    steps = len(loader)
    batches = {"instance_id": repr(loader.instance_id), "use": loader.use, "examples": len(loader.dataset),
               "batch_size": loader.batch_size, "batches": steps, "shuffle": loader.sampler.shuffle}
    if data:
        batches["data"] = _digest([loader.batch_at(0), loader.batch_at(epochs * steps - 1)])
    return {
        "master_seed": session.master_seed, "scheme": session.scheme, "initial_weights": fingerprint(model),
        "loader": batches,
        "optimizer": opt, "scheduler": sched, "epochs": epochs, "schedule": schedule, "accumulate": accumulate,
        "max_grad_norm": max_grad_norm,
    }


def _differences(a: Any, b: Any, where: str = "") -> List[str]:
    """Each leaf that differs, by its path (``optimizer.groups[0].lr: 0.15 (stored) != 0.2``)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [d for key in sorted(set(a) | set(b)) for d in _differences(a.get(key), b.get(key), f"{where}.{key}" if where else key)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    if a == b:
        return []
    return [f"{where}: {json.dumps(a, default=repr)[:60]} (stored) != {json.dumps(b, default=repr)[:60]}"]


class RunStore:
    """The directory of one run (see the module's docstring)."""

    def __init__(self, root: Any, definition: Dict[str, Any]) -> None:
        self.root = pathlib.Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"`store` {str(self.root)!r} is a file; give a directory for the run (or None for memory).")
        self.root.mkdir(parents=True, exist_ok=True)
        self.definition = json.loads(json.dumps(definition, default=repr))
        self.states = self.root / "states"
        self._locked = False

    def _read(self) -> Optional[Dict[str, Any]]:
        path = self.root / _FILE
        if not os.path.lexists(path):
            return None
        try:
            data = json.loads(read_regular_file(path, 1 << 26))
        except (ManifestError, ValueError, RecursionError) as exc:
            raise StateError(f"{path} cannot be read ({str(exc).rstrip('.')}): the run store is damaged; remove the "
                             f"directory and train again.") from None
        keys = {"format", "version", "definition", "status", "run", "saved", "steps"}
        if not isinstance(data, dict) or data.get("format") != FORMAT or set(data) != keys:
            raise StateError(f"{path} is not a seedreg run store ({FORMAT!r} version {VERSION}).")
        return data

    def complete(self) -> Optional[Dict[str, Any]]:
        """The stored run if it finished and is this definition's; None if there is none or it was
        interrupted; a StateError if it is another run's."""
        data = self._read()
        if data is None:
            return None
        if data["definition"] != self.definition:
            what = _differences(data["definition"], self.definition)
            raise StateError(f"`store` {str(self.root)!r} holds another run: " + "; ".join(what[:4])
                             + ". Give each run its own store directory.")
        if data["status"] != "complete":
            return None
        if not (isinstance(data["saved"], list) and all(type(s) is int for s in data["saved"]) and type(data["steps"]) is int
                and isinstance(data["run"], str)):
            raise StateError(f"{self.root / _FILE} records its checkpoints wrongly; remove the store and train again.")
        return data

    def begin(self) -> None:
        """Take the training lock (refused while a live process holds it), and mark the run as training."""
        lock = self.root / _LOCK
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = _holder(lock)
                if holder is None:  # not a lock this store wrote: never removed
                    raise StateError(f"{lock} is not a training lock seedreg wrote (a link, a directory, or another file); "
                                     f"move it, or give the run another store directory.") from None
                if holder["host"] != me["host"] or _alive(holder["pid"]):
                    raise StateError(f"another process (PID {holder['pid']} on {holder['host']!r}) is training the run "
                                     f"in `store` {str(self.root)!r}; call magic.train again when it has finished (it then "
                                     f"returns the trained run without training). If that process is gone, delete {lock}.")
                lock.unlink(missing_ok=True)  # written by a process of this host that is gone
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self._locked = True
            break
        else:
            raise StateError(f"could not take {lock}; try again.")
        self._write("training", "", [], 0)

    def finish(self, run: str, saved: List[int], steps: int) -> None:
        self._write("complete", run, saved, steps)
        self.release()

    def release(self) -> None:
        if self._locked:
            (self.root / _LOCK).unlink(missing_ok=True)
            self._locked = False

    def _write(self, status: str, run: str, saved: List[int], steps: int) -> None:
        body = {"format": FORMAT, "version": VERSION, "definition": self.definition, "status": status, "run": run,
                "saved": saved, "steps": steps}
        atomic_write(self.root / _FILE, json.dumps(body, sort_keys=True, indent=1).encode())


def _holder(lock: pathlib.Path) -> Optional[Dict[str, Any]]:
    """The host and pid a training lock names, or None if `lock` is not one (a link, not a regular
    file, or not the JSON :meth:`RunStore.begin` writes)."""
    if lock.is_symlink() or not lock.is_file():
        return None
    try:
        holder = json.loads(read_regular_file(lock, 1 << 12))
    except (ManifestError, ValueError, RecursionError):
        return None
    if not (isinstance(holder, dict) and set(holder) == {"host", "pid"} and isinstance(holder["host"], str)
            and type(holder["pid"]) is int):
        return None
    return holder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
