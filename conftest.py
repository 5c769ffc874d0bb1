import importlib.util

# Keep pytest's doctest collection away from the module that runs the CLI on import, and from the
# integrations whose framework is not installed (they are optional extras).
collect_ignore = ["seedreg/__main__.py", "tests/scripts"]
if importlib.util.find_spec("lightning") is None:
    collect_ignore.append("seedreg/integrations/lightning.py")
if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None:
    collect_ignore.append("seedreg/integrations/transformers.py")
