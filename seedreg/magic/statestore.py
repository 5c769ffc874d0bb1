"""A StepCheckpoints store on disk: one run per directory, claimed with a marker
(``seedreg-store.json``) naming the run; each state a JSON half (its run, its step, the session's
state and the SHA-256 of its tensors) and a tensor file (``torch.save``, read back with
``weights_only=True``), checked whole before anything is restored."""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import re
from typing import Any, Dict, Sequence

import torch

from ..errors import ManifestError, StateError
from ..files import atomic_write, read_regular_file

__all__ = ["StateStore"]

_STORE_FORMAT = "seedreg-step-checkpoints"
_STORE_FILE = "seedreg-store.json"  # the run a store belongs to
_STATE_FILE = re.compile(r"step-\d+\.(pt|json)")
_MAX_STATE_JSON = 1 << 30
_MAX_STATE_TENSORS = 1 << 40


class StateStore:
    """The directory `root` of run `run_id`'s states."""

    def __init__(self, root: Any, run_id: str) -> None:
        self.root = pathlib.Path(root)
        self.run_id = run_id
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"`store` {str(self.root)!r} is a file; give a directory for checkpoints (or None for memory).")
        self.root.mkdir(parents=True, exist_ok=True)

    def claim(self, overwrite: bool) -> None:
        """Make the store this run's: a store belongs to one run (an lr sweep given one directory
        would otherwise replay one run from another's states). Another run's store is refused
        unless `overwrite`, which removes only the state files that run's marker proves it wrote:
        each ``step-N.json`` naming the marker's run, each ``step-N.pt`` matching the digest its
        JSON half recorded. Anything else (a file seedreg did not write, a link, a directory) is a
        StateError naming it, raised before anything is removed."""
        owner = self.root / _STORE_FILE
        named = sorted(p for p in self.root.iterdir() if _STATE_FILE.fullmatch(p.name))
        for path in [owner, *named]:
            if path.is_symlink() or (path.exists() and not path.is_file()):
                raise StateError(f"`store` {str(self.root)!r} holds {path.name}, which is a link or a directory: a store's "
                                 f"files are regular files seedreg wrote. Move it, or give another directory.")
        if not owner.exists() and not named:
            atomic_write(owner, json.dumps({"format": _STORE_FORMAT, "run": self.run_id}).encode())
            return
        if not overwrite:
            raise StateError(
                f"`store` {str(self.root)!r} holds the checkpoints of another run ({_STORE_FILE} or step files); a store "
                f"belongs to one run. Give each run its own directory, or pass overwrite=True to replace that run's states."
            )
        if not owner.exists():
            raise StateError(f"`store` {str(self.root)!r} holds {named[0].name} but no {_STORE_FILE}: seedreg never claimed "
                             f"this directory, so overwrite=True removes nothing from it. Give checkpoints a directory of "
                             f"their own.")
        try:
            marker = json.loads(read_regular_file(owner, 1 << 16))
        except (ManifestError, ValueError, RecursionError):
            marker = None
        if not isinstance(marker, dict) or marker.get("format") != _STORE_FORMAT or not isinstance(marker.get("run"), str):
            raise StateError(f"{owner} is not a seedreg store marker; overwrite=True removes nothing it cannot prove "
                             f"seedreg wrote. Give checkpoints another directory.")
        proven = self._written_by(marker["run"], named)
        for path in named:
            if path not in proven:
                raise StateError(f"{path} was not written by the run that claimed `store` {str(self.root)!r} (its "
                                 f"{_STORE_FILE} does not prove it); overwrite=True removes only that run's states. Move "
                                 f"the file, or give checkpoints another directory.")
        for path in named:
            path.unlink()
        atomic_write(owner, json.dumps({"format": _STORE_FORMAT, "run": self.run_id}).encode())

    def _written_by(self, run: str, named: Sequence[pathlib.Path]) -> set:
        """The files of `named` that run `run` wrote: its step JSONs, and the tensor files whose
        digest such a JSON recorded."""
        proven = set()
        for path in named:
            if path.suffix != ".json":
                continue
            try:
                meta = json.loads(read_regular_file(path, _MAX_STATE_JSON))
            except (ManifestError, ValueError, RecursionError):
                continue
            if not (isinstance(meta, dict) and meta.get("format") == _STORE_FORMAT and meta.get("run") == run
                    and path.name == f"step-{meta.get('step')}.json"):
                continue
            proven.add(path)
            pt = path.with_suffix(".pt")
            if pt in named:
                digest = hashlib.sha256()
                with open(pt, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
                if "sha256:" + digest.hexdigest() == meta.get("tensors"):
                    proven.add(pt)
        return proven

    def write(self, step: int, state: Dict[str, Any]) -> None:
        """State `step`: its tensors, then (proving them) its JSON half."""
        tensors = {k: state[k] for k in ("model", "grads", "optimizer", "extra")}
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        blob = buffer.getvalue()
        # the JSON half names its run and step and the digest of the tensors' file: checked at every read.
        # Written first, so that a tensor file is never left behind that no JSON of its run proves.
        meta = {"format": _STORE_FORMAT, "run": self.run_id, "step": step,
                "tensors": "sha256:" + hashlib.sha256(blob).hexdigest(), "session": state["session"]}
        atomic_write(self.root / f"step-{step}.json", json.dumps(meta).encode())
        atomic_write(self.root / f"step-{step}.pt", blob)

    def read(self, step: int) -> Dict[str, Any]:
        """State `step` from the store, whole and checked before anything is restored: a missing,
        damaged, swapped or foreign file is a StateError naming the file and the step."""
        json_path, pt_path = self.root / f"step-{step}.json", self.root / f"step-{step}.pt"

        def refuse(path: pathlib.Path, why: str) -> StateError:
            return StateError(f"{path} (the state of step {step}) {why}; the store is damaged or was changed since this run wrote it.")

        try:
            meta = json.loads(read_regular_file(json_path, _MAX_STATE_JSON))
        except (ManifestError, ValueError, RecursionError) as exc:
            raise refuse(json_path, f"cannot be read: {str(exc).rstrip('.')}") from None
        if not isinstance(meta, dict) or meta.get("format") != _STORE_FORMAT or set(meta) != {"format", "run", "step", "tensors", "session"}:
            raise refuse(json_path, f"is not a seedreg checkpoint state ({_STORE_FORMAT!r})")
        if meta["run"] != self.run_id:
            raise refuse(json_path, "belongs to another run")
        if meta["step"] != step or type(meta["step"]) is not int:
            raise refuse(json_path, f"holds the state of step {meta['step']!r:.20}")
        try:
            blob = read_regular_file(pt_path, _MAX_STATE_TENSORS)
        except ManifestError as exc:
            raise refuse(pt_path, f"cannot be read: {str(exc).rstrip('.')}") from None
        if "sha256:" + hashlib.sha256(blob).hexdigest() != meta["tensors"]:
            raise refuse(pt_path, "does not match the digest its step recorded")
        try:
            tensors = torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as exc:  # noqa: BLE001 - whatever torch says of a file whose digest matched
            raise refuse(pt_path, f"cannot be loaded ({type(exc).__name__})") from None
        if not isinstance(tensors, dict) or set(tensors) != {"model", "grads", "optimizer", "extra"}:
            raise refuse(pt_path, "does not hold a training state")
        return {**tensors, "session": meta["session"]}
