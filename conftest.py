import importlib.util
import os
import sys

# SEEDREG_TEST_SITE=DIR runs the tests against the seedreg installed in DIR (a built wheel,
# `pip install --target DIR`), in this process and in every child the tests start, instead of
# the checkout (.ci/run does this for the integration tests).
_SITE = os.environ.get("SEEDREG_TEST_SITE")
if _SITE:
    sys.path.insert(0, os.path.abspath(_SITE))
    # imported now, from there: pytest puts the checkout first on sys.path again when it imports
    # the tests package, and an editable install's finder would find the checkout too
    import seedreg

    if not os.path.realpath(seedreg.__file__).startswith(os.path.realpath(_SITE) + os.sep):
        raise RuntimeError(f"SEEDREG_TEST_SITE={_SITE} but seedreg was imported from {seedreg.__file__}")



def pytest_configure(config):
    # The suite emits no SeedregWarning it does not assert (pytest.warns): any other fails its test.
    # Added here, not in pyproject.toml: pytest imports a filter's category before this file runs,
    # which would import seedreg from the checkout ahead of SEEDREG_TEST_SITE's.
    config.addinivalue_line("filterwarnings", "error::seedreg.errors.SeedregWarning")


# Keep pytest's doctest collection away from the module that runs the CLI on import, and from the
# integrations whose framework is not installed (they are optional extras).
collect_ignore = ["seedreg/__main__.py", "tests/scripts"]
if importlib.util.find_spec("lightning") is None:
    collect_ignore.append("seedreg/integrations/lightning.py")
if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None:
    collect_ignore.append("seedreg/integrations/transformers.py")
