"""What `pip install .` (or from an index) gives a user: the built wheel, not the checkout.

The wheel is built from the checkout, installed into a folder of its own, and imported in a fresh
process from outside the repository, so nothing of the checkout can stand in for a missing file.
"""

import pathlib
import subprocess
import sys
import zipfile

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=300)
    (path,) = out.glob("seedreg-*.whl")
    return path


def test_the_wheel_holds_every_module_of_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "seedreg").rglob("*") if p.suffix in (".py", ".typed")}
    assert "seedreg/integrations/lightning.py" in source
    assert source - names == set()


def test_an_installed_wheel_imports_every_subpackage_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    code = (
        "import importlib, pkgutil, pathlib, seedreg, seedreg.integrations\n"
        "assert pathlib.Path(seedreg.__file__).is_relative_to(pathlib.Path(r'%s')), seedreg.__file__\n"
        "mods = sorted(m.name for m in pkgutil.walk_packages(seedreg.__path__, 'seedreg.'))\n"
        "for m in mods:\n"
        "    if m == 'seedreg.__main__':\n"
        "        continue\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError as exc:  # an integration whose framework (an extra) is not installed\n"
        "        if not (m.startswith('seedreg.integrations.') and 'pip install' in str(exc)):\n"
        "            raise\n"
        "print(' '.join(mods))\n" % site
    )
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mods = proc.stdout.split()
    assert "seedreg.integrations.lightning" in mods and "seedreg.integrations.transformers" in mods
    assert (site / "seedreg" / "py.typed").is_file()


def test_the_seedreg_under_test_is_the_one_asked_for():
    """Under SEEDREG_TEST_SITE (.ci/run's pass over the installed wheel) seedreg comes from there,
    here and in the children the tests start; otherwise from the checkout."""
    import os

    import seedreg

    from .conftest import run_python

    site = os.environ.get("SEEDREG_TEST_SITE")
    expected = pathlib.Path(site).resolve() if site else ROOT
    child = run_python(["-c", "import seedreg; print(seedreg.__file__)"]).stdout.strip()
    for path in (seedreg.__file__, child):
        assert pathlib.Path(path).resolve().is_relative_to(expected), (path, expected)
