"""Shared helpers: running scripts in fresh processes, and skipping CUDA tests without a GPU."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Dict, Optional, Sequence

import pytest
import torch
from hypothesis import settings

# No per-example deadline: a machine loaded by other jobs makes examples slow, not wrong (the
# default 200 ms deadline failed the suite under load). CI replays the same examples every run (a
# stable verdict); local runs explore new ones.
settings.register_profile("local", deadline=None)
settings.register_profile("ci", derandomize=True, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "local")

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = pathlib.Path(__file__).resolve().parent / "scripts"


def child_env(**extra: str) -> Dict[str, str]:
    """This process's environment for a child python: the repository first on PYTHONPATH (after
    SEEDREG_TEST_SITE, the installed seedreg under test, if set; what was there kept after it), no
    CUBLAS_WORKSPACE_CONFIG (each child decides its own)."""
    env = dict(os.environ)
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    site = os.environ.get("SEEDREG_TEST_SITE")  # the installed wheel under test, before the checkout
    site = os.path.abspath(site) if site else None
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, str(ROOT), env.get("PYTHONPATH")]))
    if site:
        env["PYTHONSAFEPATH"] = "1"  # `python -c`/`-m` from the checkout would put it (the cwd) first
    env.update(extra)
    return env


def run_python(args: Sequence[str], *, env: Optional[Dict[str, str]] = None, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python args...` in a fresh process from the repository root."""
    full_env = child_env(**(env or {}))
    try:
        proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # killed: fail with what it printed, never hang the suite
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr))
        raise AssertionError(f"{args} did not finish in {timeout} s and was killed\nstdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def run_train(out: pathlib.Path, *flags: str, env: Optional[Dict[str, str]] = None) -> bytes:
    """Run tests/scripts/train.py in a fresh process; return the final weights' bytes."""
    run_python([SCRIPTS / "train.py", "--out", out, *flags], env=env)
    return (out / "weights.bin").read_bytes()


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """Tests that call setup() change process-wide settings: put them back after each test."""
    import random

    import numpy as np

    py, npst, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    random.setstate(py)
    np.random.set_state(npst)
    torch.set_rng_state(cpu)
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
