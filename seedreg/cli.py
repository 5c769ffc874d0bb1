"""The ``seedreg`` command: derive, show, diff, env, demo.

Errors (a missing file, a corrupt manifest, bad arguments) print one line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any, List, Optional, Sequence, Tuple

from ._version import __version__
from .derive import DEFAULT_SCHEME, SCHEMES, derive_seed

__all__ = ["main"]


_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _emit(text: str = "") -> None:
    """Print `text` with control characters escaped: a manifest's purposes and details are data,
    and must not move the terminal's cursor or erase lines."""
    print(_CONTROL.sub(lambda m: repr(m.group())[1:-1], text))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def _instance_id(text: str) -> Any:
    """An instance id from the command line: digits are an int (as in LDS ids), 's:TEXT' forces a str."""
    if text.startswith("s:"):
        return text[2:]
    if text.lstrip("-").isdigit():
        return int(text)
    return text


def _cmd_derive(args: argparse.Namespace) -> int:
    try:
        master = int(args.master)
    except ValueError:
        raise ValueError(f"MASTER must be an int in [0, 2**32 - 1], got {args.master!r}.") from None
    instance = None if args.instance_id is None else _instance_id(args.instance_id)
    print(derive_seed(master, args.purpose, instance, scheme=args.scheme))
    return 0


def _rows_table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _describe(kind: str, d: Any) -> str:
    """One line for what a use seeded."""
    if kind == "dataloader":
        subset = f", subset {d.get('subset_size')} ({d.get('subset_mode')})" if d.get("subset_size") is not None else ""
        return f"{d.get('dataset_size')} examples, batch {d.get('batch_size')}, shuffle={d.get('shuffle')}, workers={d.get('num_workers')}{subset}"
    if kind == "subset_mask":
        return f"n={d.get('num_examples')} alpha={d.get('alpha')} mode={d.get('mode')} kept={d.get('kept')}"
    if kind == "optimizer":
        groups = d.get("param_groups") or [d.get("defaults") or {}]
        hyper = ", ".join(f"{k}={v}" for k, v in sorted(groups[0].items()) if k in ("lr", "momentum", "weight_decay", "betas", "eps"))
        return f"{str(d.get('class', '')).rsplit('.', 1)[-1]} {hyper}".strip()
    if d.get("fingerprint"):
        return f"{str(d.get('class', '')).rsplit('.', 1)[-1]} {str(d.get('parameters', ''))} params {str(d['fingerprint'])[:23]}..."
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items()))


def _cmd_show(args: argparse.Namespace) -> int:
    from .manifest import Manifest

    m = Manifest.load(args.manifest)
    if args.json:
        _emit(json.dumps(m.to_dict(), indent=2, sort_keys=True))
        return 0
    _emit(f"manifest {args.manifest}")
    _emit(f"master seed {m.master_seed}, scheme {m.scheme}, world size {m.world_size}, seedreg {m.seedreg_version}")
    rows = [["purpose", "instance", "seed", "kind", "uses", "what"]]
    for r in m.records:
        rows.append([r.purpose, repr(r.instance_id), str(r.seed), r.kind, str(r.uses), ""])
        for u in r.log:
            number = f"#{u.use}" if u.count == 1 else f"#{u.use}-{u.use + u.count - 1}"
            rows.append(["", "", "", f"  {u.kind}", number, _describe(u.kind, u.details)])
    _emit(f"\nrecords ({len(m.records)})")
    _emit(_rows_table(rows))
    if m.results:
        _emit(f"\nresults ({len(m.results)})")
        _emit(_rows_table([["name", "kind", "value"]] + [[r["name"], r["kind"], str(r["value"])] for r in m.results]))
    _emit("\nsettings: " + ", ".join(f"{k}={v}" for k, v in sorted(m.settings.items())))
    _emit("applied: " + (", ".join(f"{k}={v}" for k, v in sorted(m.applied.items())) or "(setup() was not called)"))
    _emit("\nenvironment")
    for k, v in sorted(m.environment.items()):
        _emit(f"  {k}: {v}")
    _emit(f"\nviolations ({len(m.violations)})")
    for v in m.violations:
        _emit(f"  {v['kind']}: {v['message']}")
    if m.trace is not None:
        _emit("\n" + _trace_summary(args.manifest, m.trace))
    if m.replay is not None:
        rep: Any = m.replay
        res = rep.get("results") or {}
        _emit(
            f"\nreplay: verdict {rep.get('verdict')}; missing {len(rep.get('missing', []))}, new {len(rep.get('new', []))}, "
            f"mismatches {len(rep.get('mismatches', []))}, results matched {len(res.get('matched', []))}, "
            f"mismatched {len(res.get('mismatched', []))}, missing {len(res.get('missing', []))}"
        )
        if rep.get("first_divergence"):
            first = rep["first_divergence"]
            _emit(f"  first divergence: step {first['step']}, {first['tensor']}")
        for reason in rep.get("reasons", []):
            _emit(f"  {reason}")
    return 0


def _trace_summary(manifest_path: str, entry: Any) -> str:
    """The trace a manifest names: its steps and tensors, and whether its file is there and intact."""
    from .errors import ManifestError
    from .tracefile import load_trace

    steps = f"{entry['steps']} steps" + (f" ({entry['first_step']} to {entry['last_step']})" if entry["steps"] else "")
    what = "gradients and parameters" if entry["grads"] else "parameters"
    try:
        data = load_trace(manifest_path, entry)
        kinds = {name.split("/", 1)[0] for name in data.names}
        what = ", ".join(k for k in ("grad", "param") if k in kinds).replace("grad", "gradients").replace("param", "parameters")
        what = what.replace(", ", " and ") if "buffer" not in kinds else what + " and buffers"
        state = "file checked"
    except ManifestError as exc:
        state = f"NOT USABLE: {exc}"
    return (f"trace {entry['file']}: {steps}, every {entry['every']}, {entry['tensors']} tensors (loss, {what}), "
            f"{entry['bytes']:,} bytes; {state}")


def _trace_difference(a_path: str, a: Any, b_path: str, b: Any) -> Tuple[List[str], bool]:
    """Where two traced runs first differ (the step and tensor, and what to do next), or why that
    cannot be said; and whether the traces could be compared at all."""
    from .errors import ManifestError
    from .tracefile import first_difference, load_trace, next_step

    if a.trace is None and b.trace is None:
        return [], True
    if a.trace is None or b.trace is None:
        return [f"trace: only the {'first' if b.trace is None else 'second'} manifest has a step trace"], True
    try:
        ta, tb = load_trace(a_path, a.trace), load_trace(b_path, b.trace)
    except ManifestError as exc:
        return [f"trace: not compared ({exc})"], False
    first = first_difference(ta, tb)
    if first is not None:
        return [f"first diverging step: {first['step']}, tensor {first['tensor']} ({first['kind']}). Next: {next_step(first)}"], True
    if ta.steps.tolist() != tb.steps.tolist():
        return [f"trace: the runs agree on the steps both traced, but traced {len(ta.steps)} and {len(tb.steps)} steps"], True
    return [], True


def _cmd_diff(args: argparse.Namespace) -> int:
    from .manifest import Manifest

    a, b = Manifest.load(args.a), Manifest.load(args.b)
    # known causes first (seeds, settings, environment, uses, results), then where the traces part
    known = a.diff(b)
    traced, compared = _trace_difference(args.a, a, args.b, b)
    lines = known + traced
    if not known and not compared:
        _emit("the manifests agree, but their step traces could not be compared:")
        for line in traced:
            _emit(f"  {line}")
        return 2
    if not lines:
        _emit("the manifests agree")
        return 0
    _emit(f"{len(lines)} difference(s):")
    for line in lines:
        _emit(f"  {line}")
    return 1


def _cmd_env(args: argparse.Namespace) -> int:
    from .determinism import environment, readiness

    env = environment()
    if args.json:
        _emit(json.dumps({"environment": env, "checks": readiness(env)}, indent=2, sort_keys=True))
        return 0
    _emit("environment")
    for k, v in sorted(env.items()):
        _emit(f"  {k}: {v}")
    _emit("\ndeterminism readiness")
    for check in readiness(env):
        _emit(f"  [{check['status']}] {check['message']}")
    return 0


class _Progress:
    """``audit: 120,000 / 300,000 models (40%)`` on a terminal's stderr, redrawn at most 5 times a
    second; nothing at all when stderr is a pipe or a log file."""

    def __init__(self, what: str, stream: Any = None) -> None:
        self.what, self.stream = what, stream or sys.stderr
        self.on = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.on or (now - self._last < 0.2 and done < total):
            return
        self._last = now
        self.stream.write(f"\r{self.what}: {done:,} / {total:,} models ({100 * done // max(total, 1)}%)")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _cmd_study(args: argparse.Namespace) -> int:
    from .study import Study

    study = Study.open(args.root)
    if args.action == "status":
        st = study.status()
        _emit(f"study {args.root}: {st['done']} of {st['models']} models done, {st['missing']} missing")
        return 0
    report = study.audit(progress=_Progress("audit"))
    _emit(f"study {args.root}: {report['completed']} of {report['models']} models complete")
    if report["missing"]:
        ids = report["missing"]
        shown = ", ".join(map(str, ids[:20])) + (f", ... ({len(ids)} in all)" if len(ids) > 20 else "")
        _emit(f"missing models: {shown}")
    lines = report["problems"] + report["environment_differences"]
    for line in lines[:100]:
        _emit(f"  {line}")
    if len(lines) > 100:
        _emit(f"  ... and {len(lines) - 100:,} more (Study.open(root).audit() returns them all)")
    if args.write_manifest:
        path = study.study_manifest(progress=_Progress("manifest")).write(args.write_manifest)
        _emit(f"wrote the study manifest {path}")
    _emit("audit clean" if report["ok"] else "audit found problems")
    return 0 if report["ok"] else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.out is None:
        out = pathlib.Path(tempfile.mkdtemp(prefix="seedreg-demo-"))
    else:
        out = pathlib.Path(args.out)
    return 0 if run_demo(out, master_seed=args.seed, epochs=args.epochs, workers=args.workers) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="seedreg", description="Reproducible, auditable PyTorch training: seeds, manifests, replay.")
    parser.add_argument("--version", action="version", version=f"seedreg {__version__}", help="print seedreg's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("derive", help="print the seed of (MASTER, PURPOSE, INSTANCE_ID)")
    p.add_argument("master", help="the master seed, an int in [0, 2**32 - 1]")
    p.add_argument("purpose", help="what the seed is for, e.g. model or dataloader")
    p.add_argument("instance_id", nargs="?", help="which one: digits are an int; prefix with s: to force a str (default: none)")
    p.add_argument("--scheme", default=DEFAULT_SCHEME, choices=sorted(SCHEMES), help=f"the derivation (default {DEFAULT_SCHEME})")
    p.set_defaults(fn=_cmd_derive)
    p = sub.add_parser("show", help="show a manifest: records and their uses, results, settings, environment, violations")
    p.add_argument("manifest", help="the manifest file (written by SeedSession.dump)")
    p.add_argument("--json", action="store_true", help="print the validated manifest as JSON")
    p.set_defaults(fn=_cmd_show)
    p = sub.add_parser("diff", help="what differs between two manifests (and the first diverging step of their traces); exit 1 if anything does",
                       description="What differs between two manifests, one line each. With step traces beside them, the first "
                                   "diverging step and tensor comes first. Exit 1 if anything differs.")
    p.add_argument("a", help="the first manifest file")
    p.add_argument("b", help="the second manifest file")
    p.set_defaults(fn=_cmd_diff)
    p = sub.add_parser("env", help="this machine's determinism readiness")
    p.add_argument("--json", action="store_true", help="print the environment and the checks as JSON")
    p.set_defaults(fn=_cmd_env)
    p = sub.add_parser("study", help="audit or count a study's models (exit 1 when the audit finds problems)")
    p.add_argument("action", choices=["audit", "status"], help="audit: check every model; status: done / missing counts")
    p.add_argument("root", help="the study directory")
    p.add_argument("--write-manifest", metavar="PATH", help="with audit: also write one study manifest that `seedreg show` reads")
    p.set_defaults(fn=_cmd_study)
    p = sub.add_parser("demo", help="train, write the manifest, replay it in a fresh process, compare")
    p.add_argument("--out", help="directory for the manifests and weights (default: a new temporary one)")
    p.add_argument("--seed", type=int, default=42, help="the master seed (default 42)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.set_defaults(fn=_cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; errors print one line on stderr and return 2, never a traceback."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.fn(args))
    except _UsageError as exc:
        print(f"{exc} (see 'seedreg --help')", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`seedreg show m.json | head`): stop quietly, and keep Python's
        # own flush at exit from complaining about the closed pipe
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every failure is one line: the command line is a user interface
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"seedreg: error: {_CONTROL.sub('?', message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
