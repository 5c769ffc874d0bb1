"""The registry: every seed a session issued, memoized by (purpose, instance id), never two alike.

It refuses what would silently correlate two components: two keys whose seeds are equal, whether
because the scheme encodes them the same way (``("model_a", None)`` and ``("model", "a")`` under
sha256-v1) or by a birthday collision of 31-bit seeds. When replaying, it also checks every seed
against the recorded run.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import attrs

from .derive import InstanceId, check_instance_id, check_purpose, derivation_input, derive_seed
from .errors import ReplayMismatchError, SeedCollisionError

__all__ = ["SeedRecord", "Registry", "KINDS"]

Key = Tuple[str, InstanceId]

#: What a record's ``kind`` says about how the seed was first asked for.
KINDS = ("seed", "rank_seed", "generator", "numpy_rng", "fork", "model", "optimizer", "dataloader", "subset_mask")

_ID_TYPES = (type(None), str, int)


def _json_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return dict(value)


@attrs.frozen(kw_only=True)
class SeedRecord:
    """One seed issued by a session: its key, its value, how it was used and what it seeded.

    >>> SeedRecord(purpose="model", instance_id="training", seed=1958051794, kind="model")
    SeedRecord(purpose='model', instance_id='training', seed=1958051794, kind='model', uses=1, details={})
    """

    purpose: str = attrs.field(validator=attrs.validators.instance_of(str))
    instance_id: InstanceId = attrs.field()
    seed: int = attrs.field(validator=attrs.validators.instance_of(int))
    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    uses: int = attrs.field(default=1, validator=attrs.validators.instance_of(int))
    details: Mapping[str, Any] = attrs.field(factory=dict, converter=_json_mapping)

    @instance_id.validator
    def _check_id(self, _attribute: Any, value: Any) -> None:
        check_instance_id(value)

    @property
    def key(self) -> Key:
        return (self.purpose, self.instance_id)


class _Entry:
    __slots__ = ("seed", "kind", "uses", "details")

    def __init__(self, seed: int, kind: str) -> None:
        self.seed = seed
        self.kind = kind
        self.uses = 1
        self.details: Optional[Dict[str, Any]] = None


def _show(key: Key) -> str:
    return f"(purpose={key[0]!r}, instance_id={key[1]!r})"


class Registry:
    """Memoized, collision-checked seeds of one session. Thread-safe.

    `expected` holds the records of a run being replayed: every seed issued is checked against it,
    and with `strict` a key it does not hold is refused.
    """

    def __init__(
        self,
        master_seed: int,
        scheme: str,
        *,
        expected: Optional[Mapping[Key, SeedRecord]] = None,
        strict: bool = True,
    ) -> None:
        self.master_seed = master_seed
        self.scheme = scheme
        self.expected = dict(expected) if expected is not None else None
        self.strict = strict
        self.new: List[Key] = []
        self._memo: Dict[Key, _Entry] = {}
        self._seeds: set = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._memo)

    def __contains__(self, key: object) -> bool:
        return key in self._memo

    def get(self, purpose: str, instance_id: InstanceId, kind: str) -> int:
        """The seed of (purpose, instance_id): memoized on the first call, recorded as `kind`."""
        entry = self._memo.get((purpose, instance_id))
        if entry is not None and type(instance_id) in _ID_TYPES:
            entry.uses += 1
            return entry.seed
        return self._issue(purpose, instance_id, kind)

    def _issue(self, purpose: str, instance_id: InstanceId, kind: str) -> int:
        check_purpose(purpose)
        instance_id = check_instance_id(instance_id)
        key = (purpose, instance_id)
        seed = derive_seed(self.master_seed, purpose, instance_id, scheme=self.scheme)
        with self._lock:
            entry = self._memo.get(key)
            if entry is not None:
                entry.uses += 1
                return entry.seed
            if seed in self._seeds:
                raise self._collision(key, seed)
            if self.expected is not None:
                self._check_expected(key, seed)
            self._seeds.add(seed)
            self._memo[key] = _Entry(seed, kind)
        return seed

    def _check_expected(self, key: Key, seed: int) -> None:
        recorded = self.expected.get(key)  # type: ignore[union-attr]
        if recorded is None:
            if self.strict:
                raise ReplayMismatchError(
                    f"replay asked for {_show(key)}, which the recorded run never issued; "
                    f"the script has changed since the manifest was written. Replay with "
                    f"strict=False to record it as new."
                )
            self.new.append(key)
        elif recorded.seed != seed:
            raise ReplayMismatchError(
                f"{_show(key)} derives {seed} now but the manifest recorded {recorded.seed}: the "
                f"derivation changed (scheme {self.scheme!r}, master seed {self.master_seed}); "
                f"this run cannot replay that manifest."
            )

    def _collision(self, key: Key, seed: int) -> SeedCollisionError:
        other = next(k for k, e in self._memo.items() if e.seed == seed)
        mine = derivation_input(self.master_seed, key[0], key[1], scheme=self.scheme)
        theirs = derivation_input(self.master_seed, other[0], other[1], scheme=self.scheme)
        if mine == theirs:
            why = (
                f"both hash the same input {mine!r} (scheme {self.scheme!r} cannot tell them "
                f"apart); rename one, or use scheme='sha256-v2', whose encoding is unambiguous"
            )
        else:
            why = (
                f"a birthday collision of {self.scheme!r} seeds; use scheme='sha256-v2' (63-bit "
                f"seeds) for studies that issue many seeds"
            )
        return SeedCollisionError(f"{_show(key)} and {_show(other)} would both get seed {seed}: {why}.")

    def set_details(self, purpose: str, instance_id: InstanceId, details: Mapping[str, Any]) -> None:
        """Attach what the seed was used for (a model's fingerprint, a loader's settings)."""
        with self._lock:
            self._memo[(purpose, instance_id)].details = dict(details)

    def details(self, purpose: str, instance_id: InstanceId) -> Optional[Mapping[str, Any]]:
        entry = self._memo.get((purpose, instance_id))
        return None if entry is None else entry.details

    def records(self) -> Tuple[SeedRecord, ...]:
        """Every record, in the order the seeds were first issued."""
        with self._lock:
            items = list(self._memo.items())
        return tuple(
            SeedRecord(purpose=k[0], instance_id=k[1], seed=e.seed, kind=e.kind, uses=e.uses, details=e.details or {})
            for k, e in items
        )

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._memo))

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> List[Dict[str, Any]]:
        return [record_to_dict(r) for r in self.records()]

    def load_records(self, records: List[SeedRecord]) -> None:
        """Replace the registry's content by `records` (resume), re-deriving each seed to check it."""
        memo: Dict[Key, _Entry] = {}
        for r in records:
            derived = derive_seed(self.master_seed, r.purpose, r.instance_id, scheme=self.scheme)
            if derived != r.seed:
                raise ReplayMismatchError(
                    f"record {_show(r.key)} holds seed {r.seed} but derives {derived} under "
                    f"scheme {self.scheme!r} and master seed {self.master_seed}."
                )
            entry = _Entry(r.seed, r.kind)
            entry.uses = r.uses
            entry.details = dict(r.details) or None
            memo[r.key] = entry
        with self._lock:
            self._memo.clear()  # in place: the session holds a reference for its fast path
            self._memo.update(memo)
            self._seeds = {e.seed for e in memo.values()}


def record_to_dict(record: SeedRecord) -> Dict[str, Any]:
    """A record as JSON-native data (instance id type kept: JSON tells 0 from "0")."""
    return {
        "purpose": record.purpose,
        "instance_id": record.instance_id,
        "seed": record.seed,
        "kind": record.kind,
        "uses": record.uses,
        "details": dict(record.details),
    }
