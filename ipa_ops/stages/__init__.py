"""Ray Data stages: the only modules that touch Ray Data."""

from __future__ import annotations


def gpus_per_actor(requested: float) -> float:
    """The GPUs an actor asks for: as configured, or 0 where the Ray cluster has no GPU at all.

    The same flow then runs unchanged on a GPU cluster and on a laptop against the zoo.
    """
    import ray

    if requested > 0 and not ray.cluster_resources().get("GPU", 0):
        return 0.0
    return requested
