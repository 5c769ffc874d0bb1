"""A DataLoader that behaves like one: cases from PyTorch's and torchdata's own loader tests, and
the thread rule of the global generators."""

import gc
import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader, get_worker_info

from seedreg import DeterministicSampler, SeedregError, SeedregWarning, SeedSession
from seedreg.demo import TinyCNN, ToyImages


class Seeds(torch.utils.data.Dataset):
    """Returns the seed torch's generator was last seeded with, and a draw from it."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.initial_seed(), torch.randint(0, 2**31, ()).item()


class TestInstalledSeeds:
    @pytest.mark.parametrize("per_example,workers", [(True, 0), (True, 2), (False, 2)])
    def test_below_2_63_so_default_collation_takes_them(self, per_example, workers):
        loader = SeedSession(5).setup().build_dataloader(Seeds(), "d", batch_size=8, seed_per_example=per_example, num_workers=workers)
        seeds = torch.cat([b[0] for b in loader])  # collating a seed >= 2**63 overflowed before
        assert seeds.numel() == 16 and bool((seeds >= 0).all())

    def test_worker_streams_differ_across_ranks(self):
        """seed_per_example=False: worker w of rank r has its own stream (8 distinct of 8 pairs)."""
        streams = set()
        for rank in range(4):
            loader = SeedSession(5, rank=rank, world_size=4).setup().build_dataloader(Seeds(), "d", batch_size=2, seed_per_example=False)
            init = loader.worker_init_fn
            streams |= {init.worker_seed(w) for w in range(2)}
        assert len(streams) == 8 and max(streams) < 2**63


class Handles(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return int(getattr(self, "handle", -1))


def _open_handle(worker_id):
    get_worker_info().dataset.handle = 100 + worker_id


def test_worker_info_dataset_is_the_users():
    loader = SeedSession(1).setup().build_dataloader(Handles(), "d", batch_size=2, num_workers=2, worker_init_fn=_open_handle)
    values = sorted(torch.cat(list(loader)).tolist())
    assert values == [100, 100, 101, 101]  # the user's dataset saw the handle its worker_init_fn set


def test_dropping_a_persistent_loader_ends_its_workers_promptly():
    gc.disable()
    try:
        loader = SeedSession(1).setup().build_dataloader(ToyImages(16), "d", batch_size=8, num_workers=2, persistent_workers=True)
        for _ in loader:
            pass
        workers = list(loader._iterator._workers)
        assert all(w.is_alive() for w in workers)
        del loader  # reference counting alone must free it (no cycle left for the collector)
        deadline = time.monotonic() + 10
        while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(w.is_alive() for w in workers)
    finally:
        gc.enable()


def test_in_order_false_is_refused():
    with pytest.raises(ValueError, match="in_order=False"):
        SeedSession(1).setup().build_dataloader(ToyImages(8), "d", batch_size=2, num_workers=2, in_order=False)


def test_sampler_alone_tracks_its_position():
    """In a plain DataLoader the sampler counts what it yielded (as torchdata's does) and resumes."""
    sampler = DeterministicSampler(10, seed=3)
    it = iter(DataLoader(range(10), batch_size=None, sampler=sampler))
    first = [next(it) for _ in range(3)]
    assert sampler.position >= 3
    fresh = DeterministicSampler(10, seed=3)
    fresh.load_state_dict(sampler.state_dict())
    rest = list(fresh)
    full = list(DeterministicSampler(10, seed=3))
    assert first == full[:3] and rest == full[sampler.position :]


class TestThreads:
    def test_a_second_thread_in_a_builder_is_refused(self):
        s = SeedSession(1).setup()
        inside, release, errors = threading.Event(), threading.Event(), []

        def slow_factory():
            inside.set()
            release.wait(10)
            return TinyCNN()

        def other():
            inside.wait(10)
            try:
                s.build_model(TinyCNN, "other")
            except SeedregError as exc:
                errors.append(str(exc))
            finally:
                release.set()

        t = threading.Thread(target=other)
        t.start()
        before = torch.get_rng_state()
        s.build_model(slow_factory, "slow")
        t.join()
        assert errors and "another thread" in errors[0]
        assert torch.equal(torch.get_rng_state(), before)

    def test_concurrent_builds_never_give_different_weights(self):
        s = SeedSession(1).setup()
        weights, refused = [], []

        def work():
            for _ in range(10):
                try:
                    weights.append(s.build_model(TinyCNN, "m").head.weight.detach().clone())
                except SeedregError:
                    refused.append(1)

        threads = [threading.Thread(target=work) for _ in range(4)]
        with pytest.warns(SeedregWarning, match="same initial weights") as told:  # one key, built 40 times: told once
            [t.start() for t in threads]
            [t.join() for t in threads]
        assert len(told) == 1
        assert weights and all(torch.equal(w, weights[0]) for w in weights)
        assert len(weights) + len(refused) == 40
