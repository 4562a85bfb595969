"""report.html: a contact sheet of an output directory that opens in a browser with no server.

One line per manifest id (its latest results row): references | mask | prompt | seed | scale |
status | output. Thumbnails are embedded as data URIs so the file can be mailed or archived alone;
each output also links to the full image next to it. Every text is escaped: prompts and errors are
user data.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import fsspec
import pandas as pd

from ipa_ops.manifest.reading import normalize_adapters, plain
from ipa_ops.manifest.rows import STORE_KEY
from ipa_ops.outputs.folder import OutputDir, latest

THUMB = 128  # px, references and masks
OUTPUT_THUMB = 256  # px, outputs
MAX_GIF = 4 << 20  # animated GIFs up to this size are embedded whole, larger ones linked
_FILL = ("prompt", "references", "masks", "scale")

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #ddd;padding:.4rem;vertical-align:top}
th{background:#f4f4f4;text-align:left}img{max-width:100%;display:block;margin-bottom:.2rem}
.ok{color:#176b2c}.error{color:#b00020}.skipped{color:#8a6d00}.key{font-family:monospace;font-size:.8em}
.prompt{max-width:24rem}.summary span{margin-right:1.5rem}
"""


def build_report(output_uri: str, manifest_df: pd.DataFrame | None = None) -> str:
    """(Re)write `<output>/report.html` from the results; the manifest fills columns results lack."""
    out = OutputDir(output_uri)
    results = out.read_results()
    rows = latest(results, "id").to_dict("records") if not results.empty else []
    known = _manifest_fields(manifest_df) if manifest_df is not None else {}
    for row in rows:
        for name, value in known.get(row.get("id"), {}).items():
            if _empty(row.get(name)):
                row[name] = value
    thumbs = _Thumbnails(out)
    body = "\n".join(_line(row, thumbs, out) for row in rows)
    page = _page(out, rows, len(results), body)
    return out.write_bytes_atomic(out.path("report.html"), page.encode("utf-8"))


def _manifest_fields(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """What the report shows, per manifest id, for results rows written without it."""
    found: dict[str, dict[str, Any]] = {}
    for record in df.to_dict("records"):
        entries, _ = normalize_adapters(record.get("adapters"))
        entries = [e for e in entries if isinstance(e, dict)]
        scales = [f"{e.get('adapter')}: {e.get('scale') or 'default'}" for e in entries]
        found[str(record.get("id"))] = {
            "prompt": plain(record.get("prompt")),
            "references": [u for e in entries for u in e.get("images") or []],
            "masks": [u for e in entries for u in e.get("masks") or []],
            "scale": "; ".join(scales),
        }
    return found


def _empty(value: Any) -> bool:
    value = plain(value)
    return value is None or (isinstance(value, str | list) and len(value) == 0)


class _Thumbnails:
    """Data-URI thumbnails, made once per file (references repeat across rows)."""

    def __init__(self, out: OutputDir):
        self.out = out
        self.cache: dict[tuple[str, int], str | None] = {}

    def __call__(self, uri: str, size: int) -> str | None:
        if (uri, size) not in self.cache:
            self.cache[(uri, size)] = self._make(uri, size)
        return self.cache[(uri, size)]

    @staticmethod
    def _make(uri: str, size: int) -> str | None:
        from PIL import Image

        try:
            with fsspec.open(uri, "rb") as f:
                raw = f.read()
            with Image.open(io.BytesIO(raw)) as img:
                if img.format == "GIF" and getattr(img, "is_animated", False) and len(raw) <= MAX_GIF:
                    return _data_uri(raw, "image/gif")
                img.thumbnail((size, size))
                buf = io.BytesIO()
                img.convert("RGBA" if "A" in img.getbands() else "RGB").save(buf, format="PNG")
        except (OSError, ValueError, Image.DecompressionBombError):
            return None  # missing or unreadable: shown as text
        return _data_uri(buf.getvalue(), "image/png")


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _esc(value: Any) -> str:
    value = plain(value)
    return "" if value is None else html.escape(str(value), quote=True)


def _images(uris: Any, thumbs: _Thumbnails) -> str:
    """Thumbnails of referenced files; store keys and unreadable files as text."""
    cells = []
    for uri in plain(uris) or []:
        src = None if STORE_KEY.match(uri) else thumbs(uri, THUMB)
        if src:
            cells.append(f'<img src="{src}" alt="{_esc(uri)}" title="{_esc(uri)}">')
        else:
            cells.append(f'<div class="key">{_esc(uri)}</div>')
    return "".join(cells)


def _outputs(row: dict[str, Any], thumbs: _Thumbnails, out: OutputDir) -> str:
    cells = []
    for entry in plain(row.get("outputs")) or []:
        rel = out.relative(entry)
        href = quote(rel) if rel is not None else _esc(entry)
        src = thumbs(out.resolve(entry), OUTPUT_THUMB)
        if src is None:
            cells.append(f'<div class="key">missing: {_esc(entry)}</div>')
        else:
            cells.append(f'<a href="{href}"><img src="{src}" alt="{_esc(rel or entry)}"></a>')
    return "".join(cells)


def _line(row: dict[str, Any], thumbs: _Thumbnails, out: OutputDir) -> str:
    status = str(plain(row.get("status")) or "")
    error = f"<div>{_esc(row.get('error'))}</div>" if not _empty(row.get("error")) else ""
    cells = [
        f'<td>{_esc(row.get("id"))}<div class="key">{_esc(row.get("row_key"))}</div></td>',
        f"<td>{_images(row.get('references'), thumbs)}</td>",
        f"<td>{_images(row.get('masks'), thumbs)}</td>",
        f'<td class="prompt">{_esc(row.get("prompt"))}</td>',
        f"<td>{_esc(row.get('seed'))}</td>",
        f'<td class="key">{_esc(row.get("scale"))}</td>',
        f'<td class="{_esc(status)}">{_esc(status)}{error}</td>',
        f"<td>{_outputs(row, thumbs, out)}</td>",
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def _page(out: OutputDir, rows: list[dict[str, Any]], attempts: int, body: str) -> str:
    counts = Counter(str(plain(r.get("status"))) for r in rows)
    run = out.read_run_json() or {}
    summary = [f"rows: {len(rows)}", *(f"{s}: {counts.get(s, 0)}" for s in ("ok", "error", "skipped"))]
    summary.append(f"results rows (all attempts): {attempts}")
    for key, value in (run.get("counts") or {}).items():
        if key not in ("ok", "error", "skipped", "rows"):
            summary.append(f"{key}: {value}")
    name = (run.get("flow") or {}).get("name") if isinstance(run.get("flow"), dict) else None
    title = f"ipa report: {name or out.uri}"
    head = "".join(f"<th>{h}</th>" for h in ("id", "references", "mask", "prompt", "seed", "scale", "status", "output"))
    table = f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n<h1>{_esc(title)}</h1>\n"
        f'<p class="summary">{"".join(f"<span>{_esc(s)}</span>" for s in summary)}</p>\n'
        f"<p>Generated {_esc(datetime.now(UTC).isoformat(timespec='seconds'))}</p>\n"
        f"{table if rows else '<p>No results yet.</p>'}\n</body></html>\n"
    )
