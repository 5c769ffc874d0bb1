"""seedreg's costs next to plain PyTorch, measured in one run.

    python benchmarks/run.py           # the full table (a few minutes on 2 cores)
    python benchmarks/run.py --quick   # a smoke run with tiny sizes (the tests run this)
    python benchmarks/run.py --study-scale   # also the 50,000 x 50,000 study audit

Each line times a seedreg operation and its plain-PyTorch baseline alternately, several rounds,
and reports medians and their ratio against the target. Timings on shared machines are noisy;
ratios from one run are what to compare.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import resnet9, small_cnn  # noqa: E402

from seedreg import DeterministicSampler, Manifest, SeedRecord, SeedregWarning, SeedSession, derive_seed  # noqa: E402
from seedreg.demo import TinyCNN, ToyImages  # noqa: E402

# The builders are timed on sessions that are not set up: setup() would switch on deterministic
# algorithms in this process under the plain-PyTorch baselines. Their warning says so; not here.
warnings.filterwarnings("ignore", message=r".*was called before setup\(\)", category=SeedregWarning)


def per_call(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def compare(ours: Callable[[], object], base: Callable[[], object], number: int, rounds: int) -> Tuple[float, float]:
    """Median seconds per call of `ours` and `base`, timed alternately."""
    a, b = [], []
    ours(); base()
    for _ in range(rounds):
        a.append(per_call(ours, number))
        b.append(per_call(base, number))
    return statistics.median(a), statistics.median(b)


def fmt(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


class Table:
    def __init__(self) -> None:
        self.rows: List[Dict[str, object]] = []

    def add(self, name: str, ours: float, base: Optional[float], target: str, ok: bool, note: str = "") -> None:
        row = {
            "operation": name,
            "seedreg": fmt(ours) if base is not None or "bytes" not in note else note,
            "baseline": fmt(base) if base is not None else "-",
            "ratio": f"{ours / base:.2f}x" if base else "-",
            "target": target,
            "met": "yes" if ok else "NO",
        }
        self.rows.append(row)
        print(" | ".join(str(v) for v in row.values()), flush=True)

    def markdown(self) -> str:
        cols = list(self.rows[0])
        lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
        lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in self.rows]
        return "\n".join(lines)


def bench_derive(t: Table, q: bool) -> None:
    n, r = (2_000, 3) if q else (20_000, 7)
    ids = [f"lds_{i}" for i in range(64)]
    it = iter(range(10**9))

    def ours_v1():
        return derive_seed(42, "model", ids[next(it) & 63])

    def base_v1():  # one SHA-256 and int.from_bytes: the formula's first 32 bits, top bit cleared
        return int.from_bytes(hashlib.sha256(f"42_model_{ids[next(it) & 63]}".encode()).digest()[:4], "big") & 0x7FFFFFFF

    def ours_v2():
        return derive_seed(42, "model", ids[next(it) & 63], scheme="sha256-v2")

    def base_v2():
        return int.from_bytes(hashlib.sha256(f"42_model_{ids[next(it) & 63]}".encode()).digest()[:8], "big") >> 1

    o, b = compare(ours_v1, base_v1, n, r)
    t.add("derive_seed (sha256-v1) vs one SHA-256 + int.from_bytes", o, b, "<= 1.5x", o / b <= 1.5)
    o, b = compare(ours_v2, base_v2, n, r)
    t.add("derive_seed (sha256-v2)", o, b, "<= 1.5x", o / b <= 1.5)


def bench_seed(t: Table, q: bool) -> None:
    n, r = (20_000, 3) if q else (500_000, 7)
    s = SeedSession(1)
    s.seed("model", "training")

    class Plain:
        def __init__(self) -> None:
            self.d = {("model", "training"): 5}

        def get(self, purpose, instance_id=None):
            return self.d[(purpose, instance_id)]

    p = Plain()
    o, b = compare(lambda: s.seed("model", "training"), lambda: p.get("model", "training"), n, r)
    t.add("memoized session.seed()", o, b, "<= 3x and < 0.5 us", o / b <= 3 and o < 0.5e-6)


def bench_fork(t: Table, q: bool) -> None:
    n, r = (2_000, 3) if q else (50_000, 7)
    s = SeedSession(1)
    seed = derive_seed(1, "noise")  # the key's every use is a fork (a seed() first would log each fork as another kind)
    gen = torch.default_generator

    def ours():
        with s.fork("noise"):
            pass

    def base():
        with torch.random.fork_rng(devices=[]):
            gen.manual_seed(seed)

    o, b = compare(ours, base, n, r)
    t.add("session.fork() enter+exit", o, b, "<= 1.5x", o / b <= 1.5)


def bench_build_model(t: Table, q: bool) -> None:
    n, r = (1, 3) if q else (3, 21)
    factory = TinyCNN if q else resnet9
    s = SeedSession(1)

    def base():
        m = factory()
        h = hashlib.sha256()
        for v in m.state_dict().values():
            h.update(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    keys = itertools.count()  # a key per model: one key built again would be the same model (and warn so)
    o, b = compare(lambda: s.build_model(factory, f"m{next(keys)}"), base, n, r)
    t.add(f"build_model ({'TinyCNN' if q else 'ResNet-9'}, fingerprint included)", o, b, "<= 1.05x", o / b <= 1.05)


def bench_build_dataloader(t: Table, q: bool) -> None:
    n, r = (100, 3) if q else (2_000, 7)
    ds = ToyImages(256 if q else 50_000, augment=False)
    s = SeedSession(1)

    def base():
        # the plain-PyTorch deterministic loader: a seeded generator of its own
        g = torch.Generator()
        g.manual_seed(1234)
        return DataLoader(ds, batch_size=64, shuffle=True, generator=g)

    o, b = compare(lambda: s.build_dataloader(ds, "d", batch_size=64, shuffle=True), base, n, r)
    t.add("build_dataloader vs a plain DataLoader(...)", o, b, "<= 2x", o / b <= 2)


def bench_sampler(t: Table, q: bool) -> None:
    size = 10_000 if q else 1_000_000
    n, r = (3, 3) if q else (3, 7)
    ours_sampler = DeterministicSampler(size, seed=1)
    g = torch.Generator()
    g.manual_seed(1)
    base_sampler = RandomSampler(range(size), generator=g)
    o, b = compare(lambda: list(ours_sampler), lambda: list(base_sampler), n, r)
    t.add(f"one epoch of sampler indices ({size:,} examples)", o, b, "<= 1.2x", o / b <= 1.2)


class Small(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 8)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def bench_per_example(t: Table, q: bool) -> None:
    size = 512 if q else 8_192
    r = 3 if q else 7
    ds = Small(size)
    s = SeedSession(1)
    with_seed = s.build_dataloader(ds, "a", batch_size=64, shuffle=True)
    without = s.build_dataloader(ds, "b", batch_size=64, shuffle=True, seed_per_example=False)
    o, b = compare(lambda: [x for x in with_seed], lambda: [x for x in without], 1, r)
    extra = (o - b) / size
    t.add("per-example seeding (main process, batch 64)", extra, None, "< 10 us per example", extra < 10e-6, note="per example")


def bench_epoch(t: Table, q: bool) -> None:
    size = 256 if q else 4_096
    rounds = 2 if q else 15
    ds = ToyImages(size)
    torch.set_num_threads(1)

    def plain_epoch() -> None:
        torch.manual_seed(0)
        model = TinyCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator()
        g.manual_seed(0)
        loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=2, generator=g)
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    def seedreg_epoch(per_example: bool = True) -> None:
        s = SeedSession(0)
        model = s.build_model(TinyCNN)
        opt = s.build_optimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9)
        loader = s.build_dataloader(ds, batch_size=64, shuffle=True, num_workers=2, seed_per_example=per_example)
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    o, b = compare(seedreg_epoch, plain_epoch, 1, rounds)
    t.add(f"one training epoch (TinyCNN, {size} examples, 2 workers)", o, b, "<= 1.02x", o / b <= 1.02)
    o, b = compare(lambda: seedreg_epoch(False), plain_epoch, 1, rounds)
    t.add("the same with seed_per_example=False", o, b, "<= 1.02x", o / b <= 1.02)


def bench_trace(t: Table, q: bool) -> None:
    """A step trace's cost: the demo's training (TinyCNN, ToyImages, batch 32, 2 workers, one CPU
    thread) with ``trace.step(step, loss=loss)`` after each optimizer step, against the same
    training without; then the bare step (no loader), where the trace's fixed cost shows most."""
    rounds = 3 if q else 11
    torch.set_num_threads(1)
    ds = ToyImages(64 if q else 512)

    def demo_epoch(every: Optional[int]) -> Callable[[], object]:
        def run() -> None:
            s = SeedSession(0)
            model = s.build_model(TinyCNN)
            opt = s.build_optimizer(torch.optim.SGD, model.parameters(), lr=0.05, momentum=0.9)
            loader = s.build_dataloader(ds, batch_size=32, shuffle=True, num_workers=2)
            trace = s.trace(model, every=every) if every else None
            for step, (x, y) in enumerate(loader):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                if trace is not None:
                    trace.step(step, loss=loss)

        return run

    o, b = compare(demo_epoch(1), demo_epoch(None), 1, rounds)
    t.add(f"trace every step: the demo's training ({len(ds)} examples, batch 32, 2 workers)", o, b, "<= 1.03x", o / b <= 1.03)
    x = torch.stack([ds[i][0] for i in range(32)])
    y = torch.tensor([int(ds[i][1]) for i in range(32)])

    def bare(every: Optional[int], model_fn: Callable[[], torch.nn.Module] = TinyCNN, xb: torch.Tensor = x,
             yb: torch.Tensor = y) -> Callable[[], object]:
        s = SeedSession(0)
        model = s.build_model(model_fn)
        opt = s.build_optimizer(torch.optim.SGD, model.parameters(), lr=0.01, momentum=0.9)
        trace = s.trace(model, every=every) if every else None
        count = [0]

        def step() -> None:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            if trace is not None:
                trace.step(count[0], loss=loss)
            count[0] += 1

        return step

    number = 20 if q else 200
    o, b = compare(bare(1), bare(None), number, rounds)
    t.add("trace every step: the bare TinyCNN step (batch 32, no loader)", o, b, "<= 1.03x", o / b <= 1.03)
    o, b = compare(bare(10), bare(None), number, rounds)
    t.add("trace every 10th step: the same bare step", o, b, "<= 1.01x", o / b <= 1.01)
    xr = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    yr = torch.arange(32) % 10
    o, b = compare(bare(1, resnet9, xr, yr), bare(None, resnet9, xr, yr), 1 if q else 3, rounds)
    t.add("trace every step: a ResNet-9 step (6.6M parameters, batch 32, CPU)", o, b, "<= 1.03x", o / b <= 1.03)
    # an MLP: nothing but parameters, so the fingerprint's cost per parameter shows whole
    xm = torch.randn(32, 1024, generator=torch.Generator().manual_seed(0))
    ym = torch.arange(32) % 10

    def fresh_mlp() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1536), torch.nn.ReLU(),
                                   torch.nn.Linear(1536, 10))

    n = 5 if q else 40
    o, b = compare(bare(1, fresh_mlp, xm, ym), bare(None, fresh_mlp, xm, ym), n, rounds)
    t.add("trace every step: an MLP step (5.3M parameters, batch 32, CPU)", o, b, "<= 1.25x", o / b <= 1.25)
    o, b = compare(bare(10, fresh_mlp, xm, ym), bare(None, fresh_mlp, xm, ym), n, rounds)
    t.add("trace every 10th step: the same MLP step", o, b, "<= 1.03x", o / b <= 1.03)


def bench_state(t: Table, q: bool) -> None:
    n, r = (50, 3) if q else (1_000, 7)
    s = SeedSession(1)
    s.seed("model")

    def ours():
        s.load_state_dict(s.state_dict())

    def base():
        st = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        torch.set_rng_state(st[0])
        np.random.set_state(st[1])
        random.setstate(st[2])

    o, b = compare(ours, base, n, r)
    t.add("state_dict() + load_state_dict() vs raw RNG get/set", o, b, "<= 2.5x", o / b <= 2.5)


def bench_manifest(t: Table, q: bool, tmp: str) -> None:
    count = 2_000 if q else 100_000
    r = 3 if q else 5
    records = tuple(SeedRecord(purpose="model", instance_id=f"lds_{i}", seed=i * 7919, kind="model") for i in range(count))
    m = Manifest(master_seed=1, scheme="sha256-v2", records=records, settings={"deterministic": True, "warn_only": True, "fill_uninitialized_memory": True})
    path = os.path.join(tmp, "m.json")
    plain = [{"purpose": r.purpose, "instance_id": r.instance_id, "seed": r.seed, "kind": r.kind, "uses": 1, "details": {}} for r in records]
    plain_path = os.path.join(tmp, "p.json")

    def ours():
        m.write(path)
        Manifest.load(path)

    def base():
        with open(plain_path, "w") as fh:
            fh.write(json.dumps(plain))
        with open(plain_path) as fh:
            json.loads(fh.read())

    o, b = compare(ours, base, 1, r)
    t.add(f"manifest dump + load ({count:,} records)", o, b, "<= 3x", o / b <= 3)
    m.write(path)

    def load_ours():
        Manifest.load(path)

    def load_base():  # the same file's text, parsed as plain JSON
        with open(path, "rb") as fh:
            json.loads(fh.read())

    o, b = compare(load_ours, load_base, 1, r)
    t.add(f"Manifest.load ({count:,} records) vs json.loads of the same file", o, b, "<= 2x", o / b <= 2)


def bench_memory(t: Table, q: bool) -> None:
    count = 20_000 if q else 1_000_000
    gc.collect()
    tracemalloc.start()
    s = SeedSession(1, scheme="sha256-v2")
    for i in range(count):
        s.seed("model", f"lds_{i}")
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per = current / count
    t.add(f"registry memory ({count:,} records, ids included)", per, None, "<= 300 bytes a record", per <= 300, note=f"{per:.0f} bytes")


def fabricate(study, ids, logs: int = 100) -> None:
    """Completion records for `ids` in `logs` task logs, each line a real manifest's size: a study
    with that many completed models, made in seconds (the index and the logs as save() writes them)."""
    import json as _json

    from seedreg.study.logs import make_record, outputs_digest

    template = study.manifest_of(int(study.completed()[0])).to_dict()
    row = np.zeros(study.num_outputs, np.float32)
    digest = outputs_digest(row)
    ids = list(ids)
    per = -(-len(ids) // logs)
    for k in range(0, len(ids), per):
        name = os.path.join(study.root, "tasks", f"fabricated-{k}")
        offset, lines, recs = 0, [], []
        for i in ids[k:k + per]:
            line = (_json.dumps({"model_id": i, "attempt": 1, "manifest": template}, separators=(",", ":")) + "\n").encode()
            recs.append(make_record(i, 1, offset, line, digest))
            lines.append(line)
            offset += len(line)
        with open(name + ".jsonl", "wb") as fh:
            fh.write(b"".join(lines))
        with open(name + ".idx", "wb") as fh:
            fh.write(b"".join(recs))


def _peak_rss_of(code: str, *args: str) -> Tuple[float, int]:
    """(seconds, peak RSS bytes of the largest of its processes) of `code` in a fresh python process."""
    import subprocess

    # VmHWM, not RUSAGE_SELF: Linux carries ru_maxrss across exec, so a child of this (large)
    # process would report this process's peak; its own workers are forked after the exec
    wrapped = code + ("\nimport resource, re; hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
                      "\nprint('PEAK', max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapped, *args], capture_output=True, text=True, check=True).stdout
    took = time.perf_counter() - start
    return took, 1024 * int(out.rsplit("PEAK", 1)[1].split()[0])


def bench_study(t: Table, q: bool, tmp: str, scale: bool) -> None:
    """A study's per-model overhead (no training) against drawing the mask with numpy and writing
    the two rows by hand, with few and with many completed models; opening a large study; the
    streamed audit's time and peak memory; lds_score's memory."""
    from seedreg import Study

    examples = 5_000 if q else 50_000
    rounds, per = (3, 10) if q else (7, 40)
    out = np.zeros(10, np.float32)
    masks = np.lib.format.open_memmap(os.path.join(tmp, "masks.npy"), mode="w+", dtype=bool, shape=(2 * rounds * per + 2, examples))
    outputs = np.lib.format.open_memmap(os.path.join(tmp, "outputs.npy"), mode="w+", dtype=np.float32, shape=(2 * rounds * per + 2, 10))
    big = 2_000 if q else 300_000
    for done, logs in ((200, 16), (2_000, 16), (2_000, 200)) if q else ((1_000, 16), (300_000, 16), (300_000, 1_000)):
        study = Study(os.path.join(tmp, f"study-{done}-{logs}"), master_seed=1, num_models=done + 2 * rounds * per + 2,
                      num_examples=examples, alpha=0.5, num_outputs=10)
        with study.run(done) as run:
            run.save(out)
        fabricate(study, range(done), logs)
        ids = iter(range(done + 1, study.num_models))
        ids_base = iter(range(study.num_models))

        def ours() -> None:
            with study.run(next(ids)) as run:
                run.save(out)

        def base() -> None:
            i = next(ids_base) % len(masks)
            rng = np.random.default_rng(i)
            mask = np.zeros(examples, dtype=bool)
            mask[rng.choice(examples, examples // 2, replace=False, shuffle=False)] = True
            masks[i] = mask
            outputs[i] = out

        o, b = compare(ours, base, per, rounds)
        t.add(f"study.run + save per model, {done:,} completed in {logs:,} task logs ({examples:,} examples)", o, b,
              "<= 2x and < 5 ms", o / b <= 2 and o < 5e-3)
        if done == big and logs == 16:
            code = ("import sys, time; t = time.perf_counter(); from seedreg import Study; i = time.perf_counter()\n"
                    "s = Study.open(sys.argv[1]); ids = s.models_for(0, 1000)\nprint('TOOK', time.perf_counter() - i, i - t)")
            import subprocess

            took, imported = map(float, subprocess.run([sys.executable, "-c", code, str(study.root)], capture_output=True, text=True,
                                                       check=True).stdout.split("TOOK")[1].split())
            t.add(f"Study.open + models_for, {done:,} completed (fresh process; the import before it: {imported * 1e3:.0f} ms)",
                  took, None, "< 0.5 s", took < 0.5)
        shutil_rm(str(study.root))
    sizes = [(200, 5_000)] if q else [(10_000, 50_000)] + ([(50_000, 50_000)] if scale else [])
    for models, examples in sizes:
        root = os.path.join(tmp, f"audit-{models}")
        study = Study(root, master_seed=1, num_models=models, num_examples=examples, alpha=0.5, num_outputs=10)
        for i in range(models):
            with study.run(i) as run:
                run.save(out)
        code = "import sys; from seedreg import Study; r = Study.open(sys.argv[1]).audit(); assert r['ok'], r['problems'][:3]"
        took, peak = _peak_rss_of(code, root)
        read = ("import sys, numpy as np, os\nfor name in ('masks.npy', 'outputs.npy'):\n"
                "    with open(os.path.join(sys.argv[1], name), 'rb') as fh:\n"
                "        while fh.read(64 << 20): pass")
        base_took, base_peak = _peak_rss_of(read, root)
        t.add(f"study.audit ({models:,} models x {examples:,} examples), fresh process", took, base_took, "300,000 in < 2 min",
              took * 300_000 / models < 120, note=f"{took:.1f} s; reading the two arrays once: {base_took:.1f} s; "
              f"300,000 extrapolated: {took * 300_000 / models / 60:.1f} min")
        t.add(f"study.audit ({models:,} x {examples:,}) peak memory (all processes: RSS of the largest)", peak, None, "< 1 GB",
              peak < 1 << 30, note=f"{peak / 2**20:.0f} MB resident (bytes; the largest of its processes)")
        shutil_rm(root)
    from seedreg import lds_score

    models, examples, targets = (500, 5_000, 20) if q else (5_000, 50_000, 100)
    rng = np.random.default_rng(0)
    lmasks = rng.random((models, examples)) < 0.5
    scores = rng.normal(size=(examples, targets)).astype(np.float32)
    louts = rng.normal(size=(models, targets))
    tracemalloc.start()
    lds_score(scores, lmasks, louts)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    t.add(f"lds_score memory beyond its inputs ({models:,} x {examples:,} masks)", peak, None, "about one chunk (16 MB)",
          peak < 32 << 20, note=f"{peak / 2**20:.0f} MB (bytes allocated); a float64 copy of the masks would be {lmasks.size * 8 / 2**20:.0f} MB")


def shutil_rm(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def bench_checkpoints(t: Table, q: bool) -> None:
    """MAGIC-style reverse passes: time against one forward pass, and the states each schedule keeps."""
    import math

    from seedreg import StepCheckpoints

    steps = 60 if q else 1_000
    data = torch.utils.data.TensorDataset(torch.randn(200, 32), torch.randint(0, 4, (200,)))

    def build(schedule: str):
        s = SeedSession(3).setup()
        model = s.build_model(lambda: torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 4)), "m")
        opt = s.build_optimizer(torch.optim.SGD, model.parameters(), "m", lr=0.05, momentum=0.9)
        loader = s.build_dataloader(data, "d", batch_size=10, shuffle=True)

        def step_fn(step, indices, batch):
            x, y = batch
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        every = 1 if schedule == "every" else None
        ckpt = StepCheckpoints(s, model, opt, loader, schedule="uniform" if schedule == "every" else schedule, every=every, steps=steps)
        return s, model, loader, ckpt, step_fn

    def forward(loader, ckpt, step_fn) -> float:
        start = time.perf_counter()
        ckpt.maybe_save(0)
        step = 0
        while step < steps:
            for batch in loader:
                step_fn(step, None, batch)
                step += 1
                ckpt.maybe_save(step)
                if step == steps:
                    break
        return time.perf_counter() - start

    def state_bytes(ckpt) -> int:
        st = ckpt.capture()
        tensors = list(st["model"].values()) + [v for o in st["optimizer"] for p in o["state"].values() for v in p.values() if torch.is_tensor(v)]
        return sum(x.numel() * x.element_size() for x in tensors) + len(json.dumps(st["session"]))

    _, _, loader, ckpt, step_fn = build("every")
    forward(loader, ckpt, step_fn)
    every_states, size = len(ckpt.saved), state_bytes(ckpt)
    for schedule, bound, bound_text in (("sqrt", 2 * math.ceil(math.sqrt(steps)), "2*sqrt(T)"), ("log", math.log2(steps) + 2, "log2(T)+2")):
        _, _, loader, ckpt, step_fn = build(schedule)
        fwd = forward(loader, ckpt, step_fn)
        start = time.perf_counter()
        ckpt.reverse(lambda step, indices, batch: None, forward=step_fn)
        rev = time.perf_counter() - start
        target = "<= 2.5x" if schedule == "sqrt" else "(none)"
        t.add(f"reverse pass, {schedule} schedule ({steps:,} steps) vs one forward pass", rev, fwd, target, schedule != "sqrt" or rev / fwd <= 2.5)
        kept = ckpt.peak_states
        t.add(f"states held, {schedule} schedule (every state: {every_states:,})", kept, None, f"<= {bound_text} = {bound:.0f}", kept <= bound,
              note=f"{kept} states, {kept * size / 1e6:.2f} MB (every state: {every_states * size / 1e6:.1f} MB) bytes")


def reverse_rows(t: Table, name: str, stats: List[Dict[str, float]], base: float) -> None:
    """The reverse pass against one training run (medians of the runs' `stats`), and its parts:
    re-running the steps with their graphs, and the VJPs through them."""
    backward = statistics.median(s["seconds_backward"] for s in stats)
    t.add(f"metagradient, {name}: the reverse pass alone vs one training run", backward, base, "<= 2x", backward / base <= 2.0)
    for part, what in (("replay", "re-running the steps with their graphs"), ("vjp", "the VJPs through them")):
        seconds = statistics.median(s[f"seconds_{part}"] for s in stats)
        t.add(f"metagradient, {name}: of the reverse pass, {what}, vs one training run", seconds, base, "(measured)", True)


def bench_metagradient(t: Table, q: bool) -> None:
    """magic.metagradient (sqrt schedule) against one plain training run of the same model and
    loader with torch.optim: a small MLP with BatchNorm, and the demo CNN; states kept, peak memory."""
    import math

    import torch.nn.functional as F

    from seedreg import magic

    def mlp() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                   torch.nn.Linear(64, 4))

    cases = (
        ("small MLP", mlp, torch.utils.data.TensorDataset(torch.randn(400 if q else 2_000, 32), torch.randint(0, 4, (400 if q else 2_000,))),
         torch.randn(8, 32), torch.randint(0, 4, (8,))),
        ("demo CNN", TinyCNN, ToyImages(64 if q else 512), *next(iter(DataLoader(ToyImages(8, augment=False), batch_size=8)))),
        # the CNN: BatchNorm, dropout, max-pooling; 50 batches an epoch, 150 steps
        ("small CNN", small_cnn, ToyImages(64 if q else 1_600, size=16),
         *next(iter(DataLoader(ToyImages(8, size=16, augment=False), batch_size=8)))),
    )
    epochs = 1 if q else 3
    for name, factory, data, x_test, y_test in cases:
        def parts():
            s = SeedSession(3).setup()
            return s.build_model(factory, "m"), s.build_dataloader(data, "d", batch_size=32, shuffle=True)

        def plain() -> float:
            model, loader = parts()
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            start = time.perf_counter()
            for epoch in range(epochs):
                loader.set_epoch(epoch)
                for x, y in loader:
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
            return time.perf_counter() - start

        def meta(torch_optim: bool = False):
            model, loader = parts()
            if torch_optim:  # the optimizer and scheduler objects of a plain loop
                opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                extra = {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))}
            else:
                opt, extra = magic.SGD(0.05, momentum=0.9), {}
            start = time.perf_counter()
            result = magic.metagradient(model, loader, opt, epochs=epochs,
                                        loss=lambda out, y: F.cross_entropy(out, y, reduction="none"),
                                        target=lambda f: F.cross_entropy(f(x_test), y_test), **extra)
            return time.perf_counter() - start, result

        plain()  # warm up
        base = statistics.median(plain() for _ in range(1 if q else 3))
        runs = [meta() for _ in range(1 if q else 3)]
        ours = statistics.median(r[0] for r in runs)
        stats = runs[0][1].stats
        t.add(f"metagradient, sqrt schedule, {name} ({stats['steps']} steps) vs one training run", ours, base, "<= 3x (paper)",
              ours / base <= 3.0)
        reverse_rows(t, name, [r[1].stats for r in runs], base)
        if name == "demo CNN":
            model, loader = parts()
            run = magic.train(model, loader, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), epochs=epochs,
                              loss=lambda out, y: F.cross_entropy(out, y, reduction="none"))
            xs, ys = next(iter(DataLoader(ToyImages(16, augment=False), batch_size=16)))
            start = time.perf_counter()
            for j in range(16):
                run.metagradient(lambda f, j=j: F.cross_entropy(f(xs[j : j + 1]), ys[j : j + 1]))
            singles = time.perf_counter() - start
            start = time.perf_counter()
            run.metagradient(lambda f: F.cross_entropy(f(xs), ys, reduction="none"))
            batched = time.perf_counter() - start
            t.add("metagradient, demo CNN: 16 test examples as one vector target vs 16 scalar targets (one training run)",
                  batched, singles, "<= 0.6x", batched / singles <= 0.6)
            t.add("metagradient, demo CNN: each further scalar target on a trained run vs one training run", singles / 16, base,
                  "<= 2x", singles / 16 / base <= 2.0)
            # the schedules: uniform keeps every state (no recomputation), sqrt about 2 sqrt(T)
            timings: Dict[str, List[float]] = {"uniform": [], "sqrt": [], "log": []}
            kept_by: Dict[str, int] = {}
            for _ in range(1 if q else 3):  # alternated, medians: the two differ by less than the machine's drift
                for schedule in timings:
                    model, loader = parts()
                    start = time.perf_counter()
                    res = magic.metagradient(model, loader, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), epochs=epochs,
                                             schedule=schedule, loss=lambda out, y: F.cross_entropy(out, y, reduction="none"),
                                             target=lambda f: F.cross_entropy(f(x_test), y_test))
                    timings[schedule].append(time.perf_counter() - start)
                    kept_by[schedule] = res.stats["states_kept"]
            by_schedule = {k: (statistics.median(v), kept_by[k]) for k, v in timings.items()}
            (tu, ku), (ts, ks) = by_schedule["uniform"], by_schedule["sqrt"]
            t.add(f"metagradient, demo CNN: uniform schedule ({ku} states held) vs sqrt ({ks} states held)", tu, ts,
                  "<= 1.0x (never slower)", tu <= ts * 1.02)
            state_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
            state_bytes += sum(p.numel() * p.element_size() for p in model.parameters())  # the momentum buffers
            for schedule, (seconds, kept) in by_schedule.items():  # peak memory of the kept states, by schedule
                t.add(f"metagradient, demo CNN: {schedule} schedule, states held at the peak (whole call {seconds:.2f} s)", kept, None,
                      "(measured)", True, note=f"{kept} states x {state_bytes / 1e3:.1f} kB = {kept * state_bytes / 1e6:.2f} MB bytes")
            pairs = [(meta(True)[0], meta(False)[0]) for _ in range(1 if q else 3)]  # alternated, as the schedules
            o, m = statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)
            t.add("metagradient, demo CNN: torch.optim.SGD + CosineAnnealingLR object vs magic.SGD", o, m,
                  "<= 1.05x (no slower)", o / m <= 1.05)
        model = runs[0][1].model
        size = sum(v.numel() * v.element_size() for v in model.state_dict().values())
        size += sum(p.numel() * p.element_size() for p in model.parameters())  # the momentum buffers
        kept = stats["states_kept"]
        t.add(f"metagradient, {name}: training states held at once (of {stats['steps'] + 1})", kept, None,
              f"<= 2*sqrt(T) = {2 * math.ceil(math.sqrt(stats['steps'])):.0f}", kept <= 2 * math.ceil(math.sqrt(stats["steps"])),
              note=f"{kept} states x {size / 1e3:.1f} kB = {kept * size / 1e6:.2f} MB bytes")


def bench_metagradient_ranks(t: Table, q: bool) -> None:
    """examples/magic_ddp.py: 2 gloo ranks (each its half of every global batch of 8) against one
    process on the same global batches: what the differentiated all-reduce costs."""
    import subprocess
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    import magic_ddp as ex

    from seedreg import magic

    def single() -> float:
        model, loader, opt = ex.parts()
        start = time.perf_counter()
        magic.metagradient(model, loader, opt, epochs=ex.EPOCHS, loss=ex.per_example, target=ex.target)
        return time.perf_counter() - start

    def ranks() -> float:
        for attempt in range(3):  # gloo aborts now and then in its teardown, after the work is done
            with tempfile.TemporaryDirectory() as tmp:
                proc = subprocess.run([sys.executable, ex.__file__, "--out", os.path.join(tmp, "r.json")], capture_output=True,
                                      text=True)
            if proc.returncode == 0:
                return max(r["seconds"] for r in json.loads(proc.stdout.strip().splitlines()[-1]))
        raise RuntimeError(f"examples/magic_ddp.py failed 3 times:\n{proc.stderr[-3000:]}")

    single()
    base = statistics.median(single() for _ in range(1 if q else 3))
    ours = statistics.median(ranks() for _ in range(1 if q else 3))
    t.add("metagradient, 2 gloo ranks vs 1 process on the same global batches (MLP, 8 steps)", ours, base, "(measured)", True)


def bench_metagradient_transformer(t: Table, q: bool) -> None:
    """examples/magic_transformer.py: a tiny GPT-2 fine-tuned with frozen embeddings, AdamW with two
    groups, a warm-up scheduler and clipping; one metagradient against one plain training run."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("(transformers not installed: the GPT-2 metagradient row is skipped; pip install -e \".[transformers]\")")
        return
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    import magic_transformer as ex

    from seedreg import magic

    ones = torch.ones(ex.TRAIN, dtype=torch.float64)
    ex.train(ones)  # warm up

    def plain() -> float:
        start = time.perf_counter()
        ex.train(ones)
        return time.perf_counter() - start

    def meta() -> Tuple[float, Dict[str, float]]:
        model, loader, opt, scheduler = ex.parts()
        start = time.perf_counter()
        result = magic.metagradient(model, loader, opt, epochs=ex.EPOCHS, example_losses=ex.example_losses, scheduler=scheduler,
                                    max_grad_norm=ex.CLIP,
                                    target=lambda f: ex.sequence_losses(f(input_ids=ex.TEST_IDS[:1]).logits, ex.TEST_IDS[:1])[0])
        return time.perf_counter() - start, result.stats

    base = statistics.median(plain() for _ in range(1 if q else 3))
    runs = [meta() for _ in range(1 if q else 3)]
    ours = statistics.median(r[0] for r in runs)
    name = "tiny GPT-2 fine-tuning (frozen embeddings, AdamW, warm-up, clipping)"
    t.add(f"metagradient, {name} vs one training run", ours, base, "<= 3x (paper)", ours / base <= 3.0)
    reverse_rows(t, "tiny GPT-2", [r[1] for r in runs], base)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--json", help="also write the table as JSON here")
    parser.add_argument("--only", help="a comma-separated subset of the benchmarks (derive, trace, metagradient, ...)")
    parser.add_argument("--study-scale", action="store_true", help="also audit a 50,000 x 50,000 study (about 10 minutes more)")
    args = parser.parse_args(argv)
    import tempfile

    torch.set_num_threads(1)
    print(f"# seedreg benchmarks: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} cores{' (quick)' if args.quick else ''}")
    print("operation | seedreg | baseline | ratio | target | met")
    t = Table()
    with tempfile.TemporaryDirectory() as tmp:
        benches = {
            "derive": lambda: bench_derive(t, args.quick), "seed": lambda: bench_seed(t, args.quick),
            "fork": lambda: bench_fork(t, args.quick), "build_model": lambda: bench_build_model(t, args.quick),
            "build_dataloader": lambda: bench_build_dataloader(t, args.quick), "sampler": lambda: bench_sampler(t, args.quick),
            "per_example": lambda: bench_per_example(t, args.quick), "state": lambda: bench_state(t, args.quick),
            "manifest": lambda: bench_manifest(t, args.quick, tmp), "memory": lambda: bench_memory(t, args.quick),
            "study": lambda: bench_study(t, args.quick, tmp, args.study_scale),
            "checkpoints": lambda: bench_checkpoints(t, args.quick), "metagradient": lambda: bench_metagradient(t, args.quick),
            "metagradient_transformer": lambda: bench_metagradient_transformer(t, args.quick),
            "metagradient_ranks": lambda: bench_metagradient_ranks(t, args.quick),
            "trace": lambda: bench_trace(t, args.quick), "epoch": lambda: bench_epoch(t, args.quick),
        }
        chosen = args.only.split(",") if args.only else list(benches)
        unknown = [c for c in chosen if c not in benches]
        if unknown:
            parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {sorted(benches)}")
        for name in chosen:
            benches[name]()
    print()
    print(t.markdown())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(t.rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
