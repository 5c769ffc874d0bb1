"""MAGIC-style step replay: checkpoint the whole training state every k steps, then re-run any
step from the nearest checkpoint and get exactly the recorded next state, bit for bit.

    python examples/magic_replay.py --steps 12 --every 4

The replay happens after the global RNGs were disturbed on purpose: the checkpoint restores
python, numpy and torch's generators (dropout) and the loader's position, so it does not matter.
Exits non-zero if any replayed step differs.
"""

import argparse
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F

from seedreg import SeedSession, StepCheckpoints, fingerprint
from seedreg.demo import TinyCNN, ToyImages


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    session = SeedSession(42).setup()
    model = session.build_model(TinyCNN, "training")
    optimizer = session.build_optimizer(torch.optim.Adam, model.parameters(), "training", lr=1e-2)
    loader = session.build_dataloader(ToyImages(80), "training", batch_size=16, shuffle=True, num_workers=args.workers)
    checkpoints = StepCheckpoints(session, model, optimizer, loader, every=args.every)

    def step_fn(step, indices, batch):
        x, y = batch
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    after = {}  # the state after each step, as recorded by the original run
    step = 0
    checkpoints.maybe_save(0)
    while step < args.steps:
        for batch in loader:  # epochs advance by themselves
            step_fn(step, None, batch)
            after[step] = fingerprint(model)
            step += 1
            checkpoints.maybe_save(step)  # before the next batch is drawn
            if step == args.steps:
                break

    ok = True
    for t in range(args.steps):
        random.random(); np.random.rand(); torch.rand(7)  # disturb every global RNG
        start = checkpoints.replay(t, step_fn)
        same = fingerprint(model) == after[t]
        ok &= same
        print(f"step {t:2d}: replayed from checkpoint {start:2d}: {'identical' if same else 'DIFFERENT'}")
    print("all replayed steps identical" if ok else "replay FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
