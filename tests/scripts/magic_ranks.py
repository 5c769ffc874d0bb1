"""Refusals of a data-parallel metagradient, in real process groups (tests/test_magic_ddp.py).

    python magic_ranks.py disagree   # 2 gloo ranks; rank 1 builds its optimizer with another lr
    python magic_ranks.py wrapped    # 1 gloo rank; the model wrapped in DistributedDataParallel
"""

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))

import magic_ddp as ex  # noqa: E402

from seedreg import SeedregError, magic  # noqa: E402


def run(rank: int, world: int, port: int, case: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model, loader, opt = ex.parts()
        if case == "disagree" and rank == 1:
            opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        if case == "wrapped":
            model = torch.nn.parallel.DistributedDataParallel(model)
        try:
            magic.metagradient(model, loader, opt, epochs=1, loss=ex.per_example, target=ex.target)
            print(f"rank {rank}: no error", flush=True)
        except SeedregError as exc:
            print(f"rank {rank}: {exc}", flush=True)
        dist.barrier()
    finally:
        # gloo aborts now and then in its teardown ("terminate called without an active exception"):
        # what this script checks is printed, so leave without it
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    case = sys.argv[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2 if case == "disagree" else 1
    torch.multiprocessing.spawn(run, args=(world, port, case), nprocs=world)
