"""An example flow pointed at the tiny zoo and a test's own folder: store, manifest, output, small images."""

from __future__ import annotations

from pathlib import Path

from ipa_ops.flow.spec import Flow, load_flow

REPO = Path(__file__).resolve().parents[1]


def zoo_flow(
    name: str, root: Path, zoo: Path, manifest: Path | str, *extra: str, steps: int = 2, output: str = "out"
) -> Flow:
    """`flows/<name>.yaml` on the zoo, the repository's reference images, 64x64 images, `steps` steps."""
    return load_flow(
        REPO / "flows" / f"{name}.yaml",
        [
            f"mirror={zoo}",
            f"stages.extract.images={REPO / 'data' / 'refs'}",
            f"stages.extract.store={root / 'store'}",
            f"stages.generate.store={root / 'store'}",
            f"stages.generate.manifest={manifest}",
            f"stages.generate.output={root / output}",
            "stages.generate.defaults.width=64",
            "stages.generate.defaults.height=64",
            f"stages.generate.defaults.steps={steps}",
            *extra,
        ],
    )
