"""The audit of a whole study, streamed: memory bounded by a chunk of rows, whatever the study's size.

For every model: complete (its newest completion record intact: the line's digest, the one
parser, a manifest with its checksum that validates), its manifest the study's (master seed,
model id, scheme, settings, every seed re-derived, no nondeterministic-op violations), its
outputs row the one it recorded, its mask row the one it recorded and the one the study derives
(or, for given masks, the digests in ``study.json``), its artifacts unchanged, and an environment
that agrees with the other models' on what bitwise equality needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
import pathlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import attrs
import numpy as np

from ..derive import derive_seed
from ..bitwise import BITWISE_KEYS
from ..errors import ManifestError
from ..fingerprint import result_entry
from ..manifest import Manifest
from ..masks import mask_digest
from . import definition as defn
from .definition import FIELDS, StudyError
from .logs import Index, Lines, file_sha256



@attrs.frozen
class StudyView:
    """What the audit reads of a study: its folder, definition, completion index (read just before)
    and the master seed of every model."""

    root: pathlib.Path
    definition: Mapping[str, Any]
    index: Index
    masters: List[int]

    def __getattr__(self, name: str) -> Any:  # the definition's fields, as a Study has them
        if name in FIELDS:
            return self.definition[name]
        raise AttributeError(name)

CHUNK_BYTES = 64 << 20  # rows read at once (masks and outputs together)
SETTINGS = {"deterministic": True, "warn_only": True, "fill_uninitialized_memory": True}  # SeedSession's defaults
Progress = Optional[Callable[[int, int], None]]


def _rows_per_chunk(study: StudyView) -> int:
    return max(1, CHUNK_BYTES // (study.num_examples + 4 * study.num_outputs))


def _workers(requested: Optional[int], completed: int) -> int:
    if requested is not None:
        if type(requested) is not int or requested < 1:
            raise StudyError(f"`workers` must be an int >= 1, got {requested!r:.40}.")
        return requested
    return min(os.cpu_count() or 1, 8) if completed >= WORKERS_FROM else 1


WORKERS_FROM = 4000  # completed models from which the audit uses one process per core


def audit(study: StudyView, progress: Progress = None, workers: Optional[int] = None) -> Dict[str, Any]:
    """Check the whole study; ``report["ok"]`` is True when nothing is wrong. See the module docstring.
    Chunks of rows are checked by `workers` processes (default: one per core, up to 8, for large
    studies); each holds one chunk of rows at a time."""
    index = study.index
    d = study.definition
    n = study.num_models
    problems: List[str] = list(index.damaged)
    try:
        offsets = {name: defn.array_header(study.root / name, d) for name in ("masks.npy", "outputs.npy")}
    except StudyError as exc:
        return {"ok": False, "models": n, "completed": len(index.completed()), "missing": np.flatnonzero(index.log < 0).tolist(),
                "problems": problems + [str(exc)], "environment_differences": []}
    step = _rows_per_chunk(study)
    jobs = [_Job(study, offsets, a, min(n, a + step)) for a in range(0, n, step)]
    count = _workers(workers, len(index.completed()))
    results: List[Any] = []
    if count > 1 and len(jobs) > 1:
        import concurrent.futures
        import multiprocessing

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with concurrent.futures.ProcessPoolExecutor(count, mp_context=multiprocessing.get_context(method)) as pool:
            futures = [pool.submit(_run_job, job) for job in jobs]
            problems += _given_masks(study, offsets)  # meanwhile, here: the digests of given masks
            for job, future in zip(jobs, futures):
                results.append(future.result())
                if progress is not None:
                    progress(job.stop, n)
    else:
        for job in jobs:
            results.append(_run_job(job))
            if progress is not None:
                progress(job.stop, n)
        problems += _given_masks(study, offsets)
    missing: List[int] = []
    envs: Dict[Any, List[int]] = {}
    chunk_problems: List[str] = []
    for m, p, e in results:
        missing += m
        chunk_problems += p
        for env, ids in e.items():
            envs.setdefault(env, []).extend(ids)
    env_differences: List[str] = []
    if envs:
        first = min(min(ids) for ids in envs.values())
        reference = next(env for env, ids in envs.items() if first in ids)
        ref = json.loads(reference)
        for env, ids in envs.items():
            if env != reference:
                values = json.loads(env)
                for model_id in sorted(ids):
                    for k, a, b in zip(BITWISE_KEYS, values, ref):
                        if a != b:
                            env_differences.append(f"model {model_id}: environment {k} is {a!r}, model {first} had {b!r}")
    problems = chunk_problems + problems
    for model_id, older in sorted(index.superseded.items()):
        newest = bytes(index.outputs[model_id])
        differ = [a for a, o in older if a > 0 and int(index.attempt[model_id]) > 0 and o != newest]
        if differ:
            problems.append(f"model {model_id}: completed again (attempt {int(index.attempt[model_id])}) with outputs that differ from attempt {differ[0]}'s")
    return {
        "ok": not problems and not missing and not env_differences,
        "models": n,
        "completed": n - len(missing),
        "missing": missing,
        "problems": problems,
        "environment_differences": env_differences,
    }


def _given_masks(study: StudyView, offsets: Mapping[str, int]) -> List[str]:
    """Given masks: each segment's rows hashed, a chunk at a time, against study.json's digest."""
    out = []
    step = max(1, CHUNK_BYTES // study.num_examples)
    for s, e, digest in study.definition["masks_digests"]:
        h = None
        for a in range(s, e, step):
            h = defn.masks_digest(defn.read_rows(study.root / "masks.npy", offsets["masks.npy"], study.num_examples, a, min(e, a + step)), h)
        if h is None or "sha256:" + h.hexdigest() != digest:
            out.append(f"masks.npy rows {s}..{e - 1} are not the masks this study was given (their digest differs from study.json's)")
    return out


class _Job:
    """Models [start, stop) of a study: what one worker needs, small enough to send."""

    def __init__(self, study: StudyView, offsets: Mapping[str, int], start: int, stop: int) -> None:
        idx = study.index
        self.root, self.definition, self.offsets = study.root, study.definition, dict(offsets)
        self.start, self.stop = start, stop
        self.masters = study.masters[start:stop]
        self.logs = idx.logs
        self.log, self.offset = idx.log[start:stop].copy(), idx.offset[start:stop].copy()
        self.length, self.line = idx.length[start:stop].copy(), idx.line[start:stop].copy()


def _run_job(job: _Job) -> Tuple[List[int], List[str], Dict[Any, List[int]]]:
    """(missing ids, problems, {environment: model ids}) of the job's models."""

    d = job.definition
    masks = defn.read_rows(job.root / "masks.npy", job.offsets["masks.npy"], d["num_examples"], job.start, job.stop)
    outputs = defn.read_rows(job.root / "outputs.npy", job.offsets["outputs.npy"], d["num_outputs"], job.start, job.stop)
    lines = Lines(job.root / "tasks", job.logs, job.log, job.offset, job.length, job.line)
    missing: List[int] = []
    problems: List[str] = []
    envs: Dict[Any, List[int]] = {}
    derived: Dict[int, np.ndarray] = {}
    try:
        for k, model_id in enumerate(range(job.start, job.stop)):
            if job.log[k] < 0:
                missing.append(model_id)
                continue
            env = _check_model(job, lines, model_id, k, masks[k], outputs[k], derived, problems)
            if env is not None:
                key = json.dumps([env.get(name) for name in BITWISE_KEYS], sort_keys=True)
                envs.setdefault(key, []).append(model_id)
    finally:
        lines.close()
    return missing, problems, envs


class _Fields:
    """What the audit reads of a manifest, each field's type checked (KeyError, TypeError or
    ValueError otherwise). Lighter than :meth:`Manifest.from_dict`, which builds every record: the
    line's bytes are already proved to be the ones ``save()`` wrote from a valid manifest."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        if data["format"] != "seedreg-manifest" or data["schema_version"] != 2:
            raise ValueError(f"not a schema-2 seedreg manifest ({data.get('format')!r:.40}, {data.get('schema_version')!r:.10})")
        self.master_seed = _typed(data["master_seed"], int, "master_seed")
        self.scheme = _typed(data["scheme"], str, "scheme")
        self.settings = _typed(data["settings"], dict, "settings")
        self.environment = _typed(data["environment"], dict, "environment")
        self.violations = [_typed(v, dict, "violations[]") for v in _typed(data["violations"], list, "violations")]
        self.records = [(_typed(r["purpose"], str, "purpose"), r["instance_id"], _typed(r["seed"], int, "seed"))
                        for r in _typed(data["records"], list, "records")]
        self.results = {_typed(r["name"], str, "results[].name"): r["value"] for r in _typed(data["results"], list, "results")}


def _typed(value: Any, kind: type, name: str) -> Any:
    if type(value) is not kind:
        raise TypeError(f"manifest {name} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _check_model(job: _Job, lines: Lines, model_id: int, k: int, stored_mask: np.ndarray, outputs: np.ndarray,
                 derived: Dict[int, np.ndarray], problems: List[str]) -> Optional[Mapping[str, Any]]:
    """Append model `model_id`'s problems; return its manifest's environment (None if unreadable).
    The fields read are type-checked; the checksum must be present, and the manifest's integrity is
    the line's SHA-256 in the index (checked on reading), so it is not rendered again."""
    d = job.definition
    at = f"model {model_id}"
    try:
        where, entry = lines.read(model_id, k)
        m = _Fields(entry["manifest"])
    except StudyError as exc:
        problems.append(f"{at}: {exc}")
        return None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        problems.append(f"{at}: its manifest is refused: {type(exc).__name__}: {str(exc)[:120]}")
        return None
    found: List[str] = []
    results = m.results
    if result_entry("outputs", np.asarray(outputs))["value"] != results.get("outputs"):
        found.append(f"outputs.npy row {model_id} does not match the outputs its manifest recorded")
    if results.get("study.master_seed") != d["master_seed"]:
        found.append(f"its manifest has study master seed {results.get('study.master_seed')!r}, the study {d['master_seed']}")
    if results.get("study.model_id") != model_id:
        found.append(f"its manifest is model {results.get('study.model_id')!r}'s")
    if dict(m.settings) != SETTINGS:
        found.append(f"its manifest has settings {dict(m.settings)}, the study's sessions use {SETTINGS}")
    if m.scheme != d["scheme"]:
        found.append(f"its manifest has scheme {m.scheme!r}, the study {d['scheme']!r}")
    if m.master_seed != job.masters[k]:
        found.append(f"its session's master seed {m.master_seed} is not the one the study derives ({job.masters[k]})")
    if m.violations:
        v = m.violations[0]
        found.append(f"its run recorded {len(m.violations)} nondeterministic operation(s) (first: {v.get('kind')}: {str(v.get('message'))[:120]}); its result is not reproducible")
    for purpose, instance_id, seed in m.records:
        if derive_seed(m.master_seed, purpose, instance_id, scheme=m.scheme) != seed:
            found.append(f"record ({purpose!r}, {instance_id!r}) holds seed {seed}, which does not re-derive")
    if mask_digest(stored_mask) != results.get("study.mask_digest"):
        found.append(f"masks.npy row {model_id} does not match the mask digest its manifest recorded")
    elif d["masks"] != "given":
        group = model_id // d["replicates"]
        if group not in derived:
            derived.clear()
            derived[group] = defn.derived_mask(d, group)
        if not np.array_equal(stored_mask, derived[group]):
            found.append(f"masks.npy row {model_id} is not the mask the study derives (another numpy build?)")
    attempt = results.get("study.attempt")
    for name, digest in results.items():
        if name.startswith("study.artifact."):
            path = job.root / "artifacts" / str(model_id) / str(attempt) / name[len("study.artifact."):]
            if not path.is_file():
                found.append(f"its artifact {path.name!r} ({path}) is missing")
            elif file_sha256(path) != digest:
                found.append(f"its artifact {path.name!r} ({path}) changed since the run recorded it")
    problems.extend(f"{at} ({where}): {p}" for p in found)
    return m.environment


def study_manifest(study: StudyView, progress: Progress = None) -> Manifest:
    """One manifest for the whole study: the study-level seeds as records, and each completed
    model's newest mask digest and outputs fingerprint as results (each model once)."""
    from ..records import SeedRecord

    index = study.index
    n = study.num_models
    records = [
        SeedRecord(purpose="study/model", instance_id=i, seed=derive_seed(study.master_seed, "study/model", i, scheme="sha256-v2"), kind="seed")
        for i in range(n)
    ]
    if study.definition["masks"] == "derived-v1":
        purpose = "study/mask"
    elif study.definition["masks"] == "derived":
        purpose = f"study/mask/{study.mode}/{study.alpha!r}"
    else:
        purpose = None
    if purpose is not None:
        records += [
            SeedRecord(purpose=purpose, instance_id=r, seed=derive_seed(study.master_seed, purpose, r, scheme="sha256-v2"), kind="subset_mask")
            for r in range(n // study.replicates)
        ]
    results: List[Dict[str, Any]] = [{"name": f"study.{k}", "kind": "value", "value": v}
                                     for k, v in study.definition.items() if k != "masks_digests"]
    results += [{"name": f"study.masks_digest.{s}-{e - 1}", "kind": "value", "value": dg} for s, e, dg in study.definition["masks_digests"]]
    environment: Mapping[str, Any] = {}
    lines = Lines.of(study.root, study.index)
    try:
        for model_id in index.completed().tolist():
            try:
                _, entry = lines.read(model_id)
                m = Manifest.from_dict(entry["manifest"])
            except (StudyError, ManifestError):
                continue  # the audit names it
            environment = environment or m.environment
            values = {r["name"]: r for r in m.results}
            for name in ("study.mask_digest", "outputs"):
                if name in values:
                    results.append({"name": f"model_{model_id}.{name.split('.')[-1]}", "kind": values[name]["kind"], "value": values[name]["value"]})
            if progress is not None and model_id % 1000 == 0:
                progress(model_id, n)
    finally:
        lines.close()
    if progress is not None:
        progress(n, n)
    return Manifest(master_seed=study.master_seed, scheme="sha256-v2", records=records, settings=SETTINGS,
                    environment=environment, results=results)
