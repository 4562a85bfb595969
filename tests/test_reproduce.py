"""Records and `ipa reproduce`: every ok results row carries its complete request, every image its
record (A1111 parameters, ipa JSON, XMP), and each row of every task is remade bit-identically on CPU
from its results row and from the image alone."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from a1111_infotext import parse_infotext
from PIL import Image

from ipa_ops.cli import main
from ipa_ops.flow.spec import load_flow
from ipa_ops.outputs.files import encode_outputs
from ipa_ops.outputs.folder import OutputDir
from ipa_ops.records.metadata import IPTC_SOURCE_TYPES, PARAMETERS_KEY, RECORD_KEY, XMP_KEY
from ipa_ops.records.schema import RECORD_COLUMNS, from_columns
from ipa_ops.stages.extract import run_extract
from ipa_ops.stages.generate import run_generate

REPO = Path(__file__).resolve().parents[1]
REF = [str(REPO / "data" / "refs" / f"ref-{i}.png") for i in range(4)]
MASK = {s: str(REPO / "data" / "masks" / f"{s}.png") for s in ("left", "right")}
CONTROL = str(REPO / "data" / "control" / "depth-0.png")


def _flow_yaml(root: Path, zoo: Path, output: str, metadata: bool = True) -> Path:
    """Two models on the zoo's SD1.5 (one with a ControlNet, one with a MotionAdapter), two adapters."""
    flow = {
        "name": "records",
        "mirror": str(zoo),
        "metadata": metadata,
        "models": {
            "sd15": {"source": "stable-diffusion-v1-5/stable-diffusion-v1-5", "controlnet": "depth"},
            "sd15v": {
                "source": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                "motion_adapter": "animatediff",
                "scheduler": "ddim",
                "scheduler_options": {"clip_sample": False, "timestep_spacing": "linspace", "steps_offset": 1},
            },
        },
        "controlnets": {"depth": {"source": "lllyasviel/control_v11f1p_sd15_depth"}},
        "motion_adapters": {"animatediff": {"source": "guoyww/animatediff-motion-adapter-v1-5-2"}},
        "encoders": {
            "vit-h": {"type": "clip", "source": "h94/IP-Adapter", "subfolder": "models/image_encoder"},
            "vit-h-plus": {
                "type": "clip",
                "source": "h94/IP-Adapter",
                "subfolder": "models/image_encoder",
                "hidden_states": True,
            },
        },
        "adapters": {
            "style": {"source": "h94/IP-Adapter", "subfolder": "models", "weight_name": "ip-adapter_sd15.bin",
                      "encoder": "vit-h"},
            "plus": {"source": "h94/IP-Adapter", "subfolder": "models", "weight_name": "ip-adapter-plus_sd15.bin",
                     "encoder": "vit-h-plus"},
        },  # fmt: skip
        "stages": {
            "extract": {"images": str(REPO / "data" / "refs"), "encoders": ["vit-h", "vit-h-plus"],
                        "store": str(root / "store")},
            "generate": {"manifest": str(root / "manifest.jsonl"), "model": "sd15", "store": str(root / "store"),
                         "output": str(root / output), "defaults": {"width": 64, "height": 64, "steps": 3},
                         "resources": {"batch_size": 4}},
        },  # fmt: skip
    }
    path = root / f"{output}.yaml"
    path.write_text(yaml.safe_dump(flow))
    return path


def _style(images: list[str], scale: object = 0.6, **extra: object) -> dict:
    return {"adapter": "style", "images": images, "scale": scale, **extra}


ROWS = [
    {"id": "t2i", "prompt": "a red fox, in the snow", "seed": 1, "adapters": [_style([REF[0]])]},
    {"id": "plain", "prompt": "no adapter at all", "seed": 2, "adapters": []},
    {
        "id": "two",
        "prompt": "two adapters with schedules",
        "seed": 3,
        "adapters": [
            _style([REF[1]], {"preset": "style"}),
            {"adapter": "plus", "images": [REF[2], REF[3]], "scale": {"value": 0.8, "end": 0.5}, "combine": "average"},
        ],
    },
    {
        "id": "i2i-mask",
        "prompt": "img2img with a masked reference",
        "negative_prompt": "blurry, low quality",
        "seed": 4,
        "task": "img2img",
        "init_image": REF[3],
        "strength": 0.7,
        "adapters": [_style([REF[0]], 0.9, masks=[MASK["left"]])],
    },
    {
        "id": "inpaint",
        "prompt": "inpaint the right half",
        "negative_prompt": "ugly",
        "seed": 5,
        "task": "inpaint",
        "init_image": REF[2],
        "mask_image": MASK["right"],
        "strength": 0.9,
        "adapters": [_style([REF[1]])],
    },
    {"id": "cn", "prompt": "depth controlled", "seed": 6, "task": "controlnet", "control_image": CONTROL,
     "controlnet_scale": 0.7, "adapters": [_style([REF[2]], 0.5)]},  # fmt: skip
    {"id": "vid", "prompt": "a short video", "seed": 7, "task": "video", "model": "sd15v", "num_frames": 2,
     "adapters": [_style([REF[3]], {"value": 0.8, "end": 0.6})]},  # fmt: skip
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, zoo_dir: Path, ray_local: None, single_thread: None) -> dict:
    root = tmp_path_factory.mktemp("records")
    pd.DataFrame(ROWS).to_json(root / "manifest.jsonl", orient="records", lines=True)
    flow = load_flow(_flow_yaml(root, zoo_dir, "out"))
    assert flow.stages.extract is not None and flow.stages.generate is not None
    run_extract(flow, flow.stages.extract)
    counts = run_generate(flow, flow.stages.generate)
    assert (counts["ok"], counts["error"]) == (len(ROWS), 0), OutputDir(str(root / "out")).read_results()["error"]
    table = pa.concat_tables(pq.read_table(p) for p in sorted((root / "out" / "results").glob("*.parquet")))
    rows = {r["id"]: r for r in table.to_pylist()}
    return {"root": root, "out": root / "out", "table": table, "rows": rows, "zoo": zoo_dir}


def _image(run: dict, rid: str) -> Path:
    return Path(run["rows"][rid]["outputs"][0])


def test_ok_rows_carry_the_request_as_arrow_structs(run: dict) -> None:
    schema = run["table"].schema
    adapters = schema.field("adapters").type
    assert pa.types.is_list(adapters) and pa.types.is_struct(adapters.value_type)
    assert pa.types.is_struct(schema.field("scheduler").type) and pa.types.is_struct(schema.field("init_image").type)
    rows = run["rows"]
    i2i = rows["i2i-mask"]
    assert (i2i["task"], i2i["width"], i2i["height"], i2i["steps"], i2i["strength"]) == ("img2img", 64, 64, 3, 0.7)
    assert i2i["negative_prompt"] == "blurry, low quality" and i2i["guidance_scale"] == 7.5
    assert i2i["init_image"]["uri"] == REF[3] and len(i2i["init_image"]["sha256"]) == 64
    (adapter,) = i2i["adapters"]
    assert adapter["alias"] == "style" and adapter["masks"][0]["uri"] == MASK["left"]
    assert adapter["references"][0]["uri"] == REF[0] and adapter["references"][0]["key"].endswith(adapter["encoder"])
    assert adapter["fingerprint"] and len(adapter["schedule_hash"]) > 8 and json.loads(adapter["scale"]) == 0.9
    two = rows["two"]["adapters"]
    assert [a["alias"] for a in two] == ["style", "plus"] and two[1]["combine"] == "average"
    assert two[0]["schedule_hash"] != two[1]["schedule_hash"] and json.loads(two[0]["scale"]) == {"preset": "style"}
    assert rows["t2i"]["strength"] is None and rows["cn"]["controlnet_scale"] == 0.7 and rows["vid"]["num_frames"] == 2
    assert rows["cn"]["components"][0]["kind"] == "controlnet" and rows["cn"]["control_image"]["uri"] == CONTROL
    assert rows["vid"]["scheduler"]["class_name"] == "DDIMScheduler" and rows["vid"]["scheduler"]["name"] == "ddim"
    assert rows["t2i"]["scheduler"]["name"] is None and rows["t2i"]["scheduler"]["class_name"]
    assert rows["t2i"]["scheduler"]["config_hash"] != rows["vid"]["scheduler"]["config_hash"]
    assert len(rows["t2i"]["model_hash"]) == 10 and json.loads(rows["t2i"]["sources"])["models"]["sd15"]
    # other readers: pandas and duckdb see the nested columns as structs and lists
    part = next((run["out"] / "results").glob("*.parquet"))
    df = pd.read_parquet(part)
    assert df.set_index("id").loc["two", "adapters"][1]["alias"] == "plus"
    import duckdb

    found = duckdb.sql(f"select id, adapters[1].masks[1].uri as m from read_parquet('{part}') where id = 'i2i-mask'")
    assert found.fetchall() == [("i2i-mask", MASK["left"])]


@pytest.mark.parametrize("rid", [r["id"] for r in ROWS])
def test_reproduce_from_results_row_and_from_the_image(run: dict, rid: str, tmp_path: Path, capsys) -> None:
    row = run["rows"][rid]
    assert main(["reproduce", str(run["out"]), row["row_key"], "--out", str(tmp_path / "a")]) == 0
    said = capsys.readouterr().out
    assert "identical to the original: pixels and bytes" in said, said
    ext = "gif" if rid == "vid" else "png"
    assert (tmp_path / "a" / f"{row['row_key']}.{ext}").read_bytes() == _image(run, rid).read_bytes()
    files = [_image(run, rid)] + ([Path(row["outputs"][2])] if rid == "vid" else [])  # the GIF and a frame PNG
    for i, file in enumerate(files):
        assert main(["reproduce", "--png", str(file), "--out", str(tmp_path / f"b{i}")]) == 0
        said = capsys.readouterr().out
        assert "identical to the original: pixels and bytes" in said, said


def test_reproduce_says_how_much_it_differs_and_exits_non_zero(run: dict, tmp_path: Path, capsys) -> None:
    original = _image(run, "t2i")
    with Image.open(original) as image:
        pixels = np.asarray(image).copy()
        info = image.info
    pixels[0, 0] = 255 - pixels[0, 0]  # one pixel edited after writing; the record inside is kept
    from PIL.PngImagePlugin import PngInfo

    kept = PngInfo()
    kept.add_itxt(RECORD_KEY, info[RECORD_KEY], zip=True)
    edited = tmp_path / "edited.png"
    Image.fromarray(pixels).save(edited, pnginfo=kept)
    assert main(["reproduce", "--png", str(edited), "--out", str(tmp_path / "r")]) == 1
    said = capsys.readouterr().out
    assert "differs from the original" in said and "3 pixel values differ" in said, said


def test_every_metadata_chunk_parses(run: dict) -> None:
    for rid in ("t2i", "two", "i2i-mask", "inpaint", "cn"):
        row = run["rows"][rid]
        with Image.open(_image(run, rid)) as image:
            info = dict(image.info)
        assert set(info) >= {PARAMETERS_KEY, RECORD_KEY, XMP_KEY}
        assert not {"tIME", "Creation Time", "date:create"} & set(info)
        record = json.loads(info[RECORD_KEY])
        mates = record.pop("batch_records", [])
        assert record == from_columns(row)  # the image's record is its results row's
        keys = record["batch"]["row_keys"]  # plus the records of the rows it shared its pipeline call with
        assert [m["row_key"] for m in mates] == [k for k in keys if k != row["row_key"]]
        assert record["batch"]["torch_threads"] >= 1 and record["batch"]["device"] == "cpu"
        parsed = parse_infotext(info[PARAMETERS_KEY])
        assert parsed["prompt"] == row["prompt"] and parsed["negative_prompt"] == row["negative_prompt"]
        assert parsed["Steps"] == "3" and parsed["Seed"] == str(row["seed"]) and parsed["Size"] == "64x64"
        assert parsed["CFG scale"] == "7.5" and parsed["Model hash"] == row["model_hash"]
        assert parsed["Sampler"] == "PLMS"  # the zoo's SD1.5 scheduler is PNDM, which A1111 calls PLMS
        units = [parse_infotext(parsed[f"IP-Adapter {i}"], settings_only=True) for i in range(len(row["adapters"]))]
        assert [u["Model"].split(" [")[0] for u in units] == [a["alias"] for a in row["adapters"]]
        assert [u["Schedule hash"] for u in units] == [a["schedule_hash"] for a in row["adapters"]]
        if rid in ("i2i-mask", "inpaint"):
            assert parsed["Denoising strength"] == f"{row['strength']:g}"
        xmp = ET.fromstring(info[XMP_KEY].split("?>", 1)[1].rsplit("<?xpacket", 1)[0])
        ns = {"Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"}
        (kind,) = [e.text for e in xmp.iterfind(".//Iptc4xmpExt:DigitalSourceType", ns)]
        composite = rid in ("i2i-mask", "inpaint")
        term = "compositeWithTrainedAlgorithmicMedia" if composite else "trainedAlgorithmicMedia"
        assert kind == IPTC_SOURCE_TYPES + term
    units = parse_infotext(parse_infotext(_info(run, "t2i")[PARAMETERS_KEY])["IP-Adapter 0"], settings_only=True)
    assert units["Weight"] == "0.6"
    two = parse_infotext(_info(run, "two")[PARAMETERS_KEY])
    assert json.loads(parse_infotext(two["IP-Adapter 1"], settings_only=True)["Schedule"]) == {"end": 0.5, "value": 0.8}
    with Image.open(_image(run, "vid")) as gif:  # the GIF: its comment is the record
        record = json.loads(gif.info["comment"])
        record.pop("batch_records", None)
        assert record == from_columns(run["rows"]["vid"])


def _info(run: dict, rid: str) -> dict:
    with Image.open(_image(run, rid)) as image:
        return dict(image.info)


def test_metadata_false_writes_none_and_keeps_keys_and_pixels(run: dict) -> None:
    root = run["root"]
    flow = load_flow(_flow_yaml(root, run["zoo"], "bare", metadata=False))
    assert flow.stages.generate is not None
    manifest = root / "one-row.jsonl"
    pd.DataFrame([r for r in ROWS if r["id"] == "t2i"]).to_json(manifest, orient="records", lines=True)
    flow.stages.generate.manifest = str(manifest)
    assert run_generate(flow, flow.stages.generate)["ok"] == 1
    bare = {r["id"]: r for r in OutputDir(str(root / "bare")).read_results().to_dict("records")}
    for rid in ("t2i",):
        assert bare[rid]["row_key"] == run["rows"][rid]["row_key"]  # metadata never changes a row key
        files = [Path(p) for p in bare[rid]["outputs"]]
        for file, original in zip(files, run["rows"][rid]["outputs"], strict=True):
            with Image.open(file) as image, Image.open(original) as before:
                assert not {PARAMETERS_KEY, RECORD_KEY, XMP_KEY, "comment"} & set(image.info)
                assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(before.convert("RGB")))
    frames = np.zeros((2, 8, 8, 3), dtype=np.uint8)  # a video written without a record: no GIF comment either
    assert "comment" not in Image.open(io.BytesIO(encode_outputs(frames, None).data)).info


def test_results_written_before_records_still_read_resume_and_compact(run: dict, tmp_path: Path, capsys) -> None:
    """An output whose parts predate the record columns: rows read, done keys hold, compaction merges them."""
    out = tmp_path / "old"
    (out / "results").mkdir(parents=True)
    table = run["table"]
    old = table.drop_columns(list(RECORD_COLUMNS)).replace_schema_metadata(None)
    pq.write_table(old.slice(0, 3), out / "results" / "part-20240101T000000000000Z-rabc000000001-000000.parquet")
    pq.write_table(table.slice(3), out / "results" / "part-20240102T000000000000Z-rabc000000001-000001.parquet")
    folder = OutputDir(str(out))
    assert len(folder.read_results()) == len(ROWS)
    keys = set(table["row_key"].to_pylist())
    assert folder.done_keys(keys) == keys  # their files (in the first output) exist
    assert main(["compact", str(out)]) == 0
    merged = pa.concat_tables(pq.read_table(p) for p in (out / "results").glob("*.parquet"))
    assert merged.num_rows == len(ROWS) and merged.schema.field("adapters").type == RECORD_COLUMNS["adapters"][0]
    rows = {r["id"]: r for r in merged.to_pylist()}
    old_ids = table["id"].to_pylist()[:3]
    assert all(rows[i]["record_version"] is None for i in old_ids)
    assert all(r["record_version"] == 1 for i, r in rows.items() if i not in old_ids)
    old_key = rows[old_ids[0]]["row_key"]
    assert main(["reproduce", str(out), old_key, "--out", str(tmp_path / "r")]) == 2
    assert "has no record (written before records existed" in capsys.readouterr().err


def test_a1111_text_survives_awkward_prompts_and_non_latin_text() -> None:
    """Commas, colons, quotes, newlines and non-Latin-1 text parse back; such text goes in an iTXt chunk."""
    from ipa_ops.records.metadata import a1111_parameters, png_info

    record = {
        "prompt": 'a "quoted" cat, sitting: on\na mat, 猫',
        "negative_prompt": "bad, worse: worst",
        "seed": 9, "width": 64, "height": 48, "steps": 4, "guidance_scale": 5.0, "model": "sd15",
        "model_hash": "0123456789", "scheduler": {"name": "euler_a", "class_name": "EulerAncestralDiscreteScheduler"},
        "strength": None, "num_frames": None, "components": [], "task": "text2img",
        "loras": [{"alias": "lcm", "fingerprint": "abc", "weight": 0.5}],
        "adapters": [{"alias": "a, b", "fingerprint": "f", "scale": {"steps": [1.0, 0.5]}, "references": [{}],
                      "negatives": [], "masks": [], "combine": "concat", "schedule_hash": "h"}],
    }  # fmt: skip
    parsed = parse_infotext(a1111_parameters(record))
    assert parsed["prompt"] == record["prompt"] and parsed["negative_prompt"] == record["negative_prompt"]
    assert (parsed["Sampler"], parsed["CFG scale"], parsed["Size"]) == ("Euler a", "5", "64x48")
    assert parsed["Lora hashes"] == "lcm: abc" and parsed["Lora weights"] == "lcm: 0.5"
    unit = parse_infotext(parsed["IP-Adapter 0"], settings_only=True)
    assert unit["Model"] == "a, b [f]" and json.loads(unit["Schedule"]) == {"steps": [1.0, 0.5]}
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG", pnginfo=png_info({**record, "row_key": "k", "version": 1}))
    assert b"iTXtparameters" in buf.getvalue()  # not Latin-1: an iTXt chunk, as Pillow's add_text does
    assert Image.open(io.BytesIO(buf.getvalue())).info[PARAMETERS_KEY] == a1111_parameters(record)


def test_changed_weights_or_inputs_are_named_before_anything_runs(run: dict, tmp_path: Path, capsys) -> None:
    row = run["rows"]["i2i-mask"]
    other = yaml.safe_load(_flow_yaml(tmp_path, run["zoo"], "other").read_text())
    other["adapters"]["style"]["weight_name"] = "ip-adapter_sd15_light.bin"  # other weights under the same alias
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    args = ["reproduce", str(run["out"]), row["row_key"], "--out", str(tmp_path / "r")]
    assert main([*args, "--flow", str(tmp_path / "other.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: row i2i-mask: adapter 'style' at ") and "the record says" in err and "\n" not in err
    with Image.open(_image(run, "i2i-mask")) as image:
        record = json.loads(image.info[RECORD_KEY])
    record["init_image"]["sha256"] = "0" * 64  # as if the init image had changed since
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(RECORD_KEY, json.dumps(record), zip=True)
    tampered = tmp_path / "tampered.png"
    Image.new("RGB", (64, 64)).save(tampered, pnginfo=info)
    assert main(["reproduce", "--png", str(tampered), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"row i2i-mask: init_image: {REF[3]} changed since the row was made" in err
