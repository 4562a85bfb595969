"""Which Ray a run uses: embedded means a fresh local instance; a named address must answer.

Ray's `ray.init()` without an address joins whatever `ray_current_cluster` in Ray's temp folder
names (the last `ray start --head` on the machine), alive or dead: a dead one makes it retry for
minutes (`Failed to connect to GCS at ...`), a live one is joined silently. A flow that says
`ray: {address: null}` means "embedded", so it asks Ray for that explicitly (`address="local"`).
Inside a submitted Ray job the driver keeps joining the job's own cluster (RAY_ADDRESS, or Ray's
job environment), as before. A named address is probed with a plain TCP connect first, so a
cluster that is not there fails in seconds with one line instead of a long GCS retry loop.
"""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlsplit

from ipa_ops.errors import UserError

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray sets it in the driver of a submitted job
PROBE_SECONDS = 3.0  # how long a named address may take to accept a connection (one that is starting)


class RayUnreachable(UserError):
    """A named Ray address where nothing accepts a connection."""


def init_address(flow_address: str | None) -> str | None:
    """What to pass to `ray.init(address=...)`: the flow's or RAY_ADDRESS (probed), else "local".

    None (Ray's own discovery) only inside a submitted job, whose driver must join its cluster.
    """
    env = os.environ.get("RAY_ADDRESS", "").strip()
    address = (flow_address or "").strip() or env
    if address:
        if address != "auto":  # "auto" asks Ray to discover a cluster: nothing to probe
            probe(address, "ray.address" if (flow_address or "").strip() else "RAY_ADDRESS")
        return address
    if os.environ.get(JOB_ENV):
        return None
    return "local"


def probe(address: str, source: str = "ray.address", seconds: float = PROBE_SECONDS) -> None:
    """Raise RayUnreachable (one line naming the address) unless host:port accepts a TCP connection."""
    host, port = _host_port(address)
    if port is None:  # a form this probe cannot read: let Ray try it
        return
    deadline = time.monotonic() + seconds
    reason = "no answer"
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, seconds)):
                return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    raise RayUnreachable(
        f"{source} {address}: no Ray cluster answers at {host}:{port} ({reason}); start it, fix the address, "
        "or set ray.address: null (and unset RAY_ADDRESS) for an embedded local Ray"
    )


def _host_port(address: str) -> tuple[str, int | None]:
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        port = parts.port
    except ValueError:
        return address, None
    if not parts.hostname or port is None:
        return address, None
    return parts.hostname, port


def ensure_ray(address: str | None) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start an embedded Ray; True when this call started one."""
    import ray

    if ray.is_initialized():
        return False
    address = init_address(address)  # "local" when embedded: never a stale ray_current_cluster
    if address != "local":
        ray.init(address=address)
    else:  # workers must import ipa_ops even when it runs from a source checkout, not an install
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    return True
