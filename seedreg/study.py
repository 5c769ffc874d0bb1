"""Studies: thousands of LDS models trained across many jobs, as one auditable study.

A study is a directory in the datamodels layout::

    ROOT/study.json         the definition (written once, by whichever process gets there first)
    ROOT/masks.npy          models x examples, bool: row i is model i's training subset
    ROOT/outputs.npy        models x outputs, float32: row i is what model i's run saved
    ROOT/tasks/HOST-PID.jsonl  the log of one task process: a line per model it completed, holding
                            the model's manifest (its seeds, uses and results); appended last, after
                            the model's rows are on disk, the line is what marks the model complete
    ROOT/locks              byte i is locked (a POSIX record lock) while a process trains model i

Jobs are independent processes (a SLURM array, or N local processes): each asks
:meth:`Study.models_for` for its share and runs them; :meth:`Study.audit` checks the whole.
Everything random about model i depends only on (study master seed, i): its mask (shared by the
models of one replicate group), its session's seeds, and every global draw inside ``study.run(i)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import re
import secrets
import socket
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

import numpy as np

from .masks import check_mask_args, make_subset_mask, mask_digest
from .derive import SCHEMES, check_master_seed, derive_seed
from .errors import ManifestError, SeedregError
from .fingerprint import result_entry
from .lds import lds_score  # re-exported beside the study it scores
from .manifest import Manifest

__all__ = ["Study", "StudyError", "StudyRun", "lds_score"]


FORMAT = "seedreg-study"
VERSION = 1
_FIELDS = ("master_seed", "num_models", "num_examples", "alpha", "num_outputs", "mode", "replicates", "scheme")
_MASTER_MAX = 2**32 - 1
_SETTINGS = {"deterministic": True, "warn_only": True, "fill_uninitialized_memory": True}  # SeedSession's defaults


class StudyError(SeedregError, ValueError):
    """A study's directory, definition or use is wrong; the message names what and how to fix it."""


def _check_count(name: str, value: Any, low: int = 1) -> int:
    if type(value) is not int or value < low:
        raise StudyError(f"`{name}` must be an int >= {low}, got {value!r:.40}.")
    return value


def _definition_text(definition: Mapping[str, Any]) -> str:
    body = {"format": FORMAT, "version": VERSION, **{k: definition[k] for k in _FIELDS}}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return json.dumps({**body, "checksum": "sha256:" + digest}, sort_keys=True, indent=2) + "\n"


def _read_definition(path: pathlib.Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StudyError(f"{path} is not a readable study definition: {exc}.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise StudyError(f"{path} is not a seedreg study definition (format {FORMAT!r}, version {VERSION}).")
    if set(data) != set(_FIELDS) | {"format", "version", "checksum"} or _definition_text(data) != path.read_text(encoding="utf-8"):
        raise StudyError(f"{path} was edited by hand (its checksum or layout does not match); restore it, or start a new study root.")
    return {k: data[k] for k in _FIELDS}


def _create_once(path: pathlib.Path, write: Any) -> bool:
    """Create `path` with `write(tmp_path)` unless it exists; of many racing processes exactly one
    wins (a hard link never replaces a file). True if this process created it."""
    if path.exists():
        return False
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _npy_header(path: pathlib.Path) -> int:
    with open(path, "rb") as fh:
        np.lib.format.read_magic(fh)
        np.lib.format.read_array_header_1_0(fh)
        return fh.tell()


_LINE_ID = re.compile(rb'^\{"model_id":(\d+),', re.MULTILINE)
# (root, model id) of the models this process holds: POSIX locks cannot tell two holders in one process
_held: set = set()
_held_lock = threading.Lock()


class StudyRun:
    """One model of a study, inside ``with study.run(model_id) as run:``.

    ``run.session`` is set up for this model alone; ``run.mask`` is its training subset.
    :meth:`save` writes the model's rows and manifest, then marks it complete.
    """

    def __init__(self, study: "Study", model_id: int, session: Any, mask: np.ndarray) -> None:
        self.study = study
        self.model_id = model_id
        self.mask_id = model_id // study.replicates
        self.session = session
        self.mask = mask
        self.saved = False

    def save(self, outputs: Any) -> None:
        """Write row `model_id` of ``outputs.npy`` and ``masks.npy``, the model's manifest, and
        then (only then) mark the model complete."""
        study = self.study
        row = np.asarray(outputs.detach().cpu().numpy() if hasattr(outputs, "detach") else outputs, dtype=np.float32)
        if row.shape != (study.num_outputs,):
            raise StudyError(
                f"`outputs` of model {self.model_id} must have shape ({study.num_outputs},) (num_outputs), got {row.shape}."
            )
        if not np.isfinite(row).all():
            raise StudyError(f"`outputs` of model {self.model_id} holds NaN or infinite values; save finite numbers.")
        study._write_row("outputs.npy", self.model_id, row.tobytes())
        study._write_row("masks.npy", self.model_id, self.mask.tobytes())
        s = self.session
        for name, value in (
            ("study.master_seed", study.master_seed),
            ("study.model_id", self.model_id),
            ("study.mask_id", self.mask_id),
            ("study.mask_digest", mask_digest(self.mask)),
        ):
            if name not in {r["name"] for r in s.results}:
                s.record_result(name, value)
        s.record_result("study.task", study.task)
        s.record_result("outputs", row)
        # appended last, in one write: the line is what marks the model complete (a task killed
        # mid-write leaves a line without its newline, which does not count)
        study._append(self.model_id, s.manifest())
        self.saved = True


class Study:
    """An LDS/datamodels study across many jobs: definition, masks, outputs and an audit.

    The first process to open `root` writes the definition; every later one checks that its
    arguments equal the stored ones, or raises :class:`StudyError` naming the field.
    """

    def __init__(
        self,
        root: Union[str, "os.PathLike[str]"],
        *,
        master_seed: int,
        num_models: int,
        num_examples: int,
        alpha: float,
        num_outputs: int,
        mode: str = "fixed",
        replicates: int = 1,
        scheme: str = "sha256-v2",
    ) -> None:
        check_master_seed(master_seed)
        _check_count("num_models", num_models)
        _check_count("num_examples", num_examples)
        _check_count("num_outputs", num_outputs)
        _check_count("replicates", replicates)
        check_mask_args(num_examples, alpha, mode)
        if scheme not in SCHEMES:
            raise StudyError(f"`scheme` must be one of {sorted(SCHEMES)}, got {scheme!r}.")
        if num_models % replicates:
            raise StudyError(f"`num_models` ({num_models}) must be a multiple of `replicates` ({replicates}).")
        definition = {
            "master_seed": master_seed, "num_models": num_models, "num_examples": num_examples, "alpha": float(alpha),
            "num_outputs": num_outputs, "mode": mode, "replicates": replicates, "scheme": scheme,
        }
        root = pathlib.Path(root)
        if root.exists() and not root.is_dir():
            raise StudyError(f"`root` {str(root)!r} is a file; a study root is a directory (give a new path).")
        try:
            for sub in ("", "tasks"):
                (root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StudyError(f"cannot create the study directory {str(root)!r}: {exc.strerror or exc}.") from None
        text = _definition_text(definition)
        _create_once(root / "study.json", lambda p: p.write_text(text, encoding="utf-8"))
        stored = _read_definition(root / "study.json")
        for key in _FIELDS:
            if stored[key] != definition[key]:
                raise StudyError(
                    f"this study was defined with {key}={stored[key]!r} but {key}={definition[key]!r} was passed; "
                    f"pass the stored value, or use another root for another study."
                )
        self._init(root, stored)

    @classmethod
    def open(cls, root: Union[str, "os.PathLike[str]"]) -> "Study":
        """The study at `root`, with the definition it holds (for the audit and the command line)."""
        root = pathlib.Path(root)
        if not (root / "study.json").is_file():
            raise StudyError(f"{str(root)!r} holds no study (no study.json); create one with Study(root, ...).")
        study = cls.__new__(cls)
        study._init(root, _read_definition(root / "study.json"))
        return study

    def _init(self, root: pathlib.Path, definition: Mapping[str, Any]) -> None:
        self.root = root
        for key in _FIELDS:
            setattr(self, key, definition[key])
        self.definition = dict(definition)
        self.task: Optional[int] = None
        self._masters: Optional[List[int]] = None
        self._done: set = set()
        self._offsets: Dict[str, int] = {}
        self._lock_fd: Optional[int] = None
        self._log_fd: Optional[int] = None
        self._headers: Dict[str, int] = {}
        for name, dtype, width in (("masks.npy", np.bool_, self.num_examples), ("outputs.npy", np.float32, self.num_outputs)):
            shape = (self.num_models, width)
            _create_once(root / name, lambda p, d=dtype, s=shape: np.lib.format.open_memmap(p, mode="w+", dtype=d, shape=s).flush())

    def __repr__(self) -> str:
        return f"Study({str(self.root)!r}, " + ", ".join(f"{k}={getattr(self, k)!r}" for k in _FIELDS) + ")"

    # -- which models ---------------------------------------------------------------------------

    def completed(self) -> List[int]:
        """Model ids whose rows and manifest are on disk, sorted."""
        self._refresh()
        return sorted(self._done)

    def _refresh(self) -> None:
        """Read what the task logs gained since the last call (each log is only appended to)."""
        folder = self.root / "tasks"
        for name in os.listdir(folder):
            if not name.endswith(".jsonl"):
                continue
            offset = self._offsets.get(name, 0)
            try:
                with open(folder / name, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # complete lines only: a killed writer's last line does not count
            for match in _LINE_ID.finditer(data[:end]):
                model_id = int(match.group(1))
                if model_id < self.num_models:
                    self._done.add(model_id)
            self._offsets[name] = offset + end

    def entries(self) -> Iterator[Dict[str, Any]]:
        """Every complete line of every task log: ``{"model_id", "manifest", "log", "line"}``,
        the manifest as JSON data (validate it with :meth:`Manifest.from_dict`)."""
        folder = self.root / "tasks"
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".jsonl"):
                continue
            with open(folder / name, "rb") as fh:
                data = fh.read()
            lines = data.split(b"\n")
            for number, line in enumerate(lines[:-1], 1):  # the last piece has no newline: incomplete
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = None
                if not isinstance(entry, dict) or type(entry.get("model_id")) is not int or "manifest" not in entry:
                    yield {"model_id": None, "manifest": None, "log": name, "line": number}
                    continue
                yield {"model_id": entry["model_id"], "manifest": entry["manifest"], "log": name, "line": number}

    def manifest_of(self, model_id: int) -> Manifest:
        """The manifest model `model_id`'s run recorded (the latest, if it was trained again)."""
        self._check_id(model_id)
        found = None
        for entry in self.entries():
            if entry["model_id"] == model_id:
                found = entry
        if found is None:
            raise StudyError(f"model {model_id} is not complete; no task log holds its manifest.")
        return Manifest.from_dict(found["manifest"])

    def _append(self, model_id: int, manifest: Manifest) -> None:
        if self._log_fd is None:
            name = f"{socket.gethostname()}-{os.getpid()}.jsonl"
            self._log_fd = os.open(self.root / "tasks" / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        line = json.dumps({"model_id": model_id, "manifest": manifest.to_dict()}, sort_keys=False, separators=(",", ":"))
        os.write(self._log_fd, (line + "\n").encode("utf-8"))
        self._done.add(model_id)

    def models_for(self, task: Optional[int] = None, num_tasks: Optional[int] = None, *, redo: bool = False) -> List[int]:
        """The model ids of task `task` of `num_tasks` (ids task, task + num_tasks, ...), without the
        completed ones unless `redo`. Defaults: ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``,
        else ``SEEDREG_TASK``/``SEEDREG_NUM_TASKS``."""
        if task is None or num_tasks is None:
            for id_var, count_var in (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("SEEDREG_TASK", "SEEDREG_NUM_TASKS")):
                if id_var in os.environ and count_var in os.environ:
                    try:
                        task = int(os.environ[id_var]) if task is None else task
                        num_tasks = int(os.environ[count_var]) if num_tasks is None else num_tasks
                    except ValueError:
                        raise StudyError(f"{id_var}={os.environ[id_var]!r} / {count_var}={os.environ[count_var]!r} are not ints.") from None
                    break
            else:
                raise StudyError(
                    "models_for() needs `task` and `num_tasks`, or SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT "
                    "(a SLURM job array), or SEEDREG_TASK and SEEDREG_NUM_TASKS in the environment."
                )
        _check_count("num_tasks", num_tasks)
        if type(task) is not int or not 0 <= task < num_tasks:  # type: ignore[operator]
            raise StudyError(f"`task` must be an int in [0, {num_tasks - 1}] (num_tasks={num_tasks}), got {task!r:.40}.")  # type: ignore[operator]
        self.task = task
        done = set() if redo else set(self.completed())
        return [i for i in range(task, self.num_models, num_tasks) if i not in done]  # type: ignore[arg-type]

    # -- seeds ------------------------------------------------------------------------------------

    def model_master_seed(self, model_id: int) -> int:
        """The master seed of model `model_id`'s session: derived from the study's master seed and
        the id, 32-bit, and distinct from every lower id's (a collision is stepped past)."""
        self._check_id(model_id)
        if self._masters is None or len(self._masters) <= model_id:
            masters = self._masters or []
            seen = set(masters)
            for i in range(len(masters), self.num_models):
                k = 0
                while True:
                    m = derive_seed(self.master_seed, "study/model", i if k == 0 else f"{i}/{k}", scheme="sha256-v2") & _MASTER_MAX
                    if m not in seen:
                        break
                    k += 1
                seen.add(m)
                masters.append(m)
            self._masters = masters
        return self._masters[model_id]

    def mask(self, model_id: int) -> np.ndarray:
        """Model `model_id`'s training subset, derived (not read): shared by its replicate group."""
        self._check_id(model_id)
        seed = derive_seed(self.master_seed, "study/mask", model_id // self.replicates, scheme="sha256-v2")
        return make_subset_mask(seed, self.num_examples, self.alpha, self.mode)

    def _check_id(self, model_id: Any) -> None:
        if type(model_id) is not int or not 0 <= model_id < self.num_models:
            raise StudyError(f"`model_id` must be an int in [0, {self.num_models - 1}], got {model_id!r:.40}.")

    # -- running a model ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, model_id: int, *, redo: bool = False) -> Iterator[StudyRun]:
        """Train model `model_id`: hold its lock, give a set-up session whose every seed and every
        global draw inside the block depends only on (study master seed, model_id)."""
        from .session import SeedSession

        self._check_id(model_id)
        self._lock(model_id)
        try:
            if not redo and model_id in self.completed():
                raise StudyError(f"model {model_id} is complete already; pass redo=True to train it again.")
            # setup() seeds python, numpy, torch and CUDA from the model's own master seed: every
            # global draw inside the block depends on (study master seed, model_id) alone
            session = SeedSession(self.model_master_seed(model_id), scheme=self.scheme).setup()
            yield StudyRun(self, model_id, session, self.mask(model_id))
        finally:
            self._unlock(model_id)

    def _lock(self, model_id: int) -> None:
        """Lock byte `model_id` of ROOT/locks: a POSIX record lock, released by the kernel when its
        process dies (a killed task never leaves a model locked)."""
        key = (os.path.realpath(self.root), model_id)
        with _held_lock:
            if key in _held:  # POSIX locks belong to the process: another Study object here holds it
                raise StudyError(f"model {model_id} is being trained in this process already; two runs never write one model.")
            if self._lock_fd is None:
                self._lock_fd = os.open(self.root / "locks", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, model_id)
            except OSError:
                raise StudyError(
                    f"model {model_id} is being trained by another process; two processes never write one model. "
                    f"Its task will finish it (or, if killed, release it)."
                ) from None
            _held.add(key)

    def _unlock(self, model_id: int) -> None:
        with _held_lock:
            _held.discard((os.path.realpath(self.root), model_id))
            if self._lock_fd is not None:
                fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, model_id)

    def _write_row(self, name: str, model_id: int, data: bytes) -> None:
        header = self._headers.get(name)
        if header is None:
            header = self._headers[name] = _npy_header(self.root / name)
        fd = os.open(self.root / name, os.O_WRONLY)
        try:
            os.pwrite(fd, data, header + model_id * len(data))
        finally:
            os.close(fd)

    # -- reading ------------------------------------------------------------------------------------

    def masks(self) -> np.ndarray:
        """``masks.npy`` (models x examples, bool), read-only memory map."""
        return np.load(self.root / "masks.npy", mmap_mode="r")

    def outputs(self) -> np.ndarray:
        """``outputs.npy`` (models x outputs, float32), read-only memory map."""
        return np.load(self.root / "outputs.npy", mmap_mode="r")

    def status(self) -> Dict[str, int]:
        done = len(self.completed())
        return {"models": self.num_models, "done": done, "missing": self.num_models - done}

    # -- the audit -----------------------------------------------------------------------------------

    def audit(self) -> Dict[str, Any]:
        """Check the whole study; ``report["ok"]`` is True when nothing is wrong.

        Every model complete exactly once (else ``missing`` lists the ids); every model manifest
        has the study's master seed, scheme and model id, re-derives every seed it records, and an
        environment that agrees with the others on what bitwise equality needs; every stored mask
        row equals its recorded digest and its re-derivation.
        """
        from .replay import BITWISE_KEYS

        problems: List[str] = []
        manifests: Dict[int, Manifest] = {}
        outputs_seen: Dict[int, Any] = {}
        for entry in self.entries():
            where = f"tasks/{entry['log']} line {entry['line']}"
            model_id = entry["model_id"]
            if model_id is None or not 0 <= model_id < self.num_models:
                problems.append(f"{where}: not a model's record")
                continue
            try:
                m = Manifest.from_dict(entry["manifest"])
            except ManifestError as exc:
                problems.append(f"model {model_id} ({where}): its manifest is refused: {exc}")
                continue
            fingerprint = next((r["value"] for r in m.results if r["name"] == "outputs"), None)
            if model_id in manifests and outputs_seen[model_id] != fingerprint:
                problems.append(f"model {model_id} ({where}): completed again with different outputs")
            manifests[model_id], outputs_seen[model_id] = m, fingerprint
        completed = sorted(manifests)
        missing = sorted(set(range(self.num_models)) - set(completed))
        masks = self.masks()
        outputs = self.outputs()
        reference_env: Optional[Mapping[str, Any]] = None
        env_differences: List[str] = []
        for model_id in completed:
            where = f"model {model_id}"
            m = manifests[model_id]
            if result_entry("outputs", np.asarray(outputs[model_id]))["value"] != outputs_seen[model_id]:
                problems.append(f"{where}: outputs.npy row {model_id} does not match the outputs its manifest recorded")
            results = {r["name"]: r["value"] for r in m.results}
            if results.get("study.master_seed") != self.master_seed:
                problems.append(f"{where}: its manifest has study master seed {results.get('study.master_seed')!r}, the study {self.master_seed}")
            if results.get("study.model_id") != model_id:
                problems.append(f"{where}: its manifest is model {results.get('study.model_id')!r}'s")
            if dict(m.settings) != _SETTINGS:
                problems.append(f"{where}: its manifest has settings {dict(m.settings)}, the study's sessions use {_SETTINGS}")
            if m.scheme != self.scheme:
                problems.append(f"{where}: its manifest has scheme {m.scheme!r}, the study {self.scheme!r}")
            if m.master_seed != self.model_master_seed(model_id):
                problems.append(f"{where}: its session's master seed {m.master_seed} is not the one the study derives ({self.model_master_seed(model_id)})")
            for r in m.records:
                if derive_seed(m.master_seed, r.purpose, r.instance_id, scheme=m.scheme) != r.seed:
                    problems.append(f"{where}: record ({r.purpose!r}, {r.instance_id!r}) holds seed {r.seed}, which does not re-derive")
            stored = np.asarray(masks[model_id])
            derived = self.mask(model_id)
            if mask_digest(stored) != results.get("study.mask_digest"):
                problems.append(f"{where}: masks.npy row {model_id} does not match the mask digest its manifest recorded")
            elif not np.array_equal(stored, derived):
                problems.append(f"{where}: masks.npy row {model_id} is not the mask the study derives (another numpy build?)")
            env = {k: m.environment.get(k) for k in BITWISE_KEYS}
            if reference_env is None:
                reference_env = env
            else:
                for k in BITWISE_KEYS:
                    if env[k] != reference_env[k]:
                        env_differences.append(f"{where}: environment {k} is {env[k]!r}, model {completed[0]} had {reference_env[k]!r}")
        ok = not problems and not missing and not env_differences
        return {
            "ok": ok,
            "models": self.num_models,
            "completed": len(completed),
            "missing": missing,
            "problems": problems,
            "environment_differences": env_differences,
        }

    def study_manifest(self) -> Manifest:
        """One manifest for the whole study: the study-level seeds (each model's session seed and
        each mask's seed) as records, and each model's mask digest and outputs fingerprint as
        results. ``seedreg show`` reads it."""
        from .records import SeedRecord

        records = [
            SeedRecord(purpose="study/model", instance_id=i, seed=derive_seed(self.master_seed, "study/model", i, scheme="sha256-v2"), kind="seed")
            for i in range(self.num_models)
        ]
        records += [
            SeedRecord(purpose="study/mask", instance_id=r, seed=derive_seed(self.master_seed, "study/mask", r, scheme="sha256-v2"), kind="subset_mask")
            for r in range(self.num_models // self.replicates)
        ]
        results: List[Dict[str, Any]] = [{"name": f"study.{k}", "kind": "value", "value": v} for k, v in self.definition.items()]
        environment: Mapping[str, Any] = {}
        for entry in self.entries():
            try:
                m = Manifest.from_dict(entry["manifest"])
            except ManifestError:
                continue
            model_id = entry["model_id"]
            environment = environment or m.environment
            values = {r["name"]: r for r in m.results}
            for name in ("study.mask_digest", "outputs"):
                if name in values:
                    results.append({"name": f"model_{model_id}.{name.split('.')[-1]}", "kind": values[name]["kind"], "value": values[name]["value"]})
        return Manifest(
            master_seed=self.master_seed,
            scheme="sha256-v2",
            records=records,
            settings=_SETTINGS,
            environment=environment,
            results=results,
        )
