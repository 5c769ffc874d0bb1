"""What a session records: a seed's record, the uses of its key, and the one JSON codec for them.

A key (purpose, instance id) gets one seed, memoized. Every request for it is a *use*: use 1 is
the first, and each carries its kind (``seed``, ``model``, ``dataloader``, ...) and details (what
it seeded: a model's fingerprint, a loader's batch size and subset digest, an optimizer's
hyperparameters). A record keeps the count of uses and, in order, every use that has details or a
kind other than the record's own; the others are plain repeats of the first.

In a manifest a record is one JSON object per line::

    {"instance_id": "training", "kind": "model", "log": [{"details": {...}, "kind": "model", "use": 1}],
     "purpose": "model", "seed": 1958051794, "uses": 1}

Schema 1 (seedreg 0.1.0) kept one ``details`` object per record instead of ``log``; it is read as
a log holding those details at the last use.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping
from typing import Any, Dict, Iterable, List, Optional, Tuple

import attrs

from .derive import InstanceId, check_instance_id, check_purpose
from .errors import ManifestError

__all__ = ["KINDS", "Use", "SeedRecord", "record_to_dict", "record_from_dict", "records_from_list", "record_line", "check_json", "require"]

#: How a use asked for a seed.
KINDS = (
    "seed", "rank_seed", "generator", "numpy_rng", "fork", "scope", "model", "optimizer", "dataloader", "subset_mask",
)
_KIND_SET = frozenset(KINDS)
_MAX_DEPTH = 32
_SEED_LIMIT = 1 << 64
_ID_BOUND = 2**255


def as_tuple(items: Iterable[Any]) -> Tuple[Any, ...]:
    """attrs converter: any iterable to a tuple (typed, unlike the builtin, for type checkers)."""
    return tuple(items)


@attrs.frozen(kw_only=True)
class Use:
    """Use number `use` (from 1) of a key: how it was asked for and what it seeded. `count` > 1
    stands for that many consecutive uses of the same kind without details (a key forked in a loop)."""

    use: int
    kind: str
    details: Mapping[str, Any] = attrs.field(factory=dict)
    count: int = 1


@attrs.frozen(kw_only=True)
class SeedRecord:
    """One key's seed and its uses. Made by the registry, validated when a manifest loads.

    >>> r = SeedRecord(purpose="model", instance_id="training", seed=1958051794, kind="model")
    >>> r.uses, r.use(1)
    (1, ('model', {}))
    """

    purpose: str
    instance_id: InstanceId
    seed: int
    kind: str
    uses: int = 1
    log: Tuple[Use, ...] = attrs.field(default=(), converter=as_tuple)

    @property
    def key(self) -> Tuple[str, InstanceId]:
        """``(purpose, instance_id)``: what the seed was derived from, with the master seed."""
        return (self.purpose, self.instance_id)

    def use(self, number: int) -> Tuple[str, Mapping[str, Any]]:
        """The kind and details of use `number` (a use not in the log repeats the record's kind)."""
        for u in self.log:
            if u.use <= number < u.use + u.count:
                return u.kind, u.details
        return self.kind, {}

    @property
    def details(self) -> Mapping[str, Any]:
        """The details of the last use that has any ({} if none)."""
        for u in reversed(self.log):
            if u.details:
                return u.details
        return {}


def check_json(value: Any, where: str, depth: int = 0) -> None:
    """Refuse anything that is not JSON-native data (str keys, finite floats, bounded depth)."""
    if depth > _MAX_DEPTH:
        raise ManifestError(f"{where} is nested deeper than {_MAX_DEPTH} levels.")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ManifestError(f"{where} holds a non-finite number {value!r}.")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_json(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        for k, item in value.items():
            if not isinstance(k, str):
                raise ManifestError(f"{where} has a non-str key {k!r}.")
            check_json(item, f"{where}[{k!r}]", depth + 1)
        return
    raise ManifestError(f"{where} holds a {type(value).__name__}, which is not JSON data.")


# -- to JSON ------------------------------------------------------------------------------------

def _use_to_dict(u: Use) -> Dict[str, Any]:
    out: Dict[str, Any] = {"use": u.use, "kind": u.kind, "details": dict(u.details)}
    if u.count != 1:
        out["count"] = u.count
    return out


def record_to_dict(record: SeedRecord) -> Dict[str, Any]:
    """A record as JSON-native data (the instance id's type kept: JSON tells 0 from "0")."""
    return {
        "purpose": record.purpose,
        "instance_id": record.instance_id,
        "seed": record.seed,
        "kind": record.kind,
        "uses": record.uses,
        "log": [_use_to_dict(u) for u in record.log],
    }


_LINE = json.JSONEncoder(sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))
_encode_str = json.encoder.encode_basestring  # the C encoder json.dumps uses with ensure_ascii=False
_FIELDS = ("purpose", "instance_id", "seed", "kind", "uses", "log")
_FIELD_SET = frozenset(_FIELDS)


def record_line(r: Any) -> str:
    """One record as ``_LINE.encode(record_to_dict(r))`` writes it, without building the dict for
    the common shapes. `r` is a SeedRecord (writing) or a dict (checking a loaded body)."""
    if isinstance(r, SeedRecord):
        purpose, iid, seed, kind, uses = r.purpose, r.instance_id, r.seed, r.kind, r.uses
        log: Any = [_use_to_dict(u) for u in r.log] if r.log else ()
    elif type(r) is dict and len(r) == 6 and _FIELD_SET.issuperset(r):
        purpose, iid, seed, kind, uses, log = (r[f] for f in _FIELDS)
    else:
        return _LINE.encode(r)
    if not (type(purpose) is str and type(kind) is str and type(seed) is int and type(uses) is int and (iid is None or type(iid) in (int, str))):
        return _LINE.encode({"purpose": purpose, "instance_id": iid, "seed": seed, "kind": kind, "uses": uses, "log": log})
    text_id = "null" if iid is None else (str(iid) if isinstance(iid, int) else _encode_str(iid))
    text_log = "[]" if log == () or log == [] else _LINE.encode(log)
    return f'{{"instance_id": {text_id}, "kind": {_encode_str(kind)}, "log": {text_log}, "purpose": {_encode_str(purpose)}, "seed": {seed}, "uses": {uses}}}'


# -- from JSON ----------------------------------------------------------------------------------

def require(mapping: Mapping[str, Any], key: str, types: Any, where: str) -> Any:
    """``mapping[key]`` if present and of `types` (a bool is not an int unless bool is listed)."""
    if key not in mapping:
        raise ManifestError(f"{where} is missing {key!r}.")
    value = mapping[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in allowed):
        raise ManifestError(f"{where}[{key!r}] must be {getattr(types, '__name__', types)}, got {type(value).__name__} {value!r:.80}.")
    return value


def _log_from_list(data: Any, uses: int, where: str) -> Tuple[Use, ...]:
    if not isinstance(data, list):
        raise ManifestError(f"{where} must be a list, got {type(data).__name__}.")
    out: List[Use] = []
    last = 0
    for i, d in enumerate(data):
        w = f"{where}[{i}]"
        if not isinstance(d, Mapping) or not {"use", "kind", "details"} <= set(d) <= {"use", "kind", "details", "count"}:
            raise ManifestError(f"{w} must be an object with the keys ['details', 'kind', 'use'] (and 'count').")
        number = require(d, "use", int, w)
        count = require(d, "count", int, w) if "count" in d else 1
        if count < 1 or not last < number or number + count - 1 > uses:
            raise ManifestError(
                f"{w} covers uses {number}..{number + count - 1}; use numbers must increase and lie in [1, {uses}] (the record's uses)."
            )
        last = number + count - 1
        kind = require(d, "kind", str, w)
        if kind not in _KIND_SET:
            raise ManifestError(f"{w}['kind'] must be one of {list(KINDS)}, got {kind!r:.80}.")
        details = require(d, "details", Mapping, w)
        check_json(details, f"{w}['details']")
        out.append(Use(use=number, kind=kind, details=details, count=count))
    return tuple(out)


def record_from_dict(data: Any, where: str, *, schema: int = 2) -> SeedRecord:
    """Validate one record (of manifest schema `schema`) and build it; names what is wrong."""
    fields = {"purpose", "instance_id", "seed", "kind", "uses", "details" if schema == 1 else "log"}
    if not isinstance(data, Mapping):
        raise ManifestError(f"{where} must be an object, got {type(data).__name__}.")
    keys = set(data)
    if keys != fields:
        raise ManifestError(f"{where} must have exactly the keys {sorted(fields)}, got {sorted(map(str, keys))}.")
    purpose = require(data, "purpose", str, where)
    if not purpose:
        raise ManifestError(f"{where}['purpose'] is empty.")
    instance_id = data["instance_id"]
    if not (instance_id is None or type(instance_id) in (str, int)):
        raise ManifestError(f"{where}['instance_id'] must be null, a string or an int, got {instance_id!r:.80}.")
    try:
        check_purpose(purpose)
        check_instance_id(instance_id)
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    seed = require(data, "seed", int, where)
    if not 0 <= seed < _SEED_LIMIT:
        raise ManifestError(f"{where}['seed'] must be in [0, 2**64), got {seed}.")
    kind = require(data, "kind", str, where)
    if kind not in _KIND_SET:
        raise ManifestError(f"{where}['kind'] must be one of {list(KINDS)}, got {kind!r:.80}.")
    uses = require(data, "uses", int, where)
    if uses < 1:
        raise ManifestError(f"{where}['uses'] must be >= 1, got {uses}.")
    if schema == 1:
        details = require(data, "details", Mapping, where)
        check_json(details, f"{where}['details']")
        log: Tuple[Use, ...] = (Use(use=uses, kind=kind, details=details),) if details else ()
    else:
        log = _log_from_list(data["log"], uses, f"{where}['log']")
    return SeedRecord(purpose=purpose, instance_id=instance_id, seed=seed, kind=kind, uses=uses, log=log)


def records_from_list(data: Any, where: str, *, schema: int = 2) -> Tuple[SeedRecord, ...]:
    """Validate a list (or a generator) of records, no key twice, and build them; the common shape
    takes a fast path."""
    if not isinstance(data, list) and not inspect.isgenerator(data):
        raise ManifestError(f"{where} must be a list, got {type(data).__name__}.")
    out = []
    seen = set()
    kinds = _KIND_SET
    for i, d in enumerate(data):
        try:
            if schema != 2 or type(d) is not dict or len(d) != 6:
                raise KeyError
            purpose, iid, seed, kind, uses, log = d["purpose"], d["instance_id"], d["seed"], d["kind"], d["uses"], d["log"]
        except KeyError:
            purpose = None
        if (
            type(purpose) is not str
            or not purpose
            or not purpose.isascii()
            or not (iid is None or type(iid) is str and iid.isascii() or type(iid) is int and -_ID_BOUND <= iid < _ID_BOUND)
            or type(seed) is not int
            or not 0 <= seed < _SEED_LIMIT
            or type(kind) is not str
            or kind not in kinds
            or type(uses) is not int
            or uses < 1
            or type(log) is not list
        ):
            record = record_from_dict(d, f"{where}[{i}]", schema=schema)
        else:
            uses_log = _log_from_list(log, uses, f"{where}[{i}]['log']") if log else ()
            record = SeedRecord(purpose=purpose, instance_id=iid, seed=seed, kind=kind, uses=uses, log=uses_log)
        key = (record.purpose, type(record.instance_id), record.instance_id)
        if key in seen:
            raise ManifestError(f"{where} lists ({record.purpose!r}, {record.instance_id!r}) twice.")
        seen.add(key)
        out.append(record)
    return tuple(out)


def flatten(details: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested details as ``{"defaults.lr": 0.05, "param_groups[0].lr": 0.05, ...}``.

    >>> flatten({"defaults": {"lr": 0.1}, "sizes": [1, 2]})
    {'defaults.lr': 0.1, 'sizes[0]': 1, 'sizes[1]': 2}
    """
    out: Dict[str, Any] = {}
    if isinstance(details, (dict, Mapping)) and details:
        for k, v in details.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif type(details) in (list, tuple) and details:
        for i, v in enumerate(details):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = details
    return out


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any], *, ignore: Tuple[str, ...] = (), only_recorded: bool = False) -> List[Tuple[str, Any, Any]]:
    """The fields in which two uses' details differ: ``(field, recorded, current)``, a fingerprint last.

    >>> differences({"defaults": {"lr": 0.05}}, {"defaults": {"lr": 0.1}})
    [('defaults.lr', 0.05, 0.1)]
    """
    a, b = flatten(recorded), flatten(current)
    a.pop("", None), b.pop("", None)
    names = set(a) if only_recorded else set(a) | set(b)
    skip = tuple(ignore)
    rows = []
    for name in sorted(names, key=lambda n: (n == "fingerprint", n)):
        if name.split(".", 1)[0].split("[", 1)[0] in skip:
            continue
        x, y = a.get(name, _MISSING), b.get(name, _MISSING)
        if x != y or type(x) is not type(y):
            rows.append((name, None if x is _MISSING else x, None if y is _MISSING else y))
    return rows


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Optional[Any] = _Missing()
