"""Safe operations on any fsspec storage: leases (one writer at a time) and quarantine (unreadable files moved aside).

The bottom layer with `errors`: the store, the outputs and the flow (a lease's settings) use it;
it imports nothing else of ipa_ops.
"""
