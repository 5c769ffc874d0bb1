"""The house rules of ``seedreg/``, read from its source: no import cycle (counting imports under
``TYPE_CHECKING`` and inside functions), no module reading another module's private names, no
module over 400 lines, and ``seedreg.session`` imported only by what stands above the session."""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "seedreg"
MAX_LINES = 400
#: Modules above the session: they build on it, it never imports them.
ABOVE_SESSION = ("seedreg", "seedreg.cli", "seedreg.demo", "seedreg.integrations", "seedreg.magic", "seedreg.study")
#: Another library's private names read on purpose, each with the reason.
ALLOWED = {
    ("seedreg.integrations.lightning", "trainer._accelerator_connector"):
        "Lightning exposes use_distributed_sampler nowhere else; refusing it is the fix users need",
    ("seedreg.integrations.lightning", "trainer.fit_loop._data_fetcher"):
        "restarting the fit's iterator after a resume; Lightning has no public handle on it",
    ("seedreg.builders", "hasattr(model, '_orig_mod')"):
        "a torch.compile'd module is told apart by its _orig_mod; torch names no public type for the wrapper",
    ("seedreg.integrations.lightning", "getattr(trainer.fit_loop, '_combined_loader', None)"):
        "the fit's training loaders as Lightning combined them, each one (trainer.train_dataloader gives their container)",
}


def _modules() -> Dict[str, Tuple[pathlib.Path, ast.Module]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path, tree: ast.Module) -> List[Tuple[int, str, str]]:
    """(line, module imported, name taken from it) for every import of seedreg, wherever it stands."""
    out = []
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            if base.split(".")[0] != "seedreg":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((node.lineno, full if full in MODULES else base, alias.name))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, "") for a in node.names if a.name.split(".")[0] == "seedreg"]
    return out


def _graph() -> Dict[str, Set[str]]:
    return {name: {m for _, m, _ in _imports(name, path, tree) if m != name and m in MODULES}
            for name, (path, tree) in MODULES.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _reach_ins(name: str, path: pathlib.Path, tree: ast.Module) -> List[str]:
    """Private names this module takes from elsewhere: imported, or read as ``obj._name`` where
    the module defines no ``_name`` of its own (``self._name``, a private function or class)."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            own.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own.add(node.target.id)
    found = [f"line {line}: imports {taken} from {module}" for line, module, taken in _imports(name, path, tree) if _private(taken)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            text = ast.unparse(node)
            if (name, text) not in ALLOWED:
                found.append(f"line {node.lineno}: reads {text}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value) and node.args[1].value not in own
              and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls"))):
            text = ast.unparse(node)  # the same reach-in, spelled getattr(obj, "_name")
            if (name, text) not in ALLOWED:
                found.append(f"line {node.lineno}: reads {text}")
    return found


class TestHouse:
    def test_the_package_is_read(self):
        """The checks below see the whole package (a broken walk would pass them vacuously)."""
        assert {"seedreg.session", "seedreg.registry", "seedreg.magic.stepper", "seedreg.study.core"} <= set(MODULES)
        assert "seedreg.registry" in _graph()["seedreg.session"]

    def test_no_import_cycle(self):
        """No module reaches itself through imports, counting TYPE_CHECKING and function-level ones."""
        assert _cycles(_graph()) == []

    def test_the_cycle_finder_finds_cycles(self):
        """The finder itself: a made-up graph with one cycle of three."""
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        assert _cycles(graph) == [["a", "b", "c"]]

    @pytest.mark.parametrize("name", sorted(MODULES))
    def test_no_private_reach_in(self, name):
        """No module imports another's private names or reads another object's private attributes."""
        path, tree = MODULES[name]
        assert _reach_ins(name, path, tree) == []

    def test_the_reach_in_finder_finds_them(self):
        """The finder itself: a module reading a session's private attribute is caught."""
        tree = ast.parse("from .results import _hidden\n\ndef f(session):\n    return session._registry, getattr(session, '_trace', None)\n")
        assert sorted(_reach_ins("seedreg.x", PACKAGE / "x.py", tree)) == [
            "line 1: imports _hidden from seedreg.results", "line 4: reads getattr(session, '_trace', None)",
            "line 4: reads session._registry"]

    @pytest.mark.parametrize("name", sorted(MODULES))
    def test_module_size(self, name):
        """Every module is at most 400 lines."""
        path, _ = MODULES[name]
        assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES

    def test_only_what_stands_above_imports_the_session(self):
        """``seedreg.session`` is imported by the package's front, the CLI, the demo, the
        integrations, magic and studies: never by the session's own collaborators."""
        importers = sorted(name for name, deps in _graph().items() if "seedreg.session" in deps)
        assert importers and all(n == "seedreg" or n.startswith(ABOVE_SESSION[1:]) for n in importers), importers
