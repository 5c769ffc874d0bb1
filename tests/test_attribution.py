"""Data-attribution workflows: LDS masks, counterfactual loaders, MAGIC step replay, examples."""

import json

import numpy as np
import pytest

from seedreg import Manifest, SeedSession, make_subset_mask

from .conftest import ROOT, run_python


class TestSubsetMask:
    def test_fixed_size_and_bernoulli(self):
        s = SeedSession(1, scheme="sha256-v2")
        m = s.subset_mask(1000, 0.3, 0)
        assert m.dtype == bool and m.shape == (1000,) and m.sum() == 300
        b = s.subset_mask(10_000, 0.3, 1, mode="bernoulli")
        assert abs(b.mean() - 0.3) < 0.03

    def test_deterministic_per_instance_and_different_across(self):
        a = SeedSession(1).subset_mask(200, 0.5, 0)
        assert np.array_equal(a, SeedSession(1).subset_mask(200, 0.5, 0))
        assert not np.array_equal(a, SeedSession(1).subset_mask(200, 0.5, 1))
        assert not np.array_equal(a, SeedSession(2).subset_mask(200, 0.5, 0))

    def test_same_across_processes(self):
        code = "from seedreg import SeedSession; print(SeedSession(5).subset_mask(64, 0.5, 'm3').astype(int).tolist())"
        outs = {run_python(["-c", code], env={"PYTHONHASHSEED": h}).stdout for h in ("1", "2")}
        assert len(outs) == 1
        assert json.loads(outs.pop()) == SeedSession(5).subset_mask(64, 0.5, "m3").astype(int).tolist()

    def test_recorded(self):
        s = SeedSession(1)
        s.subset_mask(50, 0.25, 7, mode="bernoulli")
        (r,) = s.records
        assert r.kind == "subset_mask" and r.details["num_examples"] == 50 and r.details["alpha"] == 0.25 and r.details["mode"] == "bernoulli"

    @pytest.mark.parametrize(
        "n,alpha,mode,exc",
        [
            (0, 0.5, "fixed", ValueError), (10, 0.0, "fixed", ValueError), (10, 1.5, "fixed", ValueError),
            (10, float("nan"), "fixed", ValueError), (10, 0.5, "other", ValueError), (True, 0.5, "fixed", TypeError),
            (10, "0.5", "fixed", TypeError), (2.5, 0.5, "fixed", TypeError),
        ],
    )
    def test_bad_arguments(self, n, alpha, mode, exc):
        with pytest.raises(exc):
            SeedSession(1).subset_mask(n, alpha, 0, mode=mode)

    def test_replay_checks_mask_parameters(self, tmp_path):
        from seedreg import ReplayMismatchError

        s = SeedSession(1)
        s.subset_mask(50, 0.5, 0)
        r = SeedSession.from_manifest(s.dump(tmp_path / "m.json"))
        with pytest.raises(ReplayMismatchError, match="alpha"):
            r.subset_mask(50, 0.6, 0)

    def test_pure_function(self):
        assert np.array_equal(make_subset_mask(3, 40, 0.5), make_subset_mask(3, 40, 0.5))


@pytest.mark.slow
class TestExamples:
    def test_lds_example_layout(self, tmp_path):
        run_python([ROOT / "examples/lds.py", "--models", "3", "--examples", "64", "--epochs", "1", "--out", tmp_path])
        masks, margins = np.load(tmp_path / "masks.npy"), np.load(tmp_path / "margins.npy")
        assert masks.shape == (3, 64) and masks.dtype == bool and (masks.sum(axis=1) == 32).all()
        assert margins.shape == (3, 32) and margins.dtype == np.float32
        m = Manifest.load(tmp_path / "manifest.json")
        assert [r.instance_id for r in m.records if r.kind == "subset_mask"] == [0, 1, 2]
        # model i retrained alone gets the same mask
        assert np.array_equal(masks[2], SeedSession(42, scheme="sha256-v2").subset_mask(64, 0.5, 2))

    def test_lds_example_reproducible(self, tmp_path):
        for name in ("a", "b"):
            run_python([ROOT / "examples/lds.py", "--models", "2", "--examples", "48", "--epochs", "1", "--out", tmp_path / name])
        assert (tmp_path / "a/margins.npy").read_bytes() == (tmp_path / "b/margins.npy").read_bytes()

    @pytest.mark.parametrize("workers", ["0", "2"])
    def test_magic_replay_example(self, workers):
        out = run_python([ROOT / "examples/magic_replay.py", "--steps", "10", "--every", "4", "--workers", workers]).stdout
        assert "all replayed steps identical" in out and out.count("identical") == 11
