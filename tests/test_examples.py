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
