"""A study's row files (``masks.npy``, ``outputs.npy``): each row written through a header checked
against the study's definition, never past a file that changed under it."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any, Dict, Tuple

from . import definition as defn
from .definition import StudyError

__all__ = ["Rows"]


class Rows:
    """The row files of the study in `root`."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.definition: Mapping[str, Any] = {}
        self._headers: Dict[str, Tuple[int, bytes]] = {}

    def check(self, definition: Mapping[str, Any]) -> None:
        """Check every row file's header against `definition` (a study's, or its grown one)."""
        self.definition = definition
        self._headers = {}
        for name in defn.ARRAYS:
            self.header(name)

    def header(self, name: str) -> int:
        """Row 0's offset in `name`, from a header checked against the definition."""
        offset = defn.array_header(self.root / name, self.definition)
        with open(self.root / name, "rb") as fh:
            self._headers[name] = (offset, fh.read(offset))
        return offset

    def write(self, name: str, model_id: int, data: bytes) -> None:
        """Write one row through the header checked for it: the file's header bytes must still be
        the ones validated (re-validated if they changed), and the file long enough."""
        try:
            fd = os.open(self.root / name, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise StudyError(f"{self.root / name} cannot be opened for model {model_id}'s row ({exc.strerror or exc}); restore the study's file.") from None
        try:
            offset, header = self._headers.get(name, (0, b""))
            if not header or os.pread(fd, offset, 0) != header:
                offset = self.header(name)
            if os.fstat(fd).st_size < offset + self.definition["num_models"] * len(data):
                offset = self.header(name)  # names the truncation
            written = os.pwrite(fd, data, offset + model_id * len(data))
            if written != len(data):
                raise OSError(28, "short write")
        except OSError as exc:
            raise StudyError(
                f"model {model_id}: writing its row of {name} failed ({exc.strerror or exc}); it stays incomplete: free space and run it again."
            ) from None
        finally:
            os.close(fd)
