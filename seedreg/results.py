"""Results a run records (``SeedSession.record_result``): each checked against the recorded run
when replaying, and adopted from a checkpoint when an integration resumes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional

from .errors import StateError
from .fingerprint import result_entry
from .replay import Replay

__all__ = ["Results"]


class Results:
    """The results of one session, in the order they were recorded; with a `replay`, each is
    checked against the recorded run as it is recorded."""

    def __init__(self) -> None:
        self._entries: Dict[str, Dict[str, Any]] = {}
        self.replay: Optional[Replay] = None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entries(self) -> List[Dict[str, Any]]:
        """A copy of every entry, in order."""
        return [dict(r) for r in self._entries.values()]

    def record(self, name: str, value: Any) -> Dict[str, Any]:
        """``SeedSession.record_result``."""
        if type(name) is not str or not name:
            raise TypeError(f"`name` must be a non-empty str such as 'final_weights', got {name!r}.")
        if name in self._entries:
            raise ValueError(f"result {name!r} was already recorded in this session; give each result its own name (e.g. f'weights_{{model_id}}').")
        entry = result_entry(name, value)
        self._entries[name] = entry
        if self.replay is not None:
            self.replay.check_result(entry)
        return dict(entry)

    def adopt(self, entries: Any) -> None:
        """Take over results a checkpointed process recorded (integrations' resume): each entry not
        yet recorded here is added, and checked when replaying."""
        for entry in entries or ():
            if not isinstance(entry, Mapping) or type(entry.get("name")) is not str:
                raise StateError(f"a saved result must be a dict with a 'name', got {entry!r:.60}.")
            if entry["name"] not in self._entries:
                self._entries[entry["name"]] = dict(entry)
                if self.replay is not None:
                    self.replay.check_result(dict(entry))
