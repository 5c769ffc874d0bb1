"""Exact resume: stop after k steps, save, and a fresh process that loads finishes bit for bit
like the run that was never interrupted (torchdata's test_state_dict pattern), with workers and
dropout; and num_workers never changes results."""

import json

import pytest
import torch

from seedreg import SeedSession, StateError
from seedreg.demo import ToyImages

from .conftest import run_train

pytestmark = pytest.mark.slow

# 96 examples, batch 16: 6 steps an epoch, 2 epochs.
STEPS_PER_EPOCH = 6


@pytest.mark.parametrize(
    "save_at,flags",
    [
        (3, []),  # mid-epoch, 2 workers
        (STEPS_PER_EPOCH, []),  # exactly at the epoch boundary
        (8, ["--persistent"]),  # mid second epoch, persistent workers
        (STEPS_PER_EPOCH, ["--no-set-epoch"]),  # a loop that relies on auto-advancing epochs
        (4, ["--workers", "0"]),
    ],
    ids=["mid-epoch", "epoch-boundary", "persistent-workers", "auto-epochs", "no-workers"],
)
def test_resume_matches_uninterrupted_run(tmp_path, save_at, flags):
    full = run_train(tmp_path / "full", *flags)
    interrupted = run_train(tmp_path / "first", "--save-at", str(save_at), *flags)
    assert interrupted == full  # saving a checkpoint does not disturb the run
    resumed = run_train(tmp_path / "second", "--resume", str(tmp_path / "first" / "ckpt"), *flags)
    assert json.loads((tmp_path / "second" / "result.json").read_text())["steps"] == 2 * STEPS_PER_EPOCH
    assert resumed == full


def test_resume_restores_rng_even_if_disturbed_before_the_loop(tmp_path):
    """The global RNGs are restored right before the next batch, so draws in between do not count."""
    full = run_train(tmp_path / "full")
    run_train(tmp_path / "first", "--save-at", "3")
    resumed = run_train(tmp_path / "second", "--resume", str(tmp_path / "first" / "ckpt"), "--disturb")
    assert resumed == full


def test_num_workers_does_not_change_results(tmp_path):
    """The same training with 0, 1 and 3 workers ends with identical weights."""
    results = [run_train(tmp_path / f"w{w}", "--workers", str(w)) for w in (0, 1, 3)]
    assert results[0] == results[1] == results[2]


class TestStateDict:
    def build(self, seed=5, **kw):
        s = SeedSession(seed, **kw).setup()
        s.seed("a", 1)
        loader = s.build_dataloader(ToyImages(20), "train", batch_size=4, shuffle=True)
        return s, loader

    def test_json_round_trip(self):
        s, loader = self.build()
        it = iter(loader)
        next(it)
        state = s.state_dict()
        text = json.dumps(state)
        s2, loader2 = self.build()
        s2.load_state_dict(json.loads(text))
        assert s2.state_dict() == state
        assert loader2.state_dict()["sampler"]["position"] == 4

    def test_restores_global_rng_before_the_next_batch(self):
        s, loader = self.build()
        torch.manual_seed(3)
        state = s.state_dict()
        expected = torch.rand(3)
        s2, loader2 = self.build()
        s2.load_state_dict(state)
        torch.rand(100)  # consumed between loading and the loop: overwritten at the next batch
        next(iter(loader2))
        assert torch.equal(torch.rand(3), expected)

    def test_without_loaders_restores_at_once(self):
        s = SeedSession(1).setup()
        torch.manual_seed(4)
        state = s.state_dict()
        expected = torch.rand(2)
        SeedSession(1).setup().load_state_dict(state)
        assert torch.equal(torch.rand(2), expected)

    @pytest.mark.parametrize(
        "mutate,needle",
        [
            (lambda st: st.update(master_seed=6), "master_seed"),
            (lambda st: st.update(scheme="sha256-v2"), "scheme"),
            (lambda st: st.update(world_size=2), "world_size"),
            (lambda st: st.update(format="x"), "not a seedreg state"),
            (lambda st: st["rng"].update(torch="AAAA"), "bytes"),
            (lambda st: st["loaders"][0].update(instance_id="other"), "has not built"),
            (lambda st: st["loaders"].append({**st["loaders"][0], "use": 2}), r"use 2, which this session has not built"),
            (lambda st: st["loaders"][0]["sampler"].update(position=999), "position"),
            (lambda st: st["records"][0].update(seed=1), "derives"),
            (lambda st: st["records"].append("garbage"), "records"),
            (lambda st: st.pop("rng"), "missing"),
        ],
    )
    def test_bad_states_refused_and_nothing_changed(self, mutate, needle):
        s, loader = self.build()
        good = s.state_dict()
        bad = json.loads(json.dumps(good))
        mutate(bad)
        s2, loader2 = self.build()
        next(iter(loader2))
        before = s2.state_dict()
        with pytest.raises(StateError, match=needle):
            s2.load_state_dict(bad)
        after = s2.state_dict()
        after["rng"] = before["rng"]  # the global RNG moved on with the test itself
        assert after == before

    def test_garbage(self):
        for garbage in (None, [], "x", {"format": "seedreg-state"}):
            with pytest.raises(StateError):
                SeedSession(1).setup().load_state_dict(garbage)
