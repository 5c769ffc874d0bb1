"""The documentation: the README is a front page whose links resolve, every page is in the site's
navigation, and the generated pages (command line, API reference) cover what the code has.
CI builds the site itself with ``mkdocs build --strict`` (.ci/run)."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import seedreg
from seedreg.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_a_short_front_page_whose_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) < 12 * 1024
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10
    for link in local:
        assert (ROOT / link).is_file(), link


def test_every_page_is_in_the_navigation_and_every_navigation_entry_exists():
    nav = re.findall(r"^  - [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(nav) == pages
    for page in ("getting-started.md", "resume.md", "distributed.md", "integrations.md", "streaming.md", "studies.md",
                 "magic.md", "replay.md", "manifest.md", "cli.md", "reliability.md", "benchmarks.md", "api.md"):
        assert page in nav


def test_the_api_reference_has_an_entry_for_every_public_name():
    api = _hooks()._api()
    for name in seedreg.__all__:
        if name != "__version__":
            assert re.search(rf"^::: seedreg\.[\w.]*\b{name}$", api, flags=re.M), name


def test_the_command_line_page_is_the_parsers_help():
    cli = _hooks()._cli()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        assert f"## seedreg {name}" in cli
    assert "--write-manifest" in cli and "first diverging step" in cli


def test_doctests_become_console_blocks():
    pytest = __import__("pytest")
    pytest.importorskip("griffe", reason="the docs extra: pip install -e \".[docs]\"")  # the docs extra
    spec = importlib.util.spec_from_file_location("doctest_fences", DOCS / "doctest_fences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "Intro.\n\n>>> a = 1\n>>> a\n1\n\nAfter."
    assert module.fence_doctests(text) == "Intro.\n\n```pycon\n>>> a = 1\n>>> a\n1\n```\n\nAfter."


def test_every_long_page_is_in_sections():
    """A page over 60 lines reads as a guide: at least three ``##`` sections, none over 60 lines."""
    for page in sorted(DOCS.glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        if len(lines) <= 60:
            continue
        heads = [i for i, line in enumerate(lines) if re.match(r"#{1,4} ", line)]
        assert sum(lines[i].startswith("## ") for i in heads) >= 3, page.name
        bounds = heads + [len(lines)]
        assert max(b - a for a, b in zip(bounds, bounds[1:])) <= 60, page.name


def test_every_public_name_is_documented_and_nothing_private_is_listed():
    """The API reference: each public name (of seedreg and seedreg.magic) and each public method
    or property of a public class has a docstring; constants too (read as mkdocstrings reads
    them); no private name, no ``__all__`` and no private value is generated into the page."""
    import ast
    import inspect

    import seedreg.magic as magic

    missing = []
    for module, names in ((seedreg, seedreg.__all__), (magic, magic.__all__)):
        for name in names:
            if name == "__version__":
                continue
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                members = [(name, obj)] + [
                    (f"{name}.{m}", getattr(v, "__func__", v)) for m, v in vars(obj).items() if not m.startswith("_")
                    and (inspect.isfunction(getattr(v, "__func__", v)) or isinstance(v, property))
                ] if inspect.isclass(obj) else [(name, obj)]
                missing += [f"{module.__name__}.{n}" for n, o in members if not (inspect.getdoc(o) or "").strip()]
    for path in ("seedreg.derive.SCHEMES", "seedreg.magic.checkpoints.SCHEDULES"):  # a string right after the assignment
        where, attribute = path.rsplit(".", 1)
        body = ast.parse((ROOT / (where.replace(".", "/") + ".py")).read_text(encoding="utf-8")).body
        at = next(i for i, node in enumerate(body) if isinstance(node, (ast.Assign, ast.AnnAssign))
                  and attribute in [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])])
        after = body[at + 1] if at + 1 < len(body) else None
        if not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            missing.append(path)
    assert missing == []
    api = _hooks()._api()
    assert "__all__" not in api and "._" not in api
    assert "show_attribute_values: false" in api.split("SCHEMES", 1)[1].split(":::", 1)[0]
