"""torch.distributed: 2 gloo processes on the CPU, launched with torchrun, under DDP."""

import json
import socket

import pytest

from seedreg import Manifest, SeedSession

from .conftest import ROOT, run_python

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Failures of the launch itself, not of seedreg: the picked port taken by another job before
# torchrun binds it, and gloo aborting a process in teardown ("terminate called without an active
# exception", seen once in about 20 loaded runs, with two test suites sharing 2 cores).
_PORT_TROUBLE = ("address already in use", "eaddrinuse", "distnetworkerror", "failed to bind", "connection refused",
                 "terminate called without an active exception")


def launch(out, *flags):
    """torchrun --nproc-per-node 2 examples/ddp_train.py; every collective has a 60 s timeout.

    The rendezvous port is picked free, then bound by torchrun a moment later; another job on the
    machine can take it in between, so a launch that fails on the port (or in gloo's teardown) is
    tried again on another.
    """
    for attempt in range(3):
        proc = run_python(
            ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
             ROOT / "examples/ddp_train.py", "--out", out, *flags],
            timeout=240,
            check=False,
        )
        if proc.returncode == 0:
            return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        if attempt == 2 or not any(p in proc.stderr.lower() for p in _PORT_TROUBLE):
            raise AssertionError(f"torchrun exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def first_launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, launch(out / "a", "--save-at", "5")


def test_ranks_agree_where_they_must_and_differ_where_they_must(first_launch):
    _, (r0, r1) = first_launch
    assert r0["initial"] == r1["initial"]  # same initial weights, even without DDP's broadcast
    assert r0["params"] == r1["params"]  # DDP kept the parameters in sync
    assert r0["probe"] != r1["probe"]  # dropout differs across ranks
    for e in range(2):
        a, b = set(r0["seen"][e]), set(r1["seen"][e])
        assert not a & b and a | b == set(range(128))  # disjoint shards covering the data
    assert r0["seen"][0] != r0["seen"][1]


def test_one_manifest_for_the_job(first_launch):
    out, _ = first_launch
    m = Manifest.load(out / "a" / "manifest.json")
    assert m.world_size == 2 and len(m.ranks) == 2
    shared = {(r.purpose, r.seed) for r in m.ranks[0] if r.kind != "rank_seed"}
    assert shared == {(r.purpose, r.seed) for r in m.ranks[1] if r.kind != "rank_seed"}
    rank_seeds = [[r.seed for r in rank if r.kind == "rank_seed"] for rank in m.ranks]
    assert rank_seeds[0] != rank_seeds[1]


def test_second_launch_is_bitwise_identical(first_launch, tmp_path):
    _, (a0, _) = first_launch
    b0, b1 = launch(tmp_path / "b")
    assert b0["final"] == a0["final"] and b1["final"] == first_launch[1][1]["final"]


def test_resume_after_restarting_both_ranks(first_launch, tmp_path):
    out, (a0, a1) = first_launch
    r0, r1 = launch(tmp_path / "resumed", "--resume", str(out / "a" / "ckpt"))
    assert r0["final"] == a0["final"] and r1["final"] == a1["final"]


def test_replay_from_the_job_manifest(first_launch, tmp_path):
    out, (a0, _) = first_launch
    r0, _ = launch(tmp_path / "replayed", "--replay", str(out / "a" / "manifest.json"))
    assert r0["final"] == a0["final"]
    assert Manifest.load(tmp_path / "replayed" / "manifest.json").replay["verdict"] == "bitwise"


def test_rank_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    s = SeedSession(3).setup()
    assert (s.rank, s.world_size) == (1, 4)
    loader = s.build_dataloader(list(range(10)), batch_size=None)
    assert loader.sampler.num_replicas == 4 and loader.sampler.rank == 1 and len(loader.sampler) == 3
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        SeedSession(3).setup()


def test_resume_on_another_world_size_refused(monkeypatch):
    from seedreg import StateError

    state = SeedSession(3, rank=0, world_size=2).setup().state_dict()
    with pytest.raises(StateError, match="world_size"):
        SeedSession(3, rank=0, world_size=1).setup().load_state_dict(state)


def test_dump_without_process_group_refused(tmp_path):
    from seedreg import SeedregError

    with pytest.raises(SeedregError, match="collective"):
        SeedSession(3, rank=0, world_size=2).setup().dump(tmp_path / "m.json")
