"""MAGIC-ready replay: batches by step, example weights, checkpoint schedules, reverse passes."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seedreg import SeedregError, SeedSession, StepCheckpoints, fingerprint
from seedreg.demo import TinyCNN, ToyImages

from .conftest import ROOT, run_python


class TestBatchesByStep:
    def test_batch_at_equals_iteration_for_3_epochs_with_workers_and_augmentation(self):
        s = SeedSession(4).setup()
        loader = s.build_dataloader(ToyImages(36), "d", batch_size=8, shuffle=True, num_workers=2, with_indices=True)
        seen = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            seen += list(loader)
        assert len(seen) == 3 * len(loader)
        before = torch.get_rng_state()
        for step, (indices, (x, y)) in enumerate(seen):
            i2, (x2, y2) = loader.batch_at(step)
            assert torch.equal(indices, i2) and x.numpy().tobytes() == x2.numpy().tobytes() and torch.equal(y, y2)
        assert torch.equal(torch.get_rng_state(), before)  # random access draws nothing from the global streams
        assert [b.tolist() for b in loader.batch_indices(1)] == [i.tolist() for i, _ in seen[len(loader) : 2 * len(loader)]]

    def test_indices_are_the_dataset_indices(self):
        data = torch.arange(20.0)[:, None]
        loader = SeedSession(1).setup().build_dataloader(data, "d", batch_size=6, shuffle=True, with_indices=True)
        for indices, batch in loader:
            assert indices.dtype == torch.long and torch.equal(batch[:, 0], indices.double().float())

    def test_weights(self):
        data = torch.arange(10.0)[:, None]
        mask = np.zeros(10, dtype=bool)
        mask[[1, 2, 3]] = True
        s = SeedSession(1).setup()
        _, w = next(iter(s.build_dataloader(data, "d", batch_size=10, subset=mask, subset_mode="weight")))
        assert w.dtype == torch.float32 and w.tolist() == [float(m) for m in mask]
        ew = torch.linspace(0, 1, 10, dtype=torch.float64, requires_grad=True)
        indices, batch, weights = next(iter(s.build_dataloader(data, "d2", batch_size=4, shuffle=True, with_indices=True, example_weights=ew)))
        assert torch.equal(weights, ew[indices].detach()) and weights.requires_grad
        (weights * batch[:, 0]).sum().backward()
        assert ew.grad[indices].tolist() == batch[:, 0].double().tolist()

    def test_bad_input(self):
        s = SeedSession(1).setup()
        data = torch.zeros(10, 2)
        with pytest.raises(ValueError, match=r"`example_weights`.*shape \(10,\)"):
            s.build_dataloader(data, example_weights=torch.ones(9))
        with pytest.raises(ValueError, match="`example_weights`.*floating"):
            s.build_dataloader(data, example_weights=torch.ones(10, dtype=torch.long))
        with pytest.raises(TypeError, match="`collate_fn` must be callable"):
            s.build_dataloader(data, with_indices=True, collate_fn=3)
        with pytest.raises(SeedregError, match="seed_per_example=True"):
            s.build_dataloader(data, seed_per_example=False).batch_at(0)


class Scaler:
    """A GradScaler-like extra: a scale that changes every step and must be restored."""

    def __init__(self):
        self.scale = 1024.0

    def update(self):
        self.scale *= 0.5 if self.scale > 100 else 3.0

    def state_dict(self):
        return {"scale": self.scale}

    def load_state_dict(self, state):
        self.scale = state["scale"]


def _setup(tmp_path=None, schedule="uniform", every=3, steps=None, workers=0):
    s = SeedSession(9).setup()
    model = s.build_model(TinyCNN, "m")
    opt = s.build_optimizer(torch.optim.SGD, model.parameters(), "m", lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    scaler = Scaler()
    loader = s.build_dataloader(ToyImages(40), "train", batch_size=8, shuffle=True, num_workers=workers)
    ckpt = StepCheckpoints(s, model, opt, loader, schedule=schedule, every=every if schedule == "uniform" else None,
                           steps=steps, extra=[sched, scaler], store=tmp_path)

    def step_fn(step, indices, batch):
        x, y = batch
        model.train()
        opt.zero_grad()
        (F.cross_entropy(model(x), y) * scaler.scale / scaler.scale).backward()
        opt.step()
        sched.step()
        scaler.update()

    return s, model, loader, ckpt, step_fn


def _train(model, loader, ckpt, step_fn, epochs=3):
    before, after = {}, {}
    ckpt.maybe_save(0)
    step = 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            before[step] = fingerprint(model)
            step_fn(step, None, batch)
            after[step] = fingerprint(model)
            step += 1
            ckpt.maybe_save(step)
    return before, after


class TestReplay:
    @pytest.mark.parametrize("on_disk", [False, True])
    def test_every_step_replays_bitwise_with_scheduler_and_scaler(self, tmp_path, on_disk):
        s, model, loader, ckpt, step_fn = _setup(tmp_path / "store" if on_disk else None, workers=2)
        _, after = _train(model, loader, ckpt, step_fn)
        for t in range(len(after)):
            torch.rand(3), np.random.rand()  # disturb the global generators
            ckpt.replay(t, step_fn)
            assert fingerprint(model) == after[t], t
        if on_disk:
            files = sorted(p.name for p in (tmp_path / "store").iterdir())
            assert files == sorted([f"step-{t}{ext}" for t in ckpt.saved for ext in (".json", ".pt")] + ["seedreg-store.json"])

    def test_on_disk_and_in_memory_give_the_same_replay(self, tmp_path):
        results = []
        for store in (None, tmp_path / "store"):
            s, model, loader, ckpt, step_fn = _setup(store)
            _train(model, loader, ckpt, step_fn)
            ckpt.replay(7, step_fn)
            results.append(fingerprint(model))
        assert results[0] == results[1]

    def test_the_loader_continues_at_the_next_step(self):
        s, model, loader, ckpt, step_fn = _setup()
        _, after = _train(model, loader, ckpt, step_fn)
        ckpt.replay(6, step_fn)  # step 6 is the second batch of epoch 1 (5 batches an epoch)
        x, y = next(iter(loader))
        x7, y7 = loader.batch_at(7)
        assert torch.equal(x, x7) and torch.equal(y, y7)
        step_fn(7, None, (x, y))
        assert fingerprint(model) == after[7]

    def test_state_before(self):
        s, model, loader, ckpt, step_fn = _setup()
        before, _ = _train(model, loader, ckpt, step_fn)
        for t in (0, 4, 11):
            ckpt.state_before(t, step_fn)
            assert fingerprint(model) == before[t]

    @pytest.mark.parametrize("schedule", ["uniform", "sqrt", "log"])
    def test_reverse_visits_every_step_with_the_state_before_it(self, schedule):
        steps = 15
        s, model, loader, ckpt, step_fn = _setup(schedule=schedule, steps=steps)
        before, _ = _train(model, loader, ckpt, step_fn)
        visited = []

        def visit(step, indices, batch):
            visited.append((step, fingerprint(model)))
            model.head.weight.data.add_(1.0)  # a visit may leave the state as it likes

        ckpt.reverse(visit, forward=step_fn)
        assert visited == [(t, before[t]) for t in reversed(range(steps))]
        bound = {"uniform": len(ckpt.saved) + 3, "sqrt": 2 * math.ceil(math.sqrt(steps)), "log": math.log2(steps) + 2}[schedule]
        assert ckpt.peak_states <= bound

    def test_bad_input(self, tmp_path):
        s, model, loader, ckpt, step_fn = _setup()
        _train(model, loader, ckpt, step_fn, epochs=1)
        for t in (-1, 5, 2.0):
            with pytest.raises(ValueError, match=r"`step` must be a step that was run.*\[0, 4\]"):
                ckpt.replay(t, step_fn)
        with pytest.raises(ValueError, match="needs `steps`"):
            StepCheckpoints(s, model, None, loader, schedule="sqrt")
        with pytest.raises(TypeError, match=r"`extra\[0\]`.*state_dict"):
            StepCheckpoints(s, model, None, loader, every=2, extra=[object()])
        (tmp_path / "file").write_text("x")
        with pytest.raises(ValueError, match="`store`.*is a file"):
            StepCheckpoints(s, model, None, loader, every=2, store=tmp_path / "file")


@pytest.mark.slow
def test_metagradient_example_matches_unrolled_autograd():
    out = run_python([ROOT / "examples/magic_metagradient.py", "--schedule", "sqrt"]).stdout
    diff = float(re.search(r"max relative difference (\S+)", out).group(1))
    assert diff <= 1e-4 and "metagradient OK" in out
    lds = float(re.search(r"single-model LDS of the metagradient over \d+ leave-\d+-out retrains: (\S+)", out).group(1))
    assert lds >= 0.8


@pytest.mark.slow
def test_magic_lds_example_on_digits(tmp_path):
    """The real-data example, small: it prints a cost ratio and an LDS per drop fraction, and the scatter."""
    pytest.importorskip("sklearn", reason="the examples extra: pip install -e \".[examples]\"")
    pytest.importorskip("matplotlib", reason="the examples extra: pip install -e \".[examples]\"")
    out = run_python([ROOT / "examples/magic_lds.py", "--targets", "1", "--subsets", "8", "--plot", tmp_path / "s.png"]).stdout
    assert re.search(r"metagradient: \S+ s a target, \S+x one training run", out)
    for fraction in ("1%", "5%"):
        lds = float(re.search(rf"single-model LDS at a {fraction} drop over 8 retrains and 1 test images: (\S+)", out).group(1))
        assert lds >= 0.5, (fraction, lds)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_accumulation_and_two_optimizers_replay_every_step():
    """Gradients accumulated over two steps and two optimizers (SGD for the body, Adam for the
    head): every step replays to the same weights and the same .grad, with no extras."""
    s = SeedSession(9).setup()
    model = s.build_model(TinyCNN, "m")
    head = list(model.head.parameters())
    body = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    sgd = torch.optim.SGD(body, lr=0.05, momentum=0.9)
    adam = torch.optim.Adam(head, lr=1e-3)
    loader = s.build_dataloader(ToyImages(40), "train", batch_size=8, shuffle=True)
    ckpt = StepCheckpoints(s, model, [sgd, adam], loader, every=3)

    def step_fn(step, indices, batch):
        x, y = batch
        F.cross_entropy(model(x), y).backward()  # accumulates into .grad
        if step % 2 == 1:
            sgd.step()
            adam.step()
            sgd.zero_grad()
            adam.zero_grad()

    def grads():
        return [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    after = {}
    ckpt.maybe_save(0)
    for step, batch in enumerate(loader):
        step_fn(step, None, batch)
        after[step] = (fingerprint(model), grads())
        ckpt.maybe_save(step + 1)
    for t in range(len(after)):
        ckpt.replay(t, step_fn)
        assert fingerprint(model) == after[t][0], t
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads(), after[t][1])), t
    with pytest.raises(TypeError, match=r"`optimizer\[1\]` \(int\) has no state_dict"):
        StepCheckpoints(s, model, [sgd, 5], loader, every=3)


# -- stores that cannot be mixed up ------------------------------------------------------------------------


def _stored(store, lr=0.05, **kw):
    """A short run with its states on disk; returns (checkpoints, step_fn, weights after step 5)."""
    s = SeedSession(9).setup()
    model = s.build_model(TinyCNN, "m")
    opt = s.build_optimizer(torch.optim.SGD, model.parameters(), "m", lr=lr, momentum=0.9)
    loader = s.build_dataloader(ToyImages(40), "train", batch_size=8, shuffle=True)
    ckpt = StepCheckpoints(s, model, opt, loader, every=3, store=store, **kw)

    def step_fn(step, indices, batch):
        x, y = batch
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    _, after = _train(model, loader, ckpt, step_fn, epochs=2)
    return ckpt, step_fn, model, after


def test_a_second_run_refuses_a_store_unless_told_to_overwrite(tmp_path):
    """An lr sweep given one store: the second run is refused (replaying the first would silently
    start from the second's states); with overwrite=True it takes the store, and the first run's
    reads are refused as another run's."""
    from seedreg import StateError

    first, step_fn, model, after = _stored(tmp_path)
    with pytest.raises(StateError, match="another run.*overwrite=True"):
        _stored(tmp_path, lr=0.1)
    first.replay(5, step_fn)
    assert fingerprint(model) == after[5]
    _stored(tmp_path, lr=0.1, overwrite=True)
    with pytest.raises(StateError, match=r"step-3.json \(the state of step 3\) belongs to another run"):
        first.replay(5, step_fn)


@pytest.mark.parametrize("damage,message", [
    ("swap", "holds the state of step 6"),
    ("replace-tensors", "does not match the digest"),
    ("truncate-json", "cannot be read"),
    ("delete-tensors", "cannot be read: no manifest there"),
    ("deep-json", "cannot be read"),
])
def test_a_damaged_or_swapped_state_file_is_refused_before_anything_is_restored(tmp_path, damage, message):
    from seedreg import StateError

    ckpt, step_fn, model, after = _stored(tmp_path)
    store = tmp_path
    if damage == "swap":
        a, b = (store / "step-3.json").read_bytes(), (store / "step-6.json").read_bytes()
        (store / "step-3.json").write_bytes(b)
        (store / "step-6.json").write_bytes(a)
    elif damage == "replace-tensors":  # a file with the right shapes: step 6's tensors as step 3's
        (store / "step-3.pt").write_bytes((store / "step-6.pt").read_bytes())
    elif damage == "truncate-json":
        (store / "step-3.json").write_bytes((store / "step-3.json").read_bytes()[:50])
    elif damage == "delete-tensors":
        (store / "step-3.pt").unlink()
    else:
        (store / "step-3.json").write_text("[" * 200_000 + "]" * 200_000)
    before = fingerprint(model)
    with pytest.raises(StateError) as info:
        ckpt.replay(4, step_fn)
    assert message in str(info.value) and "step 3" in str(info.value), str(info.value)
    assert fingerprint(model) == before
