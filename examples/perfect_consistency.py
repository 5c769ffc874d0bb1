"""The seed document's "perfect consistency" pattern: a shared instance id gives the MAGIC and
the LDS component the same seed, so they start identical.

    python examples/perfect_consistency.py

Exits non-zero if the two models differ.
"""

import sys

import torch

from seedreg import SeedSession, fingerprint
from seedreg.demo import TinyCNN

SHARED_INSTANCE_ID = "shared_training"


def main() -> int:
    session = SeedSession(42).setup()
    magic_model = session.build_model(TinyCNN, SHARED_INSTANCE_ID)
    torch.rand(1000)  # whatever happens in between does not matter: the builder forks the RNG
    lds_model = session.build_model(TinyCNN, SHARED_INSTANCE_ID)
    same = fingerprint(magic_model) == fingerprint(lds_model)
    (record,) = [r for r in session.records if r.kind == "model"]
    print(f"seed {record.seed} issued {record.uses} times; identical models: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
