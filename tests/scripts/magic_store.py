"""A run kept in a store, for tests/test_magic_scores.py: train (or reuse) it, print what it gives.

    python magic_store.py STORE [--lr LR] [--die-after CALLS] [--wait-for FILE]
"""

import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from seedreg import StateError, magic  # noqa: E402
from seedreg.fingerprint import fingerprint  # noqa: E402
from tests.test_magic_loops import TEST, Run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--lr", type=float, default=0.15)
    p.add_argument("--die-after", type=int)
    p.add_argument("--wait-for", help="hold the first training step until this file exists (a trainer still busy)")
    a = p.parse_args()
    torch.set_num_threads(1)

    def optimizer(model):
        return torch.optim.SGD([{"params": model.fc1.parameters(), "lr": a.lr, "momentum": 0.9},
                                {"params": model.fc2.parameters(), "lr": 0.05}], lr=0.1)

    calls = [0]

    def losses(model, batch):
        calls[0] += 1
        if a.die_after is not None and calls[0] > a.die_after:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-training
        if a.wait_for and calls[0] == 1:  # training, the lock taken: held until the test says go
            deadline = time.monotonic() + 300
            while not os.path.exists(a.wait_for) and time.monotonic() < deadline:
                time.sleep(0.02)
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")

    _, model, loader, opt, _ = Run(optimizer).parts()
    try:
        run = magic.train(model, loader, opt, epochs=2, example_losses=losses, store=a.store)
    except StateError as exc:
        print(json.dumps({"error": str(exc)}))
        return 3
    result = run.metagradient(lambda f: F.cross_entropy(f(TEST.x), TEST.y, reduction="none"))
    print(json.dumps({"trained": run.stats["trained"], "weights": fingerprint(run.model),
                      "grad": result.grad.numpy().tobytes().hex(), "calls": calls[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
