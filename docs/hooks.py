"""MkDocs hooks: pages made from the code at build time, so they cannot drift from it.

- ``index.md`` is the README (its links into ``docs/`` made relative to the site);
- ``cli.md`` gets the help of every ``seedreg`` subcommand from the argparse parser itself;
- ``api.md`` gets a reference entry for every name in ``seedreg.__all__``, from its docstring.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import importlib
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.sub(r"\]\(docs/", "](", text)


def _cli() -> str:
    from seedreg.cli import build_parser

    parser = build_parser()
    parser.prog = "seedreg"
    out = ["```text", parser.format_help().rstrip(), "```"]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        command.prog = f"seedreg {name}"
        out += ["", f"## seedreg {name}", "", "```text", command.format_help().rstrip(), "```"]
    return "\n".join(out) + "\n"


def _api() -> str:
    import seedreg

    out = []
    for name in seedreg.__all__:
        if name == "__version__":
            continue
        module = seedreg._WHERE.get(name)
        if module is not None:
            out += [f"::: seedreg.{module}.{name}", ""]
            if name == "SCHEMES":  # its value names private functions: the docstring says what it holds
                out[-1:] = ["    options:", "      show_attribute_values: false", ""]
        elif name in seedreg._SUBMODULES:
            members = importlib.import_module(f"seedreg.{name}").__all__  # the public names, not __all__ itself
            out += [f"::: seedreg.{name}", "    options:", f"      members: [{', '.join(members)}]", ""]
        elif name == "fingerprint":
            out += ["::: seedreg.fingerprint.fingerprint", ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    uri = page.file.src_uri
    if uri == "index.md":
        return _readme()
    if uri == "cli.md":
        return markdown.replace("<!-- generated: the parser's help -->", _cli())
    if uri == "api.md":
        return markdown.replace("<!-- generated: one entry per public name -->", _api())
    return markdown
