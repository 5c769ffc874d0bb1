"""Integrations with training frameworks, each an optional extra:

- :mod:`seedreg.integrations.lightning`: ``SeedregCallback`` (``pip install "seedreg[lightning]"``);
- :mod:`seedreg.integrations.transformers`: ``SeedregTrainer`` (``pip install "seedreg[transformers]"``).

Importing this package imports neither framework.
"""
