"""Studies: many LDS models across many jobs, one auditable study."""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from seedreg import Manifest, Study, StudyError, lds_score
from seedreg.cli import main as cli_main

from .conftest import ROOT, child_env, run_python

DEF = dict(master_seed=42, num_models=6, num_examples=40, alpha=0.5, num_outputs=3)


def fill(study, ids=None, draw=True):
    for i in ids if ids is not None else range(study.num_models):
        with study.run(i) as run:
            model = run.session.build_model(torch.nn.Linear, "net", in_features=3, out_features=3)
            x = torch.nn.functional.dropout(torch.ones(3)) if draw else torch.ones(3)
            run.session.record_result("final_weights", model)
            run.save(model(x).detach())


def forge(study, model_id, edit, reseal=True):
    """Append a completion of `model_id` whose manifest `edit` changed, as a writer that follows the
    format would (its own log and index, the next attempt): what only the audit's checks can catch."""
    from seedreg.study.logs import make_record, outputs_digest

    data = study.manifest_of(model_id).to_dict()
    data.pop("checksum")
    edit(data)
    if reseal:
        data["checksum"] = Manifest.from_dict(data).to_dict()["checksum"]
    attempt = int(study._index.attempt[model_id]) + 1
    line = (json.dumps({"model_id": model_id, "attempt": attempt, "manifest": data}) + "\n").encode()
    name = f"forged-{model_id}-{attempt}"
    (study.root / "tasks" / f"{name}.jsonl").write_bytes(line)
    row = np.asarray(study.outputs()[model_id])
    (study.root / "tasks" / f"{name}.idx").write_bytes(make_record(model_id, attempt, 0, line, outputs_digest(row)))


class TestDefinition:
    def test_first_writes_later_ones_check(self, tmp_path):
        Study(tmp_path / "s", **DEF)
        Study(tmp_path / "s", **DEF)  # same arguments: fine
        with pytest.raises(StudyError, match="defined with alpha=0.5 but alpha=0.25"):
            Study(tmp_path / "s", **{**DEF, "alpha": 0.25})
        assert isinstance(StudyError("x"), ValueError)

    def test_exactly_one_of_many_racing_processes_writes_it(self, tmp_path):
        code = (
            "import sys; from seedreg import Study; "
            "Study(sys.argv[1], master_seed=1, num_models=int(sys.argv[2]), num_examples=10, alpha=0.5, num_outputs=1)"
        )
        env = child_env()
        procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s"), str(n)], env=env, stderr=subprocess.PIPE, text=True) for n in (4, 8, 12, 16)]
        results = [(p.wait(120), p.stderr.read()) for p in procs]
        winners = [rc for rc, _ in results if rc == 0]
        assert len(winners) == 1  # the others were told the stored num_models
        assert all("StudyError" in err and "num_models" in err for rc, err in results if rc != 0)

    def test_bad_roots_and_edits(self, tmp_path):
        (tmp_path / "file").write_text("x")
        with pytest.raises(StudyError, match="is a file"):
            Study(tmp_path / "file", **DEF)
        Study(tmp_path / "s", **DEF)
        path = tmp_path / "s" / "study.json"
        path.write_text(path.read_text().replace('"num_models": 6', '"num_models": 7'))
        with pytest.raises(StudyError, match="edited by hand"):
            Study(tmp_path / "s", **{**DEF, "num_models": 7})

    def test_bad_ids_and_outputs(self, tmp_path):
        study = Study(tmp_path / "s", **DEF)
        with pytest.raises(StudyError, match=r"model_id.*\[0, 5\]"):
            with study.run(6):
                pass
        with study.run(0) as run:
            with pytest.raises(StudyError, match=r"shape \(3,\)"):
                run.save(np.zeros(4))
        assert study.status() == {"models": 6, "done": 0, "missing": 6}
        with pytest.raises(StudyError, match="SLURM_ARRAY_TASK_ID"):
            study.models_for()


class TestModels:
    def test_task_split_and_environment_defaults(self, tmp_path, monkeypatch):
        study = Study(tmp_path / "s", **DEF)
        assert study.models_for(1, 4) == [1, 5]
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
        assert study.models_for() == [2, 5]
        fill(study, [2])
        assert study.models_for() == [5] and study.models_for(redo=True) == [2, 5]

    def test_replicates_share_a_mask_and_differ_otherwise(self, tmp_path):
        study = Study(tmp_path / "s", **{**DEF, "replicates": 2})
        fill(study)
        masks, outputs = np.asarray(study.masks()), np.asarray(study.outputs())
        assert (masks[0] == masks[1]).all() and (masks[2] == masks[3]).all() and not (masks[0] == masks[2]).all()
        assert len({outputs[i].tobytes() for i in range(6)}) == 6
        assert masks.sum(axis=1).tolist() == [20] * 6

    def test_a_second_run_of_the_same_model_refuses(self, tmp_path):
        study = Study(tmp_path / "s", **DEF)
        other = Study(tmp_path / "s", **DEF)
        with study.run(3):
            with pytest.raises(StudyError, match=r"study.run\(3\) while study.run\(3\) is active in this process"):
                with other.run(3):
                    pass
        with other.run(3) as run:  # free again once the first let go
            run.save(np.zeros(3))
        code = f"import sys, time; from seedreg import Study\ns = Study(sys.argv[1], **{DEF!r})\nwith s.run(4):\n    print('holding', flush=True); time.sleep(60)\n"
        proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s")], env=child_env(), stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "holding"
            with pytest.raises(StudyError, match="being trained by another process"):
                with study.run(4):
                    pass
        finally:
            proc.kill()
            proc.wait(30)


class TestAudit:
    def test_clean_then_each_problem_named(self, tmp_path, capsys):
        root = tmp_path / "s"
        study = Study(root, **DEF)
        fill(study, range(5))
        report = study.audit()
        assert not report["ok"] and report["missing"] == [5] and report["problems"] == []
        assert cli_main(["study", "audit", str(root)]) == 1 and "missing models: 5" in capsys.readouterr().out
        fill(study, [5])
        assert study.audit()["ok"] and cli_main(["study", "audit", str(root)]) == 0
        # a flipped bit in masks.npy row 3
        masks = np.load(root / "masks.npy", mmap_mode="r+")
        masks[3, 0] = not masks[3, 0]
        masks.flush()
        del masks
        # model 4's manifest with another study master seed, resealed, in a record that follows the format
        forge(study, 4, lambda data: next(r for r in data["results"] if r["name"] == "study.master_seed").update(value=43))
        problems = study.audit()["problems"]
        assert any("model 3" in p and "masks.npy row 3" in p for p in problems)
        assert any("model 4" in p and "study master seed 43" in p for p in problems)
        assert cli_main(["study", "status", str(root)]) == 0

    def test_study_manifest_shows(self, tmp_path, capsys):
        study = Study(tmp_path / "s", **DEF)
        fill(study)
        assert cli_main(["study", "audit", str(tmp_path / "s"), "--write-manifest", str(tmp_path / "m.json")]) == 0
        m = Manifest.load(tmp_path / "m.json")
        assert len(m.records) == 12 and {r["name"] for r in m.results} >= {"model_5.outputs", "model_0.mask_digest"}
        assert cli_main(["show", str(tmp_path / "m.json")]) == 0


def test_lds_score_equals_a_direct_computation():
    rng = np.random.default_rng(3)
    masks = rng.random((8, 30)) < 0.5
    masks = np.repeat(masks, 2, axis=0)  # replicates of 2 share a mask
    scores = rng.normal(size=(30, 4))
    outputs = rng.normal(size=(16, 4))
    outputs[:, 0] = np.round(outputs[:, 0])  # ties
    got = lds_score(scores, masks, outputs, replicates=2)
    pred = masks[::2].astype(float) @ scores
    mean_out = outputs.reshape(8, 2, 4).mean(axis=1)

    def rank(v):  # average ranks of ties, by hand
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return np.array(r)

    rhos = [np.corrcoef(rank(pred[:, t]), rank(mean_out[:, t]))[0, 1] for t in range(4)]
    assert got == pytest.approx(float(np.mean(rhos)), abs=1e-12)
    with pytest.raises(ValueError, match="shapes disagree"):
        lds_score(scores, masks, outputs[:, :3])


@pytest.mark.slow
class TestAcrossProcesses:
    def test_four_concurrent_tasks_fill_a_study_and_model_7_retrains_alone(self, tmp_path):
        """The four tasks of ``sbatch --array=1-4``, 1-based as users write it, each with the
        variables SLURM sets (``models_for()`` reads them)."""
        script = ROOT / "examples" / "lds_study.py"
        procs = [
            subprocess.Popen([sys.executable, script, "--root", tmp_path / "s", "--epochs", "2"],
                             env=child_env(SLURM_ARRAY_TASK_ID=str(k), SLURM_ARRAY_TASK_MIN="1", SLURM_ARRAY_TASK_MAX="4",
                                           SLURM_ARRAY_TASK_STEP="1", SLURM_ARRAY_TASK_COUNT="4", SLURM_ARRAY_JOB_ID="77"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for k in range(1, 5)
        ]
        for p in procs:
            assert p.wait(240) == 0, p.stderr.read()
        study = Study.open(tmp_path / "s")
        assert study.audit()["ok"] and study.status()["done"] == 12
        alone = run_python([script, "--root", tmp_path / "alone", "--ids", "7", "--epochs", "2"]).stdout
        other = Study.open(tmp_path / "alone")
        assert np.asarray(other.outputs())[7].tobytes() == np.asarray(study.outputs())[7].tobytes()
        assert np.asarray(other.masks())[7].tobytes() == np.asarray(study.masks())[7].tobytes()
        weights = lambda root: next(r["value"] for r in Study.open(root).manifest_of(7).results if r["name"] == "final_weights")  # noqa: E731
        assert weights(tmp_path / "s") == weights(tmp_path / "alone") and weights(tmp_path / "s") in alone
        score = run_python([script, "--root", tmp_path / "s", "--score"]).stdout
        assert "LDS of the kernel attribution over 12 models" in score

    def test_a_task_killed_mid_save_leaves_the_model_missing(self, tmp_path):
        Study(tmp_path / "s", **DEF)
        code = (
            "import sys, time, numpy as np; from seedreg import Study; import seedreg.study as st\n"
            f"s = Study(sys.argv[1], **{DEF!r})\n"
            "orig = st.StudyRun.save\n"
            "def slow(self, out):\n"
            "    self.study._rows.write('outputs.npy', self.model_id, np.ones(3, np.float32).tobytes())\n"
            "    print('half', flush=True); time.sleep(60)\n"
            "with s.run(2) as run: slow(run, None)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s")], env=child_env(), stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "half"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        study = Study.open(tmp_path / "s")
        report = study.audit()
        assert 2 in report["missing"] and report["problems"] == []
        assert study.models_for(0, 1) == list(range(6))  # the model is free again (its holder is dead)
        with study.run(2):  # and its lock went with the killed process
            pass
        fill(study, [2])
        after = study.audit()
        assert 2 not in after["missing"] and after["completed"] == 1 and after["problems"] == []
