"""The zoo: an offline, deterministic *mirror* of the Hugging Face repositories ipa uses.

Hub id ``org/name`` lives at ``<root>/org/name/`` with the real on-disk layout and state-dict
keys, filled with seeded random weights (``sizes.py`` holds the tiny and full dimensions).
``build_zoo`` is cached and atomic: each repository is built in a hidden folder inside ``root``
and moved into place, and the marker ``<root>/.zoo-<size>.json`` is written last, so an
interrupted build is never mistaken for a finished one. A rebuild gives byte-identical files.

The score stage's models (``SCORER_REPOS``: OpenAI CLIP ViT-L/14, the safety checker, the
aesthetic head) are a second group with its own marker ``.zoo-scorers-<size>.json``: a zoo built
before they existed gains them without a rebuild of the rest, and ``build_zoo`` without ``scorers=True``
leaves such a zoo exactly as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .faces import PACK_DIR, draw_face, draw_faces, face_analysis_kwargs
from .sizes import FULL, TINY, Size, ZooSizes, get_sizes

__all__ = [
    "FULL",
    "REPOS",
    "SCORER_REPOS",
    "TINY",
    "ZOO_VERSION",
    "build_family_zoo",
    "build_zoo",
    "draw_face",
    "draw_faces",
    "face_analysis_kwargs",
    "is_built",
    "marker_path",
    "zoo_configs",
]

log = logging.getLogger(__name__)

ZOO_VERSION = 5  # bump whenever any builder's output changes


@dataclass(frozen=True)
class Repo:
    """One mirrored repository: its path under the root and the function that writes it."""

    path: str
    build: Callable[[Path, ZooSizes], None]


def _sd15(path: Path, sizes: ZooSizes) -> None:
    from .sd import build_sd15

    build_sd15(path, sizes)


def _sdxl(path: Path, sizes: ZooSizes) -> None:
    from .sd import build_sdxl

    build_sdxl(path, sizes)


def _ip_adapter(path: Path, sizes: ZooSizes) -> None:
    from .ip_adapters import build_ip_adapter_repo

    build_ip_adapter_repo(path, sizes)


def _laion(path: Path, sizes: ZooSizes) -> None:
    from .clip import build_clip_model

    build_clip_model(path, sizes, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


def _faceid(path: Path, sizes: ZooSizes) -> None:
    from .faceid import build_faceid_repo

    build_faceid_repo(path, sizes)


def _controlnet_sd15(path: Path, sizes: ZooSizes) -> None:
    from .controlnet import build_sd15_depth

    build_sd15_depth(path, sizes)


def _controlnet_sdxl(path: Path, sizes: ZooSizes) -> None:
    from .controlnet import build_sdxl_depth

    build_sdxl_depth(path, sizes)


def _motion_adapter(path: Path, sizes: ZooSizes) -> None:
    from .video import build_motion_adapter

    build_motion_adapter(path, sizes)


def _lcm_lora(path: Path, sizes: ZooSizes) -> None:
    from .lora import build_lcm_lora_sd15

    build_lcm_lora_sd15(path, sizes)


def _faces(path: Path, sizes: ZooSizes) -> None:
    from .face_graphs import build_face_pack

    build_face_pack(path)


# Later entries (ControlNet, MotionAdapter, LCM-LoRA, FaceID ...) are appended here.
REPOS: tuple[Repo, ...] = (
    Repo("stable-diffusion-v1-5/stable-diffusion-v1-5", _sd15),
    Repo("stabilityai/stable-diffusion-xl-base-1.0", _sdxl),
    Repo("h94/IP-Adapter", _ip_adapter),
    Repo("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", _laion),
    Repo(PACK_DIR, _faces),
    Repo("h94/IP-Adapter-FaceID", _faceid),
    Repo("lllyasviel/control_v11f1p_sd15_depth", _controlnet_sd15),
    Repo("diffusers/controlnet-depth-sdxl-1.0", _controlnet_sdxl),
    Repo("guoyww/animatediff-motion-adapter-v1-5-2", _motion_adapter),
    Repo("latent-consistency/lcm-lora-sdv1-5", _lcm_lora),
)


def _scorer_repo(builder: str) -> Callable[[Path, ZooSizes], None]:
    def build(path: Path, sizes: ZooSizes) -> None:
        from . import scorers

        getattr(scorers, builder)(path, sizes)

    return build


def _flux(path: Path, sizes: ZooSizes) -> None:
    from .flux import build_flux

    build_flux(path, sizes)


def _flux_schnell(path: Path, sizes: ZooSizes) -> None:
    from .flux import build_flux

    build_flux(path, sizes, schnell=True)


def _xlabs(path: Path, sizes: ZooSizes) -> None:
    from .flux import build_xlabs

    build_xlabs(path, sizes)


def _clip_l(path: Path, sizes: ZooSizes) -> None:
    from .flux import build_clip_l

    build_clip_l(path, sizes)


def _flux_canny(path: Path, sizes: ZooSizes) -> None:
    from .flux_controlnet import build_flux_canny

    build_flux_canny(path, sizes)


def _instantx(path: Path, sizes: ZooSizes) -> None:
    from .sd3 import build_instantx

    build_instantx(path, sizes)


def _sd35_canny(path: Path, sizes: ZooSizes) -> None:
    from .sd3_controlnet import build_sd35_canny

    build_sd35_canny(path, sizes)


def _sd35(path: Path, sizes: ZooSizes) -> None:
    from .sd3 import build_sd35

    build_sd35(path, sizes)


def _siglip(path: Path, sizes: ZooSizes) -> None:
    from .sd3 import build_siglip

    build_siglip(path, sizes)


# The transformer families' repositories: built on demand by `build_family_zoo`, each on its own,
# so adding one never invalidates (or rebuilds) a finished UNet zoo.
FAMILY_REPOS: dict[str, tuple[Repo, ...]] = {
    "flux": (
        Repo("black-forest-labs/FLUX.1-dev", _flux),
        Repo("black-forest-labs/FLUX.1-schnell", _flux_schnell),
        Repo("XLabs-AI/flux-ip-adapter", _xlabs),
        Repo("openai/clip-vit-large-patch14", _clip_l),
        Repo("InstantX/FLUX.1-dev-Controlnet-Canny", _flux_canny),
    ),
    "sd3": (
        Repo("stabilityai/stable-diffusion-3.5-large", _sd35),
        Repo("InstantX/SD3.5-Large-IP-Adapter", _instantx),
        Repo("google/siglip-so400m-patch14-384", _siglip),
        Repo("stabilityai/stable-diffusion-3.5-large-controlnet-canny", _sd35_canny),
    ),
}


def build_family_zoo(root: str | Path, families: tuple[str, ...] = tuple(FAMILY_REPOS), size: Size = "tiny") -> Path:
    """Add the missing repositories of `families` to `root` (idempotent; each built aside, then moved in).

    A repository counts as built when its marker `<root>/<repo>/.zoo-<size>-v<version>` exists.
    """
    sizes = get_sizes(size)
    root = Path(root).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    repos = [r for name in families for r in FAMILY_REPOS[name]]
    done = f".zoo-{size}-v{ZOO_VERSION}"
    if all((root / r.path / done).exists() for r in repos):
        return root
    with _locked(root), _isolated(single_thread=size != "full"):
        for repo in repos:
            dst = root / repo.path
            if (dst / done).exists():
                continue
            staging = root / f".zoo-build-{size}-{os.getpid()}" / repo.path
            shutil.rmtree(staging, ignore_errors=True)
            try:
                repo.build(staging, sizes)
                (staging / done).write_text("", encoding="utf-8")
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.exists():
                    shutil.rmtree(dst)
                os.replace(staging, dst)
            finally:
                shutil.rmtree(root / f".zoo-build-{size}-{os.getpid()}", ignore_errors=True)
    return root



SCORER_REPOS: tuple[Repo, ...] = (
    Repo("openai/clip-vit-large-patch14", _scorer_repo("build_clip_l")),
    Repo("CompVis/stable-diffusion-safety-checker", _scorer_repo("build_safety_checker")),
    Repo("christophschuhmann/improved-aesthetic-predictor", _scorer_repo("build_aesthetic")),
)
GROUPS = ("", "scorers-")  # marker prefixes: the generation repos, the score stage's


def _repos(group: str) -> tuple[Repo, ...]:
    return REPOS if group == "" else SCORER_REPOS  # looked up at call time (tests swap REPOS)


def marker_path(root: str | Path, size: str, group: str = "") -> Path:
    return Path(root) / f".zoo-{group}{size}.json"


def _marker(size: str, group: str = "") -> dict[str, Any]:
    return {"version": ZOO_VERSION, "size": size, "repos": [r.path for r in _repos(group)]}


def is_built(root: str | Path, size: str = "tiny", group: str = "") -> bool:
    """Whether ``root`` holds a finished zoo of ``size`` at the current version and repo list."""
    try:
        data = json.loads(marker_path(root, size, group).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return data == _marker(size, group)  # a new repo entry or version invalidates old builds


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise builders of one root (parallel test workers, several ``ipa demo``)."""
    with open(root / ".zoo.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _install(staging: Path, root: Path, repos: tuple[Repo, ...]) -> None:
    """Move each built repo over its old copy; the marker is written only after all moves."""
    for repo in repos:
        src, dst = staging / repo.path, root / repo.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(src, dst)


def build_zoo(root: str | Path, size: Size = "tiny", force: bool = False, scorers: bool = False) -> Path:
    """Fabricate the mirror at ``root`` (cached; ``force`` rebuilds) and return ``root``.

    ``scorers`` adds the score stage's models (``ipa zoo build`` does); without it a finished zoo
    is left exactly as it is.
    """
    sizes = get_sizes(size)
    root = Path(root).expanduser().absolute()
    groups = list(GROUPS) if scorers else [""]
    if not force and all(is_built(root, size, g) for g in groups):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        for group in groups:
            if force or not is_built(root, size, group):  # another process may have finished meanwhile
                _build_group(root, size, sizes, group)
    return root


def _build_group(root: Path, size: Size, sizes: ZooSizes, group: str) -> None:
    """Build one group of repos in a staging folder, move them in, then write the group's marker."""
    repos = _repos(group)
    for stale in root.glob(f".zoo-build-{group}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = root / f".zoo-build-{group}{size}-{os.getpid()}"
    started = time.perf_counter()
    try:
        with _isolated(single_thread=size == "tiny"):
            for repo in repos:
                t0 = time.perf_counter()
                repo.build(staging / repo.path, sizes)
                log.info("zoo %s: %s in %.1fs", size, repo.path, time.perf_counter() - t0)
        for old in root.glob(f".zoo-{group}*.json"):  # repos are about to change size: the group's markers go
            if group or not old.name.startswith(".zoo-scorers-"):
                old.unlink()
        _install(staging, root, repos)
        tmp = root / f".zoo-{group}{size}.json.tmp"
        tmp.write_text(json.dumps(_marker(size, group), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, marker_path(root, size, group))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built %s zoo %sat %s in %.1fs", size, group.replace("-", " "), root, time.perf_counter() - started)


@contextlib.contextmanager
def _isolated(single_thread: bool) -> Iterator[None]:
    """Silence init warnings, keep the caller's torch RNG and thread count as they were.

    Tiny models are all per-op overhead: extra intra-op threads only contend with whatever
    else runs on the machine, so tiny builds use one thread.
    """
    import warnings

    import torch

    threads = torch.get_num_threads()
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        if single_thread:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def zoo_configs(size: Size = "tiny", with_shapes: bool = True) -> dict[str, Any]:
    """Every config dict (and adapter tensor shape) of ``size``, without writing weights.

    The dry-run path for ``full``: the UNets needed for the adapter key layout are built on the
    meta device, so this is cheap even at real sizes.
    """
    from . import clip, controlnet, sd, video

    sizes = get_sizes(size)
    out: dict[str, Any] = {**sd.configs(sizes), **clip.configs(sizes), **controlnet.configs(sizes)}
    out["motion_adapter"] = video.motion_adapter_config(sizes)
    if with_shapes:
        from . import faceid
        from .ip_adapters import shapes

        out["ip_adapters"] = shapes(sizes)
        out["faceid"] = faceid.shapes(sizes)
    return out
