"""Pages of rows: one results group (a run) at a time, `PAGE_ROWS` rows a page, linked in order.

A page links thumbnails and images as files relative to itself; a reference that is a store key is
shown as text. Rows are rendered as written to results (every attempt of the run), filled from the
manifest where older results lack prompts and references.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from ipa_ops.manifest.reading import plain
from ipa_ops.manifest.rows import STORE_KEY
from ipa_ops.outputs.folder import KEY, OutputDir
from ipa_ops.outputs.thumbs import (
    OUTPUT_SIZE,
    REFERENCE_SIZE,
    ensure_thumbnail,
    reference_thumb_path,
    thumb_path,
)
from ipa_ops.report.html import document, empty, esc, table

PAGE_ROWS = 250
REPORT_DIR = "report"
HEADERS = ("id", "references", "mask", "prompt", "seed", "scale", "status", "output")


def page_name(index: int) -> str:
    return f"page-{index + 1:05d}.html"


def write_pages(
    out: OutputDir,
    folder: str,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    score_columns: Sequence[str] = (),
) -> list[str]:
    """Write `rows` as pages under `<output>/report/<folder>/`; returns the pages' paths."""
    chunks = [rows[i : i + PAGE_ROWS] for i in range(0, len(rows), PAGE_ROWS)] or [[]]
    refs = _ReferenceThumbs(out)
    written = []
    for index, chunk in enumerate(chunks):
        lines = [_line(row, out, refs, score_columns) for row in chunk]
        nav = _nav(index, len(chunks))
        first = index * PAGE_ROWS + 1
        body = (
            f"{nav}\n<p>rows {first}-{first + len(chunk) - 1} of {len(rows)}</p>\n"
            f"{table((*HEADERS, *score_columns), lines)}\n{nav}"
        )
        page = document(f"{title} - page {index + 1} of {len(chunks)}", body)
        path = out.path(REPORT_DIR, folder, page_name(index))
        written.append(out.write_bytes_atomic(path, page.encode("utf-8")))
    return written


def _nav(index: int, pages: int) -> str:
    links = ['<a href="../../report.html" rel="index">index</a>']
    if index > 0:
        links.append(f'<a href="{page_name(index - 1)}" rel="prev">previous page</a>')
    if index + 1 < pages:
        links.append(f'<a href="{page_name(index + 1)}" rel="next">next page</a>')
    return "<nav>" + "".join(links) + "</nav>"


def _from_page(out: OutputDir, uri: str) -> str | None:
    """`uri` as a link relative to a page in report/<folder>/; None when it is outside the output."""
    rel = out.relative(uri)
    return None if rel is None else "../../" + quote(rel)


class _ReferenceThumbs:
    """Reference and mask thumbnails, made once per file (references repeat across rows and runs)."""

    def __init__(self, out: OutputDir):
        self.out = out
        self.known: dict[str, bool] = {}

    def __call__(self, uri: str) -> str | None:
        target = reference_thumb_path(self.out, uri)
        if uri not in self.known:
            self.known[uri] = ensure_thumbnail(self.out, target, uri, REFERENCE_SIZE)
        return _from_page(self.out, target) if self.known[uri] else None


def _images(uris: Any, refs: _ReferenceThumbs) -> str:
    cells = []
    for uri in plain(uris) or []:
        src = None if STORE_KEY.match(uri) else refs(uri)
        if src:
            cells.append(f'<img src="{src}" alt="{esc(uri)}" title="{esc(uri)}" loading="lazy">')
        else:
            cells.append(f'<div class="key">{esc(uri)}</div>')
    return "".join(cells)


def _outputs(row: Mapping[str, Any], out: OutputDir) -> str:
    entries = [str(e) for e in plain(row.get("outputs")) or []]
    if not entries:
        return ""
    key = str(row.get("row_key") or "")
    first = out.resolve(entries[0])
    href = _from_page(out, first) or esc(first)
    thumb = thumb_path(out, key) if KEY.match(key) else None
    if thumb is None or not ensure_thumbnail(out, thumb, first, OUTPUT_SIZE):
        return f'<div class="key">missing: {esc(first)}</div>'
    frames = f'<div class="key">+{len(entries) - 1} frames</div>' if len(entries) > 1 else ""
    name = posixpath.basename(first)
    return f'<a href="{href}"><img src="{_from_page(out, thumb)}" alt="{esc(name)}" loading="lazy"></a>{frames}'


def _line(row: Mapping[str, Any], out: OutputDir, refs: _ReferenceThumbs, score_columns: Sequence[str]) -> str:
    status = str(plain(row.get("status")) or "")
    error = f"<div>{esc(row.get('error'))}</div>" if not empty(row.get("error")) else ""
    cells = [
        f'<td>{esc(row.get("id"))}<div class="key">{esc(row.get("row_key"))}</div></td>',
        f"<td>{_images(row.get('references'), refs)}</td>",
        f"<td>{_images(row.get('masks'), refs)}</td>",
        f'<td class="prompt">{esc(row.get("prompt"))}</td>',
        f"<td>{esc(row.get('seed'))}</td>",
        f'<td class="key">{esc(row.get("scale"))}</td>',
        f'<td class="{esc(status)}">{esc(status)}{error}</td>',
        f"<td>{_outputs(row, out)}</td>",
        *(f"<td>{esc(_number(row.get(c)))}</td>" for c in score_columns),
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def _number(value: Any) -> Any:
    value = plain(value)
    return f"{value:.4g}" if isinstance(value, float) else value


def read_marker(out: OutputDir, folder: str) -> dict[str, Any] | None:
    path = out.path(REPORT_DIR, folder, "pages.json")
    if not out.exists(path):
        return None
    try:
        return json.loads(out.read_bytes(path))
    except (OSError, ValueError):
        return None  # unreadable: the group's pages are simply rebuilt


def write_marker(out: OutputDir, folder: str, data: Mapping[str, Any]) -> str:
    text = json.dumps(dict(data), indent=2, sort_keys=True, default=str) + "\n"
    return out.write_bytes_atomic(out.path(REPORT_DIR, folder, "pages.json"), text.encode())
