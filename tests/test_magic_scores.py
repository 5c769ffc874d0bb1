"""Score matrices for a whole test set from one training run: vector targets (k adjoints through one
reverse pass, in chunks) and `magic.train` runs asked for any number of targets without retraining."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pytest

from seedreg import magic

from .test_magic_loops import TEST, Net, Points, per_example, two_groups, Run

pytestmark = pytest.mark.slow


def vector_target(f):
    return F.cross_entropy(f(TEST.x[:4]), TEST.y[:4], reduction="none")  # 4 test examples


def scalar_target(j):
    return lambda f: F.cross_entropy(f(TEST.x[j : j + 1]), TEST.y[j : j + 1])


def trained() -> magic.Trained:
    _, model, loader, opt, _ = Run(two_groups).parts()
    return magic.train(model, loader, opt, epochs=2, loss=per_example)


def test_a_vector_target_equals_the_scalar_calls_row_by_row() -> None:
    """BatchNorm and dropout in the model, torch.optim.SGD with two groups; float64."""
    rows = Run(two_groups, target=vector_target).metagradient()[0]
    assert rows.grad.shape == (4, 24) and len(rows.target) == 4 and rows.stats["reverse_passes"] == 1
    for j in range(4):
        single = Run(two_groups, target=scalar_target(j)).metagradient()[0]
        assert torch.allclose(rows.grad[j], single.grad, rtol=1e-9, atol=1e-12), j
        assert abs(rows.target[j] - single.target) < 1e-12
    chunked = trained().metagradient(vector_target, chunk=3)
    assert chunked.stats["reverse_passes"] == 2 and torch.allclose(chunked.grad, rows.grad, rtol=1e-9, atol=1e-12)


def test_a_trained_run_answers_any_target_as_fresh_calls_do() -> None:
    run = trained()
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert run.stats["trained"] is True
    for j in (0, 3):
        again = run.metagradient(scalar_target(j))
        fresh = Run(two_groups, target=scalar_target(j)).metagradient()[0]
        assert torch.equal(again.grad, fresh.grad) and again.target == fresh.target
        # the run is left trained: the same weights after every call
        assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in weights.items())
    many = run.metagradient(lambda f: F.cross_entropy(f(TEST.x), TEST.y, reduction="none"))
    assert many.grad.shape == (5, 24) and many.stats["reverse_passes"] == 1  # 5 targets, one reverse pass
    with pytest.raises(ValueError, match="`chunk` must be an int >= 1"):
        run.metagradient(vector_target, chunk=0)


# -- stores: one training run, reused by other processes ---------------------------------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from .conftest import SCRIPTS, child_env, run_python  # noqa: E402


def stored(store, *flags, code=0):
    proc = run_python([SCRIPTS / "magic_store.py", store, *flags], check=False)
    assert proc.returncode == code, proc.stdout + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]) if code in (0, 3) else None


def test_a_store_is_reused_by_another_process_without_training_and_refused_for_another_run(tmp_path) -> None:
    first = stored(tmp_path / "run")
    assert first["trained"] is True and first["calls"] > 0
    again = stored(tmp_path / "run")  # a fresh process: the same definition
    assert again["trained"] is False
    assert (again["weights"], again["grad"]) == (first["weights"], first["grad"])  # the same bits
    assert again["calls"] < first["calls"]  # only the reverse pass ran the step
    other = stored(tmp_path / "run", "--lr", "0.2", code=3)["error"]
    assert "holds another run: optimizer.groups[0].lr: 0.15 (stored) != 0.2" in other


def test_a_run_killed_while_training_is_trained_again_and_a_second_trainer_is_told(tmp_path) -> None:
    stored(tmp_path / "run", "--die-after", "5", code=-9)
    status = json.loads((tmp_path / "run" / "seedreg-magic-run.json").read_text())["status"]
    assert status == "training"
    whole = stored(tmp_path / "whole")
    again = stored(tmp_path / "run")  # the killed process is gone: its lock is stale, the run trains
    assert again["trained"] is True and (again["weights"], again["grad"]) == (whole["weights"], whole["grad"])
    go = tmp_path / "go"  # the busy trainer holds its first step until the second has been told
    slow = subprocess.Popen([sys.executable, SCRIPTS / "magic_store.py", tmp_path / "busy", "--wait-for", go],
                            env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        import time

        deadline = time.monotonic() + 120
        while not (tmp_path / "busy" / "training.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        told = stored(tmp_path / "busy", code=3)["error"]
        assert "is training the run" in told and "call magic.train again when it has finished" in told
    finally:
        go.touch()
        slow.wait(120)
    assert json.loads(slow.stdout.read().strip().splitlines()[-1])["trained"] is True
    assert stored(tmp_path / "busy")["trained"] is False


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_training_lock_seedreg_did_not_write_is_never_removed(tmp_path, kind) -> None:
    """A user's own `training.lock` (or a link by that name) in the store folder: refused by name, kept."""
    from seedreg import StateError

    store = tmp_path / "run"
    store.mkdir()
    lock = store / "training.lock"
    mine = tmp_path / "mine.txt"
    mine.write_text("my notes")
    if kind == "file":
        lock.write_text("my own lock, not seedreg's")
    else:
        lock.symlink_to(mine)
    _, model, loader, opt, _ = Run(two_groups).parts()
    with pytest.raises(StateError, match="is not a training lock seedreg wrote"):
        magic.train(model, loader, opt, epochs=1, loss=per_example, store=store)
    assert lock.is_symlink() if kind == "link" else lock.read_text() == "my own lock, not seedreg's"
    assert mine.read_text() == "my notes"
