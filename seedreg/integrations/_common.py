"""What both integrations do the same way (no framework imported here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

from ..errors import SeedregError, StateError
from ..manifest_format import check_results
from ..session import SeedSession

#: Results the integrations record where a run ends: never carried over from a checkpoint (a run
#: continued from the checkpoint of a finished fit records its own).
RUN_END_RESULTS = frozenset({"final_weights"})


def check_manifest_name(manifest: Optional[str]) -> Optional[str]:
    """The manifest's file name (written into the framework's output directory), or None."""
    if manifest is not None and (type(manifest) is not str or not manifest or "/" in manifest):
        raise ValueError(f"`manifest` must be a file name such as 'seedreg-manifest.json' (or None), got {manifest!r}.")
    return manifest


def check_trace_every(every: Any) -> Optional[int]:
    """`trace_every`: None (no trace) or an int >= 1."""
    if every is not None and (type(every) is not int or every < 1):
        raise ValueError(f"`trace_every` must be None (no trace) or an int >= 1 (trace every N-th optimizer step), got {every!r}.")
    return every


def check_session(session: Any) -> SeedSession:
    if not isinstance(session, SeedSession):
        raise TypeError(f"`session` must be a seedreg.SeedSession, got {type(session).__name__}.")
    return session


def record_weights_once(session: SeedSession, name: str, model: Any) -> None:
    """Record `model`'s weights as result `name` unless this run (or the checkpoint it resumed
    from) already did."""
    if not session.has_result(name):
        session.record_result(name, model.state_dict())


def carried_state(session: SeedSession, saved: Any, where: str) -> Tuple[Mapping[str, Any], List[Dict[str, Any]]]:
    """What a checkpoint carries for `session` (``{"session": state, "results": [...]}``),
    validated whole before anything is applied: the state by :meth:`SeedSession.load_state_dict`'s
    rules (its loader positions once the loaders exist), the results by the manifest's. Returns the
    state and the results to adopt (those recorded where a run ends left out). Each failure is a
    :class:`StateError` naming the field."""
    if not isinstance(saved, Mapping):
        raise StateError(f"{where} must be a dict with 'session' and 'results', got {type(saved).__name__}.")
    for key in ("session", "results"):
        if key not in saved:
            raise StateError(f"{where} is missing {key!r}; the checkpoint is damaged or was not written by seedreg.")
    try:
        session.check_state_dict(saved["session"])
        results = list(check_results(saved["results"], f"{where}['results']"))
    except RecursionError:
        raise StateError(f"{where} is nested too deeply to be a seedreg state; the checkpoint is damaged.") from None
    except StateError as exc:
        raise StateError(f"{where}['session']: {exc}") from None
    except SeedregError as exc:
        raise StateError(str(exc)) from None
    return saved["session"], [r for r in results if r["name"] not in RUN_END_RESULTS]
