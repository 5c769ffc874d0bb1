"""The seed document's single-run (MAGIC) pattern: one session, one model, optimizer and loader.

    python examples/magic_training.py --out runs/magic

Writes the manifest (every seed, settings, environment) and prints the final weights' fingerprint;
run it twice and compare: the fingerprints and manifests are identical.
"""

import argparse
import pathlib

import torch
import torch.nn.functional as F

from seedreg import SeedSession, fingerprint
from seedreg.demo import TinyCNN, ToyImages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/magic")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    session = SeedSession(args.seed).setup()
    loader = session.build_dataloader(ToyImages(128), "training", batch_size=32, shuffle=True)
    model = session.build_model(TinyCNN, "training")
    optimizer = session.build_optimizer(torch.optim.SGD, model.parameters(), "training", lr=0.05, momentum=0.9)

    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = session.dump(out / "manifest.json")
    print(f"manifest: {path}")
    print(f"final weights: {fingerprint(model)}")


if __name__ == "__main__":
    main()
