"""The `seedreg` command."""

import json
import subprocess
import sys

import pytest

from seedreg import SeedSession
from seedreg.cli import main

from .conftest import child_env, run_python


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class TestDerive:
    def test_prints_the_seed(self, capsys):
        assert run(capsys, "derive", "42", "model", "training") == (0, "1958051794\n", "")
        assert run(capsys, "derive", "42", "model", "0", "--scheme", "sha256-v2")[1] == "917119885812199566\n"
        assert run(capsys, "derive", "42", "model", "s:0", "--scheme", "sha256-v2")[1] == "7727389741304579451\n"

    def test_bad_arguments_exit_2_with_one_line(self, capsys):
        for argv in (["derive", "x", "model"], ["derive", "-5", "model"], ["derive", "1", "m", "--scheme", "nope"], ["bogus"]):
            code, out, err = run(capsys, *argv)
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


class TestShowDiff:
    @pytest.fixture
    def manifests(self, tmp_path):
        a = SeedSession(1)
        a.seed("model", "x")
        b = SeedSession(2)
        b.seed("model", "x")
        return a.dump(tmp_path / "a.json"), b.dump(tmp_path / "b.json")

    def test_show(self, capsys, manifests):
        code, out, _ = run(capsys, "show", str(manifests[0]))
        assert code == 0 and "master seed 1" in out and "model" in out and "violations (0)" in out
        code, out, _ = run(capsys, "show", str(manifests[0]), "--json")
        assert json.loads(out)["master_seed"] == 1

    def test_diff(self, capsys, manifests):
        assert run(capsys, "diff", str(manifests[0]), str(manifests[0]))[0] == 0
        code, out, _ = run(capsys, "diff", *map(str, manifests))
        assert code == 1 and "master_seed: 1 != 2" in out

    def test_corrupt_and_missing(self, capsys, manifests, tmp_path):
        manifests[0].write_text("{ broken")
        for path in (manifests[0], tmp_path / "missing.json"):
            code, out, err = run(capsys, "show", str(path))
            assert code == 2 and err.startswith("seedreg: error:") and err.count("\n") == 1


def test_env(capsys):
    code, out, _ = run(capsys, "env")
    assert code == 0 and "torch" in out and "determinism readiness" in out
    code, out, _ = run(capsys, "env", "--json")
    assert "checks" in json.loads(out)


def test_python_dash_m_and_console_script(tmp_path):
    proc = run_python(["-m", "seedreg", "derive", "42", "optimizer", "training"])
    assert proc.stdout.strip() == "1689976434"
    proc = run_python(["-m", "seedreg", "show", tmp_path / "none.json"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo(tmp_path):
    """The main job: train, dump, replay in a fresh process, bitwise agreement."""
    # a relative output directory whose name starts with '-' (it broke the replay process's arguments)
    env = child_env()
    proc = subprocess.run([sys.executable, "-m", "seedreg", "demo", "--out=-demo", "--epochs", "2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    tmp_path = tmp_path / "-demo"
    assert "DEMO OK" in proc.stdout and "replay verdict: bitwise" in proc.stdout and "results matched 1 of 1" in proc.stdout
    assert (tmp_path / "original-manifest.json").exists() and (tmp_path / "replayed-manifest.json").exists()
    import torch

    a, b = (torch.load(tmp_path / f"{n}-weights.pt", weights_only=True) for n in ("original", "replayed"))
    assert list(a) == list(b) and all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


class TestStartup:
    """derive, show, diff and study do not import torch (the command line starts in a fraction of a second)."""

    def test_no_torch(self, tmp_path):
        from seedreg import Study

        manifest = SeedSession(1).dump(tmp_path / "m.json")
        study = Study(tmp_path / "study", master_seed=1, num_models=2, num_examples=10, alpha=0.5, num_outputs=1)
        with study.run(0) as run:
            run.save([0.5])
        code = (
            "import sys\n"
            "from seedreg.cli import main\n"
            f"assert main(['derive', '42', 'model', 'training']) == 0\n"
            f"assert main(['show', {str(manifest)!r}]) == 0\n"
            f"assert main(['diff', {str(manifest)!r}, {str(manifest)!r}]) == 0\n"
            f"assert main(['study', 'status', {str(tmp_path / 'study')!r}]) == 0\n"
            f"assert main(['study', 'audit', {str(tmp_path / 'study')!r}]) == 1\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print('no torch')\n"
        )
        proc = run_python(["-c", code])
        assert "no torch" in proc.stdout

    def test_version_and_help(self, capsys):
        with pytest.raises(SystemExit) as exc:
            main(["--version"])
        assert exc.value.code == 0 and "seedreg 0." in capsys.readouterr().out
        for command in ("derive", "show", "diff", "env", "study", "demo"):
            with pytest.raises(SystemExit):
                main([command, "--help"])
            text = capsys.readouterr().out
            assert text.count("\n  ") >= 2  # every argument has its line of help

    def test_not_a_manifest_and_reformatted(self, tmp_path, capsys):
        (tmp_path / "other.json").write_text('{"a": 1}')
        assert main(["show", str(tmp_path / "other.json")]) == 2
        assert "is not a seedreg manifest" in capsys.readouterr().err
        path = SeedSession(1).dump(tmp_path / "m.json")
        (tmp_path / "pretty.json").write_text(json.dumps(json.loads(path.read_text()), indent=4))
        assert main(["show", str(tmp_path / "pretty.json")]) == 2
        assert "reformatted" in capsys.readouterr().err


def test_replay_report_without_setup_says_so_first(tmp_path):
    recorded = SeedSession(1).setup()
    recorded.seed("a")
    r = SeedSession.from_manifest(recorded.manifest())
    r.seed("a")
    report = r.replay_report()
    assert report["reasons"][0].startswith("setup() was never called") and report["verdict"] == "statistical"
