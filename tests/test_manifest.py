"""Manifest: content, JSON round trip, atomic writes, refusal of damaged files, diff."""

import json
import os

import pytest

from seedreg import Manifest, ManifestError, ManifestWriteError, SeedregError, SeedSession
from seedreg.demo import TinyCNN, ToyImages


def session_with_everything():
    s = SeedSession(42)
    s.setup()
    s.build_model(TinyCNN, "training")
    s.build_dataloader(ToyImages(16), "training", batch_size=4, shuffle=True)
    s.seed("m", 0)
    s.seed("m", 0)
    return s


class TestContent:
    def test_records_settings_environment(self):
        m = session_with_everything().manifest()
        assert m.master_seed == 42 and m.scheme == "sha256-v1"
        assert [(r.purpose, r.kind) for r in m.records] == [("model", "model"), ("dataloader", "dataloader"), ("m", "seed")]
        assert m.record("m", 0).uses == 2 and m.record("m", "0") is None
        model = m.record("model", "training")
        assert model.details["fingerprint"].startswith("sha256:") and model.details["class"] == "seedreg.demo.TinyCNN"
        loader = m.record("dataloader", "training").details
        assert loader["batch_size"] == 4 and loader["dataset_size"] == 16 and loader["shuffle"] is True
        assert m.settings == {"deterministic": True, "warn_only": True, "fill_uninitialized_memory": True}
        assert m.applied["use_deterministic_algorithms"] is True
        for key in ("python", "torch", "numpy", "cuda", "cudnn", "gpus", "cublas_workspace_config", "cudnn_allow_tf32", "float32_matmul_precision", "world_size"):
            assert key in m.environment

    def test_instance_id_types_survive_json(self, tmp_path):
        s = SeedSession(1, scheme="sha256-v2")
        s.seed("m", 0); s.seed("m", "0"); s.seed("m")
        m = Manifest.load(s.dump(tmp_path / "m.json"))
        assert [r.instance_id for r in m.records] == [0, "0", None]
        assert [type(r.instance_id) for r in m.records] == [int, str, type(None)]

    def test_round_trips(self, tmp_path):
        m = session_with_everything().manifest()
        assert Manifest.from_dict(m.to_dict()) == m
        assert Manifest.from_json(m.to_json()) == m
        assert Manifest.load(m.write(tmp_path / "x.json")) == m
        assert json.loads((tmp_path / "x.json").read_text())["format"] == "seedreg-manifest"

    def test_file_is_readable_and_stable(self, tmp_path):
        text = session_with_everything().manifest().to_json()
        lines = text.splitlines()
        assert lines[0] == "{" and lines[1].startswith('  "checksum": "sha256:')
        assert sum(1 for line in lines if '"purpose":' in line) == 3  # one record per line


class TestRefusals:
    @pytest.fixture
    def path(self, tmp_path):
        return session_with_everything().dump(tmp_path / "m.json")

    def test_truncated(self, path):
        data = path.read_bytes()
        for cut in (0, 1, 50, len(data) // 2, len(data) - 3):
            path.write_bytes(data[:cut])
            with pytest.raises(ManifestError):
                Manifest.load(path)

    def test_hand_edited(self, path):
        path.write_text(path.read_text().replace('"seed": 1958051794', '"seed": 1958051795'))
        with pytest.raises(ManifestError, match="checksum"):
            Manifest.load(path)

    def test_edited_dict_refused(self, path):
        d = Manifest.load(path).to_dict()
        d["records"][0]["seed"] += 1
        with pytest.raises(ManifestError, match="checksum"):
            Manifest.from_dict(d)

    def test_not_json_and_binary(self, path):
        for data in (b"not json at all", b"\x80\x81\x82", b"{\n  \"checksum\": \"sha256:" + b"0" * 64 + b"\",\n"):
            path.write_bytes(data)
            with pytest.raises(ManifestError):
                Manifest.load(path)

    def test_wrong_schema_and_version(self, path):
        d = Manifest.load(path).to_dict()
        for change in ({"schema_version": 3}, {"schema_version": 1}, {"format": "other"}, {"extra": 1}, {"scheme": "md5"}, {"master_seed": -1}):
            bad = {**d, **change}
            bad.pop("checksum")
            with pytest.raises(ManifestError):
                Manifest.from_dict(bad)

    def test_missing_file_and_directory(self, tmp_path):
        with pytest.raises(ManifestError, match="does not exist"):
            Manifest.load(tmp_path / "nope.json")
        with pytest.raises(ManifestError, match="directory"):
            Manifest.load(tmp_path)

    def test_errors_are_value_errors(self):
        assert issubclass(ManifestError, SeedregError) and issubclass(ManifestError, ValueError)

    def test_never_unpickles(self, tmp_path):
        """A pickle payload is just bytes to the loader: refused as not a manifest."""
        import pickle

        p = tmp_path / "evil.json"
        p.write_bytes(pickle.dumps(os.system))
        with pytest.raises(ManifestError):
            Manifest.load(p)


class TestAtomicWrite:
    def test_overwrites_whole_and_leaves_no_temporaries(self, tmp_path):
        s = session_with_everything()
        p = s.dump(tmp_path / "m.json")
        s.seed("later")
        s.dump(p)
        assert Manifest.load(p).record("later") is not None
        assert sorted(os.listdir(tmp_path)) == ["m.json"]

    def test_failed_write_keeps_the_old_file(self, tmp_path, monkeypatch):
        s = session_with_everything()
        p = s.dump(tmp_path / "m.json")
        before = p.read_bytes()

        def broken_fsync(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", broken_fsync)
        s.seed("new")
        with pytest.raises(ManifestWriteError, match="No space left"):
            s.dump(p)
        monkeypatch.undo()
        assert p.read_bytes() == before
        assert sorted(os.listdir(tmp_path)) == ["m.json"]

    def test_missing_directories_are_created(self, tmp_path):
        path = SeedSession(1).dump(tmp_path / "runs" / "exp1" / "m.json")
        assert Manifest.load(path).master_seed == 1

    def test_parent_that_is_a_file(self, tmp_path):
        (tmp_path / "file").write_text("x")
        with pytest.raises(ManifestWriteError, match="directory is writable"):
            SeedSession(1).dump(tmp_path / "file" / "m.json")


class TestDiff:
    def test_same_and_different(self):
        a = session_with_everything().manifest()
        assert a.diff(session_with_everything().manifest()) == []
        s = SeedSession(43)
        s.setup()
        s.build_model(TinyCNN, "training")
        lines = a.diff(s.manifest())
        assert any(line.startswith("master_seed") for line in lines)
        assert any("fingerprint" in line for line in lines)
        assert any("only in the first" in line for line in lines)
