"""The flow: the YAML format (spec.py; the `models:` sections in models.py, the
`stages:` sections in stage_specs.py and score_spec.py, reference preparation in prep.py), where model sources
resolve (sources.py, the mirror), the scale-schedule format (schedules.py) and which encoders feed
which adapter (face_encoders.py).

Above only `errors` and `storage` (a lease's settings are a flow field): it imports nothing else
of ipa_ops, and every other package may import it.
"""
