"""Replaying a run from its manifest: one object holds what is expected and what differed.

:class:`Replay` is consulted by the registry at every use and by the session at every recorded
result. Use k of a key must match recorded use k (its kind and every detail); each recorded result
must come out the same. The report's verdict says what a user may conclude:

- ``bitwise``: seeds, uses, environment and every recorded result agree;
- ``diverged``: the environment agrees but a use or a result does not (or a result was never
  recorded again);
- ``statistical``: the environment differs in something that changes floating-point results
  (torch, numpy, CUDA, the CPU's kernel family, ...), so only statistical agreement is expected.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from .derive import InstanceId
from .bitwise import BITWISE_KEYS, environment_differences
from .determinism import environment
from .errors import ReplayMismatchError
from .records import SeedRecord, differences
from .tracefile import load_trace, next_step

__all__ = ["BITWISE_KEYS", "Replay", "environment_differences", "open_replay"]

Key = Tuple[str, InstanceId]
_SHOWN_FIELDS = 8  # mismatching fields listed per use


def _show(key: Key) -> str:
    return f"({key[0]!r}, {key[1]!r})"


def _typed(key: Key) -> Tuple[str, type, InstanceId]:
    return (key[0], type(key[1]), key[1])


class Replay:
    """What a replaying session checks against: the recorded records, uses and results.

    `legacy` (a schema-1 manifest) compares only the details the old manifest kept, on the use it
    kept them for.
    """

    def __init__(self, manifest: Any, records: Iterable[SeedRecord], *, strict: bool, legacy: bool = False,
                 environment: Optional[Callable[[], Mapping[str, Any]]] = None) -> None:
        self.manifest = manifest
        self.environment = environment  # the replaying process's environment, read when a check fails
        self.strict = strict
        self.legacy = legacy
        self.expected: Dict[Tuple[str, type, InstanceId], SeedRecord] = {_typed(r.key): r for r in records}
        self.new: List[Key] = []
        self.mismatches: List[Dict[str, Any]] = []
        self.results: Dict[str, Mapping[str, Any]] = {r["name"]: r for r in manifest.results}
        self.results_seen: Dict[str, Mapping[str, Any]] = {}
        # the recorded step trace (TraceData), or why it cannot be read; the replay's own Trace
        self.trace_expected: Any = None
        self.trace_unavailable: Optional[str] = None
        self.trace: Any = None

    # -- checks the registry makes ---------------------------------------------------------------

    def check_new_key(self, key: Key, seed: int) -> None:
        """A key's first use: it must have been recorded (strict), with this very seed (always)."""
        recorded = self.expected.get(_typed(key))
        if recorded is None:
            if self.strict:
                raise ReplayMismatchError(
                    f"replay asked for (purpose={key[0]!r}, instance_id={key[1]!r}), which the recorded run never "
                    f"issued; the script has changed since the manifest was written. Replay with strict=False to "
                    f"record it as new."
                )
            self.new.append(key)
        elif recorded.seed != seed:
            raise ReplayMismatchError(
                f"(purpose={key[0]!r}, instance_id={key[1]!r}) derives {seed} now but the manifest recorded "
                f"{recorded.seed}: the derivation changed; this run cannot replay that manifest."
            )

    def check_use(self, key: Key, number: int, kind: str) -> None:
        """Use `number` of `key`: the recorded run must have made it, of the same kind."""
        recorded = self.expected.get(_typed(key))
        if recorded is None:
            return
        if number > recorded.uses:
            self._mismatch(key, number, "uses", recorded.uses, number,
                           f"{_show(key)} is used a {_ordinal(number)} time but the recorded run used it {recorded.uses} time(s)")
            return
        recorded_kind = recorded.use(number)[0]
        if not self.legacy and recorded_kind != kind:
            self._mismatch(key, number, "kind", recorded_kind, kind, f"{_show(key)} use {number} is a {kind!r} but was a {recorded_kind!r}")

    def check_details(self, key: Key, number: int, details: Mapping[str, Any], ignore: Tuple[str, ...] = ()) -> None:
        """The details of use `number` of `key` against the recorded ones, field by field."""
        recorded = self.expected.get(_typed(key))
        if recorded is None or number > recorded.uses:
            return
        expected = recorded.use(number)[1]
        if self.legacy and not expected:
            return
        rows = differences(expected, details, ignore=ignore, only_recorded=self.legacy)
        for field, a, b in rows[:_SHOWN_FIELDS]:
            hint = ""
            if field == "fingerprint" and len(rows) == 1:
                hint = " (same class and size: does the factory draw from an unseeded source?)"
            self._mismatch(key, number, field, a, b, f"{_show(key)} use {number}: {field} is {b!r} but the manifest recorded {a!r}{hint}")

    def check_state(self, records: Iterable[SeedRecord]) -> None:
        """A resume state's records: each recorded with the same seed (strict: and no more uses)."""
        for r in records:
            recorded = self.expected.get(_typed(r.key))
            if recorded is None:
                if self.strict:
                    raise ReplayMismatchError(f"the state holds {_show(r.key)}, which the recorded run never issued")
            elif recorded.seed != r.seed:
                raise ReplayMismatchError(f"the state gives {_show(r.key)} seed {r.seed} but the manifest recorded {recorded.seed}")
            elif self.strict and r.uses > recorded.uses:
                raise ReplayMismatchError(f"the state has {r.uses} uses of {_show(r.key)} but the recorded run made {recorded.uses}")

    def _mismatch(self, key: Key, number: int, field: str, recorded: Any, current: Any, message: str) -> None:
        self.mismatches.append({
            "purpose": key[0], "instance_id": key[1], "use": number, "field": field,
            "recorded": recorded, "current": current, "message": message,
        })
        if self.strict:
            raise ReplayMismatchError(f"replay diverged: {self._environment_first()}{message}.")

    def _environment_first(self) -> str:
        """The environment keys that rule out a bitwise replay, named first in a strict replay's
        error: a changed thread count or library version is the likelier cause than the script."""
        if self.environment is None:
            return ""
        changed = [d for d in environment_differences(self.manifest.environment, self.environment()) if d["breaks_bitwise"]]
        if not changed:
            return ""
        listed = ", ".join(f"{d['key']} {d['recorded']!r} -> {d['current']!r}" for d in changed)
        unset = {"deterministic_algorithms", "cudnn_deterministic", "deterministic_warn_only"}
        if self.manifest.applied and any(d["key"] in unset and d["recorded"] and not d["current"] for d in changed):
            return (f"the recorded run's deterministic settings are not applied here ({listed}): call setup() on the "
                    f"replaying session first, SeedSession.from_manifest(path).setup(), as the recorded run did; then ")
        return (f"this process's environment differs from the recorded run's ({listed}), which alone changes results "
                f"(replay with strict=False for a 'statistical' verdict, or restore it); then ")

    # -- results ----------------------------------------------------------------------------------

    def check_result(self, result: Mapping[str, Any]) -> None:
        name = result["name"]
        self.results_seen[name] = result
        recorded = self.results.get(name)
        if recorded is None:
            return
        if (recorded["kind"], recorded["value"]) != (result["kind"], result["value"]) and self.strict:
            raise ReplayMismatchError(
                f"replay diverged: {self._environment_first()}result {name!r} is {_short(result['value'])} but the "
                f"manifest recorded {_short(recorded['value'])}."
            )

    def trace_diverged(self, first: Mapping[str, Any]) -> None:
        """The replay's trace differs from the recorded one first at `first` (strict: raise now)."""
        if self.strict:
            raise ReplayMismatchError(
                f"replay diverged: {self._environment_first()}at step {first['step']}, {first['tensor']} differs from "
                f"the recorded trace (the first tensor that does, in the order loss, gradients, parameters, buffers). "
                f"Next: {next_step(first)}"
            )

    def _trace_reasons(self) -> List[str]:
        recorded = self.manifest.trace
        if recorded is None:
            return []
        if self.trace is None:
            return [f"the recorded run traced {recorded['steps']} steps ({recorded['file']}) but this replay made no trace: "
                    f"call session.trace(model, every={recorded['every']}) as the recorded run did"]
        out = []
        first = self.trace.first_divergence
        if first is not None:
            out.append(f"trace: step {first['step']} differs first, in {first['tensor']}. Next: {next_step(first)}")
        expected = self.trace_expected
        if expected is not None and len(expected.steps):
            mine = self.trace.steps
            missing = [s for s in expected.steps.tolist() if s > (mine[-1] if mine else -1)]
            if missing:
                out.append(f"trace: the recorded run traced up to step {int(expected.steps[-1])}, this replay "
                           f"{'only to step ' + str(mine[-1]) if mine else 'no step'}")
            extra = [s for s in mine if s > int(expected.steps[-1])]
            if extra:
                out.append(f"trace: this replay traced step {extra[0]}, past the recorded run's last ({int(expected.steps[-1])})")
        return out

    # -- the report -------------------------------------------------------------------------------

    def report(self, issued: Iterable[Key], current_env: Mapping[str, Any], *, set_up: bool = True) -> Dict[str, Any]:
        """The JSON-native report ``SeedSession.replay_report()`` returns."""
        issued_keys = {_typed(k) for k in issued}
        missing = [_key(r.key) for k, r in self.expected.items() if k not in issued_keys]
        env = environment_differences(self.manifest.environment, current_env)
        matched, mismatched, new = [], [], []
        for name, got in self.results_seen.items():
            recorded = self.results.get(name)
            if recorded is None:
                new.append(name)
            elif (recorded["kind"], recorded["value"]) == (got["kind"], got["value"]):
                matched.append(name)
            else:
                mismatched.append({"name": name, "recorded": recorded["value"], "current": got["value"]})
        results_missing = [name for name in self.results if name not in self.results_seen]
        statistical = [f"environment {d['key']}: {d['recorded']!r} -> {d['current']!r}" for d in env if d["breaks_bitwise"]]
        diverged = [f"mismatch: {m['message']}" for m in self.mismatches]
        diverged += [f"result {m['name']!r}: {_short(m['current'])} != recorded {_short(m['recorded'])}" for m in mismatched]
        diverged += [f"result {name!r} was recorded by the original run but not by the replay" for name in results_missing]
        diverged += self._trace_reasons()
        if not set_up and self.manifest.applied:  # the recorded run called setup(); this one did not
            statistical.insert(0, "setup() was never called on the replaying session: the global generators were not "
                                  "seeded and the deterministic settings not applied; call SeedSession.from_manifest(...).setup()")
        verdict = "statistical" if statistical else "diverged" if diverged else "bitwise"
        return {
            "master_seed": self.manifest.master_seed,
            "scheme": self.manifest.scheme,
            "missing": missing,
            "new": [_key(k) for k in self.new],
            "mismatches": [dict(m) for m in self.mismatches],
            "results": {"matched": matched, "mismatched": mismatched, "missing": results_missing, "new": new},
            "first_divergence": None if self.trace is None or self.trace.first_divergence is None else dict(self.trace.first_divergence),
            "environment": env,
            "verdict": verdict,
            "reasons": statistical + diverged,
        }


def _key(key: Key) -> Dict[str, Any]:
    return {"purpose": key[0], "instance_id": key[1]}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def open_replay(manifest: Any, source: Any, *, strict: bool, rank: int, world_size: int) -> Replay:
    """The replay of `manifest` (read from `source`, a path or the Manifest itself) by rank `rank`
    of `world_size` (``SeedSession.from_manifest``)."""
    if strict and world_size != manifest.world_size:
        raise ReplayMismatchError(
            f"the manifest was written by a run of world_size={manifest.world_size}, this process has "
            f"world_size={world_size}; launch with the same number of ranks, or replay with strict=False."
        )
    expected = manifest.records_for_rank(rank) if manifest.world_size == world_size else manifest.records
    replay = Replay(manifest, expected, strict=strict, legacy=manifest.read_version < 2,
                    environment=functools.partial(environment, world_size))
    if manifest.trace is not None:
        if not isinstance(source, (str, os.PathLike)):
            replay.trace_unavailable = (
                f"the manifest has a step trace ({manifest.trace['file']}) but the session was made from a Manifest "
                f"object, which does not say where the trace lies: pass the manifest's path to from_manifest().")
        else:
            replay.trace_expected = load_trace(source, manifest.trace)
    return replay
