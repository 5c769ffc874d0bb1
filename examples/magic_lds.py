"""MAGIC on real data: metagradients of test losses on scikit-learn's digits, scored against real
leave-k-out retrains (a single-model LDS) at 1% and 5% drop fractions.

    pip install "seedreg[examples]"      # scikit-learn (its digits ship with it) and matplotlib
    python examples/magic_lds.py --plot docs/magic_lds.png

An MLP with BatchNorm and dropout trains on 1,000 digits (float64, momentum SGD, 4 epochs). For
each of a few test images, ``magic.metagradient`` gives d(test loss) / d(weight of each training
example); dropping a random 1% or 5% of the training set is predicted to change the test loss by
minus the sum of the dropped examples' metagradients, and each subset is really retrained (the
same run, its examples weighted 0 with ``example_weights=``). Spearman's correlation between the
predicted and the actual changes, across subsets, averaged over test images, is the LDS.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from seedreg import SeedSession, lds_score, magic

TRAIN, EPOCHS, BATCH = 1000, 4, 50


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.data / 16.0)
    y = torch.from_numpy(data.target).long()
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


X, Y, X_TEST, Y_TEST = digits()


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def per_example(out, y):
    return F.cross_entropy(out, y, reduction="none")


def parts(weights=None):
    session = SeedSession(0).setup()
    model = session.build_model(MLP, "model").double()
    extra = {} if weights is None else {"example_weights": weights}
    loader = session.build_dataloader(torch.utils.data.TensorDataset(X, Y), "train", batch_size=BATCH, shuffle=True, **extra)
    return model, loader


def train(weights=None):
    """The plain run (torch.optim); with `weights`, each example's loss weighted. The model, in eval mode."""
    model, loader = parts(weights)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for batch in loader:
            (x, y), w = batch if weights is not None else (batch, torch.ones(len(batch[1]), dtype=torch.float64))
            opt.zero_grad()
            (w * per_example(model(x), y)).mean().backward()
            opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", type=int, default=4, help="test images whose loss is attributed")
    parser.add_argument("--subsets", type=int, default=40, help="retrains per drop fraction")
    parser.add_argument("--plot", help="save the scatter of predicted against actual changes (1%% drop) as this PNG")
    args = parser.parse_args()
    torch.set_num_threads(1)

    train()  # once to warm up (first calls into torch and the loader), then timed
    started = time.perf_counter()
    base_model = train()
    train_seconds = time.perf_counter() - started
    with torch.no_grad():
        base = per_example(base_model(X_TEST[: args.targets]), Y_TEST[: args.targets]).numpy()

    grads, magic_seconds = [], 0.0
    for j in range(args.targets):
        model, loader = parts()
        started = time.perf_counter()
        result = magic.metagradient(model, loader, magic.SGD(0.05, momentum=0.9), epochs=EPOCHS, loss=per_example,
                                    target=lambda f, j=j: per_example(f(X_TEST[j : j + 1]), Y_TEST[j : j + 1])[0])
        magic_seconds += time.perf_counter() - started
        grads.append(result.grad.numpy())
    scores = np.stack(grads, axis=1)  # examples x targets
    print(f"metagradient: {magic_seconds / args.targets:.2f} s a target, {magic_seconds / args.targets / train_seconds:.2f}x "
          f"one training run ({train_seconds:.2f} s), {result.stats['states_kept']} states kept over {result.stats['steps']} steps")

    rng = np.random.default_rng(1)
    scatter = None
    for fraction in (0.01, 0.05):
        masks, outputs = [], []
        for _ in range(args.subsets):
            keep = np.ones(TRAIN, dtype=bool)
            keep[rng.choice(TRAIN, size=round(fraction * TRAIN), replace=False)] = False
            model = train(torch.from_numpy(keep.astype(np.float64)))
            with torch.no_grad():
                outputs.append(per_example(model(X_TEST[: args.targets]), Y_TEST[: args.targets]).numpy())
            masks.append(keep)
        masks, outputs = np.array(masks), np.array(outputs)
        print(f"single-model LDS at a {fraction:.0%} drop over {args.subsets} retrains and {args.targets} test images: "
              f"{lds_score(scores, masks, outputs):.3f}")
        if scatter is None:
            scatter = (-((~masks).astype(np.float64) @ scores[:, 0]), outputs[:, 0] - base[0])
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        predicted, actual = scatter
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter(predicted, actual, s=14)
        lo, hi = min(predicted.min(), actual.min()), max(predicted.max(), actual.max())
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
        ax.set_xlabel("predicted change of the test loss (metagradient)")
        ax.set_ylabel("actual change (retrained without them)")
        ax.set_title("digits: a random 1% of training dropped", fontsize=10)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"scatter: {args.plot}")


if __name__ == "__main__":
    main()
