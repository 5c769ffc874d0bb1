"""Who trains a model: one process at a time, and one run at a time in a process.

``lock="posix"`` (the default): byte i of ``ROOT/locks`` is locked with a POSIX record lock while a
process trains model i (its value is a hint: the model's newest attempt); the kernel releases it when the process dies, so a killed task never
leaves a model locked. Some network file systems refuse record locks (ENOSYS, ENOLCK): then
``lock="lockfile"`` creates ``ROOT/locks.d/I.lock`` with O_EXCL, holding the holder's host, PID
and start time; a lock whose holder on this host is gone is taken over. Each mode also honours the
other's locks, so tasks of one study that use different modes still never train one model twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import secrets
import socket
import stat
import threading
import time
from typing import Any, Dict, Optional, Tuple

from .definition import StudyError

LOCK_MODES = ("posix", "lockfile")
_HELD = (errno.EACCES, errno.EAGAIN)
_BREAK_AFTER_S = 60.0  # a takeover marker older than this was left by a killed process

# the one run active in this process: global RNGs (python, numpy, torch) are per process, so two
# runs at once, in two threads, would draw from each other's streams
_active: Dict[str, Any] = {}
_active_lock = threading.Lock()


@contextlib.contextmanager
def only_run_in_process(root: pathlib.Path, model_id: int) -> Any:
    with _active_lock:
        if _active:
            raise StudyError(
                f"study.run({model_id}) while study.run({_active['model']}) is active in this process "
                f"({'thread ' + _active['thread'] if _active['thread'] != threading.current_thread().name else 'the same thread'}): "
                f"python, numpy and torch have one global random state per process, so two runs at once would "
                f"share it. Run models one after another, or in separate processes."
            )
        _active.update(model=model_id, thread=threading.current_thread().name, root=str(root))
    try:
        yield
    finally:
        with _active_lock:
            _active.clear()


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (so a reused PID is told apart), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "unknown"


class Locks:
    def __init__(self, root: pathlib.Path, mode: str) -> None:
        if mode not in LOCK_MODES:
            raise StudyError(f"`lock` must be one of {list(LOCK_MODES)}, got {mode!r:.40}.")
        self.root, self.mode = root, mode
        self._fd: Optional[int] = None
        self._ident: Optional[Tuple[int, int]] = None
        self._files: Dict[int, Tuple[pathlib.Path, str]] = {}

    # -- the locks file (both modes) ------------------------------------------------------------

    def _locks_fd(self) -> int:
        path = self.root / "locks"
        if self._fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            except OSError as exc:
                raise StudyError(f"{path} cannot be opened ({exc.strerror or exc}); it must be the study's regular locks file.") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise StudyError(f"{path} is not a regular file; remove it (it is re-created empty).")
            self._fd, self._ident = fd, (st.st_dev, st.st_ino)
        return self._fd

    def check_unchanged(self, model_id: int) -> None:
        """Raise if ROOT/locks was removed or replaced since this process locked it: another process
        may then hold model `model_id` on the new file."""
        if self._ident is None:
            return
        try:
            st = os.stat(self.root / "locks", follow_symlinks=False)
            same = (st.st_dev, st.st_ino) == self._ident
        except OSError:
            same = False
        if not same:
            raise StudyError(
                f"{self.root / 'locks'} was removed or replaced while this process held model {model_id}: another "
                f"process may be training it too, so model {model_id} is not saved. Never delete the locks file of a running study."
            )

    def _posix(self, model_id: int, required: bool) -> bool:
        fd = self._locks_fd()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, model_id)
            return True
        except OSError as exc:
            if exc.errno in _HELD:
                raise StudyError(
                    f"model {model_id} is being trained by another process (or the study is being grown); two processes "
                    f"never write one model. Its task will finish it (or, if killed, release it)."
                ) from None
            if not required:
                return False
            raise StudyError(
                f"this file system refuses POSIX record locks on {self.root / 'locks'} ({exc.strerror or exc}), as some "
                f"network file systems do; open the study with Study(root, ..., lock='lockfile') in every task."
            ) from None

    # -- the attempt hint --------------------------------------------------------------------------

    def hint(self, model_id: int) -> int:
        """Byte `model_id` of ROOT/locks: the newest attempt of the model (mod 256), written by the
        process that completed it while it held the model. A hint only: when it equals what this
        process knows, the task logs need no scan before training the model."""
        try:
            data = os.pread(self._locks_fd(), 1, model_id)
        except OSError:
            return -1
        return data[0] if data else 0

    def set_hint(self, model_id: int, attempt: int) -> None:
        with contextlib.suppress(OSError):
            os.pwrite(self._locks_fd(), bytes([attempt % 256]), model_id)

    # -- lock files --------------------------------------------------------------------------------

    def _lockfile(self, model_id: int) -> None:
        folder = self.root / "locks.d"
        folder.mkdir(exist_ok=True)
        path = folder / f"{model_id}.lock"
        token = secrets.token_hex(8)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()), "token": token}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                self._take_over(path, model_id)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            self._files[model_id] = (path, token)
            return
        raise StudyError(f"model {model_id}: could not take {path}; try again.")

    def _holder(self, path: pathlib.Path) -> Optional[Dict[str, Any]]:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _take_over(self, path: pathlib.Path, model_id: int) -> None:
        """Remove `path` if its holder (on this host) is gone; raise if it is alive or elsewhere."""
        holder = self._holder(path)
        if holder is None:
            return  # released meanwhile: try again
        here = holder.get("host") == socket.gethostname()
        pid = holder.get("pid")
        alive = type(pid) is int and _start_time(pid) is not None and _start_time(pid) in (holder.get("start"), "unknown")
        if not holder or not here or alive:
            who = f"PID {pid} on {holder.get('host')!r}" if holder else "a writer that was killed mid-write"
            raise StudyError(
                f"model {model_id} is being trained by another process ({who}, lock file {path}); two processes never write "
                f"one model. If that process is gone, delete {path}."
            )
        marker = path.with_suffix(".break")
        with contextlib.suppress(FileNotFoundError):
            if time.time() - marker.stat().st_mtime > _BREAK_AFTER_S:
                marker.unlink()
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise StudyError(f"model {model_id}: another process is taking over its stale lock {path}; try again.") from None
        try:
            if self._holder(path) == holder:  # still the dead holder's: remove it
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        finally:
            marker.unlink()

    # -- both --------------------------------------------------------------------------------------

    def acquire(self, model_id: int) -> None:
        if self.mode == "posix":
            self._posix(model_id, required=True)
            holder = self.root / "locks.d" / f"{model_id}.lock"
            if holder.exists():  # a lockfile-mode task of this study holds it
                self._release_posix(model_id)
                raise StudyError(f"model {model_id} is being trained by another process (lock file {holder}); two processes never write one model.")
        else:
            self._lockfile(model_id)
            try:
                self._posix(model_id, required=False)
            except StudyError:
                self.release(model_id)
                raise

    def _release_posix(self, model_id: int) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, model_id)

    def release(self, model_id: int) -> None:
        self._release_posix(model_id)
        path, token = self._files.pop(model_id, (None, None))
        if path is not None and (self._holder(path) or {}).get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def check_held(self, model_id: int) -> None:
        self.check_unchanged(model_id)
        if model_id in self._files:
            path, token = self._files[model_id]
            if (self._holder(path) or {}).get("token") != token:
                raise StudyError(f"{path} was removed or replaced while this process held model {model_id}; model {model_id} is not saved.")

    def lock_all(self) -> None:
        """Every model at once (for grow): refused while any task holds one."""
        if _active:
            raise StudyError(f"a task is training a model of this study (model {_active['model']}, in this process); grow it when no task is running.")
        fd = self._locks_fd()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)
        except OSError as exc:
            if exc.errno in _HELD:
                raise StudyError("a task is training a model of this study; grow it when no task is running.") from None
            if self.mode == "posix":
                raise
        held = sorted((self.root / "locks.d").glob("*.lock")) if (self.root / "locks.d").is_dir() else []
        try:
            for path in held:  # a killed task's lock file is stale: taken over as run() would take it
                stem = path.name[: -len(".lock")]
                if not stem.isdigit():
                    raise StudyError(f"a task holds {path}; grow the study when no task is running.")
                self._take_over(path, int(stem))
                if path.exists():
                    raise StudyError(f"a task holds {path}; grow the study when no task is running.")
        except StudyError:
            self.unlock_all()
            raise

    def unlock_all(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 0, 0)
