"""Cells no parser should see: nested too deep for a recursive parser, or text that is not Unicode.

`check_rows` asks `cell_problem` of every cell before decoding it, so a manifest cell of 100 000
`[` (or a JSON `\\ud800` escape) becomes one row problem instead of a RecursionError or a
UnicodeEncodeError from deep inside json, pydantic or pyarrow.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 32  # schedules and adapter lists need 4; Python's parsers overflow near 1000


def nesting(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deep a cell nests (containers, or brackets of JSON text), counted up to just past `limit`.

    Iterative, so a cell nested 100 000 deep is measured without the RecursionError that json.loads
    or any recursive check would raise on it.
    """
    if isinstance(value, str):
        depth = deepest = 0
        in_string = escaped = False
        for ch in value if value.lstrip()[:1] in ("[", "{") else "":
            if in_string:
                escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                in_string = True
            elif ch in "[{":
                depth += 1
                deepest = max(deepest, depth)
                if deepest > limit:
                    break
            elif ch in "]}":
                depth -= 1
        return deepest
    deepest, todo = 0, [(value, 1)]
    while todo and deepest <= limit:
        item, depth = todo.pop()
        if isinstance(item, str):  # JSON text inside a container (a scale written as text)
            deepest = max(deepest, depth - 1 + nesting(item, limit))
            continue
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list | tuple) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        todo += [(c, depth + 1) for c in children]
    return deepest


def cell_problem(value: Any) -> str | None:
    """What makes a cell unusable before any parser sees it: nesting too deep, or text that is not
    Unicode (a lone surrogate, which JSON's \\ud800 escapes can spell and no file name can hold)."""
    depth = nesting(value)
    if depth > MAX_DEPTH:
        return f"nested {depth}+ levels deep; a manifest cell holds at most {MAX_DEPTH} levels of JSON"
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "contains a lone surrogate (not valid Unicode); write the text as UTF-8"
        elif isinstance(item, dict):
            todo += [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple):
            todo += list(item)
    return None
