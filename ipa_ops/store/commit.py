"""Concurrent extracts into one store: a short commit lease, and dropping rows stored meanwhile.

The store is shared by design: two extract runs (two flows, two hosts) may encode the same image
at once. Each holds `<store>/_commit.lease.json` (lease.py) only while it commits: it re-reads
the store's keys under the lease and drops the rows another run stored since it started, then
appends. Encoding stays parallel; a key is written once. Readers already prefer an ok row over
error rows, so an error row is only dropped when the same error is stored, or the key is ok.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ipa_ops.storage.lease import Lease
from ipa_ops.store.dataset import EmbeddingStore

COMMIT_LEASE = "_commit.lease.json"
COMMIT_TTL_S = 60.0  # a commit is one or a few part writes; a killed committer blocks the store this long at most


@contextlib.contextmanager
def commit_lease(store: EmbeddingStore) -> Iterator[None]:
    """Hold the store's commit lease (waiting for another committer) with the store's keys re-read."""
    lease = Lease(store.uri, "an extract commit", COMMIT_TTL_S, name=COMMIT_LEASE)
    lease.on_lost = lambda reason: None  # a commit is short: a lost commit lease only means a slow store
    lease.acquire(wait=True, poll_s=0.05, quiet=True)
    try:
        store.refresh(force=True)
        yield
    finally:
        lease.release()


def unstored(rows: list[dict[str, Any]], stored: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """The rows whose key is not stored yet (or stored only as a different error)."""
    keep = []
    for row in rows:
        status, error = stored.get(row["key"], ("", ""))
        if status in ("ok", "no_face") or (status == "error" and (row["status"] == "error" and row["error"] == error)):
            continue
        keep.append(row)
    return keep
