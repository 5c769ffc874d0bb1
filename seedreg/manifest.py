"""The audit manifest: every seed a run issued, the settings and environment it ran with.

A manifest is JSON with a schema version and a SHA-256 checksum of its body. It is written
atomically (temporary file, fsync, rename), so an interrupted write leaves the previous file
whole, and :meth:`Manifest.load` refuses anything truncated, hand-edited, of another schema or
not JSON, with a :class:`~seedreg.ManifestError` that says what is wrong. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import attrs

from ._version import __version__
from .files import atomic_write, check_density, read_regular_file
from .derive import SCHEMES, MASTER_SEED_MAX
from .errors import ManifestError
from .records import SeedRecord, as_tuple, check_json, differences, record_to_dict, records_from_list, require

__all__ = ["Manifest", "SCHEMA_VERSION", "FORMAT", "atomic_write", "read_regular_file"]

FORMAT = "seedreg-manifest"
SCHEMA_VERSION = 2
#: Schema versions this seedreg reads (1: seedreg 0.1.0, one ``details`` per record, no results).
READABLE_VERSIONS = (1, 2)
MAX_BYTES = 1 << 30
_MAX_DEPTH = 32
_TOP_V1 = {
    "format", "schema_version", "seedreg_version", "checksum", "master_seed", "scheme", "world_size",
    "settings", "applied", "environment", "violations", "records", "ranks", "replay",
}
_TOP = _TOP_V1 | {"results"}
PathLike = Union[str, "os.PathLike[str]"]

from .manifest_format import (  # noqa: E402 - after the constants it shares
    CHECKSUM_LINE, check_replay, loads_strict, record_lines, check_results, split_records, check_trace_entry,
    with_checksum, checksum_of, render,
)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused for a block (and resumed after, unless it was off)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _freeze(value: Mapping[str, Any]) -> Dict[str, Any]:
    return dict(value)


@attrs.frozen(kw_only=True)
class Manifest:
    """What a run issued and ran with. Build it with ``session.manifest()``; read it with :meth:`load`."""

    master_seed: int
    scheme: str
    records: Tuple[SeedRecord, ...] = attrs.field(converter=as_tuple)
    settings: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze)
    applied: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze)
    environment: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze)
    violations: Tuple[Mapping[str, str], ...] = attrs.field(default=(), converter=as_tuple)
    world_size: int = 1
    ranks: Tuple[Tuple[SeedRecord, ...], ...] = attrs.field(default=(), converter=as_tuple)
    replay: Optional[Mapping[str, Any]] = None
    results: Tuple[Mapping[str, Any], ...] = attrs.field(default=(), converter=as_tuple)
    #: The step trace written beside the manifest (file name, SHA-256, size, summary), or None.
    trace: Optional[Mapping[str, Any]] = None
    seedreg_version: str = __version__
    #: The schema version the manifest was read from (1: seedreg 0.1.0); it is written as the current one.
    read_version: int = attrs.field(default=SCHEMA_VERSION, eq=False)

    # -- lookup ----------------------------------------------------------------------------------

    def record(self, purpose: str, instance_id: Any = None) -> Optional[SeedRecord]:
        """The record of (purpose, instance_id), or None (instance id types matter: 0 is not "0")."""
        for r in self.records:
            if r.purpose == purpose and r.instance_id == instance_id and type(r.instance_id) is type(instance_id):
                return r
        return None

    def records_for_rank(self, rank: int) -> Tuple[SeedRecord, ...]:
        """The records rank `rank` issued (all records for a one-process run)."""
        if not self.ranks:
            return self.records
        if not 0 <= rank < len(self.ranks):
            raise ManifestError(f"the manifest holds ranks 0..{len(self.ranks) - 1}, not rank {rank}.")
        return self.ranks[rank]

    # -- dict and JSON -----------------------------------------------------------------------------

    def _body(self, *, as_dicts: bool = True) -> Dict[str, Any]:
        to = record_to_dict if as_dicts else (lambda r: r)
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "seedreg_version": self.seedreg_version,
            "master_seed": self.master_seed,
            "scheme": self.scheme,
            "world_size": self.world_size,
            "settings": dict(self.settings),
            "applied": dict(self.applied),
            "environment": dict(self.environment),
            "violations": [dict(v) for v in self.violations],
            "records": [to(r) for r in self.records],
            "ranks": [[to(r) for r in rank] for rank in self.ranks],
            "replay": None if self.replay is None else dict(self.replay),
            "results": [dict(r) for r in self.results],
            **({} if self.trace is None else {"trace": dict(self.trace)}),  # absent without one: such files read as before
        }

    def to_dict(self) -> Dict[str, Any]:
        """JSON-native data, checksum included."""
        body = self._body()
        body["checksum"] = checksum_of(body)
        return body

    def to_json(self) -> str:
        """The file text: the body rendered (keys sorted, one record per line), checksum on line 2."""
        try:
            return with_checksum(render(self._body(as_dicts=False)))
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"manifest holds something that is not JSON data: {exc}.") from None

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        """Validate `data` (as :meth:`to_dict` makes it) and build the manifest; checksum checked if present."""
        return cls._validated(data, verify=True)

    @classmethod
    def _validated(cls, data: Any, *, verify: bool, records: Optional[Tuple[SeedRecord, ...]] = None) -> "Manifest":
        """:meth:`_from_dict`, with any slip past its checks still reported as a ManifestError."""
        try:
            return cls._from_dict(data, verify=verify, records=records)
        except ManifestError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
            raise ManifestError(f"manifest is malformed: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _from_dict(cls, data: Any, *, verify: bool, records: Optional[Tuple[SeedRecord, ...]] = None) -> "Manifest":
        if not isinstance(data, Mapping):
            raise ManifestError(f"a manifest must be a JSON object, got {type(data).__name__}.")
        if data.get("format") != FORMAT:
            raise ManifestError(f"not a seedreg manifest (format is {data.get('format')!r:.80}, expected {FORMAT!r}).")
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS or type(version) is not int:
            raise ManifestError(
                f"manifest schema_version {version!r:.40} is not supported; this seedreg ({__version__}) reads "
                f"versions {list(READABLE_VERSIONS)}."
            )
        top = _TOP if version == SCHEMA_VERSION else _TOP_V1
        if version == SCHEMA_VERSION and "trace" in data:
            top = top | {"trace"}
        keys = set(data)
        if "checksum" in keys:
            if verify and data["checksum"] != checksum_of(data):
                raise ManifestError("manifest checksum does not match its content: the file was edited or damaged.")
            keys.discard("checksum")
        if keys != top - {"checksum"}:
            missing, extra = sorted(top - {"checksum"} - keys), sorted(map(str, keys - top))
            raise ManifestError(f"manifest fields are wrong: missing {missing}, unexpected {extra}.")
        where = "manifest"
        master = require(data, "master_seed", int, where)
        if not 0 <= master <= MASTER_SEED_MAX:
            raise ManifestError(f"manifest['master_seed'] must be in [0, 2**32 - 1], got {master}.")
        scheme = require(data, "scheme", str, where)
        if scheme not in SCHEMES:
            raise ManifestError(f"manifest['scheme'] {scheme!r:.80} is unknown; known: {sorted(SCHEMES)}.")
        world = require(data, "world_size", int, where)
        if world < 1:
            raise ManifestError(f"manifest['world_size'] must be >= 1, got {world}.")
        settings = require(data, "settings", Mapping, where)
        for key in ("deterministic", "warn_only", "fill_uninitialized_memory"):
            require(settings, key, bool, "manifest['settings']")
        applied = require(data, "applied", Mapping, where)
        environment = require(data, "environment", Mapping, where)
        for name, value in (("settings", settings), ("applied", applied), ("environment", environment)):
            check_json(value, f"manifest[{name!r}]")
        violations = require(data, "violations", list, where)
        for i, v in enumerate(violations):
            if not (isinstance(v, Mapping) and set(v) == {"kind", "message"} and all(isinstance(x, str) for x in v.values())):
                raise ManifestError(f"manifest['violations'][{i}] must be {{'kind': str, 'message': str}}.")
        if records is None:
            records = records_from_list(data["records"], "manifest['records']", schema=version)
        ranks_data = require(data, "ranks", list, where)
        ranks = tuple(records_from_list(r, f"manifest['ranks'][{i}]", schema=version) for i, r in enumerate(ranks_data))
        if ranks and len(ranks) != world:
            raise ManifestError(f"manifest lists {len(ranks)} ranks but world_size is {world}.")
        replay = data["replay"]
        if replay is not None:
            check_replay(replay)
        return cls(
            master_seed=master,
            scheme=scheme,
            records=records,
            settings=settings,
            applied=applied,
            environment=environment,
            violations=tuple(dict(v) for v in violations),
            world_size=world,
            ranks=ranks,
            replay=replay,
            results=check_results(data["results"], "manifest['results']") if version == SCHEMA_VERSION else (),
            trace=check_trace_entry(data["trace"]) if "trace" in data and version == SCHEMA_VERSION else None,
            seedreg_version=require(data, "seedreg_version", str, where),
            read_version=version,
        )

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "Manifest":
        """Parse and validate a manifest file's text: its checksum line covers every other byte.

        The records, one per line, are parsed line by line, so that loading holds a few times the
        file's size at the peak, not the whole JSON tree at once. Duplicate keys are refused.
        """
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
        if not data.strip():
            raise ManifestError("manifest is empty.")
        first = data.find(b"\n")
        second = data.find(b"\n", first + 1)
        match = CHECKSUM_LINE.match(data[first + 1 : second].decode("ascii", "replace")) if data[:first] == b"{" and second > 0 else None
        if match is None:
            try:
                parsed = json.loads(data)
            except (ValueError, RecursionError):
                parsed = None
            if isinstance(parsed, dict) and parsed.get("format") == FORMAT:
                raise ManifestError(
                    "this is a seedreg manifest that was reformatted (seedreg writes one record per line with the "
                    "checksum on line 2, and the checksum covers those bytes); use the file seedreg wrote."
                )
            if parsed is not None:
                raise ManifestError(f"this JSON file is not a seedreg manifest (it has no \"format\": \"{FORMAT}\").")
            raise ManifestError("manifest has no checksum on its second line: it is not a seedreg manifest, or is damaged.")
        digest = hashlib.sha256(b"{\n")
        digest.update(memoryview(data)[second + 1 :])
        if "sha256:" + digest.hexdigest() != match.group(1):
            raise ManifestError("manifest checksum does not match its content: the file was edited, truncated or damaged.")
        try:
            body = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"manifest is not UTF-8 text: {exc}.") from None
        del data
        rest, lines = split_records(body)
        try:
            check_density(rest, "manifest")
            parsed = loads_strict(rest)
            records = None
            if lines is not None:
                if parsed.get("records") != []:
                    raise ManifestError("manifest lists 'records' twice.")
                version = parsed.get("schema_version")
                with _gc_paused():  # 100,000s of new objects, none cyclic: collecting them costs more than the parse
                    records = records_from_list(record_lines(body, *lines), "manifest['records']",
                                                schema=version if version in READABLE_VERSIONS else SCHEMA_VERSION)
        except RecursionError:
            raise ManifestError("manifest is nested too deeply.") from None
        except ManifestError:
            raise
        except ValueError as exc:  # JSONDecodeError, and ints past Python's digit limit
            raise ManifestError(f"manifest is not valid JSON (truncated or damaged?): {exc}.") from None
        except (TypeError, KeyError, AttributeError) as exc:
            raise ManifestError(f"manifest is malformed: {type(exc).__name__}: {exc}") from None
        return cls._validated(parsed, verify=False, records=records)

    # -- files -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: PathLike) -> "Manifest":
        """Read and validate a manifest file. A damaged file is refused whole, never half-read.

        Only a regular file is read (a FIFO, a device or ``/dev/zero`` is refused at once), and at
        most ``MAX_BYTES`` of it.
        """
        path = pathlib.Path(path)
        try:
            data = read_regular_file(path, MAX_BYTES)
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None
        try:
            return cls.from_json(data)
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None
        except MemoryError:
            raise ManifestError(f"{path}: {len(data):,} bytes could not be loaded in the memory this process may use.") from None

    def write(self, path: PathLike) -> pathlib.Path:
        """Write atomically: a temporary file beside `path`, fsync, rename. Returns the path."""
        path = pathlib.Path(path)
        payload = self.to_json().encode("utf-8")
        return atomic_write(path, payload)

    # -- comparison ------------------------------------------------------------------------------

    def diff(self, other: "Manifest") -> List[str]:
        """What differs between two manifests, one line each, naming the record, the use and the
        field (``record ('optimizer', 'training') use 1: defaults.lr: 0.05 != 0.1``)."""
        out: List[str] = []
        for name in ("master_seed", "scheme", "world_size"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: {a!r} != {b!r}")
        mine = {(r.purpose, type(r.instance_id).__name__, r.instance_id): r for r in self.records}
        theirs = {(r.purpose, type(r.instance_id).__name__, r.instance_id): r for r in other.records}
        for key in sorted(set(mine) | set(theirs), key=repr):
            label = f"record ({key[0]!r}, {key[2]!r})"
            a, b = mine.get(key), theirs.get(key)
            if a is None or b is None:
                out.append(f"{label}: only in the {'second' if a is None else 'first'} manifest")
                continue
            if a.seed != b.seed:
                out.append(f"{label}: seed {a.seed} != {b.seed}")
            if a.uses != b.uses:
                out.append(f"{label}: uses {a.uses} != {b.uses}")
            # kinds and details are constant between the starts and ends of logged runs: compare there
            edges = {n for u in a.log + b.log for n in (u.use, u.use + u.count)}
            for number in sorted(n for n in edges if n <= max(a.uses, b.uses)):
                (kind_a, det_a), (kind_b, det_b) = a.use(number), b.use(number)
                if kind_a != kind_b:
                    out.append(f"{label} use {number}: kind {kind_a!r} != {kind_b!r}")
                for field, x, y in differences(det_a, det_b):
                    out.append(f"{label} use {number}: {field}: {x!r} != {y!r}")
        results_a = {r["name"]: r for r in self.results}
        results_b = {r["name"]: r for r in other.results}
        for name in sorted(set(results_a) | set(results_b)):
            x, y = results_a.get(name), results_b.get(name)
            if x is None or y is None:
                out.append(f"result {name!r}: only in the {'second' if x is None else 'first'} manifest")
            elif (x["kind"], x["value"]) != (y["kind"], y["value"]):
                out.append(f"result {name!r}: {x['value']!r} != {y['value']!r}")
        for section in ("settings", "applied", "environment"):
            a, b = getattr(self, section), getattr(other, section)
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append(f"{section}.{key}: {a.get(key)!r} != {b.get(key)!r}")
        return out
