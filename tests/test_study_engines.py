"""The engines users already run fill one study, byte for byte the study a local loop fills (the
SLURM array, 1-based as written, is tests/test_study.py's four concurrent tasks)."""

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
    pytest.importorskip("submitit", reason="the examples extra: pip install -e \".[examples]\"")
    out = run_python([ROOT / "examples" / "lds_study_submitit.py", "--root", tmp_path / "study", "--tasks", "3", "--local",
                      "--epochs", EPOCHS]).stdout
    assert "3 tasks trained 12 models" in out and "audit clean" in out
    same_study(tmp_path / "study", local_study)


@pytest.mark.slow
def test_ray_tasks(tmp_path, local_study):
    pytest.importorskip("ray", reason="Ray (not an extra: pip install ray)")
    out = run_python([ROOT / "examples" / "lds_study_ray.py", "--root", tmp_path / "study", "--epochs", EPOCHS], timeout=400).stdout
    assert "Ray trained 12 models" in out and "audit clean" in out
    same_study(tmp_path / "study", local_study)

