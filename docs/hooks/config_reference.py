"""MkDocs hook: the configuration reference, generated at build time from the typed schema.

``docs/reference/configuration.md`` holds the marker ``<!-- config-reference -->``; this hook replaces it
with one table per config node, built from :func:`distill_runner.spec.reference` (every key's path, type,
default, check, help and the cached artefacts it affects), then the recipe's own keys and each shipped loss
term's keys, read from their signatures. No key is written by hand, so the page cannot drift from the code.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

MARKER = "<!-- config-reference -->"
PAGE = "reference/configuration.md"
TOP = "top level"


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value) -> str:
    return f"`{_cell(value)}`" if value not in (None, "") else ""


def _affects(flag) -> str:
    if flag is None:
        return ""
    names = [member.name for member in type(flag) if member in flag]
    return ", ".join(n.lower() for n in names)


def _section(path: str) -> str:
    return path.split(".", 1)[0] if "." in path else TOP


def key_tables(keys: Iterable) -> str:
    """Markdown: one table per top-level node (``dataset``, ``trainer``, ...), keys in declaration order."""
    sections: dict[str, list] = {}
    for k in keys:
        sections.setdefault(_section(k.path), []).append(k)
    out = []
    for name, rows in sections.items():
        out += [f"### `{name}`" if name != TOP else "### Top-level keys", ""]
        out += ["| key | type | default | check | what it is | affects |", "|---|---|---|---|---|---|"]
        for k in rows:
            kind = "node" if k.node else _code(k.type)
            default = "" if k.node else _code(k.default)
            cells = [f"`{_cell(k.path)}`", kind, default, _cell(k.check), _cell(k.help), _affects(k.affects)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _parameters(cls) -> list[tuple[str, str]]:
    params = inspect.signature(cls.__init__).parameters.values()
    found = []
    for p in params:
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = "(required)" if p.default is p.empty else repr(p.default)
        found.append((p.name, default))
    return found


def recipe_tables() -> str:
    """Markdown: the recipe's keys (``distill.<key>``) and each shipped term's (``distill.terms.<name>.<key>``)."""
    from distill_runner.distill import Recipe, terms

    out = ["### `distill` (the recipe's own keys)", "", "| key | default |", "|---|---|"]
    out += [f"| `distill.{name}` | `{_cell(default)}` |" for name, default in _parameters(Recipe)]
    out += ["", "### Loss terms (`distill.terms.<name>.<key>`)", ""]
    out += ["| term (`_target_`) | keys (default) | what it is |", "|---|---|---|"]
    for name in sorted(terms.__all__):
        cls = getattr(terms, name)
        keys = ", ".join(f"`{p}` ({_cell(d)})" for p, d in _parameters(cls)) or "none"
        summary = (inspect.getdoc(cls) or "").split("\n\n", 1)[0]
        out.append(f"| `distill_runner.distill.terms.{name}` | {keys} | {_cell(summary)} |")
    out.append("")
    return "\n".join(out)


def render() -> str:
    from distill_runner import spec

    return key_tables(spec.reference()) + "\n" + recipe_tables()


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE}: the marker {MARKER} is missing; the generated reference has nowhere to go")
    return markdown.replace(MARKER, render())
