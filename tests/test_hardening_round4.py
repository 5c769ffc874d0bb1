"""Hardening round 4: each finding of the red team, reproduced, then refused (or made exact)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from seedreg import ManifestError, SeedSession, StateError, Study, StudyError
from seedreg.cli import main as cli
from seedreg.magic import StepCheckpoints
from seedreg.tracefile import MAGIC, TraceData, load_trace

from .conftest import child_env


def _checkpoints(store, **kw):
    s = SeedSession(3).setup()
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = s.build_dataloader(torch.randn(8, 2), "train", batch_size=2)
    ckpt = StepCheckpoints(s, model, opt, loader, every=2, store=store, **kw)
    ckpt.maybe_save(0)
    for t, x in enumerate(loader):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        ckpt.maybe_save(t + 1)
    return ckpt


# -- 1. overwrite=True removes only what the store's marker proves seedreg wrote ----------------------


def test_overwrite_never_deletes_a_users_files_in_a_folder_seedreg_never_claimed(tmp_path: pathlib.Path) -> None:
    mine = {"step-3.json": b'{"my": "notes"}', "step-10.pt": b"my tensors"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(StateError, match=r"step-10\.pt but no seedreg-store\.json: seedreg never claimed"):
        _checkpoints(tmp_path, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == mine  # untouched, and nothing claimed


def test_overwrite_replaces_its_own_run_and_refuses_a_foreign_file_among_them(tmp_path: pathlib.Path) -> None:
    _checkpoints(tmp_path)
    ours = sorted(p.name for p in tmp_path.iterdir())
    assert "step-2.pt" in ours and "step-2.json" in ours
    _checkpoints(tmp_path, overwrite=True)  # its own states: replaced
    (tmp_path / "step-99.json").write_text('{"format": "seedreg-step-checkpoints", "run": "someone else", "step": 99}')
    (tmp_path / "step-2.pt").write_bytes(b"edited by hand")  # no longer what the run recorded
    with pytest.raises(StateError, match=r"step-2\.pt was not written by the run that claimed"):
        _checkpoints(tmp_path, overwrite=True)
    assert (tmp_path / "step-99.json").exists() and (tmp_path / "step-2.pt").read_bytes() == b"edited by hand"


@pytest.mark.parametrize("kind", ["directory", "link"])
def test_a_directory_or_link_named_like_a_state_is_refused_by_name(tmp_path: pathlib.Path, kind: str) -> None:
    _checkpoints(tmp_path)
    target = tmp_path / "step-4.json"
    outside = tmp_path.parent / f"outside-{kind}"
    outside.write_text("not seedreg's")
    target.unlink()
    if kind == "directory":
        target.mkdir()
        (target / "inside").write_text("kept")
    else:
        target.symlink_to(outside)
    with pytest.raises(StateError, match=r"holds step-4\.json, which is a link or a directory"):
        _checkpoints(tmp_path, overwrite=True)
    assert outside.read_text() == "not seedreg's"
    assert kind == "link" or (target / "inside").read_text() == "kept"


# -- 2, 3, 7. trace files: header density, size before reading, NUL names ------------------------------


def _trace_file(header: bytes) -> bytes:
    body = MAGIC + struct.pack("<Q", len(header)) + header + b"\0" * (-len(header) % 8)
    return body + hashlib.sha256(body).digest()


def test_a_dense_crafted_trace_header_is_refused_before_it_is_parsed() -> None:
    payload = _trace_file(b"[" + b"{}," * (8 << 18) + b"{}]")  # 6 MiB of tiny objects, a valid digest
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError, match="tiny JSON values"):
            TraceData.decode(payload, "crafted.trace")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(payload), peak  # 0.3 parsed it first: 34 times its size


def test_a_trace_file_larger_than_recorded_is_refused_unread(tmp_path: pathlib.Path) -> None:
    sparse = tmp_path / "run.json.trace"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)  # a 1 GiB sparse file
    entry = {"file": sparse.name, "sha256": "sha256:" + "0" * 64, "bytes": 700, "steps": 1, "tensors": 2, "every": 1,
             "grads": False, "first_step": 0, "last_step": 0}
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError, match=r"is 1073741824 bytes, more than the 700 expected"):
            load_trace(tmp_path / "run.json", entry)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_nul_byte_in_the_trace_file_name_is_a_manifest_error(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    s = SeedSession(0)
    model = torch.nn.Linear(2, 1)
    trace = s.trace(model)
    trace.step(0, loss=model(torch.ones(2)).sum())
    path = s.dump(tmp_path / "run.json")
    data = json.loads(path.read_text())
    data.pop("checksum")
    data["trace"]["file"] = "run.json\0.trace"
    from seedreg.manifest import with_checksum, render

    path.write_text(with_checksum(render(data)))
    with pytest.raises(ManifestError, match="must be a file name beside the manifest"):
        SeedSession.from_manifest(path)
    assert cli(["show", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "must be a file name beside the manifest" in captured.err


# -- 4, 5, 6. studies: a bounded num_models, artifact names, stale lock files -------------------------

DEF = dict(master_seed=42, num_models=4, num_examples=10, alpha=0.5, num_outputs=2)


def _fill(study: Study, ids) -> None:
    for i in ids:
        with study.run(i) as run:
            path = run.artifact("weights.txt")
            path.write_text(f"model {i}")
            run.save(torch.zeros(2))


def test_a_crafted_num_models_is_refused_before_anything_is_sized(tmp_path: pathlib.Path) -> None:
    from seedreg.study import definition as defn

    root = tmp_path / "s"
    Study(root, **DEF)
    d = defn.read_definition(root / "study.json")
    d["num_models"] = 2**31 - 1
    (root / "study.json").write_text(defn.definition_text(d))  # the checksum recomputed
    for name, width in (("masks.npy", 10), ("outputs.npy", 2)):  # sparse arrays whose headers agree
        dtype = defn.ARRAYS[name]
        np.lib.format.open_memmap(root / name, mode="w+", dtype=dtype, shape=(1, width))
        with open(root / name, "r+b") as f:
            header = np.lib.format.header_data_from_array_1_0(np.zeros((1, width), dtype))
            header["shape"] = (2**31 - 1, width)
            f.seek(0)
            np.lib.format.write_array_header_1_0(f, header)
            f.truncate(f.tell() + (2**31 - 1) * width * dtype.itemsize)
    rc = subprocess.run([sys.executable, "-m", "seedreg", "study", "status", str(root)], env=child_env(),
                        capture_output=True, text=True, timeout=120)
    assert rc.returncode == 2 and "num_models" in rc.stderr and str(defn.MAX_MODELS) in rc.stderr, rc.stderr[-2000:]


def test_artifact_names_are_checked_on_every_path(tmp_path: pathlib.Path) -> None:
    study = Study(tmp_path / "s", **DEF)
    _fill(study, [0])
    assert study.artifact(0, "weights.txt").read_text() == "model 0"
    (study.root / "study-notes.txt").write_text("outside")
    for bad in ("../../../study.json", "/etc/passwd", "..", "w\n", "a/b"):
        with pytest.raises(StudyError, match="plain file name"):
            study.artifact(0, bad)
    (study.artifact(0, "weights.txt").parent / "unrecorded.txt").write_text("never saved")
    with pytest.raises(StudyError, match=r"recorded no artifact 'unrecorded\.txt' \(its save\(\) recorded \['weights\.txt'\]\)"):
        study.artifact(0, "unrecorded.txt")
    with study.run(1) as run:
        with pytest.raises(StudyError, match="plain file name"):
            run.artifact("w\n")
        run.save(torch.zeros(2))


def test_grow_takes_over_a_stale_lock_file_as_run_does(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "s"
    Study(root, **DEF)
    code = ("import os, sys; from seedreg import Study\ns = Study.open(sys.argv[1], lock='lockfile')\n"
            "with s.run(0):\n    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], env=child_env(), timeout=120)
    assert proc.returncode == -9 and (root / "locks.d" / "0.lock").exists()
    study = Study.open(root, lock="lockfile").grow(8)
    assert study.num_models == 8 and not (root / "locks.d" / "0.lock").exists()
    _fill(study, [0])
    assert study.completed() == [0]
