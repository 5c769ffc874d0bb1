"""A small training run driven by flags; tests run it in fresh processes and compare its bytes.

Writes OUT/weights.bin (the final state dict's raw bytes, in order), OUT/result.json and, with
--manifest, the manifest. --save-at K checkpoints after step K (and goes on); --resume continues
from such a checkpoint; --replay builds the session from a manifest.
"""

import argparse
import json
import pathlib
import sys

import torch
import torch.nn.functional as F

from seedreg import SeedSession, fingerprint
from seedreg.demo import TinyCNN, ToyImages

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--seed", type=int, default=42)
p.add_argument("--scheme", default="sha256-v1")
p.add_argument("--workers", type=int, default=2)
p.add_argument("--persistent", action="store_true")
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--n", type=int, default=96)
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--save-at", type=int, default=None)
p.add_argument("--resume", default=None)
p.add_argument("--no-set-epoch", action="store_true")
p.add_argument("--manifest", default=None)
p.add_argument("--replay", default=None)
p.add_argument("--replay-loose", action="store_true")
p.add_argument("--extra-component", action="store_true", help="ask for a seed the recorded run did not")
p.add_argument("--disturb", action="store_true", help="draw from the global RNGs before the loop")
args = p.parse_args()
out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)

if args.replay:
    session = SeedSession.from_manifest(args.replay, strict=not args.replay_loose)
else:
    session = SeedSession(args.seed, scheme=args.scheme)
session.setup()
model = session.build_model(TinyCNN, "training")
optimizer = session.build_optimizer(torch.optim.SGD, model.parameters(), "training", lr=0.05, momentum=0.9)
loader = session.build_dataloader(
    ToyImages(args.n), "training", batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
    persistent_workers=args.persistent and args.workers > 0,
)
if args.extra_component:
    session.seed("augment", "extra")

step, start_epoch = 0, 0
if args.resume:
    ckpt = pathlib.Path(args.resume)
    model.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    meta = json.loads((ckpt / "meta.json").read_text())
    session.load_state_dict(json.loads((ckpt / "session.json").read_text()))
    step, start_epoch = meta["step"], meta["epoch"]
if args.disturb:
    import random

    import numpy as np

    random.random(); np.random.rand(3); torch.rand(5)

model.train()
for epoch in range(start_epoch, args.epochs):
    if not args.no_set_epoch:
        loader.set_epoch(epoch)
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        step += 1
        if step == args.save_at:
            ckpt = out / "ckpt"
            ckpt.mkdir(exist_ok=True)
            torch.save(model.state_dict(), ckpt / "model.pt")
            torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
            (ckpt / "session.json").write_text(json.dumps(session.state_dict()))
            (ckpt / "meta.json").write_text(json.dumps({"step": step, "epoch": epoch}))

blob = b"".join(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in model.state_dict().values())
(out / "weights.bin").write_bytes(blob)
if args.manifest:
    session.dump(args.manifest)
(out / "result.json").write_text(json.dumps({"steps": step, "fingerprint": fingerprint(model)}))
print(json.dumps({"steps": step}))
sys.exit(0)
