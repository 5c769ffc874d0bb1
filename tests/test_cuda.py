"""CUDA paths. Marked `cuda`: skipped cleanly on machines without a GPU (CI has none)."""

import json

import pytest
import torch

from seedreg import SeedSession
from seedreg.rng import capture_global, decode_global, restore_global

from .conftest import run_python

pytestmark = pytest.mark.cuda


def test_fork_covers_the_current_cuda_device():
    torch.cuda.init()
    torch.cuda.manual_seed(0)
    before = torch.cuda.get_rng_state()
    s = SeedSession(1)
    with s.fork("noise"):
        a = torch.rand(4, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)
    with s.fork("noise"):
        assert torch.equal(torch.rand(4, device="cuda"), a)


def test_fork_explicit_devices():
    s = SeedSession(1)
    with s.fork("noise", devices=[0]):
        a = torch.rand(2, device="cuda:0")
    with s.fork("noise", devices=[0]):
        assert torch.equal(torch.rand(2, device="cuda:0"), a)


def test_global_state_includes_cuda_and_round_trips():
    torch.rand(1, device="cuda")
    state = json.loads(json.dumps(capture_global()))
    assert "0" in state["cuda"]
    expected = torch.rand(3, device="cuda")
    restore_global(decode_global(state))
    assert torch.equal(torch.rand(3, device="cuda"), expected)


def test_generator_on_cuda():
    s = SeedSession(2)
    assert torch.equal(torch.rand(3, device="cuda", generator=s.generator("g", device="cuda")),
                       torch.rand(3, device="cuda", generator=s.generator("g", device="cuda")))


def test_setup_before_cuda_sets_cublas_and_records_no_violation():
    code = (
        "import os, torch; from seedreg import SeedSession; s = SeedSession(1).setup(); torch.ones(2, device='cuda') @ torch.ones(2, device='cuda');"
        "print(os.environ['CUBLAS_WORKSPACE_CONFIG'], len(s.violations), torch.backends.cudnn.deterministic)"
    )
    assert run_python(["-c", code]).stdout.split() == [":4096:8", "0", "True"]


def test_setup_after_cuda_init_warns_and_records():
    code = (
        "import torch, warnings; torch.ones(1, device='cuda'); from seedreg import SeedSession;"
        "s = SeedSession(1).setup(); print([v['kind'] for v in s.violations])"
    )
    assert "cublas_late" in run_python(["-c", code]).stdout


def test_two_processes_bitwise_on_cuda(tmp_path):
    code = (
        "import sys, torch, torch.nn.functional as F; from seedreg import SeedSession, fingerprint; from seedreg.demo import TinyCNN, ToyImages\n"
        "s = SeedSession(7).setup(); m = s.build_model(TinyCNN, 't').cuda(); o = s.build_optimizer(torch.optim.SGD, m.parameters(), 't', lr=0.05)\n"
        "loader = s.build_dataloader(ToyImages(128), 't', batch_size=32, shuffle=True, num_workers=2)\n"
        "for e in range(2):\n"
        "    for x, y in loader:\n"
        "        o.zero_grad(); F.cross_entropy(m(x.cuda()), y.cuda()).backward(); o.step()\n"
        "print(fingerprint(m))"
    )
    a, b = (run_python(["-c", code]).stdout for _ in range(2))
    assert a == b and a.startswith("sha256:")


def test_fingerprints_on_the_gpu_equal_those_of_the_same_bytes_on_the_cpu():
    from seedreg.nondeterminism import checksums

    g = torch.Generator().manual_seed(0)
    cpu = [torch.randn(n, generator=g) for n in (1, 5, 70_000, 5_000_000)] + [torch.arange(7, dtype=torch.int16)]
    gpu = [t.cuda() for t in cpu]
    on_gpu = checksums(gpu)
    assert on_gpu.device.type == "cuda"
    assert on_gpu.cpu().tolist() == checksums(cpu).tolist()


def test_a_traced_gpu_model_replays_with_no_divergence(tmp_path):
    def run(session):
        session.setup()
        model = session.build_model(torch.nn.Linear, "m", in_features=64, out_features=8).cuda()
        opt = session.build_optimizer(torch.optim.SGD, model.parameters(), "m", lr=0.1)
        trace = session.trace(model)
        gen = session.generator("data", device="cuda")
        for step in range(5):
            x = torch.randn(32, 64, device="cuda", generator=gen)
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            trace.step(step, loss=loss)
        return session

    path = run(SeedSession(3)).dump(tmp_path / "m.json")
    report = run(SeedSession.from_manifest(path)).replay_report()
    assert report["first_divergence"] is None and report["verdict"] == "bitwise", report["reasons"]


def test_a_metagradient_on_cuda_is_bitwise_across_processes_with_states_on_the_host_or_the_device():
    """TinyCNN (BatchNorm, dropout) on the GPU in deterministic mode, 8 test examples as one vector
    target: two fresh processes give the same bits, and so do host-offloaded and device-kept states."""
    from .conftest import SCRIPTS

    runs = [json.loads(run_python([SCRIPTS / "magic_cuda.py"]).stdout.strip().splitlines()[-1]) for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0]["host"] == runs[0]["device"]
    assert runs[0]["host"]["shape"] == [8, 64] and runs[0]["host"]["device"].startswith("cuda")
