"""Distributed training with torch.distributed and DistributedDataParallel, seeded by seedreg.

One machine, two processes (CPU, gloo):

    torchrun --nproc-per-node 2 examples/ddp_train.py --out runs/ddp

Several machines: run the same command on each, adding torchrun's rendezvous flags, e.g. on node
0 and node 1 of two:

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr HOST0 --master-port 29500 examples/ddp_train.py
    torchrun --nnodes 2 --node-rank 1 --nproc-per-node 8 --master-addr HOST0 --master-port 29500 examples/ddp_train.py

The session reads rank and world size from the process group. Every rank builds the same initial
weights (model and optimizer seeds do not depend on the rank), the loader shards one global
permutation, and each rank's global RNGs get a seed derived from (master seed, rank), so dropout
differs across ranks. `session.dump` is collective: rank 0 writes one manifest for the job.
--save-at K checkpoints after step K (every rank its own session state); --resume continues.
"""

import argparse
import datetime
import json
import os
import pathlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from seedreg import SeedSession, fingerprint
from seedreg.demo import TinyCNN, ToyImages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/ddp")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--save-at", type=int, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--replay", default=None, help="replay from this manifest")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # this example trains on the CPU, so gloo even where CUDA is visible; on GPUs use nccl and put each
    # rank's model on cuda:LOCAL_RANK (one GPU per rank)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    session = SeedSession.from_manifest(args.replay) if args.replay else SeedSession(args.seed)
    session.setup()
    rank = session.rank
    model = session.build_model(TinyCNN, "training")
    initial = fingerprint(model)
    ddp = DistributedDataParallel(model)
    optimizer = session.build_optimizer(torch.optim.SGD, ddp.parameters(), "training", lr=0.05, momentum=0.9)
    loader = session.build_dataloader(ToyImages(args.n), "training", batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    probe = F.dropout(torch.ones(32), 0.5).tolist()  # a dropout mask from this rank's global stream

    step, start_epoch, seen = 0, 0, []
    if args.resume:
        ckpt = pathlib.Path(args.resume)
        model.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        meta = json.loads((ckpt / "meta.json").read_text())
        session.load_state_dict(json.loads((ckpt / f"session-rank{rank}.json").read_text()))
        step, start_epoch = meta["step"], meta["epoch"]

    ddp.train()
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            step += 1
            if step == args.save_at:
                ckpt = out / "ckpt"
                ckpt.mkdir(exist_ok=True)
                (ckpt / f"session-rank{rank}.json").write_text(json.dumps(session.state_dict()))
                if rank == 0:
                    torch.save(model.state_dict(), ckpt / "model.pt")
                    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
                    (ckpt / "meta.json").write_text(json.dumps({"step": step, "epoch": epoch}))
                dist.barrier()
        seen.append(loader.sampler.order(epoch))

    session.dump(out / "manifest.json")
    # parameters are kept in sync by DDP; BN running statistics are each rank's own after the last
    # forward (DDP broadcasts rank 0's buffers at the start of each forward, not the end)
    params = fingerprint(dict(model.named_parameters()))
    info = {"rank": rank, "initial": initial, "params": params, "final": fingerprint(model), "probe": probe, "seen": seen, "steps": step}
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    if rank == 0:
        print(f"world size {session.world_size}: final weights {info['final']}")
    dist.barrier()  # leave together: a rank tearing gloo down while the other still talks aborts it
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
