"""The registry: memoization, records, collision refusal, thread safety."""

import threading

import pytest

from seedreg import SeedCollisionError, SeedRecord, SeedregError, SeedSession, derive_seed
from seedreg.records import Use
from seedreg.registry import Registry


class TestMemo:
    def test_memoized_and_counted(self):
        """A key is derived once; later requests return it and count the use."""
        reg = Registry(42, "sha256-v1")
        assert reg.get("model", "training", "seed") == 1958051794
        assert reg.get("model", "training", "generator") == 1958051794
        (record,) = reg.records()
        assert record == SeedRecord(purpose="model", instance_id="training", seed=1958051794, kind="seed", uses=2, log=[Use(use=2, kind="generator")])

    def test_records_in_issue_order(self):
        s = SeedSession(1)
        for key in ["b", "a", "c"]:
            s.seed("p", key)
        assert [r.instance_id for r in s.records] == ["b", "a", "c"]

    def test_int_and_str_ids_are_different_keys_under_v2(self):
        s = SeedSession(42, scheme="sha256-v2")
        assert s.seed("m", 0) != s.seed("m", "0")
        assert len(s.records) == 2

    def test_bool_never_aliases_int_on_the_fast_path(self):
        """True == 1 in Python; the memo must not hand out 1's seed for True."""
        s = SeedSession(1)
        s.seed("m", 1)
        with pytest.raises(TypeError, match="instance_id"):
            s.seed("m", True)


class TestCollisions:
    def test_v1_separator_ambiguity_refused(self):
        """("model_a", None) and ("model", "a") hash the same v1 string: the second is refused."""
        s = SeedSession(42)
        s.seed("model_a")
        with pytest.raises(SeedCollisionError) as info:
            s.seed("model", "a")
        msg = str(info.value)
        assert "'model_a'" in msg and "instance_id='a'" in msg and "sha256-v2" in msg and "same input" in msg

    def test_v1_int_str_ambiguity_refused(self):
        s = SeedSession(42)
        s.seed("m", 0)
        with pytest.raises(SeedCollisionError, match="instance_id='0'"):
            s.seed("m", "0")

    def test_v1_birthday_collision_caught(self):
        """Under v1, lds_23202 and lds_29047 share seed 571989311 for master 42."""
        assert derive_seed(42, "model", "lds_23202") == derive_seed(42, "model", "lds_29047") == 571989311
        s = SeedSession(42)
        s.seed("model", "lds_23202")
        with pytest.raises(SeedCollisionError) as info:
            s.seed("model", "lds_29047")
        assert isinstance(info.value, SeedregError) and isinstance(info.value, ValueError)
        assert "birthday" in str(info.value) and "571989311" in str(info.value)

    def test_refused_key_is_not_recorded(self):
        s = SeedSession(42)
        s.seed("model_a")
        with pytest.raises(SeedCollisionError):
            s.seed("model", "a")
        assert [r.purpose for r in s.records] == ["model_a"]

    def test_v2_has_no_collision_for_many_lds_models(self):
        """100,000 LDS model ids under v2: every seed distinct (the registry would refuse otherwise)."""
        s = SeedSession(42, scheme="sha256-v2")
        seeds = {s.seed("model", f"lds_{i}") for i in range(100_000)}
        assert len(seeds) == 100_000


class TestThreads:
    def test_concurrent_requests(self):
        """8 threads x 10,000 overlapping keys: every key once, with its derived value."""
        s = SeedSession(7, scheme="sha256-v2")
        errors = []
        barrier = threading.Barrier(8)

        def work(t):
            try:
                barrier.wait()
                for i in range(10_000):
                    key = (i * 7 + t * 1_250) % 20_000
                    assert s.seed("component", key) == derive_seed(7, "component", key, scheme="sha256-v2")
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
        keys = [r.instance_id for r in s.records]
        assert len(keys) == len(set(keys))
        expected = {(i * 7 + t * 1_250) % 20_000 for t in range(8) for i in range(10_000)}
        assert set(keys) == expected
        assert sum(r.uses for r in s.records) == 80_000


def test_a_reused_key_warning_points_at_the_users_line():
    """Two loaders on one key with other settings: the warning names the line that built the second
    (it pointed inside seedreg)."""
    import torch

    from seedreg import SeedregWarning

    s = SeedSession(0).setup()
    s.build_dataloader(torch.arange(8.0), "train", batch_size=2)
    with pytest.warns(SeedregWarning, match="built again") as caught:
        s.build_dataloader(torch.arange(8.0), "train", batch_size=4)
    assert [w.filename for w in caught] == [__file__]
