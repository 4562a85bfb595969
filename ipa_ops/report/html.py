"""HTML pieces shared by the index and the pages: escaping, the document frame, histograms.

Every text is escaped: prompts, ids and errors are user data.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from ipa_ops.manifest.reading import plain

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #ddd;padding:.4rem;vertical-align:top}
th{background:#f4f4f4;text-align:left}img{max-width:100%;display:block;margin-bottom:.2rem}
.ok{color:#176b2c}.error{color:#b00020}.skipped{color:#8a6d00}.key{font-family:monospace;font-size:.8em}
.prompt{max-width:24rem}.summary span{margin-right:1.5rem}nav a{margin-right:1rem}
img.broken{outline:2px dashed #b00020;min-height:2rem}.hist{display:inline-block;margin:0 1.5rem 1rem 0}
"""

# Counts the thumbnails that loaded and marks the ones that did not (a moved or deleted file).
SCRIPT = """
window.addEventListener("load", function () {
  var ok = 0, missing = 0;
  Array.prototype.forEach.call(document.images, function (img) {
    if (img.complete && img.naturalWidth > 0) { ok += 1; } else { missing += 1; img.classList.add("broken"); }
  });
  var el = document.getElementById("thumbs-status");
  if (el) { el.textContent = "thumbnails: " + ok + " loaded, " + missing + " missing"; }
});
"""


def esc(value: Any) -> str:
    value = plain(value)
    return "" if value is None else html.escape(str(value), quote=True)


def empty(value: Any) -> bool:
    value = plain(value)
    return value is None or (isinstance(value, str | list) and len(value) == 0)


def document(title: str, body: str) -> str:
    """A whole HTML page with the shared style and the thumbnail check."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body>\n<h1>{esc(title)}</h1>\n{body}\n"
        f'<p id="thumbs-status"></p><script>{SCRIPT}</script>\n</body></html>\n'
    )


def table(headers: Sequence[str], rows: Sequence[str]) -> str:
    """A table of pre-rendered `<tr>` rows under escaped headers."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>"


def histogram(name: str, values: Sequence[float], bins: int = 20, width: int = 240, height: int = 60) -> str:
    """An inline SVG histogram of the finite `values` (no library, no script, opens anywhere)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    span = (hi - lo) or 1.0
    counts = [0] * bins
    for v in finite:
        counts[min(bins - 1, int((v - lo) / span * bins))] += 1
    top = max(counts)
    bar = width / bins
    rects = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - c / top * height:.1f}" width="{bar - 1:.1f}" '
        f'height="{c / top * height:.1f}" fill="#4a78b5"><title>{c}</title></rect>'
        for i, c in enumerate(counts)
        if c
    )
    caption = f"{esc(name)}: n={len(finite)} min={lo:.4g} max={hi:.4g}"
    return (
        f'<figure class="hist"><svg width="{width}" height="{height}" role="img" aria-label="{esc(name)}">'
        f"{rects}</svg><figcaption>{caption}</figcaption></figure>"
    )
