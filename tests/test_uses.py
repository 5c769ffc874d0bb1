"""Uses, scopes and results: the manifest tells the whole story, and a replay checks all of it."""

import gc
import json
import logging
import pathlib
import tracemalloc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seedreg import Manifest, ReplayMismatchError, SeedregError, SeedregWarning, SeedSession, StateError, StepCheckpoints
from seedreg.cli import main as cli_main
from seedreg.demo import TinyCNN, ToyImages, train_toy

from .conftest import ROOT, SCRIPTS, run_python

DATA = pathlib.Path(__file__).resolve().parent / "data"


def _loss_step(model, optimizer):
    def step(step, indices, batch):
        x, y = batch
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


class TestUses:
    def test_each_loader_under_one_key_is_its_own_use(self):
        """Three masked loaders under ("dataloader", "training"): three uses, each with its subset."""
        s = SeedSession(1).setup()
        masks = [s.subset_mask(40, 0.5, i, mode="bernoulli") for i in range(3)]
        for m in masks:
            s.build_dataloader(ToyImages(40), "training", batch_size=4, subset=m)
        record = next(r for r in s.records if r.purpose == "dataloader")
        assert record.uses == 3 and [u.use for u in record.log] == [1, 2, 3]
        assert [u.details["subset_size"] for u in record.log] == [int(m.sum()) for m in masks]
        digests = [r.details["digest"] for r in s.records if r.kind == "subset_mask"]
        assert [u.details["subset_digest"] for u in record.log] == digests and len(set(digests)) == 3

    def test_plain_seed_uses_are_counted_not_logged(self):
        s = SeedSession(1).setup()
        for _ in range(5):
            s.seed("noise", 1)
        (r,) = s.records
        assert r.uses == 5 and r.log == ()

    def test_a_key_forked_in_a_loop_keeps_one_log_entry(self, tmp_path):
        s = SeedSession(1).setup()
        s.seed("noise")
        for _ in range(1_000):
            with s.fork("noise"):
                pass
        s.seed("noise")
        (r,) = s.records
        assert r.uses == 1_002 and [(u.use, u.kind, u.count) for u in r.log] == [(2, "fork", 1_000)]
        replay = SeedSession.from_manifest(Manifest.load(s.dump(tmp_path / "m.json")))
        replay.seed("noise")
        for _ in range(1_000):
            with replay.fork("noise"):
                pass
        with pytest.raises(ReplayMismatchError, match="use 1002 is a 'fork' but was a 'seed'"):
            with replay.fork("noise"):
                pass

    def test_optimizer_records_every_param_group(self):
        s = SeedSession(1).setup()
        model = torch.nn.Linear(2, 2)
        s.build_optimizer(torch.optim.SGD, [{"params": [model.weight], "lr": 0.5}, {"params": [model.bias]}], lr=0.1)
        groups = s.records[0].details["param_groups"]
        assert [g["lr"] for g in groups] == [0.5, 0.1] and [g["params"] for g in groups] == [1, 1]

    def test_rebuilding_a_key_with_other_details_warns_once(self, caplog):
        s = SeedSession(1).setup()
        with caplog.at_level(logging.WARNING, logger="seedreg"), pytest.warns(SeedregWarning, match="was built again") as told:
            s.build_model(TinyCNN, "m", width=4)
            s.build_model(TinyCNN, "m", width=8)
            s.build_model(TinyCNN, "m", width=16)
        assert len(told) == 1
        warnings = [r for r in caplog.records if "seedreg_key_reused" in r.getMessage()]
        assert len(warnings) == 1 and "instance_id" in warnings[0].getMessage()

    def test_loaders_differing_only_in_subset_do_not_warn(self, caplog):
        s = SeedSession(1).setup()
        with caplog.at_level(logging.WARNING, logger="seedreg"):
            for i in range(3):
                s.build_dataloader(ToyImages(20), "training", subset=s.subset_mask(20, 0.5, i))
        assert not [r for r in caplog.records if "seedreg_key_reused" in r.getMessage()]


def _recorded(tmp_path, lr=0.05):
    s = SeedSession(3).setup()
    model = s.build_model(TinyCNN, "m")
    s.build_optimizer(torch.optim.SGD, model.parameters(), "m", lr=lr, momentum=0.9)
    s.build_dataloader(ToyImages(16), "train", batch_size=4, shuffle=True)
    with pytest.warns(SeedregWarning, match="was built again"):  # the second use, with other settings, on purpose
        s.build_dataloader(ToyImages(16), "train", batch_size=8)
    s.record_result("answer", 42)
    return s.dump(tmp_path / "m.json")


class TestReplayUseByUse:
    def test_optimizer_hyperparameters_are_checked(self, tmp_path):
        r = SeedSession.from_manifest(_recorded(tmp_path)).setup()
        model = r.build_model(TinyCNN, "m")
        with pytest.raises(ReplayMismatchError, match=r"\('optimizer', 'm'\) use 1: defaults.lr is 0.1 but the manifest recorded 0.05"):
            r.build_optimizer(torch.optim.SGD, model.parameters(), "m", lr=0.1, momentum=0.9)

    def test_loose_mode_lists_the_field(self, tmp_path):
        r = SeedSession.from_manifest(_recorded(tmp_path), strict=False).setup()
        model = r.build_model(TinyCNN, "m")
        r.build_optimizer(torch.optim.SGD, model.parameters(), "m", lr=0.1, momentum=0.9)
        fields = {m["field"] for m in r.replay_report()["mismatches"]}
        assert fields == {"defaults.lr", "param_groups[0].lr"}
        assert all(m["use"] == 1 and m["purpose"] == "optimizer" for m in r.replay_report()["mismatches"])

    def test_second_use_is_checked_against_the_second_recorded_use(self, tmp_path):
        r = SeedSession.from_manifest(_recorded(tmp_path)).setup()
        r.build_dataloader(ToyImages(16), "train", batch_size=4, shuffle=True)
        with pytest.raises(ReplayMismatchError, match=r"\('dataloader', 'train'\) use 2: batch_size is 4 but the manifest recorded 8"), \
                pytest.warns(SeedregWarning, match="was built again"):
            r.build_dataloader(ToyImages(16), "train", batch_size=4)

    def test_a_use_beyond_the_recorded_ones(self, tmp_path):
        r = SeedSession.from_manifest(_recorded(tmp_path)).setup()
        r.build_dataloader(ToyImages(16), "train", batch_size=4, shuffle=True)
        with pytest.warns(SeedregWarning, match="was built again"):
            r.build_dataloader(ToyImages(16), "train", batch_size=8)
        with pytest.raises(ReplayMismatchError, match="3rd time but the recorded run used it 2 time"):
            r.build_dataloader(ToyImages(16), "train", batch_size=8)

    def test_a_use_of_another_kind(self, tmp_path):
        r = SeedSession.from_manifest(_recorded(tmp_path)).setup()
        with pytest.raises(ReplayMismatchError, match="use 1 is a 'seed' but was a 'model'"):
            r.seed("model", "m")

    def test_num_workers_does_not_matter_with_per_example_streams(self, tmp_path):
        r = SeedSession.from_manifest(_recorded(tmp_path)).setup()
        r.build_dataloader(ToyImages(16), "train", batch_size=4, shuffle=True, num_workers=2)
        assert r.replay_report()["mismatches"] == []

    def test_diff_names_the_use_and_the_field(self, tmp_path):
        a = _recorded(tmp_path)
        (tmp_path / "b").mkdir()
        b = _recorded(tmp_path / "b", lr=0.1)
        lines = Manifest.load(a).diff(Manifest.load(b))
        assert "record ('optimizer', 'm') use 1: defaults.lr: 0.05 != 0.1" in lines
        assert not any("{" in line for line in lines if "optimizer" in line)  # the field, not the whole dict twice


class TestResults:
    def test_kinds(self):
        s = SeedSession(0).setup()
        m = torch.nn.Linear(2, 2)
        assert s.record_result("m", m)["kind"] == "module"
        assert s.record_result("sd", m.state_dict())["value"] == s.results[0]["value"]
        assert s.record_result("t", torch.arange(3))["kind"] == "tensor"
        assert s.record_result("a", np.arange(3))["kind"] == "array"
        assert s.record_result("n", np.float32(0.5))["value"] == 0.5
        assert s.record_result("s", "done")["value"] == "done"
        # dtype and shape are part of a fingerprint
        assert s.record_result("t2", torch.arange(3).float())["value"] != s.results[2]["value"]

    def test_bad_results(self):
        s = SeedSession(0).setup()
        s.record_result("x", 1)
        with pytest.raises(ValueError, match="already recorded"):
            s.record_result("x", 2)
        with pytest.raises(TypeError, match="`name`"):
            s.record_result("", 2)
        with pytest.raises(TypeError, match="must be a module"):
            s.record_result("y", object())
        with pytest.raises(ValueError, match="finite"):
            s.record_result("z", float("nan"))

    def _replay(self, tmp_path, value, *, strict=True, env=None):
        s = SeedSession(0)
        s.seed("a")
        s.record_result("w", torch.ones(3))
        m = s.manifest()
        if env:
            m = Manifest.from_dict({**{k: v for k, v in m.to_dict().items() if k != "checksum"}, "environment": {**m.environment, **env}})
        r = SeedSession.from_manifest(m, strict=strict)
        r.seed("a")
        if value is not None:
            r.record_result("w", value)
        return r.replay_report()

    def test_three_verdicts(self, tmp_path):
        ok = self._replay(tmp_path, torch.ones(3))
        assert ok["verdict"] == "bitwise" and ok["results"]["matched"] == ["w"]
        bad = self._replay(tmp_path, torch.zeros(3), strict=False)
        assert bad["verdict"] == "diverged" and bad["results"]["mismatched"][0]["name"] == "w"
        missing = self._replay(tmp_path, None)
        assert missing["verdict"] == "diverged" and missing["results"]["missing"] == ["w"]
        other_cpu = self._replay(tmp_path, torch.zeros(3), strict=False, env={"cpu_capability": "NO_SUCH_KERNELS"})
        assert other_cpu["verdict"] == "statistical" and "cpu_capability" in other_cpu["reasons"][0]

    def test_strict_mismatch_names_the_result(self, tmp_path):
        with pytest.raises(ReplayMismatchError, match="result 'w'"):
            self._replay(tmp_path, torch.zeros(3))


class TestEnvironment:
    def test_cpu_kernels_and_threads_recorded(self):
        env = SeedSession(0).setup().manifest().environment
        assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert env["num_threads"] == torch.get_num_threads() and env["num_interop_threads"] == torch.get_num_interop_threads()
        assert isinstance(env["cpu"], str) and env["cpu"]

    def test_capability_and_threads_are_bitwise_keys(self):
        from seedreg.determinism import BITWISE_KEYS

        assert "cpu_capability" in BITWISE_KEYS and "num_threads" in BITWISE_KEYS


class TestScope:
    def test_scope_depends_only_on_its_id(self):
        s = SeedSession(5).setup()
        with s.scope(7):
            a = (torch.rand(3), np.random.rand(), __import__("random").random())
        torch.rand(10), np.random.rand(4)
        with s.scope(8):
            pass
        with s.scope(7):
            b = (torch.rand(3), np.random.rand(), __import__("random").random())
        assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
        other = SeedSession(5).setup()
        with other.scope(7):
            assert torch.equal(torch.rand(3), a[0])

    def test_outer_state_restored_and_nesting(self):
        s = SeedSession(5).setup()
        before = torch.get_rng_state()
        with pytest.raises(KeyError):
            with s.scope(1):
                with s.scope(2):
                    torch.rand(3)
                torch.rand(3)
                raise KeyError("boom")
        assert torch.equal(torch.get_rng_state(), before)
        assert [(r.purpose, r.instance_id, r.kind) for r in s.records] == [("scope", 1, "scope"), ("scope", 2, "scope")]


class TestWorkers:
    def test_seed_in_a_worker_is_refused_with_advice(self):
        s = SeedSession(1).setup()

        class Forking(torch.utils.data.Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                with s.fork("aug", i):
                    return torch.rand(1)

        list(s.build_dataloader(Forking(), "zero", batch_size=2, num_workers=0))
        assert [r.instance_id for r in s.records if r.purpose == "aug"] == [0, 1, 2, 3]
        loader = s.build_dataloader(Forking(), "two", batch_size=2, num_workers=2)
        with pytest.raises(SeedregError, match="inside a DataLoader worker.*per example"):
            list(loader)

    def test_a_pickled_session_refuses_uses(self):
        import pickle

        s = SeedSession(1).setup()
        s.seed("a")
        copy = pickle.loads(pickle.dumps(s))
        copy._registry._pid = -1  # as if unpickled in a spawned worker
        with pytest.raises(SeedregError, match="another process"):
            copy.seed("a")


class TestLoadersHeldWeakly:
    def test_dropped_loaders_are_freed_and_memory_stays_flat(self):
        s = SeedSession(1).setup()
        ds = ToyImages(2_000, augment=False)
        mask = np.ones(2_000, dtype=bool)
        gc.collect()
        gc.disable()
        try:
            tracemalloc.start()
            refs = []
            for i in range(1_000):
                loader = s.build_dataloader(ds, "training", batch_size=32, shuffle=True, subset=mask)
                refs.append(weakref.ref(loader))
                if i == 99:
                    after_100 = tracemalloc.get_traced_memory()[0]
            del loader
            after_1000 = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
        finally:
            gc.enable()
        assert sum(r() is not None for r in refs) == 0  # freed by reference counting alone
        assert s.state_dict()["loaders"] == []
        # the registry logs each use (about 1 KB), but no loader, sampler or mask stays alive
        assert (after_1000 - after_100) / 900 < 4_000

    def test_state_dict_lists_only_held_loaders(self):
        s = SeedSession(1).setup()
        keep = s.build_dataloader(ToyImages(8), "a")
        s.build_dataloader(ToyImages(8), "b")
        assert [ld["instance_id"] for ld in s.state_dict()["loaders"]] == ["a"] and keep is not None


class TestStepCheckpointsKeepTheRegistry:
    def _train(self, s):
        model = s.build_model(TinyCNN, "m")
        opt = s.build_optimizer(torch.optim.SGD, model.parameters(), "m", lr=0.05)
        loader = s.build_dataloader(ToyImages(24), "train", batch_size=8, shuffle=True)
        step_fn = _loss_step(model, opt)
        ckpt = StepCheckpoints(s, model, opt, loader, every=2)
        after = {}
        ckpt.maybe_save(0)
        for t, batch in enumerate(loader):
            step_fn(t, None, batch)
            after[t] = model.head.weight.detach().clone()
            ckpt.maybe_save(t + 1)
        return model, loader, ckpt, step_fn, after

    def test_replay_after_an_eval_loader_keeps_records(self):
        s = SeedSession(2).setup()
        model, loader, ckpt, step_fn, after = self._train(s)
        s.seed("late", 1)
        eval_loader = s.build_dataloader(ToyImages(8, augment=False), "eval", batch_size=8)
        next(iter(eval_loader))
        before = s.records
        ckpt.replay(1, step_fn)
        assert torch.equal(model.head.weight, after[1])
        assert s.records == before  # nothing rolled back: the late seed and the eval loader stay
        assert ("late", 1) in [r.key for r in s.manifest().records]
        assert eval_loader.sampler.position == 8  # a loader the checkpoint did not know is left alone

    def test_resume_refuses_a_loader_not_built(self):
        s = SeedSession(2).setup()
        a = s.build_dataloader(ToyImages(8), "train")
        state = s.state_dict()
        fresh = SeedSession(2).setup()
        with pytest.raises(StateError, match=r"\('dataloader', 'train'\) use 1, which this session has not built"):
            fresh.load_state_dict(state)
        assert a is not None


class TestLegacyManifest:
    """A manifest written by seedreg 0.1.0 (schema 1) still loads, shows and replays."""

    PATH = DATA / "manifest-0.1.0.json"

    def test_loads_and_shows(self, capsys):
        m = Manifest.load(self.PATH)
        assert m.read_version == 1 and m.record("noise", 3).uses == 2 and m.results == ()
        assert m.record("model", "training").details["fingerprint"].startswith("sha256:")
        assert cli_main(["show", str(self.PATH)]) == 0
        assert "TinyCNN 2868 params" in capsys.readouterr().out

    def test_replays(self):
        r = SeedSession.from_manifest(self.PATH)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the recording run (the thread count changes CPU float results)
        try:
            model = train_toy(r, epochs=1, num_workers=0, n=64, batch_size=16)
        finally:
            torch.set_num_threads(threads)
        r.seed("noise", 3), r.seed("noise", 3)
        r.subset_mask(64, 0.5, 0)
        report = r.replay_report()
        assert report["missing"] == [] and report["mismatches"] == [] and report["new"] == []
        assert report["verdict"] in ("bitwise", "statistical")
        expected = json.loads((DATA / "manifest-0.1.0.expected.json").read_text())
        env = report["environment"]
        same_build = not any(d["key"] in ("torch", "numpy", "platform") for d in env)
        if same_build and torch.backends.cpu.get_cpu_capability() == expected["cpu_capability"]:
            from seedreg import fingerprint

            from seedreg.determinism import environment

            # 0.2 and later train 0.1.0's run bit for bit: as on this processor model when it was measured on it,
            # else as on one of the machines that measured it
            known = expected["by_cpu"].get(environment().get("cpu"))
            got = fingerprint(model)
            assert got == known if known else got in {expected["final_weights"], *expected["by_cpu"].values()}


@pytest.mark.slow
class TestAcrossProcesses:
    def test_train_val_and_two_models_without_ids_replay_bitwise(self, tmp_path):
        run_python([SCRIPTS / "uses.py", "trainval", "--out", tmp_path / "a"])
        run_python([SCRIPTS / "uses.py", "trainval", "--out", tmp_path / "b", "--replay", tmp_path / "a/manifest.json"])
        assert (tmp_path / "a/weights.bin").read_bytes() == (tmp_path / "b/weights.bin").read_bytes()
        report = json.loads((tmp_path / "b/report.json").read_text())
        assert report["verdict"] == "bitwise" and report["results"]["matched"] == ["final_weights", "val_loss", "probe"]

    def test_lr_change_is_caught_and_more_epochs_diverge(self, tmp_path):
        run_python([SCRIPTS / "uses.py", "trainval", "--out", tmp_path / "a"])
        manifest = tmp_path / "a/manifest.json"
        proc = run_python([SCRIPTS / "uses.py", "trainval", "--out", tmp_path / "b", "--replay", manifest, "--lr", "0.1"], check=False)
        assert proc.returncode != 0 and "ReplayMismatchError" in proc.stderr and "defaults.lr is 0.1" in proc.stderr
        run_python([SCRIPTS / "uses.py", "trainval", "--out", tmp_path / "c", "--replay", manifest, "--loose", "--epochs", "2"])
        report = json.loads((tmp_path / "c/report.json").read_text())
        assert report["verdict"] == "diverged" and report["mismatches"] == []
        assert {m["name"] for m in report["results"]["mismatched"]} == {"final_weights", "val_loss"}
        assert report["results"]["matched"] == ["probe"]

    def test_seeds_asked_for_in_the_main_process_replay(self, tmp_path):
        run_python([SCRIPTS / "uses.py", "worker_fork", "--out", tmp_path / "a"])
        run_python([SCRIPTS / "uses.py", "worker_fork", "--out", tmp_path / "b", "--replay", tmp_path / "a/manifest.json"])
        assert (tmp_path / "a/weights.bin").read_bytes() == (tmp_path / "b/weights.bin").read_bytes()
        assert json.loads((tmp_path / "b/report.json").read_text())["verdict"] == "bitwise"
        proc = run_python([SCRIPTS / "uses.py", "worker_fork", "--out", tmp_path / "c", "--replay", tmp_path / "a/manifest.json", "--workers", "2"], check=False)
        assert proc.returncode != 0 and "inside a DataLoader worker" in proc.stderr

    def test_lds_bernoulli_study_replays_and_model_7_trains_alone(self, tmp_path):
        """examples/lds.py: models 0..9 in one process, model 7 alone in another, and a strict replay."""
        common = ["--models", "10", "--mode", "bernoulli", "--examples", "48", "--epochs", "1"]
        job = run_python([ROOT / "examples/lds.py", *common, "--out", tmp_path / "job"]).stdout
        alone = run_python([ROOT / "examples/lds.py", *common, "--ids", "7", "--out", tmp_path / "alone"]).stdout
        line = lambda out, i: next(x for x in out.splitlines() if x.startswith(f"model {i}:"))  # noqa: E731
        assert line(job, 7) == line(alone, 7)  # same mask size, margin and final-weights fingerprint
        assert np.load(tmp_path / "job/margins.npy")[7].tobytes() == np.load(tmp_path / "alone/margins.npy")[0].tobytes()
        assert np.load(tmp_path / "job/masks.npy")[7].tobytes() == np.load(tmp_path / "alone/masks.npy")[0].tobytes()
        replay = run_python([ROOT / "examples/lds.py", *common, "--out", tmp_path / "replay", "--replay", tmp_path / "job/manifest.json"])
        assert "replay verdict: bitwise; results matched 20" in replay.stdout
        assert (tmp_path / "job/margins.npy").read_bytes() == (tmp_path / "replay/margins.npy").read_bytes()
