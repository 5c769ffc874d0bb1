"""Hardening: bad input everywhere, fuzzed manifests and states, concurrency, faults, diagnostics."""

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seedreg import (
    DeterministicSampler,
    Manifest,
    ManifestError,
    SeedregError,
    SeedSession,
    derive_seed,
    fingerprint,
)
from seedreg.demo import TinyCNN, ToyImages
from seedreg.files import _temp_prefix
from seedreg.manifest import with_checksum, render

from .conftest import child_env, run_python

S = SeedSession(1).setup()
BAD_CALLS = [
    ("derive_seed(master=None)", lambda: derive_seed(None, "m")),
    ("derive_seed(master=2**40)", lambda: derive_seed(2**40, "m")),
    ("derive_seed(master=nan)", lambda: derive_seed(float("nan"), "m")),
    ("derive_seed(purpose=[])", lambda: derive_seed(1, [])),
    ("derive_seed(scheme=1)", lambda: derive_seed(1, "m", scheme=1)),
    ("SeedSession(master='42')", lambda: SeedSession("42").setup()),
    ("SeedSession(master=1.5)", lambda: SeedSession(1.5).setup()),
    ("SeedSession(warn_only=None)", lambda: SeedSession(1, warn_only=None).setup()),
    ("SeedSession(world_size=0)", lambda: SeedSession(1, world_size=0).setup()),
    ("SeedSession(rank=-1)", lambda: SeedSession(1, rank=-1, world_size=2).setup()),
    ("SeedSession(rank=True)", lambda: SeedSession(1, rank=True, world_size=2).setup()),
    ("seed(purpose='')", lambda: S.seed("")),
    ("seed(purpose=None)", lambda: S.seed(None)),
    ("seed(instance_id=1.0)", lambda: S.seed("m", 1.0)),
    ("seed(instance_id=False)", lambda: S.seed("m", False)),
    ("generator(device='tpu9')", lambda: S.generator("g", device="tpu9")),
    ("fork(devices=['x'])", lambda: S.fork("f", devices=["x"])),
    ("numpy_rng(instance_id=[])", lambda: S.numpy_rng("n", [])),
    ("build_model(factory=3)", lambda: S.build_model(3)),
    ("build_optimizer(class=None)", lambda: S.build_optimizer(None, [])),
    ("build_dataloader(dataset=3)", lambda: S.build_dataloader(3)),
    ("build_dataloader([])", lambda: S.build_dataloader([])),
    ("build_dataloader(batch_size=-1)", lambda: S.build_dataloader([1, 2], batch_size=-1)),
    ("build_dataloader(batch_size=2.0)", lambda: S.build_dataloader([1, 2], batch_size=2.0)),
    ("build_dataloader(subset=[5])", lambda: S.build_dataloader([1, 2], subset=[5])),
    ("build_dataloader(subset=mask of wrong size)", lambda: S.build_dataloader([1, 2], subset=np.ones(3, bool))),
    ("subset_mask(alpha=nan)", lambda: S.subset_mask(10, float("nan"), 0)),
    ("subset_mask(n=0)", lambda: S.subset_mask(0, 0.5, 0)),
    ("subset_mask(alpha=-0.1)", lambda: S.subset_mask(10, -0.1, 0)),
    ("DeterministicSampler(-1)", lambda: DeterministicSampler(-1)),
    ("DeterministicSampler(seed=2**64)", lambda: DeterministicSampler(3, seed=2**64)),
    ("DeterministicSampler(shuffle='yes')", lambda: DeterministicSampler(3, shuffle="yes")),
    ("DeterministicSampler.set_epoch(-1)", lambda: DeterministicSampler(3).set_epoch(-1)),
    ("Manifest.from_dict([])", lambda: Manifest.from_dict([])),
    ("Manifest.from_json('')", lambda: Manifest.from_json("")),
    ("load_state_dict(None)", lambda: SeedSession(1).setup().load_state_dict(None)),
    ("fingerprint(3)", lambda: fingerprint(3)),
    ("from_manifest(strict='yes')", lambda: SeedSession.from_manifest(SeedSession(1).setup().manifest(), strict="yes")),
]


class TestBadInput:
    @pytest.mark.parametrize("name,call", BAD_CALLS, ids=[n for n, _ in BAD_CALLS])
    def test_clear_error(self, name, call):
        """A TypeError/ValueError/SeedregError from seedreg itself, whose message names the argument."""
        with pytest.raises((TypeError, ValueError, SeedregError)) as info:
            call()
        tb = info.traceback[-1]
        assert "seedreg" in str(tb.path) or "derive" in str(tb.path), f"raised from {tb.path}"
        assert len(str(info.value)) > 10


# -- fuzzing ---------------------------------------------------------------------------------------

COUNT = {"manifest_bytes": 0, "manifest_dicts": 0, "states": 0}


def _valid_manifest() -> Manifest:
    s = SeedSession(42).setup()
    s.setup()
    s.build_model(TinyCNN, "training")
    s.build_dataloader(ToyImages(8), "training", batch_size=2)
    s.subset_mask(10, 0.5, 3)
    s.seed("m", 0)
    return s.manifest()


VALID = _valid_manifest()
VALID_TEXT = VALID.to_json()
VALID_DICT = VALID.to_dict()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def damaged_text(draw):
    how = draw(st.sampled_from(["truncate", "flip", "insert", "random", "deep", "huge", "resealed"]))
    return how, draw(_damage(how))


@st.composite
def _damage(draw, how):
    data = VALID_TEXT.encode()
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    if how == "insert":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=20)) + data[i:]
    if how == "deep":  # with a valid checksum, so the parser and validator see it
        depth = draw(st.integers(10, 200_000))
        return with_checksum("{\n" + '  "x": ' + "[" * depth + "]" * depth + "\n}\n").encode()
    if how == "huge":
        digits = "9" * draw(st.integers(10, 20_000))
        return with_checksum(VALID_TEXT.split("\n", 2)[2].join(["{\n", ""]).replace('"master_seed": 42', f'"master_seed": {digits}')).encode()
    if how == "resealed":  # any byte-level damage, then a correct checksum: validation must catch it
        i = draw(st.integers(2, len(data) - 1))
        body = data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i + 1 :]
        try:
            return with_checksum("{\n" + body.decode("utf-8").split("\n", 2)[2]).encode()
        except (UnicodeDecodeError, IndexError):
            return body
    return draw(st.binary(max_size=200))


def _paths(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


MANIFEST_PATHS = [p for p in _paths(VALID_DICT) if p[0] != "checksum"]


def mutate(data, path, how, value):
    target = data
    for key in path[:-1]:
        target = target[key]
    if how == "remove":
        if isinstance(target, dict):
            del target[path[-1]]
        else:
            target.pop(path[-1])
    else:
        target[path[-1]] = value
    return data


class TestFuzzManifest:
    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(damaged_text())
    def test_damaged_files_only_raise_manifest_error(self, case):
        how, data = case
        COUNT["manifest_bytes"] += 1
        try:
            m = Manifest.from_json(data)
        except ManifestError:
            return
        if how != "resealed":  # a resealed edit may still be a valid manifest; damage never is
            assert m == VALID

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(MANIFEST_PATHS), st.sampled_from(["remove", "retype"]), json_values, st.booleans())
    def test_edited_dicts_only_raise_manifest_error(self, path, how, value, fix_checksum):
        """Fields removed or retyped, with the checksum kept (must fail) or recomputed (must validate)."""
        COUNT["manifest_dicts"] += 1
        data = mutate(copy.deepcopy(VALID_DICT), path, how, value)
        if fix_checksum:
            data.pop("checksum", None)
            text = with_checksum(render(data))
            try:
                Manifest.from_json(text)
            except ManifestError:
                pass
            return
        try:
            m = Manifest.from_dict(data)
        except ManifestError:
            return
        assert m.to_dict() == VALID_DICT  # unchanged content (the value written was the same)


def _state():
    s = SeedSession(3).setup()
    s.seed("a", 1)
    loader = s.build_dataloader(ToyImages(12), "d", batch_size=4, shuffle=True)
    next(iter(loader))
    return s.state_dict()


VALID_STATE = _state()
STATE_PATHS = list(_paths(VALID_STATE))


class TestFuzzState:
    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(STATE_PATHS), st.sampled_from(["remove", "retype"]), json_values)
    def test_damaged_states_only_raise_state_errors(self, path, how, value):
        COUNT["states"] += 1
        state = mutate(copy.deepcopy(VALID_STATE), path, how, value)
        s = SeedSession(3).setup()
        loader = s.build_dataloader(ToyImages(12), "d", batch_size=4, shuffle=True)
        before = loader.state_dict()
        try:
            s.load_state_dict(state)
        except SeedregError:
            assert loader.state_dict() == before  # nothing changed


def test_fuzz_counts():
    """How many fuzzed cases ran (reported in the README's Reliability section)."""
    assert COUNT["manifest_bytes"] >= 400 and COUNT["manifest_dicts"] >= 400 and COUNT["states"] >= 400


# -- concurrency -------------------------------------------------------------------------------------


def test_dump_while_other_threads_request_seeds(tmp_path):
    s = SeedSession(9, scheme="sha256-v2").setup()
    stop = threading.Event()

    def requester(t):
        # new keys up to 5,000 a thread, then memoized ones: the registry stops growing, so ten dumps
        # take bounded time however fast the threads run (unbounded, they outran the dumps on 3.12)
        i = 0
        while not stop.is_set():
            s.seed("c", t * 1_000_000 + i % 5_000)
            i += 1

    threads = [threading.Thread(target=requester, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    sizes = []
    try:
        for _ in range(10):
            m = Manifest.load(s.dump(tmp_path / "m.json"))
            sizes.append(len(m.records))
            assert all(r.seed == derive_seed(9, r.purpose, r.instance_id, scheme="sha256-v2") for r in m.records)
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert sizes == sorted(sizes) and sizes[-1] > 0


# -- faults --------------------------------------------------------------------------------------------

DUMPER = r"""
import sys
from seedreg import SeedSession
s = SeedSession(5)
path = sys.argv[1]
i = 0
while True:
    for _ in range(200):
        s.seed("x", i); i += 1
    s.dump(path)
    print(i, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_repeated_dumps_leaves_a_whole_manifest(tmp_path):
    """Killed at 6 moments in the middle of repeated dumps: the file always loads, old or new."""
    path = tmp_path / "m.json"
    env = child_env()
    kills = 0
    for delay in (0.3, 0.6, 0.9, 1.2, 1.5, 2.0):
        proc = subprocess.Popen([sys.executable, "-c", DUMPER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one dump completed
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        m = Manifest.load(path)
        assert len(m.records) % 200 == 0 and m.records[-1].instance_id == len(m.records) - 1
        leftovers = [p for p in os.listdir(tmp_path) if p != "m.json"]
        assert len(leftovers) <= 1  # at most the killed writer's temporary file; the next dump removes it
        for p in leftovers:
            assert p.startswith(_temp_prefix(path)) and p.endswith(".tmp")
    assert kills == 6
    SeedSession(1).setup().dump(path)
    assert os.listdir(tmp_path) == ["m.json"]


def test_unwritable_target_gives_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    from seedreg import ManifestWriteError

    s = SeedSession(1).setup()
    p = s.dump(tmp_path / "m.json")
    before = p.read_bytes()
    real_replace = os.replace

    def read_only(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    s.seed("more")
    with pytest.raises(ManifestWriteError, match="Read-only"):
        s.dump(p)
    monkeypatch.setattr(os, "replace", real_replace)
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["m.json"]
    with pytest.raises(ManifestWriteError):
        s.dump(p / "inside-a-file.json")


class Crashing(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        if i == 11:
            raise KeyError(f"example {i} is broken")
        return torch.tensor([i])


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_crash_surfaces_and_state_stays_sound(workers):
    s = SeedSession(2).setup()
    loader = s.build_dataloader(Crashing(), "d", batch_size=2, shuffle=False, num_workers=workers)
    got = []
    with pytest.raises(KeyError, match="example 11 is broken"):
        for batch in loader:
            got.append(batch)
    assert len(got) == 5  # batches 0..4 were consumed; batch 5 held the broken example
    state = s.state_dict()
    assert state["loaders"][0]["sampler"]["position"] == 10
    json.dumps(state)
    s2 = SeedSession(2).setup()
    loader2 = s2.build_dataloader(Crashing(), "d", batch_size=2, num_workers=workers)
    s2.load_state_dict(state)
    assert loader2.sampler.position == 10


# -- determinism diagnostics -------------------------------------------------------------------------

VIOLATION = r"""
import sys, torch
from torch._prims_common import alert_not_deterministic
from seedreg import SeedSession
s = SeedSession(1, warn_only=sys.argv[2] == "warn").setup()
alert_not_deterministic("my_nondeterministic_op")
s.dump(sys.argv[1])
print("ran")
"""


@pytest.mark.slow
class TestDiagnostics:
    def test_violation_recorded_and_shown(self, tmp_path):
        pytest.importorskip("torch._prims_common")
        path = tmp_path / "m.json"
        run_python(["-c", VIOLATION, path, "warn"])
        m = Manifest.load(path)
        assert m.violations == ({"kind": "nondeterministic_op", "message": "my_nondeterministic_op"},)
        out = run_python(["-m", "seedreg", "show", path]).stdout
        assert "violations (1)" in out and "my_nondeterministic_op" in out

    def test_strict_mode_raises_at_the_op(self, tmp_path):
        proc = run_python(["-c", VIOLATION, tmp_path / "m.json", "strict"], check=False)
        assert proc.returncode != 0 and "my_nondeterministic_op" in proc.stderr and "ran" not in proc.stdout

    def test_env_recorded_and_env_command_warns(self):
        env = SeedSession(1).setup().manifest().environment
        for key in ("cublas_workspace_config", "cudnn_allow_tf32", "cuda_matmul_allow_tf32", "float32_matmul_precision", "autocast_cpu", "compiled_graphs"):
            assert key in env
        code = "import torch; torch.set_float32_matmul_precision('medium'); from seedreg.cli import main; main(['env'])"
        out = run_python(["-c", code]).stdout
        assert "[warn] float32 matmul precision is 'medium'" in out


# -- third round (issue: stores, streaming states, races, memory) --------------------------------------------


class _Heavy(torch.utils.data.IterableDataset):
    """A stateful stream whose state is about 300 KB (a cache, a shuffle buffer)."""

    def __init__(self):
        self.i = 0

    def state_dict(self):
        return {"i": self.i, "cache": "x" * 300_000}

    def load_state_dict(self, state):
        self.i = state["i"]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        while self.i < 40:
            i, self.i = self.i, self.i + 1
            if i % nw == wid:
                yield torch.tensor([i])


@pytest.mark.slow
def test_a_streaming_state_of_any_size_resumes():
    """4 workers with 300 KB dataset states: the 1.2 MB state that state_dict() returns resumes
    (it was accepted by load_state_dict, then the first batch failed: the resume plan's 1 MiB)."""
    def loader():
        return SeedSession(2).setup().build_dataloader(_Heavy(), "s", batch_size=2, num_workers=4)

    whole = [b.tolist() for b in loader()]
    first = loader()
    it = iter(first)
    taken = [next(it).tolist() for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    assert len(json.dumps(state)) > 1_200_000
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b.tolist() for b in resumed]
    assert sorted(map(str, taken + rest)) == sorted(map(str, whole))


@pytest.mark.parametrize("change,message", [
    (lambda s: s["workers"].__setitem__("01", s["workers"].pop("1")), "worker ids"),
    (lambda s: s["workers"].__setitem__("\u0661", s["workers"].pop("1")), "worker ids"),  # Arabic-Indic one
    (lambda s: s["workers"]["0"].update(count=2**62, position=2**62), "fast-forward"),
    (lambda s: s["workers"]["0"].update(count=5, position=3), "takes at most what it draws"),
], ids=["leading-zero", "arabic-indic-digit", "huge-count", "count-past-position"])
def test_crafted_streaming_worker_states_are_refused(change, message):
    from seedreg import StateError
    from tests.test_streaming import Generated

    def loader():
        return SeedSession(2).setup().build_dataloader(Generated(40), "g", batch_size=2, num_workers=2)

    first = loader()
    it = iter(first)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    del it
    change(state)
    with pytest.raises(StateError, match=message):
        loader().load_state_dict(state)


def test_state_dict_while_another_thread_builds_loaders():
    """One thread builds and drops loaders (up to 200 alive) while another takes state_dict():
    it raised 'dictionary changed size during iteration'."""
    session = SeedSession(4).setup()
    done = threading.Event()
    errors = []

    def build():
        alive = []
        for i in range(3000):
            alive.append(session.build_dataloader(list(range(4)), f"l{i % 40}"))
            if len(alive) == 200:
                alive.clear()
        done.set()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows within a few builds
    thread = threading.Thread(target=build)
    thread.start()
    try:
        while not done.is_set():
            try:
                session.live_loaders()
                session.state_dict()
            except RuntimeError as exc:
                errors.append(exc)
                break
    finally:
        thread.join()
        sys.setswitchinterval(switch)
    assert errors == []


def test_a_loaded_state_is_not_shared_with_the_caller():
    session = SeedSession(4).setup()
    session.build_dataloader(list(range(8)), "l", batch_size=2)
    state = session.state_dict()
    other = SeedSession(4).setup()
    other.build_dataloader(list(range(8)), "l", batch_size=2)
    other.load_state_dict(state)
    state["rng"]["python"]["state"] = "changed by the caller"
    assert other.state_dict()["rng"] != state["rng"]
    mine = other.state_dict()
    mine["rng"]["torch"] = "changed"
    assert other.state_dict()["rng"]["torch"] != "changed"


def test_a_cuda_key_that_is_a_digit_but_not_an_int_is_a_state_error():
    from seedreg import StateError

    session = SeedSession(4).setup()
    state = session.state_dict()
    state["rng"]["cuda"] = {"\u00b2": "AAAA"}  # superscript two: str.isdigit() says yes, int() says no
    with pytest.raises(StateError, match="device indices"):
        session.load_state_dict(state)


def _resealed(manifest_text: str, edit) -> str:
    lines = manifest_text.split("\n")
    body = "\n".join(lines[:1] + lines[2:])  # without the checksum line
    return with_checksum(edit(body))


def test_a_sealed_manifest_with_a_malformed_replay_section_is_refused(tmp_path):
    text = SeedSession(1).setup().manifest().to_json()
    bad = _resealed(text, lambda body: body.replace('"replay": null', '"replay": {"verdict": 5, "results": {}, "reasons": []}'))
    (tmp_path / "m.json").write_text(bad)
    with pytest.raises(ManifestError, match=r"manifest\['replay'\]\['verdict'\]"):
        Manifest.load(tmp_path / "m.json")
    proc = run_python(["-m", "seedreg", "show", tmp_path / "m.json"], check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "replay" in proc.stderr


@pytest.mark.slow
def test_a_manifest_of_tiny_values_on_one_line_is_refused_in_bounded_memory(tmp_path):
    """A sealed manifest whose records are one line of 10 million empty lists (30 MB): refused
    before parsing, so the reader's memory grows by a small multiple of the file, not ~24x."""
    text = SeedSession(1).setup().manifest().to_json()
    bomb = "[" + ",".join(["[]"] * 10_000_000) + "]"
    sealed = _resealed(text, lambda body: body.replace('"records": []', '"records": ' + bomb))
    path = tmp_path / "bomb.json"
    path.write_text(sealed)
    code = (
        "import resource, sys\nfrom seedreg import Manifest, ManifestError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    Manifest.load(sys.argv[1])\nexcept ManifestError as exc:\n    print('refused:', exc)\n"
        "print('grew', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = run_python(["-c", code, path]).stdout
    assert "refused:" in out and "tiny JSON values" in out, out
    grew_kb = int(out.rsplit("grew", 1)[1])
    assert grew_kb * 1024 < 5 * path.stat().st_size, (grew_kb, path.stat().st_size)
