"""find_nondeterminism: the first module whose output or gradient differs between runs of one step."""

import os

import numpy as np
import pytest
import torch

from seedreg import find_nondeterminism
from seedreg.nondeterminism import checksum

from .conftest import run_python


class Urandom(torch.nn.Module):
    """Adds noise the seeds cannot reach: os.urandom."""

    def forward(self, x):
        noise = torch.from_numpy(np.frombuffer(os.urandom(4 * x.numel()), dtype=np.uint32).astype(np.float32) / 2**32)
        return x + 1e-3 * noise.reshape(x.shape)


def model(noisy):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 8), torch.nn.Dropout(0.5)] + ([Urandom()] if noisy else []) + [torch.nn.ReLU(), torch.nn.Linear(8, 2)]
    return torch.nn.Sequential(*layers)


def step(m, x):
    return lambda: m(x).square().sum().backward()


def test_checksum_is_exact():
    a = torch.randn(5, 3)
    flipped = a.clone()
    flipped.view(torch.int32)[2, 1] ^= 1  # one bit
    assert checksum(a) == checksum(a.clone()) and checksum(a) != checksum(flipped)
    assert checksum(a) != checksum(a.flip(0)) and checksum(torch.tensor([0.0])) != checksum(torch.tensor([-0.0]))
    assert checksum(torch.zeros(3, dtype=torch.float16)) != checksum(torch.zeros(3, dtype=torch.float32))
    assert checksum(torch.ones(3, dtype=torch.uint8))[2] == 3 * 0 + 0x010101 and checksum(torch.empty(0))[2:] == (0, 0)


def test_names_the_noisy_module_and_none_without_it():
    x = torch.randn(4, 6)
    m = model(noisy=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    report = find_nondeterminism(m, step(m, x))
    assert report is not None and report["module"] == "2" and report["kind"] == "forward" and report["run"] == 1
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()) and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in m.parameters())  # restored as found
    clean = model(noisy=False)  # dropout draws from torch's generator: restored before each run
    assert find_nondeterminism(clean, step(clean, x), runs=3) is None


def test_bad_arguments():
    m = model(noisy=False)
    with pytest.raises(ValueError, match="`runs` must be an int >= 2"):
        find_nondeterminism(m, step(m, torch.randn(2, 6)), runs=1)
    with pytest.raises(TypeError, match="`step_fn` must be callable"):
        find_nondeterminism(m, None)
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        find_nondeterminism(object(), lambda: None)


FRESH = r"""
import os, numpy as np, torch
from seedreg import SeedSession, find_nondeterminism
s = SeedSession(3).setup()
class Urandom(torch.nn.Module):
    def forward(self, x):
        return x + torch.from_numpy(np.frombuffer(os.urandom(4 * x.numel()), dtype=np.int32).astype(np.float32).reshape(x.shape)) * 1e-9
m = s.build_model(lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), Urandom(), torch.nn.Linear(4, 1)), "net")
x = torch.randn(8, 4)
print("REPORT", find_nondeterminism(m, lambda: m(x).sum().backward()))
"""


@pytest.mark.slow
def test_in_a_fresh_process_with_a_session():
    out = run_python(["-c", FRESH]).stdout
    assert "REPORT {'module': '2', 'kind': 'forward', 'position': 6, 'run': 1, 'violations': []}" in out


@pytest.mark.cuda
def test_index_add_on_the_gpu_is_named():
    """index_add_ with float atomics on CUDA, deterministic algorithms off: the sum's order varies."""

    class Scatter(torch.nn.Module):
        def forward(self, x):
            idx = torch.randint(0, 4, (x.shape[0],), device=x.device, generator=torch.Generator(x.device).manual_seed(0))
            return torch.zeros(4, x.shape[1], device=x.device).index_add_(0, idx, x)

    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 256), Scatter(), torch.nn.Linear(256, 1)).cuda()
        x = torch.randn(200_000, 64, device="cuda")
        report = find_nondeterminism(m, lambda: m(x).sum().backward(), runs=5)
    finally:
        torch.use_deterministic_algorithms(det)
    assert report is not None and report["module"] == "1" and report["kind"] == "forward"


class Counted(torch.nn.Module):
    """A deterministic module that advances a non-persistent buffer each forward (a step counter)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 2)
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * self.calls


def test_restores_non_persistent_buffers_session_generators_and_optimizers():
    """A deterministic step over a non-persistent buffer, a session generator and Adam: no difference,
    and all three put back bit for bit (0.3 reported the buffer's module and left Adam 3 steps on)."""
    from seedreg import SeedSession

    s = SeedSession(0)
    torch.manual_seed(0)
    m = Counted()
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    noise = s.generator("noise")
    x = torch.randn(4, 6)

    def step_fn():
        opt.zero_grad()
        m(x + torch.randn(x.shape, generator=noise)).square().sum().backward()
        opt.step()

    step_fn()  # Adam has state: a step count and moments
    before_opt = {k: v.clone() for k, v in opt.state[m.fc.weight].items()}
    before_weight, before_calls, before_noise = m.fc.weight.detach().clone(), m.calls.clone(), noise.get_state()
    assert find_nondeterminism(m, step_fn, runs=3, optimizers=[opt]) is None
    assert torch.equal(m.calls, before_calls) and torch.equal(noise.get_state(), before_noise)
    assert torch.equal(m.fc.weight, before_weight)
    after_opt = opt.state[m.fc.weight]
    assert set(after_opt) == set(before_opt) and all(torch.equal(after_opt[k], before_opt[k]) for k in before_opt)
    # an optimizer that steps but was not given: its state cannot be put back, and it says so
    with pytest.warns(UserWarning, match="no optimizer was given.*optimizers=\\[optimizer\\]"):
        find_nondeterminism(m, step_fn)


def test_an_input_that_already_differs_is_blamed_on_the_data():
    """Random augmentation outside the model: each run receives other data. The model's input is the
    cause, not its first layer."""
    m = model(noisy=False)
    batches = iter([torch.randn(4, 6) for _ in range(3)])
    report = find_nondeterminism(m, lambda: m(next(batches)).sum().backward())
    assert report is not None and report["kind"] == "input" and report["module"] == "(model)", report

    class Parent(torch.nn.Module):  # a parent's own code between its submodules draws from os.urandom
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 2)

        def forward(self, x):
            return self.b(self.a(x) + float(os.urandom(1)[0]))

    p = Parent()
    report = find_nondeterminism(p, lambda: p(torch.ones(2, 6)).sum().backward(), runs=5)
    assert report is not None and (report["module"], report["kind"]) == ("b", "input"), report
