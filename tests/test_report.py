"""report.html: one escaped line per id (its latest row), thumbnails embedded, outputs linked."""

from __future__ import annotations

import html
import io
import re
from pathlib import Path

import pandas as pd
from PIL import Image

from ipa_ops.cli import main
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.report import build_report

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
        ]
    )
    out.append_results(
        [
            _result("a", "aa" * 10, "ok", [png], "2024-01-02T00:00:00Z", prompt=PROMPTS["a"], **shared),
            _result("c", "bb" * 10, "ok", [f"images/{'bb' * 10}.gif"], "2024-01-02T00:00:00Z", prompt=PROMPTS["c"]),
        ]
    )
    out.write_run_json({"flow": {"name": "demo<1>"}, "counts": {"ok": 2, "seconds": 1.5}})
    return out


def test_report_lines_escape_and_embed(tmp_path: Path) -> None:
    out = _output_dir(tmp_path)
    path = build_report(out.uri)
    assert path == f"{out.uri}/report.html"
    page = Path(path).read_text()
    rows = re.findall(r"<tr><td>.*?</tr>", page)
    assert len(rows) == 3  # one line per id: "a" shows only its latest (ok) row
    for prompt in PROMPTS.values():
        assert html.escape(prompt, quote=True) in page
    assert "<script>" not in page and "<bad>" not in page and "&lt;bad&gt; &amp; worse" in page
    line_a = next(r for r in rows if r.startswith("<tr><td>a<"))
    assert 'class="ok"' in line_a and "&lt;bad&gt;" not in line_a  # the earlier error row is not shown
    assert f'<a href="images/aa/{"aa" * 10}.png"><img src="data:image/png;base64,' in line_a  # fanned out
    assert line_a.count("<img") == 3  # reference thumbnail, mask thumbnail, output; the store key as text
    assert "ab" * 32 + "/vit-h@1" in line_a and html.escape('{"preset": "style"}') in line_a
    line_c = next(r for r in rows if r.startswith("<tr><td>c<"))
    assert f'<a href="images/{"bb" * 10}.gif"><img src="data:image/gif;base64,' in line_c
    assert "demo&lt;1&gt;" in page and "<span>ok: 2</span>" in page and "<span>error: 1</span>" in page


def test_report_marks_missing_outputs_and_fills_from_manifest(tmp_path: Path) -> None:
    out = _output_dir(tmp_path)
    Path(out.image_path("aa" * 10)).unlink()
    manifest = pd.DataFrame([{"id": "b", "prompt": "from the manifest", "adapters": None}])
    out.append_results([_result("b", "cc" * 10, "error", [], "2024-01-03T00:00:00Z")])  # no prompt in results
    page = Path(build_report(out.uri, manifest)).read_text()
    assert f"missing: {out.image_path('aa' * 10)}" in page
    assert "from the manifest" in page


def test_report_command(tmp_path: Path) -> None:
    out = _output_dir(tmp_path)
    assert main(["report", out.uri]) == 0
    assert (tmp_path / "out" / "report.html").is_file()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
