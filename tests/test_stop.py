"""A polite stop: a real `ipa run` on the tiny zoo sent SIGTERM mid-run, then a rerun.

The run must commit the batches it had in flight, mark its ledger record `stopped`, release its
lease and exit 143 with one line; nothing it wrote may be lost or half-written, and the rerun
makes exactly the rows that were not done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from ipa_ops.outputs.folder import OutputDir
from ipa_ops.outputs.ledger import read_ledger

REPO = Path(__file__).resolve().parents[1]
REFS = [str(REPO / "data" / "refs" / f"ref-{i}.png") for i in range(4)]
ROWS = 24


def _manifest(path: Path) -> Path:
    rows = [
        {"id": f"r{i:02d}", "prompt": f"picture {i}", "seed": i,
         "adapters": json.dumps([{"adapter": "style", "images": [REFS[i % 4]], "scale": 0.6}])}
        for i in range(ROWS)
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _command(root: Path, zoo: Path, *extra: str, output: Path | None = None) -> list[str]:
    """`ipa run` of the quick start on the zoo: store and manifest under `root`, output `root/out`."""
    sets = [
        f"mirror={zoo}",
        f"stages.extract.images={REPO / 'data' / 'refs'}",
        f"stages.extract.store={root / 'store'}",
        f"stages.generate.store={root / 'store'}",
        f"stages.generate.manifest={root / 'manifest.csv'}",
        f"stages.generate.output={output or root / 'out'}",
        "stages.generate.defaults.width=64",
        "stages.generate.defaults.height=64",
        "stages.generate.defaults.steps=2",
        "stages.generate.resources.batch_size=2",
        "stages.generate.commit_rows=2",  # a part per batch: the fault meets rows already committed
        "stages.extract.resources.batch_size=4",
        *extra,
    ]
    argv = [sys.executable, "-m", "ipa_ops.cli", "run", str(REPO / "flows" / "quickstart.yaml")]
    return argv + [a for s in sets for a in ("--set", s)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _parts(out: Path) -> list[Path]:
    return sorted((out / "results").glob("part-*.parquet"))


def assert_everything_reads(out: Path) -> pd.DataFrame:
    """No file under a final name that does not read; every ok row's image exists and decodes."""
    results = OutputDir(str(out)).read_results()  # every part parses, or this raises
    for png in (out / "images").rglob("*.png"):
        with Image.open(png) as im:
            im.load()
    for path in out.rglob("*"):
        assert not path.name.endswith(".tmp"), f"temp file left: {path}"
    for outputs in results.loc[results["status"] == "ok", "outputs"]:
        assert len(outputs) == 1 and OutputDir(str(out)).resolve(outputs[0])
    return results


def test_sigterm_drains_commits_marks_stopped_and_a_rerun_continues(tmp_path: Path, zoo_dir: Path) -> None:
    _manifest(tmp_path / "manifest.csv")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _command(tmp_path, zoo_dir), env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 150
        while not _parts(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # wait for the first committed batch: the run is mid-way
        assert proc.poll() is None, f"the run ended before it could be stopped: {proc.communicate()}"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]  # Ray's own log lines aside
    assert stderr.strip().splitlines()[-1] == lines[0]
    assert lines[0].startswith("error: stopped by SIGTERM after committing the batches in flight: "), lines[0]
    assert "rerun the flow to continue" in lines[0]

    results = assert_everything_reads(out)
    assert set(results["status"]) == {"ok"} and results["id"].is_unique
    first = set(results["id"])
    assert 0 < len(first) < ROWS  # it stopped early, having committed some rows
    assert f"{len(first)} row(s) ok and 0 failed this run, {ROWS - len(first)} left" in lines[0]
    (record,) = read_ledger(str(out))
    assert record["status"] == "stopped" and record["error"].startswith("RunStopped: stopped by SIGTERM")
    assert not (out / "_lease.json").exists()  # released: the rerun is not refused

    rerun = subprocess.run(_command(tmp_path, zoo_dir), env=_env(), cwd=REPO, capture_output=True, text=True,
                           timeout=180)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    gen = json.loads(rerun.stdout.split("generate: ", 1)[1].splitlines()[0])
    assert gen["ok"] == ROWS - len(first) and gen["skipped"] == len(first)  # only the rows left were made
    results = assert_everything_reads(out)
    assert sorted(results["id"]) == [f"r{i:02d}" for i in range(ROWS)]  # every row exactly once
    assert set(results["status"]) == {"ok"}
    assert [r["status"] for r in read_ledger(str(out))] == ["stopped", "ok"]


@pytest.mark.parametrize("grace", ["nope", "-1", "nan"])
def test_a_bad_grace_setting_is_one_line(grace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from ipa_ops.errors import UserError
    from ipa_ops.stages.stopping import grace_seconds

    monkeypatch.setenv("IPA_STOP_GRACE_S", grace)
    with pytest.raises(UserError, match=r"^IPA_STOP_GRACE_S=.*: not a number of seconds >= 0"):
        grace_seconds(30.0)
    monkeypatch.setenv("IPA_STOP_GRACE_S", "2.5")
    assert grace_seconds(30.0) == 2.5


def test_second_signal_and_grace_timeout_stop_at_once_and_a_lost_lease_is_not_polite() -> None:
    """The Stopper on its own, with real signals to this process: no Ray needed."""
    from ipa_ops.errors import RunStopped
    from ipa_ops.stages.stopping import current, stop_on_signals

    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's own when an earlier test started Ray here
    with stop_on_signals(30.0) as stopper:
        assert stopper is not None and current() is stopper
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: a flag, no KeyboardInterrupt
        time.sleep(0.2)
        assert stopper.requested and stopper.signal_name() == "SIGINT"
        with pytest.raises(RunStopped, match="^stopped at once by a second SIGTERM") as second:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert second.value.exit_code == 128 + signal.SIGTERM
    assert current() is None and signal.getsignal(signal.SIGTERM) is before  # handlers restored

    started = time.monotonic()
    with pytest.raises(RunStopped, match=r"did not finish within the 0.5 s grace period") as timeout:
        with stop_on_signals(0.5):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # a drain that hangs: the watcher interrupts it
    assert time.monotonic() - started < 5 and timeout.value.exit_code == 143

    with pytest.raises(KeyboardInterrupt), stop_on_signals(30.0) as stopper:
        assert stopper is not None
        stopper.hard(KeyboardInterrupt())  # what a lost lease does: output_lease turns it into LeaseLost
        time.sleep(5)
