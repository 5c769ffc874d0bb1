"""Streaming data: iterable and stateful datasets, seeded per item, sharded, resumed bit for bit.

The resume scenarios follow torchdata's StatefulDataLoader tests (test_state_dict.py: the
iterable and generator cases): run to an interruption point, snapshot, rebuild fresh, load,
finish; compare with an uninterrupted run. Parameterised over workers, persistent workers,
interruption points, resume modes.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset, get_worker_info

from seedreg import Manifest, SeedSession, StateError

from .conftest import ROOT, child_env


def _shard():
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class Generated(IterableDataset):
    """A generator-based stream without state: resumed by fast-forward. Draws from torch and numpy."""

    def __init__(self, n=37):
        self.n = n

    def __iter__(self):
        wid, nw = _shard()
        for i in range(wid, self.n, nw):
            yield torch.tensor([i, int(torch.randint(0, 10**6, ())), int(np.random.randint(0, 10**6))])


class Counter(IterableDataset):
    """A stateful stream (torchdata's Stateful protocol): resumed from its own state."""

    def __init__(self, n=37):
        self.n = n
        self.i = 0
        self.epoch = -1

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.i = 0

    def state_dict(self):
        return {"i": self.i, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.i, self.epoch = state["i"], state["epoch"]

    def __iter__(self):
        wid, nw = _shard()
        while True:
            index = wid + self.i * nw
            if index >= self.n:
                return
            self.i += 1
            yield torch.tensor([index, self.epoch, int(torch.randint(0, 10**6, ()))])


def _loader(session, dataset, workers, persistent):
    return session.build_dataloader(dataset, "stream", batch_size=4, num_workers=workers, persistent_workers=persistent and workers > 0)


def _run(dataset_cls, workers, persistent, interrupt, twice=False):
    """Uninterrupted two epochs, and the same cut at `interrupt` batches of epoch 0 then resumed."""
    whole = []
    s = SeedSession(5).setup()
    loader = _loader(s, dataset_cls(), workers, persistent)
    for epoch in range(2):
        loader.set_epoch(epoch)
        whole += [b.clone() for b in loader]
    s = SeedSession(5).setup()
    loader = _loader(s, dataset_cls(), workers, persistent)
    got = []
    it = iter(loader)
    for _ in range(interrupt):
        got.append(next(it).clone())
    state = json.loads(json.dumps(s.state_dict()))
    if twice:  # a second snapshot later on: it is the one that counts
        got.append(next(it).clone())
        state = json.loads(json.dumps(s.state_dict()))
    del it, loader
    fresh = SeedSession(5).setup()
    loader = _loader(fresh, dataset_cls(), workers, persistent)
    fresh.load_state_dict(state)
    got += [b.clone() for b in loader]  # the rest of epoch 0
    loader.set_epoch(1)
    got += [b.clone() for b in loader]
    return whole, got


@pytest.mark.parametrize("dataset_cls", [Generated, Counter], ids=["fast_forward", "stateful"])
@pytest.mark.parametrize("workers,persistent", [(0, False), (3, False), (3, True)])
@pytest.mark.parametrize("interrupt", [0, 1, 5, 10], ids=["at0", "at1", "mid", "end"])
def test_resume_equals_the_uninterrupted_run(dataset_cls, workers, persistent, interrupt):
    whole, got = _run(dataset_cls, workers, persistent, interrupt)
    assert len(whole) == 20  # 10 batches an epoch (37 items, 4 a batch, split over the streams)
    assert len(got) == len(whole) and all(torch.equal(a, b) for a, b in zip(whole, got))


@pytest.mark.parametrize("dataset_cls", [Generated, Counter])
def test_state_saved_twice(dataset_cls):
    whole, got = _run(dataset_cls, 3, False, 3, twice=True)
    assert all(torch.equal(a, b) for a, b in zip(whole, got)) and len(got) == len(whole)


@pytest.mark.parametrize("workers", [0, 3])
def test_every_item_once_per_epoch_and_epochs_differ(workers):
    s = SeedSession(2).setup()
    loader = _loader(s, Generated(), workers, False)
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append(torch.cat(list(loader)))
    for items in epochs:
        assert sorted(items[:, 0].tolist()) == list(range(37))
    assert not torch.equal(epochs[0][:, 1], epochs[1][:, 1])  # each epoch draws anew
    a = torch.cat(list(_loader(SeedSession(2).setup(), Generated(), workers, False)))
    assert torch.equal(a, epochs[0])  # and the same again in a new session


def test_ranks_split_the_stream_without_workers():
    items = [torch.cat(list(SeedSession(2, rank=r, world_size=2).setup().build_dataloader(Generated(), "s", batch_size=4)))[:, 0].tolist() for r in (0, 1)]
    assert sorted(items[0] + items[1]) == list(range(37)) and not set(items[0]) & set(items[1])


def test_manifest_records_kind_split_and_resume_mode(tmp_path):
    s = SeedSession(2).setup()
    s.build_dataloader(Counter(), "a", batch_size=4, num_workers=2)
    s.build_dataloader(Generated(), "b", batch_size=4)
    m = Manifest.load(s.dump(tmp_path / "m.json"))
    a, b = m.record("dataloader", "a").details, m.record("dataloader", "b").details
    assert a["dataset_kind"] == "iterable" and a["resume_mode"] == "state" and a["worker_split"] == "1 rank(s) x 2 stream(s)"
    assert b["resume_mode"] == "fast_forward"


class Unserialisable(Counter):
    def state_dict(self):
        return {"i": self.i, "when": object()}


def test_bad_input():
    s = SeedSession(2).setup()
    with pytest.raises(ValueError, match="`shuffle=True` needs a map-style dataset"):
        s.build_dataloader(Generated(), shuffle=True)
    with pytest.raises(ValueError, match="`subset` needs a map-style dataset"):
        s.build_dataloader(Generated(), subset=[1, 2])
    loader = s.build_dataloader(Unserialisable(), "u", batch_size=4)
    next(iter(loader))
    with pytest.raises(StateError, match="worker 0's dataset is not JSON-native"):
        s.state_dict()
    state = _loader(SeedSession(3).setup(), Generated(), 3, False).state_dict()
    with pytest.raises(StateError, match="num_workers=3.*resume with the same number"):
        _loader(SeedSession(3).setup(), Generated(), 2, False).load_state_dict(state)


class Curriculum(torch.utils.data.Dataset):
    """A map-style dataset with non-random state of its own."""

    def __init__(self):
        self.level = 0

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([i, self.level])

    def state_dict(self):
        return {"level": self.level}

    def load_state_dict(self, state):
        self.level = state["level"]


def test_map_style_dataset_state_is_saved_and_restored():
    s = SeedSession(1).setup()
    ds = Curriculum()
    loader = s.build_dataloader(ds, "c", batch_size=2)
    next(iter(loader))
    ds.level = 3
    state = s.state_dict()
    fresh_ds = Curriculum()
    fresh = SeedSession(1).setup()
    held = fresh.build_dataloader(fresh_ds, "c", batch_size=2)
    fresh.load_state_dict(state)
    assert fresh_ds.level == 3 and held.sampler.position == 2


@pytest.mark.slow
def test_two_gloo_ranks_read_every_item_once_per_epoch(tmp_path):
    """A real 2-rank gloo job (torchrun) with 2 workers a rank: the ranks' items cover the stream once."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import json, sys, torch, torch.distributed as dist\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from tests.test_streaming import Generated\n"
        "from seedreg import SeedSession\n"
        "dist.init_process_group('gloo')\n"
        "s = SeedSession(4)\n"
        "loader = s.build_dataloader(Generated(), 's', batch_size=4, num_workers=2)\n"
        "out = {}\n"
        "for epoch in range(2):\n"
        "    loader.set_epoch(epoch)\n"
        "    out[epoch] = torch.cat(list(loader))[:, 0].tolist()\n"
        "open(f'{sys.argv[1]}/rank{dist.get_rank()}.json', 'w').write(json.dumps(out))\n"
        "dist.destroy_process_group()\n"
    )
    from .test_distributed import _PORT_TROUBLE, free_port

    env = child_env()
    for attempt in range(3):  # a free port can be taken by another job before torchrun binds it
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                               "--master-port", str(free_port()), script, tmp_path, ROOT], env=env, timeout=240, capture_output=True, text=True)
        if proc.returncode == 0 or attempt == 2 or not any(p in proc.stderr.lower() for p in _PORT_TROUBLE):
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        assert sorted(ranks[0][epoch] + ranks[1][epoch]) == list(range(37))
