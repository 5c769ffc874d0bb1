"""The metagradient of a data-parallel run: 2 ranks, each training on its shard of every global
batch, gradients averaged as DistributedDataParallel averages them, differentiated through that
average. Every rank returns the whole dataset's metagradient, the same on each.

    python examples/magic_ddp.py --check             # 2 gloo processes on the CPU, started here
    torchrun --nproc-per-node 2 examples/magic_ddp.py  # the same script under torchrun (NCCL on GPUs)

With --check, rank 0 also compares the metagradient with central finite differences of a real
``DistributedDataParallel`` run over an ``example_weights=`` loader (each side a whole retraining
on both ranks), and the trained weights with that run's.
"""

import argparse
import datetime
import hashlib
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from seedreg import SeedSession, magic

N, FEATURES, CLASSES, BATCH, EPOCHS, LR = 32, 5, 3, 8, 2, 0.1


class Points(torch.utils.data.Dataset):
    def __init__(self, n=N, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, FEATURES, generator=g, dtype=torch.float64)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).long() + (self.x[:, 2] > 1).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Net(torch.nn.Module):
    """LayerNorm, not BatchNorm: DDP broadcasts rank 0's buffers, which are not differentiated here."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(FEATURES, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.fc2 = torch.nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.fc2(F.dropout(torch.tanh(self.norm(self.fc1(x))), 0.1, self.training))


TEST = Points(4, seed=1)


def per_example(out, y):
    return F.cross_entropy(out, y, reduction="none")


def target(f):
    return F.cross_entropy(f(TEST.x), TEST.y)


def parts(weights=None):
    session = SeedSession(0).setup()  # after the process group exists: it knows its rank
    model = session.build_model(Net, "net").double()
    extra = {} if weights is None else {"example_weights": weights}
    loader = session.build_dataloader(Points(), "train", batch_size=BATCH // session.world_size, shuffle=True, **extra)
    return model, loader, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def ddp_run(weights):
    """A plain DistributedDataParallel run over an example_weights= loader; the target after it."""
    model, loader, _ = parts(weights)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for (x, y), w in loader:
            opt.zero_grad()
            (w * per_example(ddp(x), y)).mean().backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return model, float(target(model))


def worker(check: bool) -> dict:
    torch.set_num_threads(1)
    model, loader, opt = parts()
    start = time.perf_counter()
    result = magic.metagradient(model, loader, opt, epochs=EPOCHS, loss=per_example, target=target)
    out = {"rank": dist.get_rank(), "entries": len(result.grad), "target": result.target, "seconds": time.perf_counter() - start,
           "grad": hashlib.sha256(result.grad.numpy().tobytes()).hexdigest()}
    if check:
        plain, value = ddp_run(torch.ones(N, dtype=torch.float64))
        out["trained_gap"] = max(float((a - b).abs().max()) for a, b in zip(result.model.state_dict().values(),
                                                                             plain.state_dict().values()))
        out["target_gap"] = abs(value - result.target)
        errors = []
        for i in result.grad.abs().argsort(descending=True)[:3].tolist():
            values = []
            for sign in (1, -1):
                w = torch.ones(N, dtype=torch.float64)
                w[i] += sign * 1e-5
                values.append(ddp_run(w)[1])
            fd = (values[0] - values[1]) / 2e-5
            errors.append(abs(result.grad[i].item() - fd) / abs(fd))
        out["relative_error"] = max(errors)
    return out


def _spawned(rank: int, world: int, port: int, check: bool, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        out = worker(check)
        with open(f"{path}.{rank}", "w") as fh:
            json.dump(out, fh)
    finally:
        dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true", help="finite differences of a DDP run, and its trained weights")
    p.add_argument("--out", default="magic_ddp.json", help="where rank 0 writes what both ranks found")
    args = p.parse_args()
    if "RANK" in os.environ:  # under torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
        out = worker(args.check)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, out)
        if dist.get_rank() == 0:
            print(json.dumps(everyone))
        dist.destroy_process_group()
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(2, port, args.check, args.out), nprocs=2)
    everyone = []
    for rank in range(2):
        with open(f"{args.out}.{rank}") as fh:
            everyone.append(json.load(fh))
        os.unlink(f"{args.out}.{rank}")
    print(json.dumps(everyone))
    return 0


if __name__ == "__main__":
    sys.exit(main())
