"""Studies attacked on purpose (issue 21): every way one lost a model or misled, as a test."""

import errno
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from seedreg import Manifest, Study, StudyError, lds_score
from seedreg.cli import main as cli_main

from .conftest import child_env, run_python
from .test_study import DEF, fill, forge


def lines_of(root):
    """Every line of every task log, as bytes."""
    out = []
    for path in sorted((root / "tasks").glob("*.jsonl")):
        out += path.read_bytes().split(b"\n")[:-1]
    return out


def reseal_definition(root, **changes):
    """study.json with `changes` and a recomputed checksum (what a careless script might write)."""
    path = root / "study.json"
    data = json.loads(path.read_text())
    data.pop("checksum")
    data.update(changes)
    body = json.dumps(data, sort_keys=True)
    data["checksum"] = "sha256:" + hashlib.sha256(body.encode()).hexdigest()
    path.write_text(json.dumps(data, sort_keys=True, indent=2) + "\n")


FULL_DISK = r"""
import os, resource, sys
import numpy as np
from seedreg import Study, StudyError
root = sys.argv[1]
s = Study(root, master_seed=42, num_models=6, num_examples=40, alpha=0.5, num_outputs=3)
with s.run(0) as run:
    run.save(np.zeros(3))
log = next(f for f in os.listdir(root + "/tasks") if f.endswith(".jsonl"))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(f"{root}/tasks/{log}") + 200, hard))
try:
    with s.run(1) as run:
        run.save(np.ones(3))
    print("saved")
except StudyError as exc:
    print("refused:", exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
with s.run(2) as run:
    run.save(np.full(3, 2.0))
print("done", s.completed())
"""


class TestCompletionRecords:
    def test_a_full_disk_raises_and_leaves_the_study_finishable(self, tmp_path):
        root = tmp_path / "s"
        out = run_python(["-c", FULL_DISK, root]).stdout
        assert "refused:" in out and "model 1 could not be marked complete" in out and "saved" not in out.split("refused")[0]
        assert "done [0, 2]" in out
        for line in lines_of(root):  # nothing torn, nothing glued
            assert json.loads(line)["model_id"] in (0, 2)
        study = Study.open(root)
        report = study.audit()
        assert report["problems"] == [] and report["missing"] == [1, 3, 4, 5]
        assert study.models_for(0, 1) == [1, 3, 4, 5]
        fill(study, [1, 3, 4, 5])
        assert study.audit()["ok"]

    def test_a_restarted_task_with_the_same_host_and_pid_never_glues(self, tmp_path):
        study = Study(tmp_path / "s", **DEF)
        fill(study, [0])
        (log,) = (tmp_path / "s" / "tasks").glob("*.jsonl")
        with open(log, "ab") as fh:  # the task was killed mid-write
            fh.write(b'{"model_id":1,"attempt":1,"manif')
        again = Study(tmp_path / "s", **DEF)  # the resubmitted task: same host, same PID here
        fill(again, [1])
        assert len(list((tmp_path / "s" / "tasks").glob("*.jsonl"))) == 2
        assert again.completed() == [0, 1] and Study.open(tmp_path / "s").completed() == [0, 1]
        assert again.manifest_of(1).master_seed == again.model_master_seed(1)

    def test_save_once_inside_the_run(self, tmp_path):
        study = Study(tmp_path / "s", **DEF)
        with study.run(0) as run:
            run.save(np.ones(3))
            with pytest.raises(StudyError, match="saved already; save\\(\\) once"):
                run.save(np.full(3, 9.0))
        assert np.asarray(study.outputs())[0].tolist() == [1, 1, 1]  # the second save wrote nothing
        with study.run(1) as run:
            pass
        with pytest.raises(StudyError, match="after its `with study.run\\(...\\)` block ended"):
            run.save(np.ones(3))
        assert study.completed() == [0]

    def test_rows_only_through_a_checked_header(self, tmp_path):
        root = tmp_path / "s"
        study = Study(root, **DEF)
        fill(study, [0, 1])
        np.save(root / "outputs.npy", np.asfortranarray(np.load(root / "outputs.npy")))
        with pytest.raises(StudyError, match="outputs.npy holds float32 .* in Fortran order"):
            fill(study, [2])
        assert "Fortran order" in " ".join(study.audit()["problems"])
        np.save(root / "outputs.npy", np.zeros((3, 3), np.float32))  # fewer rows
        with pytest.raises(StudyError, match=r"\(6, 3\) in C order"):
            fill(study, [5])
        report = study.audit()  # no IndexError: the header is refused, named
        assert not report["ok"] and any("outputs.npy" in p for p in report["problems"])

    def test_two_threads_in_study_run_are_refused(self, tmp_path):
        study = Study(tmp_path / "s", **DEF)
        inside, release, errors = threading.Event(), threading.Event(), []

        def first():
            with study.run(0) as run:
                inside.set()
                release.wait(30)
                run.save(np.zeros(3))

        t = threading.Thread(target=first)
        t.start()
        inside.wait(30)
        try:
            with study.run(1):
                pass
        except StudyError as exc:
            errors.append(str(exc))
        release.set()
        t.join(30)
        assert errors and "one global random state per process" in errors[0] and "thread" in errors[0]
        assert study.completed() == [0]


class TestOneParser:
    def test_status_models_for_audit_and_manifest_of_agree_on_edited_lines(self, tmp_path):
        root = tmp_path / "s"
        study = Study(root, **DEF)
        fill(study)
        (log,) = (root / "tasks").glob("*.jsonl")
        lines = log.read_bytes().split(b"\n")
        # other separators and key order, and a BOM: the same JSON, other bytes
        lines[2] = b"\xef\xbb\xbf" + json.dumps(json.loads(lines[2]), indent=None, separators=(", ", ": "), sort_keys=True).encode()
        log.write_bytes(b"\n".join(lines))
        fresh = Study.open(root)
        assert fresh.status()["done"] == 6 and fresh.models_for(0, 1) == []  # complete everywhere...
        report = fresh.audit()
        assert not report["ok"] and report["missing"] == []
        assert any(p.startswith("model 2:") and "changed or damaged" in p for p in report["problems"])  # ...and damaged, named
        with pytest.raises(StudyError, match="changed or damaged"):
            fresh.manifest_of(2)

    def test_a_legacy_log_is_read_by_the_same_parser(self, tmp_path):
        """A 0.2 log (no index): every reader parses each line as JSON, BOM and separators aside."""
        root = tmp_path / "s"
        study = Study(root, **DEF)
        fill(study)
        (log,) = (root / "tasks").glob("*.jsonl")
        entries = [json.loads(x) for x in log.read_bytes().split(b"\n")[:-1]]
        for path in (root / "tasks").iterdir():
            path.unlink()
        text = [json.dumps({"model_id": e["model_id"], "manifest": e["manifest"]}, sort_keys=True) for e in entries]
        text[1] = "\ufeff" + text[1]
        text[3] = json.dumps({"model_id": 3, "manifest": entries[3]["manifest"]}, separators=(" , ", " : "))
        (root / "tasks" / "oldhost-17.jsonl").write_text("\n".join(text) + "\n", encoding="utf-8")
        fresh = Study.open(root)
        assert fresh.status()["done"] == 6 and fresh.audit()["ok"]
        assert fresh.manifest_of(3).master_seed == fresh.model_master_seed(3)

    def test_the_newest_completion_wins_everywhere(self, tmp_path, monkeypatch, capsys):
        import socket

        root = tmp_path / "s"
        monkeypatch.setattr(socket, "gethostname", lambda: "zz-host")  # its log sorts last by name
        study = Study(root, **DEF)
        fill(study)
        monkeypatch.setattr(socket, "gethostname", lambda: "aa-host")
        redo = Study.open(root)
        with redo.run(3, redo=True) as run:
            run.session.record_result("note", "retrained")
            run.save(np.asarray(study.outputs()[3]).copy())
        for s in (study, Study.open(root)):
            assert {r["name"]: r["value"] for r in s.manifest_of(3).results}["study.attempt"] == 2
        assert Study.open(root).audit()["ok"]
        assert cli_main(["study", "audit", str(root), "--write-manifest", str(tmp_path / "m.json")]) == 0
        assert cli_main(["show", str(tmp_path / "m.json")]) == 0
        names = [r["name"] for r in Manifest.load(tmp_path / "m.json").results]
        assert names.count("model_3.outputs") == 1
        with redo.run(4, redo=True) as run:  # retrained with other outputs: named, the row not blamed
            run.save(np.full(3, 7.0))
        problems = Study.open(root).audit()["problems"]
        assert problems == ["model 4: completed again (attempt 2) with outputs that differ from attempt 1's"]


class TestAuditRefuses:
    def test_a_nondeterministic_op_fails_the_audit(self, tmp_path, recwarn):
        from torch._prims_common import alert_not_deterministic

        study = Study(tmp_path / "s", **DEF)
        fill(study, range(5))
        with study.run(5) as run:
            alert_not_deterministic("my_nondeterministic_op")
            run.save(np.zeros(3))
        # torch's warning was shown (recorded here, since the session's hook reads what is shown)
        assert [str(w.message).split(" ")[0] for w in recwarn.list] == ["my_nondeterministic_op"]
        problems = study.audit()["problems"]
        assert len(problems) == 1 and "model 5" in problems[0] and "my_nondeterministic_op" in problems[0]

    def test_a_missing_checksum_is_a_failure(self, tmp_path):
        root = tmp_path / "s"
        study = Study(root, **DEF)
        fill(study)
        outputs = np.load(root / "outputs.npy", mmap_mode="r+")
        outputs[1] = 5.0
        outputs.flush()
        del outputs
        from seedreg.fingerprint import result_entry

        fp = result_entry("outputs", np.full(3, 5.0, np.float32))["value"]
        forge(study, 1, lambda d: next(r for r in d["results"] if r["name"] == "outputs").update(value=fp), reseal=False)
        problems = Study.open(root).audit()["problems"]
        assert any("model 1" in p and "no checksum" in p for p in problems)

    def test_odd_files_are_refused_by_name_and_never_hang(self, tmp_path):
        root = tmp_path / "s"
        study = Study(root, **DEF)
        fill(study, [0])
        fifo = root / "tasks" / "x.jsonl"
        os.mkfifo(fifo)
        for call in (study.status, study.audit, lambda: study.models_for(0, 1), Study.open(root).completed):
            with pytest.raises(StudyError, match="x.jsonl is not a regular file"):
                call()
        fifo.unlink()
        (root / "tasks" / "y.jsonl").symlink_to("/dev/zero")
        with pytest.raises(StudyError, match="y.jsonl is not a regular file"):
            study.status()
        (root / "tasks" / "y.jsonl").unlink()
        deep = b"[" * 200_000 + b"]" * 200_000
        huge = b'{"model_id":' + b"7" * 5000 + b',"manifest":{}}'
        (root / "tasks" / "old-1.jsonl").write_bytes(deep + b"\n" + huge + b"\n")
        fresh = Study.open(root)
        assert fresh.status() == {"models": 6, "done": 1, "missing": 5}
        problems = fresh.audit()["problems"]
        assert len(problems) == 2 and all("old-1.jsonl" in p and "not a completion record" in p for p in problems)

    def test_damaged_or_missing_files_are_named(self, tmp_path):
        root = tmp_path / "s"
        study = Study(root, **DEF)
        fill(study, [0])
        with open(root / "masks.npy", "r+b") as fh:
            fh.write(b"garbage!")
        with pytest.raises(StudyError, match="masks.npy is damaged"):
            fill(study, [1])
        (root / "masks.npy").unlink()
        with pytest.raises(StudyError, match="masks.npy is missing.*never re-created"):
            Study(root, **DEF).masks()
        assert not (root / "masks.npy").exists()
        other = tmp_path / "t"
        Study(other, **DEF)
        (other / "locks").unlink()
        (other / "locks").mkdir()
        with pytest.raises(StudyError, match="locks cannot be opened"):
            fill(Study.open(other), [0])
        os.rmdir(other / "locks")
        os.rename(other / "tasks", other / "tasks.moved")
        with pytest.raises(StudyError, match="tasks is missing"):
            Study.open(other).status()


class TestDefinitionValues:
    @pytest.mark.parametrize("change, message", [
        ({"num_models": -1}, "num_models"),
        ({"num_models": "6"}, "num_models"),
        ({"num_models": 6.0}, "num_models"),
        ({"num_models": 10**7}, "masks.npy holds bool \\(6, 40\\)"), ({"num_models": 10**9}, "num_models"),
        ({"replicates": 0}, "replicates"),
        ({"num_outputs": 0}, "num_outputs"),
        ({"alpha": 2.0}, "alpha"),
        ({"num_examples": 10**15}, "more than a machine holds"), ({"num_examples": 10**18}, "num_examples"),
    ])
    def test_values_are_checked_whatever_the_checksum_says(self, tmp_path, change, message):
        root = tmp_path / "s"
        Study(root, **DEF)
        reseal_definition(root, **change)
        with pytest.raises(StudyError, match=message):
            Study.open(root).status()


class TestLocks:
    def test_a_replaced_locks_file_is_detected_before_saving(self, tmp_path):
        root = tmp_path / "s"
        study = Study(root, **DEF)
        with study.run(0) as run:
            (root / "locks").unlink()
            (root / "locks").touch()
            with pytest.raises(StudyError, match="locks was removed or replaced while this process held model 0"):
                run.save(np.zeros(3))
        assert study.completed() == []

    def test_refused_record_locks_name_the_fallback(self, tmp_path, monkeypatch):
        study = Study(tmp_path / "s", **DEF)

        def enosys(*args):
            raise OSError(errno.ENOSYS, "Function not implemented")

        monkeypatch.setattr(fcntl, "lockf", enosys)
        with pytest.raises(StudyError, match="refuses POSIX record locks.*lock='lockfile'"):
            fill(study, [0])
        fill(Study.open(tmp_path / "s", lock="lockfile"), [0, 1])  # the fallback works there
        assert study.completed() == [0, 1] and not list((tmp_path / "s" / "locks.d").glob("*.lock"))

    def test_lock_files_exclude_across_processes_and_stale_ones_are_taken_over(self, tmp_path):
        root = tmp_path / "s"
        Study(root, **DEF)
        code = ("import sys, time; from seedreg import Study\ns = Study.open(sys.argv[1], lock='lockfile')\n"
                "with s.run(4):\n    print('holding', flush=True); time.sleep(60)\n")
        proc = subprocess.Popen([sys.executable, "-c", code, str(root)], env=child_env(), stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "holding"
            for mode in ("lockfile", "posix"):  # each mode honours the other's locks
                with pytest.raises(StudyError, match="being trained by another process"):
                    fill(Study.open(root, lock=mode), [4])
        finally:
            proc.kill()
            proc.wait(30)
        assert (root / "locks.d" / "4.lock").exists()  # killed: its lock file stayed behind
        fill(Study.open(root, lock="lockfile"), [4])  # and is taken over (its holder is gone)
        assert Study.open(root).completed() == [4]


class TestSlurmArrays:
    @pytest.mark.parametrize("array, ids", [("1-4", range(1, 5)), ("0-6:2", range(0, 7, 2)), ("0-3", range(4))])
    def test_every_model_once(self, tmp_path, monkeypatch, array, ids):
        study = Study(tmp_path / "s", **{**DEF, "num_models": 10})
        lo, hi, step = (int(x) for x in (array.replace(":", "-") + ("" if ":" in array else "-1")).split("-"))
        seen = []
        for tid in ids:
            for k, v in (("ID", tid), ("MIN", lo), ("MAX", hi), ("STEP", step), ("COUNT", len(ids))):
                monkeypatch.setenv(f"SLURM_ARRAY_TASK_{k}", str(v))
            seen += study.models_for()
        assert sorted(seen) == list(range(10))

    def test_a_list_array_is_refused_with_the_fix(self, tmp_path, monkeypatch):
        study = Study(tmp_path / "s", **DEF)
        for k, v in (("ID", 3), ("MIN", 1), ("MAX", 7), ("STEP", 1), ("COUNT", 3)):
            monkeypatch.setenv(f"SLURM_ARRAY_TASK_{k}", str(v))
        with pytest.raises(StudyError, match="this job array is a list"):
            study.models_for()


class TestGrowth:
    def test_grow_keeps_every_model(self, tmp_path):
        root = tmp_path / "s"
        study = Study(root, **DEF)
        fill(study)
        before = (np.load(root / "masks.npy").copy(), np.load(root / "outputs.npy").copy())
        task = Study(root, **DEF)  # another task, open before the grow
        Study.open(root).grow(10)
        assert task.models_for(0, 1) == [6, 7, 8, 9]  # picks the grow up
        fill(task, [6, 7, 8, 9])
        grown = Study.open(root)
        assert grown.audit()["ok"] and grown.num_models == 10
        assert np.array_equal(np.load(root / "masks.npy")[:6], before[0]) and np.array_equal(np.load(root / "outputs.npy")[:6], before[1])
        with pytest.raises(StudyError, match="num_models=10 but num_models=6 was passed \\(the study grew"):
            Study(root, **DEF)
        with grown.run(7, redo=True):
            with pytest.raises(StudyError, match="a task is training a model of this study"):
                Study.open(root).grow(12)

    def test_alpha_is_in_the_derivation(self, tmp_path):
        a = Study(tmp_path / "a", **{**DEF, "alpha": 0.5})
        b = Study(tmp_path / "b", **{**DEF, "alpha": 0.25})
        ma, mb = a.mask(0), b.mask(0)
        assert ma.sum() == 20 and mb.sum() == 10 and not (mb & ~ma).sum() == 0  # not nested: independent draws

    def test_a_study_of_0_2_keeps_its_masks_and_audits(self):
        from .test_study import ROOT

        v1 = ROOT / "tests" / "data" / "study-0.2"
        study = Study.open(v1)
        assert study.definition["masks"] == "derived-v1" and study.audit()["ok"]
        assert np.array_equal(study.mask(3), np.load(v1 / "masks.npy")[3])

    def test_given_masks(self, tmp_path):
        rng = np.random.default_rng(0)
        masks = rng.random((6, 40)) < 0.3
        study = Study(tmp_path / "s", **{k: v for k, v in DEF.items() if k != "alpha"}, masks=masks)
        Study(tmp_path / "s", **{k: v for k, v in DEF.items() if k != "alpha"}, masks=masks)  # same: fine
        with pytest.raises(StudyError, match="differ from the masks this study was created with"):
            Study(tmp_path / "s", **{k: v for k, v in DEF.items() if k != "alpha"}, masks=~masks)
        fill(study)
        assert np.array_equal(np.asarray(study.masks()), masks) and study.audit()["ok"]
        assert study.manifest_of(2).results[0]["value"] is not None
        more = rng.random((2, 40)) < 0.3
        study.grow(8, masks=more)
        fill(study, [6, 7])
        assert study.audit()["ok"] and np.array_equal(np.asarray(study.masks())[6:], more)
        raw = np.load(tmp_path / "s" / "masks.npy", mmap_mode="r+")
        raw[1, 0] = not raw[1, 0]
        raw.flush()
        del raw
        problems = study.audit()["problems"]
        assert any("masks.npy rows 0..5 are not the masks this study was given" in p for p in problems)
        with pytest.raises(StudyError, match="rows 0..1 \\(one replicate group\\) differ"):
            Study(tmp_path / "r", **{**{k: v for k, v in DEF.items() if k != "alpha"}, "replicates": 2}, masks=masks)

    def test_artifacts_are_recorded_and_audited(self, tmp_path):
        study = Study(tmp_path / "s", **DEF)
        for i in range(6):
            with study.run(i) as run:
                model = run.session.build_model(torch.nn.Linear, "net", in_features=3, out_features=3)
                torch.save(model.state_dict(), run.artifact("weights.pt"))
                run.save(model(torch.ones(3)).detach())
        path = study.artifact(2, "weights.pt")
        assert path.is_file() and study.audit()["ok"]
        digest = {r["name"]: r["value"] for r in study.manifest_of(2).results}["study.artifact.weights.pt"]
        assert digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        with study.run(3, redo=True) as run:  # a retrain that crashes never touches the completed artifact
            run.artifact("weights.pt").write_bytes(b"half")
        assert study.artifact(3, "weights.pt").read_bytes() != b"half"
        path.write_bytes(b"changed")
        problems = study.audit()["problems"]
        assert len(problems) == 1 and "model 2" in problems[0] and "changed since the run recorded it" in problems[0]
        with study.run(5, redo=True) as run:
            run.artifact("weights.pt")
            with pytest.raises(StudyError, match="asked for but not written"):
                run.save(np.zeros(3))
        with pytest.raises(StudyError, match="plain file name"):
            with study.run(5, redo=True) as run:
                run.artifact("../x")


class TestLdsScore:
    def test_nan_semantics_match_trak_and_dattri(self):
        """Spearman per target (constant or NaN -> NaN for that target, as scipy's spearmanr gives
        TRAK and dattri), then a plain mean (NaN if any target is NaN), as both average."""
        rng = np.random.default_rng(1)
        masks = rng.random((12, 20)) < 0.5
        scores = rng.normal(size=(20, 3))
        outputs = rng.normal(size=(12, 3))
        outputs[:, 1] = 2.0  # a constant target
        per = lds_score(scores, masks, outputs, per_target=True)
        assert np.isnan(per[1]) and np.isfinite(per[[0, 2]]).all() and np.isnan(lds_score(scores, masks, outputs))
        outputs[:, 1] = rng.normal(size=12)
        outputs[4, 2] = np.nan
        per = lds_score(scores, masks, outputs, per_target=True)
        assert np.isnan(per[2]) and np.isfinite(per[:2]).all()
        scipy = pytest.importorskip("scipy.stats", reason="scipy: pip install -e \".[examples]\"")
        ref = [scipy.spearmanr(masks @ scores[:, t], outputs[:, t]).correlation for t in range(3)]
        np.testing.assert_allclose(per, ref, rtol=1e-6, equal_nan=True)

    def test_replicate_groups_are_checked(self):
        rng = np.random.default_rng(2)
        masks = np.repeat(rng.random((4, 10)) < 0.5, 2, axis=0)
        masks[5, 0] = not masks[5, 0]
        with pytest.raises(ValueError, match="rows 4 and 5 .* replicate group 2"):
            lds_score(rng.normal(size=(10, 2)), masks, rng.normal(size=(8, 2)), replicates=2)

    def test_memory_is_about_one_chunk(self):
        import tracemalloc

        rng = np.random.default_rng(3)
        masks = rng.random((4000, 5000)) < 0.5
        scores = rng.normal(size=(5000, 4))
        outputs = rng.normal(size=(4000, 4))
        tracemalloc.start()
        lds_score(scores, masks, outputs)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        from seedreg.lds import CHUNK_BYTES

        assert peak < 1.25 * CHUNK_BYTES + (1 << 20) < masks.nbytes * 8 / 4  # a float64 copy of the masks is 160 MB


def test_progress_on_a_terminal_only(tmp_path):
    import io

    from seedreg.cli import _Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    study = Study(tmp_path / "s", **DEF)
    fill(study)
    study.audit(progress=_Progress("audit", tty))
    study.audit(progress=_Progress("audit", pipe))
    assert tty.getvalue().endswith("\raudit: 6 / 6 models (100%)\n") and pipe.getvalue() == ""
    out = run_python(["-m", "seedreg", "study", "audit", tmp_path / "s"])  # piped: no progress
    assert out.returncode == 0 and "models (" not in out.stderr


def test_workers_and_chunks_give_the_same_report(tmp_path, monkeypatch):
    from seedreg.study import audit as audit_module

    root = tmp_path / "s"
    study = Study(root, **{**DEF, "num_models": 12})
    fill(study, range(11))
    masks = np.load(root / "masks.npy", mmap_mode="r+")
    masks[7, 0] = not masks[7, 0]
    masks.flush()
    del masks
    whole = study.audit(workers=1)
    monkeypatch.setattr(audit_module, "CHUNK_BYTES", 3 * (40 + 12))  # chunks of 3 rows
    for workers in (1, 2):
        report = Study.open(root).audit(workers=workers)
        assert report == whole and report["missing"] == [11] and len(report["problems"]) == 1 and "model 7" in report["problems"][0]
    with pytest.raises(StudyError, match="`workers` must be an int >= 1"):
        study.audit(workers=0)


def test_a_model_completed_elsewhere_since_the_last_scan_is_not_trained_again(tmp_path):
    """run(i) skips the scan of the task logs when the attempt hint in ROOT/locks agrees with
    what this process knows; a completion by another task changes the hint."""
    study = Study(tmp_path / "s", **DEF)
    assert study.models_for(0, 1) == list(range(6))
    fill(Study.open(tmp_path / "s"), [2])  # another task, after this one's scan
    with pytest.raises(StudyError, match="model 2 is complete already"):
        with study.run(2):
            pass
    with study.run(2, redo=True) as run:
        assert run.attempt == 2
