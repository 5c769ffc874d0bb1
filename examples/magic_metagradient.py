"""Metagradients by replay (MAGIC) in a few lines: d(held-out loss) / d(weight of each training example).

    python examples/magic_metagradient.py            # metagradient, finite-difference check, single-model LDS
    python examples/magic_metagradient.py --schedule log

A small MLP with BatchNorm and dropout, shuffled minibatches, momentum SGD with weight decay and a
step learning-rate schedule, in float64 on generated data. ``magic.metagradient`` trains it, then
replays the run backwards from checkpoints; the result is checked against its definition (central
finite differences, each side a retraining with ``example_weights=``) and used to predict
leave-k-out retrains, scored by Spearman's rank correlation (a single-model LDS).
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from seedreg import SeedSession, lds_score, magic

N, HELD_OUT, DIM, BATCH, EPOCHS = 48, 16, 6, 8, 3


def make_data():
    rng = np.random.Generator(np.random.PCG64(11))
    teacher = rng.normal(size=DIM)
    x = rng.normal(size=(N + HELD_OUT, DIM))
    y = ((x @ teacher + 0.7 * rng.normal(size=len(x))) > 0).astype(np.int64)
    return torch.from_numpy(x[:N]), torch.from_numpy(y[:N]), torch.from_numpy(x[N:]), torch.from_numpy(y[N:])


X, Y, X_TEST, Y_TEST = make_data()


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Dropout(0.1))
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.body(x))


def lr(step):  # a step schedule: halve every epoch
    return 0.1 * 0.5 ** (step // (N // BATCH))


def per_example(out, y):
    return F.cross_entropy(out, y, reduction="none")


def target(f):  # the held-out loss, with the final weights and BatchNorm statistics, in eval mode
    return F.cross_entropy(f(X_TEST), Y_TEST)


def session_parts(weights=None):
    session = SeedSession(3).setup()
    model = session.build_model(MLP, "model").double()
    extra = {} if weights is None else {"example_weights": weights}
    loader = session.build_dataloader(torch.utils.data.TensorDataset(X, Y), "train", batch_size=BATCH, shuffle=True, **extra)
    return session, model, loader


def retrain(weights):
    """The same run with torch.optim and each example's loss weighted: the held-out loss after it."""
    _, model, loader = session_parts(weights)
    opt = torch.optim.SGD(model.parameters(), lr=lr(0), momentum=0.9, weight_decay=1e-3)
    step = 0
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for (x, y), w in loader:
            opt.param_groups[0]["lr"] = lr(step)
            opt.zero_grad()
            (w * per_example(model(x), y)).mean().backward()
            opt.step()
            step += 1
    model.eval()
    with torch.no_grad():
        return target(model).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedule", default="sqrt", choices=["uniform", "sqrt", "log"])
    parser.add_argument("--subsets", type=int, default=24)
    parser.add_argument("--k", type=int, default=3, help="examples left out per retrain")
    args = parser.parse_args()

    _, model, loader = session_parts()
    result = magic.metagradient(model, loader, magic.SGD(lr, momentum=0.9, weight_decay=1e-3), epochs=EPOCHS,
                                loss=per_example, target=target, schedule=args.schedule)
    print(f"{result.stats['steps']} steps, schedule {args.schedule!r}: at most {result.stats['states_kept']} training states held")

    worst = 0.0
    for i in (0, 17, 40):  # the definition: central finite differences, each side a whole retraining
        h = 1e-5
        up, down = torch.ones(N, dtype=torch.float64), torch.ones(N, dtype=torch.float64)
        up[i], down[i] = 1 + h, 1 - h
        fd = (retrain(up) - retrain(down)) / (2 * h)
        worst = max(worst, abs(result.grad[i].item() - fd) / abs(fd))
    print(f"metagradient vs central finite differences: max relative difference {worst:.3e}")

    rng = np.random.default_rng(5)
    masks, outputs = [], []
    for _ in range(args.subsets):
        keep = np.ones(N, dtype=bool)
        keep[rng.choice(N, size=args.k, replace=False)] = False
        masks.append(keep)
        outputs.append([retrain(torch.from_numpy(keep.astype(np.float64)))])
    lds = lds_score(result.grad.numpy()[:, None], np.array(masks), np.array(outputs))
    print(f"single-model LDS of the metagradient over {args.subsets} leave-{args.k}-out retrains: {lds:.3f}")
    print("metagradient OK" if worst < 1e-4 else "metagradient MISMATCH")


if __name__ == "__main__":
    main()
