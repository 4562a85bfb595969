"""The output directory: row keys, atomic writes, results parts and what counts as done."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ipa_ops.canonical import canonical_json
from ipa_ops.outputs.folder import OutputDir, row_key, versions

PARAMS: dict[str, Any] = {
    "prompt": "a cat",
    "seed": 7,
    "steps": 4,
    "guidance_scale": 7.5,
    "model_fingerprint": "m1",
    "adapters": [{"alias": "style", "fingerprint": "f1", "keys": ["k1", "k2"], "scale": {"value": 0.8, "end": 0.6}}],
    "loras": {"detail": None},
}


def _leaves(obj: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(obj, list):
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, (*path, i))]
    return [path]


def test_row_key_changes_when_any_param_changes() -> None:
    base = row_key(PARAMS)
    assert len(base) == 20 and int(base, 16) >= 0
    for path in _leaves(PARAMS):
        changed = copy.deepcopy(PARAMS)
        node = changed
        for part in path[:-1]:
            node = node[part]
        old = node[path[-1]]
        node[path[-1]] = old + 1 if isinstance(old, int | float) else f"{old}x"
        assert row_key(changed) != base, path


def test_row_key_canonical_forms() -> None:
    assert row_key({"b": 1, "a": 2.0}) == row_key({"a": 2, "b": 1.0})  # key order, 1.0 == 1
    assert row_key({"s": np.float32(0.6), "n": np.int64(3)}) == row_key({"s": 0.6, "n": 3})
    assert row_key({"t": (1, 2)}) == row_key({"t": [1, 2]})
    assert canonical_json({"x": 0.1}) == '{"x":0.1}'
    with pytest.raises(ValueError, match="params.x is nan"):
        row_key({"x": float("nan")})
    with pytest.raises(TypeError, match="params.o: cannot hash a object"):
        row_key({"o": object()})


def test_row_key_stable_across_processes() -> None:
    code = (
        "import json, sys; from ipa_ops.outputs.folder import row_key\n"
        "print(row_key(json.loads(sys.argv[1]) | {'s': {'b', 'a', 'c'}}))"
    )
    cwd = Path(__file__).resolve().parents[1]
    procs = [  # two hash seeds, run side by side
        subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(PARAMS)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for seed in ("1", "2")
    ]
    keys = set()
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr.decode()
        keys.add(stdout.decode().strip())
    assert keys == {row_key(PARAMS | {"s": {"c", "a", "b"}})}  # sets (hash-seed ordered) hash sorted


def test_paths_come_only_from_hex_keys(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    key = row_key({"id": "../../etc/passwd"})
    assert out.image_path(key) == f"{tmp_path}/out/images/{key[:2]}/{key}.png"  # fanned out by 2 hex chars
    assert out.image_path(key, "gif").endswith(f"images/{key[:2]}/{key}.gif")
    assert out.frame_path(key, 3).endswith(f"images/{key[:2]}/{key}/00003.png")
    for bad in ("../../etc/passwd", "ABC", "a/b", ""):
        with pytest.raises(ValueError, match="not a hex digest"):
            out.image_path(bad)
    with pytest.raises(ValueError, match="extension"):
        out.image_path(key, "png/../../x")
    with pytest.raises(ValueError, match="outside the output directory"):
        out.write_bytes_atomic(out.path("images", "..", "..", "evil.png"), b"x")


def test_manifest_id_cannot_influence_paths(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    key = row_key({"prompt": "p"})
    out.write_bytes_atomic(out.image_path(key), b"png")
    out.append_results([_row("../../etc/passwd", key, "ok", [out.image_path(key)])])
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written[0] == f"out/images/{key[:2]}/{key}.png" and len(written) == 2
    assert written[1].startswith("out/results/part-") and written[1].endswith(".parquet")
    assert out.read_results()["id"].tolist() == ["../../etc/passwd"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path))
    path = out.image_path("ab" * 10)

    def half_then_fail(f: Any) -> None:
        f.write(b"\x89PNG half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        out.write_bytes_atomic(path, half_then_fail)
    assert [p for p in (tmp_path / "images").rglob("*") if p.is_file()] == []  # neither the file nor its temp
    out.write_bytes_atomic(path, lambda f: f.write(b"whole"))
    assert Path(path).read_bytes() == b"whole" and len(list((tmp_path / "images" / "ab").iterdir())) == 1


def _row(rid: str, key: str, status: str, outputs: list[str], finished: str = "2024-01-01T00:00:00Z") -> dict:
    return {
        "id": rid,
        "row_key": key,
        "status": status,
        "error": "" if status == "ok" else f"row {rid}: boom",
        "outputs": outputs,
        "seed": 1,
        "started_at": finished,
        "finished_at": finished,
        "seconds": 0.5,
        "worker": "w0",
        "provenance": {"model_fingerprint": "m", "adapter_fingerprints": {"style": "f"}, "embedding_keys": ["e1"]},
    }


def test_done_keys_latest_row_wins_and_files_must_exist(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    keys = [f"{i:020x}" for i in range(1, 6)]
    for key in keys:
        out.write_bytes_atomic(out.image_path(key), b"img")
    out.append_results(
        [
            _row("a", keys[0], "error", [], "2024-01-01T00:00:00Z"),
            _row("b", keys[1], "ok", [out.image_path(keys[1])], "2024-01-01T00:00:00Z"),
            _row("c", keys[2], "ok", [out.image_path(keys[2])]),
            _row("d", keys[3], "ok", [f"images/{keys[3][:2]}/{keys[3]}.png"]),  # relative to the output root
            _row("e", keys[4], "ok", []),
            _row("x", "", "error", []),  # a row that never got a key
        ]
    )
    out.append_results(
        [
            _row("a", keys[0], "ok", [out.image_path(keys[0])], "2024-01-02T00:00:00Z"),
            _row("b", keys[1], "error", [], "2024-01-02T00:00:00Z"),
        ]
    )
    assert out.done_keys() == {keys[0], keys[2], keys[3]}
    os.remove(out.image_path(keys[2]))  # a user deletes an image they dislike
    assert out.done_keys() == {keys[0], keys[3]}


def test_results_columns_and_user_columns(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path))
    row = _row("a", "ab" * 10, "ok", []) | {"prompt": "<p>", "references": ["r.png"], "scale": "0.6", "x_batch": 3}
    out.append_results([row])
    df = out.read_results()
    got = df.iloc[0]
    assert (got["prompt"], list(got["references"]), got["scale"], got["x_batch"]) == ("<p>", ["r.png"], "0.6", 3)
    assert got["model_fingerprint"] == "m" and json.loads(got["adapter_fingerprints"]) == {"style": "f"}
    assert list(got["embedding_keys"]) == ["e1"] and json.loads(got["versions"])["ipa"]
    assert json.loads(got["provenance"])["model_fingerprint"] == "m"
    assert str(got["finished_at"].tz) == "UTC"
    with pytest.raises(ValueError, match="status must be one of ok, error, skipped"):
        out.append_results([_row("a", "ab" * 10, "done", [])])
    with pytest.raises(ValueError, match="not identifiers"):
        out.append_results([_row("a", "ab" * 10, "ok", []) | {"bad col": 1}])
    assert out.append_results([]) == "" and len(out.read_results()) == 1


def test_object_store_paths_work_through_fsspec() -> None:
    out = OutputDir("memory://ipa-test-out")
    key = "cd" * 10
    out.write_bytes_atomic(out.image_path(key), lambda f: f.write(b"img"))
    out.append_results([_row("a", key, "ok", [out.image_path(key)])])
    assert out.done_keys() == {key}
    out.fs.rm(out.image_path(key))
    assert out.done_keys() == set()


def test_run_json_and_versions(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path))
    assert out.read_run_json() is None
    found = versions()
    assert set(found) >= {"ipa", "torch", "diffusers", "transformers", "ray", "insightface"} and found["ipa"]
    out.write_run_json({"counts": {"ok": 2}, "versions": found})
    assert out.read_run_json() == {"counts": {"ok": 2}, "versions": found}


def test_images_fan_out_and_flat_layout_stays_done(tmp_path: Path) -> None:
    from ipa_ops.outputs.files import write_outputs

    out = OutputDir(str(tmp_path / "out"))
    new, video, old = "ab" * 10, "ef" * 10, "cd" * 10
    image = write_outputs(out, new, np.zeros((8, 8, 3), np.uint8))
    assert image == [f"{out.uri}/images/ab/{new}.png"] and Path(image[0]).is_file()
    frames = write_outputs(out, video, np.zeros((2, 8, 8, 3), np.uint8))
    assert frames[0] == f"{out.uri}/images/ef/{video}.gif"
    assert frames[1:] == [f"{out.uri}/images/ef/{video}/0000{i}.png" for i in range(2)]
    assert all(Path(p).is_file() for p in frames)
    out.write_bytes_atomic(out.path("images", f"{old}.png"), b"png")  # written by the flat layout of before
    out.append_results(
        [
            _row("n", new, "ok", image),
            _row("v", video, "ok", frames),
            _row("o", old, "ok", [f"images/{old}.png"]),
        ]
    )
    assert out.done_keys() == {new, video, old}
    os.remove(out.path("images", f"{old}.png"))
    os.remove(frames[2])  # a video is done only with all its frames
    assert out.done_keys() == {new}


def test_done_keys_of_planned_keys_read_four_columns_and_list_no_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun of a few rows on object storage asks for those rows' files, never lists images/."""
    from ipa_ops.outputs import done_index, results_parts

    out = OutputDir("memory://ipa-test-done-index")
    keys = [f"{i:02x}" + "0" * 18 for i in range(0, 256, 8)]  # 32 keys in 32 fan-out folders
    for key in keys:
        out.write_bytes_atomic(out.image_path(key), b"img")
    out.append_results([_row(f"r{i}", key, "ok", [out.image_path(key)]) for i, key in enumerate(keys)])
    out.fs.rm(out.image_path(keys[1]))
    read_columns: list[Any] = []
    real_read = results_parts.read_part

    def spy_read(fs: Any, path: str, columns: list[str] | None = None) -> Any:
        read_columns.append(columns)
        return real_read(fs, path, columns)

    def no_listing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"listed {args[:1]}")

    monkeypatch.setattr(results_parts, "read_part", spy_read)
    monkeypatch.setattr(out.fs, "find", no_listing)
    monkeypatch.setattr(out.fs, "glob", no_listing)
    real_ls = type(out.fs).ls
    monkeypatch.setattr(
        out.fs, "ls", lambda path, *a, **k: no_listing(path) if "/images" in path else real_ls(out.fs, path, *a, **k)
    )
    assert out.done_keys({keys[0], keys[1], keys[2], "ff" * 10}) == {keys[0], keys[2]}
    assert read_columns == [done_index.COLUMNS]  # row_key, status, finished_at, outputs: not provenance


def test_done_keys_lists_a_folder_once_when_many_files_are_wanted(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipa_ops.outputs import done_index

    out = OutputDir("memory://ipa-test-done-listing")
    keys = [f"ab{i:018x}" for i in range(done_index.LIST_AT + 2)]  # all in images/ab/
    for key in keys:
        out.write_bytes_atomic(out.image_path(key), b"img")
    out.append_results([_row(f"r{i}", key, "ok", [out.image_path(key)]) for i, key in enumerate(keys)])
    out.fs.rm(out.image_path(keys[3]))
    asked: list[str] = []
    real_exists = out.fs.exists

    def spy_exists(path: str, **kwargs: Any) -> bool:
        asked.append(str(path))
        return real_exists(path, **kwargs)

    monkeypatch.setattr(out.fs, "exists", spy_exists)
    assert out.done_keys(keys) == set(keys) - {keys[3]}
    monkeypatch.undo()
    heads = [p for p in list(asked) if "/images/" in p]
    assert heads == []  # one listing of images/ab/, no HEAD per image
