"""labseg.sweep: grid parsing and naming, and a tiny real sweep through papermill."""
import json
import time

import pytest

from labseg.sweep import SweepError, expand, format_results, load_grid, parse_sets, point_name, run_sweep


def test_parse_sets_and_yaml(tmp_path):
    assert parse_sets(["arch=unet,resnet34_unet", "lr=1e-3", "time_budget=none"]) == {
        "arch": ["unet", "resnet34_unet"], "lr": [0.001], "time_budget": [None]}
    f = tmp_path / "grid.yaml"
    f.write_text("arch: [unet, resnet34_unet]\nlr: [1e-3, 3e-4]\nepochs: 2\n")
    grid = load_grid(f)
    assert grid == {"arch": ["unet", "resnet34_unet"], "lr": [0.001, 0.0003], "epochs": [2]}
    points = expand(grid)
    assert len(points) == 4 and points[1] == {"arch": "unet", "lr": 0.0003, "epochs": 2}
    assert point_name(points[1]) == "arch=unet+epochs=2+lr=0.0003"
    with pytest.raises(SweepError):
        parse_sets(["arch"])


def test_tiny_sweep_records_failures_and_skips_finished(tmp_path, synthetic_root):
    grid = {"arch": ["unet", "nope"], "epochs": [1], "img_size": [32], "max_train_images": [4],
            "batch_size": [4], "data_dir": [str(synthetic_root)], "cache_dir": [str(tmp_path / "cache")]}
    runs = tmp_path / "runs"
    t = time.perf_counter()
    results = run_sweep(grid, output_dir=runs, progress=False)
    by_arch = {r["arch"]: r for r in results}
    assert by_arch["unet"]["status"] == "finished", by_arch["unet"]
    assert by_arch["nope"]["status"] == "failed"
    assert "choose one of: unet, resnet34_unet" in by_arch["nope"]["error"]
    ok, bad = runs / by_arch["unet"]["run"], runs / by_arch["nope"]["run"]
    assert (ok / "04_train.ipynb").is_file() and (ok / "summary.json").is_file()
    assert json.loads((bad / "failed.json").read_text())["params"]["arch"] == "nope"
    assert (bad / "04_train.ipynb").is_file()
    assert "failed" in format_results(results)

    mtime = (ok / "summary.json").stat().st_mtime_ns
    again = run_sweep({**grid, "arch": ["unet"]}, output_dir=runs, progress=False)
    assert again[0]["status"].startswith("done before")
    assert (ok / "summary.json").stat().st_mtime_ns == mtime
    assert time.perf_counter() - t < 120
