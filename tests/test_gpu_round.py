"""scripts/gpu_round.sh, the prepared round for a lent GPU machine, rehearsed here on the CPU with
tiny settings (GPU_ROUND_QUICK=1): a GPU session has minutes, not hours, so every stage's command
must still run against today's CLI, and what it leaves must fit what the device tool brings back
(at most 8 plain files, no folders)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labseg.config import PROJECT_ROOT

SCRIPT = Path(PROJECT_ROOT) / "scripts" / "gpu_round.sh"
STAGES = "env bench-b32 syncs train-r34"


def run_round(out: Path, *args: str, cwd: str | None = None, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHON=sys.executable, GPU_ROUND_DEVICE="cpu", GPU_ROUND_QUICK="1",
                   TMPDIR=str(out.parent), **env)
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], env=environ, capture_output=True,
                          text=True, timeout=900, cwd=cwd)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("gpu-round") / "out"
    # DATA_DIR relative to where the script is started, as `data/pets3` is on the device
    data = os.path.relpath(synthetic_root, out.parent)
    proc = run_round(out, data, GPU_ROUND_STAGES=STAGES, GPU_ROUND_DEADLINE="600", cwd=str(out.parent))
    return proc, out


def test_every_stage_ran_and_returned_zero(rehearsal):
    proc, out = rehearsal
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage in STAGES.split():
        assert f"gpu_round: {stage}: rc 0 after" in log, f"stage {stage} did not end with rc 0:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]
    assert "syncs: 0 in 2 epochs of " in log      # no CUDA here: the stage's run, nothing counted


def test_the_files_fit_what_the_device_tool_brings_back(rehearsal):
    _, out = rehearsal
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bench.jsonl", "env.txt", "log.txt", "metrics-gpu-r34-32.csv", "runs.jsonl"]
    assert all((out / n).is_file() and (out / n).stat().st_size < 16 * 2**20 for n in names)
    # the run folders (checkpoints) and their cache are gone; torch may leave its own caches
    assert not list(out.parent.glob("labseg-*"))


def test_bench_records_are_tagged_and_complete(rehearsal):
    _, out = rehearsal
    records = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert records and {r["stage"] for r in records} == {"bench-b32"}
    env = next(r for r in records if r["kind"] == "env")
    assert env["batch_size"] == 2 and env["device"] == "cpu"
    trained = {(r["model"], r["size"]) for r in records if r["kind"] == "train"}
    assert {("unet", 32), ("resnet34_unet", 32)} <= trained
    assert records[-1]["kind"] == "done"


def test_the_training_run_is_summarised_with_its_test_dice(rehearsal, synthetic_root):
    _, out = rehearsal
    (record,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert record["run"] == "gpu-r34-32"
    assert record["config"]["arch"] == "resnet34_unet" and record["config"]["img_size"] == 32
    assert Path(record["config"]["data_dir"]) == Path(synthetic_root).resolve()
    assert record["summary"]["epochs_run"] == 1
    for which in ("eval_test", "eval_test_last"):
        assert 0.0 <= record[which]["dice"] <= 1.0
        assert record[which]["images"] > 0
    rows = (out / "metrics-gpu-r34-32.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 2


def test_a_stage_that_does_not_fit_the_deadline_is_skipped(tmp_path):
    out = tmp_path / "out"
    proc = run_round(out, GPU_ROUND_STAGES="bench-b32", GPU_ROUND_DEADLINE="10")
    assert proc.returncode == 0
    assert "bench-b32: skipped, " in proc.stdout and "needs 60s" in proc.stdout
    assert not (out / "bench.jsonl").exists()


def test_a_missing_data_folder_is_refused_by_name(tmp_path):
    proc = run_round(tmp_path / "out", str(tmp_path / "no-such-pets"))
    assert proc.returncode == 2
    assert "no-such-pets is not a folder" in proc.stdout


def test_without_a_data_folder_the_round_trains_on_a_synthetic_sample_of_its_own(tmp_path):
    """DATA_DIR is optional: the round writes the synthetic sample into its scratch folder (a
    fresh checkout has no data/sample, and `labseg train` fell back to it and failed there)."""
    out = tmp_path / "out"
    proc = run_round(out, GPU_ROUND_STAGES="train-r34", GPU_ROUND_DEADLINE="600")
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0 and "gpu_round: train-r34: rc 0 after" in log, log[-3000:]
    assert "/sample (the synthetic sample)" in log
    (record,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    data = Path(record["config"]["data_dir"])
    assert data.name == "sample" and data.parent.name.startswith("labseg-gpu-round-")
    assert not list(tmp_path.glob("labseg-gpu-round-*"))       # gone with the round's scratch folder
