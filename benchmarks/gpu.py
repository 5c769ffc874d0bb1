"""What deterministic mode costs on a GPU, and whether two deterministic runs agree bit for bit.

    python benchmarks/gpu.py [--epochs 4] [--examples 50000]

A ResNet-9 on CIFAR-shaped random data already on the device (batch 512, bf16 autocast,
channels_last), one fresh process per configuration:

- ``benchmark``: ``cudnn.benchmark=True``, no deterministic mode (the plain-PyTorch baseline);
- ``seedreg``: ``SeedSession.setup()`` defaults (``fill_uninitialized_memory=True``);
- ``seedreg-nofill``: the same with ``fill_uninitialized_memory=False``;
- ``seedreg-trace``: ``seedreg`` with ``session.trace(model)`` and ``trace.step`` after every
  optimizer step (the trace's cost is its ratio to ``seedreg``);
- ``seedreg`` again, to compare final weights bit for bit.

Prints seconds per steady-state epoch (the first epoch is warm-up), the ratio to the baseline,
and how many ops ran without a deterministic kernel (recorded in the manifest's violations).

    python benchmarks/gpu.py --magic [--examples 5120] [--epochs 2]

MAGIC on the GPU: a ResNet-9 (float32, deterministic mode) on CIFAR-shaped generated data through a
seedreg loader (batch 512): one plain training run against ``magic.train`` and one metagradient,
the peak device memory of each, and on a small float64 MLP on the same device the metagradient
against central finite differences of plain retrains. Needs CUDA; exits 0 with a message without it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run_config(config: str, epochs: int, examples: int) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, HERE)
    from models import resnet9

    from seedreg import SeedSession, fingerprint

    if config == "benchmark":
        torch.backends.cudnn.benchmark = True
        torch.manual_seed(0)
        model = resnet9()
        session = None
    else:
        session = SeedSession(0, fill_uninitialized_memory=(config != "seedreg-nofill")).setup()
        model = session.build_model(resnet9)
    model = model.cuda().to(memory_format=torch.channels_last)
    trace = session.trace(model) if config == "seedreg-trace" and session is not None else None
    step = 0
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True)
    g = torch.Generator(device="cuda")
    g.manual_seed(1)
    x = torch.randn(examples, 3, 32, 32, device="cuda", generator=g).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (examples,), device="cuda", generator=g)
    times = []
    for _ in range(epochs):
        order = torch.randperm(examples, device="cuda", generator=g)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, examples, 512):
            idx = order[i : i + 512]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if trace is not None:
                trace.step(step, loss=loss)
            step += 1
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    return {
        "config": config,
        "seconds_per_epoch": steady,
        "fingerprint": fingerprint(model),
        "violations": len(session.violations) if session else None,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


def run_magic(epochs: int, examples: int) -> None:
    """The rows of ``--magic`` (see the module's docstring)."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, HERE)
    from models import resnet9

    from seedreg import SeedSession, magic

    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(examples, 3, 32, 32, generator=g), torch.randint(0, 10, (examples,), generator=g))
    x_test, y_test = torch.randn(8, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (8,), generator=g).cuda()

    def losses(model, batch):
        x, y = batch
        return F.cross_entropy(model(x.cuda(non_blocking=True)), y.cuda(non_blocking=True), reduction="none")

    def parts():
        session = SeedSession(0).setup()
        model = session.build_model(resnet9).cuda()
        loader = session.build_dataloader(data, "train", batch_size=512, shuffle=True)
        return model, loader, torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True)

    def plain() -> float:
        model, loader, opt = parts()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                opt.zero_grad(set_to_none=True)
                losses(model, batch).mean().backward()
                opt.step()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    plain()  # warm up
    torch.cuda.reset_peak_memory_stats()
    base = plain()
    base_memory = torch.cuda.max_memory_allocated()
    rows = []
    for offload in (True, False):
        model, loader, opt = parts()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run = magic.train(model, loader, opt, epochs=epochs, example_losses=losses, offload=offload)
        result = run.metagradient(lambda f: F.cross_entropy(f(x_test), y_test))
        torch.cuda.synchronize()
        rows.append((offload, time.perf_counter() - start, torch.cuda.max_memory_allocated(), result.stats))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}: ResNet-9, {examples} CIFAR-shaped examples, batch 512, "
          f"float32, {epochs} epochs ({rows[0][3]['steps']} steps)")
    print("| run | seconds | ratio | peak device memory |")
    print("| --- | --- | --- | --- |")
    print(f"| one plain training run | {base:.2f} | 1.00x | {base_memory / 2**30:.2f} GiB |")
    for offload, seconds, memory, stats in rows:
        where = "states on the host" if offload else "states on the device"
        print(f"| magic.train + one metagradient, {where} | {seconds:.2f} | {seconds / base:.2f}x (goal <= 3x) | "
              f"{memory / 2**30:.2f} GiB |")
    # the definition, on the device: a small float64 MLP against central finite differences of plain retrains
    small = torch.utils.data.TensorDataset(torch.randn(32, 6, dtype=torch.float64, generator=g), torch.randint(0, 3, (32,), generator=g))
    xs, ys = torch.randn(4, 6, dtype=torch.float64, generator=g).cuda(), torch.randint(0, 3, (4,), generator=g).cuda()

    def mlp_parts(weights=None):
        session = SeedSession(0).setup()
        model = session.build_model(lambda: torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)),
                                    "mlp").double().cuda()
        loader = session.build_dataloader(small, "small", batch_size=8, shuffle=True,
                                          **({} if weights is None else {"example_weights": weights}))
        return model, loader, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def retrain(weights):
        model, loader, opt = mlp_parts(weights)
        for epoch in range(2):
            loader.set_epoch(epoch)
            for batch, w in loader:
                opt.zero_grad()
                (w.cuda() * losses(model, batch)).mean().backward()
                opt.step()
        with torch.no_grad():
            return float(F.cross_entropy(model.eval()(xs), ys))

    model, loader, opt = mlp_parts()
    grad = magic.metagradient(model, loader, opt, epochs=2, example_losses=losses,
                              target=lambda f: F.cross_entropy(f(xs), ys)).grad.cpu()
    worst = 0.0
    for i in grad.abs().argsort(descending=True)[:3].tolist():
        fd = []
        for sign in (1, -1):
            w = torch.ones(32, dtype=torch.float64)
            w[i] += sign * 1e-5
            fd.append(retrain(w))
        worst = max(worst, abs(grad[i].item() - (fd[0] - fd[1]) / 2e-5) / abs((fd[0] - fd[1]) / 2e-5))
    print(f"\nmetagradient vs central finite differences (float64 MLP on the GPU, 3 largest entries): {worst:.1e} relative")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--magic", action="store_true", help="MAGIC on the GPU (see the module's docstring)")
    args = parser.parse_args()
    if args.config:
        print(json.dumps(run_config(args.config, args.epochs, args.examples)))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device; none is visible.")
        return 0
    if args.magic:
        run_magic(args.epochs, args.examples if args.examples != 50_000 else 5_120)
        return 0
    results = []
    for config in ("benchmark", "seedreg", "seedreg-nofill", "seedreg-trace", "seedreg"):
        env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
        proc = subprocess.run(
            [sys.executable, __file__, "--config", config, "--epochs", str(args.epochs), "--examples", str(args.examples)],
            capture_output=True, text=True, env=env, check=True,
        )
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = results[0]["seconds_per_epoch"]
    print(f"# {results[0]['gpu']}, torch {results[0]['torch']}, ResNet-9, {args.examples} examples, batch 512, bf16 autocast, channels_last")
    print("| settings | s / epoch | ratio | ops without a deterministic kernel |")
    print("| --- | --- | --- | --- |")
    for r in results[:4]:
        print(f"| {r['config']} | {r['seconds_per_epoch']:.3f} | {r['seconds_per_epoch'] / base:.2f}x | {r['violations'] if r['violations'] is not None else '-'} |")
    print(f"\ntrace every step: {results[3]['seconds_per_epoch'] / results[1]['seconds_per_epoch']:.3f}x the seedreg epoch (goal <= 1.02x)")
    same = results[1]["fingerprint"] == results[4]["fingerprint"] == results[3]["fingerprint"]
    print(f"\ntwo deterministic runs, final weights bit for bit equal: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
