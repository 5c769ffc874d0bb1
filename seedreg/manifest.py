"""The audit manifest: every seed a run issued, the settings and environment it ran with.

A manifest is JSON with a schema version and a SHA-256 checksum of its body. It is written
atomically (temporary file, fsync, rename), so an interrupted write leaves the previous file
whole, and :meth:`Manifest.load` refuses anything truncated, hand-edited, of another schema or
not JSON, with a :class:`~seedreg.ManifestError` that says what is wrong. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import re
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import attrs

from ._version import __version__
from .derive import SCHEMES, MASTER_SEED_MAX
from .errors import ManifestError, ManifestWriteError
from .registry import KINDS, SeedRecord, record_to_dict

__all__ = ["Manifest", "SCHEMA_VERSION", "FORMAT"]

FORMAT = "seedreg-manifest"
SCHEMA_VERSION = 1
MAX_BYTES = 1 << 30
_MAX_DEPTH = 32
_TOP = {
    "format", "schema_version", "seedreg_version", "checksum", "master_seed", "scheme", "world_size",
    "settings", "applied", "environment", "violations", "records", "ranks", "replay",
}
_RECORD = {"purpose", "instance_id", "seed", "kind", "uses", "details"}
_RECORD_KEYS = frozenset(_RECORD)
PathLike = Union[str, "os.PathLike[str]"]


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    """Refuse anything that is not JSON-native data (str keys, finite floats, bounded depth)."""
    if depth > _MAX_DEPTH:
        raise ManifestError(f"{where} is nested deeper than {_MAX_DEPTH} levels.")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ManifestError(f"{where} holds a non-finite number {value!r}.")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        for k, item in value.items():
            if not isinstance(k, str):
                raise ManifestError(f"{where} has a non-str key {k!r}.")
            _check_json(item, f"{where}[{k!r}]", depth + 1)
        return
    raise ManifestError(f"{where} holds a {type(value).__name__}, which is not JSON data.")


_LINE = json.JSONEncoder(sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))
_PRETTY = json.JSONEncoder(sort_keys=True, ensure_ascii=False, allow_nan=False, indent=2)
_CHECKSUM_LINE = re.compile(r'^  "checksum": "(sha256:[0-9a-f]{64})",$')


_encode_str = json.encoder.encode_basestring  # the C encoder json.dumps uses with ensure_ascii=False


def _record_line(r: Any) -> str:
    """One record as `_LINE.encode(record_to_dict(r))` would write it, without building the dict.

    Records come as SeedRecords (when writing) or as dicts (when checking a loaded body); a dict
    of any other shape is encoded as it is.
    """
    if isinstance(r, SeedRecord):
        purpose, iid, seed, kind, uses, details = r.purpose, r.instance_id, r.seed, r.kind, r.uses, r.details
    elif type(r) is dict and len(r) == 6 and _RECORD_KEYS.issuperset(r):
        purpose, iid, seed, kind, uses, details = r["purpose"], r["instance_id"], r["seed"], r["kind"], r["uses"], r["details"]
    else:
        return _LINE.encode(r)
    if not (type(purpose) is str and type(kind) is str and type(seed) is int and type(uses) is int and (iid is None or type(iid) in (int, str))):
        return _LINE.encode({"details": details, "instance_id": iid, "kind": kind, "purpose": purpose, "seed": seed, "uses": uses})
    text_id = "null" if iid is None else (str(iid) if type(iid) is int else _encode_str(iid))
    text_details = _LINE.encode(details) if details else "{}"
    return f'{{"details": {text_details}, "instance_id": {text_id}, "kind": {_encode_str(kind)}, "purpose": {_encode_str(purpose)}, "seed": {seed}, "uses": {uses}}}'


def _records_text(records: Any, indent: str) -> str:
    if not isinstance(records, list):  # a damaged body: rendered as it is, so its checksum is still defined
        return _LINE.encode(records)
    if not records:
        return "[]"
    pad = indent + "  "
    return "[\n" + ",\n".join([pad + _record_line(r) for r in records]) + "\n" + indent + "]"


def render(body: Mapping[str, Any]) -> str:
    """The file text of `body` (without its checksum): keys sorted, one record per line, small
    sections pretty-printed. Deterministic: the checksum is the SHA-256 of this text."""
    parts = []
    for key in sorted(k for k in body if k != "checksum"):
        value = body[key]
        if key == "records":
            text = _records_text(value, "  ")
        elif key == "ranks" and isinstance(value, list):
            text = "[]" if not value else "[\n" + ",\n".join("    " + _records_text(r, "    ") for r in value) + "\n  ]"
        else:
            text = _PRETTY.encode(value).replace("\n", "\n  ")
        parts.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def checksum_of(body: Mapping[str, Any]) -> str:
    """The checksum a manifest carries: SHA-256 of its rendered text without the checksum line."""
    try:
        text = render(body)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest holds something that is not JSON data: {exc}.") from None
    return _digest(text)


def _with_checksum(text: str) -> str:
    """Rendered `text` with its checksum line inserted as line 2."""
    return "{\n" + f'  "checksum": "{_digest(text)}",\n' + text[2:]


def _require(mapping: Mapping[str, Any], key: str, types: Any, where: str) -> Any:
    if key not in mapping:
        raise ManifestError(f"{where} is missing {key!r}.")
    value = mapping[key]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)))
    if not ok:
        raise ManifestError(f"{where}[{key!r}] must be {getattr(types, '__name__', types)}, got {type(value).__name__} {value!r:.80}.")
    return value


def record_from_dict(data: Any, where: str) -> SeedRecord:
    if not isinstance(data, Mapping):
        raise ManifestError(f"{where} must be an object, got {type(data).__name__}.")
    keys = set(data)
    if keys != _RECORD:
        raise ManifestError(f"{where} must have exactly the keys {sorted(_RECORD)}, got {sorted(map(str, keys))}.")
    purpose = _require(data, "purpose", str, where)
    if not purpose:
        raise ManifestError(f"{where}['purpose'] is empty.")
    instance_id = data["instance_id"]
    if not (instance_id is None or type(instance_id) in (str, int)):
        raise ManifestError(f"{where}['instance_id'] must be null, a string or an int, got {instance_id!r:.80}.")
    seed = _require(data, "seed", int, where)
    if not 0 <= seed < 2**64:
        raise ManifestError(f"{where}['seed'] must be in [0, 2**64), got {seed}.")
    kind = _require(data, "kind", str, where)
    if kind not in KINDS:
        raise ManifestError(f"{where}['kind'] must be one of {list(KINDS)}, got {kind!r:.80}.")
    uses = _require(data, "uses", int, where)
    if uses < 1:
        raise ManifestError(f"{where}['uses'] must be >= 1, got {uses}.")
    details = _require(data, "details", Mapping, where)
    _check_json(details, f"{where}['details']")
    return SeedRecord(purpose=purpose, instance_id=instance_id, seed=seed, kind=kind, uses=uses, details=details)


_KIND_SET = frozenset(KINDS)


def _records(data: Any, where: str) -> Tuple[SeedRecord, ...]:
    if not isinstance(data, list):
        raise ManifestError(f"{where} must be a list, got {type(data).__name__}.")
    out = []
    seen = set()
    kinds = _KIND_SET
    for i, d in enumerate(data):
        # A fast check of the common shape; anything unusual goes through record_from_dict,
        # which names exactly what is wrong.
        try:
            if type(d) is not dict or len(d) != 6:
                raise KeyError
            purpose, iid, seed, kind, uses, details = d["purpose"], d["instance_id"], d["seed"], d["kind"], d["uses"], d["details"]
        except KeyError:
            purpose = None
        if (
            type(purpose) is not str
            or not purpose
            or not (iid is None or type(iid) is str or type(iid) is int)
            or type(seed) is not int
            or not 0 <= seed < 18446744073709551616
            or kind not in kinds
            or type(uses) is not int
            or uses < 1
            or type(details) is not dict
        ):
            record = record_from_dict(d, f"{where}[{i}]")
        else:
            if details:
                _check_json(details, f"{where}[{i}]['details']")
            record = SeedRecord(purpose=purpose, instance_id=iid, seed=seed, kind=kind, uses=uses, details=details)
        key = (record.purpose, type(record.instance_id), record.instance_id)
        if key in seen:
            raise ManifestError(f"{where} lists ({record.purpose!r}, {record.instance_id!r}) twice.")
        seen.add(key)
        out.append(record)
    return tuple(out)


def _freeze(value: Mapping[str, Any]) -> Dict[str, Any]:
    return dict(value)


@attrs.frozen(kw_only=True)
class Manifest:
    """What a run issued and ran with. Build it with ``session.manifest()``; read it with :meth:`load`."""

    master_seed: int
    scheme: str
    records: Tuple[SeedRecord, ...] = attrs.field(converter=tuple)
    settings: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze)
    applied: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze)
    environment: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze)
    violations: Tuple[Mapping[str, str], ...] = attrs.field(default=(), converter=tuple)
    world_size: int = 1
    ranks: Tuple[Tuple[SeedRecord, ...], ...] = attrs.field(default=(), converter=tuple)
    replay: Optional[Mapping[str, Any]] = None
    seedreg_version: str = __version__

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
        }

    def to_dict(self) -> Dict[str, Any]:
        """JSON-native data, checksum included."""
        body = self._body()
        body["checksum"] = checksum_of(body)
        return body

    def to_json(self) -> str:
        """The file text: the body rendered (keys sorted, one record per line), checksum on line 2."""
        try:
            return _with_checksum(render(self._body(as_dicts=False)))
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"manifest holds something that is not JSON data: {exc}.") from None

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        """Validate `data` (as :meth:`to_dict` makes it) and build the manifest; checksum checked if present."""
        return cls._validated(data, verify=True)

    @classmethod
    def _validated(cls, data: Any, *, verify: bool) -> "Manifest":
        """:meth:`_from_dict`, with any slip past its checks still reported as a ManifestError."""
        try:
            return cls._from_dict(data, verify=verify)
        except ManifestError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
            raise ManifestError(f"manifest is malformed: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _from_dict(cls, data: Any, *, verify: bool) -> "Manifest":
        if not isinstance(data, Mapping):
            raise ManifestError(f"a manifest must be a JSON object, got {type(data).__name__}.")
        if data.get("format") != FORMAT:
            raise ManifestError(f"not a seedreg manifest (format is {data.get('format')!r:.80}, expected {FORMAT!r}).")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise ManifestError(
                f"manifest schema_version {version!r:.40} is not supported; this seedreg ({__version__}) reads "
                f"version {SCHEMA_VERSION}."
            )
        keys = set(data)
        if "checksum" in keys:
            if verify and data["checksum"] != checksum_of(data):
                raise ManifestError("manifest checksum does not match its content: the file was edited or damaged.")
            keys.discard("checksum")
        if keys != _TOP - {"checksum"}:
            missing, extra = sorted(_TOP - {"checksum"} - keys), sorted(map(str, keys - _TOP))
            raise ManifestError(f"manifest fields are wrong: missing {missing}, unexpected {extra}.")
        where = "manifest"
        master = _require(data, "master_seed", int, where)
        if not 0 <= master <= MASTER_SEED_MAX:
            raise ManifestError(f"manifest['master_seed'] must be in [0, 2**32 - 1], got {master}.")
        scheme = _require(data, "scheme", str, where)
        if scheme not in SCHEMES:
            raise ManifestError(f"manifest['scheme'] {scheme!r:.80} is unknown; known: {sorted(SCHEMES)}.")
        world = _require(data, "world_size", int, where)
        if world < 1:
            raise ManifestError(f"manifest['world_size'] must be >= 1, got {world}.")
        settings = _require(data, "settings", Mapping, where)
        for key in ("deterministic", "warn_only", "fill_uninitialized_memory"):
            _require(settings, key, bool, "manifest['settings']")
        applied = _require(data, "applied", Mapping, where)
        environment = _require(data, "environment", Mapping, where)
        for name, value in (("settings", settings), ("applied", applied), ("environment", environment)):
            _check_json(value, f"manifest[{name!r}]")
        violations = _require(data, "violations", list, where)
        for i, v in enumerate(violations):
            if not (isinstance(v, Mapping) and set(v) == {"kind", "message"} and all(isinstance(x, str) for x in v.values())):
                raise ManifestError(f"manifest['violations'][{i}] must be {{'kind': str, 'message': str}}.")
        records = _records(data["records"], "manifest['records']")
        ranks_data = _require(data, "ranks", list, where)
        ranks = tuple(_records(r, f"manifest['ranks'][{i}]") for i, r in enumerate(ranks_data))
        if ranks and len(ranks) != world:
            raise ManifestError(f"manifest lists {len(ranks)} ranks but world_size is {world}.")
        replay = data["replay"]
        if replay is not None:
            if not isinstance(replay, Mapping):
                raise ManifestError("manifest['replay'] must be an object or null.")
            _check_json(replay, "manifest['replay']")
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
            seedreg_version=_require(data, "seedreg_version", str, where),
        )

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "Manifest":
        """Parse and validate a manifest file's text: its checksum line covers every other byte."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ManifestError(f"manifest is not UTF-8 text: {exc}.") from None
        if not text.strip():
            raise ManifestError("manifest is empty.")

        def _no_constants(name: str) -> None:
            raise ManifestError(f"manifest holds {name}, which JSON does not allow.")

        lines = text.split("\n", 2)
        match = _CHECKSUM_LINE.match(lines[1]) if len(lines) == 3 and lines[0] == "{" else None
        if match is None:
            raise ManifestError("manifest has no checksum on its second line: it was not written by seedreg, or was reformatted.")
        if _digest("{\n" + lines[2]) != match.group(1):
            raise ManifestError("manifest checksum does not match its content: the file was edited, truncated or damaged.")
        try:
            data = json.loads(text, parse_constant=_no_constants)
        except RecursionError:
            raise ManifestError("manifest is nested too deeply.") from None
        except ValueError as exc:  # JSONDecodeError, and ints past Python's digit limit
            raise ManifestError(f"manifest is not valid JSON (truncated or damaged?): {exc}.") from None
        return cls._validated(data, verify=False)

    # -- files -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: PathLike) -> "Manifest":
        """Read and validate a manifest file. A damaged file is refused whole, never half-read."""
        path = pathlib.Path(path)
        try:
            size = path.stat().st_size
            if size > MAX_BYTES:
                raise ManifestError(f"{path} is {size} bytes; a manifest is at most {MAX_BYTES}.")
            data = path.read_bytes()
        except FileNotFoundError:
            raise ManifestError(f"no manifest at {path}: the file does not exist.") from None
        except IsADirectoryError:
            raise ManifestError(f"{path} is a directory, not a manifest file.") from None
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {path}: {exc.strerror or exc}.") from None
        try:
            return cls.from_json(data)
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None

    def write(self, path: PathLike) -> pathlib.Path:
        """Write atomically: a temporary file beside `path`, fsync, rename. Returns the path."""
        path = pathlib.Path(path)
        payload = self.to_json().encode("utf-8")
        return atomic_write(path, payload)

    # -- comparison ------------------------------------------------------------------------------

    def diff(self, other: "Manifest") -> List[str]:
        """What differs between two manifests, one line each (seeds, settings, environment, fingerprints)."""
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
            if a.kind != b.kind:
                out.append(f"{label}: kind {a.kind!r} != {b.kind!r}")
            for dkey in sorted(set(a.details) | set(b.details)):
                if a.details.get(dkey) != b.details.get(dkey):
                    out.append(f"{label}: {dkey} {a.details.get(dkey)!r} != {b.details.get(dkey)!r}")
        for section in ("settings", "applied", "environment"):
            a, b = getattr(self, section), getattr(other, section)
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append(f"{section}.{key}: {a.get(key)!r} != {b.get(key)!r}")
        return out


def atomic_write(path: pathlib.Path, payload: bytes) -> pathlib.Path:
    """Write `payload` to `path` so that readers see the old file or the new one, never a mix."""
    directory = path.parent if str(path.parent) else pathlib.Path(".")
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:  # pragma: no cover - platforms without directory fds
            return path
        try:
            os.fsync(dir_fd)
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(dir_fd)
        return path
    except OSError as exc:
        raise ManifestWriteError(
            f"cannot write {path}: {exc.strerror or exc}; the previous file (if any) is untouched. "
            f"Check that the directory exists, is writable and has space."
        ) from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
