"""A session's random state, for exact resume (``state_dict``/``load_state_dict``) and for an
in-process rewind (``StepCheckpoints``): the registry, the global generators and each live
loader's position, validated whole before anything changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

from .errors import ReplayMismatchError, SeedregError, StateError
from .loaders import STATE_VERSION, LoaderBook, check_loader_identity
from .records import record_from_dict
from .registry import Registry
from .replay import Replay
from .rng import capture_global, decode_global, restore_global

__all__ = ["STATE_FORMAT", "STATE_VERSION", "SessionState"]

STATE_FORMAT = "seedreg-state"
_READABLE_STATES = (1, 2)  # 1: seedreg 0.1.0 (records with one ``details``, loaders in build order)


def copy_rng(rng: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of a validated generator state (``capture_global``'s layout: two levels of dicts over
    strings and numbers), so that neither the caller's dict nor the session's is shared."""
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in rng.items()}


class SessionState:
    """A session's random state: its `registry`, the global generators and the positions of the
    loaders in `book`, for a run whose `identity` is its master seed, scheme, rank and world size."""

    def __init__(self, identity: Dict[str, Any], registry: Registry, book: LoaderBook) -> None:
        self.identity = identity
        self.registry = registry
        self.book = book
        self.replay: Optional[Replay] = None  # a replayed run's state must belong to the recorded run

    def _current_rng(self) -> Dict[str, Any]:
        pending = self.book.pending_rng
        return copy_rng(pending[1]) if pending is not None else capture_global()

    def state_dict(self) -> Dict[str, Any]:
        """``SeedSession.state_dict()``."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            **self.identity,
            "records": self.registry.state_dict(),
            "rng": self._current_rng(),
            "loaders": self.book.positions(),
        }

    def load(self, state: Mapping[str, Any]) -> None:
        """Validate `state` whole, then apply it (``SeedSession.load_state_dict``)."""
        version, memo, rng = self.check(state)
        book = self.book
        book.load(book.match(state["loaders"], version))
        self.registry.install(memo)
        if not book.hold_rng(rng, copy_rng(state["rng"])):  # the caller's dict stays the caller's
            restore_global(rng)

    def rewind_point(self) -> Dict[str, Any]:
        """The random state and loader positions alone (JSON-native), for an in-process rewind."""
        return {"rng": self._current_rng(), "loaders": self.book.positions()}

    def rewind(self, point: Mapping[str, Any]) -> None:
        """Put back :meth:`rewind_point` at once: the registry and its uses stay as they are, and
        loaders built since are left alone. Validated whole before anything changes."""
        if not isinstance(point, Mapping) or set(point) != {"rng", "loaders"}:
            raise StateError("a rewind point must be a dict with 'rng' and 'loaders' (from session.rewind_point()).")
        rng = decode_global(point["rng"])
        book = self.book
        book.load(book.match(point["loaders"], STATE_VERSION))
        book.drop_pending()
        restore_global(rng)

    def check(self, state: Any) -> Tuple[int, Any, Any]:
        """Everything about `state` that can be checked before its loaders exist, changing nothing:
        returns its version, the registry memo and the decoded generators. Each loader entry's
        identity is checked here; its position when it is matched to a loader."""
        if not isinstance(state, Mapping):
            raise StateError(f"`state` must be a dict from SeedSession.state_dict(), got {type(state).__name__}.")
        version = state.get("version")
        if state.get("format") != STATE_FORMAT or version not in _READABLE_STATES or type(version) is not int:
            raise StateError(
                f"`state` is not a seedreg state of version {STATE_VERSION} (format={state.get('format')!r:.40}, "
                f"version={version!r:.20})."
            )
        for key in ("master_seed", "scheme", "world_size", "rank"):
            if key not in state:
                raise StateError(f"`state` is missing {key!r}.")
            mine = self.identity[key]
            if state[key] != mine or type(state[key]) is not type(mine):
                raise StateError(
                    f"`state` has {key}={state[key]!r:.40} but this session has {key}={mine!r}; a state only "
                    f"resumes the run that saved it (same master seed, scheme, world size and rank)."
                )
        for key in ("records", "rng", "loaders"):
            if key not in state:
                raise StateError(f"`state` is missing {key!r}.")
        if not isinstance(state["records"], list):
            raise StateError("`state['records']` must be a list.")
        try:
            records = [record_from_dict(r, f"state['records'][{i}]", schema=version) for i, r in enumerate(state["records"])]
        except SeedregError as exc:
            raise StateError(str(exc)) from None
        memo = self.registry.memo_from_records(records)
        if self.replay is not None:
            try:
                self.replay.check_state(records)
            except ReplayMismatchError as exc:
                raise StateError(f"`state` does not belong to the run being replayed: {exc}") from None
        rng = decode_global(state["rng"])
        loaders = state["loaders"]
        if not isinstance(loaders, list):
            raise StateError(f"`state['loaders']` must be a list, got {type(loaders).__name__}.")
        for i, loader_state in enumerate(loaders):
            check_loader_identity(loader_state, i, version)
        return version, memo, rng
