"""The benchmark script runs (a smoke run with tiny sizes); it asserts no timings."""

import json

import pytest

from .conftest import ROOT, run_python


@pytest.mark.slow
def test_quick_run(tmp_path):
    out = tmp_path / "table.json"
    proc = run_python([ROOT / "benchmarks/run.py", "--quick", "--json", out], timeout=300)
    rows = json.loads(out.read_text())
    assert len(rows) >= 12 and "| operation |" in proc.stdout
    assert {"operation", "seedreg", "baseline", "ratio", "target", "met"} == set(rows[0])
