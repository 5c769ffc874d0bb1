"""What both integrations do the same way (no framework imported here)."""

from __future__ import annotations

from typing import Any, Optional

from ..session import SeedSession


def check_manifest_name(manifest: Optional[str]) -> Optional[str]:
    """The manifest's file name (written into the framework's output directory), or None."""
    if manifest is not None and (type(manifest) is not str or not manifest or "/" in manifest):
        raise ValueError(f"`manifest` must be a file name such as 'seedreg-manifest.json' (or None), got {manifest!r}.")
    return manifest


def check_session(session: Any) -> SeedSession:
    if not isinstance(session, SeedSession):
        raise TypeError(f"`session` must be a seedreg.SeedSession, got {type(session).__name__}.")
    return session


def record_weights_once(session: SeedSession, name: str, model: Any) -> None:
    """Record `model`'s weights as result `name` unless this run (or the checkpoint it resumed
    from) already did."""
    if name not in session._results:
        session.record_result(name, model.state_dict())
