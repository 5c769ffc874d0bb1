"""The global deterministic setup, the environment fingerprint, and the record of nondeterminism.

Nothing here runs at import time: :func:`apply_settings` is called by ``SeedSession.setup()``.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import re
import sys
import threading
import warnings
import weakref
from typing import Any, Dict, List, Optional

import attrs
import numpy as np
import torch

from ._version import __version__

__all__ = ["BITWISE_KEYS", "DeterminismSettings", "GlobalSetup", "apply_settings", "environment", "ViolationLog", "CUBLAS_DEFAULT"]

from ._log import enabled as log_enabled
from ._log import logger as log
from .bitwise import BITWISE_KEYS  # re-exported: 0.1.0 defined it here
from .errors import SeedregWarning, user_stacklevel
from .rng import seed_globals

CUBLAS_VAR = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DEFAULT = ":4096:8"
_CUBLAS_FORMAT = re.compile(r"^(:\d+:\d+)+$")
_NONDETERMINISTIC = "does not have a deterministic implementation"


@attrs.frozen(kw_only=True)
class DeterminismSettings:
    """What ``setup()`` applies. Kept in the manifest, so a replay applies the same.

    >>> DeterminismSettings()
    DeterminismSettings(deterministic=True, warn_only=True, fill_uninitialized_memory=True)
    """

    deterministic: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    warn_only: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    fill_uninitialized_memory: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))

    def to_dict(self) -> Dict[str, bool]:
        """The settings as a dict, as the manifest keeps them."""
        return attrs.asdict(self)

    @classmethod
    def checked(cls, **flags: Any) -> "DeterminismSettings":
        """The settings, each flag checked to be a bool (a clear TypeError naming it otherwise)."""
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__}).")
        return cls(**flags)


class ViolationLog:
    """Nondeterminism that happened during a session: torch's warnings and late settings."""

    def __init__(self) -> None:
        self._items: List[Dict[str, str]] = []
        self._lock = threading.Lock()

    def add(self, kind: str, message: str) -> None:
        item = {"kind": kind, "message": message}
        with self._lock:
            if item not in self._items:
                self._items.append(item)

    def __iter__(self):
        with self._lock:
            return iter([dict(i) for i in self._items])

    def __len__(self) -> int:
        return len(self._items)


# All of seedreg's global state about warnings lives here: one hook, installed by the first
# ``setup()`` with warn_only=True, that copies torch's "no deterministic implementation" warnings
# into the logs of the live sessions and then shows the warning as before.
_sinks: "weakref.WeakSet[ViolationLog]" = weakref.WeakSet()
# The CUBLAS_WORKSPACE_CONFIG value an earlier setup() in this process wrote, if any.
_state: Dict[str, Any] = {}
_previous_showwarning: Optional[Any] = None


def _showwarning(message, category, filename, lineno, file=None, line=None):
    text = str(message)
    if _NONDETERMINISTIC in text:
        for sink in list(_sinks):
            sink.add("nondeterministic_op", text.split(" does not have", 1)[0])
    assert _previous_showwarning is not None
    return _previous_showwarning(message, category, filename, lineno, file, line)


def watch_violations(sink: ViolationLog) -> None:
    """Copy torch's nondeterministic-op warnings into `sink` from now on (via warnings.showwarning)."""
    global _previous_showwarning
    _sinks.add(sink)
    if warnings.showwarning is not _showwarning:
        _previous_showwarning = warnings.showwarning
        warnings.showwarning = _showwarning


def apply_settings(settings: DeterminismSettings, violations: ViolationLog) -> Dict[str, Any]:
    """Apply `settings` to this process and return what was applied (for the manifest)."""
    applied: Dict[str, Any] = {"deterministic": settings.deterministic}
    if not settings.deterministic:
        return applied
    current = os.environ.get(CUBLAS_VAR)
    if current is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            message = (
                f"{CUBLAS_VAR} was set after CUDA was initialised; cuBLAS reads it when its handle "
                f"is created, so it may have no effect. Create the SeedSession and call setup() "
                f"before any CUDA work, or export {CUBLAS_VAR}={CUBLAS_DEFAULT} before starting python."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            violations.add("cublas_late", message)
        os.environ[CUBLAS_VAR] = CUBLAS_DEFAULT
        _state["cublas_set"] = CUBLAS_DEFAULT
        applied["cublas_workspace_config"] = {"value": CUBLAS_DEFAULT, "set_by": "seedreg"}
    else:
        by = "seedreg" if _state.get("cublas_set") == current else "user"
        applied["cublas_workspace_config"] = {"value": current, "set_by": by}
        if not _CUBLAS_FORMAT.match(current):
            message = (
                f"{CUBLAS_VAR}={current!r} is malformed (expected ':4096:8' or ':16:8'); seedreg "
                f"leaves a user's value alone, so fix it in the environment."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            violations.add("cublas_malformed", message)
    torch.use_deterministic_algorithms(True, warn_only=settings.warn_only)
    applied["use_deterministic_algorithms"] = True
    applied["warn_only"] = settings.warn_only
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    applied["cudnn_deterministic"] = True
    applied["cudnn_benchmark"] = False
    utils_det = getattr(torch.utils, "deterministic", None)
    if utils_det is not None and hasattr(utils_det, "fill_uninitialized_memory"):
        utils_det.fill_uninitialized_memory = settings.fill_uninitialized_memory
        applied["fill_uninitialized_memory"] = settings.fill_uninitialized_memory
    else:  # pragma: no cover - torch < 2.1
        applied["fill_uninitialized_memory"] = None
    if settings.warn_only:
        watch_violations(violations)
    if log_enabled(logging.DEBUG):
        log.debug("deterministic_setup", **{k: str(v) for k, v in applied.items()})
    return applied



class GlobalSetup:
    """A session's global setup: what ``setup()`` applied, once, and the nondeterminism seen since.

    The builders ask it whether the process is set up, and it warns once (at the user's line) when
    they run before ``setup()``.
    """

    def __init__(self, master_seed: int, settings: DeterminismSettings) -> None:
        self.master_seed = master_seed
        self.settings = settings
        self.violations = ViolationLog()
        self.applied: Dict[str, Any] = {}
        self.is_set_up = False
        self.warned = False

    def apply(self, global_seed: int) -> None:
        """Seed the global generators with `global_seed` and apply the settings (the session calls
        it once: ``setup()`` returns early when :attr:`is_set_up`)."""
        seed_globals(global_seed)
        self.applied = {"global_seed": global_seed, **apply_settings(self.settings, self.violations)}
        self.is_set_up = True

    def __getstate__(self) -> Dict[str, Any]:
        # a copy in another process (a spawned worker) has seen no violation there yet
        return {k: v for k, v in self.__dict__.items() if k != "violations"}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.violations = ViolationLog()

    def warn_if_not_set_up(self, builder: str) -> None:
        """Warn (once a session) that a builder runs before setup(): its own draws are seeded, but
        everything the run draws from the global generators (dropout, augmentation in the main
        process, weight init outside build_model) and the deterministic kernels are not."""
        if self.is_set_up or self.warned:
            return
        self.warned = True
        m = self.master_seed
        warnings.warn(
            f"SeedSession({m}).{builder}() was called before setup(): the global generators (python, "
            f"numpy, torch, CUDA) are not seeded and deterministic algorithms are off, so dropout and other draws outside "
            f"seedreg's builders differ between runs. Call session.setup() first (SeedSession({m}).setup()).",
            SeedregWarning,
            stacklevel=user_stacklevel(),
        )

def _gpus() -> List[Dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    out = []
    for d in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(d)
        out.append({"name": props.name, "capability": f"{props.major}.{props.minor}"})
    return out


def environment(world_size: int = 1) -> Dict[str, Any]:
    """What a bitwise replay depends on: versions, devices and the flags that change kernels.

    Reading it initialises CUDA where a GPU is present (to name the devices).
    """
    cudnn = torch.backends.cudnn
    utils_det = getattr(torch.utils, "deterministic", None)
    return {
        "seedreg": __version__,
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": f"{platform.system()}-{platform.machine()}",
        "cpu": cpu_model(),
        "cpu_capability": _cpu_capability(),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn.version() if cudnn.is_available() else None,
        "gpus": _gpus(),
        "cublas_workspace_config": os.environ.get(CUBLAS_VAR),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(cudnn.deterministic),
        "cudnn_benchmark": bool(cudnn.benchmark),
        "cudnn_allow_tf32": bool(cudnn.allow_tf32),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "fill_uninitialized_memory": getattr(utils_det, "fill_uninitialized_memory", None),
        "autocast_cpu": _autocast_cpu(),
        "compiled_graphs": _compiled_graphs(),
        "world_size": world_size,
    }


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what the platform module knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_capability() -> Optional[str]:
    """The CPU kernel family torch dispatches to ("AVX512", "AVX2", "DEFAULT", ...): float results
    of CPU ops differ between families, so a bitwise replay needs the same one."""
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return get() if get is not None else None


def _autocast_cpu() -> Optional[bool]:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # pragma: no cover - torch < 2.4 takes no device
        return None


def _compiled_graphs() -> Optional[int]:
    """How many graphs torch.compile built in this process so far (None if it was never imported).

    torch.compile draws random numbers differently from eager mode, so a replay must compile too.
    """
    if "torch._dynamo" not in sys.modules:
        return None
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover - internal API moved
        return None




def readiness(env: Dict[str, Any]) -> List[Dict[str, str]]:
    """Checks of this process against what bitwise replay needs: status "ok", "warn" or "info"."""
    checks: List[Dict[str, str]] = []

    def add(status: str, message: str) -> None:
        checks.append({"status": status, "message": message})

    cublas = env.get("cublas_workspace_config")
    if cublas is None:
        add("info", f"{CUBLAS_VAR} is not set: SeedSession.setup() sets {CUBLAS_DEFAULT}, which only takes effect "
            f"before CUDA initialises; export it to be safe.")
    elif not _CUBLAS_FORMAT.match(cublas):
        add("warn", f"{CUBLAS_VAR}={cublas!r} is malformed; use {CUBLAS_DEFAULT} or :16:8.")
    else:
        add("ok", f"{CUBLAS_VAR}={cublas}")
    if env.get("gpus"):
        names = ", ".join(f"{g['name']} (sm {g['capability']})" for g in env["gpus"])
        add("info", f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}: {names}; bitwise replay needs the same GPU model and versions.")
        if env.get("cudnn_allow_tf32"):
            add("warn", "cuDNN may use TF32 for convolutions (torch.backends.cudnn.allow_tf32=True): deterministic on one GPU model, different across models.")
        if env.get("cuda_matmul_allow_tf32"):
            add("warn", "TF32 matmuls are on (torch.backends.cuda.matmul.allow_tf32=True): results differ across GPU models.")
    else:
        add("info", "no CUDA device: CPU runs replay bit for bit on the same torch build and CPU architecture.")
    if env.get("float32_matmul_precision") != "highest":
        add("warn", f"float32 matmul precision is {env.get('float32_matmul_precision')!r}: results depend on the hardware's fast paths.")
    if env.get("cudnn_benchmark"):
        add("warn", "cudnn.benchmark=True picks kernels by timing: runs differ; setup() turns it off.")
    if env.get("compiled_graphs"):
        add("warn", f"torch.compile built {env['compiled_graphs']} graph(s) in this process: compiled code draws random numbers differently from eager mode, so a replay must compile the same way.")
    add("info", f"torch {env.get('torch')}, numpy {env.get('numpy')}, python {env.get('python')}: a replay on other versions is only statistically comparable.")
    return checks
