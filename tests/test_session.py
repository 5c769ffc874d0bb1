"""SeedSession: no global state until setup(), the deterministic setup, seeds and builders."""

import os
import random

import numpy as np
import pytest
import torch

from seedreg import DeterministicSampler, SeededDataLoader, SeedregWarning, SeedSession, derive_seed
from seedreg.demo import TinyCNN, ToyImages

from .conftest import run_python


def global_snapshot():
    return (
        random.getstate(),
        np.random.get_state()[1].tobytes(),
        torch.get_rng_state().numpy().tobytes(),
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )


class TestConstruction:
    def test_changes_no_global_state(self):
        before = global_snapshot()
        s = SeedSession(42, scheme="sha256-v2")
        s.seed("x"); s.generator("g"); s.numpy_rng("n")
        with pytest.warns(SeedregWarning, match="before setup"):  # told once, at the first builder
            s.build_model(TinyCNN); s.build_dataloader(ToyImages(8), shuffle=True)
        s.manifest()
        assert global_snapshot() == before

    def test_import_changes_nothing(self):
        """Importing seedreg in a fresh process leaves RNGs, flags, env and logging alone."""
        code = (
            "import os, random, logging, warnings, torch, numpy as np\n"
            "def snap(): return (random.getstate(), np.random.get_state()[1].tobytes(), torch.get_rng_state().numpy().tobytes(),"
            " torch.are_deterministic_algorithms_enabled(), dict(os.environ), warnings.showwarning, logging.getLogger().handlers[:])\n"
            "a = snap(); import seedreg; b = snap(); print(a == b)"
        )
        assert run_python(["-c", code]).stdout.strip() == "True"

    @pytest.mark.parametrize(
        "kwargs,exc,needle",
        [
            ({"master_seed": -1}, ValueError, "master_seed"),
            ({"master_seed": True}, TypeError, "master_seed"),
            ({"master_seed": 1, "scheme": "v3"}, ValueError, "scheme"),
            ({"master_seed": 1, "deterministic": 1}, TypeError, "deterministic"),
            ({"master_seed": 1, "rank": 2, "world_size": 2}, ValueError, r"\[0, 1\]"),
        ],
    )
    def test_bad_arguments(self, kwargs, exc, needle):
        with pytest.raises(exc, match=needle):
            SeedSession(**kwargs)

    def test_setup_is_quiet(self, capsys):
        SeedSession(1).setup()
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == ""


class TestSetup:
    def test_seeds_globals_with_the_master_seed(self):
        SeedSession(1234).setup()
        got = (random.random(), float(np.random.rand()), float(torch.rand(())))
        random.seed(1234); np.random.seed(1234); torch.manual_seed(1234)
        assert got == (random.random(), float(np.random.rand()), float(torch.rand(())))

    def test_deterministic_settings_applied_and_recorded(self):
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        s = SeedSession(1, fill_uninitialized_memory=False).setup()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.utils.deterministic.fill_uninitialized_memory is False
        applied = s.manifest().applied
        assert applied["cublas_workspace_config"] == {"value": ":4096:8", "set_by": "seedreg"}
        assert applied["fill_uninitialized_memory"] is False and applied["warn_only"] is True
        torch.utils.deterministic.fill_uninitialized_memory = True

    def test_users_cublas_value_is_kept(self):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
        s = SeedSession(1).setup()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        assert s.manifest().applied["cublas_workspace_config"]["set_by"] == "user"

    def test_malformed_cublas_warns_and_is_recorded(self):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = "4096:8"
        with pytest.warns(RuntimeWarning, match="malformed"):
            s = SeedSession(1).setup()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == "4096:8"
        assert s.violations[0]["kind"] == "cublas_malformed"

    def test_second_setup_is_harmless(self):
        """A second setup() neither fails nor reseeds: the stream goes on."""
        s = SeedSession(5).setup()
        x = random.random()
        assert s.setup() is s
        y = random.random()
        random.seed(5)
        assert [random.random(), random.random()] == [x, y]

    def test_not_deterministic(self):
        s = SeedSession(1, deterministic=False).setup()
        assert s.manifest().applied == {"global_seed": 1, "deterministic": False}


class TestSeeds:
    def test_seed_matches_derive_seed(self):
        s = SeedSession(42)
        assert s.seed("model", "training") == derive_seed(42, "model", "training")

    def test_generator_and_numpy_rng_are_fresh_streams(self):
        s = SeedSession(3)
        assert torch.equal(torch.rand(4, generator=s.generator("noise")), torch.rand(4, generator=s.generator("noise")))
        assert s.numpy_rng("mix").random() == s.numpy_rng("mix").random()
        assert not torch.equal(torch.rand(4, generator=s.generator("noise")), torch.rand(4, generator=s.generator("other")))
        assert {r.kind for r in s.records} == {"generator", "numpy_rng"}

    def test_rank_seed_differs_from_seed(self):
        s = SeedSession(3)
        assert s.rank_seed("dropout") != s.seed("dropout")


class TestBuilders:
    def test_build_model_ignores_prior_draws_and_leaves_rng_alone(self):
        s = SeedSession(11).setup()
        a = s.build_model(TinyCNN, "m")
        torch.rand(100); random.random(); np.random.rand(7)
        t = SeedSession(11).setup()
        before = global_snapshot()
        b = t.build_model(TinyCNN, "m")
        assert global_snapshot() == before
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        c = SeedSession(11).setup().build_model(TinyCNN, "other")
        assert not torch.equal(a.conv1.weight, c.conv1.weight)

    def test_build_model_records_fingerprint(self):
        s = SeedSession(11).setup()
        s.build_model(TinyCNN, "m", width=8)
        (r,) = s.records
        assert r.kind == "model" and r.details["class"].endswith("TinyCNN") and r.details["fingerprint"].startswith("sha256:")

    def test_build_optimizer(self):
        s = SeedSession(1).setup()
        m = s.build_model(torch.nn.Linear, None, in_features=2, out_features=2)
        opt = s.build_optimizer(torch.optim.Adam, m.parameters(), None, lr=0.1, betas=(0.8, 0.9))
        assert isinstance(opt, torch.optim.Adam)
        record = [r for r in s.records if r.kind == "optimizer"][0]
        assert record.details["defaults"]["betas"] == [0.8, 0.9]

    def test_build_dataloader(self):
        s = SeedSession(1).setup()
        loader = s.build_dataloader(ToyImages(20), "train", batch_size=4, shuffle=True)
        assert isinstance(loader, SeededDataLoader) and isinstance(loader.sampler, DeterministicSampler)
        assert loader.sampler.seed == s.seed("dataloader", "train") == loader.seed
        assert len(loader) == 5 and sum(len(y) for _, y in loader) == 20
        r = [r for r in s.records if r.kind == "dataloader"][0]
        assert r.details["batch_size"] == 4 and r.details["dataset_size"] == 20

    @pytest.mark.parametrize("name", ["sampler", "batch_sampler", "generator"])
    def test_build_dataloader_refuses_what_it_supplies(self, name):
        with pytest.raises(TypeError, match=f"`{name}`"):
            SeedSession(1).setup().build_dataloader(ToyImages(4), **{name: None})

    @pytest.mark.parametrize(
        "kwargs,exc",
        [({"batch_size": 0}, ValueError), ({"num_workers": -1}, ValueError), ({"shuffle": 1}, TypeError), ({"subset_mode": "x"}, ValueError)],
    )
    def test_build_dataloader_bad_args(self, kwargs, exc):
        with pytest.raises(exc):
            SeedSession(1).setup().build_dataloader(ToyImages(4), **kwargs)

    def test_non_datasets_and_empty_datasets_refused(self):
        with pytest.raises(TypeError, match="map-style dataset .* or a torch IterableDataset"):
            SeedSession(1).setup().build_dataloader(3)
        with pytest.raises(ValueError, match="empty"):
            SeedSession(1).setup().build_dataloader([])

    def test_loader_dataset_forwards_attributes(self):
        loader = SeedSession(1).setup().build_dataloader(ToyImages(4))
        assert loader.dataset.augment is True and len(loader.dataset) == 4
