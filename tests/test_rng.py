"""Global RNG state (capture, JSON, restore) and Fork."""

import json
import random

import numpy as np
import pytest
import torch

from seedreg import StateError
from seedreg.rng import Fork, capture_global, decode_global, restore_global


def draws():
    return (random.random(), float(np.random.rand()), float(torch.rand(())))


class TestGlobalState:
    def test_json_round_trip_restores_every_generator(self):
        random.seed(1); np.random.seed(2); torch.manual_seed(3)
        np.random.standard_normal()  # leaves a cached gaussian in numpy's state
        state = json.loads(json.dumps(capture_global()))
        expected = draws()
        draws(); draws()
        restore_global(decode_global(state))
        assert draws() == expected

    @pytest.mark.parametrize(
        "path,value",
        [
            (("torch",), "AAAA"),
            (("python", "words"), "not base64!"),
            (("numpy", "keys"), "AAAA"),
            (("numpy", "pos"), 9999),
            (("numpy", "kind"), "PCG64"),
            (("python", "gauss_next"), "x"),
            (("cuda",), {"x": "AAAA"}),
        ],
    )
    def test_corrupt_states_refused(self, path, value):
        state = capture_global()
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(StateError):
            decode_global(state)

    def test_garbage_refused(self):
        for garbage in (None, [], "x", {"python": 1}):
            with pytest.raises(StateError):
                decode_global(garbage)


class TestFork:
    def test_seeds_and_restores_torch(self):
        torch.manual_seed(0)
        before = torch.get_rng_state()
        with Fork(123):
            a = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), before)
        with Fork(123):
            assert torch.equal(torch.rand(3), a)

    def test_restores_when_the_body_raises(self):
        before = torch.get_rng_state()
        with pytest.raises(RuntimeError):
            with Fork(5, python=True, numpy=True):
                torch.rand(2); random.random(); np.random.rand()
                raise RuntimeError("boom")
        assert torch.equal(torch.get_rng_state(), before)

    def test_python_and_numpy_opt_in(self):
        random.seed(9); np.random.seed(9); torch.manual_seed(9)
        outside = draws()
        random.seed(9); np.random.seed(9); torch.manual_seed(9)
        with Fork(1, python=True, numpy=True):
            inside = draws()
        assert draws() == outside  # the global streams continue as if nothing happened
        with Fork(1, python=True, numpy=True):
            assert draws() == inside

    def test_torch_only_by_default(self):
        random.seed(4)
        with Fork(1):
            r = random.random()
        random.seed(4)
        assert random.random() == r  # python's RNG was not forked, so it advanced inside

    def test_disabled(self):
        torch.manual_seed(0)
        with Fork(1, enabled=False):
            a = torch.rand(1)
        torch.manual_seed(0)
        assert torch.equal(torch.rand(1), a)
