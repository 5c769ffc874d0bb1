"""Replay from a manifest: strictness, fingerprints, the report, bitwise equality across processes."""


import pytest

from seedreg import Manifest, ReplayMismatchError, SeedSession
from seedreg.demo import TinyCNN

from .conftest import SCRIPTS, run_python, run_train


def recorded(tmp_path, **kw):
    s = SeedSession(42, **kw).setup()
    s.seed("noise", 1)
    s.build_model(TinyCNN, "training")
    return s.dump(tmp_path / "m.json")


class TestReplaySession:
    def test_same_seeds_and_settings(self, tmp_path):
        r = SeedSession.from_manifest(recorded(tmp_path, warn_only=False, scheme="sha256-v2"))
        assert r.master_seed == 42 and r.scheme == "sha256-v2" and r.settings.warn_only is False
        assert r.seed("noise", 1) == SeedSession(42, scheme="sha256-v2").setup().seed("noise", 1)

    def test_strict_refuses_new_components(self, tmp_path):
        r = SeedSession.from_manifest(recorded(tmp_path)).setup()
        with pytest.raises(ReplayMismatchError, match="never issued"):
            r.seed("noise", 2)

    def test_loose_records_new_components(self, tmp_path):
        r = SeedSession.from_manifest(recorded(tmp_path), strict=False)
        r.seed("noise", 2)
        report = r.replay_report()
        assert report["new"] == [{"purpose": "noise", "instance_id": 2}]
        assert report["missing"] == [{"purpose": "noise", "instance_id": 1}, {"purpose": "model", "instance_id": "training"}]

    def test_changed_model_initialisation_is_caught(self, tmp_path):
        import torch

        def unseeded():
            m = TinyCNN()
            with torch.no_grad():
                m.head.bias.add_(1.0)  # a different init than the recorded one
            return m

        r = SeedSession.from_manifest(recorded(tmp_path)).setup()
        with pytest.raises(ReplayMismatchError, match="fingerprint"):
            r.build_model(unseeded, "training")

    def test_changed_derivation_always_raises(self, tmp_path):
        d = Manifest.load(recorded(tmp_path)).to_dict()
        d.pop("checksum")
        d["records"][0]["seed"] += 1
        r = SeedSession.from_manifest(Manifest.from_dict(d), strict=False)
        with pytest.raises(ReplayMismatchError, match="derives"):
            r.seed("noise", 1)

    def test_report_verdict(self, tmp_path):
        r = SeedSession.from_manifest(recorded(tmp_path)).setup()
        r.seed("noise", 1)
        r.build_model(TinyCNN, "training")
        report = r.replay_report()
        assert report["verdict"] == "bitwise" and report["missing"] == [] and report["mismatches"] == []
        d = Manifest.load(tmp_path / "m.json").to_dict()
        d.pop("checksum")
        d["environment"]["torch"] = "1.0.0"
        report = SeedSession.from_manifest(Manifest.from_dict(d)).setup().replay_report()
        assert report["verdict"] == "statistical" and "torch" in report["reasons"][0]

    def test_report_goes_into_the_replayed_manifest(self, tmp_path):
        r = SeedSession.from_manifest(recorded(tmp_path)).setup()
        r.seed("noise", 1)
        m = Manifest.load(r.dump(tmp_path / "replayed.json"))
        assert m.replay["verdict"] == "bitwise" and m.replay["missing"] == [{"purpose": "model", "instance_id": "training"}]


@pytest.mark.slow
class TestReplayAcrossProcesses:
    def test_replayed_run_matches_bit_for_bit(self, tmp_path):
        """Record in one process, replay from the manifest in a fresh one: identical weights."""
        manifest = tmp_path / "orig.json"
        a = run_train(tmp_path / "a", "--manifest", str(manifest))
        b = run_train(tmp_path / "b", "--replay", str(manifest), "--manifest", str(tmp_path / "replayed.json"))
        assert a == b
        replayed = Manifest.load(tmp_path / "replayed.json")
        assert replayed.replay["verdict"] == "bitwise" and not replayed.replay["missing"]

    def test_strict_replay_stops_a_changed_script(self, tmp_path):
        manifest = tmp_path / "orig.json"
        run_train(tmp_path / "a", "--manifest", str(manifest), "--workers", "0")
        proc = run_python([SCRIPTS / "train.py", "--out", tmp_path / "b", "--replay", manifest, "--extra-component", "--workers", "0"], check=False)
        assert proc.returncode != 0 and "ReplayMismatchError" in proc.stderr and "'augment'" in proc.stderr


def test_a_strict_replay_without_setup_names_the_missing_call(tmp_path):
    """The README's replay followed without `.setup()`: the recorded run's deterministic settings are
    missing, the global generators unseeded, a result differs; the error says which call is missing."""
    path = tmp_path / "run.json"
    record = ("import sys, torch; from seedreg import SeedSession\n"
              "s = SeedSession(0).setup(); s.record_result('draw', torch.rand(3)); s.dump(sys.argv[1])\n")
    run_python(["-c", record, path])
    replay = ("import sys, torch; from seedreg import SeedSession, ReplayMismatchError\n"
              "s = SeedSession.from_manifest(sys.argv[1])\n"
              "try:\n    s.record_result('draw', torch.rand(3))\nexcept ReplayMismatchError as exc:\n    print(exc)\n")
    out = run_python(["-c", replay, path]).stdout
    assert "call setup() on the replaying session first, SeedSession.from_manifest(path).setup()" in out, out
