"""The report of an output directory: `report.html` (an index) and pages of a few hundred rows.

    <output>/report.html                        counts per status, throughput, the rows that failed,
                                                the run ledger, score histograms, links to pages
    <output>/report/<group>/page-00001.html     one run's rows (its results group), 250 per page
    <output>/report/<group>/pages.json          what those pages were built from (rows, pages)
    <output>/report/worst-<score>/page-00001.html  the lowest-scoring rows first (when scored)

Everything opens from the file system with no server (relative links, thumbnail files from
outputs/thumbs.py). A run rebuilds only its own group's pages and the index, so a report costs the
rows a run added, not the folder's history; the index reads a few narrow results columns.
Imports outputs and manifest only; the generate stage and `ipa report` call `build_report`.
"""
