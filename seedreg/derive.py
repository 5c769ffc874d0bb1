"""Seed derivation: pure functions from (master seed, purpose, instance id) to a seed.

Two schemes are offered, and each is a stability promise: the same inputs give the same seed in
every process, on every platform, in every future version of seedreg. Golden vectors in the tests
guard both.

``"sha256-v1"`` (the default) is the seed document's formula, bit for bit::

    sha256(f"{master_seed}_{purpose}" + (f"_{instance_id}" if instance_id is not None else ""))
    -> first 8 hex digits as an int, modulo 2**31

It is ambiguous (``("model_a", None)`` and ``("model", "a")`` hash the same string, so do ``0`` and
``"0"``) and 31-bit, so about 30,000 seeds already give even odds of a collision. The registry
refuses both kinds of clash; pick ``"sha256-v2"`` for new studies that issue many seeds.

``"sha256-v2"`` hashes a length-prefixed, type-tagged encoding of the three inputs and keeps 63
bits: distinct inputs never share an encoding, and a collision among 100,000 seeds has a chance
of about 5e-10.

>>> derive_seed(42, "model", "training")
1958051794
>>> derive_seed(42, "model", "training", scheme="sha256-v2")
3219116118159469697
"""

from __future__ import annotations

import hashlib
import operator
import struct
from typing import Any, Callable, Dict, Optional, Tuple, Union

__all__ = ["SCHEMES", "DEFAULT_SCHEME", "InstanceId", "derive_seed", "derivation_input", "mix_seed"]

InstanceId = Optional[Union[str, int]]

MASTER_SEED_MAX = 2**32 - 1
DEFAULT_SCHEME = "sha256-v1"
_V2_TAG = b"seedreg/sha256-v2\x00"
_sha256 = hashlib.sha256
_from_bytes = int.from_bytes


def _as_int(value: object) -> Optional[int]:
    """`value` as an int if it is an integer type other than bool (numpy's included), else None."""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not hasattr(type(value), "__index__"):
        return None
    return operator.index(value)  # type: ignore[arg-type]


def check_master_seed(master_seed: object, name: str = "master_seed") -> int:
    """Return `master_seed` if it is an int (not a bool) in [0, 2**32 - 1], else raise."""
    if type(master_seed) is not int:
        as_int = _as_int(master_seed)
        if as_int is None:
            raise TypeError(
                f"`{name}` must be an int in [0, 2**32 - 1], got {master_seed!r} "
                f"({type(master_seed).__name__}); pass a plain int such as 42."
            )
        master_seed = as_int
    if not 0 <= master_seed <= MASTER_SEED_MAX:
        raise ValueError(
            f"`{name}` must be in [0, 2**32 - 1] (it seeds numpy's legacy RNG), got {master_seed}; "
            f"reduce it, e.g. `{name} % 2**32`."
        )
    return master_seed


def check_purpose(purpose: object) -> str:
    """Return `purpose` if it is a non-empty str, else raise."""
    if type(purpose) is not str:
        raise TypeError(
            f"`purpose` must be a non-empty str such as 'model', got {purpose!r} "
            f"({type(purpose).__name__})."
        )
    if not purpose:
        raise ValueError("`purpose` must be a non-empty str such as 'model', got ''.")
    _check_text("purpose", purpose)
    return purpose


#: Int instance ids lie in [-2**255, 2**255): ample for indices and hashes, and bounded so that a
#: crafted manifest or state cannot ask for a number too long to print.
ID_INT_BOUND = 2**255


def _check_text(name: str, text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"`{name}` must be valid Unicode text (no lone surrogates), got {text!r:.80}.") from None


def check_instance_id(instance_id: object) -> InstanceId:
    """Return `instance_id` if it is None, a str or an int (not a bool; numpy ints become ints), else raise."""
    if instance_id is None:
        return None
    if type(instance_id) is str:
        _check_text("instance_id", instance_id)
        return instance_id
    as_int = instance_id if type(instance_id) is int else _as_int(instance_id)
    if as_int is not None and not isinstance(instance_id, str):
        if not -ID_INT_BOUND <= as_int < ID_INT_BOUND:
            raise ValueError(f"`instance_id` as an int must lie in [-2**255, 2**255), got an int of {as_int.bit_length()} bits; use a str.")
        return as_int
    raise TypeError(
        f"`instance_id` must be None, a str or an int (not a bool), got {instance_id!r} "
        f"({type(instance_id).__name__}); convert it, e.g. instance_id=str(x)."
    )


def _v1_input(master_seed: int, purpose: str, instance_id: InstanceId) -> bytes:
    if instance_id is None:
        return f"{master_seed}_{purpose}".encode()
    return f"{master_seed}_{purpose}_{instance_id}".encode()


_len8 = struct.Struct(">Q").pack


def _v2_prefix(master_seed: int, purpose: str) -> bytes:
    m = str(master_seed).encode()
    p = purpose.encode("utf-8", "surrogatepass")
    return _V2_TAG + b"i" + _len8(len(m)) + m + b"s" + _len8(len(p)) + p


def _v2_tail(instance_id: InstanceId) -> bytes:
    if instance_id is None:
        return b"n"
    if type(instance_id) is int:
        data = str(instance_id).encode()
        return b"i" + _len8(len(data)) + data
    data = instance_id.encode("utf-8", "surrogatepass")  # type: ignore[union-attr]
    return b"s" + _len8(len(data)) + data


def _v2_input(master_seed: int, purpose: str, instance_id: InstanceId) -> bytes:
    """Tagged, length-prefixed fields after a fixed tag: b"i" + 8-byte length + decimal for ints,
    b"s" + 8-byte length + UTF-8 for strs, b"n" for None. No two distinct inputs share an encoding."""
    return _v2_prefix(master_seed, purpose) + _v2_tail(instance_id)


# b"s" + 8-byte length for short strs (up to 63 characters encode to at most 252 bytes)
_STR_HEADS = tuple(b"s" + _len8(n) for n in range(256))
# SHA-256 states after hashing each (master seed, purpose) prefix: a seed then costs one copy and
# the instance id's bytes. Bounded, since purposes are few in practice.
_V2_STATES: Dict[Tuple[int, str], Any] = {}


def _v2(master_seed: int, purpose: str, instance_id: InstanceId) -> int:
    state = _V2_STATES.get((master_seed, purpose))
    if state is None:
        if len(_V2_STATES) > 4096:
            _V2_STATES.clear()
        state = _V2_STATES[(master_seed, purpose)] = _sha256(_v2_prefix(master_seed, purpose))
    h = state.copy()
    if type(instance_id) is str and len(instance_id) < 64:  # the common case, inlined: _v2_tail's bytes
        try:
            data = instance_id.encode()
        except UnicodeEncodeError:  # lone surrogates: the general path
            h.update(_v2_tail(instance_id))
        else:
            h.update(_STR_HEADS[len(data)] + data)
    else:
        h.update(_v2_tail(instance_id))
    return _from_bytes(h.digest()[:8], "big") >> 1


# SHA-256 states after hashing each "{master}_{purpose}_" prefix (v1), as _V2_STATES for v2
_V1_STATES: Dict[Tuple[int, str], Any] = {}


def _v1(master_seed: int, purpose: str, instance_id: InstanceId) -> int:
    # int(hexdigest()[:8], 16) % 2**31, computed as the first 4 bytes of the digest, big-endian,
    # with the top bit cleared: the same number without formatting or parsing hex
    if instance_id is None:
        return _from_bytes(_sha256(f"{master_seed}_{purpose}".encode()).digest()[:4], "big") & 0x7FFFFFFF
    state = _V1_STATES.get((master_seed, purpose))
    if state is None:
        if len(_V1_STATES) > 4096:
            _V1_STATES.clear()
        state = _V1_STATES[(master_seed, purpose)] = _sha256(f"{master_seed}_{purpose}_".encode())
    h = state.copy()
    h.update((instance_id if type(instance_id) is str else str(instance_id)).encode())
    return _from_bytes(h.digest()[:4], "big") & 0x7FFFFFFF


SCHEMES: Dict[str, Callable[[int, str, InstanceId], int]] = {"sha256-v1": _v1, "sha256-v2": _v2}
"""The derivation schemes, by name: ``"sha256-v1"`` (the default) and ``"sha256-v2"`` (studies'),
each a function of (master seed, purpose, instance id) to a seed; pass the name as ``scheme=``."""
_INPUTS: Dict[str, Callable[[int, str, InstanceId], bytes]] = {"sha256-v1": _v1_input, "sha256-v2": _v2_input}


def check_scheme(scheme: object) -> str:
    """Return `scheme` if it names a derivation scheme, else raise."""
    if scheme not in SCHEMES:
        raise ValueError(
            f"`scheme` must be one of {sorted(SCHEMES)}, got {scheme!r}; "
            f"use 'sha256-v2' for studies that issue many seeds."
        )
    return scheme


def derive_seed(
    master_seed: int, purpose: str, instance_id: InstanceId = None, *, scheme: str = DEFAULT_SCHEME
) -> int:
    """Derive the seed of one component from the master seed, its purpose and its instance id.

    A pure function: no state is read or written. See the module docstring for both schemes.

    >>> derive_seed(42, "optimizer", "training")
    1689976434
    >>> derive_seed(42, "model", True)
    Traceback (most recent call last):
    ...
    TypeError: `instance_id` must be None, a str or an int (not a bool), got True (bool); convert it, e.g. instance_id=str(x).
    """
    if type(master_seed) is not int or not 0 <= master_seed <= MASTER_SEED_MAX:
        master_seed = check_master_seed(master_seed)
    if type(purpose) is not str or not purpose:
        check_purpose(purpose)
    if instance_id is not None and type(instance_id) is not str and type(instance_id) is not int:
        instance_id = check_instance_id(instance_id)
    try:
        fn = SCHEMES[scheme]
    except (KeyError, TypeError):
        check_scheme(scheme)
        raise  # pragma: no cover
    return fn(master_seed, purpose, instance_id)


def derivation_input(
    master_seed: int, purpose: str, instance_id: InstanceId = None, *, scheme: str = DEFAULT_SCHEME
) -> bytes:
    """The exact bytes that `scheme` hashes for these inputs (shown in collision errors).

    >>> derivation_input(42, "model_a") == derivation_input(42, "model", "a")
    True
    """
    master_seed = check_master_seed(master_seed)
    check_purpose(purpose)
    instance_id = check_instance_id(instance_id)
    return _INPUTS[check_scheme(scheme)](master_seed, purpose, instance_id)


_PACKERS = {n: struct.Struct(f"<{n}Q").pack for n in range(1, 8)}


def mix_seed(*values: int) -> int:
    """Hash non-negative 64-bit ints into one 64-bit seed (for epoch, rank and example streams).

    Used for every derived sub-stream, instead of adding offsets, so that (seed s, epoch 1) and
    (seed s + 1, epoch 0) do not share a stream.

    >>> mix_seed(1, 2) != mix_seed(2, 1)
    True
    """
    return _from_bytes(_sha256(_PACKERS[len(values)](*values)).digest()[:8], "little")
