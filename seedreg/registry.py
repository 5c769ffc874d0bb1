"""The registry: every key a session issued a seed for, memoized, never two alike, every use counted.

It refuses what would silently correlate two components: two keys whose seeds are equal, whether
because the scheme encodes them the same way (``("model_a", None)`` and ``("model", "a")`` under
sha256-v1) or by a birthday collision of 31-bit seeds. It counts every use of a key and keeps the
details of those that have any (see :mod:`seedreg.records`). When replaying it consults a
:class:`~seedreg.replay.Replay` at every use.

Uses only happen in the process that made the registry: a DataLoader worker (or any forked or
unpickled copy) asking for a seed would record it in a copy that is thrown away, so it is refused.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from ._log import logger as log
from .derive import InstanceId, check_instance_id, check_purpose, derivation_input, derive_seed
from .errors import SeedCollisionError, SeedregError, SeedregWarning, StateError, user_stacklevel
from .records import KINDS, SeedRecord, Use, differences, record_to_dict

__all__ = ["Registry", "KINDS"]

Key = Tuple[str, InstanceId]
_ID_TYPES = (type(None), str, int)
# A second loader on the same key that differs only in its subset is the LDS pattern (the
# counterfactual loader keeps the full run's order): not worth a warning.
_SUBSET_FIELDS = ("subset_size", "subset_digest", "subset_mode")


class _Entry:
    __slots__ = ("seed", "kind", "uses", "log", "warned")

    def __init__(self, seed: int, kind: str, uses: int = 1) -> None:
        self.seed = seed
        self.kind = kind
        self.uses = uses
        self.log: Optional[List[Tuple[int, str, Dict[str, Any], int]]] = None  # (use, kind, details, count)
        self.warned = False


# The memo maps a key to its seed (an int) while the key has been asked for once, through
# ``seed()``, and nothing is attached to it: the common case of LDS studies issuing a million
# seeds costs no entry object. A second use, another kind or details turn it into an _Entry.
_Memo = Dict[Key, Union[int, _Entry]]
_NO_FAST_PATH: _Memo = {}

# Registries of this process: a forked child turns their fast paths off (its uses must be refused).
_live: "weakref.WeakSet[Registry]" = weakref.WeakSet()
_fork_hook: List[bool] = []


def _after_fork_in_child() -> None:
    for registry in list(_live):
        registry.fast = _NO_FAST_PATH


def _show(key: Key) -> str:
    return f"(purpose={key[0]!r}, instance_id={key[1]!r})"


class Registry:
    """Memoized, collision-checked seeds of one session, with their uses. Thread-safe.

    ``fast`` is the memo itself when a memoized use may skip every check (the session's ``seed()``
    reads it), and an empty dict while replaying or in another process.
    """

    def __init__(self, master_seed: int, scheme: str) -> None:
        self.master_seed = master_seed
        self.scheme = scheme
        self.replay: Any = None
        self._memo: _Memo = {}
        self._seeds: set = set()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.fast: _Memo = self._memo
        if not _fork_hook and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _fork_hook.append(True)
        _live.add(self)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        state["fast"] = _NO_FAST_PATH  # a copy in another process refuses uses (see _check_process)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._memo)

    def replay_against(self, replay: Any) -> None:
        """Check every use from now on against `replay` (before the first use only)."""
        if self._memo:
            raise SeedregError("a registry starts replaying before its first use.")
        self.replay = replay
        self.fast = _NO_FAST_PATH

    # -- uses ------------------------------------------------------------------------------------

    def get(self, purpose: str, instance_id: InstanceId, kind: str) -> int:
        """One use of (purpose, instance_id) as `kind`: its seed, derived on the first use."""
        entry = self.fast.get((purpose, instance_id))
        if type(entry) is _Entry and entry.kind == kind and type(instance_id) in _ID_TYPES:
            entry.uses += 1
            return entry.seed
        return self.use(purpose, instance_id, kind)[0]

    def use(self, purpose: str, instance_id: InstanceId, kind: str) -> Tuple[int, int]:
        """One use, every check made: ``(seed, use number)``."""
        check_purpose(purpose)
        instance_id = check_instance_id(instance_id)
        self._check_process(purpose, instance_id)
        key = (purpose, instance_id)
        replay = self.replay
        with self._lock:
            if key in self._memo:
                entry = self._entry(key)
                entry.uses += 1
                number = entry.uses
                if kind != entry.kind:
                    entry_log = self._log(entry)
                    last = entry_log[-1] if entry_log else None
                    if last is not None and last[1] == kind and not last[2] and last[0] + last[3] == number:
                        entry_log[-1] = (last[0], kind, last[2], last[3] + 1)  # one more in a run: no growth
                    else:
                        entry_log.append((number, kind, {}, 1))
                seed = entry.seed
            else:
                seed = derive_seed(self.master_seed, purpose, instance_id, scheme=self.scheme)
                if seed in self._seeds:
                    raise self._collision(key, seed)
                if replay is not None:
                    replay.check_new_key(key, seed)
                self._seeds.add(seed)
                self._memo[key] = seed if kind == "seed" else _Entry(seed, kind)
                number = 1
        if replay is not None:
            replay.check_use(key, number, kind)
        return seed, number

    def detail(self, purpose: str, instance_id: InstanceId, number: int, details: Mapping[str, Any], *, ignore: Tuple[str, ...] = ()) -> bool:
        """Attach what use `number` of the key seeded (a model's fingerprint, a loader's settings);
        True when they equal the key's previous use's (the same thing built again).

        `ignore` names fields a replay need not match (a loader's ``num_workers`` when every
        example has its own random streams). A key built again with other details is logged once.
        """
        key = (purpose, instance_id)
        details = dict(details)
        with self._lock:
            entry = self._entry(key)
            entry_log = self._log(entry)
            last = entry_log[-1] if entry_log else None
            if last is not None and last[0] + last[3] == number and last[1] == entry.kind and last[2] == details:
                # the same build again, right after the last: one more in its run (no growth, nothing to warn of)
                entry_log[-1] = (last[0], last[1], last[2], last[3] + 1)
                replay = self.replay
                if replay is not None:
                    replay.check_details(key, number, details, ignore)
                return True
            if last is not None and last[0] + last[3] - 1 == number:  # the use was logged (another kind)
                kind = last[1]
                if last[3] > 1:  # split it off its run
                    entry_log[-1] = (last[0], kind, last[2], last[3] - 1)
                    entry_log.append((number, kind, details, 1))
                else:
                    entry_log[-1] = (number, kind, details, 1)
            else:
                kind = entry.kind
                entry_log.append((number, kind, details, 1))
            previous = None
            for i in range(len(entry_log) - 2, -1, -1):  # the last earlier use of this kind with details
                if entry_log[i][1] == kind and entry_log[i][2]:
                    previous = entry_log[i][2]
                    break
            warn = (
                previous is not None
                and not entry.warned
                and previous != details
                and bool(differences(previous, details, ignore=ignore + _SUBSET_FIELDS))
            )
            if warn:
                entry.warned = True
        if warn:
            warnings.warn(
                f"the key (purpose={purpose!r}, instance_id={instance_id!r}) was built again (use {number}) with other "
                f"settings than its earlier use, so both get the same seed and random streams; give each component its "
                f"own instance_id (e.g. 'train' and 'val').",
                SeedregWarning,
                stacklevel=user_stacklevel(),
            )
            log.warning(
                "seedreg_key_reused",
                purpose=purpose,
                instance_id=instance_id,
                use=number,
                hint="this key was built again with other details; pass a distinct instance_id per component "
                "so that each gets its own seed",
            )
        if self.replay is not None:
            self.replay.check_details(key, number, details, ignore)
        return previous == details

    def _check_process(self, purpose: str, instance_id: InstanceId) -> None:
        if os.getpid() == self._pid:
            data = sys.modules.get("torch.utils.data")  # imported by then, if this is a loader's worker
            if data is None or data.get_worker_info() is None:
                return
        raise SeedregError(
            f"a seed for (purpose={purpose!r}, instance_id={instance_id!r}) was requested inside a DataLoader "
            f"worker (or another process than the session's): it would be recorded in a copy of the session "
            f"that is thrown away. Draw per-example randomness from the global generators instead (the loader "
            f"seeds them per example with seed_per_example=True), or derive the seeds in the main process, "
            f"before the loader starts, and hand them to the dataset."
        )

    def _entry(self, key: Key) -> _Entry:
        """The key's _Entry, made from a bare seed if need be (caller holds the lock)."""
        value = self._memo[key]
        if type(value) is _Entry:
            return value
        entry = _Entry(value, "seed")  # type: ignore[arg-type]
        self._memo[key] = entry
        return entry

    @staticmethod
    def _log(entry: _Entry) -> List[Tuple[int, str, Dict[str, Any], int]]:
        if entry.log is None:
            entry.log = []
        return entry.log

    def _seed_of(self, key: Key) -> int:
        value = self._memo[key]
        return value.seed if isinstance(value, _Entry) else value

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

    # -- records ---------------------------------------------------------------------------------

    def records(self) -> Tuple[SeedRecord, ...]:
        """Every record, in the order the keys were first used."""
        with self._lock:
            items = [(k, e) if type(e) is not _Entry else (k, (e.seed, e.kind, e.uses, tuple(e.log or ()))) for k, e in self._memo.items()]
        return tuple(
            SeedRecord(purpose=k[0], instance_id=k[1], seed=e[0], kind=e[1], uses=e[2], log=[Use(use=n, kind=kd, details=d, count=c) for n, kd, d, c in e[3]])
            if type(e) is tuple
            else SeedRecord(purpose=k[0], instance_id=k[1], seed=e, kind="seed")  # type: ignore[arg-type]
            for k, e in items
        )

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._memo))

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> List[Dict[str, Any]]:
        return [record_to_dict(r) for r in self.records()]

    def memo_from_records(self, records: List[SeedRecord]) -> _Memo:
        """Check `records` (each seed re-derived, no two alike) and build their memo; changes nothing."""
        memo: _Memo = {}
        seeds = set()
        for r in records:
            derived = derive_seed(self.master_seed, r.purpose, r.instance_id, scheme=self.scheme)
            if derived != r.seed:
                raise StateError(
                    f"record {_show(r.key)} holds seed {r.seed} but derives {derived} under "
                    f"scheme {self.scheme!r} and master seed {self.master_seed}: the state is corrupt."
                )
            if derived in seeds:
                raise StateError(f"record {_show(r.key)} has the seed of another record: the registry would refuse them as a collision.")
            seeds.add(derived)
            entry = _Entry(r.seed, r.kind, r.uses)
            if r.log:
                entry.log = [(u.use, u.kind, dict(u.details), u.count) for u in r.log]
            memo[r.key] = entry
        return memo

    def install(self, memo: _Memo) -> None:
        with self._lock:
            self._memo.clear()  # in place: `fast` may be this very dict
            self._memo.update(memo)
            self._seeds = {self._seed_of(k) for k in memo}
