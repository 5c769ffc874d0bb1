"""Results a run records (``SeedSession.record_result``): each checked against the recorded run
when replaying, and adopted from a checkpoint when an integration resumes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Dict

from .errors import StateError
from .fingerprint import result_entry

if TYPE_CHECKING:
    from .session import SeedSession

__all__ = ["record", "adopt"]


def record(session: "SeedSession", name: str, value: Any) -> Dict[str, Any]:
    """``SeedSession.record_result``."""
    if type(name) is not str or not name:
        raise TypeError(f"`name` must be a non-empty str such as 'final_weights', got {name!r}.")
    if name in session._results:
        raise ValueError(f"result {name!r} was already recorded in this session; give each result its own name (e.g. f'weights_{{model_id}}').")
    entry = result_entry(name, value)
    session._results[name] = entry
    if session._replay is not None:
        session._replay.check_result(entry)
    return dict(entry)


def adopt(session: "SeedSession", entries: Any) -> None:
    """Take over results a checkpointed process recorded (integrations' resume): each entry not
    yet recorded here is added, and checked when replaying."""
    for entry in entries or ():
        if not isinstance(entry, Mapping) or type(entry.get("name")) is not str:
            raise StateError(f"a saved result must be a dict with a 'name', got {entry!r:.60}.")
        if entry["name"] not in session._results:
            session._results[entry["name"]] = dict(entry)
            if session._replay is not None:
                session._replay.check_result(dict(entry))
