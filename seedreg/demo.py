"""The demo: train a small CNN on generated data, write the manifest, replay it in a fresh process,
and show that seeds and final weights agree bit for bit.

The toy dataset and model live here so the examples and tests share them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .fingerprint import fingerprint
from .manifest import Manifest
from .session import SeedSession

__all__ = ["ToyImages", "ToyTokens", "TinyCNN", "train_toy", "run_demo"]


class ToyImages(torch.utils.data.Dataset):
    """`n` small 3-channel images in `classes` classes, generated from a fixed seed (no download).

    ``__getitem__`` augments with python's `random` (a flip), numpy (noise) and torch (a shift),
    so that every source of data-loading randomness is exercised.
    """

    def __init__(self, n: int = 512, *, size: int = 12, classes: int = 4, augment: bool = True) -> None:
        rng = np.random.Generator(np.random.PCG64(20240531))
        self.labels = rng.integers(0, classes, size=n)
        centers = rng.normal(size=(classes, 3, size, size)).astype(np.float32)
        self.images = (centers[self.labels] + 0.8 * rng.normal(size=(n, 3, size, size))).astype(np.float32)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[i].copy())
        if self.augment:
            if random.random() < 0.5:
                x = x.flip(-1)
            x = x + torch.from_numpy(np.random.normal(0.0, 0.05, size=x.shape).astype(np.float32))
            shift = int(torch.randint(-1, 2, ()).item())
            x = x.roll(shift, dims=-2)
        return x, int(self.labels[i])


class ToyTokens(torch.utils.data.Dataset):
    """`n` sequences of 16 token ids (5..59) with a label from the first token, generated from a
    fixed seed; ``__getitem__`` masks 15% of the tokens at random (id 4) from torch's global
    generator, and returns what a Hugging Face model takes (``input_ids``, ``attention_mask``,
    ``labels``)."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(7)
        self.ids = rng.integers(5, 60, size=(n, 16))
        self.labels = (self.ids[:, 0] > 32).astype(np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.ids[i].copy())
        ids[torch.rand(16) < 0.15] = 4
        return {"input_ids": ids, "attention_mask": torch.ones(16, dtype=torch.long), "labels": torch.tensor(self.labels[i])}


class TinyCNN(torch.nn.Module):
    """Two convolutions, batch norm, dropout and a linear head."""

    def __init__(self, classes: int = 4, width: int = 16, dropout: float = 0.25) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.drop(x.mean(dim=(-2, -1)))
        return self.head(x)


def train_toy(
    session: SeedSession,
    *,
    epochs: int = 2,
    num_workers: int = 0,
    batch_size: int = 32,
    n: int = 256,
    instance_id: Any = "training",
) -> torch.nn.Module:
    """Train TinyCNN on ToyImages with everything built by `session`; returns the trained model."""
    session.setup()
    model = session.build_model(TinyCNN, instance_id)
    optimizer = session.build_optimizer(torch.optim.SGD, model.parameters(), instance_id, lr=0.05, momentum=0.9)
    loader = session.build_dataloader(ToyImages(n), instance_id, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model


def _run(session: SeedSession, out: pathlib.Path, name: str, epochs: int, workers: int) -> Dict[str, Any]:
    torch.set_num_threads(1)
    model = train_toy(session, epochs=epochs, num_workers=workers)
    weights = out / f"{name}-weights.pt"
    torch.save(model.state_dict(), weights)
    session.record_result("final_weights", model)  # compared by the replay
    manifest = session.dump(out / f"{name}-manifest.json")
    return {"weights": str(weights), "manifest": str(manifest), "fingerprint": fingerprint(model)}


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def run_demo(out: pathlib.Path, *, master_seed: int = 42, epochs: int = 3, workers: int = 2, echo: Any = print) -> bool:
    """Record a run here, replay it from its manifest in a fresh process; True if the replay's
    verdict is ``bitwise`` (seeds, uses, environment and the final weights all agree)."""
    out = pathlib.Path(out).resolve()  # absolute: a directory named '-x' is no option to the replay process
    out.mkdir(parents=True, exist_ok=True)
    echo(f"seedreg demo: training TinyCNN on generated data ({epochs} epochs, {workers} workers), master seed {master_seed}")
    original = _run(SeedSession(master_seed), out, "original", epochs, workers)
    echo(f"  wrote {original['manifest']}")
    echo("  replaying from the manifest in a fresh process ...")
    proc = subprocess.run(
        [sys.executable, "-m", "seedreg.demo", "replay", original["manifest"], str(out), "--epochs", str(epochs), "--workers", str(workers)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the replay process failed:\n{proc.stderr.strip()}")
    replayed = json.loads(proc.stdout.strip().splitlines()[-1])
    a, b = Manifest.load(original["manifest"]), Manifest.load(replayed["manifest"])
    rows: List[List[str]] = [["purpose", "instance", "kind", "uses", "original seed", "replayed seed"]]
    for r in a.records:
        other = b.record(r.purpose, r.instance_id)
        rows.append([r.purpose, repr(r.instance_id), r.kind, str(r.uses), str(r.seed), str(other.seed if other else "-")])
    echo("")
    echo(_table(rows))
    report = b.replay or {}
    results = report.get("results", {})
    echo("")
    echo(_table([
        ["result", "original", "replayed", ""],
        ["final_weights", original["fingerprint"][:23] + "...", replayed["fingerprint"][:23] + "...",
         "matched" if "final_weights" in results.get("matched", []) else "DIFFERENT"],
    ]))
    echo("")
    verdict = report.get("verdict", "?")
    echo(f"replay verdict: {verdict} (missing {len(report.get('missing', []))}, new {len(report.get('new', []))}, "
         f"mismatches {len(report.get('mismatches', []))}, results matched {len(results.get('matched', []))} of {len(a.results)})")
    for reason in report.get("reasons", []):
        echo(f"  {reason}")
    echo(f"the manifest holds {len(a.records)} records, {len(a.results)} result(s), the settings applied ({', '.join(sorted(a.applied))}),")
    echo(f"the environment (torch {a.environment.get('torch')}, numpy {a.environment.get('numpy')}, {a.environment.get('platform')}, "
         f"CPU kernels {a.environment.get('cpu_capability')}) and {len(a.violations)} violations.")
    echo(f"inspect it: seedreg show {original['manifest']}")
    ok = verdict == "bitwise"
    echo("DEMO OK: the replay matched bit for bit" if ok else "DEMO FAILED: the runs differ")
    return ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seedreg.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="train and write OUT/original-manifest.json and weights")
    rec.add_argument("out")
    rec.add_argument("--seed", type=int, default=42)
    rep = sub.add_parser("replay", help="replay MANIFEST; print a JSON line with the results")
    rep.add_argument("manifest")
    rep.add_argument("out")
    for p in (rec, rep):
        p.add_argument("--epochs", type=int, default=3)
        p.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "record":
        result = _run(SeedSession(args.seed), out, "original", args.epochs, args.workers)
    else:
        result = _run(SeedSession.from_manifest(args.manifest), out, "replayed", args.epochs, args.workers)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so that classes are named seedreg.demo.* (as in the
    # recording process), not __main__.*: a replay compares model classes by name.
    from seedreg.demo import main as _main

    sys.exit(_main())
