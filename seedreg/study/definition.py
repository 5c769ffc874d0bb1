"""A study's definition (``study.json``) and its two arrays (``masks.npy``, ``outputs.npy``).

The definition is validated field by field whenever it is read, whatever its checksum says (a
hand-edited file with a recomputed checksum still holds only values a machine can run). The
arrays' headers are checked against it before any row is read or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pathlib
import secrets
import shutil
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..derive import SCHEMES, derive_seed
from ..errors import SeedregError
from ..masks import MASK_MODES, make_subset_mask

FORMAT = "seedreg-study"
VERSION = 2  # 2: masks derived with alpha and mode in the derivation, or brought (masks="given")
FIELDS = ("master_seed", "num_models", "num_examples", "alpha", "num_outputs", "mode", "replicates", "scheme")
FIELDS_V2 = FIELDS + ("masks", "masks_digests")
# The most models one study holds: the completion index keeps 60 bytes a model in memory (1 GiB at
# this bound), sized before any record is read, so a definition may not ask for more.
MAX_MODELS = 2**24
MAX_BYTES = 2**50  # an array larger than a petabyte is a typo, not a study
ARRAYS = {"masks.npy": np.dtype(np.bool_), "outputs.npy": np.dtype("<f4")}


class StudyError(SeedregError, ValueError):
    """A study's directory, definition or use is wrong; the message names what and how to fix it."""


def check_count(name: str, value: Any, low: int = 1, high: int = MAX_BYTES) -> int:
    if type(value) is not int or not low <= value <= high:
        raise StudyError(f"`{name}` must be an int in [{low}, {high}], got {value!r:.40}.")
    return value


def check_definition(d: Mapping[str, Any], where: str = "") -> Dict[str, Any]:
    """`d` with every value checked (types exact: 6, not 6.0 nor "6"); raises naming the field."""
    at = f" in {where}" if where else ""
    seed = d["master_seed"]
    if type(seed) is not int or not 0 <= seed <= 2**32 - 1:
        raise StudyError(f"`master_seed`{at} must be an int in [0, 2**32 - 1], got {seed!r:.40}.")
    for name, high in (("num_models", MAX_MODELS), ("num_examples", MAX_BYTES), ("num_outputs", MAX_BYTES), ("replicates", MAX_MODELS)):
        try:
            check_count(name, d[name], 1, high)
        except StudyError as exc:
            raise StudyError(f"{exc.args[0][:-1]}{at}.") from None
    if d["num_models"] % d["replicates"]:
        raise StudyError(f"`num_models` ({d['num_models']}) must be a multiple of `replicates` ({d['replicates']}){at}.")
    for name, width in (("masks", d["num_examples"]), ("outputs", 4 * d["num_outputs"])):
        if d["num_models"] * width > MAX_BYTES:
            raise StudyError(f"{name}.npy would hold {d['num_models'] * width:,} bytes{at}: more than a machine holds; check num_models.")
    if d["scheme"] not in SCHEMES:
        raise StudyError(f"`scheme`{at} must be one of {sorted(SCHEMES)}, got {d['scheme']!r:.40}.")
    source = d.get("masks", "derived-v1")
    if source == "given":
        if d["alpha"] is not None or d["mode"] != "given":
            raise StudyError(f"a study with given masks has alpha=None and mode='given'{at}, got {d['alpha']!r:.20}, {d['mode']!r:.20}.")
        digests = d.get("masks_digests")
        if not isinstance(digests, list) or not digests or not all(_is_segment(s) for s in digests):
            raise StudyError(f"`masks_digests`{at} must list the digests of the given masks ([start, end, 'sha256:...']).")
        if [s[0] for s in digests] != [0] + [s[1] for s in digests[:-1]] or digests[-1][1] != d["num_models"]:
            raise StudyError(f"`masks_digests`{at} must cover models 0..num_models-1 in order.")
    elif source in ("derived", "derived-v1"):
        alpha = d["alpha"]
        if type(alpha) is not float or not (math.isfinite(alpha) and 0.0 < alpha <= 1.0):
            raise StudyError(f"`alpha`{at} must be a float in (0, 1], got {alpha!r:.40}.")
        if d["mode"] not in MASK_MODES:
            raise StudyError(f"`mode`{at} must be one of {list(MASK_MODES)}, got {d['mode']!r:.40}.")
    else:
        raise StudyError(f"`masks`{at} must be 'derived' or 'given', got {source!r:.40}.")
    return dict(d)


def _is_segment(s: Any) -> bool:
    return (isinstance(s, list) and len(s) == 3 and type(s[0]) is int and type(s[1]) is int and 0 <= s[0] < s[1]
            and isinstance(s[2], str) and s[2].startswith("sha256:") and len(s[2]) == 71)


def _body(d: Mapping[str, Any]) -> Dict[str, Any]:
    version = 1 if d.get("masks", "derived-v1") == "derived-v1" else VERSION
    keys = FIELDS if version == 1 else FIELDS_V2
    return {"format": FORMAT, "version": version, **{k: d[k] for k in keys}}


def definition_text(d: Mapping[str, Any]) -> str:
    body = _body(d)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return json.dumps({**body, "checksum": "sha256:" + digest}, sort_keys=True, indent=2) + "\n"


def read_definition(path: pathlib.Path) -> Dict[str, Any]:
    """The validated definition at `path` (version 1, from seedreg 0.2, or 2)."""
    try:
        text = read_small(path, 1 << 20)
        data = json.loads(text)
    except (OSError, ValueError, RecursionError) as exc:
        raise StudyError(f"{path} is not a readable study definition: {exc}.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") not in (1, VERSION):
        raise StudyError(f"{path} is not a seedreg study definition (format {FORMAT!r}, version 1 or {VERSION}).")
    keys = FIELDS if data["version"] == 1 else FIELDS_V2
    if set(data) != set(keys) | {"format", "version", "checksum"}:
        raise StudyError(f"{path} was edited by hand (its fields are not a study's); restore it, or start a new study root.")
    d = {k: data[k] for k in keys}
    if data["version"] == 1:
        d["masks"], d["masks_digests"] = "derived-v1", []
    if definition_text(d) != text:
        raise StudyError(f"{path} was edited by hand (its checksum or layout does not match); restore it, or start a new study root.")
    return check_definition(d, str(path))


def read_small(path: pathlib.Path, limit: int) -> str:
    """A regular file's text, refusing FIFOs, devices and files over `limit` bytes (never hangs)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        st = os.fstat(fd)
        if not _is_regular(st.st_mode) or st.st_size > limit:
            raise StudyError(f"{path} is not a regular file of at most {limit} bytes; restore the study's file.")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(limit + 1).decode("utf-8")
    finally:
        os.close(fd)


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# -- the arrays ------------------------------------------------------------------------------------


def width_of(d: Mapping[str, Any], name: str) -> int:
    return d["num_examples"] if name == "masks.npy" else d["num_outputs"]


def array_header(path: pathlib.Path, d: Mapping[str, Any], rows: Optional[int] = None) -> int:
    """The byte offset of row 0 of `path`, after checking that its header says what the definition
    says (dtype, C order, shape) and that the file holds every row; else StudyError naming it.
    More rows than the definition are left by an interrupted grow (run it again); never read."""
    name = path.name
    want = (d["num_models"] if rows is None else rows, width_of(d, name))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise StudyError(f"{path} is missing: the study's {name} was deleted; restore it from a backup (it is never re-created).") from None
    except OSError as exc:
        raise StudyError(f"{path} cannot be opened: {exc.strerror or exc}.") from None
    try:
        st = os.fstat(fd)
        if not _is_regular(st.st_mode):
            raise StudyError(f"{path} is not a regular file; restore the study's {name}.")
        with os.fdopen(os.dup(fd), "rb") as fh:
            try:
                version = np.lib.format.read_magic(fh)
                shape, fortran, dtype = _read_header(fh, version)
            except (ValueError, SyntaxError, OSError) as exc:
                raise StudyError(f"{path} is damaged: its .npy header cannot be read ({exc}); restore it from a backup.") from None
            offset = fh.tell()
    finally:
        os.close(fd)
    if dtype != ARRAYS[name] or fortran or len(shape) != 2 or shape[1] != want[1] or shape[0] < want[0]:
        order = "Fortran" if fortran else "C"
        raise StudyError(
            f"{path} holds {dtype} {shape} in {order} order; the study needs {ARRAYS[name]} {want} in C order. "
            f"It was re-saved or replaced; restore the study's file (rows are written only through a checked header)."
        )
    if st.st_size < offset + want[0] * want[1] * ARRAYS[name].itemsize:
        raise StudyError(f"{path} is truncated ({st.st_size} bytes; {want[0]} rows need more); restore it from a backup.")
    return offset


def _read_header(fh: Any, version: Tuple[int, int]) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    raise ValueError(f"npy format version {version} is not one seedreg writes")


def new_array(path: pathlib.Path, d: Mapping[str, Any], rows: Optional[np.ndarray] = None) -> None:
    shape = (d["num_models"], width_of(d, path.name))
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=ARRAYS[path.name], shape=shape)
    if rows is not None:
        mm[:] = rows
    mm.flush()
    del mm


def grow_array(path: pathlib.Path, d: Mapping[str, Any], num_models: int) -> None:
    """Extend `path` to `num_models` rows in place: rows 0..N-1 keep their bytes. numpy leaves room
    in the header for a longer first dimension; the new rows are zeros (sparse) until written."""
    width = width_of(d, path.name)
    itemsize = ARRAYS[path.name].itemsize
    with open(path, "r+b") as fh:
        version = np.lib.format.read_magic(fh)
        shape, fortran, dtype = _read_header(fh, version)
        offset = fh.tell()
        if shape[0] not in (d["num_models"], num_models):
            raise StudyError(f"{path} holds {shape[0]} rows; the study has {d['num_models']}: restore it before growing.")
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (num_models, width)}
        text = repr(header).encode("latin1")
        room = offset - len(np.lib.format.magic(*version)) - (2 if version == (1, 0) else 4) - 1
        if len(text) > room:
            raise StudyError(f"{path} has no room in its header for {num_models:,} rows; start a new study root.")
        fh.truncate(offset + num_models * width * itemsize)
        fh.seek(len(np.lib.format.magic(*version)) + (2 if version == (1, 0) else 4))
        fh.write(text + b" " * (room - len(text)) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_rows(path: pathlib.Path, offset: int, width: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) read with one positioned read (no memory map: memory stays one chunk)."""
    dtype = ARRAYS[path.name]
    with open(path, "rb") as fh:
        data = np.fromfile(fh, dtype=dtype, count=(stop - start) * width, offset=offset + start * width * dtype.itemsize)
    return data.reshape(stop - start, width)


# -- masks ------------------------------------------------------------------------------------------


def derived_mask(d: Mapping[str, Any], mask_id: int) -> np.ndarray:
    """The mask of replicate group `mask_id`. Studies of 0.2 (``derived-v1``) derive its seed from
    (master seed, group); later ones from (master seed, alpha, mode, group), so two studies with one
    master seed and different alphas never share masks by accident."""
    if d["masks"] == "derived-v1":
        seed = derive_seed(d["master_seed"], "study/mask", mask_id, scheme="sha256-v2")
        return make_subset_mask(seed, d["num_examples"], d["alpha"], d["mode"])
    seed = derive_seed(d["master_seed"], f"study/mask/{d['mode']}/{d['alpha']!r}", mask_id, scheme="sha256-v2")
    n = d["num_examples"]
    rng = np.random.Generator(np.random.PCG64(seed))
    if d["mode"] == "bernoulli":
        return rng.random(n) < d["alpha"]
    k = max(1, int(round(d["alpha"] * n)))
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=min(k, n - k) if k * 2 > n else k, replace=False, shuffle=False)] = True
    return ~mask if k * 2 > n else mask


def given_masks(masks: Any, num_models: int, num_examples: int, replicates: int, where: str = "masks") -> np.ndarray:
    """`masks` as a C-ordered bool array (num_models, num_examples), its replicate groups checked."""
    arr = np.asarray(masks)
    if arr.shape != (num_models, num_examples):
        raise StudyError(f"`{where}` must have shape ({num_models}, {num_examples}) (models x examples), got {arr.shape}.")
    if arr.dtype != np.bool_:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)) or not np.isin(arr, (0, 1)).all():
            raise StudyError(f"`{where}` must hold booleans (or 0 and 1), got dtype {arr.dtype} with other values.")
        arr = arr.astype(np.bool_)
    arr = np.ascontiguousarray(arr)
    groups = arr.reshape(num_models // replicates, replicates, num_examples)
    bad = np.flatnonzero((groups != groups[:, :1]).any(axis=(1, 2)))
    if bad.size:
        g = int(bad[0])
        raise StudyError(f"`{where}` rows {g * replicates}..{g * replicates + replicates - 1} (one replicate group) differ; a group shares one mask.")
    if not arr.any(axis=1).all():
        raise StudyError(f"`{where}` row {int(np.flatnonzero(~arr.any(axis=1))[0])} selects no example; every model trains on at least one.")
    return arr


def masks_digest(rows: np.ndarray, h: Any = None) -> Any:
    """A running SHA-256 over mask rows (their packed bits), chunk by chunk."""
    h = h or hashlib.sha256(b"seedreg/masks\x00%d\x00" % rows.shape[1])
    h.update(np.packbits(rows, axis=1, bitorder="little").tobytes())
    return h


# -- creating a root --------------------------------------------------------------------------------


def create_root(root: pathlib.Path, d: Mapping[str, Any], masks: Optional[np.ndarray]) -> bool:
    """Create the whole study in a staging folder beside `root`, then rename it into place: a
    reader sees no study or a complete one. True if this process created it."""
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudyError(f"cannot create the folder of {str(root)!r}: {exc.strerror or exc}.") from None
    staging = root.parent / f".{root.name}.{secrets.token_hex(6)}.new"
    try:
        staging.mkdir()
        (staging / "tasks").mkdir()
        new_array(staging / "masks.npy", d, masks)
        new_array(staging / "outputs.npy", d)
        (staging / "locks").touch()
        write_text_atomic(staging / "study.json", definition_text(d))
        try:
            os.rename(staging, root)
            return True
        except OSError:  # another process created it first (or root is a non-empty folder)
            return False
    except OSError as exc:
        raise StudyError(f"cannot create the study {str(root)!r}: {exc.strerror or exc}.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def segment(start: int, rows: np.ndarray) -> List[Any]:
    return [start, start + len(rows), "sha256:" + masks_digest(rows).hexdigest()]


def compare(stored: Mapping[str, Any], passed: Mapping[str, Any], given: Optional[np.ndarray]) -> None:
    """A study opened with arguments: each must equal the stored definition's (and `given` masks
    its digests), or a StudyError names the field."""
    for key in FIELDS + ("masks",):
        a, b = stored[key], passed[key]
        if key == "masks" and a == "derived-v1" and b == "derived":
            continue  # a study of seedreg 0.2 keeps its derivation
        if a != b:
            grew = " (the study grew: pass its new size)" if key == "num_models" and a > b else ""
            raise StudyError(
                f"this study was defined with {key}={a!r} but {key}={b!r} was passed{grew}; "
                f"pass the stored value, or use another root for another study."
            )
    if given is not None:
        digests = [segment(s, given[s:e])[2] for s, e, _ in stored["masks_digests"]]
        if digests != [s[2] for s in stored["masks_digests"]]:
            raise StudyError("the `masks` passed differ from the masks this study was created with (their digests differ); pass the same masks, or use Study.open(root).")
