"""examples/lightning_train.py and examples/hf_train.py, run as a user would: a whole run, a run
stopped early and continued in a new process, and a replay of the manifest."""

import os
import re

import pytest

from .conftest import ROOT, run_python

# What these run is what tests/test_lightning.py and tests/test_transformers.py check in detail;
# here the scripts run as a user runs them, against the installed wheel: .ci/run's second pass.
# Locally: pip wheel --no-deps -w dist . && pip install --no-deps --target site dist/*.whl &&
# SEEDREG_TEST_SITE=site python -m pytest tests/test_framework_examples.py
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("SEEDREG_TEST_SITE"), reason="runs against the built wheel (SEEDREG_TEST_SITE; .ci/run)"),
]


def _printed(out: str, name: str) -> str:
    return re.search(rf"^{name}: (.+)$", out, re.MULTILINE).group(1)


def test_lightning_example_continues_and_replays(tmp_path):
    pytest.importorskip("lightning.pytorch", reason="the lightning extra: pip install -e \".[lightning]\"")
    script = ROOT / "examples" / "lightning_train.py"
    whole = run_python([script, tmp_path / "whole"]).stdout
    run_python([script, tmp_path / "run", "--max-steps", "10"])
    continued = run_python([script, tmp_path / "run", "--resume", tmp_path / "run" / "last.ckpt"]).stdout
    for name in ("steps", "final weights", "predictions"):
        assert _printed(continued, name) == _printed(whole, name), name
    replay = run_python([script, tmp_path / "replay", "--replay", _printed(whole, "manifest")]).stdout
    assert _printed(replay, "verdict") == "bitwise" and _printed(replay, "final weights") == _printed(whole, "final weights")


def test_hf_example_resumes_and_replays(tmp_path):
    pytest.importorskip("transformers", reason="the transformers extra: pip install -e \".[transformers]\"")
    pytest.importorskip("accelerate", reason="the transformers extra: pip install -e \".[transformers]\"")
    script = ROOT / "examples" / "hf_train.py"
    whole = run_python([script, tmp_path / "whole"]).stdout
    stopped = run_python([script, tmp_path / "run", "--stop-at", "10"]).stdout
    assert _printed(stopped, "steps") == "10"
    resumed = run_python([script, tmp_path / "run", "--resume"]).stdout  # from checkpoint-8, its last
    assert (_printed(resumed, "steps"), _printed(resumed, "final weights")) == (_printed(whole, "steps"), _printed(whole, "final weights"))
    replay = run_python([script, tmp_path / "replay", "--replay", _printed(whole, "manifest")]).stdout
    assert _printed(replay, "verdict") == "bitwise" and _printed(replay, "final weights") == _printed(whole, "final weights")
