"""The manifest: one row per output. Row schema (rows.py), reading CSV / JSONL / Parquet and
column coercion (reading.py), per-row checks against a flow (checks.py), cartesian sweeps (sweep.py).

Imports the flow format only; knows nothing of models, the store or outputs.
"""
