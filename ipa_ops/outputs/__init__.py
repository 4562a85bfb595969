"""The output folder: row keys, atomic commits, results parts and run.json (folder.py), results parts and their
buffered writer, compaction and done index (results_parts.py, results_writer.py, done_index.py), a row's
image / video files (files.py), the run ledger (ledger.py) and the report (report.py).

Imports the flow, the record format (records/: results columns, image metadata) and the manifest format
(the report shows rows as written); never the generator.
"""
