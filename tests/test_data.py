"""Loaders from build_dataloader: per-example streams, workers, epochs, positions, subsets."""

import contextlib
import random

import numpy as np
import pytest
import torch

from seedreg import SeedregWarning, SeedSession, StateError
from seedreg.demo import ToyImages


class Keyed(torch.utils.data.Dataset):
    """Returns (index, draws from random, numpy and torch): shows which stream an example got."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        return torch.tensor([float(i), random.random(), float(np.random.rand()), float(torch.rand(()))], dtype=torch.float64)


def epochs(loader, n=2):
    out = []
    for e in range(n):
        loader.set_epoch(e)
        out.append(torch.cat([b for b in loader]))
    return out


class TestPerExampleStreams:
    def test_num_workers_does_not_change_batches(self):
        """0, 1 and 3 workers give identical batches, augmentation included."""
        results = [epochs(SeedSession(4).setup().build_dataloader(Keyed(), "d", batch_size=5, shuffle=True, num_workers=w)) for w in (0, 1, 3)]
        for other in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(results[0], other))
        assert not torch.equal(results[0][0], results[0][1])

    def test_example_stream_is_the_same_in_any_batch_position(self):
        """An example's draws depend on (seed, epoch, index), not on the batch size."""
        a = torch.cat(list(SeedSession(4).setup().build_dataloader(Keyed(), "d", batch_size=5, shuffle=True)))
        b = torch.cat(list(SeedSession(4).setup().build_dataloader(Keyed(), "d", batch_size=7, shuffle=True)))
        assert torch.equal(a, b)

    def test_main_process_global_rng_untouched(self):
        """With num_workers=0 a batch leaves the global generators as it found them."""
        loader = SeedSession(1).setup().build_dataloader(Keyed(), batch_size=4, shuffle=True)
        torch.manual_seed(0); random.seed(0); np.random.seed(0)
        expected = (torch.rand(2), random.random(), np.random.rand())
        torch.manual_seed(0); random.seed(0); np.random.seed(0)
        for _ in loader:
            pass
        got = (torch.rand(2), random.random(), np.random.rand())
        assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]

    def test_persistent_workers_see_the_epoch(self):
        """The epoch travels with the indices, so persistent workers follow set_epoch."""
        plain = epochs(SeedSession(2).setup().build_dataloader(Keyed(), "d", batch_size=4, shuffle=True, num_workers=2), 3)
        persistent = epochs(
            SeedSession(2).setup().build_dataloader(Keyed(), "d", batch_size=4, shuffle=True, num_workers=2, persistent_workers=True), 3
        )
        assert all(torch.equal(a, b) for a, b in zip(plain, persistent))

    def test_per_worker_seeding_is_deterministic(self):
        """seed_per_example=False: workers seeded from (loader seed, epoch, worker id)."""
        run = lambda: epochs(SeedSession(2).setup().build_dataloader(Keyed(), "d", batch_size=4, num_workers=2, seed_per_example=False))
        a, b = run(), run()
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not torch.equal(a[0][:, 1:], a[1][:, 1:])

    def test_user_worker_init_fn_still_runs(self, tmp_path):
        marker = tmp_path / "seen"

        def init(worker_id):
            (tmp_path / f"seen{worker_id}").write_text("x")

        loader = SeedSession(1).setup().build_dataloader(Keyed(), batch_size=4, num_workers=2, worker_init_fn=init)
        list(loader)
        assert (tmp_path / "seen0").exists() and (tmp_path / "seen1").exists() and not marker.exists()


class TestPosition:
    def test_counts_consumed_batches_not_prefetched(self):
        loader = SeedSession(3).setup().build_dataloader(Keyed(), "d", batch_size=4, shuffle=True, num_workers=2)
        it = iter(loader)
        next(it); next(it)
        assert loader.state_dict()["sampler"]["position"] == 8

    @pytest.mark.parametrize("workers", [0, 2])
    @pytest.mark.parametrize("taken", [0, 2, 5, 6])
    def test_loader_state_resumes_the_rest(self, workers, taken):
        """A new loader loaded with the state yields exactly the batches the first had not yet given."""
        make = lambda: SeedSession(3).setup().build_dataloader(Keyed(), "d", batch_size=4, shuffle=True, num_workers=workers)
        full = [b for b in make()] + [b for b in make_second_epoch(make)]
        loader = make()
        it = iter(loader)
        for _ in range(taken):
            next(it)
        state = loader.state_dict()
        resumed = make()
        resumed.load_state_dict(state)
        at_end = taken == 6  # the epoch's last batch: iterated without set_epoch, the rest is empty, and it says so
        with pytest.warns(SeedregWarning, match="resumed at the end") if at_end else contextlib.nullcontext():
            rest = list(resumed) + list(resumed)
        assert len(rest) == len(full) - taken
        assert all(torch.equal(a, b) for a, b in zip(full[taken:], rest))

    def test_state_of_other_loader_refused(self):
        a = SeedSession(3).setup().build_dataloader(Keyed(), "a", batch_size=4)
        b = SeedSession(3).setup().build_dataloader(Keyed(), "b", batch_size=4)
        with pytest.raises(StateError, match="instance_id"):
            b.load_state_dict(a.state_dict())
        c = SeedSession(3).setup().build_dataloader(Keyed(), "a", batch_size=5)
        with pytest.raises(StateError, match="batch_size"):
            c.load_state_dict(a.state_dict())


def make_second_epoch(make):
    loader = make()
    loader.set_epoch(1)
    return list(loader)


class TestSubsetLoaders:
    def test_subset_is_subsequence_with_same_augmentation(self):
        """A counterfactual loader yields the kept examples in full-run order, with the same draws."""
        full = torch.cat(list(SeedSession(8).setup().build_dataloader(Keyed(), "t", batch_size=3, shuffle=True)))
        keep = [1, 4, 5, 10, 22]
        sub = torch.cat(list(SeedSession(8).setup().build_dataloader(Keyed(), "t", batch_size=3, shuffle=True, subset=keep)))
        expected = full[torch.isin(full[:, 0], torch.tensor(keep, dtype=torch.float64))]
        assert torch.equal(sub, expected)

    def test_weight_mode_keeps_batches_and_zeroes_removed(self):
        full = list(SeedSession(8).setup().build_dataloader(Keyed(), "t", batch_size=3, shuffle=True))
        mask = np.zeros(23, dtype=bool)
        mask[[0, 3, 7]] = True
        weighted = list(SeedSession(8).setup().build_dataloader(Keyed(), "t", batch_size=3, shuffle=True, subset=mask, subset_mode="weight"))
        assert len(full) == len(weighted)
        for a, (b, w) in zip(full, weighted):
            assert torch.equal(a, b)
            assert torch.equal(w, torch.tensor([1.0 if mask[int(i)] else 0.0 for i in a[:, 0]], dtype=w.dtype))

    def test_toy_dataset_through_workers(self):
        loader = SeedSession(1).setup().build_dataloader(ToyImages(40), batch_size=8, shuffle=True, num_workers=2)
        xs = [x for x, _ in loader]
        assert len(xs) == 5 and xs[0].shape == (8, 3, 12, 12)
