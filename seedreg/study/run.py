"""One model's run inside a study: its session, mask, artifacts, and the save that completes it."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Callable, Dict

import numpy as np

from ..masks import mask_digest
from .definition import StudyError
from .logs import file_sha256, outputs_digest

_ARTIFACT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def is_artifact_name(name: object) -> bool:
    """Whether `name` is a plain file name an artifact may have (no folder, no dots alone, no newline)."""
    return isinstance(name, str) and _ARTIFACT_NAME.fullmatch(name) is not None and name not in (".", "..")


class StudyRun:
    """One model of a study, inside ``with study.run(model_id) as run:``.

    ``run.session`` is set up for this model alone; ``run.mask`` is its training subset;
    ``run.artifact(name)`` is a path for a file of this model's (weights, a TRAK checkpoint) whose
    digest :meth:`save` records. :meth:`save` (once, inside the block) writes the model's rows and
    manifest, then marks it complete.
    """

    def __init__(self, study: Any, model_id: int, session: Any, mask: np.ndarray, attempt: int, *,
                 commit: Callable[["StudyRun", np.ndarray, bytes, bytes], None]) -> None:
        self.study = study
        self.model_id = model_id
        self.mask_id = model_id // study.replicates
        self.session = session
        self.mask = mask
        self.attempt = attempt
        self.saved = False
        self._open = True
        self._artifacts: Dict[str, pathlib.Path] = {}
        self._commit = commit  # the study's: writes the rows, then the completion line

    def close(self) -> None:
        """The ``with study.run(...)`` block ended: the model's lock is released, nothing more is saved."""
        self._open = False

    def artifact(self, name: str) -> pathlib.Path:
        """A path for this model's file `name` (``ROOT/artifacts/ID/ATTEMPT/name``): write it before
        :meth:`save`, which records its SHA-256; the audit checks it. A retrained model writes a new
        attempt's folder, so a crash never touches the artifacts of a completed run."""
        if not is_artifact_name(name):
            raise StudyError(f"`name` must be a plain file name (letters, digits, '_', '.', '-'), got {name!r:.60}.")
        self._check_open("artifact")
        folder = self.study.root / "artifacts" / str(self.model_id) / str(self.attempt)
        folder.mkdir(parents=True, exist_ok=True)
        self._artifacts[name] = folder / name
        return folder / name

    def _check_open(self, what: str) -> None:
        if not self._open:
            raise StudyError(
                f"run.{what}() of model {self.model_id} after its `with study.run(...)` block ended: the model's lock is "
                f"released; call it inside the block."
            )
        if self.saved:
            raise StudyError(f"model {self.model_id} is saved already; save() once per run (train it again with redo=True).")

    def save(self, outputs: Any) -> None:
        """Write row `model_id` of ``outputs.npy`` (and of ``masks.npy``), the model's manifest, and
        then (only then) mark the model complete. Any failure raises and leaves it incomplete."""
        self._check_open("save")
        study = self.study
        row = np.asarray(outputs.detach().cpu().numpy() if hasattr(outputs, "detach") else outputs, dtype=np.float32)
        if row.shape != (study.num_outputs,):
            raise StudyError(
                f"`outputs` of model {self.model_id} must have shape ({study.num_outputs},) (num_outputs), got {row.shape}."
            )
        if not np.isfinite(row).all():
            raise StudyError(f"`outputs` of model {self.model_id} holds NaN or infinite values; save finite numbers.")
        digests = {name: _file_digest(path, self.model_id, name) for name, path in sorted(self._artifacts.items())}
        s = self.session
        have = {r["name"] for r in s.results}
        for name, value in (
            ("study.master_seed", study.master_seed),
            ("study.model_id", self.model_id),
            ("study.mask_id", self.mask_id),
            ("study.mask_digest", mask_digest(self.mask)),
            ("study.attempt", self.attempt),
            *((f"study.artifact.{k}", v) for k, v in digests.items()),
        ):
            if name not in have:
                s.record_result(name, value)
        s.record_result("study.task", study.task)
        s.record_result("outputs", row)
        line = json.dumps({"model_id": self.model_id, "attempt": self.attempt, "manifest": s.manifest().to_dict()},
                          separators=(",", ":")) + "\n"
        self._commit(self, row, line.encode("utf-8"), outputs_digest(row))
        self.saved = True


def _file_digest(path: pathlib.Path, model_id: int, name: str) -> str:
    if not path.is_file():
        raise StudyError(f"artifact {name!r} of model {model_id} ({path}) was asked for but not written; write it before save().")
    return file_sha256(path)
