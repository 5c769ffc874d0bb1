"""Mistakes a new user makes in the first hour, and what seedreg says or does about each: warnings
seen by default, a resumed loop that does not lose an epoch, a replay error that names the cause."""

import json
import warnings

import pytest
import torch

from seedreg import SeedregWarning, SeedSession
from seedreg.demo import TinyCNN

from .conftest import run_python


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own filter: once per place
        fn()
    return [w for w in caught if issubclass(w.category, SeedregWarning)]


def test_a_builder_before_setup_warns_once_per_session():
    session = SeedSession(3)

    def build():
        session.build_model(TinyCNN, "a")
        session.build_optimizer(torch.optim.SGD, [torch.zeros(1, requires_grad=True)], "a", lr=0.1)
        session.build_dataloader(list(range(4)), "a")

    (warning,) = _warnings_of(build)
    assert "build_model() was called before setup()" in str(warning.message) and warning.filename == __file__
    assert _warnings_of(lambda: SeedSession(3).setup().build_model(TinyCNN, "a")) == []


def test_the_warning_is_seen_by_default_in_a_fresh_process():
    """No logging or warnings configuration: a plain script prints it on stderr."""
    code = "from seedreg import SeedSession\nfrom seedreg.demo import TinyCNN\nSeedSession(1).build_model(TinyCNN, 'net')\n"
    proc = run_python(["-c", code])
    assert "SeedregWarning" in proc.stderr and "before setup()" in proc.stderr


def test_one_key_for_two_different_loaders_warns():
    session = SeedSession(3).setup()
    session.build_dataloader(list(range(8)), "training", batch_size=4, shuffle=True)
    (warning,) = _warnings_of(lambda: session.build_dataloader(list(range(4)), "training", batch_size=4))
    assert "('dataloader'" not in str(warning.message) and "instance_id='training'" in str(warning.message)
    # the LDS pattern (one key, subsets of one dataset) is not a mistake
    lds = SeedSession(3).setup()
    lds.build_dataloader(list(range(8)), "training", subset=[0, 1, 2])
    assert _warnings_of(lambda: lds.build_dataloader(list(range(8)), "training", subset=[3, 4])) == []


def _steps(session, loader, epochs, state_after=None):
    """A natural loop without set_epoch; returns each batch, and the session state saved right
    after batch `state_after` (inside the loop, as a per-step checkpoint does)."""
    batches, saved, step = [], None, 0
    for _ in range(epochs):
        for batch in loader:
            batches.append(batch.tolist())
            step += 1
            if step == state_after:
                saved = json.dumps(session.state_dict())
    return batches, saved


def test_a_loop_resumed_after_an_epochs_last_batch_is_warned_not_silently_short():
    """A state saved after the last batch of epoch 0, before the loop saw the epoch end. A loop that
    resumes at epoch 1 without set_epoch would get epoch 0's empty rest first and train one epoch
    fewer: it is warned, saying what to call; with set_epoch it trains epochs 1 and 2 exactly, and a
    loop that resumes at the saved epoch (0) gets the empty rest, then epochs 1 and 2, as before."""
    def build():
        s = SeedSession(9).setup()
        return s, s.build_dataloader(torch.arange(12), "train", batch_size=4, shuffle=True)

    everything, _ = _steps(*build(), 3)
    _, state = _steps(*build(), 1, state_after=3)

    session, resumed = build()
    session.load_state_dict(json.loads(state))
    (warning,) = _warnings_of(lambda: next(iter(resumed), None))
    assert "resumed at the end of epoch 0" in str(warning.message) and "set_epoch(epoch)" in str(warning.message)

    session, named = build()
    session.load_state_dict(json.loads(state))
    out = []
    for epoch in range(1, 3):
        named.set_epoch(epoch)
        out += [b.tolist() for b in named]
    assert out == everything[3:]

    session, same_epoch = build()
    session.load_state_dict(json.loads(state))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SeedregWarning)
        rest, _ = _steps(session, same_epoch, 3)
    assert rest == everything[3:]


def test_a_strict_replay_in_another_environment_names_the_environment_first(tmp_path):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        s = SeedSession(4).setup()
        s.record_result("w", torch.ones(3))
        path = s.dump(tmp_path / "m.json")
        torch.set_num_threads(1)
        replay = SeedSession.from_manifest(path).setup()
        with pytest.raises(Exception) as info:
            replay.record_result("w", torch.zeros(3))
    finally:
        torch.set_num_threads(threads)
    message = str(info.value)
    assert message.index("num_threads 2 -> 1") < message.index("result 'w'"), message
