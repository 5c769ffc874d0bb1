"""What both seedreg loaders (map-style and streaming) say of themselves: the key and use that
built them, and the session they belong to."""

from __future__ import annotations

from typing import Any

__all__ = ["LoaderKey"]


class LoaderKey:
    """The instance id, use and session of a loader a session built (a mixin of both loaders)."""

    _instance_id: Any = None
    _use = 1  # which use of ("dataloader", instance_id) built it
    _session: Any = None  # the session that built it (which holds its loaders weakly: no cycle)

    @property
    def instance_id(self) -> Any:
        """The instance id it was built with (its key is ``("dataloader", instance_id)``)."""
        return self._instance_id

    @property
    def use(self) -> int:
        """Which use of its key built it: the n-th loader built on one instance id has use n."""
        return self._use

    @property
    def session(self) -> Any:
        """The :class:`~seedreg.SeedSession` that built it (None for a loader built by hand)."""
        return self._session
