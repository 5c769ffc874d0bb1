"""What ``SeedSession.build_model`` and ``build_optimizer`` do: build inside a fork seeded from
the key's seed, and record what was built (class, size and initial fingerprint of a model; class
and every hyperparameter of an optimizer) with the use."""

from __future__ import annotations

from collections.abc import Mapping
import warnings
from typing import Any, Callable, Dict, Set, Tuple, Type

import numpy as np

import torch

from .derive import InstanceId, check_instance_id
from .determinism import GlobalSetup
from .errors import SeedregWarning, user_stacklevel
from .fingerprint import fingerprint
from .masks import check_mask_args, make_subset_mask, mask_digest
from .registry import Registry
from .rng import Fork

__all__ = ["Builders"]


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


class Builders:
    """A session's model, optimizer and subset-mask builders: each draws from its key's seed in
    `registry` and records what it built with the use."""

    def __init__(self, registry: Registry, setup: GlobalSetup) -> None:
        self.registry = registry
        self.setup = setup
        self._told: Set[InstanceId] = set()  # keys warned of as an ensemble over one key

    def _in_fork(self, purpose: str, instance_id: InstanceId, build: Callable[[], Any]) -> Tuple[Any, InstanceId, int]:
        """`build()` inside a fork of python, numpy and torch seeded from (purpose, instance_id): the
        object, the checked instance id and the number of this use."""
        instance_id = check_instance_id(instance_id)
        self.setup.warn_if_not_set_up(f"build_{purpose}")
        seed, use = self.registry.use(purpose, instance_id, purpose)
        with Fork(seed, python=True, numpy=True):
            return build(), instance_id, use

    def model(self, factory: Callable[..., Any], instance_id: InstanceId, kwargs: Dict[str, Any]) -> Any:
        """``SeedSession.build_model``."""
        if not callable(factory):
            raise TypeError(f"`factory` must be callable (a model class or a function), got {factory!r}.")
        model, instance_id, use = self._in_fork("model", instance_id, lambda: factory(**kwargs))
        if isinstance(model, torch.nn.Module):
            details = {
                "class": f"{type(model).__module__}.{type(model).__qualname__}",
                "compiled": hasattr(model, "_orig_mod"),
                "fingerprint": fingerprint(model),
                "parameters": int(sum(p.numel() for p in model.parameters())),
            }
            if self.registry.detail("model", instance_id, use, details):
                self._same_model_again(instance_id, use)
        return model

    def _same_model_again(self, instance_id: InstanceId, use: int) -> None:
        """Warn once per key that a model was built again with the previous build's weights (an
        ensemble looped over one key is N copies of one model)."""
        if instance_id in self._told:
            return
        self._told.add(instance_id)
        warnings.warn(
            f"build_model(..., {instance_id!r}) built the same initial weights again (use {use} of the key ('model', "
            f"{instance_id!r})): every model built on one key starts identical. For an ensemble or several models, give "
            f"each its own instance id (build_model(factory, f'member{{k}}') in the loop); a deliberate second copy can "
            f"ignore this warning.",
            SeedregWarning,
            stacklevel=user_stacklevel(),
        )

    def optimizer(self, optimizer_class: Type[torch.optim.Optimizer], params: Any, instance_id: InstanceId,
                  kwargs: Dict[str, Any]) -> torch.optim.Optimizer:
        """``SeedSession.build_optimizer``."""
        if not callable(optimizer_class):
            raise TypeError(f"`optimizer_class` must be an optimizer class such as torch.optim.SGD, got {optimizer_class!r}.")
        optimizer, instance_id, use = self._in_fork("optimizer", instance_id, lambda: optimizer_class(params, **kwargs))
        groups = [
            {**{k: _jsonable(v) for k, v in g.items() if k != "params"}, "params": len(g.get("params", ()))}
            for g in getattr(optimizer, "param_groups", ())
        ]
        details = {
            "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "defaults": _jsonable(getattr(optimizer, "defaults", {})),
            "param_groups": groups,
        }
        self.registry.detail("optimizer", instance_id, use, details)
        return optimizer

    def subset_mask(self, num_examples: int, alpha: float, instance_id: InstanceId, mode: str) -> np.ndarray:
        """``SeedSession.subset_mask``: the mask of (master seed, instance id), recorded with its digest."""
        check_mask_args(num_examples, alpha, mode)
        seed, use = self.registry.use("subset_mask", instance_id, "subset_mask")
        mask = make_subset_mask(seed, int(num_examples), float(alpha), mode)
        details = {"num_examples": int(num_examples), "alpha": float(alpha), "mode": mode, "kept": int(mask.sum()),
                   "digest": mask_digest(mask)}
        self.registry.detail("subset_mask", check_instance_id(instance_id), use, details)
        return mask
