"""Crafted input, second round: resume states validated whole, manifests and the command line.

Each case here was found by crafting input as an attacker or a careful user would; each failed
before the fix (partial application, a traceback, a hang, a forged seed served).
"""

import base64
import copy
import os
import stat
import subprocess
import sys
import tracemalloc

import pytest
import torch

from seedreg import Manifest, ManifestError, SeedRecord, SeedSession, StateError
from seedreg.cli import main as cli_main
from seedreg.demo import ToyImages
from seedreg.manifest import with_checksum, render
from seedreg.rng import capture_global

from .conftest import child_env


def _session_with_loader():
    s = SeedSession(3).setup()
    s.seed("a", 1)
    loader = s.build_dataloader(ToyImages(12), "d", batch_size=4, shuffle=True)
    return s, loader


def _state():
    s, loader = _session_with_loader()
    next(iter(loader))
    return s.state_dict()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _torch_state_zero_body() -> str:
    state = torch.Generator().get_state().numpy().copy()
    state[24 : 24 + 624 * 8] = 0  # the Mersenne Twister words; the header stays valid
    return _b64(state.tobytes())


def _torch_state_invalid() -> str:
    state = torch.Generator().get_state().numpy().copy()
    state[8:24] = 255  # right length, invalid header
    return _b64(state.tobytes())


CRAFTED_STATES = [
    ("torch state of the right length, invalid content", lambda st: st["rng"].update(torch=_torch_state_invalid()), "refused by torch"),
    ("all-zero torch state with a valid header", lambda st: st["rng"].update(torch=_torch_state_zero_body()), "draws only zeros"),
    ("CUDA state on a machine without that device", lambda st: st["rng"].update(cuda={str(torch.cuda.device_count()): "AAAA"}), "CUDA"),
    ("5000-digit CUDA device key", lambda st: st["rng"].update(cuda={"9" * 5000: "AAAA"}), "device indices"),
    ("python RNG version -1", lambda st: st["rng"]["python"].update(version=-1), "version"),
    ("python RNG version 2**80", lambda st: st["rng"]["python"].update(version=2**80), "version"),
    ("python gauss_next infinite", lambda st: st["rng"]["python"].update(gauss_next=10**400), "gauss_next"),
    ("all-zero python state", lambda st: st["rng"]["python"].update(words=_b64(bytes(625 * 4))), "all zeros"),
    ("numpy has_gauss 2**70", lambda st: st["rng"]["numpy"].update(has_gauss=2**70), "has_gauss"),
    ("numpy cached_gaussian 10**400", lambda st: st["rng"]["numpy"].update(cached_gaussian=10**400), "cached_gaussian"),
    ("all-zero numpy state", lambda st: st["rng"]["numpy"].update(keys=_b64(bytes(624 * 4))), "all zeros"),
    ("record instance_id 10**5000", lambda st: st["records"][0].update(instance_id=10**5000), "instance_id"),
    ("purpose with a lone surrogate", lambda st: st["records"][0].update(purpose="a\ud800"), "surrogate"),
    ("sampler epoch 2**64", lambda st: st["loaders"][0]["sampler"].update(epoch=2**64), "epoch"),
    ("sampler position -1", lambda st: st["loaders"][0]["sampler"].update(position=-1), "position"),
]


class TestCraftedStates:
    @pytest.mark.parametrize("name,mutate,needle", CRAFTED_STATES, ids=[c[0] for c in CRAFTED_STATES])
    def test_refused_before_anything_changes(self, name, mutate, needle):
        state = copy.deepcopy(_state())
        mutate(state)
        s, loader = _session_with_loader()
        before_rng = capture_global()
        before_loader = loader.state_dict()
        before_records = s.records
        with pytest.raises(StateError, match=needle):
            s.load_state_dict(state)
        assert capture_global() == before_rng and loader.state_dict() == before_loader and s.records == before_records
        assert len(list(loader)) == 3  # the loader still works from where it was

    def test_two_keys_the_registry_would_refuse(self):
        """("model_a", None) and ("model", "a") share a seed under sha256-v1: never both installed."""
        state = _state()
        s = SeedSession(3).setup()
        seed = s.seed("model_a")
        state["records"] = [
            {"purpose": "model_a", "instance_id": None, "seed": seed, "kind": "seed", "uses": 1, "log": []},
            {"purpose": "model", "instance_id": "a", "seed": seed, "kind": "seed", "uses": 1, "log": []},
        ]
        state["loaders"] = []
        with pytest.raises(StateError, match="collision"):
            SeedSession(3).setup().load_state_dict(state)

    def test_a_replaying_session_checks_the_state_against_the_manifest(self, tmp_path):
        s = SeedSession(3).setup()
        s.seed("a", 1)
        data = s.manifest().to_dict()
        data.pop("checksum")
        data["records"][0]["seed"] += 1  # an edited seed, resealed
        forged = Manifest.from_json(with_checksum(render(data)))
        state = SeedSession(3).setup()
        state.seed("a", 1)
        with pytest.raises(StateError, match="manifest recorded"):
            SeedSession.from_manifest(forged).load_state_dict(state.state_dict())
        other = SeedSession(3).setup()
        other.seed("not", "recorded")
        with pytest.raises(StateError, match="never issued"):
            SeedSession.from_manifest(s.manifest()).load_state_dict(other.state_dict())


def _sealed(tmp_path, edit):
    s = SeedSession(1).setup()
    s.build_model(torch.nn.Linear, "m", in_features=2, out_features=1)
    data = s.manifest().to_dict()
    data.pop("checksum")
    edit(data)
    path = tmp_path / "m.json"
    path.write_text(with_checksum(render(data)))
    return path


class TestManifestFiles:
    def test_show_on_odd_but_valid_details(self, tmp_path, capsys):
        path = _sealed(tmp_path, lambda d: d["records"][0]["log"][0]["details"].update({"class": 7, "fingerprint": 8}))
        assert cli_main(["show", str(path)]) == 0
        assert "7" in capsys.readouterr().out

    def test_control_characters_are_escaped(self, tmp_path, capsys):
        path = _sealed(tmp_path, lambda d: d["records"][0].update(purpose="x\x1b[2K\x1b[1A"))
        assert cli_main(["show", str(path)]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "x\\x1b[2K\\x1b[1A" in out

    def test_duplicate_keys_refused(self, tmp_path):
        path = _sealed(tmp_path, lambda d: None)
        text = path.read_text()
        lines = text.split("\n")
        i = next(k for k, line in enumerate(lines) if line.startswith('  "master_seed"'))
        lines.insert(i, '  "master_seed": 43,')
        body = "\n".join(["{"] + lines[2:])  # the checksum line dropped, then resealed
        with pytest.raises(ManifestError, match="twice"):
            Manifest.from_json(with_checksum(body))

    def test_special_files_are_refused_at_once(self, tmp_path):
        with pytest.raises(ManifestError, match="not a regular file"):
            Manifest.load("/dev/zero")
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(ManifestError, match="not a regular file"):
            Manifest.load(fifo)  # would block forever reading a FIFO nobody writes
        assert cli_main(["show", "/dev/zero"]) == 2

    def test_peak_memory_a_few_times_the_file(self, tmp_path):
        records = tuple(SeedRecord(purpose="model", instance_id=f"lds_{i}", seed=i * 7919, kind="seed") for i in range(40_000))
        Manifest(master_seed=1, scheme="sha256-v2", records=records, settings={"deterministic": True, "warn_only": True, "fill_uninitialized_memory": True}).write(tmp_path / "m.json")
        size = (tmp_path / "m.json").stat().st_size
        tracemalloc.start()
        m = Manifest.load(tmp_path / "m.json")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(m.records) == 40_000 and peak < 7 * size, (peak, size)

    def test_mode_follows_the_umask_and_an_existing_file(self, tmp_path):
        old = os.umask(0o022)
        try:
            path = SeedSession(1).setup().dump(tmp_path / "m.json")
            assert stat.S_IMODE(path.stat().st_mode) == 0o644
            os.chmod(path, 0o640)
            SeedSession(1).setup().dump(path)
            assert stat.S_IMODE(path.stat().st_mode) == 0o640
        finally:
            os.umask(old)

    def test_a_255_byte_name(self, tmp_path):
        path = SeedSession(1).setup().dump(tmp_path / ("m" * 250 + ".json"))
        assert Manifest.load(path).master_seed == 1

    def test_temp_files_of_a_killed_writer_are_cleaned(self, tmp_path):
        from seedreg.files import _temp_prefix

        target = tmp_path / "m.json"
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=120).stdout.strip()
        stale = tmp_path / f"{_temp_prefix(target)}{dead}.deadbeef.tmp"
        alive = tmp_path / f"{_temp_prefix(target)}{os.getpid()}.cafe.tmp"
        stale.write_bytes(b"half a manifest")
        alive.write_bytes(b"another writer, still running")
        SeedSession(1).setup().dump(target)
        assert not stale.exists() and alive.exists()


class TestCommandLine:
    def test_closed_pipe_exits_quietly(self, tmp_path):
        path = SeedSession(1).setup().dump(tmp_path / "m.json")
        proc = subprocess.run(
            f"'{sys.executable}' -m seedreg show '{path}' | head -c 10",
            shell=True, capture_output=True, text=True, env=child_env(), timeout=120,
        )
        assert proc.stderr == "" and proc.stdout == "manifest /"

    def test_unexpected_errors_are_one_line(self, monkeypatch, capsys):
        import seedreg.cli

        def boom(args):
            raise AttributeError("'int' object has no attribute 'rsplit'")

        monkeypatch.setattr(seedreg.cli, "_cmd_env", boom)
        assert cli_main(["env"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err

