"""The registry: every seed a session issued, memoized by (purpose, instance id), never two alike.

It refuses what would silently correlate two components: two keys whose seeds are equal, whether
because the scheme encodes them the same way (``("model_a", None)`` and ``("model", "a")`` under
sha256-v1) or by a birthday collision of 31-bit seeds. When replaying, it also checks every seed
against the recorded run.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import attrs

from .derive import InstanceId, check_instance_id, check_purpose, derivation_input, derive_seed
from .errors import ReplayMismatchError, SeedCollisionError, StateError

__all__ = ["SeedRecord", "Registry", "KINDS"]

Key = Tuple[str, InstanceId]

#: What a record's ``kind`` says about how the seed was first asked for.
KINDS = ("seed", "rank_seed", "generator", "numpy_rng", "fork", "model", "optimizer", "dataloader", "subset_mask")

_ID_TYPES = (type(None), str, int)


@attrs.frozen(kw_only=True)
class SeedRecord:
    """One seed issued by a session: its key, its value, how it was used and what it seeded.

    Records are made by the registry and validated when a manifest is loaded; the constructor
    itself does not validate (a million of them are built when a large manifest loads).

    >>> SeedRecord(purpose="model", instance_id="training", seed=1958051794, kind="model")
    SeedRecord(purpose='model', instance_id='training', seed=1958051794, kind='model', uses=1, details={})
    """

    purpose: str
    instance_id: InstanceId
    seed: int
    kind: str
    uses: int = 1
    details: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def key(self) -> Key:
        return (self.purpose, self.instance_id)


class _Entry:
    __slots__ = ("seed", "kind", "uses", "details")

    def __init__(self, seed: int, kind: str, uses: int = 1) -> None:
        self.seed = seed
        self.kind = kind
        self.uses = uses
        self.details: Optional[Dict[str, Any]] = None


# The memo maps a key to its seed (an int) while the key has been asked for once, through
# ``seed()``, and nothing is attached to it: the common case of LDS studies issuing a million
# seeds costs no entry object. A second use, another kind or details turn it into an _Entry.
_Memo = Dict[Key, Union[int, _Entry]]


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
        self._memo: _Memo = {}
        self._seeds: set = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._memo)

    def get(self, purpose: str, instance_id: InstanceId, kind: str) -> int:
        """The seed of (purpose, instance_id): memoized on the first call, recorded as `kind`."""
        entry = self._memo.get((purpose, instance_id))
        if entry is not None and type(instance_id) in _ID_TYPES and type(entry) is _Entry:
            entry.uses += 1
            return entry.seed
        return self._issue(purpose, instance_id, kind)

    def _issue(self, purpose: str, instance_id: InstanceId, kind: str) -> int:
        check_purpose(purpose)
        instance_id = check_instance_id(instance_id)
        key = (purpose, instance_id)
        with self._lock:
            if key in self._memo:
                entry = self._entry(key)
                entry.uses += 1
                return entry.seed
            seed = derive_seed(self.master_seed, purpose, instance_id, scheme=self.scheme)
            if seed in self._seeds:
                raise self._collision(key, seed)
            if self.expected is not None:
                self._check_expected(key, seed)
            self._seeds.add(seed)
            self._memo[key] = seed if kind == "seed" else _Entry(seed, kind)
        return seed

    def _entry(self, key: Key) -> _Entry:
        """The key's _Entry, made from a bare seed if need be (caller holds the lock)."""
        value = self._memo[key]
        if type(value) is _Entry:
            return value
        entry = _Entry(value, "seed")  # type: ignore[arg-type]
        self._memo[key] = entry
        return entry

    def _seed_of(self, key: Key) -> int:
        value = self._memo[key]
        return value.seed if type(value) is _Entry else value  # type: ignore[return-value,union-attr]

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
        other = next(k for k in self._memo if self._seed_of(k) == seed)
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
            self._entry((purpose, instance_id)).details = dict(details)

    def records(self) -> Tuple[SeedRecord, ...]:
        """Every record, in the order the seeds were first issued."""
        with self._lock:
            items = list(self._memo.items())
        return tuple(
            SeedRecord(purpose=k[0], instance_id=k[1], seed=e.seed, kind=e.kind, uses=e.uses, details=e.details or {})
            if type(e) is _Entry
            else SeedRecord(purpose=k[0], instance_id=k[1], seed=e, kind="seed")  # type: ignore[arg-type]
            for k, e in items
        )

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._memo))

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> List[Dict[str, Any]]:
        return [record_to_dict(r) for r in self.records()]

    def memo_from_records(self, records: List[SeedRecord]) -> "_Memo":
        """Check `records` (each seed re-derived) and build the memo they stand for; changes nothing."""
        memo: _Memo = {}
        for r in records:
            derived = derive_seed(self.master_seed, r.purpose, r.instance_id, scheme=self.scheme)
            if derived != r.seed:
                raise StateError(
                    f"record {_show(r.key)} holds seed {r.seed} but derives {derived} under "
                    f"scheme {self.scheme!r} and master seed {self.master_seed}: the state is corrupt."
                )
            entry = _Entry(r.seed, r.kind)
            entry.uses = r.uses
            entry.details = dict(r.details) or None
            memo[r.key] = entry
        return memo

    def install(self, memo: "_Memo") -> None:
        with self._lock:
            self._memo.clear()  # in place: the session holds a reference for its fast path
            self._memo.update(memo)
            self._seeds = {self._seed_of(k) for k in memo}


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
