"""A data-parallel metagradient on 2 gloo ranks (CPU), against a real DistributedDataParallel run."""

from __future__ import annotations

import json

import pytest

from .conftest import ROOT, SCRIPTS, run_python

pytestmark = pytest.mark.slow


def launch(tmp_path, *flags):
    """The example's 2 gloo ranks; a launch that gloo aborts in its teardown (seen now and then on a
    loaded machine, as tests/test_distributed.py notes) is tried again."""
    for attempt in range(3):
        proc = run_python([ROOT / "examples/magic_ddp.py", "--out", tmp_path / "ranks.json", *flags], timeout=300, check=False)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        if attempt == 2 or "terminate called without an active exception" not in proc.stderr:
            raise AssertionError(f"exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def test_two_ranks_give_the_whole_datasets_metagradient_of_the_ddp_run(tmp_path) -> None:
    """Central finite differences of a DDP run over an example_weights= loader (each side a whole
    retraining on both ranks) agree to 1e-4 relative; the trained weights are the DDP run's; both
    ranks return the same metagradient of all 32 examples; a second launch gives the same bits."""
    ranks = launch(tmp_path, "--check")
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["entries"] == 32 for r in ranks)
    assert ranks[0]["grad"] == ranks[1]["grad"]
    for r in ranks:
        assert r["relative_error"] <= 1e-4 and r["trained_gap"] <= 1e-9 and r["target_gap"] <= 1e-9, r
    again = launch(tmp_path)
    assert again[0]["grad"] == ranks[0]["grad"]


@pytest.mark.parametrize("case, message", [
    ("disagree", "define another run than rank"),
    ("wrapped", "wrapped in DistributedDataParallel; pass the plain module"),
])
def test_refusals_in_a_process_group(case, message) -> None:
    out = run_python([SCRIPTS / "magic_ranks.py", case], timeout=300).stdout
    lines = [line for line in out.splitlines() if line.startswith("rank ")]
    assert lines and all(message in line for line in lines), out
