"""LDS (linear datamodeling): train a handful of tiny models on random subsets of a generated
dataset, in the layout datamodels/TRAK users load.

    python examples/lds.py --models 8 --alpha 0.5 --out runs/lds

Writes OUT/masks.npy (models x examples, bool), OUT/margins.npy (models x targets, float32: the
correct-class margin of each model on held-out targets) and OUT/manifest.json. Model i's mask,
initialisation and data order depend only on (master seed, i): any model can be retrained alone,
and a kept example gets the same augmentation as in the full-data run.
"""

import argparse
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

from seedreg import SeedSession
from seedreg.demo import TinyCNN, ToyImages


def margins(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    correct = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).max(dim=1).values
    return (correct - others).numpy().astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/lds")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    # v2: unambiguous, 63-bit seeds; the scheme to pick when a study issues many seeds
    session = SeedSession(args.seed, scheme="sha256-v2").setup()
    train = ToyImages(args.examples)
    targets = ToyImages(32, augment=False)
    tx = torch.stack([targets[i][0] for i in range(len(targets))])
    ty = torch.tensor([targets[i][1] for i in range(len(targets))])

    masks = np.zeros((args.models, args.examples), dtype=bool)
    outputs = np.zeros((args.models, len(targets)), dtype=np.float32)
    for i in range(args.models):
        mask = session.subset_mask(args.examples, args.alpha, i)
        loader = session.build_dataloader(train, "training", batch_size=16, shuffle=True, subset=mask)
        model = session.build_model(TinyCNN, f"lds_{i}")
        optimizer = session.build_optimizer(torch.optim.SGD, model.parameters(), f"lds_{i}", lr=0.05, momentum=0.9)
        model.train()
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)
            for x, y in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
        masks[i] = mask
        outputs[i] = margins(model, tx, ty)
        print(f"model {i}: {int(mask.sum())} of {args.examples} examples, mean target margin {outputs[i].mean():+.3f}")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "masks.npy", masks)
    np.save(out / "margins.npy", outputs)
    print(f"wrote {out / 'masks.npy'} {masks.shape}, {out / 'margins.npy'} {outputs.shape}, {session.dump(out / 'manifest.json')}")


if __name__ == "__main__":
    main()
