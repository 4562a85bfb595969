"""Reading a report back in tests: the index plus every page, as one text."""

from __future__ import annotations

from pathlib import Path


def report_text(output: Path) -> str:
    """`report.html` and all its pages, concatenated (pages are in report/<group>/page-*.html)."""
    pages = sorted((output / "report").glob("*/page-*.html"))
    return "\n".join(p.read_text() for p in [output / "report.html", *pages])
