"""The seed document's LDS pattern: several models `lds_{i}` sharing one loader.

    python examples/lds_models.py --models 3 --out runs/lds_models

Each model gets its own initialisation seed (purpose "model", instance `lds_{i}`) and its own
optimizer seed (`lds_opt_{i}`); the shared loader has the same instance id as the MAGIC run, so
the data order is the same. For many models, use scheme="sha256-v2" (see the README).
"""

import argparse
import pathlib

import torch
import torch.nn.functional as F

from seedreg import SeedSession, fingerprint
from seedreg.demo import TinyCNN, ToyImages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/lds_models")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--models", type=int, default=3)
    args = parser.parse_args()

    session = SeedSession(args.seed).setup()
    loader = session.build_dataloader(ToyImages(64), "training", batch_size=16, shuffle=True)
    for i in range(args.models):
        model = session.build_model(TinyCNN, f"lds_{i}")
        optimizer = session.build_optimizer(torch.optim.SGD, model.parameters(), f"lds_opt_{i}", lr=0.05)
        loader.set_epoch(0)
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        print(f"lds_{i}: seed {session.seed('model', f'lds_{i}')}, final weights {fingerprint(model)}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"manifest: {session.dump(out / 'manifest.json')}")


if __name__ == "__main__":
    main()
