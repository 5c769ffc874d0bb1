"""The engines users already run fill one study, byte for byte the study a local loop fills."""

import pytest

from seedreg import Study

from .conftest import ROOT, run_python

EPOCHS = "2"


@pytest.fixture(scope="module")
def local_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("local") / "study"
    run_python([ROOT / "examples" / "lds_study.py", "--root", root, "--task", "0", "--num-tasks", "1", "--epochs", EPOCHS])
    return root


def same_study(root, reference):
    study = Study.open(root)
    assert study.audit()["ok"] and study.status()["done"] == 12
    for name in ("masks.npy", "outputs.npy"):
        assert (root / name).read_bytes() == (reference / name).read_bytes()


@pytest.mark.slow
def test_submitit_job_array(tmp_path, local_study):
    pytest.importorskip("submitit")
    out = run_python([ROOT / "examples" / "lds_study_submitit.py", "--root", tmp_path / "study", "--tasks", "3", "--local",
                      "--epochs", EPOCHS]).stdout
    assert "3 tasks trained 12 models" in out and "audit clean" in out
    same_study(tmp_path / "study", local_study)


@pytest.mark.slow
def test_ray_tasks(tmp_path, local_study):
    pytest.importorskip("ray")
    out = run_python([ROOT / "examples" / "lds_study_ray.py", "--root", tmp_path / "study", "--epochs", EPOCHS], timeout=400).stdout
    assert "Ray trained 12 models" in out and "audit clean" in out
    same_study(tmp_path / "study", local_study)


@pytest.mark.slow
def test_slurm_array_as_written(tmp_path, local_study):
    """``sbatch --array=1-4 examples/slurm/lds_array.sbatch``: 1-based, as users write it; each
    task's environment is what SLURM sets."""
    import subprocess
    import sys

    from .conftest import child_env

    procs = []
    for tid in range(1, 5):
        env = child_env(SLURM_ARRAY_TASK_ID=str(tid), SLURM_ARRAY_TASK_MIN="1", SLURM_ARRAY_TASK_MAX="4",
                        SLURM_ARRAY_TASK_STEP="1", SLURM_ARRAY_TASK_COUNT="4", SLURM_ARRAY_JOB_ID="77")
        procs.append(subprocess.Popen([sys.executable, ROOT / "examples" / "lds_study.py", "--root", tmp_path / "study", "--epochs", EPOCHS],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    same_study(tmp_path / "study", local_study)
