"""Hypothesis strategies, kept in one place."""

from hypothesis import strategies as st

master_seeds = st.integers(min_value=0, max_value=2**32 - 1)
purposes = st.text(min_size=1, max_size=20)
instance_ids = st.one_of(st.none(), st.text(max_size=20), st.integers(min_value=-(2**70), max_value=2**70))
schemes = st.sampled_from(["sha256-v1", "sha256-v2"])
