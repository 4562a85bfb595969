"""The report in a real headless browser (Debian's chromium): the index and a page render from the
file system, every thumbnail loads, and the next-page link leads to the next page."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest

from ipa_ops.outputs.files import write_outputs
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.thumbs import write_thumbnail
from ipa_ops.report.build import build_report
from ipa_ops.report.pages import PAGE_ROWS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("chromium is not installed; .ci/run installs Debian's chromium for this test")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")


def _dom(url: str, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran (the thumbnail check runs on load)."""
    done = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def test_index_and_pages_render_with_thumbnails_and_paging(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    rows = []
    for i in range(PAGE_ROWS + 5):
        key = f"{i:040x}"
        image = np.full((48, 48, 3), i % 256, dtype=np.uint8)
        files = write_outputs(out, key, image)  # as the generate stage commits a row
        write_thumbnail(out, key, image)
        rows.append({"id": f"row-{i}", "row_key": key, "status": "ok", "outputs": files, "prompt": f"prompt {i}"})
    rows.append({"id": "bad", "row_key": "", "status": "error", "error": "row bad: seed: not an integer"})
    out.append_results(rows, name="part-20240101T000000000000Z-r0123456789ab-000000.parquet")
    index_url = Path(build_report(out.uri)).resolve().as_uri()

    index = _dom(index_url, tmp_path)
    assert "rows: 256" in index and "ok: 255" in index and "row bad: seed: not an integer" in index
    first_url = urljoin(index_url, re.search(r'href="(report/[^"]+/page-00001\.html)"', index)[1])

    first = _dom(first_url, tmp_path)
    assert f"thumbnails: {PAGE_ROWS} loaded, 0 missing" in first
    assert "prompt 0" in first and f"prompt {PAGE_ROWS - 1}" in first and f"prompt {PAGE_ROWS}<" not in first
    second_url = urljoin(first_url, re.search(r'<a href="([^"]+)" rel="next"', first)[1])

    second = _dom(second_url, tmp_path)
    assert "thumbnails: 5 loaded, 0 missing" in second and f"prompt {PAGE_ROWS}<" in second
    assert 'rel="next"' not in second and 'rel="prev"' in second
