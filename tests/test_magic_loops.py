"""magic.metagradient on the training loops researchers write (torch.optim with param groups, frozen
parameters, scheduler objects, clipping, accumulation, dict batches, attention), each checked
against its definition: central finite differences of a plain torch.optim loop over an
`example_weights=` loader, each side a whole retraining, in float64."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F

from seedreg import SeedregError, SeedSession, magic

pytestmark = pytest.mark.slow

N, FEATURES, CLASSES, BATCH, EPOCHS = 24, 5, 3, 6, 2


class Points(torch.utils.data.Dataset):
    """Generated points, jittered per example from torch's global generator (replayed exactly)."""

    def __init__(self, n: int = N, seed: int = 0, as_dict: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, FEATURES, generator=g, dtype=torch.float64)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).long() + (self.x[:, 2] > 1).long()
        self.as_dict = as_dict

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Any:
        x = self.x[i] + 0.05 * torch.randn(FEATURES, dtype=torch.float64)
        return {"inputs": x, "labels": self.y[i], "note": i} if self.as_dict else (x, self.y[i])


class Net(torch.nn.Module):
    """An MLP with BatchNorm (frozen affine parameters, running statistics that update) and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(FEATURES, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.fc2 = torch.nn.Linear(8, CLASSES)
        self.norm.weight.requires_grad_(False)
        self.norm.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(torch.tanh(self.norm(self.fc1(x))), 0.2, self.training))


TEST = Points(5, seed=1)


def per_example(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def dict_losses(model: torch.nn.Module, batch: Dict[str, Any]) -> torch.Tensor:
    return F.cross_entropy(model(batch["inputs"]), batch["labels"], reduction="none")


def target_of(f: Callable[..., Any]) -> torch.Tensor:
    return F.cross_entropy(f(TEST.x), TEST.y)


def two_groups(model: Net) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": model.fc1.parameters(), "lr": 0.15, "momentum": 0.9, "weight_decay": 1e-3},
                            {"params": model.fc2.parameters(), "lr": 0.05, "momentum": 0.5, "nesterov": True}], lr=0.1)


def adamw(model: Net) -> torch.optim.Optimizer:
    decay = [model.fc1.weight, model.fc2.weight]
    rest = [model.fc1.bias, model.fc2.bias]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=0.01,
                             betas=(0.85, 0.99))


def one_cycle(opt: torch.optim.Optimizer, steps: int) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.03, total_steps=steps, cycle_momentum=True,
                                               base_momentum=0.8, max_momentum=0.9)


class Run:
    """One configuration: how to build the model, optimizer and scheduler, and the loop's options."""

    def __init__(self, optimizer: Callable[[Any], Any], *, scheduler: Optional[Callable[[Any, int], Any]] = None,
                 max_grad_norm: Optional[float] = None, accumulate: int = 1, as_dict: bool = False,
                 model: Callable[[], torch.nn.Module] = Net, data: Callable[..., Any] = Points,
                 losses: Optional[Callable[..., Any]] = None, target: Callable[..., Any] = target_of) -> None:
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm
        self.accumulate, self.as_dict, self.model, self.data = accumulate, as_dict, model, data
        self.losses = losses or (dict_losses if as_dict else (lambda m, b: per_example(m(b[0]), b[1])))
        self.target = target

    def parts(self, weights: Optional[torch.Tensor] = None) -> Any:
        s = SeedSession(7).setup()
        model = s.build_model(self.model, "net").double()
        kw = {} if weights is None else {"example_weights": weights}
        dataset = self.data(as_dict=True) if self.as_dict else self.data()
        loader = s.build_dataloader(dataset, "train", batch_size=BATCH, shuffle=True, **kw)
        opt = self.optimizer(model)
        steps = EPOCHS * math.ceil(len(loader) / self.accumulate)
        sched = self.scheduler(opt, steps) if self.scheduler else None
        return s, model, loader, opt, sched

    def metagradient(self, schedule: str = "sqrt") -> Any:
        _, model, loader, opt, sched = self.parts()
        extra = {"example_losses": dict_losses} if self.as_dict else {"loss": per_example}
        if self.model is not Net:
            extra = {"example_losses": self.losses}
        result = magic.metagradient(model, loader, opt, epochs=EPOCHS, target=self.target, scheduler=sched,
                                    max_grad_norm=self.max_grad_norm, accumulate=self.accumulate, schedule=schedule,
                                    **extra)
        return result, opt, sched

    def retrain(self, weights: Optional[torch.Tensor] = None) -> Any:
        """The plain loop: zero_grad, backward of each micro-batch's mean loss / accumulate, clip,
        step, scheduler step."""
        if weights is None:
            weights = torch.ones(N, dtype=torch.float64)
        _, model, loader, opt, sched = self.parts(weights)
        per_epoch = len(loader)
        for epoch in range(EPOCHS):
            loader.set_epoch(epoch)
            for j, (batch, w) in enumerate(loader):
                if j % self.accumulate == 0:
                    opt.zero_grad()
                ((w * self.losses(model, batch)).mean() / self.accumulate).backward()
                if j % self.accumulate == self.accumulate - 1 or j == per_epoch - 1:
                    if self.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], self.max_grad_norm)
                    opt.step()
                    if sched is not None:
                        sched.step()
        model.eval()
        with torch.no_grad():
            value = self.target(model).item()
        return model, value, opt, sched

    def finite_difference(self, i: int, h: float = 1e-5) -> float:
        values = []
        for sign in (1, -1):
            w = torch.ones(N, dtype=torch.float64)
            w[i] += sign * h
            values.append(self.retrain(w)[1])
        return (values[0] - values[1]) / (2 * h)


def check_against_finite_differences(run: Run, tolerance: float, entries: int = 3) -> Any:
    result, opt, sched = run.metagradient()
    largest = result.grad.abs().argsort(descending=True)[:entries].tolist()
    for i in largest:
        fd = run.finite_difference(i)
        assert abs(result.grad[i].item() - fd) <= tolerance * abs(fd), (i, result.grad[i].item(), fd)
    return result, opt, sched


def test_sgd_with_two_param_groups_and_frozen_batchnorm_affine_parameters() -> None:
    run = Run(two_groups)
    result, opt, _ = check_against_finite_differences(run, 1e-4)
    assert result.stats["graphs_kept"] is True  # each segment taken once, its graphs kept: it reproduced the run
    plain, value, plain_opt, _ = run.retrain()
    # the trained model is the plain loop's, bit for bit (torch.optim's own step trains it)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(result.model.state_dict()[name], tensor), name
    assert result.target == value
    fresh = Run(two_groups).parts()[1]
    assert torch.equal(result.model.norm.weight, fresh.norm.weight) and torch.equal(result.model.norm.bias, fresh.norm.bias)
    assert not torch.equal(result.model.norm.running_mean, fresh.norm.running_mean)  # the statistics did update
    # the optimizer is left as the loop leaves it: its momentum buffers
    for p, q in zip(result.model.parameters(), plain.parameters()):
        a, b = opt.state.get(p, {}).get("momentum_buffer"), plain_opt.state.get(q, {}).get("momentum_buffer")
        assert (a is None and b is None) or torch.equal(a, b)


def test_gradient_accumulation_over_two_batches() -> None:
    run = Run(two_groups, accumulate=2)
    result, _, _ = check_against_finite_differences(run, 1e-4)
    plain = run.retrain()[0]
    assert all(torch.equal(result.model.state_dict()[k], v) for k, v in plain.state_dict().items())


def test_accumulation_with_an_epochs_last_partial_group() -> None:
    """4 batches an epoch, 3 per optimizer step: each epoch steps after batches 3 and 4 (the partial group)."""
    run = Run(two_groups, accumulate=3)
    result, _, _ = check_against_finite_differences(run, 1e-4)
    plain = run.retrain()[0]
    assert all(torch.equal(result.model.state_dict()[k], v) for k, v in plain.state_dict().items())


def warm_adam(model: Net) -> torch.optim.Optimizer:
    """torch.optim.Adam (amsgrad) that has already stepped twice: its state (step counts, moments) is read."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True, weight_decay=1e-3)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(6, FEATURES, generator=g, dtype=torch.float64)).square().mean().backward()
        opt.step()
    return opt


def test_an_optimizer_that_has_stepped_before_is_read_with_its_state() -> None:
    run = Run(warm_adam)
    result, opt, _ = check_against_finite_differences(run, 3e-3)
    plain, _, plain_opt, _ = run.retrain()
    assert all(torch.equal(result.model.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert all(float(opt.state[p]["step"]) == float(plain_opt.state[q]["step"]) == 2 + EPOCHS * 4
               for p, q in zip(result.model.parameters(), plain.parameters()) if p.requires_grad)


def test_dict_batches_through_example_losses() -> None:
    check_against_finite_differences(Run(two_groups, as_dict=True), 1e-4)


def test_adamw_with_a_one_cycle_scheduler_object_and_clipping() -> None:
    run = Run(adamw, scheduler=one_cycle, max_grad_norm=0.5)
    result, opt, sched = check_against_finite_differences(run, 3e-3)
    plain, _, plain_opt, plain_sched = run.retrain()
    assert all(torch.equal(result.model.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert sched.state_dict()["last_epoch"] == plain_sched.state_dict()["last_epoch"]
    assert [g["betas"] for g in opt.param_groups] == [g["betas"] for g in plain_opt.param_groups]


class Tokens(torch.utils.data.Dataset):
    """Sequences of 6 token ids; the label is the parity of their sum."""

    def __init__(self, n: int = N, seed: int = 3, as_dict: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 11, (n, 6), generator=g)
        self.y = self.ids.sum(1) % 2

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Any:
        return self.ids[i], self.y[i]


class Encoder(torch.nn.Module):
    """Frozen token embeddings, a TransformerEncoderLayer (attention, dropout), a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.embed.weight.requires_grad_(False)
        self.layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(ids)).mean(1))


TOKENS_TEST = Tokens(4, seed=5)


def encoder_losses(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def encoder_target(f: Callable[..., Any]) -> torch.Tensor:
    return F.cross_entropy(f(TOKENS_TEST.ids), TOKENS_TEST.y)


def warmup(opt: torch.optim.Optimizer, steps: int) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 3))


def test_a_transformer_encoder_layer_with_frozen_embeddings_adamw_warmup_and_clipping() -> None:
    run = Run(lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.01), scheduler=warmup,
              max_grad_norm=1.0, model=Encoder, data=Tokens, losses=encoder_losses, target=encoder_target)
    result, _, _ = check_against_finite_differences(run, 3e-3)
    assert torch.equal(result.model.embed.weight, run.parts()[1].embed.weight)  # frozen: as built


def test_the_three_schedules_give_the_same_metagradient() -> None:
    """uniform (a state every step), sqrt (segments of sqrt(steps), each taken once with its graphs
    kept) and log (recomputed by bisection) differentiate the same run."""
    results = {schedule: Run(two_groups).metagradient(schedule)[0] for schedule in ("uniform", "sqrt", "log")}
    steps = results["sqrt"].stats["steps"]
    assert steps > math.ceil(math.sqrt(steps))  # more than one segment
    for schedule, result in results.items():
        assert torch.allclose(result.grad, results["sqrt"].grad, rtol=0, atol=1e-12), schedule
        assert result.target == results["sqrt"].target, schedule
        stats = result.stats  # where the reverse pass spent its time
        assert 0 < stats["seconds_replay"] and 0 < stats["seconds_vjp"], schedule
        assert stats["seconds_replay"] + stats["seconds_vjp"] <= stats["seconds_backward"], schedule
    assert results["uniform"].stats["graphs_kept"] is True and results["sqrt"].stats["graphs_kept"] is True
    assert results["uniform"].stats["states_kept"] == steps + 2  # every state, and one step's graph at a time


@pytest.mark.parametrize("schedule", ["sqrt", "uniform"])
def test_a_reverse_pass_whose_kept_steps_do_not_reproduce_the_run_recomputes_them_exactly(monkeypatch, schedule) -> None:
    """A model whose differentiated forward is not bit for bit its training forward (here: 1e-12 added
    when its parameters are swapped for copies): the kept segment is refused at its checkpoint, every
    step is recomputed from the restored state, and the result is that of the exact pass."""
    class Odd(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            return out if isinstance(self.fc1.weight, torch.nn.Parameter) else out + 1e-12

    result = Run(two_groups, model=Odd).metagradient(schedule)[0]
    assert result.stats["graphs_kept"] is False
    import sys

    monkeypatch.setattr(sys.modules["seedreg.magic.replayed"].RunCheckpoints, "kept_graphs", False)
    exact = Run(two_groups, model=Odd).metagradient(schedule)[0]
    assert torch.equal(result.grad, exact.grad)
    plain = Run(two_groups, model=Odd).retrain()[0]
    assert all(torch.equal(result.model.state_dict()[k], v) for k, v in plain.state_dict().items())


# -- what it says, and what it refuses ---------------------------------------------------------------


def test_a_target_that_ignores_the_model_has_an_exact_zero_metagradient() -> None:
    run = Run(two_groups, target=lambda f: torch.tensor(3.0, dtype=torch.float64))
    result, _, _ = run.metagradient()
    assert torch.equal(result.grad, torch.zeros(N, dtype=torch.float64)) and result.target == 3.0


def test_a_nan_in_one_training_example_is_named() -> None:
    class Broken(Points):
        def __getitem__(self, i: int) -> Any:
            x, y = super().__getitem__(i)
            return (x * float("nan"), y) if i == 11 else (x, y)

    with pytest.raises(SeedregError, match=r"not finite at step \d+ \(dataset indices \[11\] of that batch\)"):
        Run(two_groups, data=Broken).metagradient()


def test_autocast_to_bfloat16_inside_forward_needs_allow_low_precision() -> None:
    class Autocast(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return super().forward(x.float()).double()

    with pytest.raises(SeedregError, match="autocast to torch.bfloat16.*allow_low_precision=True"):
        Run(two_groups, model=Autocast).metagradient()


def test_batches_with_extras_need_example_losses_and_options_are_checked() -> None:
    class Extras(Points):
        def __getitem__(self, i: int) -> Any:
            return (*super().__getitem__(i), i)

    s, model, loader, opt, _ = Run(two_groups, data=Extras).parts()
    with pytest.raises(SeedregError, match=r"loader yields a list of 3; pass example_losses="):
        magic.metagradient(model, loader, opt, epochs=1, loss=per_example, target=target_of)
    kw: Dict[str, Any] = {"epochs": 1, "target": target_of, "loss": per_example}
    with pytest.raises(TypeError, match="exactly one of `loss`"):
        magic.metagradient(model, loader, opt, **{**kw, "example_losses": dict_losses})
    with pytest.raises(ValueError, match="`accumulate` must be an int >= 1"):
        magic.metagradient(model, loader, opt, **kw, accumulate=0)
    with pytest.raises(ValueError, match="`max_grad_norm` must be a finite float > 0"):
        magic.metagradient(model, loader, opt, **kw, max_grad_norm=-1.0)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="lr_scheduler built on `optimizer`"):
        magic.metagradient(model, loader, opt, **kw, scheduler=torch.optim.lr_scheduler.StepLR(other, 2))
    with pytest.raises(SeedregError, match=r"option\(s\) \['lr_decay'\]"):
        bad = torch.optim.SGD(model.parameters(), lr=0.1)
        bad.param_groups[0]["lr_decay"] = 0.5
        magic.metagradient(model, loader, bad, **kw)


def adam_per_parameter(steps: Any, params: Any, grads: Any, slots: Any, groups: Any) -> Any:
    """The oracle: torch.optim's Adam/AdamW math written a parameter at a time."""
    from seedreg.magic.optimizers import safe_sqrt

    n = len(params)
    firsts, seconds, maxima = list(slots[:n]), list(slots[n : 2 * n]), list(slots[2 * n :])
    new_params = list(params)
    for i, (p, g, h) in enumerate(zip(params, grads, groups)):
        if g is None:
            continue
        lr, (beta1, beta2), eps, wd = float(h["lr"]), h["betas"], h["eps"], h["weight_decay"]
        t = float(steps.optimizer.state.get(steps.params[i], {}).get("step", 0)) + 1
        g = -g if h["maximize"] else g
        if wd != 0:
            if h.get("decoupled_weight_decay", type(steps.optimizer) is torch.optim.AdamW):
                p = p * (1 - lr * wd)
            else:
                g = g + wd * p
        m = torch.zeros_like(p) if firsts[i] is None else firsts[i]
        v = torch.zeros_like(p) if seconds[i] is None else seconds[i]
        m = m + (1 - beta1) * (g - m)
        v = v * beta2 + (1 - beta2) * g * g
        firsts[i], seconds[i], second = m, v, v
        if h["amsgrad"]:
            second = maxima[i] = torch.maximum(torch.zeros_like(p) if maxima[i] is None else maxima[i], v)
        denom = safe_sqrt(second) / ((1 - beta2**t) ** 0.5) + eps
        new_params[i] = p - (lr / (1 - beta1**t)) * m / denom
    return new_params, firsts + seconds + maxima


@pytest.mark.parametrize("kind", ["adamw", "adam", "amsgrad-and-float32"])
def test_the_flat_adam_step_equals_the_per_parameter_step_and_its_derivatives(kind) -> None:
    """The differentiated Adam/AdamW step runs on one flat vector of all parameters (per dtype and
    device, per-element hyperparameters): its values and vector-Jacobian products equal the step
    taken a parameter at a time, with three param groups (maximize, other lr/betas/eps/weight
    decay, amsgrad in one), a parameter that had no gradient before (no state yet) and one without
    a gradient now."""
    from seedreg.magic.steps import TorchSteps

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)).double()
    if kind == "amsgrad-and-float32":
        model[2].float()
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    opt = cls([{"params": model[0].parameters(), "lr": 0.01, "weight_decay": 0.1, "betas": (0.9, 0.99),
                "amsgrad": kind == "amsgrad-and-float32"},
               {"params": model[1].parameters(), "lr": 0.02, "weight_decay": 0.0, "maximize": True, "eps": 1e-6},
               {"params": model[2].parameters(), "lr": 0.03, "weight_decay": 0.05, "betas": (0.8, 0.95)}])
    model[0](torch.randn(5, 4, dtype=torch.float64)).sum().backward()  # one step: state for model[0] only
    opt.step()
    steps = TorchSteps(opt, model)
    groups = [opt.param_groups[g] for g in steps.group_of]
    params = [torch.randn_like(p, requires_grad=True) for p in steps.params]
    grads = [None if i == 3 else torch.randn_like(p, requires_grad=True) for i, p in enumerate(steps.params)]  # model[1].bias: none
    slots = [None if s is None else (s + torch.rand_like(s)).requires_grad_() for s in steps.slots()]
    assert any(s is None for s in slots) and any(s is not None for s in slots)
    flat = steps.functional(params, grads, slots, 1)
    each = adam_per_parameter(steps, params, grads, slots, groups)
    outputs = [(a, b) for a, b in zip(flat[0] + flat[1], each[0] + each[1]) if b is not None and b.requires_grad]
    assert len(outputs) == len([a for a in flat[0] + flat[1] if a is not None and a.requires_grad])
    for a, b in outputs:
        tolerance = 1e-6 if a.dtype == torch.float32 else 1e-12
        assert a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a, b, rtol=tolerance, atol=tolerance * 1e-2)
    leaves = [t for t in params + grads + slots if t is not None]
    cotangents = [torch.randn_like(a) for a, _ in outputs]
    d_flat = torch.autograd.grad([a for a, _ in outputs], leaves, cotangents, allow_unused=True)
    d_each = torch.autograd.grad([b for _, b in outputs], leaves, cotangents, allow_unused=True)
    for leaf, x, y in zip(leaves, d_flat, d_each):
        x, y = (torch.zeros_like(leaf) if d is None else d for d in (x, y))  # no path: a zero derivative
        tolerance = 1e-5 if leaf.dtype == torch.float32 else 1e-12
        assert torch.allclose(x, y, rtol=tolerance, atol=tolerance * 1e-2)
