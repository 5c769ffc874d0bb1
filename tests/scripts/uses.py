"""Runs that exercise uses, scopes and results; tests run them in fresh processes and compare bytes.

    python tests/scripts/uses.py trainval --out DIR [--replay M [--loose]] [--lr X] [--epochs N]
    python tests/scripts/uses.py worker_fork --out DIR [--workers N] [--replay M]

Writes DIR/weights.bin (the final state dict's raw bytes), DIR/manifest.json and, when replaying,
DIR/report.json (the replay report).
"""

import argparse
import json
import pathlib
import sys

import torch
import torch.nn.functional as F

from seedreg import SeedSession
from seedreg.demo import TinyCNN, ToyImages

p = argparse.ArgumentParser()
p.add_argument("scenario", choices=["trainval", "worker_fork"])
p.add_argument("--out", required=True)
p.add_argument("--replay")
p.add_argument("--loose", action="store_true")
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--workers", type=int, default=0)
args = p.parse_args()
out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)
session = SeedSession.from_manifest(args.replay, strict=not args.loose) if args.replay else SeedSession(7)
session.setup()


class ForkingDataset(torch.utils.data.Dataset):
    """Asks the session for a seed per example, inside __getitem__ (the pattern workers cannot record)."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        with session.fork("augment", i):
            return torch.rand(3)


def train(model, loader, optimizer):
    model.train()
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()


if args.scenario == "trainval":
    # two loaders and two models under keys without distinct ids: each is its own recorded use
    train_loader = session.build_dataloader(ToyImages(64), batch_size=16, shuffle=True)
    val_loader = session.build_dataloader(ToyImages(32, augment=False), batch_size=32)
    probe = session.build_model(TinyCNN, width=8)
    model = session.build_model(TinyCNN, width=16)
    optimizer = session.build_optimizer(torch.optim.SGD, model.parameters(), lr=args.lr, momentum=0.9)
    train(model, train_loader, optimizer)
    model.eval()
    with torch.no_grad():
        val_loss = sum(float(F.cross_entropy(model(x), y)) for x, y in val_loader)
    session.record_result("final_weights", model)
    session.record_result("val_loss", val_loss)
    session.record_result("probe", probe)
else:
    loader = session.build_dataloader(ForkingDataset(), "data", batch_size=4, shuffle=True, num_workers=args.workers)
    batches = torch.cat([b for b in loader])
    model = torch.nn.Linear(3, 1)
    model.weight.data.copy_(batches.sum(0, keepdim=True))
    session.record_result("batches", batches)

blob = b"".join(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in model.state_dict().values())
(out / "weights.bin").write_bytes(blob)
session.dump(out / "manifest.json")
if args.replay:
    (out / "report.json").write_text(json.dumps(session.replay_report()))
sys.exit(0)
