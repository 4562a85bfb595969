"""`build_report`: the pages of the groups that changed, then the index over everything.

The index reads five narrow results columns (id, row_key, status, finished_at, error), the run
ledger and the pages' markers; pages are rebuilt only for the groups asked for (a run passes its
own) or, from `ipa report`, for groups whose parts changed since their pages were made.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from ipa_ops.manifest.reading import normalize_adapters, plain
from ipa_ops.outputs.folder import OutputDir, latest
from ipa_ops.outputs.ledger import read_ledger
from ipa_ops.outputs.results_writer import group_parts, read_group
from ipa_ops.outputs.scores import scores_table
from ipa_ops.report.html import document, esc, histogram, table
from ipa_ops.report.pages import PAGE_ROWS, page_name, read_marker, write_marker, write_pages

INDEX_COLUMNS = ["id", "row_key", "status", "finished_at", "error"]
PAGE_COLUMNS = [*INDEX_COLUMNS, "outputs", "seed", "prompt", "references", "masks", "scale"]  # what a page shows
MAX_ERRORS = 500  # failed rows listed on the index; the rest are on their run's pages
MAX_RUNS = 50  # latest ledger records on the index
WORST_ROWS = 2 * PAGE_ROWS  # rows on each "worst first" list of a score
HIGH_IS_BAD = ("nsfw", "no_face")  # scores sorted highest first (the others lowest first)
_FILL = ("prompt", "references", "masks", "scale")


def build_report(
    output_uri: str,
    manifest_df: pd.DataFrame | None = None,
    groups: Iterable[str] | None = None,
    scores: pd.DataFrame | None = None,
) -> str:
    """(Re)write `<output>/report.html` and the pages of `groups` (default: those that changed).

    `manifest_df` fills prompts and references older results lack (then every group is rebuilt);
    `scores` (row_key plus one numeric column per score; default: the output's own, `scores_table`)
    adds columns, histograms and worst-first lists.
    """
    out = OutputDir(output_uri)
    if scores is None:
        scores = scores_table(out)
    parts = group_parts(out)
    known = _manifest_fields(manifest_df) if manifest_df is not None else {}
    if groups is None:
        wanted = [g for g, paths in parts.items() if known or _stale(out, g, paths)]
    else:
        wanted = [g for g in groups if g in parts]
    score_columns = _score_columns(scores)
    title = _title(out)
    for group in wanted:
        table_, _ = read_group(out, parts[group])
        if table_ is None:
            continue
        rows = _with_scores(_filled(table_.to_pandas().to_dict("records"), known), scores)
        pages = write_pages(out, group, f"{title} - {group}", rows, score_columns)
        write_marker(out, group, _marker(group, parts[group], rows, len(pages)))
    worst = _worst_lists(out, scores, score_columns, known, title) if score_columns else {}
    markers = [m for m in (read_marker(out, g) for g in parts) if m is not None]
    page = _index(out, title, markers, scores, worst)
    return out.write_bytes_atomic(out.path("report.html"), page.encode("utf-8"))


def _stale(out: OutputDir, group: str, paths: list[str]) -> bool:
    marker = read_marker(out, group)
    return marker is None or marker.get("parts") != [posixpath.basename(p) for p in paths]


def _marker(group: str, paths: list[str], rows: list[dict[str, Any]], pages: int) -> dict[str, Any]:
    finished = [r["finished_at"] for r in rows if not pd.isna(r.get("finished_at"))]
    return {
        "group": group,
        "parts": [posixpath.basename(p) for p in paths],
        "rows": len(rows),
        "pages": pages,
        "counts": dict(Counter(str(plain(r.get("status"))) for r in rows)),
        "first_finished": min(finished).isoformat() if finished else None,
        "last_finished": max(finished).isoformat() if finished else None,
    }


def _title(out: OutputDir) -> str:
    run = out.read_run_json() or {}
    flow = run.get("flow")
    name = flow.get("name") if isinstance(flow, dict) else None
    return f"ipa report: {name or out.uri}"


def _manifest_fields(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """What the pages show, per manifest id, for results rows written without it."""
    found: dict[str, dict[str, Any]] = {}
    for record in df.to_dict("records"):
        entries, _ = normalize_adapters(record.get("adapters"))
        entries = [e for e in entries if isinstance(e, dict)]
        found[str(record.get("id"))] = {
            "prompt": plain(record.get("prompt")),
            "references": [u for e in entries for u in e.get("images") or []],
            "masks": [u for e in entries for u in e.get("masks") or []],
            "scale": "; ".join(f"{e.get('adapter')}: {e.get('scale') or 'default'}" for e in entries),
        }
    return found


def _filled(rows: list[dict[str, Any]], known: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        for name, value in known.get(str(row.get("id")), {}).items():
            current = plain(row.get(name))
            if name in _FILL and (current is None or (isinstance(current, str | list) and not current)):
                row[name] = value
    return rows


def _score_columns(scores: pd.DataFrame | None) -> list[str]:
    if scores is None or scores.empty:
        return []
    return [c for c in scores.columns if c != "row_key" and pd.api.types.is_numeric_dtype(scores[c])]


def _with_scores(rows: list[dict[str, Any]], scores: pd.DataFrame | None) -> list[dict[str, Any]]:
    if scores is None or scores.empty:
        return rows
    extra = scores.drop(columns=[c for c in ("id",) if c in scores.columns])
    by_key = extra.drop_duplicates("row_key", keep="last").set_index("row_key").to_dict("index")
    for row in rows:
        row.update(by_key.get(row.get("row_key"), {}))
    return rows


def _worst_lists(
    out: OutputDir, scores: pd.DataFrame, columns: list[str], known: Mapping[str, Any], title: str
) -> dict[str, str]:
    """For each score, a page list of the worst rows first; returns score -> link from the index."""
    latest_rows = latest(out.read_results(columns=PAGE_COLUMNS), "row_key")
    extra = scores.drop(columns=[c for c in ("id",) if c in scores.columns]).drop_duplicates("row_key", keep="last")
    merged = latest_rows.merge(extra, on="row_key", how="inner")
    links = {}
    for column in columns:
        ranked = merged.dropna(subset=[column]).sort_values(column, ascending=not column.startswith(HIGH_IS_BAD))
        rows = _filled(ranked.head(WORST_ROWS).to_dict("records"), known)
        folder = f"worst-{column}"
        write_pages(out, folder, f"{title} - {column}, worst first", rows, columns)
        links[column] = f"report/{folder}/{page_name(0)}"
    return links


def _index(
    out: OutputDir, title: str, markers: list[dict[str, Any]], scores: pd.DataFrame | None, worst: dict[str, str]
) -> str:
    narrow = out.read_results(columns=INDEX_COLUMNS)
    rows = latest(narrow, "id") if not narrow.empty else narrow
    counts = Counter(rows["status"].astype(str)) if not rows.empty else Counter()
    run = out.read_run_json() or {}
    summary = [f"rows: {len(rows)}", *(f"{s}: {counts.get(s, 0)}" for s in ("ok", "error", "skipped"))]
    summary.append(f"results rows (all attempts): {len(narrow)}")
    for key, value in (run.get("counts") or {}).items():
        if key not in ("ok", "error", "skipped", "rows"):
            summary.append(f"{key}: {value}")
    sections = [
        f'<p class="summary">{"".join(f"<span>{esc(s)}</span>" for s in summary)}</p>',
        f"<p>Generated {esc(datetime.now(UTC).isoformat(timespec='seconds'))}</p>",
        _errors(rows),
        _scores(scores, worst),
        _runs(read_ledger(out.uri)),
        _pages(markers),
    ]
    return document(title, "\n".join(s for s in sections if s))


def _errors(rows: pd.DataFrame) -> str:
    if rows.empty:
        return "<p>No results yet.</p>"
    failed = rows[rows["status"] == "error"]
    if failed.empty:
        return ""
    lines = [
        f'<tr><td>{esc(r["id"])}</td><td class="key">{esc(r["row_key"])}</td>'
        f'<td class="error">{esc(r["error"])}</td></tr>'
        for r in failed.head(MAX_ERRORS).to_dict("records")
    ]
    more = f"<p>and {len(failed) - MAX_ERRORS} more on their runs' pages</p>" if len(failed) > MAX_ERRORS else ""
    listed = table(("id", "row key", "error"), lines)
    return f"<h2>Rows that failed (latest attempt): {len(failed)}</h2>\n{listed}{more}"


def _scores(scores: pd.DataFrame | None, worst: dict[str, str]) -> str:
    if not worst or scores is None:
        return ""
    figures = [
        f'{histogram(c, scores[c].tolist())}<a href="{esc(link)}">worst first</a>' for c, link in worst.items()
    ]
    return "<h2>Scores</h2>\n<div>" + "".join(f'<div class="hist">{f}</div>' for f in figures) + "</div>"


def _runs(records: list[dict[str, Any]]) -> str:
    if not records:
        return ""
    lines = []
    for record in records[-MAX_RUNS:][::-1]:
        counts = (record.get("counts") or {}).get("generate") or {}
        cells = (
            record.get("run_id"),
            record.get("status"),
            record.get("started_at"),
            record.get("seconds"),
            counts.get("ok"),
            counts.get("error"),
            counts.get("skipped"),
            counts.get("images_per_second"),
            record.get("error"),
        )
        lines.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    headers = ("run", "status", "started", "seconds", "ok", "error", "skipped", "images/s", "message")
    return f"<h2>Runs (latest {min(len(records), MAX_RUNS)} of {len(records)})</h2>\n{table(headers, lines)}"


def _pages(markers: list[dict[str, Any]]) -> str:
    if not markers:
        return ""
    lines = []
    for marker in sorted(markers, key=lambda m: str(m.get("first_finished"))):
        group = str(marker.get("group"))
        links = " ".join(
            f'<a href="report/{esc(group)}/{page_name(i)}">{i + 1}</a>' for i in range(int(marker.get("pages") or 0))
        )
        counts = ", ".join(f"{k}: {v}" for k, v in sorted((marker.get("counts") or {}).items()))
        cells = f"<td class='key'>{esc(group)}</td><td>{esc(marker.get('first_finished'))}</td>"
        lines.append(f"<tr>{cells}<td>{esc(marker.get('rows'))} ({esc(counts)})</td><td>{links}</td></tr>")
    return f"<h2>Pages</h2>\n{table(('results group', 'first finished', 'rows', 'pages'), lines)}"
