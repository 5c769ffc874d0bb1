"""DeterministicSampler: permutations by (seed, epoch), epochs, sharding, subsets, state."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seedreg import DeterministicSampler, StateError


class TestOrder:
    @settings(max_examples=60, deadline=None)
    @given(st.integers(0, 300), st.integers(0, 2**64 - 1), st.integers(0, 50))
    def test_yields_a_permutation(self, n, seed, epoch):
        s = DeterministicSampler(n, seed=seed, epoch=epoch)
        assert sorted(s) == list(range(n))

    def test_depends_only_on_seed_and_epoch(self):
        a = DeterministicSampler(100, seed=3, epoch=5)
        b = DeterministicSampler(100, seed=3)
        b.set_epoch(5)
        assert list(a) == list(b) == a.order(5)

    def test_adjacent_seeds_do_not_replay_each_other(self):
        """seed s at epoch 1 is not seed s+1 at epoch 0 (the seed document's `seed + epoch` flaw)."""
        for s in range(20):
            assert DeterministicSampler(50, seed=s).order(1) != DeterministicSampler(50, seed=s + 1).order(0)

    def test_no_shuffle_is_identity(self):
        assert list(DeterministicSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]

    def test_forgetting_set_epoch_still_reshuffles(self):
        """Iterating again without set_epoch moves to the next epoch, deterministically."""
        s = DeterministicSampler(30, seed=1)
        orders = [list(s) for _ in range(3)]
        assert len({tuple(o) for o in orders}) == 3
        assert orders == [s.order(0), s.order(1), s.order(2)]
        assert s.epoch == 2

    def test_set_epoch_pins_the_epoch(self):
        s = DeterministicSampler(30, seed=1)
        for e in (0, 1, 1, 4):
            s.set_epoch(e)
            assert list(s) == s.order(e)


class TestSharding:
    @pytest.mark.parametrize("n,world,drop_last", [(10, 3, False), (10, 3, True), (9, 3, False), (2, 4, False)])
    def test_disjoint_shards_cover(self, n, world, drop_last):
        """One global permutation, sharded as DistributedSampler does (padded unless drop_last)."""
        shards = [list(DeterministicSampler(n, seed=5, num_replicas=world, rank=r, drop_last=drop_last)) for r in range(world)]
        assert len({len(x) for x in shards}) == 1
        flat = [i for shard in shards for i in shard]
        if drop_last:
            assert len(set(flat)) == len(flat) == (n // world) * world
        else:
            assert set(flat) == set(range(n))
            assert len(flat) == -(-n // world) * world

    def test_rank_validated(self):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            DeterministicSampler(10, num_replicas=2, rank=2)


class TestSubset:
    def test_subset_order_is_subsequence_of_full_order(self):
        full = DeterministicSampler(40, seed=9).order(3)
        keep = [i for i in range(40) if i % 3 == 0]
        sub = DeterministicSampler(40, seed=9, subset=keep).order(3)
        assert sub == [i for i in full if i in set(keep)]

    def test_bool_mask_and_indices_agree(self):
        import numpy as np

        mask = np.zeros(20, dtype=bool)
        mask[[1, 5, 7]] = True
        assert DeterministicSampler(20, seed=1, subset=mask).order(0) == DeterministicSampler(20, seed=1, subset=[7, 1, 5]).order(0)

    @pytest.mark.parametrize("subset,exc", [([0, 20], ValueError), ([-1], ValueError), ([[1]], TypeError), ([True] * 3, ValueError)])
    def test_bad_subset(self, subset, exc):
        with pytest.raises(exc, match="subset"):
            DeterministicSampler(20, subset=subset)


class TestState:
    def test_round_trip_resumes_mid_epoch(self):
        s = DeterministicSampler(10, seed=2)
        full = s.order(0)
        s.begin_epoch()
        s.position = 4
        t = DeterministicSampler(10, seed=2)
        t.load_state_dict(s.state_dict())
        assert list(t) == full[4:]
        assert list(t) == t.order(1)

    def test_state_at_epoch_end(self):
        """Saved after the last sample but before the loop ended: the rest of the epoch is empty,
        then the next epoch comes (torchdata#1437 dropped an epoch here)."""
        s = DeterministicSampler(10, seed=2)
        s.begin_epoch()
        s.position = 10
        t = DeterministicSampler(10, seed=2)
        t.load_state_dict(s.state_dict())
        assert list(t) == []
        assert list(t) == t.order(1)

    def test_state_after_exhaustion(self):
        s = DeterministicSampler(10, seed=2)
        list(s)
        t = DeterministicSampler(10, seed=2)
        t.load_state_dict(s.state_dict())
        assert list(t) == s.order(1)

    @pytest.mark.parametrize(
        "change",
        [{"seed": 3}, {"dataset_size": 11}, {"position": 11}, {"position": -1}, {"epoch": "1"}, {"exhausted": 1}, {"shuffle": False}],
    )
    def test_bad_state_refused(self, change):
        s = DeterministicSampler(10, seed=2)
        state = {**s.state_dict(), **change}
        with pytest.raises(StateError):
            DeterministicSampler(10, seed=2).load_state_dict(state)

    def test_missing_key_refused(self):
        state = DeterministicSampler(10).state_dict()
        del state["epoch"]
        with pytest.raises(StateError, match="missing"):
            DeterministicSampler(10).load_state_dict(state)
