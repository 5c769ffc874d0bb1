"""Metagradients by replay (MAGIC): the exact gradient of a held-out loss with respect to
per-example training weights, computed by replaying training backwards from checkpoints.

    python examples/magic_metagradient.py            # metagradient, check, single-model LDS
    python examples/magic_metagradient.py --schedule log

Training is a small MLP with dropout, shuffled minibatches, momentum SGD (functional, so that a
step has a VJP) and a step LR schedule, in float64 on generated data. seedreg fixes every seed and
the data order, so training is a deterministic function of the weights w; ``StepCheckpoints``
restores the state before each step (parameters, velocity, LR scheduler, dropout's RNG) while
``reverse`` walks the steps backwards, and each step's VJP carries the adjoint back. The result
is compared with full unrolled autograd, then used to predict leave-k-out retrains (made with
``subset_mode="weight"``) and scored with Spearman's rank correlation (a single-model LDS).
"""

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from seedreg import SeedSession, StepCheckpoints, lds_score

N, HELD_OUT, DIM, BATCH, EPOCHS = 48, 16, 6, 8, 3
LR, MOMENTUM, GAMMA = 0.5, 0.9, 0.5


def make_data():
    rng = np.random.Generator(np.random.PCG64(11))
    teacher = rng.normal(size=DIM)
    x = rng.normal(size=(N + HELD_OUT, DIM))
    y = ((x @ teacher + 0.7 * rng.normal(size=len(x))) > 0).astype(np.int64)
    return torch.from_numpy(x[:N]), torch.from_numpy(y[:N]), torch.from_numpy(x[N:]), torch.from_numpy(y[N:])


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(DIM, 8)
        self.drop = torch.nn.Dropout(0.2)
        self.fc2 = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class StepLR:
    """The LR schedule: multiplied by GAMMA every epoch (an extra with state_dict/load_state_dict)."""

    def __init__(self, steps_per_epoch):
        self.steps_per_epoch = steps_per_epoch
        self.count = 0

    @property
    def lr(self):
        return LR * GAMMA ** (self.count // self.steps_per_epoch)

    def step(self):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def sgd_step(model, names, theta, velocity, weights, indices, batch, lr, create_graph):
    """One functional momentum-SGD step on the weighted loss: (theta, velocity) -> (theta', velocity')."""
    x, y = batch
    logits = functional_call(model, dict(zip(names, theta)), (x,))
    loss = (weights[indices] * F.cross_entropy(logits, y, reduction="none")).mean()
    grads = torch.autograd.grad(loss, theta, create_graph=create_graph)
    velocity = [MOMENTUM * v + g for v, g in zip(velocity, grads)]
    theta = [p - lr * v for p, v in zip(theta, velocity)]
    return theta, velocity


def held_out_loss(model, names, theta, x, y):
    model.eval()
    loss = F.cross_entropy(functional_call(model, dict(zip(names, theta)), (x,)), y)
    model.train()
    return loss


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedule", default="sqrt", choices=["uniform", "sqrt", "log"])
    parser.add_argument("--subsets", type=int, default=24)
    parser.add_argument("--k", type=int, default=6, help="examples left out per retrain")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)

    session = SeedSession(0).setup()
    x, y, hx, hy = make_data()
    train_set = torch.utils.data.TensorDataset(x, y)
    model = session.build_model(MLP, "mlp")
    names = [n for n, _ in model.named_parameters()]
    loader = session.build_dataloader(train_set, "train", batch_size=BATCH, shuffle=True, with_indices=True)
    steps = EPOCHS * len(loader)
    velocity = [torch.zeros_like(p) for p in model.parameters()]
    sched = StepLR(len(loader))

    def get_velocity():
        return [v.clone() for v in velocity]

    def set_velocity(state):
        velocity[:] = [v.clone() for v in state]

    every = 4 if args.schedule == "uniform" else None
    ckpt = StepCheckpoints(session, model, None, loader, schedule=args.schedule, every=every, steps=steps,
                           extra=[sched, (get_velocity, set_velocity)])
    ones = torch.ones(N)

    def forward_step(step, indices, batch, weights=ones):
        theta = [p.detach() for p in model.parameters()]
        with torch.enable_grad():
            theta = [t.requires_grad_() for t in theta]
            new_theta, new_velocity = sgd_step(model, names, theta, velocity, weights, indices, batch, sched.lr, False)
        with torch.no_grad():
            for p, t in zip(model.parameters(), new_theta):
                p.copy_(t)
        velocity[:] = [v.detach() for v in new_velocity]
        sched.step()

    # -- train, keeping the schedule's checkpoints -----------------------------------------------------
    model.train()
    ckpt.maybe_save(0)
    step = 0
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for indices, batch in loader:
            forward_step(step, indices, batch)
            step += 1
            ckpt.maybe_save(step)
    theta_final = [p.detach().clone() for p in model.parameters()]
    base_loss = float(held_out_loss(model, names, theta_final, hx, hy))

    # -- the metagradient by reverse replay ------------------------------------------------------------
    theta_T = [t.clone().requires_grad_() for t in theta_final]
    adj_theta = list(torch.autograd.grad(held_out_loss(model, names, theta_T, hx, hy), theta_T))
    adj_velocity = [torch.zeros_like(t) for t in theta_T]
    adj_w = torch.zeros(N)

    def backward_step(step, indices, batch):
        nonlocal adj_theta, adj_velocity, adj_w
        theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
        vel = [v.detach().clone().requires_grad_() for v in velocity]
        w = ones.clone().requires_grad_()
        new_theta, new_velocity = sgd_step(model, names, theta, vel, w, indices, batch, sched.lr, True)
        grads = torch.autograd.grad(new_theta + new_velocity, theta + vel + [w], grad_outputs=adj_theta + adj_velocity)
        k = len(theta)
        adj_theta, adj_velocity = list(grads[:k]), list(grads[k : 2 * k])
        adj_w = adj_w + grads[-1]

    ckpt.reverse(backward_step, forward=forward_step)
    metagradient = adj_w

    # -- the same by full unrolled autograd ------------------------------------------------------------
    ckpt.state_before(0, forward_step)
    w = ones.clone().requires_grad_()
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    vel = [torch.zeros_like(t) for t in theta]
    for s in range(steps):
        indices, batch = loader.batch_at(s)
        theta, vel = sgd_step(model, names, theta, vel, w, indices, batch, sched.lr, True)
        sched.step()
    (unrolled,) = torch.autograd.grad(held_out_loss(model, names, theta, hx, hy), w)
    diff = float((metagradient - unrolled).abs().max())
    print(f"{steps} steps, schedule {args.schedule!r}: at most {ckpt.peak_states} training states held")
    print(f"metagradient by reverse replay vs full unrolled autograd: max abs difference {diff:.3e}")

    # -- a single-model LDS against real leave-k-out retrains -----------------------------------------
    rng = session.numpy_rng("leave_k_out")
    masks, actual = [], []
    for _ in range(args.subsets):
        keep = np.ones(N, dtype=bool)
        keep[rng.choice(N, size=args.k, replace=False)] = False
        retrain = session.build_dataloader(train_set, "train", batch_size=BATCH, shuffle=True, with_indices=True,
                                           subset=keep, subset_mode="weight")
        ckpt.state_before(0, forward_step)
        for s in range(steps):
            retrain.seek(s)
            indices, batch, kept = next(iter(retrain))
            weights = torch.zeros(N)
            weights[indices] = kept.to(weights)
            forward_step(s, indices, batch, weights)
        masks.append(keep)
        actual.append(float(held_out_loss(model, names, [p.detach() for p in model.parameters()], hx, hy)) - base_loss)
    predicted_scores = -metagradient.numpy()[:, None]  # removing example i changes the loss by about -dL/dw_i
    removed = ~np.array(masks)
    lds = lds_score(predicted_scores, removed, np.array(actual)[:, None])
    print(f"single-model LDS of the metagradient over {args.subsets} leave-{args.k}-out retrains: {lds:.3f}")
    ok = diff < 1e-6
    print("metagradient OK" if ok else "metagradient MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
