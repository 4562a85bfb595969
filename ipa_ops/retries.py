"""Transient object-store errors are retried with backoff wherever ipa reads or writes via fsspec.

A nightly run makes ~10^5 requests to object storage; a few 503 SlowDown replies, a reset
connection or a slow response are normal there and must not fail rows or runs. fsspec's S3 layer
already retries some read errors; ipa sets, as fsspec's per-protocol defaults (so a user's own
fsspec configuration, `FSSPEC_S3_*` variables or config files, still wins):

- S3 (s3fs over botocore): botocore's `standard` retry mode, `IPA_FS_RETRIES` attempts (default
  10) with exponential backoff and jitter, for 5xx replies, throttling, connection resets and
  timeouts; connect / read timeouts of 10 s / 60 s so a stalled connection is retried, not waited
  on; on top of that s3fs retries interrupted reads and client errors itself (5 times).
- GCS (gcsfs) and Azure (adlfs) retry transient errors in their own clients.

Commits stay all-or-nothing: every object ipa commits is one PUT of the whole bytes (an upload cut
half-way leaves no object, and its retry sends the whole body again), and local files are written
to a temp name and renamed.
"""

from __future__ import annotations

import os

import fsspec.config

RETRIES_ENV = "IPA_FS_RETRIES"


def configure() -> None:
    """Put ipa's retry defaults into fsspec's configuration (idempotent; the user's settings win)."""
    attempts = max(1, int(os.environ.get(RETRIES_ENV) or 10))
    s3 = fsspec.config.conf.setdefault("s3", {})
    client = s3.setdefault("config_kwargs", {})
    client.setdefault("retries", {"max_attempts": attempts, "mode": "standard"})
    client.setdefault("connect_timeout", 10)
    client.setdefault("read_timeout", 60)
