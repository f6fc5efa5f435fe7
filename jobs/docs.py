"""`python -m jobs.docs`: write the option tables of the package READMEs from the code.

Each table lists a configuration dataclass's fields with their defaults and the docstring under
each field (read from the class's source, its base classes' first), so the documentation cannot
drift from the code. A README holds a table between two markers:

    <!-- options: pipeline.config.RoutingConfig -->
    ...the generated table...
    <!-- /options -->

`python -m jobs.docs` rewrites every such table in place; `python -m jobs.docs --check` exits 1
naming the READMEs whose tables differ from the code (the test suite runs that check).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READMES = ("actors/README.md", "pipeline/README.md")
"""The files whose tables this module writes."""
MARKER = re.compile(r"(<!-- options: (?P<name>[\w.]+) -->\n)(?P<body>.*?)(<!-- /options -->)", re.S)


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it, for `cls` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`" if not isinstance(value, list) else f"`{value}`".replace("'", "")


def table(cls: type) -> str:
    """The Markdown table of `cls`'s fields: key, default, what it does."""
    docs = field_docs(cls)
    section = getattr(cls, "section", None)
    lines = ["| key | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        key = f"{section}.{f.name}" if section else f.name
        text = " ".join(docs.get(f.name, "").split()).replace("|", "\\|")
        lines.append(f"| `{key}` | {_default(f)} | {text} |")
    return "\n".join(lines) + "\n"


def _resolve(name: str) -> type:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def render(text: str) -> str:
    """`text` (a README) with every marked table generated again."""
    return MARKER.sub(lambda m: m.group(1) + table(_resolve(m.group("name"))) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say which READMEs differ (exit 1 if any)")
    args = parser.parse_args(argv)
    stale = []
    for name in READMES:
        path = ROOT / name
        old = path.read_text()
        new = render(old)
        if new != old:
            stale.append(name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"option tables differ from the code in {', '.join(stale)}: run python -m jobs.docs", file=sys.stderr)
        return 1
    print(("stale: " if args.check else "wrote: ") + (", ".join(stale) or "nothing to change"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
