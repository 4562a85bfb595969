"""A full disk: a real `ipa run` whose output folder lives on a small tmpfs the test mounts.

The disk fills mid-run (a ballast file leaves room for a few batches). The run must stop with one
line naming the file it could not write, leave no partial file under a final name and no cut
part, keep every row it committed, and a rerun once the ballast is gone must make the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_stop import REPO, ROWS, _command, _env, _manifest, assert_everything_reads

from ipa_ops.outputs.ledger import read_ledger

FREE_FOR_THE_RUN = 400 << 10  # a few batches of 64x64 PNGs (with their records), thumbnails and results parts


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test and unmounted after it, whatever happens."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); this machine has neither")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"this machine cannot mount a tmpfs: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_run_in_one_line_and_a_rerun_completes(
    tmp_path: Path, zoo_dir: Path, small_disk: Path
) -> None:
    _manifest(tmp_path / "manifest.csv")
    out = small_disk / "out"
    out.mkdir()
    stat = os.statvfs(small_disk)
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - FREE_FOR_THE_RUN))

    run = subprocess.run(_command(tmp_path, zoo_dir, output=out), env=_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=240)  # fmt: skip
    errors = [line for line in run.stderr.strip().splitlines() if line.startswith("error:")]
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith(f"error: {out}/") and "no space left on device (ENOSPC); the run stopped" in errors[0]
    assert "free space and rerun" in errors[0]

    results = assert_everything_reads(out)  # no cut part, no undecodable image, no temp file
    assert set(results["status"]) <= {"ok"} and results["id"].is_unique
    first = set(results["id"])
    assert 0 < len(first) < ROWS  # the disk filled mid-run, after some batches were committed
    (record,) = read_ledger(str(out))
    assert record["status"] == "failed" and "no space left on device" in record["error"]
    assert not (out / "_lease.json").exists()

    ballast.unlink()  # space freed
    rerun = subprocess.run(_command(tmp_path, zoo_dir, output=out), env=_env(), cwd=REPO, capture_output=True,
                           text=True, timeout=240)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    gen = json.loads(rerun.stdout.split("generate: ", 1)[1].splitlines()[0])
    assert gen["skipped"] == len(first) and gen["ok"] == ROWS - len(first)
    results = assert_everything_reads(out)
    assert sorted(results["id"]) == [f"r{i:02d}" for i in range(ROWS)] and set(results["status"]) == {"ok"}
    assert [r["status"] for r in read_ledger(str(out))] == ["failed", "ok"]
