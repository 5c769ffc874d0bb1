"""The examples run, and show what they claim."""

import re

import pytest

from seedreg import Manifest

from .conftest import ROOT, run_python

pytestmark = pytest.mark.slow


def test_magic_training_is_reproducible(tmp_path):
    outs = [run_python([ROOT / "examples/magic_training.py", "--out", tmp_path / name]).stdout for name in ("a", "b")]
    fingerprints = [re.search(r"final weights: (\S+)", o).group(1) for o in outs]
    assert fingerprints[0] == fingerprints[1]
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()


def test_lds_models_differ_and_share_the_loader(tmp_path):
    out = run_python([ROOT / "examples/lds_models.py", "--models", "3", "--out", tmp_path]).stdout
    fingerprints = re.findall(r"final weights (\S+)", out)
    assert len(set(fingerprints)) == 3
    m = Manifest.load(tmp_path / "manifest.json")
    assert [r.instance_id for r in m.records if r.kind == "model"] == ["lds_0", "lds_1", "lds_2"]
    assert m.record("dataloader", "training").uses == 1


def test_perfect_consistency(tmp_path):
    out = run_python([ROOT / "examples/perfect_consistency.py"]).stdout
    assert "identical models: True" in out and "issued 2 times" in out


def test_magic_transformer_fine_tunes_gpt2_and_scores_its_metagradients():
    """The tiny GPT-2 example (frozen embeddings, AdamW with two groups, a warm-up scheduler, clipping):
    its metagradient run is the plain loop's (the example asserts it) and ranks weight-0 retrains."""
    pytest.importorskip("transformers", reason='the transformers extra: pip install -e ".[transformers]"')
    out = run_python([ROOT / "examples/magic_transformer.py", "--targets", "2", "--subsets", "8"]).stdout
    lds = [float(v) for v in re.findall(r"single-model LDS at a \d+% drop .*: (-?[\d.]+)", out)]
    assert len(lds) == 2 and all(v > 0.5 for v in lds), out


def test_magic_next_to_dattri_prints_the_table_and_both_lds_agree():
    pytest.importorskip("dattri", reason='the attribution extra: pip install -e ".[attribution]"')
    pytest.importorskip("sklearn", reason='the examples extra: pip install -e ".[examples]"')
    out = run_python([ROOT / "examples/magic_vs_trak.py", "--targets", "2", "--subsets", "8", "--seeds", "2"]).stdout
    row = re.search(r"^\| seedreg metagradient \| ([\d.-]+) / ([\d.-]+) \|", out, re.MULTILINE)
    assert row and float(row.group(1)) > 0.8 and float(row.group(2)) > 0.8, out
    assert "| dattri TRAK" in out and "| dattri influence function" in out
    assert float(re.search(r"differ by at most (\S+)$", out, re.MULTILINE).group(1)) < 1e-6


def test_magic_scores_study_gathers_the_single_process_matrix_from_two_tasks(tmp_path):
    """One training run into a store; two study tasks (local processes) compute slices of the test
    set's score matrix from it without training; gathered, it equals one process's matrix."""
    pytest.importorskip("sklearn", reason='the examples extra: pip install -e ".[examples]"')
    import subprocess
    import sys

    from .conftest import child_env

    script = ROOT / "examples/magic_scores_study.py"
    where = ["--store", tmp_path / "magic", "--root", tmp_path / "scores"]
    assert "trained: True" in run_python([script, *where, "--train"]).stdout
    tasks = [subprocess.Popen([sys.executable, script, *map(str, where), "--task", str(k), "--num-tasks", "2"], env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    outs = [t.communicate(timeout=300) for t in tasks]
    assert all(t.returncode == 0 for t in tasks), outs
    assert "trained here: False" in outs[0][0] + outs[1][0]
    gathered = run_python([script, *where, "--gather", "--check", "--subsets", "8"])
    out = gathered.stdout
    assert "%|" not in gathered.stderr  # no progress bars (dattri's tqdm, silenced before torch imports it)
    assert "score matrix: 8 test examples x 400 training examples" in out
    assert "largest difference from one process's matrix: 0.0e+00" in out
    lds = [float(v) for v in re.findall(r"weight-0 retrains: (-?[\d.]+)", out)]
    assert len(lds) == 2 and min(lds) > 0.8, out
    try:  # with the attribution extra, dattri's TRAK is scored beside it on the same retrains
        import dattri  # noqa: F401
    except ImportError:
        assert "dattri is not installed" in out
    else:
        trak = [float(v) for v in re.findall(r"dattri TRAK \(3 seeds\): (-?[\d.]+)", out)]
        assert len(trak) == 2 and max(trak) < min(lds), out


@pytest.mark.parametrize("stop_at", [7, 6], ids=["mid-epoch", "epoch-end"])
def test_the_resume_page_loop_resumes_exactly_with_its_trace(tmp_path, stop_at):
    """docs/resume.md's loop: stopped (mid-epoch, or right after an epoch's last batch) and resumed
    in a new process, it ends with the uninterrupted run's weights, manifest and trace bytes."""
    script = ROOT / "examples/resume_loop.py"
    full = run_python([script, "--out", tmp_path / "full"]).stdout
    stopped = run_python([script, "--out", tmp_path / "part", "--stop-at", str(stop_at)]).stdout
    assert f"stopped after step {stop_at}" in stopped
    resumed = run_python([script, "--out", tmp_path / "part", "--resume"]).stdout
    weights = [re.search(r"final weights: (\S+)", o).group(1) for o in (full, resumed)]
    assert weights[0] == weights[1]
    for name in ("manifest.json", "manifest.json.trace"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "part" / name).read_bytes(), name
