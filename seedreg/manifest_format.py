"""The manifest's text: rendering (keys sorted, one record per line, the checksum on line 2), the
checksum, and the checks of its sections and of the parser's input, shared by
:class:`~seedreg.Manifest`'s reading and writing."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

from .errors import ManifestError
from .files import check_density
from .records import check_json, record_line, require

__all__ = ["render", "checksum_of"]

_RESULT_KINDS = ("module", "state_dict", "tensor", "array", "value")
_PRETTY = json.JSONEncoder(sort_keys=True, ensure_ascii=False, allow_nan=False, indent=2)
CHECKSUM_LINE = re.compile(r'^  "checksum": "(sha256:[0-9a-f]{64})",$')


def _records_text(records: Any, indent: str) -> str:
    if not isinstance(records, list):  # a damaged body: rendered as it is, so its checksum is still defined
        return _PRETTY.encode(records).replace("\n", "\n" + indent)
    if not records:
        return "[]"
    pad = indent + "  "
    return "[\n" + ",\n".join([pad + record_line(r) for r in records]) + "\n" + indent + "]"


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


def with_checksum(text: str) -> str:
    """Rendered `text` with its checksum line inserted as line 2."""
    return "{\n" + f'  "checksum": "{_digest(text)}",\n' + text[2:]


def check_results(data: Any, where: str) -> Tuple[Dict[str, Any], ...]:
    if not isinstance(data, list):
        raise ManifestError(f"{where} must be a list, got {type(data).__name__}.")
    out, seen = [], set()
    for i, r in enumerate(data):
        w = f"{where}[{i}]"
        if not isinstance(r, Mapping) or set(r) != {"name", "kind", "value"}:
            raise ManifestError(f"{w} must be an object with exactly the keys ['kind', 'name', 'value'].")
        name = require(r, "name", str, w)
        if name in seen:
            raise ManifestError(f"{where} lists result {name!r} twice.")
        seen.add(name)
        kind = require(r, "kind", str, w)
        if kind not in _RESULT_KINDS:
            raise ManifestError(f"{w}['kind'] must be one of {list(_RESULT_KINDS)}, got {kind!r:.80}.")
        value = r["value"]
        if kind != "value" and not isinstance(value, str):
            raise ManifestError(f"{w}['value'] must be a fingerprint string for a {kind}, got {value!r:.80}.")
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise ManifestError(f"{w}['value'] must be a number, string, bool or null, got {type(value).__name__}.")
        check_json(value, f"{w}['value']")
        out.append({"name": name, "kind": kind, "value": value})
    return tuple(out)


def check_trace_entry(entry: Any) -> Dict[str, Any]:
    from .tracefile import check_entry

    return check_entry(entry)


_VERDICTS = ("bitwise", "diverged", "statistical")
_REPLAY_LISTS = {"missing": dict, "new": dict, "mismatches": dict, "environment": dict, "reasons": str}
_REPLAY_RESULTS = {"matched": str, "mismatched": dict, "missing": str, "new": str}


def check_replay(replay: Any) -> None:
    """The replay section as ``SeedSession.replay_report()`` writes it: its keys, the verdict, and
    the type of every list's items (so that ``seedreg show`` and readers can trust its shape)."""
    where = "manifest['replay']"
    if not isinstance(replay, Mapping):
        raise ManifestError(f"{where} must be an object or null.")
    check_json(replay, where)
    known = {"master_seed", "scheme", "verdict", "results", "first_divergence", *_REPLAY_LISTS}
    if not set(replay) <= known or not {"verdict", "results", "reasons"} <= set(replay):
        raise ManifestError(f"{where} must be a replay report with the keys {sorted(known)} (verdict, results and reasons at least).")
    if replay["verdict"] not in _VERDICTS:
        raise ManifestError(f"{where}['verdict'] must be one of {list(_VERDICTS)}, got {replay['verdict']!r:.60}.")
    for key, kind in _REPLAY_LISTS.items():
        value = replay.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
            raise ManifestError(f"{where}[{key!r}] must be a list of {kind.__name__}s.")
    first = replay.get("first_divergence")
    if first is not None and not (isinstance(first, Mapping) and set(first) == {"step", "tensor", "kind"}
                                  and type(first["step"]) is int and isinstance(first["tensor"], str)
                                  and first["kind"] in ("loss", "grad", "param", "buffer")):
        raise ManifestError(f"{where}['first_divergence'] must be null or {{'step': int, 'tensor': str, 'kind': 'loss'|'grad'|'param'|'buffer'}}.")
    results = replay["results"]
    if not isinstance(results, Mapping) or set(results) != set(_REPLAY_RESULTS):
        raise ManifestError(f"{where}['results'] must be an object with the keys {sorted(_REPLAY_RESULTS)}.")
    for key, kind in _REPLAY_RESULTS.items():
        if not isinstance(results[key], list) or not all(isinstance(v, kind) for v in results[key]):
            raise ManifestError(f"{where}['results'][{key!r}] must be a list of {kind.__name__}s.")


def _refuse_constant(name: str) -> None:
    raise ManifestError(f"manifest holds {name}, which JSON does not allow.")


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ManifestError(f"manifest has the key {dup!r:.60} twice in one object (JSON parsers disagree on which wins).")
    return out


def loads_strict(text: str) -> Any:
    return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates)


_RECORDS_OPEN = '\n  "records": [\n'
_RECORDS_CLOSE = "\n  ]"


def split_records(body: str) -> Tuple[str, Optional[Tuple[int, int]]]:
    """The body with its records block (as seedreg renders it) replaced by ``[]``, and where the
    block's lines lie; ``(body, None)`` when the records are not laid out one per line."""
    i = body.find(_RECORDS_OPEN)
    if i < 0:
        return body, None
    start = i + len(_RECORDS_OPEN)
    end = body.find(_RECORDS_CLOSE, start)
    if end < 0:
        return body, None
    return body[:i] + '\n  "records": []' + body[end + len(_RECORDS_CLOSE) :], (start, end)


def record_lines(body: str, start: int, end: int, chunk: int = 2048) -> Any:
    """The records of ``body[start:end]`` (one per line, commas between), parsed `chunk` lines at a
    time: the JSON tree of all records never exists at once."""
    pos = start
    while pos < end:
        stop = pos
        for _ in range(chunk):
            stop = body.find("\n", stop + 1, end)
            if stop < 0:
                stop = end
                break
        text = body[pos:stop]
        check_density(text, "manifest['records']")
        if stop < end:
            if not text.endswith(","):
                raise ManifestError("manifest records are not one per line with commas between.")
            text = text[:-1]
        yield from loads_strict("[" + text + "]")
        pos = stop + 1
