"""Step trace files: the fingerprints of a traced run, their binary format, and their comparison.

Made by :class:`seedreg.trace.Trace`; read here without torch (``seedreg show`` and ``seedreg
diff`` stay light). ``session.dump(path)`` writes the trace beside the manifest (``path`` + ``.trace``) in a small
binary format (below; no pickle), named with its SHA-256 in the manifest. Layout, little-endian::

    b"SEEDREG-TRACE\\n" | header length (u64) | header JSON | steps (i64 x n) | losses (f64 x n)
    | present (u8 x n x k, padded to 8) | sums (i64 x n x k x 2) | SHA-256 of all of the above

The header names the tensors in comparison order (``loss``, ``grad/NAME``..., ``param/NAME``...)
with their dtype and shape, ``every``, ``grads`` and the number of steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import struct
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attrs
import numpy as np

from .errors import ManifestError
from .files import check_density, read_regular_file

__all__ = ["TraceData", "check_entry", "first_difference", "load_trace", "next_step", "trace_entry"]

MAGIC = b"SEEDREG-TRACE\n"
FORMAT = "seedreg-trace"
VERSION = 2  # 2: sums of 64-bit words (1, seedreg 0.3: of 32-bit words), buffers traced
MAX_BYTES = 1 << 36
_MAX_HEADER = 1 << 26
_DIGEST = 32
_ENTRY_KEYS = {"file", "sha256", "bytes", "steps", "tensors", "every", "grads", "first_step", "last_step"}


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


@attrs.frozen(eq=False)
class TraceData:
    """The fingerprints of a traced run: one row per traced step, one column per tensor."""

    names: Tuple[str, ...]
    dtypes: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    every: int
    grads: bool
    steps: np.ndarray  # int64 (n,)
    losses: np.ndarray  # float64 (n,), NaN where no loss was given
    present: np.ndarray  # bool (n, k): False for a gradient that was None or a loss not given
    sums: np.ndarray  # int64 (n, k, 2)

    def row(self, step: int) -> Optional[int]:
        """The row of `step`, or None if it was not traced."""
        i = int(np.searchsorted(self.steps, step))
        return i if i < len(self.steps) and int(self.steps[i]) == step else None

    def encode(self) -> bytes:
        """The file's bytes (see the module's docstring)."""
        n, k = len(self.steps), len(self.names)
        header = json.dumps({
            "format": FORMAT, "version": VERSION, "every": self.every, "grads": self.grads, "steps": n,
            "tensors": [[name, dtype, list(shape)] for name, dtype, shape in zip(self.names, self.dtypes, self.shapes)],
        }, sort_keys=True, separators=(",", ":")).encode()
        present = np.zeros(_pad8(n * k), dtype=np.uint8)
        present[: n * k] = self.present.reshape(-1)
        body = b"".join([
            MAGIC, struct.pack("<Q", len(header)), header, b"\0" * (_pad8(len(header)) - len(header)),
            self.steps.astype("<i8").tobytes(), self.losses.astype("<f8").tobytes(), present.tobytes(),
            self.sums.astype("<i8").tobytes(),
        ])
        return body + hashlib.sha256(body).digest()

    @classmethod
    def decode(cls, data: bytes, where: str = "trace") -> "TraceData":
        """Parse and check a trace file's bytes; anything truncated, edited or foreign is a ManifestError."""
        def refuse(why: str) -> ManifestError:
            return ManifestError(f"{where} {why}")

        if not data.startswith(MAGIC):
            raise refuse("is not a seedreg trace (it does not start with the trace signature).")
        if len(data) < len(MAGIC) + 8 + _DIGEST:
            raise refuse("is truncated.")
        if hashlib.sha256(memoryview(data)[:-_DIGEST]).digest() != data[-_DIGEST:]:
            raise refuse("is truncated or damaged (its own SHA-256 does not match its content).")
        (length,) = struct.unpack_from("<Q", data, len(MAGIC))
        start = len(MAGIC) + 8
        if length > min(_MAX_HEADER, len(data)):
            raise refuse(f"has a header of {length} bytes, more than the file holds.")
        try:
            text = data[start : start + length].decode("utf-8")
            check_density(text, f"{where}'s header")
            header = json.loads(text, object_pairs_hook=_no_duplicates)
        except (ValueError, RecursionError) as exc:
            raise refuse(f"has a damaged header: {exc}.") from None
        keys = {"format", "version", "every", "grads", "steps", "tensors"}
        if not isinstance(header, dict) or set(header) != keys or header["format"] != FORMAT:
            raise refuse(f"has no seedreg trace header (expected the keys {sorted(keys)}).")
        if header["version"] == 1:
            raise refuse("is trace version 1, written by seedreg 0.3 (fingerprints of 32-bit words, no buffers); this "
                         f"seedreg writes and reads version {VERSION}: replay that run with seedreg 0.3, or trace it again.")
        if header["version"] != VERSION or type(header["version"]) is not int:
            raise refuse(f"is version {header['version']!r:.20}; this seedreg reads trace version {VERSION}.")
        every, grads, n, tensors = header["every"], header["grads"], header["steps"], header["tensors"]
        if type(every) is not int or every < 1 or type(grads) is not bool or type(n) is not int or n < 0:
            raise refuse("has a header whose every, grads or steps is not valid.")
        if not isinstance(tensors, list) or not all(
            isinstance(t, list) and len(t) == 3 and isinstance(t[0], str) and isinstance(t[1], str) and isinstance(t[2], list)
            and all(type(d) is int and d >= 0 for d in t[2]) for t in tensors
        ):
            raise refuse("has a header whose tensors are not [name, dtype, shape] triples.")
        k = len(tensors)
        offset = start + _pad8(length)
        expected = offset + 8 * n + 8 * n + _pad8(n * k) + 16 * n * k + _DIGEST
        if len(data) != expected:
            raise refuse(f"is {len(data)} bytes but its header describes {expected}: truncated or damaged.")
        steps = np.frombuffer(data, "<i8", n, offset).astype(np.int64)
        offset += 8 * n
        losses = np.frombuffer(data, "<f8", n, offset).astype(np.float64)
        offset += 8 * n
        present_raw = np.frombuffer(data, np.uint8, n * k, offset)
        offset += _pad8(n * k)
        sums = np.frombuffer(data, "<i8", 2 * n * k, offset).astype(np.int64).reshape(n, k, 2)
        if n and (np.any(np.diff(steps) <= 0) or steps[0] < 0):
            raise refuse("lists steps that do not increase.")
        if np.any(present_raw > 1):
            raise refuse("has presence flags other than 0 and 1.")
        return cls(
            names=tuple(t[0] for t in tensors), dtypes=tuple(t[1] for t in tensors),
            shapes=tuple(tuple(t[2]) for t in tensors), every=every, grads=grads, steps=steps, losses=losses,
            present=present_raw.astype(bool).reshape(n, k), sums=sums,
        )


def differs(names: Sequence[str], pa: np.ndarray, sa: np.ndarray, pb: np.ndarray, sb: np.ndarray,
             columns: Sequence[Tuple[int, int]]) -> Optional[str]:
    """The first tensor (in comparison order) whose presence or fingerprint differs between two rows."""
    for ca, cb in columns:
        if pa[ca] != pb[cb] or (pa[ca] and not np.array_equal(sa[ca], sb[cb])):
            return names[ca]
    return None


def tensor_kind(name: str) -> str:
    return name.split("/", 1)[0]


def next_step(first: Mapping[str, Any]) -> str:
    """What to do about a first divergence ``{"step", "tensor", "kind"}``: the comparison order
    (loss, gradients, parameters, buffers) says which part of the step changed first."""
    step, tensor = first["step"], first["tensor"]
    find = f"run seedreg.find_nondeterminism(model, step_fn) on the batch of step {step} to name the module"
    if first["kind"] == "loss":
        return (f"the forward pass already differs at step {step}: the batch (data, augmentation, loader order), an "
                f"unseeded random op or a nondeterministic kernel; {find}.")
    if first["kind"] == "grad":
        return (f"the loss agreed but {tensor} did not, so the backward pass differs at step {step} (a nondeterministic "
                f"backward kernel, a gradient hook, or a loss that was not traced); {find}.")
    if first["kind"] == "param":
        return (f"the loss and the gradients agreed but {tensor} did not, so the update differs at step {step}: check the "
                f"optimizer, its learning rate and scheduler, and weight decay or clipping settings at that step.")
    return (f"the loss, gradients and parameters agreed but {tensor} did not, so a buffer changed differently at step "
            f"{step}: BatchNorm's momentum or train/eval mode, or code that writes that buffer.")


def first_difference(a: TraceData, b: TraceData) -> Optional[Dict[str, Any]]:
    """The first step (of those both traced) and tensor (of those both have) that differ:
    ``{"step", "tensor", "kind"}``, or None."""
    cols_b = {name: c for c, name in enumerate(b.names)}
    columns = [(c, cols_b[name]) for c, name in enumerate(a.names) if name in cols_b]
    common, ia, ib = np.intersect1d(a.steps, b.steps, assume_unique=True, return_indices=True)
    for step, i, j in zip(common.tolist(), ia.tolist(), ib.tolist()):
        name = differs(a.names, a.present[i], a.sums[i], b.present[j], b.sums[j], columns)
        if name is not None:
            return {"step": step, "tensor": name, "kind": tensor_kind(name)}
    return None


def trace_entry(file: str, payload: bytes, data: TraceData) -> Dict[str, Any]:
    """What the manifest says of a trace file: its name, digest, size and a summary."""
    return {
        "file": file, "sha256": "sha256:" + hashlib.sha256(payload).hexdigest(), "bytes": len(payload),
        "steps": len(data.steps), "tensors": len(data.names), "every": data.every, "grads": data.grads,
        "first_step": int(data.steps[0]) if len(data.steps) else None,
        "last_step": int(data.steps[-1]) if len(data.steps) else None,
    }


def check_entry(entry: Any, where: str = "manifest['trace']") -> Dict[str, Any]:
    """A manifest's trace entry, validated field by field."""
    if not isinstance(entry, Mapping) or set(entry) != _ENTRY_KEYS:
        raise ManifestError(f"{where} must be an object with the keys {sorted(_ENTRY_KEYS)}.")
    name = entry["file"]
    if type(name) is not str or not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise ManifestError(f"{where}['file'] must be a file name beside the manifest, got {name!r:.80}.")
    digest = entry["sha256"]
    if type(digest) is not str or len(digest) != 71 or not digest.startswith("sha256:"):
        raise ManifestError(f"{where}['sha256'] must be 'sha256:' and 64 hex digits.")
    for key in ("bytes", "steps", "tensors", "every"):
        if type(entry[key]) is not int or entry[key] < (1 if key == "every" else 0):
            raise ManifestError(f"{where}[{key!r}] must be an int >= {1 if key == 'every' else 0}, got {entry[key]!r:.40}.")
    if type(entry["grads"]) is not bool:
        raise ManifestError(f"{where}['grads'] must be a bool.")
    for key in ("first_step", "last_step"):
        if not (entry[key] is None or (type(entry[key]) is int and entry[key] >= 0)):
            raise ManifestError(f"{where}[{key!r}] must be an int >= 0 or null.")
    return dict(entry)


def load_trace(manifest_path: Any, entry: Mapping[str, Any]) -> TraceData:
    """The trace a manifest names, read from beside it and checked against the manifest's digest."""
    path = pathlib.Path(manifest_path).parent / entry["file"]
    where = f"trace file {path} (named by the manifest {pathlib.Path(manifest_path).name})"
    try:
        # no larger than the manifest recorded: a file that is not this run's trace is refused unread
        payload = read_regular_file(path, min(entry["bytes"], MAX_BYTES))
    except ManifestError as exc:
        if not os.path.lexists(path):
            raise ManifestError(f"{where} is missing: copy it beside the manifest (a replay that expects a trace "
                                f"cannot pass without it).") from None
        raise ManifestError(f"{where}: {exc}") from None
    if len(payload) != entry["bytes"]:
        raise ManifestError(f"{where} is {len(payload)} bytes, the manifest recorded {entry['bytes']}: it is truncated "
                            f"or is another run's trace.")
    if "sha256:" + hashlib.sha256(payload).hexdigest() != entry["sha256"]:
        raise ManifestError(f"{where} does not match the SHA-256 the manifest recorded: it is another run's trace, "
                            f"or damaged.")
    data = TraceData.decode(payload, where)
    if (len(data.steps), len(data.names), data.every, data.grads) != (entry["steps"], entry["tensors"], entry["every"], entry["grads"]):
        raise ManifestError(f"{where} does not hold what the manifest describes.")
    return data
