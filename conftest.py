# Keep pytest's doctest collection away from the module that runs the CLI on import.
collect_ignore = ["seedreg/__main__.py", "tests/scripts"]
