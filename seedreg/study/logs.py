"""Completion records: how a study knows which models are done, read in O(new records).

Each task process appends to two files of its own, named ``HOST-PID-TOKEN`` (the random token
keeps them unique when a host name and PID repeat, as PID 1 does in containers):

- ``tasks/NAME.jsonl``: a line per completed model, ``{"model_id", "attempt", "manifest"}``;
- ``tasks/NAME.idx``: a 64-byte record per line, appended after it: model id, attempt, the
  line's byte offset, length and SHA-256, and the SHA-256 of the outputs row, with a checksum.

A model is complete when a valid index record names it; the newest completion (the highest
attempt, assigned under the model's lock) wins everywhere. Opening a study reads the index
files (64 bytes a model), never the manifests; the manifests are read, by offset, only by
:meth:`Study.manifest_of` and the audit, through the one parser :func:`parse_line`. A write that
fails is undone (truncated back) and raised, and the task's next model goes to new files: a torn
write never marks a model complete and never glues onto another record. Logs of seedreg 0.2
(``HOST-PID.jsonl`` with no index) are parsed line by line with the same parser.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import secrets
import socket
import stat
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .definition import StudyError

RECORD = np.dtype([
    ("magic", "<u4"), ("model", "<u4"), ("attempt", "<u4"), ("flags", "<u4"),
    ("offset", "<u8"), ("length", "<u4"), ("check", "<u4"), ("line", "V16"), ("outputs", "V16"),
])
MAGIC = 0x31445253  # "SRD1"
_MIX = np.array([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C, 0xFD7046C5, 0,
                 0xB55A4F09, 0x2545F491, 0x9E3779B9, 0x7FEB352D, 0x846CA68B, 0x68E31DA4, 0xB5297A4D, 0x1B56C4E9], dtype=np.uint64)
MAX_LINE = 64 << 20  # a completion line longer than this is not one seedreg wrote


def record_check(words: np.ndarray) -> np.ndarray:
    """A checksum over a record's 16 words but the check word (7) itself: catches torn, shifted or
    damaged records (not an adversary: the audit re-hashes each line)."""
    w = words.astype(np.uint64)
    return ((w * _MIX).sum(axis=-1, dtype=np.uint64) & 0xFFFFFFFF).astype(np.uint32)


def make_record(model_id: int, attempt: int, offset: int, line: bytes, outputs_digest: bytes) -> bytes:
    rec = np.zeros(1, dtype=RECORD)
    rec["magic"], rec["model"], rec["attempt"], rec["offset"], rec["length"] = MAGIC, model_id, attempt, offset, len(line)
    rec["line"] = np.void(hashlib.sha256(line).digest()[:16])
    rec["outputs"] = np.void(outputs_digest[:16])
    rec["check"] = record_check(rec.view("<u4").reshape(1, 16))
    return rec.tobytes()


def outputs_digest(row: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(row, dtype="<f4").tobytes()).digest()


def parse_line(data: bytes, where: str) -> Dict[str, Any]:
    """The one parser of a completion line: ``{"model_id": int, "attempt": int, "manifest": dict}``,
    or StudyError naming `where` (damaged JSON, nesting too deep, ids too long, wrong fields)."""
    try:
        entry = json.loads(data)
    except (ValueError, RecursionError) as exc:  # ValueError also for an int of more than 4300 digits
        raise StudyError(f"{where} is not a completion record: {str(exc)[:80]}") from None
    if not isinstance(entry, dict) or type(entry.get("model_id")) is not int or not isinstance(entry.get("manifest"), dict):
        raise StudyError(f"{where} is not a completion record (it needs an int model_id and a manifest).")
    attempt = entry.get("attempt", 0)
    if type(attempt) is not int or attempt < 0:
        raise StudyError(f"{where} has attempt {attempt!r:.20}; a completion's attempt is an int >= 0.")
    return {"model_id": entry["model_id"], "attempt": attempt, "manifest": entry["manifest"]}


def open_regular(path: pathlib.Path) -> int:
    """A read descriptor of `path` if it is a regular file (not a FIFO, device or link), else StudyError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise StudyError(f"{path} cannot be read ({exc.strerror or exc}): a study's task files are regular files; remove it.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StudyError(f"{path} is not a regular file (a FIFO, device or link?): remove it from the study's tasks folder.")
    return fd


def file_sha256(path: Any) -> str:
    """``sha256:`` and the hex digest of a file's bytes, read a megabyte at a time (artifacts)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def pread_all(fd: int, length: int, offset: int) -> bytes:
    parts, done = [], 0
    while done < length:
        chunk = os.pread(fd, min(length - done, 1 << 26), offset + done)
        if not chunk:
            break
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(28, "no space left (a write wrote nothing)")
        view = view[n:]


class TaskLog:
    """This process's two append-only files; see the module docstring."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self.name: Optional[str] = None
        self._fds: Tuple[int, int] = (-1, -1)
        self._sizes = [0, 0]

    def _open(self) -> None:
        self.close()
        name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
        try:
            idx = os.open(self.folder / f"{name}.idx", flags, 0o666)  # the index first: a log without one is 0.2's
            log = os.open(self.folder / f"{name}.jsonl", flags, 0o666)
        except FileNotFoundError:
            raise StudyError(f"{self.folder} is missing: the study's tasks folder was deleted; restore it (mkdir it for a new start).") from None
        except OSError as exc:
            raise StudyError(f"cannot create a task log in {self.folder}: {exc.strerror or exc}.") from None
        self.name, self._fds, self._sizes = name, (log, idx), [0, 0]

    def close(self) -> None:
        for fd in self._fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds, self.name = (-1, -1), None

    def append(self, model_id: int, attempt: int, line: bytes, outputs: bytes) -> Tuple[str, int]:
        """Append the line, then its index record; on any failure undo both and raise StudyError
        (the model stays incomplete; the next append starts new files). Returns (name, offset)."""
        if self.name is None:
            self._open()
        assert self.name is not None
        name, (log, idx) = self.name, self._fds
        offset = self._sizes[0]
        record = make_record(model_id, attempt, offset, line, outputs)
        try:
            _write_all(log, line)
            _write_all(idx, record)
        except OSError as exc:
            for fd, size in zip((log, idx), self._sizes):
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
            self.close()
            raise StudyError(
                f"model {model_id} could not be marked complete: writing tasks/{name} failed ({exc.strerror or exc}). "
                f"It stays incomplete (nothing half-written counts); free space and run it again."
            ) from None
        self._sizes = [offset + len(line), self._sizes[1] + len(record)]
        return name, offset


class Index:
    """Which models are complete and where their newest record lies, updated in O(new records)."""

    def __init__(self, folder: pathlib.Path, num_models: int) -> None:
        self.folder = folder
        self.logs: List[str] = []  # log names, by number
        self._numbers: Dict[str, int] = {}
        self._read: Dict[str, int] = {}  # bytes consumed per index (or legacy log) file
        self.log = np.full(num_models, -1, dtype=np.int32)
        self.attempt = np.zeros(num_models, dtype=np.int64)
        self.offset = np.zeros(num_models, dtype=np.int64)
        self.length = np.zeros(num_models, dtype=np.int64)
        self.line = np.zeros(num_models, dtype="V16")
        self.outputs = np.zeros(num_models, dtype="V16")
        self.damaged: List[str] = []  # index records or legacy lines that are not valid
        self.superseded: Dict[int, List[Tuple[int, bytes]]] = {}  # model: [(attempt, outputs digest)] of older completions

    def resize(self, num_models: int) -> None:
        extra = num_models - len(self.log)
        if extra > 0:
            for name in ("log", "attempt", "offset", "length", "line", "outputs"):
                arr = getattr(self, name)
                fill = np.full(extra, -1, dtype=arr.dtype) if name == "log" else np.zeros(extra, dtype=arr.dtype)
                setattr(self, name, np.concatenate([arr, fill]))

    def _number(self, log: str) -> int:
        if log not in self._numbers:
            self._numbers[log] = len(self.logs)
            self.logs.append(log)
        return self._numbers[log]

    def refresh(self) -> None:
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            raise StudyError(f"{self.folder} is missing: the study's tasks folder was deleted; restore it.") from None
        names = {e.name for e in entries}
        for entry in entries:
            if entry.name.endswith(".idx"):
                self._read_index(entry, entry.name[:-4])
            elif entry.name.endswith(".jsonl") and entry.name[:-6] + ".idx" not in names:
                self._read_legacy(entry, entry.name[:-6])

    def _size(self, entry: "os.DirEntry[str]") -> int:
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise StudyError(f"{self.folder / entry.name} is not a regular file (a FIFO, device or link?): remove it from the study's tasks folder.")
        return st.st_size

    def _read_index(self, entry: "os.DirEntry[str]", log: str) -> None:
        done = self._read.get(entry.name, 0)
        size = self._size(entry)
        count = (size - done) // RECORD.itemsize
        if count <= 0:
            return
        fd = open_regular(self.folder / entry.name)
        try:
            data = pread_all(fd, count * RECORD.itemsize, done)
        finally:
            os.close(fd)
        count = len(data) // RECORD.itemsize
        recs = np.frombuffer(data[: count * RECORD.itemsize], dtype=RECORD)
        words = np.frombuffer(data[: count * RECORD.itemsize], dtype="<u4").reshape(count, 16)
        ok = (recs["magic"] == MAGIC) & (record_check(words) == recs["check"]) & (recs["model"] < len(self.log))
        for k in np.flatnonzero(~ok)[:100]:
            self.damaged.append(f"tasks/{entry.name} record {(done // RECORD.itemsize) + int(k)}: damaged or not a model of this study")
        self._read[entry.name] = done + count * RECORD.itemsize
        good = recs[ok]
        if len(good):
            self._merge(self._number(log), good["model"].astype(np.int64), good["attempt"].astype(np.int64),
                        good["offset"].astype(np.int64), good["length"].astype(np.int64), good["line"], good["outputs"])

    def _read_legacy(self, entry: "os.DirEntry[str]", log: str) -> None:
        """A 0.2 log (no index): each complete line parsed with the one parser."""
        done = self._read.get(entry.name, 0)
        if self._size(entry) <= done:
            return
        fd = open_regular(self.folder / entry.name)
        try:
            data = pread_all(fd, self._size(entry) - done, done)
        finally:
            os.close(fd)
        end = data.rfind(b"\n") + 1  # complete lines only: a killed writer's last piece does not count
        rows = []
        pos = 0
        for raw in data[:end].split(b"\n")[:-1]:
            where = f"tasks/{entry.name} at byte {done + pos}"
            try:
                parsed = parse_line(raw, where)
                if not 0 <= parsed["model_id"] < len(self.log):
                    raise StudyError(f"{where} names model {parsed['model_id']:.20}, not a model of this study")
                rows.append((parsed["model_id"], done + pos, len(raw) + 1, hashlib.sha256(raw + b"\n").digest()[:16]))
            except StudyError as exc:
                self.damaged.append(str(exc))
            pos += len(raw) + 1
        self._read[entry.name] = done + end
        if rows:
            n = len(rows)
            self._merge(self._number(log), np.array([r[0] for r in rows]), np.zeros(n, np.int64), np.array([r[1] for r in rows]),
                        np.array([r[2] for r in rows]), np.array([r[3] for r in rows], dtype="V16"), np.zeros(n, dtype="V16"))

    def _merge(self, log: int, model: np.ndarray, attempt: np.ndarray, offset: np.ndarray, length: np.ndarray,
               line: np.ndarray, outputs: np.ndarray) -> None:
        """Keep, per model, the newest completion: highest attempt, then the log name and offset."""
        if (self.log[model] < 0).all() and len(np.unique(model)) == len(model):  # the common case: first completions
            self.log[model], self.attempt[model], self.offset[model] = log, attempt, offset
            self.length[model], self.line[model], self.outputs[model] = length, line, outputs
            return
        for k in range(len(model)):
            self._merge_one(log, int(model[k]), int(attempt[k]), int(offset[k]), int(length[k]), line[k], outputs[k])

    def _merge_one(self, log: int, m: int, attempt: int, offset: int, length: int, line: Any, outputs: Any) -> None:
        if self.log[m] >= 0:
            new = (attempt, self.logs[log], offset)
            old = (int(self.attempt[m]), self.logs[self.log[m]], int(self.offset[m]))
            older = min(new, old)
            self.superseded.setdefault(m, []).append((older[0], bytes(outputs if older is new else self.outputs[m])))
            if new < old:
                return
        self.log[m], self.attempt[m], self.offset[m], self.length[m], self.line[m], self.outputs[m] = log, attempt, offset, length, line, outputs

    def completed(self) -> np.ndarray:
        return np.flatnonzero(self.log >= 0)


class Lines:
    """Reads completion lines by offset (checked against the index's digest), a few logs open."""

    def __init__(self, folder: Any, logs: List[str], log: np.ndarray, offset: np.ndarray, length: np.ndarray, line: np.ndarray) -> None:
        self.folder, self.logs = folder, logs
        self.log, self.offset, self.length, self.line = log, offset, length, line  # indexed by model id - base
        self._fds: Dict[int, int] = {}

    @classmethod
    def of(cls, root: Any, idx: "Index") -> "Lines":
        """The reader of the completion lines of the study in `root`, as index `idx` places them."""
        return cls(root / "tasks", idx.logs, idx.log, idx.offset, idx.length, idx.line)

    def read(self, model_id: int, k: Optional[int] = None) -> Tuple[str, Dict[str, Any]]:
        k = model_id if k is None else k
        log = int(self.log[k])
        where = f"tasks/{self.logs[log]}.jsonl at byte {int(self.offset[k])}"
        if log not in self._fds:
            if len(self._fds) >= 64:
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[log] = open_regular(self.folder / f"{self.logs[log]}.jsonl")
        data = pread_all(self._fds[log], int(self.length[k]), int(self.offset[k]))
        if hashlib.sha256(data).digest()[:16] != bytes(self.line[k]):
            raise StudyError(f"{where}: the completion line was changed or damaged after it was written; retrain the model (redo=True)")
        entry = parse_line(data, where)
        if entry["model_id"] != model_id:
            raise StudyError(f"{where}: the line is model {entry['model_id']:.20}'s record, not model {model_id}'s")
        if "checksum" not in entry["manifest"]:
            raise StudyError(f"{where}: its manifest has no checksum (every manifest seedreg writes has one)")
        return where, entry

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
