"""The study: its definition, which models a task trains, running one (see ``run``), growing it."""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Mapping
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np

from ..derive import SCHEMES, check_master_seed, derive_seed
from ..manifest import Manifest
from ..masks import check_mask_args
from . import definition as defn
from .definition import FIELDS, StudyError
from .audit import StudyView, audit, study_manifest
from .locks import Locks, only_run_in_process
from .logs import Index, Lines, TaskLog
from .rows import Rows
from .run import StudyRun, is_artifact_name

_MASTER_MAX = 2**32 - 1
PathLike = Union[str, "os.PathLike[str]"]


class Study:
    """An LDS/datamodels study across many jobs: definition, masks, outputs and an audit.

    The first process to open `root` creates it (whole, or not at all); every later one checks
    that its arguments equal the stored ones, or raises :class:`StudyError` naming the field.
    Masks are derived from (master seed, alpha, mode, group), or brought with ``masks=`` (a
    models x examples bool array, recorded by digest). ``lock`` is how tasks exclude each other:
    ``"posix"`` record locks, or ``"lockfile"`` where the file system refuses them.
    """

    # the definition's fields (study.json), set from it on every open
    master_seed: int
    num_models: int
    num_examples: int
    num_outputs: int
    alpha: Optional[float]
    mode: str
    replicates: int
    scheme: str

    def __init__(
        self,
        root: PathLike,
        *,
        master_seed: int,
        num_models: int,
        num_examples: int,
        alpha: Optional[float] = None,
        num_outputs: int,
        mode: str = "fixed",
        replicates: int = 1,
        scheme: str = "sha256-v2",
        masks: Any = None,
        lock: str = "posix",
    ) -> None:
        check_master_seed(master_seed)
        for name, value in (("num_models", num_models), ("num_examples", num_examples), ("num_outputs", num_outputs), ("replicates", replicates)):
            defn.check_count(name, value)
        if scheme not in SCHEMES:
            raise StudyError(f"`scheme` must be one of {sorted(SCHEMES)}, got {scheme!r}.")
        if num_models % replicates:
            raise StudyError(f"`num_models` ({num_models}) must be a multiple of `replicates` ({replicates}).")
        given = None
        if masks is not None:
            if alpha is not None or mode != "fixed":
                raise StudyError("with `masks=` leave `alpha` and `mode` out: the given masks are the subsets.")
            given = defn.given_masks(masks, num_models, num_examples, replicates)
            source: Dict[str, Any] = {"alpha": None, "mode": "given", "masks": "given", "masks_digests": [defn.segment(0, given)]}
        else:
            if alpha is None:
                raise StudyError("`alpha` (the fraction of examples each model trains on) is needed unless `masks=` is given.")
            check_mask_args(num_examples, alpha, mode)
            source = {"alpha": float(alpha), "mode": mode, "masks": "derived", "masks_digests": []}
        d = defn.check_definition({
            "master_seed": master_seed, "num_models": num_models, "num_examples": num_examples,
            "num_outputs": num_outputs, "replicates": replicates, "scheme": scheme, **source,
        })
        root = pathlib.Path(root)
        if root.exists() and not root.is_dir():
            raise StudyError(f"`root` {str(root)!r} is a file; a study root is a directory (give a new path).")
        if not (root / "study.json").exists():
            if not (root.is_dir() and any(root.iterdir())):
                defn.create_root(root, d, given)  # whole or not at all; of racing processes one wins
            if not (root / "study.json").exists():
                raise StudyError(f"`root` {str(root)!r} is a folder that holds files but no study.json; give an empty or new folder.")
        stored = defn.read_definition(root / "study.json")
        defn.compare(stored, d, given)
        self._init(root, stored, lock)

    @classmethod
    def open(cls, root: PathLike, *, lock: str = "posix") -> "Study":
        """The study at `root`, with the definition it holds (for tasks, the audit and the command line)."""
        root = pathlib.Path(root)
        if not (root / "study.json").is_file():
            raise StudyError(f"{str(root)!r} holds no study (no study.json); create one with Study(root, ...).")
        study = cls.__new__(cls)
        study._init(root, defn.read_definition(root / "study.json"), lock)
        return study

    def _init(self, root: pathlib.Path, definition: Mapping[str, Any], lock: str) -> None:
        self.root = root
        self.task: Optional[int] = None
        self._masters: List[int] = []
        self._masters_seen: set = set()
        self._locks = Locks(root, lock)
        self._log = TaskLog(root / "tasks")
        self._rows = Rows(root)
        self._index = Index(root / "tasks", 0)  # sized by _set_definition, once the arrays are checked
        self._scanned = False
        self._set_definition(definition)

    def _set_definition(self, definition: Mapping[str, Any]) -> None:
        self.definition = dict(definition)
        for key in FIELDS:
            setattr(self, key, definition[key])
        self._rows.check(self.definition)  # before sizing anything by num_models: a definition that lies is refused here
        self._index.resize(self.num_models)
        with contextlib.suppress(OSError):
            st = os.stat(self.root / "study.json")
            self._definition_stamp = (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reload(self) -> None:
        """Pick up a grow by another process (one stat when nothing changed)."""
        try:
            st = os.stat(self.root / "study.json")
        except OSError:
            raise StudyError(f"{self.root / 'study.json'} is missing: the study's definition was deleted; restore it.") from None
        if (st.st_ino, st.st_mtime_ns, st.st_size) != self._definition_stamp:
            d = defn.read_definition(self.root / "study.json")
            if any(d[k] != self.definition[k] for k in FIELDS if k != "num_models") or d["num_models"] < self.num_models:
                raise StudyError(f"{self.root / 'study.json'} was replaced by another study's definition; restore it.")
            self._set_definition(d)

    def __repr__(self) -> str:
        return f"Study({str(self.root)!r}, " + ", ".join(f"{k}={getattr(self, k)!r}" for k in FIELDS) + ")"

    # -- which models ---------------------------------------------------------------------------

    def _refresh(self) -> Index:
        self._reload()
        self._index.refresh()
        self._scanned = True
        return self._index

    def completed(self) -> List[int]:
        """Model ids whose rows and manifest are on disk, sorted."""
        return self._refresh().completed().tolist()

    def status(self) -> Dict[str, int]:
        """``{"models", "done", "missing"}``: how many models the study has, have completed, are left."""
        done = len(self._refresh().completed())
        return {"models": self.num_models, "done": done, "missing": self.num_models - done}

    def models_for(self, task: Optional[int] = None, num_tasks: Optional[int] = None, *, redo: bool = False) -> List[int]:
        """The model ids of task `task` of `num_tasks` (ids task, task + num_tasks, ...), without the
        completed ones unless `redo`. Defaults come from a SLURM job array as written
        (``--array=0-15``, ``1-16``, ``0-30:2``: ``SLURM_ARRAY_TASK_ID``, ``_MIN``, ``_MAX``,
        ``_STEP``), else from ``SEEDREG_TASK`` and ``SEEDREG_NUM_TASKS``."""
        if task is None or num_tasks is None:
            env_task, env_num = _task_from_environment()
            task = env_task if task is None else task
            num_tasks = env_num if num_tasks is None else num_tasks
        defn.check_count("num_tasks", num_tasks)
        if type(task) is not int or not 0 <= task < num_tasks:
            raise StudyError(f"`task` must be an int in [0, {num_tasks - 1}] (num_tasks={num_tasks}), got {task!r:.40}.")
        self.task = task
        index = self._refresh()
        ids = np.arange(task, self.num_models, num_tasks)
        if not redo:
            ids = ids[index.log[ids] < 0]
        return ids.tolist()

    def manifest_of(self, model_id: int) -> Manifest:
        """The manifest of model `model_id`'s newest completion."""
        self._check_id(model_id)
        index = self._refresh()
        if index.log[model_id] < 0:
            raise StudyError(f"model {model_id} is not complete; no task log holds its manifest.")
        lines = Lines.of(self.root, self._index)  # the one reader of completion lines (digest, parser, model id)
        try:
            _, entry = lines.read(model_id)
        finally:
            lines.close()
        return Manifest.from_dict(entry["manifest"])

    def artifact(self, model_id: int, name: str) -> pathlib.Path:
        """The path of artifact `name` of model `model_id`'s newest completion: a name its
        ``save()`` recorded, inside the study's artifacts folder."""
        self._check_id(model_id)
        if not is_artifact_name(name):
            raise StudyError(f"`name` must be a plain file name (letters, digits, '_', '.', '-'), got {name!r:.60}.")
        index = self._refresh()
        if index.log[model_id] < 0:
            raise StudyError(f"model {model_id} is not complete; it has no artifacts yet.")
        recorded = {r["name"] for r in self.manifest_of(model_id).results}
        path = self.root / "artifacts" / str(model_id) / str(int(index.attempt[model_id])) / name
        if f"study.artifact.{name}" not in recorded:
            raise StudyError(f"model {model_id} recorded no artifact {name!r} (its save() recorded "
                             f"{sorted(r[len('study.artifact.'):] for r in recorded if r.startswith('study.artifact.'))}).")
        if not path.is_file():
            raise StudyError(f"model {model_id}'s artifact {name!r} is missing (no {path}); its save() recorded it: restore it.")
        return path

    # -- seeds and masks --------------------------------------------------------------------------

    def model_master_seed(self, model_id: int) -> int:
        """The master seed of model `model_id`'s session: derived from the study's master seed and
        the id, 32-bit, and distinct from every lower id's (a collision is stepped past)."""
        self._check_id(model_id)
        masters, seen = self._masters, self._masters_seen
        if len(masters) <= model_id:
            for i in range(len(masters), model_id + 1):
                k = 0
                while True:
                    m = derive_seed(self.master_seed, "study/model", i if k == 0 else f"{i}/{k}", scheme="sha256-v2") & _MASTER_MAX
                    if m not in seen:
                        break
                    k += 1
                seen.add(m)
                masters.append(m)
        return masters[model_id]

    def mask(self, model_id: int) -> np.ndarray:
        """Model `model_id`'s training subset (shared by its replicate group): derived, or the given row."""
        self._check_id(model_id)
        if self.definition["masks"] == "given":
            return defn.read_rows(self.root / "masks.npy", self._rows.header("masks.npy"), self.num_examples, model_id, model_id + 1)[0]
        return defn.derived_mask(self.definition, model_id // self.replicates)

    def _check_id(self, model_id: Any) -> None:
        if type(model_id) is int and model_id >= self.num_models:
            self._reload()
        if type(model_id) is not int or not 0 <= model_id < self.num_models:
            raise StudyError(f"`model_id` must be an int in [0, {self.num_models - 1}], got {model_id!r:.40}.")

    # -- running a model ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, model_id: int, *, redo: bool = False) -> Iterator[StudyRun]:
        """Train model `model_id`: hold its lock, give a set-up session whose every seed and every
        global draw inside the block depends only on (study master seed, model_id). One run at a
        time per process (global random state is per process)."""
        from ..session import SeedSession

        self._check_id(model_id)
        with only_run_in_process(self.root, model_id):
            self._locks.acquire(model_id)
            try:
                index = self._index
                if not self._scanned or self._locks.hint(model_id) != int(index.attempt[model_id]) % 256:
                    index = self._refresh()  # another process completed it since this one last looked
                else:
                    self._reload()
                done = index.log[model_id] >= 0
                if done and not redo:
                    raise StudyError(f"model {model_id} is complete already; pass redo=True to train it again.")
                attempt = int(index.attempt[model_id]) + 1 if done else 1
                # setup() seeds python, numpy, torch and CUDA from the model's own master seed
                session = SeedSession(self.model_master_seed(model_id), scheme=self.scheme).setup()
                run = StudyRun(self, model_id, session, self.mask(model_id), attempt, commit=self._commit)
                try:
                    yield run
                finally:
                    run.close()
            finally:
                self._locks.release(model_id)

    def _commit(self, run: StudyRun, row: np.ndarray, line: bytes, digest: bytes) -> None:
        """Complete `run`'s model: its rows first, then (under its lock still) its completion line."""
        model_id = run.model_id
        self._locks.check_held(model_id)
        self._rows.write("outputs.npy", model_id, row.astype("<f4").tobytes())
        if self.definition["masks"] != "given":
            self._rows.write("masks.npy", model_id, run.mask.tobytes())
        self._locks.check_held(model_id)
        self._log.append(model_id, run.attempt, line, digest)
        self._locks.set_hint(model_id, run.attempt)

    def grow(self, num_models: int, *, masks: Any = None) -> "Study":
        """Add models up to `num_models` (models 0..N-1, their masks, rows and records unchanged).
        A study with given masks needs the new models' `masks` rows. Refused while a task runs."""
        self._reload()
        old = self.num_models
        defn.check_count("num_models", num_models, old + 1, defn.MAX_MODELS)
        d = dict(self.definition, num_models=num_models)
        rows = None
        if d["masks"] == "given":
            if masks is None:
                raise StudyError(f"this study's masks are given: grow(num_models, masks=...) needs rows for models {old}..{num_models - 1}.")
            rows = defn.given_masks(masks, num_models - old, self.num_examples, self.replicates)
            d["masks_digests"] = d["masks_digests"] + [defn.segment(old, rows)]
        elif masks is not None:
            raise StudyError("this study derives its masks; grow(num_models) takes no `masks`.")
        defn.check_definition(d)
        self._locks.lock_all()
        try:
            for name in ("masks.npy", "outputs.npy"):
                defn.grow_array(self.root / name, self.definition, num_models)
            if rows is not None:
                offset = defn.array_header(self.root / "masks.npy", d)
                with open(self.root / "masks.npy", "r+b") as fh:
                    fh.seek(offset + old * self.num_examples)
                    fh.write(rows.tobytes())
            defn.write_text_atomic(self.root / "study.json", defn.definition_text(d))
            self._set_definition(defn.read_definition(self.root / "study.json"))
        finally:
            self._locks.unlock_all()
        return self

    # -- reading ------------------------------------------------------------------------------------

    def masks(self) -> np.ndarray:
        """``masks.npy`` (models x examples, bool), read-only memory map."""
        self._rows.header("masks.npy")
        return np.load(self.root / "masks.npy", mmap_mode="r")

    def outputs(self) -> np.ndarray:
        """``outputs.npy`` (models x outputs, float32), read-only memory map."""
        self._rows.header("outputs.npy")
        return np.load(self.root / "outputs.npy", mmap_mode="r")

    def audit(self, *, progress: Any = None, workers: Optional[int] = None) -> Dict[str, Any]:
        """Check the whole study, a chunk of rows at a time; ``report["ok"]`` is True when nothing
        is wrong: every model complete, its record intact, its manifest the study's (seeds
        re-derived, no nondeterministic op), its rows and artifacts the ones it recorded, and one
        environment. ``progress(done, total)`` is called after each chunk; `workers` processes
        share the chunks (default: one per core, up to 8, from 4,000 models)."""
        return audit(self._view(), progress=progress, workers=workers)

    def study_manifest(self, *, progress: Any = None) -> Manifest:
        """One manifest for the whole study (``seedreg show`` reads it): the study-level seeds as
        records, and each model's newest mask digest and outputs fingerprint as results."""
        return study_manifest(self._view(), progress=progress)

    def _view(self) -> StudyView:
        index = self._refresh()
        self.model_master_seed(self.num_models - 1)  # every model's, derived once here
        return StudyView(self.root, self.definition, index, list(self._masters))


def _task_from_environment() -> "tuple[int, int]":
    env = os.environ

    def num(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise StudyError(f"{name}={env[name]!r:.40} is not an int.") from None

    if "SLURM_ARRAY_TASK_ID" in env:
        tid = num("SLURM_ARRAY_TASK_ID")
        if "SLURM_ARRAY_TASK_MIN" in env and "SLURM_ARRAY_TASK_MAX" in env:
            lo, hi = num("SLURM_ARRAY_TASK_MIN"), num("SLURM_ARRAY_TASK_MAX")
            step = num("SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
            if step < 1 or not lo <= tid <= hi or (tid - lo) % step:
                raise StudyError(f"SLURM_ARRAY_TASK_ID={tid} is not in the array {lo}-{hi}:{step}; pass task and num_tasks.")
            count = (hi - lo) // step + 1
            if "SLURM_ARRAY_TASK_COUNT" in env and num("SLURM_ARRAY_TASK_COUNT") != count:
                raise StudyError(
                    f"this job array is a list (SLURM_ARRAY_TASK_COUNT={env['SLURM_ARRAY_TASK_COUNT']}, but {lo}-{hi}:{step} has {count} "
                    f"tasks); write it as a range (--array=0-{count - 1}) or pass task and num_tasks."
                )
            return (tid - lo) // step, count
        if "SLURM_ARRAY_TASK_COUNT" in env:
            return tid, num("SLURM_ARRAY_TASK_COUNT")
    if "SEEDREG_TASK" in env and "SEEDREG_NUM_TASKS" in env:
        return num("SEEDREG_TASK"), num("SEEDREG_NUM_TASKS")
    raise StudyError(
        "models_for() needs `task` and `num_tasks`, or a SLURM job array (SLURM_ARRAY_TASK_ID with _MIN, _MAX, _STEP), "
        "or SEEDREG_TASK and SEEDREG_NUM_TASKS in the environment."
    )
