"""Ray Data stages: the only modules that touch Ray Data."""

from __future__ import annotations

from typing import Any


def gpus_per_actor(requested: float) -> float:
    """The GPUs an actor asks for: as configured, or 0 where the Ray cluster has no GPU at all.

    The same flow then runs unchanged on a GPU cluster and on a laptop against the zoo.
    """
    import ray

    if requested > 0 and not ray.cluster_resources().get("GPU", 0):
        return 0.0
    return requested


def custom_resources(resources: dict[str, float]) -> dict[str, Any]:
    """`map_batches` arguments that pin a pool's actors to the nodes advertising `resources` (none when empty)."""
    return {"resources": dict(resources)} if resources else {}
