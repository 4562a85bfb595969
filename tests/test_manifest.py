"""Manifests: every format reads the same, and every bad row yields exactly one line naming row and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ipa_ops.errors import UserError
from ipa_ops.flow.spec import Flow, load_flow, parse_flow
from ipa_ops.manifest.checks import check_rows
from ipa_ops.manifest.rows import MANIFEST_SCHEMA, FaceOptions, read_manifest, uri_exists, write_manifest

REPO = Path(__file__).resolve().parents[1]
KEY = "ab" * 32 + "/vit-h@1234"
FILES = {"a.png": (512, 512), "b.png": (512, 512), "wide.png": (1024, 512), "m.png": (512, 512), "m2.png": (64, 64)}


@pytest.fixture
def flow() -> Flow:
    return parse_flow(
        {
            "name": "t",
            "models": {"sd15": {"source": "x"}},
            "encoders": {"vit-h": {"type": "clip", "source": "y"}, "faces": {"type": "insightface"}},
            "adapters": {
                "style": {"source": "h", "weight_name": "a.bin", "encoder": "vit-h", "scale": 0.7},
                "face": {"source": "h", "weight_name": "f.bin", "encoder": "faces"},
            },
            "stages": {
                "generate": {
                    "manifest": "m.csv",
                    "model": "sd15",
                    "output": "out",
                    "defaults": {"negative_prompt": "blurry", "steps": 20},
                }
            },
        }
    )


def _check(df: pd.DataFrame, flow: Flow) -> tuple[list, list[str]]:
    rows, problems = check_rows(
        df,
        flow,
        flow.stages.generate,
        exists=FILES.__contains__,
        store_has=lambda v: v == KEY,
        image_size=FILES.__getitem__,
    )
    return rows, [str(p) for p in problems]


def _style(**extra: Any) -> list[dict[str, Any]]:
    return [{"adapter": "style", "images": ["a.png"], **extra}]


BAD_ROWS: list[tuple[dict[str, Any], str]] = [
    (
        {"adapters": [{"adapter": "stlye", "images": ["a.png"]}]},
        "adapters[0].adapter: unknown adapter alias 'stlye' (did you mean 'style'?); defined: style, face",
    ),
    ({"width": 500}, "width: must be a multiple of 8, got 500"),
    ({"height": 0}, "height: must be > 0, got 0"),
    ({"width": "abc"}, "width: must be an integer, got 'abc'"),
    ({"steps": 0}, "steps: must be >= 1, got 0"),
    ({"model": "sd16"}, "model: unknown model alias 'sd16' (did you mean 'sd15'?); defined: sd15"),
    ({"task": "txt2img"}, "task: must be one of text2img, img2img, inpaint, controlnet, video; got 'txt2img'"),
    ({"task": "img2img"}, "init_image: required for task img2img"),
    ({"task": "inpaint", "init_image": "a.png"}, "mask_image: required for task inpaint"),
    ({"task": "controlnet"}, "control_image: required for task controlnet"),
    ({"task": "video"}, "num_frames: required for task video"),
    ({"task": "img2img", "init_image": "nope.png"}, "init_image: 'nope.png' not found; check the path"),
    (
        {"adapters": [{"adapter": "style", "images": ["a.png", "b.png"], "masks": ["m.png"]}]},
        "adapters[0].masks: 1 mask for 2 images; give one mask per image or none",
    ),
    (
        {"adapters": [{"adapter": "style", "images": ["a.png"] * 3, "negative_images": ["b.png"] * 2}]},
        "adapters[0].negative_images: 2 negative images for 3 images; give one (shared) or one each",
    ),
    ({"adapters": _style(combine="avg")}, "adapters[0].combine: must be one of concat, average, norm_average"),
    ({"adapters": _style(scale=float("nan"))}, "adapters[0].scale: NaN is not a valid scale"),
    ({"adapters": _style(scale="Infinity")}, "adapters[0].scale: inf is not a valid scale"),
    ({"adapters": _style(scale="{0.5")}, "adapters[0].scale: not valid JSON"),
    ({"adapters": _style(scale={"presett": "style"})}, "adapters[0].scale: unknown schedule key"),
    (
        {"adapters": [{"adapter": "style", "images": ["gone.png"]}]},
        "adapters[0].images[0]: 'gone.png' not found (no such file, and not in the embedding store); check the path",
    ),
    (
        {"adapters": [{"adapter": "style", "images": ["cd" * 32 + "/vit-h@1234"]}]},
        "adapters[0].images[0]: store key '" + "cd" * 32 + "/vit-h@1234' is not in the embedding store",
    ),
    ({"adapters": _style(masks=["gone-mask.png"])}, "adapters[0].masks[0]: 'gone-mask.png' not found; check the path"),
    (
        {"adapters": [{"adapter": "style", "images": ["a.png"], "masks": ["wide.png"]}]},
        "adapters[0].masks[0]: aspect ratio of 1024x512 differs from the output's 512x512 by more than 1%",
    ),
    ({"adapters": [{"adapter": "style", "imgs": ["a.png"]}]}, "adapters[0].imgs: unknown key (did you mean 'images'?)"),
    ({"adapters": [{"adapter": "style", "images": []}]}, "adapters[0].images: at least one image"),
    ({"adapters": _style(face={"fallback": "skip"})}, "adapters[0].face: face options apply only to FaceID adapters"),
    (
        {"adapters": [{"adapter": "face", "images": ["a.png"], "face": {"fallback": "maybe"}}]},
        "adapters[0].face.fallback: must be one of skip, drop_adapter; got 'maybe'",
    ),
    ({"adapters": "[{broken"}, "adapters: not valid JSON"),
    (
        {"adapters": [{"adapter": "face", "images": ["a.png"]}, {"adapter": "face", "images": ["b.png"]}]},
        "adapters[1].adapter: 'face' is already used by adapters[0]; a FaceID adapter is applied once per row",
    ),
]


def test_each_bad_row_yields_exactly_its_line_and_good_rows_pass(flow: Flow) -> None:
    good = [
        {"id": "g1", "prompt": "plain"},
        {"id": "g2", "adapters": _style(scale=0.6, masks=["m2.png"], mask_fit="pad")},
        {"id": "g3", "adapters": [{"adapter": "style", "images": [KEY], "scale": '{"preset": "style"}'}]},
        {"id": "g4", "adapters": [{"adapter": "face", "images": ["a.png"]}], "task": "img2img", "init_image": "a.png"},
        {"id": "g5", "adapters": _style(masks=["m.png"], negative_images=["b.png"], combine="average")},
        {"id": "g6", "adapters": _style(masks=["m.png"]) + _style(scale=0.4)},  # one adapter applied twice
    ]
    bad = [{"id": f"r{i}", **row} for i, (row, _) in enumerate(BAD_ROWS)]
    rows, problems = _check(pd.DataFrame(good + bad), flow)
    assert [r.id for r in rows] == ["g1", "g2", "g3", "g4", "g5", "g6"]
    assert len(problems) == len(BAD_ROWS), "\n".join(problems)
    for i, (_, expected) in enumerate(BAD_ROWS):
        assert problems[i].startswith(f"row r{i}: {expected}"), (problems[i], expected)
        assert "\n" not in problems[i]


def test_good_rows_get_flow_defaults(flow: Flow) -> None:
    df = pd.DataFrame(
        [{"id": "a", "adapters": _style()}, {"id": "b", "adapters": [{"adapter": "face", "images": ["a.png"]}]}]
    )
    (a, b), problems = _check(df, flow)
    assert problems == []
    assert (a.model, a.negative_prompt, a.steps, a.width, a.task) == ("sd15", "blurry", 20, 512, "text2img")
    assert a.adapters[0].scale == 0.7  # the adapter's flow default
    assert a.adapters[0].combine == "concat" and a.adapters[0].face is None
    assert b.adapters[0].face == FaceOptions()  # fallback, crop, shortcut_scale: the flow's
    assert a.seed == check_rows(df, flow, flow.stages.generate, exists=FILES.__contains__)[0][0].seed  # stable


def test_duplicate_and_missing_ids(flow: Flow) -> None:
    df = pd.DataFrame([{"id": "x"}, {"id": "x"}, {"prompt": "no id"}])
    rows, problems = _check(df, flow)
    assert [r.id for r in rows] == ["x"]
    assert problems == [
        "row x: id: duplicate id (first at row #1); ids must be unique",
        "row #3: id: required; give every row a unique id",
    ]


CSV = "\n".join(
    [
        "id,prompt,seed,width,height,task,adapters,x_tag",
        'a,"a cat, <b>bold</b>",1,64,64,text2img,'
        '"[{""adapter"": ""style"", ""images"": [""a.png""], ""scale"": {""preset"": ""style""}}]",t1',
        'b,,2,64,64,,"[{""adapter"": ""style"", ""images"": [""a.png"", ""b.png""], '
        '""masks"": [""m.png"", ""m.png""], ""scale"": 0.5}]",t2',
        "c,dog,3,,,,,",
        "",
    ]
)


def _jsonl() -> str:
    rows = [
        {
            "id": "a",
            "prompt": "a cat, <b>bold</b>",
            "seed": 1,
            "width": 64,
            "height": 64,
            "task": "text2img",
            "adapters": [{"adapter": "style", "images": ["a.png"], "scale": {"preset": "style"}}],
            "x_tag": "t1",
        },
        {
            "id": "b",
            "seed": 2,
            "width": 64,
            "height": 64,
            "adapters": [{"adapter": "style", "images": ["a.png", "b.png"], "masks": ["m.png", "m.png"], "scale": 0.5}],
            "x_tag": "t2",
        },
        {"id": "c", "prompt": "dog", "seed": 3},
    ]
    return "".join(json.dumps(r) + "\n" for r in rows)


def _parquet(path: Path) -> None:
    """Written with pyarrow directly (the schema's struct), not through write_manifest."""
    entry = dict.fromkeys(("masks", "negative_images", "combine", "mask_fit", "soft_masks", "face"))
    adapters = [
        [{"adapter": "style", "images": ["a.png"], "scale": '{"preset":"style"}', **entry}],
        [
            {
                **entry,
                "adapter": "style",
                "images": ["a.png", "b.png"],
                "masks": ["m.png"] * 2,
                "scale": "0.5",
                "face": None,
            }
        ],
        None,
    ]
    columns = {
        "id": ["a", "b", "c"],
        "prompt": ["a cat, <b>bold</b>", None, "dog"],
        "seed": [1, 2, 3],
        "width": [64, 64, None],
        "height": [64, 64, None],
        "task": ["text2img", None, None],
        "adapters": adapters,
    }
    schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in columns] + [("x_tag", pa.string())])
    pq.write_table(pa.table({**columns, "x_tag": ["t1", "t2", None]}, schema=schema), path)


def test_csv_jsonl_parquet_read_identically(tmp_path: Path, flow: Flow) -> None:
    (tmp_path / "m.csv").write_text(CSV)
    (tmp_path / "m.jsonl").write_text(_jsonl())
    _parquet(tmp_path / "m.parquet")
    frames = [read_manifest(str(tmp_path / f"m.{ext}")) for ext in ("csv", "jsonl", "parquet")]
    for other in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], other)
    df = frames[0]
    assert df.loc[0, "adapters"][0]["scale"] == '{"preset": "style"}'
    assert df.loc[2, "adapters"] is None and pd.isna(df.loc[2, "width"])
    rows, problems = _check(df, flow)
    assert problems == [] and rows[0].metadata == {"x_tag": "t1"} and rows[2].width == 512
    for ext in ("csv", "jsonl", "parquet"):  # and write_manifest round-trips through every format
        pd.testing.assert_frame_equal(read_manifest(write_manifest(df, str(tmp_path / f"out/w.{ext}"))), df)


def test_unknown_column_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,promt,x_ok\na,cat,1\n")
    with pytest.raises(UserError, match=r"unknown column\(s\) 'promt' \(did you mean 'prompt'\?\)"):
        read_manifest(str(tmp_path / "m.csv"))


def test_bad_cells_are_row_problems_not_read_errors(tmp_path: Path, flow: Flow) -> None:
    (tmp_path / "m.csv").write_text("id,width,steps\nok,64,4\nbad,sixty,4\n")
    rows, problems = _check(read_manifest(str(tmp_path / "m.csv")), flow)
    assert [r.id for r in rows] == ["ok"]
    assert problems == ["row bad: width: must be an integer, got 'sixty'"]


def test_partitioned_folder_and_glob_keep_the_partition_value(tmp_path: Path, flow: Flow) -> None:
    for day in ("2024-01-01", "2024-01-02"):
        (tmp_path / "m" / f"date={day}").mkdir(parents=True)
    (tmp_path / "m/date=2024-01-01/a.csv").write_text("id,prompt\na1,cat\na2,dog\n")
    (tmp_path / "m/date=2024-01-02/b.jsonl").write_text('{"id": "b1", "prompt": "owl"}\n')
    (tmp_path / "m/date=2024-01-02/_SUCCESS").write_text("")
    by_glob = read_manifest(str(tmp_path / "m" / "date=*") + "/")
    by_folder = read_manifest(str(tmp_path / "m"))
    pd.testing.assert_frame_equal(by_glob, by_folder)
    assert list(by_glob["date"]) == ["2024-01-01", "2024-01-01", "2024-01-02"]
    rows, problems = _check(by_glob, flow)
    assert problems == [] and rows[2].metadata == {"date": "2024-01-02"}
    with pytest.raises(UserError, match="no manifest files"):
        read_manifest(str(tmp_path / "m" / "date=1999*"))


def test_quickstart_manifests_agree_and_check_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    csv, jsonl = read_manifest("manifests/quickstart.csv"), read_manifest("manifests/quickstart.jsonl")
    pd.testing.assert_frame_equal(csv, jsonl)
    flow = load_flow("flows/quickstart.yaml")
    rows, problems = check_rows(csv, flow, flow.stages.generate, exists=uri_exists)
    assert problems == []
    assert [r.adapters[0].scale for r in rows] == [0.6, {"preset": "style"}, {"value": 0.8, "end": 0.6}, 1.0]
    # sizes come from the flow's defaults (512x512, 30 steps); `ipa demo` overrides them for the zoo
    assert [(r.seed, r.width, r.height, r.steps) for r in rows] == [(i, 512, 512, 30) for i in range(1, 5)]
