"""Replaying a run from its manifest: what was asked for, what differed, and what to expect.

The verdict says whether bitwise equality with the recorded run can be expected (same torch,
numpy, CUDA, cuDNN, GPUs, deterministic flags and precision settings) or only statistical
agreement, and why.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Tuple

from .determinism import BITWISE_KEYS
from .manifest import Manifest
from .registry import SeedRecord

__all__ = ["environment_differences", "replay_report"]


def environment_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Each environment key whose value changed, and whether that rules out bitwise equality."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if a != b:
            out.append({"key": key, "recorded": a, "current": b, "breaks_bitwise": key in BITWISE_KEYS})
    return out


def _key(purpose: str, instance_id: Any) -> Dict[str, Any]:
    return {"purpose": purpose, "instance_id": instance_id}


def replay_report(
    manifest: Manifest,
    expected: Iterable[SeedRecord],
    issued: Iterable[Tuple[str, Any]],
    new: Iterable[Tuple[str, Any]],
    mismatches: Iterable[Mapping[str, Any]],
    current_env: Mapping[str, Any],
) -> Dict[str, Any]:
    """The report ``SeedSession.replay_report()`` returns (JSON-native)."""
    issued_keys = {(p, type(i), i) for p, i in issued}
    missing = [_key(r.purpose, r.instance_id) for r in expected if (r.purpose, type(r.instance_id), r.instance_id) not in issued_keys]
    env = environment_differences(manifest.environment, current_env)
    mismatches = [dict(m) for m in mismatches]
    reasons = [f"environment {d['key']}: {d['recorded']!r} -> {d['current']!r}" for d in env if d["breaks_bitwise"]]
    reasons += [f"mismatch: {m['message']}" for m in mismatches]
    return {
        "master_seed": manifest.master_seed,
        "scheme": manifest.scheme,
        "missing": missing,
        "new": [_key(p, i) for p, i in new],
        "mismatches": mismatches,
        "environment": env,
        "verdict": "statistical" if reasons else "bitwise",
        "reasons": reasons,
    }
