"""Shared fixtures: the tiny zoo (built once per session), offline hub, embedded Ray."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network
os.environ.pop("IPA_MIRROR", None)


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny zoo; reuses IPA_TEST_ZOO when it points at a finished build (faster local runs)."""
    from ipa_ops.zoo import build_zoo

    cached = os.environ.get("IPA_TEST_ZOO")
    root = Path(cached) if cached else tmp_path_factory.mktemp("zoo")
    return Path(build_zoo(root, size="tiny"))  # without the scorer models: a cached zoo is read, never added to


@pytest.fixture(scope="session")
def scorer_zoo(zoo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny zoo plus the score stage's models: links to `zoo_dir`'s repositories next to the scorer
    repositories built here (a few seconds), so the cached zoo stays as it is."""
    from ipa_ops.zoo import SCORER_REPOS, build_zoo

    root = tmp_path_factory.mktemp("scorer-zoo")
    scorer_orgs = {r.path.split("/")[0] for r in SCORER_REPOS}
    for entry in zoo_dir.iterdir():
        if entry.name not in scorer_orgs and entry.name != ".zoo.lock" and not entry.name.startswith(".zoo-scorers-"):
            (root / entry.name).symlink_to(entry)
    return Path(build_zoo(root, size="tiny", scorers=True))


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One embedded Ray for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        # "local": a fresh instance, never the cluster a stale ray_current_cluster names (as `ipa run` does)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    yield


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for a module: tiny-zoo models are all per-op overhead, and on a shared
    machine a second thread that must wait for a core makes each op many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
