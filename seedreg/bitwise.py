"""Which differences of environment rule out a bitwise replay (no torch needed to read them:
``seedreg study audit`` and ``seedreg diff`` compare environments without importing torch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List

__all__ = ["BITWISE_KEYS", "environment_differences"]

#: Environment keys whose difference rules out bitwise equality of a replay.
BITWISE_KEYS = (
    "platform",
    "cpu_capability",
    "num_threads",  # measured: a TinyCNN epoch on 1 and 2 CPU threads ends with different weights
    "torch",
    "numpy",
    "cuda",
    "cudnn",
    "gpus",
    "cublas_workspace_config",
    "deterministic_algorithms",
    "cudnn_deterministic",
    "cudnn_benchmark",
    "cudnn_allow_tf32",
    "cuda_matmul_allow_tf32",
    "float32_matmul_precision",
    "autocast_cpu",
    "world_size",
)


def environment_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Each environment key whose value changed, and whether that rules out bitwise equality.

    A key the recorded run did not write (an older seedreg) is listed but does not rule it out.
    """
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if a != b:
            out.append({"key": key, "recorded": a, "current": b, "breaks_bitwise": key in BITWISE_KEYS and key in recorded})
    return out
