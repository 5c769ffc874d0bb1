"""A griffe extension for the API reference: the docstrings' doctest examples (``>>>`` lines and
their output, up to the next blank line) shown as Python console code blocks."""

from __future__ import annotations

from typing import Any, List

import griffe


def fence_doctests(text: str) -> str:
    """`text` with each doctest block wrapped in a ```pycon fence."""
    out: List[str] = []
    block: List[str] = []
    indent = ""
    for line in text.splitlines() + [""]:
        if block:
            if line.strip():
                block.append(line[len(indent):] if line.startswith(indent) else line.strip())
                continue
            out += [f"{indent}```pycon", *(indent + b for b in block), f"{indent}```"]
            block = []
        if line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            block = [line.lstrip()]
            continue
        out.append(line)
    return "\n".join(out).rstrip("\n")


class DoctestFences(griffe.Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
