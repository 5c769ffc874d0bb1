"""Reading and writing files safely: a regular file of bounded size (never a FIFO or a device),
and an atomic write (temporary file, fsync, rename) that leaves the old file or the new one."""

from __future__ import annotations

import hashlib
import os
import pathlib
import secrets
import stat
from typing import Optional

from .errors import ManifestError, ManifestWriteError

__all__ = ["atomic_write", "check_density", "read_regular_file"]


def read_regular_file(path: pathlib.Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else is a ManifestError."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ManifestError("no manifest there: the file does not exist") from None
    except IsADirectoryError:
        raise ManifestError("is a directory, not a manifest file") from None
    except OSError as exc:
        raise ManifestError(f"cannot open it: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ManifestError("is a directory, not a manifest file")
        if not stat.S_ISREG(info.st_mode):
            raise ManifestError("is not a regular file (a pipe, socket or device); seedreg reads manifests from files only")
        if info.st_size > limit:
            raise ManifestError(f"is {info.st_size} bytes, more than the {limit} expected there")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 24, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise ManifestError(f"grew past {limit} bytes while being read")
        return b"".join(chunks)
    except OSError as exc:
        raise ManifestError(f"cannot read it: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


#: Parsed JSON costs far more memory than its text when the text is mostly tiny containers
#: (``[[],[],...]``: about 27 bytes a byte). seedreg's own layout stays well under this multiple.
_MAX_PARSE_MULTIPLE = 16
_DENSITY_CHECKED = 1 << 20


def check_density(text: str, where: str) -> None:
    """Refuse, before parsing, text whose parse would take more than _MAX_PARSE_MULTIPLE times its
    size (an estimate from its brackets, braces, quotes and commas): memory stays a small multiple
    of the file whatever its layout."""
    if len(text) < _DENSITY_CHECKED:
        return
    estimate = 72 * text.count("[") + 240 * text.count("{") + 25 * text.count('"') + 8 * text.count(",")
    if estimate > _MAX_PARSE_MULTIPLE * len(text):
        raise ManifestError(
            f"{where} is laid out as no seedreg manifest is ({len(text):,} characters of mostly tiny JSON values, "
            f"which would take about {estimate // len(text)} times their size to parse); it was not written by seedreg."
        )



def _temp_prefix(path: pathlib.Path) -> str:
    # short whatever the target's name (a 255-byte name still works), and the same for every
    # writer of this target, so that a later dump finds the leftovers of a killed one
    return "." + hashlib.sha256(path.name.encode("utf-8", "surrogatepass")).hexdigest()[:12] + "."


def _remove_stale_temps(directory: pathlib.Path, prefix: str) -> None:
    """Remove temporary files of this target left by writers that no longer run (a SIGKILL mid-dump)."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        try:
            pid = int(name[len(prefix):].split(".", 1)[0])
            os.kill(pid, 0)
            continue  # its writer is alive (maybe another process dumping right now)
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError, OSError):
            continue
        try:
            os.unlink(directory / name)
        except OSError:
            pass


def atomic_write(path: pathlib.Path, payload: bytes) -> pathlib.Path:
    """Write `payload` to `path` so that readers see the old file or the new one, never a mix.

    Missing parent directories are created. A new file gets the usual permissions (0666 less the
    umask); an existing file keeps its mode. Temporary files of this target left by a killed
    writer are removed first.
    """
    directory = path.parent if str(path.parent) else pathlib.Path(".")
    tmp_name = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        prefix = _temp_prefix(path)
        _remove_stale_temps(directory, prefix)
        try:
            mode: Optional[int] = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = None
        tmp_name = str(directory / f"{prefix}{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:  # pragma: no cover - platforms without directory fds
            return path
        try:
            os.fsync(dir_fd)
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(dir_fd)
        return path
    except OSError as exc:
        raise ManifestWriteError(
            f"cannot write {path}: {exc.strerror or exc}; the previous file (if any) is untouched. "
            f"Check that the directory is writable and has space."
        ) from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
