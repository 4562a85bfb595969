"""The report: an index (counts, failed rows, runs, pages) plus pages of rows that link thumbnail
files; pages are rebuilt only for the results groups that changed; text is escaped everywhere."""

from __future__ import annotations

import html
import io
import re
from pathlib import Path

import pandas as pd
from PIL import Image

from ipa_ops.cli import main
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.results_writer import group_parts
from ipa_ops.outputs.thumbs import thumb_path
from ipa_ops.report.build import build_report
from ipa_ops.report.pages import PAGE_ROWS

PROMPTS = {"a": 'a <script>alert("x")</script> cat', "b": "fish & chips", "c": "a 'looping' <gif>"}


def _png(path: Path, color: tuple[int, int, int]) -> str:
    Image.new("RGB", (32, 32), color).save(path)
    return str(path)


def _gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _result(rid: str, key: str, status: str, outputs: list[str], when: str, **extra: object) -> dict:
    row = {"id": rid, "row_key": key, "status": status, "outputs": outputs, "seed": 3, "finished_at": when}
    return row | {"error": "" if status == "ok" else f"row {rid}: adapters[0]: <bad> & worse", **extra}


def _output_dir(tmp_path: Path) -> OutputDir:
    """Two parts written before run tags (one day each): an error row, then its retry and a GIF row."""
    out = OutputDir(str(tmp_path / "out"))
    ref = _png(tmp_path / "ref.png", (0, 200, 0))
    mask = _png(tmp_path / "mask.png", (255, 255, 255))
    png = out.image_path("aa" * 10)
    out.write_bytes_atomic(png, lambda f: Image.new("RGB", (64, 64), (9, 9, 9)).save(f, format="PNG"))
    gif = out.path("images", f"{'bb' * 10}.gif")  # a row written in the old flat layout: still shown
    out.write_bytes_atomic(gif, _gif())
    shared = {"references": [ref, "ab" * 32 + "/vit-h@1"], "masks": [mask], "scale": '{"preset": "style"}'}
    out.append_results(
        [
            _result("a", "aa" * 10, "error", [], "2024-01-01T00:00:00Z", prompt=PROMPTS["a"], **shared),
            _result("b", "cc" * 10, "error", [], "2024-01-01T00:00:00Z", prompt=PROMPTS["b"]),
        ],
        name="part-20240101T000000000000Z-0123456789ab.parquet",
    )
    out.append_results(
        [
            _result("a", "aa" * 10, "ok", [png], "2024-01-02T00:00:00Z", prompt=PROMPTS["a"], **shared),
            _result("c", "bb" * 10, "ok", [f"images/{'bb' * 10}.gif"], "2024-01-02T00:00:00Z", prompt=PROMPTS["c"]),
        ],
        name="part-20240102T000000000000Z-0123456789ac.parquet",
    )
    out.write_run_json({"flow": {"name": "demo<1>"}, "counts": {"ok": 2, "seconds": 1.5}})
    return out


def _pages(root: Path) -> list[Path]:
    return sorted((root / "report").glob("l*/page-*.html"))


def test_index_counts_latest_rows_and_lists_failures_first(tmp_path: Path) -> None:
    out = _output_dir(tmp_path)
    path = build_report(out.uri)
    assert path == f"{out.uri}/report.html"
    index = Path(path).read_text()
    assert "demo&lt;1&gt;" in index and "<span>rows: 3</span>" in index
    assert "<span>ok: 2</span>" in index and "<span>error: 1</span>" in index  # "a" counts by its latest row
    failed = index.split("Rows that failed", 1)[1].split("</table>", 1)[0]
    assert ">b<" in failed and ">a<" not in failed and "&lt;bad&gt; &amp; worse" in failed
    assert "<script>alert" not in index and "<bad>" not in index
    assert 'href="report/l20240101/page-00001.html"' in index and 'href="report/l20240102/page-00001.html"' in index
    assert "<img" not in index and "data:image" not in index  # no thumbnails on the index, nothing embedded


def test_pages_link_thumbnail_files_made_once(tmp_path: Path) -> None:
    out = _output_dir(tmp_path)
    build_report(out.uri)
    first, second = _pages(tmp_path / "out")
    page = second.read_text()
    for prompt in (PROMPTS["a"], PROMPTS["c"]):
        assert html.escape(prompt, quote=True) in page
    assert "<script>alert" not in page and "data:image" not in page
    line_a = next(r for r in re.findall(r"<tr><td>.*?</tr>", page) if r.startswith("<tr><td>a<"))
    thumb = Path(thumb_path(out, "aa" * 10))
    assert thumb.is_file() and Image.open(thumb).format == "WEBP" and max(Image.open(thumb).size) <= 256
    assert f'<a href="../../images/aa/{"aa" * 10}.png"><img src="../../thumbs/aa/{"aa" * 10}.webp"' in line_a
    assert line_a.count("<img") == 3  # reference, mask, output; the store key as text
    assert "ab" * 32 + "/vit-h@1" in line_a and html.escape('{"preset": "style"}') in line_a
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert (second.parent / src).resolve().is_file(), src
    assert f'href="../../images/{"bb" * 10}.gif"' in page and (tmp_path / "out" / "thumbs" / "bb").is_dir()
    made = thumb.stat().st_mtime_ns
    build_report(out.uri, groups=list(group_parts(out)))  # rebuilt pages reuse the thumbnails
    assert thumb.stat().st_mtime_ns == made
    assert "&lt;bad&gt; &amp; worse" in first.read_text()  # the first group's page shows its error rows


def test_only_changed_groups_are_rebuilt(tmp_path: Path) -> None:
    out = _output_dir(tmp_path)
    build_report(out.uri)
    first, second = _pages(tmp_path / "out")
    before = first.stat().st_mtime_ns, second.stat().st_mtime_ns
    build_report(out.uri)  # nothing changed: no page is rewritten
    assert (first.stat().st_mtime_ns, second.stat().st_mtime_ns) == before
    out.append_results(
        [_result("d", "dd" * 10, "error", [], "2024-01-02T01:00:00Z", prompt="late")],
        name="part-20240102T010000000000Z-0123456789ad.parquet",
    )
    build_report(out.uri)  # the second day's group changed: only its page is rebuilt
    assert first.stat().st_mtime_ns == before[0] and second.stat().st_mtime_ns != before[1]
    assert "late" in second.read_text()


def test_pages_hold_a_few_hundred_rows_and_link_in_order(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    n = PAGE_ROWS * 2 + 3
    rows = [_result(f"r{i}", f"{i:040x}", "error", [], "2024-01-01T00:00:00Z", prompt=f"p{i}") for i in range(n)]
    out.append_results(rows, name="part-20240101T000000000000Z-0123456789ab.parquet")
    build_report(out.uri)
    pages = _pages(tmp_path / "out")
    assert len(pages) == 3
    assert 'rel="next"' in pages[0].read_text() and 'rel="prev"' not in pages[0].read_text()
    assert 'rel="next"' not in pages[2].read_text() and 'href="page-00002.html" rel="prev"' in pages[2].read_text()
    assert sum(len(re.findall(r"<tr><td>", p.read_text())) for p in pages) == n


def test_missing_outputs_are_marked_and_manifest_fills(tmp_path: Path) -> None:
    out = _output_dir(tmp_path)
    Path(out.image_path("aa" * 10)).unlink()
    manifest = pd.DataFrame([{"id": "b", "prompt": "from the manifest", "adapters": None}])
    out.append_results(  # no prompt in results
        [_result("b", "cc" * 10, "error", [], "2024-01-03T00:00:00Z")],
        name="part-20240103T000000000000Z-0123456789ad.parquet",
    )
    build_report(out.uri, manifest)
    _, second, third = _pages(tmp_path / "out")
    assert f"missing: {out.image_path('aa' * 10)}" in second.read_text()
    assert "from the manifest" in third.read_text()


def test_scores_add_histograms_and_worst_first_pages(tmp_path: Path) -> None:
    out = _output_dir(tmp_path)
    scores = pd.DataFrame({"row_key": ["aa" * 10, "bb" * 10], "clip_t": [0.9, 0.1], "nsfw_max": [0.7, 0.2]})
    index = Path(build_report(out.uri, scores=scores)).read_text()
    assert "<svg" in index and "clip_t: n=2" in index
    worst = (tmp_path / "out" / "report" / "worst-clip_t" / "page-00001.html").read_text()
    assert worst.index(PROMPTS["c"].replace("'", "&#x27;").replace("<", "&lt;").replace(">", "&gt;")) < worst.index(
        "a &lt;script&gt;"
    )  # clip_t 0.1 (row c) before 0.9 (row a)
    nsfw = (tmp_path / "out" / "report" / "worst-nsfw_max" / "page-00001.html").read_text()
    assert nsfw.index("a &lt;script&gt;") < nsfw.index("looping")  # nsfw: the highest first


def test_report_command(tmp_path: Path) -> None:
    out = _output_dir(tmp_path)
    assert main(["report", out.uri]) == 0
    assert (tmp_path / "out" / "report.html").is_file() and len(_pages(tmp_path / "out")) == 2
    assert main(["report", out.uri, "--all"]) == 0
    assert main(["report", str(tmp_path / "nowhere")]) == 2
