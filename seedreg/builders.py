"""What ``SeedSession.build_model`` and ``build_optimizer`` do: build inside a fork seeded from
the key's seed, and record what was built (class, size and initial fingerprint of a model; class
and every hyperparameter of an optimizer) with the use."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Dict, Tuple, Type

import numpy as np

import torch

from .derive import InstanceId, check_instance_id
from .fingerprint import fingerprint
from .errors import SeedregWarning
from .masks import check_mask_args, make_subset_mask, mask_digest
from .rng import Fork

if TYPE_CHECKING:
    from .session import SeedSession

__all__ = ["build_model", "build_optimizer", "subset_mask", "warn_not_set_up"]


def _jsonable(value: Any) -> Any:
    """Best-effort JSON-native copy of small config values (tuples become lists, others their repr)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _build_in_fork(session: "SeedSession", purpose: str, instance_id: InstanceId, build: Callable[[], Any]) -> Tuple[Any, InstanceId, int]:
    """`build()` inside a fork of python, numpy and torch seeded from (purpose, instance_id): the
    object, the checked instance id and the number of this use."""
    instance_id = check_instance_id(instance_id)
    warn_not_set_up(session, f"build_{purpose}", stacklevel=5)
    seed, use = session._registry.use(purpose, instance_id, purpose)
    with Fork(seed, python=True, numpy=True):
        return build(), instance_id, use


def build_model(session: "SeedSession", factory: Callable[..., Any], instance_id: InstanceId, kwargs: Dict[str, Any]) -> Any:
    if not callable(factory):
        raise TypeError(f"`factory` must be callable (a model class or a function), got {factory!r}.")
    model, instance_id, use = _build_in_fork(session, "model", instance_id, lambda: factory(**kwargs))
    if isinstance(model, torch.nn.Module):
        details = {
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "compiled": hasattr(model, "_orig_mod"),
            "fingerprint": fingerprint(model),
            "parameters": int(sum(p.numel() for p in model.parameters())),
        }
        session._registry.detail("model", instance_id, use, details)
    return model


def build_optimizer(session: "SeedSession", optimizer_class: Type[torch.optim.Optimizer], params: Any, instance_id: InstanceId,
                    kwargs: Dict[str, Any]) -> torch.optim.Optimizer:
    if not callable(optimizer_class):
        raise TypeError(f"`optimizer_class` must be an optimizer class such as torch.optim.SGD, got {optimizer_class!r}.")
    optimizer, instance_id, use = _build_in_fork(session, "optimizer", instance_id, lambda: optimizer_class(params, **kwargs))
    groups = [
        {**{k: _jsonable(v) for k, v in g.items() if k != "params"}, "params": len(g.get("params", ()))}
        for g in getattr(optimizer, "param_groups", ())
    ]
    details = {
        "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "defaults": _jsonable(getattr(optimizer, "defaults", {})),
        "param_groups": groups,
    }
    session._registry.detail("optimizer", instance_id, use, details)
    return optimizer


def subset_mask(session: "SeedSession", num_examples: int, alpha: float, instance_id: InstanceId, mode: str) -> np.ndarray:
    """``SeedSession.subset_mask``: the mask of (master seed, instance id), recorded with its digest."""
    check_mask_args(num_examples, alpha, mode)
    seed, use = session._registry.use("subset_mask", instance_id, "subset_mask")
    mask = make_subset_mask(seed, int(num_examples), float(alpha), mode)
    details = {"num_examples": int(num_examples), "alpha": float(alpha), "mode": mode, "kept": int(mask.sum()), "digest": mask_digest(mask)}
    session._registry.detail("subset_mask", check_instance_id(instance_id), use, details)
    return mask


def warn_not_set_up(session: "SeedSession", builder: str, stacklevel: int = 4) -> None:
    """Warn (once a session) that a builder runs before setup(): its own draws are seeded, but
    everything the run draws from the global generators (dropout, augmentation in the main
    process, weight init outside build_model) and the deterministic kernels are not."""
    if session._is_set_up or session._warned_setup:
        return
    session._warned_setup = True
    m = session.master_seed
    warnings.warn(
        f"SeedSession({m}).{builder}() was called before setup(): the global generators (python, "
        f"numpy, torch, CUDA) are not seeded and deterministic algorithms are off, so dropout and other draws outside "
        f"seedreg's builders differ between runs. Call session.setup() first (SeedSession({m}).setup()).",
        SeedregWarning,
        stacklevel=stacklevel,  # the user's call of the session's builder
    )
