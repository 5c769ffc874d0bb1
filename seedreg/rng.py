"""Random state of python, numpy, torch's CPU and CUDA generators: capture, restore, encode, fork.

Every state that leaves this module is JSON-native (byte states as base64, their lengths checked
when they come back), so a checkpoint of seedreg's state never needs pickle.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import random
import struct
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import SeedregError, StateError

__all__ = ["Fork", "capture_global", "restore_global", "seed_globals", "cuda_devices_in_use"]

_MASK32 = 0xFFFFFFFF
_issued: "weakref.WeakSet[torch.Generator]" = weakref.WeakSet()  # generators sessions handed out, while alive


def issue(generator: torch.Generator) -> torch.Generator:
    """Note a generator a session hands out (``find_nondeterminism`` restores every live one)."""
    _issued.add(generator)
    return generator


def issued_generators() -> List[torch.Generator]:
    """The generators sessions handed out that are still alive."""
    return list(_issued)
_default_generator = torch.default_generator


def b64encode(data: bytes) -> str:
    """A generator state's bytes as text: hex (CPython decodes it six times faster than base64;
    states of seedreg 0.2 and earlier are base64, and still load)."""
    return data.hex()


def b64decode(text: object, *, length: Optional[int], what: str) -> bytes:
    """Decode hex or base64 `text`, refusing anything that is not exactly `length` bytes of it.
    With `length` known the two cannot be confused: hex is 2 * length characters, base64 4/3."""
    if not isinstance(text, str):
        raise StateError(f"{what} must be a hex or base64 str, got {type(text).__name__}.")
    if length is not None and len(text) == 2 * length:
        try:
            data = bytes.fromhex(text)
        except ValueError as exc:
            raise StateError(f"{what} is not valid hex: {exc}.") from None
        if len(data) != length:  # fromhex skips whitespace
            raise StateError(f"{what} must decode to {length} bytes, got {len(data)}; the state is corrupt.")
        return data
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise StateError(f"{what} is not valid base64: {exc}.") from None
    if length is not None and len(data) != length:
        raise StateError(f"{what} must decode to {length} bytes, got {len(data)}; the state is corrupt or from another torch build.")
    return data


def seed_numpy_global(seed: int) -> None:
    """Seed numpy's global RandomState from any non-negative int (up to 64 bits)."""
    if seed <= _MASK32:
        np.random.seed(seed)
    else:
        np.random.seed([seed & _MASK32, (seed >> 32) & _MASK32])


def cuda_devices_in_use() -> List[int]:
    """The CUDA device whose generator a fork covers by default: the current one, once CUDA is up.

    Devices CUDA has not touched yet are left alone (touching one creates a context on it).
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [torch.cuda.current_device()]
    return []


def seed_globals(seed: int, *, cuda: bool = True) -> None:
    """Seed python's `random`, numpy's global RNG, torch's CPU generator and (lazily) every CUDA device."""
    random.seed(seed)
    seed_numpy_global(seed)
    _default_generator.manual_seed(seed)
    if cuda and torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# The global generators are process-wide: two threads seeding and restoring them at once would swap
# each other's streams. The thread inside a fork (or a builder, or a scope) owns them until it leaves.
_owner_lock = threading.Lock()
_owner: List[Any] = [None, 0]  # [thread id, depth]


def _claim() -> None:
    me = threading.get_ident()
    with _owner_lock:
        if _owner[0] is not None and _owner[0] != me:
            raise SeedregError(
                "another thread is inside a seedreg fork, scope or builder: the global generators (python, "
                "numpy, torch) are process-wide, so two threads seeding them at once would swap each other's "
                "streams. Build models and enter forks from one thread at a time, or give each thread its own "
                "session.generator(...) / numpy_rng(...) stream."
            )
        _owner[0] = me
        _owner[1] += 1


def _release() -> None:
    with _owner_lock:
        _owner[1] -= 1
        if _owner[1] <= 0:
            _owner[0], _owner[1] = None, 0


class Fork:
    """Seed the global generators for a block and put them back as they were afterwards.

    Covers torch's CPU generator and the CUDA generators of `devices` (default: the current device
    once CUDA is initialised), plus python's `random` and numpy's global RNG when `python` /
    `numpy` are set. State is restored in ``__exit__`` even when the block raises. Seeding uses
    the generator directly (``torch.manual_seed`` would also touch every backend, ~100x slower).
    With ``enabled=False`` it does nothing, so code can switch it off without re-indenting.
    """

    __slots__ = ("seed", "devices", "python", "numpy", "enabled", "_cpu", "_cuda", "_py", "_np")

    def __init__(
        self,
        seed: int,
        *,
        devices: Optional[Sequence[int]] = None,
        python: bool = False,
        numpy: bool = False,
        enabled: bool = True,
    ) -> None:
        self.seed = seed
        self.devices = devices
        self.python = python
        self.numpy = numpy
        self.enabled = enabled

    def __enter__(self) -> int:
        if not self.enabled:
            return self.seed
        _claim()
        seed = self.seed
        self._cpu = _default_generator.get_state()
        devices = self.devices
        if devices is None:
            devices = cuda_devices_in_use()
        if devices:
            self._cuda: Optional[List[Tuple[int, torch.Tensor]]] = [(d, torch.cuda.get_rng_state(d)) for d in devices]
            for d in devices:
                torch.cuda.default_generators[d].manual_seed(seed)
        else:
            self._cuda = None
        if self.python:
            self._py = random.getstate()
            random.seed(seed)
        if self.numpy:
            self._np = np.random.get_state()
            seed_numpy_global(seed)
        _default_generator.manual_seed(seed)
        return seed

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        try:
            _default_generator.set_state(self._cpu)
            if self._cuda is not None:
                for d, state in self._cuda:
                    torch.cuda.set_rng_state(state, d)
            if self.python:
                random.setstate(self._py)
            if self.numpy:
                np.random.set_state(self._np)
        finally:
            _release()


# -- global state as JSON ---------------------------------------------------------------------------

_PY_WORDS = 625  # 624 Mersenne Twister words and the position
_PY_VERSION = random.getstate()[0]  # 3 on every CPython since 3.2
_WORDS = struct.Struct(f"<{_PY_WORDS}I")


def capture_global(*, cuda: bool = True) -> Dict[str, Any]:
    """The state of every global generator, as JSON-native data."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": {
            "version": version,
            "words": b64encode(_WORDS.pack(*words)),
            "gauss_next": gauss,
        },
        "numpy": {
            "kind": kind,
            "keys": b64encode(np.asarray(keys, dtype="<u4").tobytes()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": b64encode(_default_generator.get_state().numpy().tobytes()),
        "cuda": {},
    }
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = {
            str(d): b64encode(torch.cuda.get_rng_state(d).numpy().tobytes()) for d in range(torch.cuda.device_count())
        }
    return state


def _field(mapping: Mapping[str, Any], name: str, types: Any, where: str) -> Any:
    if not isinstance(mapping, Mapping) or name not in mapping:
        raise StateError(f"{where} is missing {name!r}.")
    value = mapping[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise StateError(f"{where}[{name!r}] must be {types}, got a bool.")
    if not isinstance(value, types):
        raise StateError(f"{where}[{name!r}] has the wrong type {type(value).__name__}.")
    return value


_SCRATCH_LOCK = threading.Lock()


@functools.cache
def _torch_state_length() -> int:
    """A CPU generator state's size: fixed for a torch build, asked once."""
    return int(_default_generator.get_state().numel())


@functools.cache
def _scratch_torch() -> torch.Generator:
    """The generator decode_global loads a CPU state into to validate it (under _SCRATCH_LOCK)."""
    return torch.Generator()


def decode_global(state: object) -> Dict[str, Any]:
    """Validate a state from :func:`capture_global` whole and turn it into restorable objects.

    Each generator's state is loaded into a scratch generator of the same kind (so a state its own
    library would refuse is refused here, before anything changes), numbers are bounded, and a
    degenerate all-zero Mersenne Twister (which draws zeros forever, or spins in numpy's
    ``randn``) is refused. CUDA states need the devices they name.
    """
    where = "rng state"
    if not isinstance(state, Mapping):
        raise StateError(f"{where} must be a dict, got {type(state).__name__}.")
    py = _field(state, "python", Mapping, where)
    version = _field(py, "version", int, "rng state['python']")
    if version != _PY_VERSION:
        raise StateError(f"rng state['python']['version'] must be {_PY_VERSION} (python's random), got {version!r:.40}.")
    raw = b64decode(_field(py, "words", str, "rng state['python']"), length=_PY_WORDS * 4, what="rng state['python']['words']")
    words = _WORDS.unpack(raw)
    gauss = py.get("gauss_next")
    if gauss is not None and (type(gauss) is not float or not math.isfinite(gauss)):
        raise StateError("rng state['python']['gauss_next'] must be a finite float or None.")
    if words[-1] > 624:
        raise StateError("rng state['python'] has an index past 624: the state is corrupt.")
    if raw[: 624 * 4] == _ZEROS[: 624 * 4]:
        raise StateError("rng state['python'] is all zeros, a degenerate Mersenne Twister state: the state is corrupt.")
    # what random.setstate checks is checked above (version, 625 words below 2**32, the index,
    # gauss_next): loading it into a scratch Random would cost as much as the restore itself
    python_state = (version, words, gauss)
    npst = _field(state, "numpy", Mapping, where)
    kind = _field(npst, "kind", str, "rng state['numpy']")
    if kind != "MT19937":
        raise StateError(f"rng state['numpy']['kind'] must be 'MT19937', got {kind!r:.40}.")
    raw = b64decode(_field(npst, "keys", str, "rng state['numpy']"), length=624 * 4, what="rng state['numpy']['keys']")
    keys = np.frombuffer(raw, dtype="<u4").astype(np.uint32)
    if raw == _ZEROS[: 624 * 4]:
        raise StateError("rng state['numpy']['keys'] are all zeros, a degenerate Mersenne Twister state: the state is corrupt.")
    pos = _field(npst, "pos", int, "rng state['numpy']")
    if not 0 <= pos <= 624:
        raise StateError(f"rng state['numpy']['pos'] must be in [0, 624], got {pos!r:.40}.")
    has_gauss = _field(npst, "has_gauss", int, "rng state['numpy']")
    if has_gauss not in (0, 1):
        raise StateError(f"rng state['numpy']['has_gauss'] must be 0 or 1, got {has_gauss!r:.40}.")
    cached = _field(npst, "cached_gaussian", (int, float), "rng state['numpy']")
    if type(cached) is int and abs(cached) > 2**53 or type(cached) is float and not math.isfinite(cached):
        raise StateError(f"rng state['numpy']['cached_gaussian'] must be a finite float, got {cached!r:.40}.")
    # every field numpy's set_state checks is checked above (kind, 624 uint32 keys, pos, has_gauss,
    # a finite cached value): a scratch RandomState would cost ~130 us for nothing more
    numpy_state = ("MT19937", keys, pos, has_gauss, float(cached))
    blob = bytearray(b64decode(_field(state, "torch", str, where), length=_torch_state_length(), what="rng state['torch']"))
    cpu = torch.frombuffer(blob, dtype=torch.uint8)
    with _SCRATCH_LOCK:  # one scratch generator for the process: threads take turns
        _check_torch_state(_scratch_torch(), cpu, "rng state['torch']", blob)
    cuda = _field(state, "cuda", Mapping, where)
    cuda_states = {}
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for dev, text in cuda.items():
        if not (isinstance(dev, str) and dev.isascii() and dev.isdigit() and len(dev) <= 4 and dev == str(int(dev))):
            raise StateError(f"rng state['cuda'] keys must be device indices, got {dev!r:.40}.")
        if int(dev) >= visible:
            raise StateError(
                f"the state holds a CUDA generator for device {int(dev)} but this process sees {visible} CUDA "
                f"device(s); resume on a machine with the devices the run used."
            )
        length = torch.cuda.get_rng_state(int(dev)).numel()
        data = torch.frombuffer(bytearray(b64decode(text, length=length, what=f"rng state['cuda'][{dev!r}]")), dtype=torch.uint8)
        _check_torch_state(torch.Generator(device=f"cuda:{int(dev)}"), data, f"rng state['cuda'][{dev!r}]")
        cuda_states[int(dev)] = data
    return {"python": python_state, "numpy": numpy_state, "torch": cpu, "cuda": cuda_states}


# Where a CPU generator's state keeps its Mersenne Twister words (after the initial seed, `left`,
# `seeded` and `next`: 624 uint64 from byte 24), checked against this torch at first use; None
# where the layout differs (then a state is checked by drawing from it).
_ZEROS = bytes(624 * 8)


@functools.cache
def _mt_words() -> Optional[slice]:
    """Where the words are, once checked: zeroing exactly those bytes must make the generator draw zeros."""
    where = slice(24, 24 + 624 * 8)
    g = torch.Generator()
    g.manual_seed(1)
    blob = bytearray(g.get_state().numpy().tobytes())
    blob[where] = _ZEROS
    try:
        g.set_state(torch.frombuffer(blob, dtype=torch.uint8))
    except RuntimeError:
        return None
    return None if torch.randint(0, 2**62, (8,), generator=g).any() else where


def _check_torch_state(scratch: torch.Generator, data: torch.Tensor, what: str, raw: Optional[bytearray] = None) -> None:
    """Load `data` into `scratch` (refusing what torch refuses) and refuse a state that draws zeros
    (`raw`: the same bytes, compared faster than the tensor)."""
    try:
        scratch.set_state(data)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise StateError(f"{what} was refused by torch: {str(exc).splitlines()[0]}.") from None
    if scratch.device.type != "cpu":
        return
    words = _mt_words()
    if words is not None:  # the words themselves: no draw needed
        zero = raw[words] == _ZEROS[: 624 * 8] if raw is not None else not data[words].any()
    else:
        zero = not torch.randint(0, 2**62, (4,), generator=scratch).any()
    if zero:
        raise StateError(f"{what} draws only zeros (an all-zero Mersenne Twister): the state is corrupt.")


def restore_global(decoded: Mapping[str, Any]) -> None:
    """Put back a state decoded (and so validated) by :func:`decode_global`."""
    random.setstate(decoded["python"])
    np.random.set_state(decoded["numpy"])
    _default_generator.set_state(decoded["torch"])
    for dev, data in decoded["cuda"].items():
        torch.cuda.set_rng_state(data, dev)


def capture_raw() -> Tuple[Any, ...]:
    """The global generators' states as the libraries give them, for an in-process rewind."""
    devices = cuda_devices_in_use()
    return (random.getstate(), np.random.get_state(), _default_generator.get_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices])


def restore_raw(state: Tuple[Any, ...]) -> None:
    """Put back :func:`capture_raw`'s states."""
    py, npst, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npst)
    _default_generator.set_state(cpu)
    for d, st in cuda:
        torch.cuda.set_rng_state(st, d)
