"""LDS (linear datamodeling): train a handful of tiny models on random subsets of a generated
dataset, in the layout datamodels/TRAK users load.

    python examples/lds.py --models 8 --alpha 0.5 --out runs/lds
    python examples/lds.py --ids 7 --out runs/lds-7                 # model 7 alone: same bytes
    python examples/lds.py --models 8 --out runs/replay --replay runs/lds/manifest.json

Writes OUT/masks.npy (models x examples, bool), OUT/margins.npy (models x targets, float32: the
correct-class margin of each model on held-out targets) and OUT/manifest.json. Each model trains
inside ``session.scope(i)``: its mask, initialisation, data order and every draw of the training
loop (dropout) depend only on (master seed, i), so any model retrained alone, in any split of the
ids into jobs, gives the same bytes. Each model's margins and final weights are recorded as
results; ``--replay`` checks them and prints the verdict.
"""

import argparse
import pathlib
import sys

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


def model_ids(text: str, count: int) -> list:
    """'3' -> [3]; '2-5' -> [2, 3, 4, 5]; '' -> range(count)."""
    if not text:
        return list(range(count))
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/lds")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--ids", default="", help="which model ids this job trains, e.g. 7 or 0-9 (default: all)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--mode", default="fixed", choices=["fixed", "bernoulli"])
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--replay", help="replay this manifest strictly and print the verdict")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.replay:
        session = SeedSession.from_manifest(args.replay).setup()
    else:
        # v2: unambiguous, 63-bit seeds; the scheme to pick when a study issues many seeds
        session = SeedSession(args.seed, scheme="sha256-v2").setup()
    train = ToyImages(args.examples)
    targets = ToyImages(32, augment=False)
    tx = torch.stack([targets[i][0] for i in range(len(targets))])
    ty = torch.tensor([targets[i][1] for i in range(len(targets))])

    ids = model_ids(args.ids, args.models)
    masks = np.zeros((len(ids), args.examples), dtype=bool)
    outputs = np.zeros((len(ids), len(targets)), dtype=np.float32)
    for row, i in enumerate(ids):
        with session.scope(i):  # dropout and every other global draw depend on (seed, i) alone
            mask = session.subset_mask(args.examples, args.alpha, i, mode=args.mode)
            # one key for every model's loader: a kept example is seen in the order, and with the
            # augmentation, it has in the full-data run; each loader is its own recorded use
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
        masks[row] = mask
        outputs[row] = margins(model, tx, ty)
        weights = session.record_result(f"weights_{i}", model)["value"]
        session.record_result(f"margins_{i}", outputs[row])
        print(f"model {i}: {int(mask.sum())} of {args.examples} examples, mean target margin {outputs[row].mean():+.3f}, weights {weights}")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "masks.npy", masks)
    np.save(out / "margins.npy", outputs)
    print(f"wrote {out / 'masks.npy'} {masks.shape}, {out / 'margins.npy'} {outputs.shape}, {session.dump(out / 'manifest.json')}")
    if args.replay:
        report = session.replay_report()
        print(f"replay verdict: {report['verdict']}; results matched {len(report['results']['matched'])}, "
              f"mismatched {len(report['results']['mismatched'])}, missing {len(report['results']['missing'])}")
        return 0 if report["verdict"] == "bitwise" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
