"""SeedregTrainer with the real transformers package, each run in a fresh process
(tests/scripts/hf_train.py: a one-layer BERT from a config, 3 epochs of 12 steps, random masking)."""

import json

import pytest
import torch

pytest.importorskip("transformers", reason="the transformers extra: pip install -e \".[transformers]\"")
pytest.importorskip("accelerate", reason="the transformers extra: pip install -e \".[transformers]\"")

from transformers import TrainingArguments  # noqa: E402

from seedreg import SeedregError, SeedSession  # noqa: E402
from seedreg.integrations.transformers import STATE_FILE, SeedregTrainer  # noqa: E402

from .conftest import SCRIPTS, run_python  # noqa: E402

pytestmark = pytest.mark.slow


def train(out, *flags, expect_rc=0):
    proc = run_python([SCRIPTS / "hf_train.py", out, *map(str, flags)], check=False)
    assert proc.returncode == expect_rc, proc.stderr[-4000:]
    return out


def outcome(out):
    return (out / "weights.bin").read_bytes(), (out / "batches.jsonl").read_text(), (out / "seedreg-manifest.json").read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(tmp_path_factory.mktemp("hf") / "whole")


def test_two_fresh_processes_give_identical_weights_batches_and_manifest(uninterrupted, tmp_path):
    weights, batches, manifest = outcome(uninterrupted)
    assert len(batches.splitlines()) == 36
    assert outcome(train(tmp_path / "again")) == (weights, batches, manifest)


@pytest.mark.parametrize("kill_after,save_steps,workers", [(20, 5, 0), (12, 12, 0), (15, 5, 2)],
                         ids=["mid-epoch", "epoch-end", "mid-epoch-2-workers"])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(uninterrupted, tmp_path, kill_after, save_steps, workers):
    out = tmp_path / "run"
    train(out, "--kill-after", kill_after, "--save-steps", save_steps, "--workers", workers, expect_rc=17)
    assert (out / f"checkpoint-{kill_after}" / STATE_FILE).is_file()
    train(out, "--resume", out / f"checkpoint-{kill_after}", "--save-steps", save_steps, "--workers", workers)
    weights, batches, manifest = outcome(out)
    whole_weights, whole_batches, whole_manifest = outcome(uninterrupted)
    assert batches == whole_batches and weights == whole_weights
    if workers == 0 and kill_after % 12:
        assert manifest == whole_manifest
    # (a checkpoint at an epoch's last step is written before that epoch's evaluation, which the
    # Trainer does not run again on resume: that manifest lists one evaluation loader fewer)


def test_trace_every_traces_each_optimizer_step_across_a_kill_and_replays_it(tmp_path):
    """trace_every=3: gradients are taken before the Trainer clears them; a run killed and resumed
    writes the same trace bytes as a whole one; its replay finds no divergence."""
    from seedreg.tracefile import load_trace

    whole = train(tmp_path / "whole", "--trace-every", "3")
    manifest = whole / "seedreg-manifest.json"
    data = load_trace(manifest, json.loads(manifest.read_text())["trace"])
    assert data.steps.tolist() == list(range(3, 37, 3)) and data.present.all()
    out = tmp_path / "run"
    train(out, "--trace-every", "3", "--kill-after", 20, expect_rc=17)
    train(out, "--trace-every", "3", "--resume", out / "checkpoint-20")
    assert (out / "seedreg-manifest.json.trace").read_bytes() == (whole / "seedreg-manifest.json.trace").read_bytes()
    replay = train(tmp_path / "replay", "--trace-every", "3", "--replay", manifest)
    result = json.loads((replay / "result.json").read_text())
    assert result["verdict"] == "bitwise" and result["first_divergence"] is None


def test_manifest_replays_bitwise(uninterrupted, tmp_path):
    out = train(tmp_path / "replay", "--replay", uninterrupted / "seedreg-manifest.json")
    assert json.loads((out / "result.json").read_text())["verdict"] == "bitwise"
    assert (out / "weights.bin").read_bytes() == (uninterrupted / "weights.bin").read_bytes()


# -- what it refuses -------------------------------------------------------------------------------


class _Loss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def forward(self, x, labels=None):
        return {"loss": ((self.w(x).squeeze(-1) - labels) ** 2).mean()}


class _Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"x": torch.tensor([float(i), 1.0]), "labels": torch.tensor(float(i % 2))}


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True, **kw)


def test_a_plain_module_trains_and_args_seed_does_not_reseed(tmp_path):
    session = SeedSession(5).setup()
    model = session.build_model(_Loss)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    trainer = SeedregTrainer(model=model, args=_args(tmp_path, num_train_epochs=1, per_device_train_batch_size=4, seed=5,
                                                       save_strategy="no"), train_dataset=_Pairs(), session=session)
    assert torch.equal(torch.rand(3), expected)  # Trainer.__init__'s set_seed(99) was undone
    trainer.train()
    assert [r["name"] for r in session.results] == ["initial_weights", "final_weights"]
    assert (tmp_path / "seedreg-manifest.json").is_file()


def test_refusals(tmp_path):
    session = SeedSession(5)
    with pytest.raises(SeedregError, match="model_init"):
        SeedregTrainer(model_init=_Loss, args=_args(tmp_path), session=session)
    with pytest.raises(SeedregError, match="ignore_data_skip=False"):
        SeedregTrainer(model=_Loss(), args=_args(tmp_path, ignore_data_skip=True), session=session)
    with pytest.raises(TypeError, match="seedreg.SeedSession"):
        SeedregTrainer(model=_Loss(), args=_args(tmp_path), session=None)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    trainer = SeedregTrainer(model=_Loss(), args=_args(tmp_path, max_steps=1), train_dataset=Stream(), session=session)
    with pytest.raises(SeedregError, match="map-style dataset"):
        trainer.get_train_dataloader()


@pytest.mark.parametrize("damage,message", [("remove", "was not saved by SeedregTrainer"), ("truncate", "is not valid JSON"),
                                            ("directory", "is a directory")])
def test_a_checkpoint_without_a_whole_seedreg_state_is_refused(tmp_path, uninterrupted, damage, message):
    import shutil

    ckpt = tmp_path / "checkpoint-5"
    shutil.copytree(uninterrupted / "checkpoint-5", ckpt)
    state = ckpt / STATE_FILE
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:100])
    else:
        state.unlink()
        if damage == "directory":
            state.mkdir()
    proc = run_python([SCRIPTS / "hf_train.py", tmp_path, "--resume", ckpt], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("field", ["seed", "data_seed"])
def test_a_seed_in_the_training_arguments_that_would_be_ignored_is_refused(tmp_path, field):
    """TrainingArguments(seed=43) gave the same weights as seed=42: an HF seed sweep trained one run
    N times. A value other than the default or the master seed is refused, saying how to sweep."""
    session = SeedSession(5)
    with pytest.raises(SeedregError, match=rf"TrainingArguments\({field}=43\).*SeedSession\(seed\)"):
        SeedregTrainer(model=_Loss(), args=_args(tmp_path, **{field: 43}), session=session)
    SeedregTrainer(model=_Loss(), args=_args(tmp_path, **{field: 5}), session=session)  # the master seed itself is fine


# -- a seedreg_state.json damaged or crafted ---------------------------------------------------------


def _resume_from(tmp_path, change):
    """A SeedregTrainer whose checkpoint holds this session's real state with `change` applied
    to it; returns the trainer and what resuming raised (None if nothing)."""
    from seedreg import StateError

    session = SeedSession(5).setup()
    trainer = SeedregTrainer(model=session.build_model(_Loss), args=_args(tmp_path, max_steps=2, per_device_train_batch_size=4),
                             train_dataset=_Pairs(), session=session)
    trainer.get_train_dataloader()
    saved = {"format": "seedreg-transformers", "version": 1, "session": session.state_dict(), "results": []}
    text = change(saved)
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    (ckpt / STATE_FILE).write_text(text if isinstance(text, str) else json.dumps(saved))
    trainer._seedreg_checkpoint = str(ckpt)
    try:
        trainer._seedreg_resume()
    except StateError as exc:
        return trainer, exc
    return trainer, None


def _set(path, value):
    def change(saved):
        *parents, last = path
        node = saved
        for key in parents:
            node = node[key]
        node[last] = value
    return change


@pytest.mark.parametrize("change,field", [
    (_set(("session",), None), "['session']"),
    (_set(("results",), 7), "['results'] must be a list"),
    (_set(("results",), [{"name": "w", "kind": 5, "value": "x"}]), "['kind']"),
    (_set(("session", "loaders", 0, "instance_id"), ["train"]), "['instance_id']` must be None, a str or an int"),
    (lambda saved: '{"format": "seedreg-transformers", "version": 1, "session": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "nested too deeply"),
], ids=["session-none", "results-int", "result-kind", "instance-id-list", "deep-nesting"])
def test_a_crafted_state_file_is_refused_naming_the_field(tmp_path, change, field):
    trainer, error = _resume_from(tmp_path, change)
    assert error is not None and field in str(error) and STATE_FILE in str(error), error
    assert trainer.session.results == [] and trainer._seedreg_train_loader.sampler.position == 0  # nothing applied


def test_final_weights_in_a_state_file_are_never_adopted(tmp_path):
    forged = [{"name": "final_weights", "kind": "state_dict", "value": "sha256:" + "0" * 64}]
    trainer, error = _resume_from(tmp_path, _set(("results",), forged))
    assert error is None and trainer.session.results == []
