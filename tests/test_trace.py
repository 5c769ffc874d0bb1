"""Step traces: where a replay diverged (step and tensor), in fresh processes, and every bad input."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch

from seedreg import ManifestError, ReplayMismatchError, SeedregError, SeedSession, StateError, StepCheckpoints
from seedreg.cli import main as cli
from seedreg.nondeterminism import checksum, checksums
from seedreg.tracefile import TraceData, load_trace

from .conftest import SCRIPTS, run_python

SCRIPT = SCRIPTS / "traced.py"


def traced(out: pathlib.Path, *flags: str, code: int = 0) -> dict:
    proc = run_python([SCRIPT, out, *flags], check=False)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One traced run (every step), recorded in a fresh process."""
    out = tmp_path_factory.mktemp("recorded") / "run.json"
    traced(out)
    return out


def test_two_identical_runs_write_the_same_trace_and_replay_bitwise(recorded: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = tmp_path / "again.json"
    traced(again)
    assert (tmp_path / "again.json.trace").read_bytes() == pathlib.Path(str(recorded) + ".trace").read_bytes()
    manifest = json.loads(recorded.read_text())
    assert manifest["trace"]["file"] == "run.json.trace" and manifest["trace"]["steps"] == 12
    assert manifest["trace"]["tensors"] == 1 + 2 * 8 + 3  # the loss, 8 gradients, 8 parameters, BatchNorm's 3 buffers
    report = traced(tmp_path / "replay.json", "--replay", str(recorded))["report"]
    assert report["verdict"] == "bitwise" and report["first_divergence"] is None, report["reasons"]


def test_a_learning_rate_changed_at_step_5_is_found_at_step_5_in_a_parameter(recorded: pathlib.Path, tmp_path: pathlib.Path) -> None:
    report = traced(tmp_path / "lr.json", "--replay", str(recorded), "--lr-change-at", "5")["report"]
    assert report["verdict"] == "diverged"
    first = report["first_divergence"]
    assert first["step"] == 5 and first["kind"] == "param" and first["tensor"].startswith("param/"), first
    assert any("step 5" in r for r in report["reasons"])
    # strict: the replay stops there, naming the step and the tensor
    error = traced(tmp_path / "strict.json", "--replay", str(recorded), "--strict", "--lr-change-at", "5", code=3)["error"]
    assert "at step 5" in error and first["tensor"] in error
    assert not (tmp_path / "strict.json").exists()
    # seedreg diff of the two manifests names the step, and exits 1
    proc = run_python(["-m", "seedreg", "diff", recorded, tmp_path / "lr.json"], check=False)
    assert proc.returncode == 1
    assert f"first diverging step: 5, tensor {first['tensor']} (param)" in proc.stdout


def test_noise_from_os_urandom_at_step_3_is_found_at_step_3(recorded: pathlib.Path, tmp_path: pathlib.Path) -> None:
    report = traced(tmp_path / "noise.json", "--replay", str(recorded), "--noise-from", "3")["report"]
    first = report["first_divergence"]
    assert first == {"step": 3, "tensor": "loss", "kind": "loss"}, first
    # two noisy runs differ from each other at step 3 too (nothing seeds os.urandom)
    traced(tmp_path / "noisy-a.json", "--noise-from", "3")
    traced(tmp_path / "noisy-b.json", "--noise-from", "3")
    proc = run_python(["-m", "seedreg", "diff", tmp_path / "noisy-a.json", tmp_path / "noisy-b.json"], check=False)
    assert proc.returncode == 1 and "first diverging step: 3, tensor loss (loss)" in proc.stdout


def test_a_run_resumed_from_a_checkpoint_traces_what_an_uninterrupted_run_does(recorded: pathlib.Path, tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state.pt"
    traced(tmp_path / "unused.json", "--stop-after", "7", "--save-state", str(state))
    traced(tmp_path / "resumed.json", "--resume", str(state))
    assert (tmp_path / "resumed.json.trace").read_bytes() == pathlib.Path(str(recorded) + ".trace").read_bytes()


def test_every_keeps_every_nth_step_and_a_replay_must_use_the_same(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "every.json"
    traced(out, "--every", "4")
    data = load_trace(out, json.loads(out.read_text())["trace"])
    assert data.steps.tolist() == [0, 4, 8] and data.every == 4
    proc = run_python([SCRIPT, tmp_path / "r.json", "--replay", out, "--every", "2"], check=False)
    assert proc.returncode == 1 and "every=4" in proc.stderr and "pass the same values" in proc.stderr


def test_show_summarises_the_trace(recorded: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["show", str(recorded)]) == 0
    out = capsys.readouterr().out
    assert "trace run.json.trace: 12 steps (0 to 11), every 1, 20 tensors (loss, gradients, parameters and buffers)" in out
    assert "file checked" in out


# -- bad input ----------------------------------------------------------------------------------------


def _copy(recorded: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / "run.json"
    shutil.copy(recorded, target)
    shutil.copy(str(recorded) + ".trace", str(target) + ".trace")
    return target


def test_a_missing_truncated_or_foreign_trace_is_refused_by_name(recorded: pathlib.Path, tmp_path: pathlib.Path) -> None:
    manifest = _copy(recorded, tmp_path)
    trace_file = pathlib.Path(str(manifest) + ".trace")
    payload = trace_file.read_bytes()
    trace_file.write_bytes(payload[:-100])
    with pytest.raises(ManifestError, match=r"run\.json\.trace.*truncated"):
        SeedSession.from_manifest(manifest)
    foreign = tmp_path / "other"
    foreign.mkdir()
    traced(foreign / "run.json", "--lr-change-at", "1")  # another run's trace, same name and size
    trace_file.write_bytes((foreign / "run.json.trace").read_bytes())
    with pytest.raises(ManifestError, match="SHA-256 the manifest recorded: it is another run's trace"):
        SeedSession.from_manifest(manifest)
    trace_file.unlink()
    with pytest.raises(ManifestError, match=r"run\.json\.trace.*is missing: copy it beside the manifest"):
        SeedSession.from_manifest(manifest)
    assert cli(["show", str(manifest)]) == 0  # show still shows the manifest, and says the trace is unusable


def test_a_replay_without_the_trace_the_run_had_is_not_bitwise(recorded: pathlib.Path) -> None:
    session = SeedSession.from_manifest(recorded, strict=False).setup()
    report = session.replay_report()
    assert report["verdict"] != "bitwise"  # "statistical" here: this process runs more threads than the script
    assert any("made no trace" in r and "every=1" in r for r in report["reasons"])
    from seedreg import Manifest

    in_memory = SeedSession.from_manifest(Manifest.load(recorded))
    with pytest.raises(SeedregError, match="pass the manifest's path"):
        in_memory.trace(torch.nn.Linear(2, 2))


def test_a_replay_of_another_model_is_refused_naming_the_parameters(recorded: pathlib.Path) -> None:
    session = SeedSession.from_manifest(recorded, strict=False)
    with pytest.raises(ReplayMismatchError, match=r"missing \['grad/body\.conv1\.weight'"):
        session.trace(torch.nn.Linear(2, 2))


def test_steps_must_increase() -> None:
    trace = SeedSession(0).trace(torch.nn.Linear(2, 1))
    trace.step(3)
    for bad in (3, 2):
        with pytest.raises(ValueError, match=rf"trace.step\({bad}\) after step 3: steps must increase"):
            trace.step(bad)
    for bad in (-1, 1.0, "4", True):
        with pytest.raises(ValueError, match="`step` must be an int >= 0"):
            trace.step(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a scalar"):
        trace.step(5, loss=torch.ones(2))
    with pytest.raises(SeedregError, match="already traces a model"):
        trace_session = SeedSession(0)
        trace_session.trace(torch.nn.Linear(2, 1))
        trace_session.trace(torch.nn.Linear(2, 1))


def test_trace_state_is_checked_before_it_is_loaded() -> None:
    model = torch.nn.Linear(2, 1)
    trace = SeedSession(0).trace(model)
    trace.step(0)
    state = trace.state_dict()
    damaged = dict(state, data=state["data"].clone())
    damaged["data"][-1] ^= 1
    fresh = SeedSession(0).trace(model)
    with pytest.raises(StateError, match="damaged"):
        fresh.load_state_dict(damaged)
    with pytest.raises(StateError, match="every=1"):
        SeedSession(0).trace(model, every=2).load_state_dict(state)
    assert fresh.steps == []
    fresh.load_state_dict(state)
    assert fresh.steps == [0]


def test_the_file_is_refused_when_it_is_not_a_trace() -> None:
    data = TraceData(names=("loss",), dtypes=("",), shapes=((),), every=1, grads=False, steps=np.array([0, 1]),
                     losses=np.zeros(2), present=np.ones((2, 1), bool), sums=np.zeros((2, 1, 2), np.int64))
    payload = data.encode()
    assert TraceData.decode(payload).steps.tolist() == [0, 1]
    for bad, why in ((b"PK\x03\x04" + payload[4:], "not a seedreg trace"), (payload[:-1], "truncated"),
                     (payload[:40] + bytes([payload[40] ^ 1]) + payload[41:], "damaged")):
        with pytest.raises(ManifestError, match=why):
            TraceData.decode(bad)


# -- fingerprints ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool])
def test_batched_fingerprints_equal_one_by_one(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [(torch.randn(n, generator=g) * 50).to(dtype) for n in (0, 1, 3, 7, 64)] + [torch.randn(4, 5, generator=g).t().to(dtype)]
    tensors += [torch.randn(5, generator=g)]  # a second dtype in the same call
    assert checksums(tensors).tolist() == [list(checksum(t)[2:]) for t in tensors]
    one = tensors[3].clone()
    flipped = one.reshape(-1).view(torch.uint8).clone()
    flipped[-1] ^= 1
    assert checksums([one])[0].tolist() != checksums([flipped.view(one.dtype).reshape(one.shape)])[0].tolist()


# -- StepCheckpoints: re-run steps are checked against the trace ------------------------------------------


def _checkpointed(noise: bool):
    s = SeedSession(0)
    s.setup()
    model = s.build_model(torch.nn.Linear, None, in_features=3, out_features=1)
    opt = s.build_optimizer(torch.optim.SGD, model.parameters(), lr=0.1)
    loader = s.build_dataloader(torch.randn(16, 3, generator=torch.Generator().manual_seed(1)), batch_size=4, shuffle=True)
    trace = s.trace(model)
    state = {"runs": 0}

    def step_fn(step, indices, x):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        if noise and state["runs"] >= 4:  # differs on a re-run: an untracked source of randomness
            loss = loss + 1e-3 * float(np.random.default_rng().random())
        state["runs"] += 1
        loss.backward()
        opt.step()
        return loss

    ckpt = StepCheckpoints(s, model, opt, loader, every=2)
    ckpt.maybe_save(0)
    for t, x in enumerate(loader):
        loss = step_fn(t, None, x)
        trace.step(t + 1, loss=loss)  # numbered from 1: the checkpoints find the offset
        ckpt.maybe_save(t + 1)
    return ckpt, step_fn


def test_step_checkpoints_replay_checks_each_step_against_the_trace() -> None:
    ckpt, step_fn = _checkpointed(noise=False)
    assert ckpt.replay(3, step_fn) == 2
    ckpt, step_fn = _checkpointed(noise=True)
    with pytest.raises(ReplayMismatchError, match="re-running step 3 did not reproduce the traced run: loss differs first"):
        ckpt.replay(2, step_fn)


# -- buffers, weights assigned after trace(), resumes that forget the trace (round 2) --------------------


def test_a_drift_only_in_batchnorm_statistics_is_found_at_step_0_in_a_buffer(recorded: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """BatchNorm momentum 0.1 recorded, 0.5 replayed: loss, gradients and weights of step 0 agree, the
    running statistics do not."""
    report = traced(tmp_path / "bn.json", "--replay", str(recorded), "--bn-momentum", "0.5")["report"]
    first = report["first_divergence"]
    assert first["step"] == 0 and first["kind"] == "buffer" and first["tensor"].startswith("buffer/body.bn.running_"), first
    assert any("so a buffer changed differently at step 0: BatchNorm's momentum" in r for r in report["reasons"]), report["reasons"]
    error = traced(tmp_path / "strict.json", "--replay", str(recorded), "--strict", "--bn-momentum", "0.5", code=3)["error"]
    assert "at step 0, buffer/body.bn.running_" in error and "Next: " in error


def test_weights_assigned_after_trace_are_the_ones_traced(tmp_path: pathlib.Path) -> None:
    """load_state_dict(..., assign=True) after trace() puts new Parameters in the model; without the
    loss in the trace, 0.3 fingerprinted the old ones and called a replay 0.25 off bitwise."""
    run = tmp_path / "run.json"
    traced(run, "--assign-shift", "0.0", "--no-loss")
    report = traced(tmp_path / "shifted.json", "--replay", str(run), "--assign-shift", "0.25", "--no-loss")["report"]
    assert report["verdict"] == "diverged"
    first = report["first_divergence"]
    assert first["step"] == 0 and first["kind"] in ("grad", "param"), first
    same = traced(tmp_path / "same.json", "--replay", str(run), "--assign-shift", "0.0", "--no-loss")["report"]
    assert same["verdict"] == "bitwise", same["reasons"]


def test_a_resume_that_forgets_the_trace_state_warns_at_its_first_step(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state.pt"
    traced(tmp_path / "unused.json", "--stop-after", "7", "--save-state", str(state))
    proc = run_python([SCRIPT, tmp_path / "resumed.json", "--resume", state, "--resume-without-trace"], check=False)
    assert proc.returncode == 0, proc.stderr
    assert "trace.step(8) starts an empty trace in a resumed run" in proc.stderr and "trace.load_state_dict(state)" in proc.stderr
    proc = run_python([SCRIPT, tmp_path / "restored.json", "--resume", state], check=False)
    assert proc.returncode == 0 and "starts an empty trace" not in proc.stderr


def test_diff_names_known_causes_first_and_compares_without_a_trace_file(recorded: pathlib.Path, tmp_path: pathlib.Path) -> None:
    other = tmp_path / "other.json"
    traced(other, "--lr-change-at", "5")
    proc = run_python(["-m", "seedreg", "diff", recorded, other], check=False)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1
    step_line = next(i for i, line in enumerate(lines) if "first diverging step: 5" in line)
    assert "Next: " in lines[step_line] and "optimizer, its learning rate" in lines[step_line]
    assert all("first diverging" not in line for line in lines[:step_line])
    pathlib.Path(str(other) + ".trace").unlink()
    proc = run_python(["-m", "seedreg", "diff", recorded, other], check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "result 'final_weights'" in proc.stdout and "trace: not compared" in proc.stdout and "is missing" in proc.stdout
