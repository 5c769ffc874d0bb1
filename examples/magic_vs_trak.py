"""seedreg's metagradient next to dattri's TRAK and influence function: the same model, the same
test losses, the same retrains, LDS computed by seedreg and by dattri (equal).

    pip install "seedreg[examples,attribution]"   # scikit-learn's digits; dattri
    python examples/magic_vs_trak.py

A smooth MLP (tanh, BatchNorm, dropout) trains on digits in float64. Three attributions of the
loss of a few test images:

- seedreg's metagradient: d loss / d w_i through the whole run; its counterfactual is *this* run
  with the same batches and example i's loss weighted 0.
- dattri's TRAK over several seeds' checkpoints, and dattri's influence function (explicit
  inverse Hessian of the last layer) at the final weights: both estimate removal averaged over
  training randomness.

Each is scored against two kinds of retrains: weight-0 (the same run, the dropped examples'
losses weighted 0, the metagradient's counterfactual) and removal (retrained on the kept
examples only: new batches, the counterfactual TRAK and influence functions aim at).

Handing seedreg's run to dattri: an *unshuffled* loader of the same dataset (dattri reads scores
in the loader's order; a shuffled seedreg loader makes it warn), without `example_weights=` (its
batches carry the weights), the trained model's ``state_dict()`` as the checkpoint, and the sign
flipped: seedreg's scores are d loss / d w ("loss"), dattri's helpfulness (``sign="helpfulness"``).
"""

import argparse
import os
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's progress bars (tqdm reads it when imported: torch imports it)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from seedreg import SeedSession, lds_score, magic  # noqa: E402

TRAIN, EPOCHS, BATCH, LR = 400, 3, 40, 0.05


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
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


def per_example(out, y):
    return F.cross_entropy(out, y, reduction="none")


def parts(seed=0, **loader_kw):
    session = SeedSession(seed).setup()
    model = session.build_model(MLP, "model").double()
    loader = session.build_dataloader(torch.utils.data.TensorDataset(X, Y), "train", batch_size=BATCH, shuffle=True, **loader_kw)
    return model, loader


def train(seed=0, weights=None, keep=None, checkpoints=None):
    """The plain run: weights (weight-0 retrains) or keep (removal retrains: the kept examples only)."""
    kw = {} if weights is None else {"example_weights": weights}
    if keep is not None:
        kw["subset"] = keep
    model, loader = parts(seed, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for batch in loader:
            (x, y), w = batch if weights is not None else (batch, torch.ones(len(batch[1]), dtype=torch.float64))
            opt.zero_grad()
            (w * per_example(model(x), y)).mean().backward()
            opt.step()
        if checkpoints is not None:
            checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model.eval()


def test_losses(model, k):
    with torch.no_grad():
        return per_example(model(X_TEST[:k]), Y_TEST[:k]).numpy()


def metagradients(k):
    grads = []
    for j in range(k):
        model, loader = parts()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        result = magic.metagradient(model, loader, opt, epochs=EPOCHS, loss=per_example,
                                    target=lambda f, j=j: per_example(f(X_TEST[j : j + 1]), Y_TEST[j : j + 1])[0])
        grads.append(result.grad.numpy())
    return np.stack(grads, axis=1), result.sign  # examples x targets, "loss"


def dattri_scores(k, seeds):
    """TRAK over `seeds` x EPOCHS checkpoints, and the explicit influence function at the final
    weights: dattri's helpfulness scores, examples x targets."""
    from dattri.algorithm.influence_function import IFAttributorExplicit
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    checkpoints = []
    for seed in range(seeds):
        train(seed, checkpoints=checkpoints)
    model = MLP().double().eval()

    def loss_func(params, data):  # dattri calls it per example (vmap) and per batch
        x, y = data
        x, y = (x.unsqueeze(0), y.unsqueeze(0)) if x.dim() == 1 else (x, y)
        return F.cross_entropy(torch.func.functional_call(model, params, x), y)

    def correct_probability(params, data):
        x, y = data
        return torch.exp(-F.cross_entropy(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0)))

    plain = torch.utils.data.TensorDataset(X, Y)
    train_loader = torch.utils.data.DataLoader(plain, batch_size=BATCH, shuffle=False)  # scores in dataset order
    test_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X_TEST[:k], Y_TEST[:k]), batch_size=k)
    trak = TRAKAttributor(task=AttributionTask(loss_func=loss_func, model=model, checkpoints=checkpoints),
                          correct_probability_func=correct_probability, projector_kwargs={"proj_dim": 256, "device": "cpu"},
                          regularization=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trak.cache(train_loader)
        trak_scores = trak.attribute(test_loader).detach().numpy()
        final = checkpoints[-1]
        influence = IFAttributorExplicit(task=AttributionTask(loss_func=loss_func, model=model, checkpoints=final),
                                         layer_name=["net.4.weight", "net.4.bias"], regularization=1e-2)
        influence.cache(train_loader)
        if_scores = influence.attribute(train_loader, test_loader).detach().numpy()
    return trak_scores, if_scores


def retrains(k, subsets, fraction, rng, removal):
    masks, outputs = [], []
    for _ in range(subsets):
        keep = np.ones(TRAIN, dtype=bool)
        keep[rng.choice(TRAIN, size=max(1, round(fraction * TRAIN)), replace=False)] = False
        model = (train(keep=torch.from_numpy(keep)) if removal
                 else train(weights=torch.from_numpy(keep.astype(np.float64))))
        outputs.append(test_losses(model, k))
        masks.append(keep)
    return np.array(masks), np.array(outputs)


def dattri_lds(scores, sign, masks, outputs):
    """dattri's own LDS: helpfulness scores against -loss, with the kept indices of each retrain."""
    from dattri.metric import lds

    helpful = -scores if sign == "loss" else scores
    kept = torch.from_numpy(np.stack([np.flatnonzero(m) for m in masks]))
    return float(torch.nanmean(lds(torch.from_numpy(helpful), (torch.from_numpy(-outputs), kept))[0]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", type=int, default=8, help="test images whose loss is attributed")
    parser.add_argument("--subsets", type=int, default=40, help="retrains per drop fraction and kind")
    parser.add_argument("--seeds", type=int, default=5, help="TRAK's independently trained models (x epochs checkpoints)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    k = args.targets
    meta, meta_sign = metagradients(k)
    trak, influence = dattri_scores(k, args.seeds)
    methods = [("seedreg metagradient", meta, meta_sign), (f"dattri TRAK ({args.seeds} seeds x {EPOCHS} checkpoints)", trak,
                                                            "helpfulness"),
               ("dattri influence function (explicit, last layer)", influence, "helpfulness")]
    rng = np.random.default_rng(1)
    table = {name: [] for name, _, _ in methods}
    agree = 0.0
    for removal in (False, True):
        for fraction in (0.01, 0.05):
            masks, outputs = retrains(k, args.subsets, fraction, rng, removal)
            for name, scores, sign in methods:
                ours = lds_score(scores, masks, outputs, sign=sign)
                theirs = dattri_lds(scores, sign, masks, outputs)
                agree = max(agree, abs(ours - theirs))
                table[name].append(ours)
    print("| method | weight-0 retrains, 1% / 5% | removal retrains, 1% / 5% |")
    print("| --- | --- | --- |")
    for name, values in table.items():
        print(f"| {name} | {values[0]:.3f} / {values[1]:.3f} | {values[2]:.3f} / {values[3]:.3f} |")
    print(f"seedreg.lds_score and dattri.metric.lds differ by at most {agree:.1e}")


if __name__ == "__main__":
    main()
