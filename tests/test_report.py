"""labseg.report: runs -> table, best per network, figures, report.md; all from the records."""
import json
import re

import pandas as pd
import pytest

from labseg.report import (best_per_arch, collect_runs, evaluation_breakdown, markdown_table, plot_curves,
                           write_report)
from labseg.runs import RunDir


def fake_run(root, name, arch, dices, lr=1e-3, test=None, test_last=None, scheduler=None, stop_reason=None,
             machine=None):
    run = RunDir(root / name)
    run.path.mkdir(parents=True)
    run.write_json("config.json", {"arch": arch, "img_size": 64, "epochs": len(dices), "lr": lr, "loss": "bce_dice",
                                   "augment": "light", "seed": 0, "data_dir": "data/sample", "scheduler": scheduler})
    run.write_metrics([{"epoch": i + 1, "train_loss": 1.0 / (i + 1), "valid_loss": 1.0 - d, "valid_dice": d,
                        "valid_iou": d * 0.8} for i, d in enumerate(dices)])
    run.write_summary({"arch": arch, "best_valid_dice": max(dices), "best_valid_iou": max(dices) * 0.8,
                       "best_epoch": dices.index(max(dices)) + 1, "epochs_run": len(dices),
                       "train_seconds": 1.0, "parameters": 10, "stop_reason": stop_reason,
                       **({"machine": machine} if machine else {})})
    if test is not None:
        run.write_json("eval_test.json", {"dice": test, "iou": test * 0.8, "tta": {"dice": test + 0.01}})
    if test_last is not None:
        run.write_json("eval_test_last.json", {"dice": test_last, "iou": test_last * 0.8})
    return run


def test_a_run_that_finished_its_cosine_schedule_is_reported_by_last_pt(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "cos", "resnet34_unet", [0.6, 0.8], test=0.84, test_last=0.86, scheduler="cosine",
             stop_reason="time budget of 25m spent (no time for another epoch)")
    fake_run(runs, "early", "resnet34_unet", [0.6, 0.7], test=0.81, test_last=0.79, scheduler="cosine",
             stop_reason="early stopping: no valid_dice gain in 1 epochs")
    table = collect_runs(runs).set_index("run")
    assert table.loc["cos", ["checkpoint", "test_dice", "test_iou"]].tolist() == ["last", 0.86, 0.86 * 0.8]
    assert table.loc["cos", ["test_dice_best", "test_dice_last"]].tolist() == [0.84, 0.86]
    assert pd.isna(table.loc["cos", "test_dice_tta"])                # last.pt was scored without TTA
    assert table.loc["early", ["checkpoint", "test_dice", "test_dice_tta"]].tolist() == ["best", 0.81, 0.81 + 0.01]
    text = write_report(runs, tmp_path / "report").read_text()
    assert "| resnet34_unet | cos | sample | 0.8000 | 0.6400 | 2 | last | 0.8600 | 0.6880 |" in text


def test_runs_csv_leaves_the_epochs_of_a_budget_run_blank(tmp_path):
    """A run trained until its time budget has no epoch count: its "epochs" is a sentinel, which
    runs.csv showed as 100000."""
    from labseg.config import UNTIL_BUDGET

    runs = tmp_path / "runs"
    budget = fake_run(runs, "budget", "unet", [0.6, 0.7], scheduler="cosine", stop_reason="time budget of 25m spent")
    budget.write_json("config.json", {**budget.read_json("config.json"), "epochs": UNTIL_BUDGET, "time_budget": "25m"})
    fake_run(runs, "counted", "unet", [0.6, 0.7, 0.8])
    csv = pd.read_csv(write_report(runs, tmp_path / "report").parent / "runs.csv").set_index("run")
    assert pd.isna(csv.loc["budget", "epochs"]) and csv.loc["budget", "time_budget"] == "25m"
    assert csv.loc["counted", "epochs"] == 3
    lines = (tmp_path / "report" / "runs.csv").read_text().splitlines()
    column = lines[0].split(",").index("epochs")
    assert sorted(line.split(",")[column] for line in lines[1:]) == ["", "3"]      # not "3.0"


def test_a_budget_run_recorded_before_final_lr_is_judged_by_the_lr_its_metrics_end_at(tmp_path):
    """summary.json had no final_lr before it was recorded; metrics.json always held each epoch's
    lr. A budget run that stopped at 15% of its peak lr did not finish its schedule: best.pt."""
    runs = tmp_path / "runs"
    stop = "time budget of 40s spent (no time for another epoch)"
    for name, final in (("high", 1.5e-4), ("decayed", 1e-6)):
        run = fake_run(runs, name, "unet", [0.6, 0.7, 0.65], test=0.6, test_last=0.5, scheduler="cosine",
                       stop_reason=stop)
        run.write_metrics([{**row, "lr": lr} for row, lr in zip(run.read_metrics(), (1e-3, 6e-4, final))])
    assert RunDir(runs / "high").resolve_checkpoint() == "best"
    assert RunDir(runs / "decayed").resolve_checkpoint() == "last"
    table = collect_runs(runs).set_index("run")
    assert table.loc["high", ["checkpoint", "test_dice"]].tolist() == ["best", 0.6]
    assert table.loc["decayed", ["checkpoint", "test_dice"]].tolist() == ["last", 0.5]


def test_an_early_evaluation_of_last_pt_in_eval_test_json_is_last_pts(tmp_path):
    """Before eval_test_last.json, every evaluation went to eval_test.json with its "checkpoint":
    one of last.pt is reported as last.pt's, unless last.pt has a file of its own."""
    runs = tmp_path / "runs"
    run = fake_run(runs, "old", "unet", [0.6, 0.7], scheduler="cosine", stop_reason="completed all epochs")
    run.write_json("eval_test.json", {"checkpoint": "last", "arch": "unet", "dice": 0.58, "iou": 0.5,
                                      "tta": {"dice": 0.59}})
    row = collect_runs(runs).set_index("run").loc["old"]
    assert row[["checkpoint", "test_dice", "test_dice_last", "test_dice_tta"]].tolist() == ["last", 0.58, 0.58, 0.59]
    assert pd.isna(row["test_dice_best"])
    assert evaluation_breakdown(runs)[["checkpoint", "test_dice"]].values.tolist() == [["last", 0.58]]
    run.write_json("eval_test_last.json", {"checkpoint": "last", "arch": "unet", "dice": 0.61, "iou": 0.5})
    row = collect_runs(runs).set_index("run").loc["old"]
    assert row[["test_dice", "test_dice_last"]].tolist() == [0.61, 0.61] and pd.isna(row["test_dice_best"])
    assert evaluation_breakdown(runs)[["checkpoint", "test_dice"]].values.tolist() == [["last", 0.61]]


def test_collect_runs_best_and_report(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "u1", "unet", [0.5, 0.6])
    fake_run(runs, "u2", "unet", [0.55, 0.7], test=0.68)
    fake_run(runs, "r1", "resnet34_unet", [0.6, 0.8, 0.75], lr=3e-4)
    failed = runs / "bad"
    failed.mkdir()
    (failed / "failed.json").write_text(json.dumps({"error": "ConfigError: arch='nope' is not valid",
                                                    "params": {"arch": "nope"}}))
    (runs / "not-a-run").mkdir()

    table = collect_runs(runs)
    assert sorted(table["run"]) == ["bad", "r1", "u1", "u2"]
    assert dict(zip(table["run"], table["status"])) == {"bad": "failed", "r1": "finished",
                                                        "u1": "finished", "u2": "finished"}
    assert table.set_index("run").loc["u2", "test_dice"] == 0.68
    assert pd.isna(table.set_index("run").loc["u2", "test_dice_last"])      # last.pt never evaluated
    assert table.set_index("run").loc["u2", "checkpoint"] == "best"            # no finished decaying schedule
    assert table.set_index("run").loc["bad", "arch"] == "nope"

    best = best_per_arch(table)
    assert best.loc["unet", "run"] == "u2" and best.loc["resnet34_unet", "run"] == "r1"
    assert best.loc["resnet34_unet", "best_valid_dice"] == 0.8

    fig = plot_curves(runs, table)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]          # under the plots
    assert labels == ["r1 (best resnet34_unet)", "u1", "u2 (best unet)"]   # every run named, best ones say so

    report = write_report(runs, tmp_path / "report")
    text = report.read_text()
    assert "| unet | u2 | sample | 0.7000 |" in text and "| resnet34_unet | r1 | sample | 0.8000 |" in text
    assert "arch='nope' is not valid" in text
    for name in ("curves.png", "best_per_network.png", "runs.csv"):
        assert (report.parent / name).stat().st_size > 0
    assert (report.parent / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert len(pd.read_csv(report.parent / "runs.csv")) == 4
    assert not [p for p in report.parent.iterdir() if p.name.endswith(".tmp")]


def test_each_run_shows_the_machine_and_precision_it_trained_on(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "epyc", "resnet34_unet", [0.6, 0.8], machine={
        "device": "cpu", "device_name": "AMD EPYC", "cpu_capability": "AVX2", "precision": "fp32"})
    fake_run(runs, "gpu", "resnet34_unet", [0.6, 0.7], machine={
        "device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "precision": "bf16"})
    fake_run(runs, "older", "unet", [0.5, 0.6])                  # from before the record existed
    table = collect_runs(runs).set_index("run")
    assert table.loc["epyc", "machine"] == "AMD EPYC (AVX2), fp32"
    assert table.loc["gpu", "machine"] == "NVIDIA H100 80GB HBM3, bf16"
    assert pd.isna(table.loc["older", "machine"])
    text = write_report(runs, tmp_path / "report").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| epyc |"))
    assert row.rstrip(" |").endswith("AMD EPYC (AVX2), fp32")


def test_a_run_resumed_on_another_machine_shows_both(tmp_path):
    runs = tmp_path / "runs"
    epyc = {"device": "cpu", "device_name": "AMD EPYC", "cpu_capability": "AVX2", "precision": "fp32"}
    xeon = {"device": "cpu", "device_name": "Intel Xeon", "cpu_capability": "AVX512", "precision": "bf16"}
    run = fake_run(runs, "moved", "resnet34_unet", [0.6, 0.8], machine=xeon)
    run.write_summary({**json.loads((run.path / "summary.json").read_text()),
                       "machines": [{**epyc, "first_epoch": 1}, {**xeon, "first_epoch": 2}]})
    run = fake_run(runs, "stayed", "resnet34_unet", [0.6, 0.8], machine=epyc)
    run.write_summary({**json.loads((run.path / "summary.json").read_text()),
                       "machines": [{**epyc, "first_epoch": 1}, {**epyc, "first_epoch": 2}]})
    table = collect_runs(runs).set_index("run")
    assert table.loc["moved", "machine"] == "AMD EPYC (AVX2), fp32 + Intel Xeon (AVX512), bf16"
    assert table.loc["stayed", "machine"] == "AMD EPYC (AVX2), fp32"


def test_empty_runs_folder(tmp_path):
    assert collect_runs(tmp_path / "none").empty
    with pytest.raises(FileNotFoundError, match="no runs folder .*none; train a run first"):
        write_report(tmp_path / "none", tmp_path / "report")    # a mistyped folder: not an empty report
    assert not (tmp_path / "report").exists()
    (tmp_path / "none").mkdir()
    report = write_report(tmp_path / "none", tmp_path / "report")
    text = report.read_text()
    assert "No finished run yet" in text and "No run has finished an epoch yet" in text
    assert ".png" not in text and not list((tmp_path / "report").glob("*.png"))    # no empty charts


def test_charts_appear_with_what_they_show_and_stale_ones_go(tmp_path):
    runs = tmp_path / "runs"
    stopped = fake_run(runs, "stopped", "unet", [0.3, 0.4])
    (stopped.path / "summary.json").unlink()
    text = write_report(runs, tmp_path / "report").read_text()
    assert "![learning curves](curves.png)" in text and (tmp_path / "report" / "curves.png").is_file()
    assert "best_per_network.png" not in text and not (tmp_path / "report" / "best_per_network.png").exists()
    fake_run(runs, "done", "unet", [0.5, 0.6])
    text = write_report(runs, tmp_path / "report").read_text()
    assert "![best run per network](best_per_network.png)" in text
    assert (tmp_path / "report" / "best_per_network.png").is_file()
    (tmp_path / "empty").mkdir()
    write_report(tmp_path / "empty", tmp_path / "report")      # the same report folder, no runs now
    assert not list((tmp_path / "report").glob("*.png"))


def test_markdown_table_escapes_pipes():
    df = pd.DataFrame({"a": ["x|y"], "b": [0.123456]})
    assert markdown_table(df).splitlines()[-1] == "| x\\|y | 0.1235 |"


def test_text_from_a_run_folder_cannot_break_the_table_or_run_as_html():
    """A received run folder's breed (a column header), run name or error once went into report.md
    as it was: a `|` in a header gave a row of more cells than the separator, HTML stayed HTML."""
    df = pd.DataFrame({"run": ["x|y<img src=x onerror=alert(1)>"], "<b>cat</b>|pipe dice": [0.5]})
    header, separator, row = markdown_table(df).splitlines()
    assert header == "| run | &lt;b&gt;cat&lt;/b&gt;\\|pipe dice |" and separator == "|---|---|"
    assert row == "| x\\|y&lt;img src=x onerror=alert(1)&gt; | 0.5000 |"
    cells = [len(re.split(r"(?<!\\)\|", line)) for line in (header, separator, row)]
    assert cells[0] == cells[1] == cells[2]


def test_markdown_table_gives_durations_one_decimal_whatever_their_size():
    df = pd.DataFrame({"train_seconds": [7.9, 14.4], "best_valid_dice": [0.81234, 0.9]})
    rows = markdown_table(df).splitlines()[2:]
    assert rows == ["| 7.9 | 0.8123 |", "| 14.4 | 0.9000 |"]


def test_breakdown_reads_tta_threshold_and_breeds_apart(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "plain", "unet", [0.5])
    run = fake_run(runs, "full", "resnet34_unet", [0.7])
    run.write_json("eval_test.json", {
        "arch": "resnet34_unet", "checkpoint": "best", "images": 9, "dice": 0.80,
        "tta": {"dice": 0.83}, "threshold_tuned": {"threshold": 0.4, "dice": 0.81}, "postprocess": {"dice": 0.845},
        "per_breed": {"Abyssinian": {"dice": 0.9}, "american_bulldog": {"dice": 0.7}}})
    run.write_json("eval_test_last.json", {"arch": "resnet34_unet", "checkpoint": "last", "images": 9, "dice": 0.85,
                                           # as evaluations before tta_threshold_tuned: tuned on TTA probabilities
                                           "tta": {"dice": 0.86}, "threshold_tuned": {"tta": True, "dice": 0.87}})
    table = evaluation_breakdown(runs)
    assert list(table["run"]) == ["full", "full"]          # "plain" was never evaluated
    assert list(table["checkpoint"]) == ["best", "last"] and table.iloc[1]["test_dice"] == 0.85
    runs_table = collect_runs(runs).set_index("run")
    assert (runs_table.loc["full", "test_dice"], runs_table.loc["full", "test_dice_last"]) == (0.80, 0.85)
    row = table.iloc[0]
    assert (row["test_dice"], row["tta_dice"], row["threshold"], row["tuned_dice"]) == (0.80, 0.83, 0.4, 0.81)
    assert abs(row["tta_gain"] - 0.03) < 1e-9 and abs(row["tuned_gain"] - 0.01) < 1e-9
    assert abs(table.iloc[1]["tuned_gain"] - 0.01) < 1e-9      # its threshold's gain over TTA, not over plain
    assert row["postprocess_dice"] == 0.845 and abs(row["postprocess_gain"] - 0.045) < 1e-9
    assert (row["Abyssinian dice"], row["american_bulldog dice"]) == (0.9, 0.7)
    text = write_report(runs, tmp_path / "report").read_text()
    assert "## Test: flip TTA, tuned threshold, post-processing and per breed" in text
    assert "| full | resnet34_unet | best | 9 | 0.8000 | 0.8300 |" in text
    assert "| checkpoint | test_dice | test_dice_tta | test_dice_best | test_dice_last |" in text
    assert "| best | 0.8000 | 0.8300 | 0.8000 | 0.8500 | 1.0 |" in text


def test_counts_read_as_integers_and_budget_runs_as_budget():
    df = pd.DataFrame({"best_epoch": [3.0, float("nan")], "parameters": [31038532.0, 10.0],
                       "epochs": [100000, 40], "best_valid_dice": [0.5, 0.25]})
    assert markdown_table(df).splitlines()[2:] == ["| 3 | 31,038,532 | budget | 0.5000 |", "|  | 10 | 40 | 0.2500 |"]


def test_the_notebook_tables_print_values_as_the_report_does():
    from labseg.report import formatted, ranked

    df = pd.DataFrame({"run": ["a", "b", "c"], "status": ["finished", "finished", "failed"],
                       "dataset": ["sample"] * 3, "arch": ["unet"] * 3, "lr": [5e-5, 1e-4, 1e-3],
                       "epochs": [3.0, 100000, None], "best_valid_dice": [0.5, 0.754928, None]})
    shown = formatted(ranked(df))
    assert shown["run"].tolist() == ["b", "a", "c"]                    # best first, the failed run last
    assert shown["lr"].tolist() == ["0.0001", "5e-05", "0.001"]
    assert shown["epochs"].tolist() == ["budget", "3", ""]
    assert shown["best_valid_dice"].tolist() == ["0.7549", "0.5000", ""]


def test_best_run_compares_runs_on_the_dataset_of_the_latest_one(tmp_path):
    import os

    from labseg.runs import best_run

    for i, (name, dice, data) in enumerate([("sample-good", 0.9, "data/sample"), ("real-a", 0.6, "/pets"),
                                            ("real-b", 0.7, "/pets"), ("sample-latest", 0.5, "data/sample")]):
        run = fake_run(tmp_path, name, "unet", [dice])
        run.write_json("config.json", {**json.loads((run.path / "config.json").read_text()), "data_dir": data})
        for record in ("config.json", "summary.json"):
            os.utime(run.path / record, (1_000_000 + i, 1_000_000 + i))
    assert best_run(tmp_path).name == "sample-good"         # latest on the sample: the sample's best
    # evaluating an old run writes into its folder; it does not make that run the latest
    (tmp_path / "real-a" / "eval_test.json").write_text("{}")
    assert best_run(tmp_path).name == "sample-good"
    os.utime(tmp_path / "real-a" / "summary.json", (2_000_000, 2_000_000))   # real-a trained further
    assert best_run(tmp_path).name == "real-b"


def test_records_are_written_readable_as_the_umask_allows(tmp_path):
    """An instructor reading a student's runs as another user: mkstemp's 0600 must not stick."""
    import os
    import stat

    from labseg.runs import atomic_write_text

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_text(tmp_path / "report.md", "# runs\n")
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o666 & ~mask


def test_a_stopped_run_shows_its_epochs_so_far_and_whether_it_can_resume(tmp_path):
    for name, checkpoint in (("stopped", True), ("killed", False)):
        run = fake_run(tmp_path, name, "unet", [0.3, 0.4, 0.35])
        (run.path / "summary.json").unlink()
        if checkpoint:
            (run.path / "last.pt").write_bytes(b"")
    table = collect_runs(tmp_path).set_index("run")
    assert table.loc["stopped", "status"] == "stopped (resumable)"
    assert table.loc["killed", "status"] == "stopped (killed)"
    with RunDir(tmp_path / "stopped").lock_for_training():      # as a process training it now does
        assert collect_runs(tmp_path).set_index("run").loc["stopped", "status"] == "running"
    assert table.loc["stopped", "best_valid_dice"] == 0.4 and table.loc["stopped", "best_epoch"] == 2
    assert table.loc["stopped", "epochs_run"] == 3
    assert best_per_arch(table.reset_index()).empty          # the best of a network is a finished run


def test_a_damaged_record_is_named_and_does_not_hide_the_other_runs(tmp_path, capsys):
    import pytest

    from labseg.runs import RunRecordError, best_run

    fake_run(tmp_path, "good", "unet", [0.5, 0.6])
    bad = fake_run(tmp_path, "bad", "unet", [0.9])
    (bad.path / "config.json").write_text('{"arch": "unet", "img_')          # cut off by an editor
    with pytest.raises(RunRecordError, match=f"{bad.path / 'config.json'} is not valid JSON"):
        bad.read_config()
    (bad.path / "summary.json").write_text("[1, 2]")
    with pytest.raises(RunRecordError, match="summary.json holds a list; expected a JSON object"):
        bad.read_summary()
    assert best_run(tmp_path).name == "good"
    assert "skipped run bad:" in capsys.readouterr().err
    table = collect_runs(tmp_path).set_index("run")
    assert table.loc["bad", "status"] == "damaged record" and "config.json is not valid JSON" in table.loc["bad", "error"]
    assert table.loc["good", "status"] == "finished"
    assert "damaged record" in write_report(tmp_path, tmp_path / "report").read_text()


def test_the_best_run_chart_names_the_checkpoint_its_test_dice_is_of(tmp_path):
    """Valid Dice is best.pt's; the test Dice beside it is of the run's own checkpoint (last.pt
    after a finished cosine schedule), and the chart says so under the bar."""
    from labseg.report import plot_best

    fake_run(tmp_path, "cos", "unet", [0.6, 0.8], test=0.70, test_last=0.75, scheduler="cosine",
             stop_reason="completed all epochs")
    fake_run(tmp_path, "early", "resnet34_unet", [0.9, 0.7], test=0.85, scheduler="cosine",
             stop_reason="early stopping: no valid_dice gain in 1 epochs")
    fake_run(tmp_path, "unevaluated", "smp_unet_resnet34", [0.5])
    labels = [t.get_text() for t in plot_best(collect_runs(tmp_path)).axes[0].get_xticklabels()]
    last_line = {label.split("\n")[0]: label.split("\n")[-1] for label in labels}     # by network
    assert last_line == {"unet": "test: last.pt", "resnet34_unet": "test: best.pt",
                         "smp_unet_resnet34": "unevaluated"}      # no test Dice: no checkpoint named



def test_best_per_network_tells_apart_two_data_folders_of_one_name(tmp_path):
    """Two datasets in folders both named 'photos': the report's best run comes from the folder of
    the run that finished last, as runs.best_run (and so `labseg evaluate`) picks it."""
    import os

    from labseg.runs import best_run

    runs = tmp_path / "runs"
    for i, (name, data, dice) in enumerate([("a-high", "/a/photos", 0.9), ("b-low", "/b/photos", 0.5)]):
        run = fake_run(runs, name, "unet", [dice])
        config = json.loads((run.path / "config.json").read_text())
        run.write_json("config.json", {**config, "data_dir": data})
        for record in ("config.json", "summary.json"):
            os.utime(run.path / record, (1000 + i, 1000 + i))
    table = collect_runs(runs)
    assert set(table["dataset"]) == {"photos"}
    assert best_per_arch(table).loc["unet", "run"] == "b-low" == best_run(runs, "unet").name
    assert "the dataset of the run that finished last" in write_report(runs, tmp_path / "report").read_text()


def test_best_per_network_compares_runs_of_one_dataset(tmp_path):
    """A higher valid Dice on other data (here 'photos') does not win on the sample's table: the
    best runs come from the dataset of the run that finished last, and the report says so."""
    import os

    runs = tmp_path / "runs"
    photos = fake_run(runs, "photos", "unet", [0.9])
    config = json.loads((photos.path / "config.json").read_text())
    photos.write_json("config.json", {**config, "data_dir": "/data/photos"})
    fake_run(runs, "sample-old", "unet", [0.4])
    fake_run(runs, "sample-new", "unet", [0.5])
    for i, name in enumerate(["photos", "sample-old", "sample-new"]):      # finished in this order
        for record in ("config.json", "summary.json"):
            os.utime(runs / name / record, (1000 + i, 1000 + i))
    table = collect_runs(runs)
    assert dict(zip(table["run"], table["dataset"])) == {"photos": "photos", "sample-old": "sample",
                                                         "sample-new": "sample"}
    assert best_per_arch(table).loc["unet", "run"] == "sample-new"
    assert best_per_arch(table, dataset="photos").loc["unet", "run"] == "photos"
    text = write_report(runs, tmp_path / "report").read_text()
    assert "On each dataset, `sample` (the dataset of the run that finished last, which the figure" in text
    # each dataset's best in the table, the latest run's dataset first (only it once: an instructor
    # with a class's runs on the sample and on real photos saw the sample's best alone)
    best_rows = [line.split(" | ")[:3] for line in text.split("## Best run per network")[1].split("##")[0].splitlines()
                 if line.startswith("| unet")]
    assert best_rows == [["| unet", "sample-new", "sample"], ["| unet", "photos", "photos"]]
    # the curves too: only the sample's runs, the latest data's best bold, and both say so
    assert "of every run on `sample` (runs on other data are left out" in text
    fig = plot_curves(runs)
    assert sorted(line.get_label() for line in fig.axes[0].lines) == ["sample-new (best unet)", "sample-old"]
    assert fig.axes[0].get_title() == "valid dice of every run on sample"
    assert {line.get_label() for line in plot_curves(runs, dataset="photos").axes[0].lines} == {"photos (best unet)"}
    ranking = [line.split(" | ")[0].strip("| ") for line in text.split("## All runs")[1].splitlines()
               if line.startswith("| ") and "finished" in line]
    assert ranking == ["photos", "sample-new", "sample-old"]       # by dataset, then best valid Dice first


def test_a_summary_with_a_non_numeric_dice_is_a_damaged_record_not_a_crash(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "good", "unet", [0.6])
    bad = fake_run(runs, "edited", "unet", [0.7])
    bad.write_json("summary.json", {**bad.read_summary(), "best_valid_dice": "0.9"})
    row = collect_runs(runs).set_index("run").loc["edited"]
    assert row["status"] == "damaged record" and "best_valid_dice is '0.9'" in row["error"]
    assert "summary.json" in row["error"]
    assert best_per_arch(collect_runs(runs)).loc["unet", "run"] == "good"
    assert "best_valid_dice is '0.9'" in write_report(runs, tmp_path / "report").read_text()


def test_learning_rates_and_gains_keep_their_digits():
    table = pd.DataFrame({"lr": [1e-3, 1e-4, 5e-5, 3e-5], "tuned_gain": [0.014, -0.003, 0.0, 0.5]})
    text = markdown_table(table)
    assert [line.split("|")[1].strip() for line in text.splitlines()[2:]] == ["0.001", "0.0001", "5e-05", "3e-05"]
    assert [line.split("|")[2].strip() for line in text.splitlines()[2:]] == ["+0.0140", "-0.0030", "+0.0000",
                                                                              "+0.5000"]


def test_a_run_of_one_epoch_is_drawn_as_a_point(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "best", "unet", [0.5, 0.7])
    fake_run(runs, "one", "unet", [0.6])                 # a thin line: not the network's best
    fig = plot_curves(runs)
    (line,) = [line for line in fig.axes[0].lines if line.get_label() == "one"]
    assert list(line.get_ydata()) == [0.6] and line.get_marker() not in (None, "None", "")
    fig = plot_curves(runs, collect_runs(runs).query("run == 'one'"))     # only runs of one epoch
    for ax in fig.axes[:2]:
        fig.canvas.draw()
        assert list(ax.get_xticks()) == [1], ax.get_xticks()             # epoch 1, not 0.5, 0.6, ...


def test_a_finished_run_whose_checkpoint_is_gone_is_noted(tmp_path):
    runs = tmp_path / "runs"
    for name in ("kept", "deleted"):
        fake_run(runs, name, "unet", [0.6], scheduler="cosine", stop_reason="completed all epochs")
    (runs / "kept" / "last.pt").write_bytes(b"a checkpoint")
    table = collect_runs(runs).set_index("run")
    assert pd.isna(table.loc["kept", "error"])
    assert table.loc["deleted", "error"] == "its checkpoint last.pt is missing: it cannot be evaluated again"
    text = write_report(runs, tmp_path / "report").read_text()
    assert "- `deleted`: its checkpoint last.pt is missing" in text and "- `kept`" not in text


def test_a_checkpoint_is_described_by_its_own_epoch_and_valid_dice(tmp_path):
    """A run picked by its best valid Dice is evaluated on last.pt once its cosine schedule
    finished: 05_evaluate says which checkpoint and its own figure, not the best epoch's."""
    run = fake_run(tmp_path / "runs", "r", "unet", [0.6, 0.8, 0.7], scheduler="cosine",
                   stop_reason="completed all epochs")
    assert run.describe_checkpoint() == "last.pt, which is missing"
    for name in ("best.pt", "last.pt"):
        (run.path / name).write_bytes(b"weights")
    assert run.describe_checkpoint() == "last.pt (epoch 3, valid Dice 0.7000)"
    assert run.describe_checkpoint("best") == "best.pt (epoch 2, valid Dice 0.8000)"
    run.write_summary({**run.read_summary(), "swa_epochs": 2, "swa_valid_dice": 0.75, "best_is_swa": False})
    assert run.describe_checkpoint("last") == "last.pt (weights averaged over its last 2 epochs, valid Dice 0.7500)"
    assert run.describe_checkpoint("best") == "best.pt (epoch 2, valid Dice 0.8000)"
    # unfinished (no summary), kept by valid_loss: best.pt is the lowest loss's epoch, not the best Dice's
    (run.path / "summary.json").unlink()
    run.write_json("config.json", {**run.read_json("config.json"), "monitor": "valid_loss"})
    run.write_metrics([{"epoch": 1, "valid_dice": 0.6, "valid_loss": 0.3}, {"epoch": 2, "valid_dice": 0.8,
                                                                            "valid_loss": 0.5}])
    assert run.describe_checkpoint("best") == "best.pt (epoch 1, valid Dice 0.6000)"
    (run.path / "metrics.json").write_text("[{")                        # damaged: the name, no crash
    assert run.describe_checkpoint("best") == "best.pt"
    # killed before its first checkpoint (a kernel restarted in epoch 1): 05 says so before it fails
    for name in ("best.pt", "last.pt"):
        (run.path / name).unlink()
    assert run.describe_checkpoint("best") == ("best.pt, which is missing (the run stopped before its first "
                                               "checkpoint: train it again with overwrite=True, --overwrite, "
                                               "or delete its folder)")


def test_the_full_datasets_37_breeds_get_a_table_of_their_own_in_the_report(tmp_path):
    """37 per-breed columns made a test table of 50 columns; past 8 breeds they are one row each."""
    runs = tmp_path / "runs"
    run = fake_run(runs, "full", "resnet34_unet", [0.6, 0.8], scheduler="cosine", stop_reason="completed all epochs")
    per_breed = {f"breed_{i:02d}": {"dice": 0.5 + i / 100, "iou": 0.4, "images": 10} for i in range(37)}
    run.write_json("eval_test_last.json", {"checkpoint": "last", "arch": "resnet34_unet", "dice": 0.9, "iou": 0.8,
                                           "per_breed": per_breed})
    text = write_report(runs, tmp_path / "report").read_text()
    test_part = text[text.index("## Test:"):]
    header = next(line for line in test_part.splitlines() if line.startswith("| run"))
    assert "breed_00" not in header and header.count("|") < 20
    assert "| breed | full last.pt |" in test_part
    assert "| breed_36 | 0.8600 |" in test_part and "| breed_00 | 0.5000 |" in test_part
    # three breeds (the 3-breed subset) stay columns of the one table
    run.write_json("eval_test_last.json", {"checkpoint": "last", "arch": "resnet34_unet", "dice": 0.9, "iou": 0.8,
                                           "per_breed": dict(list(per_breed.items())[:3])})
    text = write_report(runs, tmp_path / "report").read_text()
    assert "breed_02 dice" in text and "| breed |" not in text


def test_the_latest_run_is_the_one_its_summary_says_finished_last_even_in_copied_folders(tmp_path):
    """File times change with a copy (cp without -p, a download): the run that trained last is the
    one whose summary says it finished last, and runs.csv gives that time as a date."""
    import os
    import shutil

    from labseg.runs import list_runs

    runs = tmp_path / "runs"
    older = fake_run(runs, "older", "unet", [0.6, 0.7])
    newer = fake_run(runs, "newer", "unet", [0.6, 0.8])
    older.write_json("summary.json", {**older.read_summary(), "finished_at": "2026-01-01T10:00:00+00:00"})
    newer.write_json("summary.json", {**newer.read_summary(), "finished_at": "2026-01-02T10:00:00+00:00"})
    copied = tmp_path / "copied"
    copied.mkdir()
    for name in ("newer", "older"):          # copied newest first: file times say the opposite
        shutil.copytree(runs / name, copied / name, copy_function=shutil.copy)
        os.utime(copied / name / "summary.json", (os.path.getmtime(copied / name / "summary.json") + 60,) * 2)
    assert [r.name for r in list_runs(copied)] == ["older", "newer"]
    csv = pd.read_csv(write_report(copied, tmp_path / "report").parent / "runs.csv").set_index("run")
    assert csv.loc["newer", "trained_at"] == "2026-01-02T10:00:00Z"


def test_a_runs_summary_says_when_it_finished_and_from_what_code(tmp_path, synthetic_root):
    from datetime import datetime, timezone

    import shutil

    import labseg
    from labseg.config import PROJECT_ROOT
    from labseg.train import fit

    before = datetime.now(timezone.utc).replace(microsecond=0)
    s = fit(arch="unet", data_dir=str(synthetic_root), img_size=32, batch_size=4, max_train_images=4, epochs=1,
            output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), progress=False).summary
    assert before <= datetime.fromisoformat(s["finished_at"]) <= datetime.now(timezone.utc)
    assert s["code"]["labseg"] == labseg.__version__
    if (PROJECT_ROOT / ".git").exists() and shutil.which("git"):
        assert len(s["code"]["commit"]) == 40 and isinstance(s["code"]["labseg_changed"], bool)


def test_the_code_record_names_the_projects_own_commit_not_one_of_a_repository_around_it(tmp_path, monkeypatch):
    import os
    import shutil
    import subprocess

    import pytest

    import labseg.config
    from labseg.machine import code_version

    if shutil.which("git") is None:
        pytest.skip("git is not installed: code_version records the version alone")
    outer = tmp_path / "outer"
    (outer / "proj").mkdir(parents=True)
    (outer / "labseg").mkdir()
    (outer / "labseg" / "train.py").write_text("# edited\n")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "outer"]):
        subprocess.run(["git", "-C", str(outer), *args], check=True, env={**os.environ, **env})
    monkeypatch.setattr(labseg.config, "PROJECT_ROOT", outer / "proj")     # a copy inside another repository
    assert set(code_version()) == {"labseg"}
    monkeypatch.setattr(labseg.config, "PROJECT_ROOT", outer)              # the repository's own top
    code = code_version()
    assert len(code["commit"]) == 40 and code["labseg_changed"] is True    # labseg/train.py is uncommitted


def test_an_evaluation_of_an_epoch_its_checkpoint_no_longer_holds_is_not_the_runs_score(tmp_path):
    """`labseg evaluate RUN` while RUN trained recorded the scores of a mid-training checkpoint, and
    the report showed them as the finished run's. An evaluation whose epoch is not the one its
    checkpoint holds now (last.pt: the last epoch; best.pt: best_epoch) is left out, with a note;
    one from before evaluations recorded their epoch is kept."""
    run = fake_run(tmp_path, "peeked", "unet", [0.3, 0.5, 0.4], scheduler="cosine", stop_reason="completed all epochs")
    for name in ("best.pt", "last.pt"):
        (run.path / name).write_bytes(b"")
    run.write_json("eval_test.json", {"checkpoint": "best", "epoch": 1, "dice": 0.2, "iou": 0.1})     # stale
    run.write_json("eval_test_last.json", {"checkpoint": "last", "epoch": 3, "dice": 0.45, "iou": 0.4})
    row = collect_runs(tmp_path).set_index("run").loc["peeked"]
    assert row[["status", "checkpoint", "test_dice", "test_dice_last"]].tolist() == ["finished", "last", 0.45, 0.45]
    assert pd.isna(row["test_dice_best"])
    assert row["error"] == ("its test scores of best.pt are of epoch 1 (evaluated while it trained, or before it "
                            "trained further) and best.pt now holds epoch 2: evaluate it again (labseg evaluate "
                            "peeked --checkpoint best)")
    assert evaluation_breakdown(tmp_path)[["checkpoint", "test_dice"]].values.tolist() == [["last", 0.45]]
    # last.pt evaluated at epoch 2 of 3: stale too; with no epoch recorded (older labseg): kept
    run.write_json("eval_test_last.json", {"checkpoint": "last", "epoch": 2, "dice": 0.45, "iou": 0.4})
    assert pd.isna(collect_runs(tmp_path).set_index("run").loc["peeked", "test_dice"])
    run.write_json("eval_test.json", {"checkpoint": "best", "dice": 0.2, "iou": 0.1})
    assert collect_runs(tmp_path).set_index("run").loc["peeked", "test_dice_best"] == 0.2


@pytest.mark.parametrize("file,value,said", [
    ("eval_test.json", {"dice": 0.8, "tta": "yes"}, "tta holds a str; expected a JSON object"),
    ("eval_test.json", {"dice": 0.8, "per_breed": ["x"]}, "per_breed holds a list; expected a JSON object"),
    ("eval_test.json", {"dice": 0.8, "per_breed": {"cat": "0.8"}}, "an entry of per_breed holds a str"),
    ("eval_test.json", {"dice": 0.8, "checkpoint": ["x"]}, "checkpoint holds a list; expected text"),
    ("summary.json", {"best_valid_dice": 0.8, "machine": "a string"}, "machine holds a str"),
    ("metrics.json", ["x"], "a row holds a str; expected an object with its epoch"),
    ("failed.json", {"error": "boom", "params": ["x"]}, "params holds a list"),
])
def test_one_run_folders_odd_record_is_that_runs_damaged_row_not_the_reports_end(tmp_path, file, value, said):
    """A received run folder whose records hold values of other types once ended `labseg report`
    and 06_report for every run in an AttributeError or TypeError."""
    runs = tmp_path / "runs"
    fake_run(runs, "good", "unet", [0.5, 0.6], test=0.7)
    odd = fake_run(runs, "odd", "unet", [0.5, 0.6], test=0.7)
    odd.write_json(file, value)
    text = write_report(runs, tmp_path / "report").read_text()
    table = collect_runs(runs).set_index("run")
    assert table.loc["good", "status"] == "finished" and table.loc["good", "test_dice"] == 0.7
    assert table.loc["odd", "status"] in ("damaged record", "failed", "finished")
    assert said in " ".join(str(e) for e in table["error"].dropna()) + text


def test_an_evaluation_written_before_tta_was_an_object_still_counts(tmp_path):
    """Before e7594a9 an evaluation without TTA recorded "tta": false: it is read as no TTA figure,
    not as a damaged record."""
    runs = tmp_path / "runs"
    run = fake_run(runs, "old", "unet", [0.5, 0.6])
    run.write_json("eval_test.json", {"dice": 0.58, "iou": 0.45, "tta": False})
    row = collect_runs(runs).set_index("run").loc["old"]
    assert row["test_dice_best"] == 0.58 and "tta holds" not in row["error"]


def _student_run(runs, name, arch, dice, data_dir, names_sha1, finished_at):
    run = fake_run(runs, name, arch, [dice / 2, dice])
    run.write_json("config.json", {**run.read_json("config.json"), "data_dir": data_dir})
    run.write_summary({**run.read_summary(), "finished_at": finished_at,
                       "trainval": {"images": 300, "names_sha1": names_sha1}})
    return run


def test_runs_on_one_dataset_from_several_machines_compare_and_ties_go_to_the_first(tmp_path):
    """A class's runs hold the 3-breed data at as many paths as students: compared by path, the
    report's best runs and curves were the latest student's alone, and `labseg evaluate` chose
    among them only. Runs compare by their images' fingerprint; two datasets in folders of one
    name stay apart. A tie went to the first name in the report and the oldest run in evaluate."""
    from labseg.runs import best_run

    runs = tmp_path / "runs"
    same, other = "a" * 40, "b" * 40
    _student_run(runs, "ann", "unet", 0.90, "/home/ann/pets", same, "2026-11-01T10:00:00+00:00")
    _student_run(runs, "bob", "unet", 0.90, "/home/bob/pets", same, "2026-10-01T10:00:00+00:00")   # same Dice, earlier
    _student_run(runs, "cid", "resnet34_unet", 0.85, "/home/cid/pets", same, "2026-11-02T10:00:00+00:00")
    _student_run(runs, "dan", "unet", 0.99, "/home/dan/pets", other, "2026-09-01T10:00:00+00:00")  # other data
    _student_run(runs, "eve", "resnet34_unet", 0.80, "/home/eve/pets", same, "2026-11-03T10:00:00+00:00")  # latest
    best = best_per_arch(collect_runs(runs))
    assert best["run"].to_dict() == {"resnet34_unet": "cid", "unet": "bob"}
    assert best_run(runs).name == "bob" and best_run(runs, arch="resnet34_unet").name == "cid"
    drawn = {line.get_label() for line in plot_curves(runs).axes[0].lines}
    assert not any("dan" in label for label in drawn) and len(plot_curves(runs).axes[0].lines) == 4


def test_the_notebooks_tables_show_text_as_it_is_and_report_md_escaped(tmp_path):
    """formatted() feeds the notebooks' pandas tables, which escape HTML themselves: "R&D" read
    "R&amp;D" there, and a | came out as \\|."""
    from labseg.report import formatted

    df = pd.DataFrame({"dataset": ["R&D|pets"], "best_valid_dice": [0.81234]})
    assert formatted(df).iloc[0].tolist() == ["R&D|pets", "0.8123"]
    assert markdown_table(df).splitlines()[-1] == "| R&amp;D\\|pets | 0.8123 |"


def test_a_run_one_folder_too_deep_is_named_not_silently_left_out(tmp_path):
    """A student's archive unpacked into a folder of its name (aj/aj/config.json) was missing from
    the report without a word."""
    runs = tmp_path / "runs"
    fake_run(runs, "ann", "unet", [0.5, 0.6])
    fake_run(runs / "aj", "aj", "unet", [0.4, 0.7])
    (runs / "empty").mkdir()
    text = write_report(runs, tmp_path / "report").read_text()
    assert ("Folders here that hold no run record, not listed above: `aj` (holds the run(s) aj one level down: move "
            "them up to be listed); `empty`.") in text


def test_the_curves_of_a_class_name_each_networks_few_best(tmp_path):
    """Beyond a dozen runs only the bold best of each network was named: the second best of 40
    could not be told from the rest."""
    runs = tmp_path / "runs"
    for i in range(16):
        fake_run(runs, f"u{i:02d}", "unet", [0.3, 0.3 + i / 100])
    labels = {line.get_label() for line in plot_curves(runs).axes[0].lines if not line.get_label().startswith("_")}
    assert labels == {"u15 (best unet)", "u14", "u13"}


def test_two_datasets_of_one_name_are_told_apart_in_the_best_run_table(tmp_path):
    """Runs from before labseg recorded their images, from machines whose folders are not here, are
    grouped by path: three rows all reading "sample" could not be told apart."""
    from labseg.report import best_per_dataset

    runs = tmp_path / "runs"
    for name, data, dice in (("anna", "/home/anna/data/sample", 0.8), ("ben", "/Users/ben/data/sample", 0.75)):
        run = fake_run(runs, name, "unet", [dice])
        run.write_json("config.json", {**run.read_json("config.json"), "data_dir": data})
    best = best_per_dataset(collect_runs(runs)).set_index("run")
    assert best.loc["anna", "dataset"] == "sample (/home/anna/data/sample)"
    assert best.loc["ben", "dataset"] == "sample (/Users/ben/data/sample)"


def test_an_older_run_without_its_images_record_joins_the_newer_runs_on_its_folder(tmp_path, synthetic_root):
    """An older run's key is its folder's image names, less the pairs it skipped (an image that
    would not decode is in its summary's "skipped", not among the names a newer run records)."""
    import hashlib
    import shutil

    from labseg.data import read_records_quiet
    from labseg.runs import dataset_key

    data = tmp_path / "pets"
    shutil.copytree(synthetic_root, data)
    names = sorted(r.name for r in read_records_quiet(data, "trainval"))
    recorded = {"names_sha1": hashlib.sha1("\n".join(names[1:]).encode()).hexdigest(), "images": len(names) - 1}
    old = {"skipped": [[str(data / "images" / f"{names[0]}.jpg"), "empty file (0 bytes)"]]}
    assert dataset_key(old, data) == dataset_key({"trainval": recorded}, data) == recorded["names_sha1"]
    assert dataset_key({}, data) != recorded["names_sha1"]
    # the folder's list is read again once it changes (a long-lived notebook kernel)
    (data / "annotations" / "trainval.txt").write_text(f"{names[1]} 1 1 1\n")
    assert dataset_key({}, data) == hashlib.sha1(names[1].encode()).hexdigest()


def test_a_copy_of_a_run_is_said_to_be_one(tmp_path):
    """Two students' folders holding one run (a copied submission) read as two runs, each ranked."""
    import shutil

    runs = tmp_path / "runs"
    original = fake_run(runs, "ann", "unet", [0.5, 0.6])
    original.write_summary({**original.read_summary(), "finished_at": "2026-11-01T10:00:00.123+00:00"})
    shutil.copytree(original.path, runs / "bob")
    fake_run(runs, "cid", "unet", [0.5, 0.6])       # the same figures, trained at another moment
    table = collect_runs(runs).set_index("run")
    assert "the same run as bob (its records agree to the millisecond it finished: a copy?)" in table.loc["ann", "error"]
    assert "the same run as ann" in table.loc["bob", "error"]
    assert "the same run" not in str(table.loc["cid", "error"])


def _loss_runs(runs, *curves):
    """Runs of one network whose valid losses are ``curves``, the first the best."""
    for i, losses in enumerate(curves):
        run = fake_run(runs, f"run{i}", "unet", [0.9 - 0.1 * i] * len(losses))
        run.write_metrics([{"epoch": e + 1, "train_loss": 1.0, "valid_loss": loss, "valid_dice": 0.9 - 0.1 * i,
                            "valid_iou": 0.5} for e, loss in enumerate(losses)])


def _labelled_loss_ticks(fig):
    """(value, text) of the loss axis's labelled ticks within its limits, majors and minors."""
    ax = fig.axes[1]
    fig.draw_without_rendering()        # the formatters write the labels as the figure is drawn
    low, high = ax.get_ylim()
    ticks = [(tick.get_loc(), tick.label1.get_text()) for tick in ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks()]
    return sorted((loc, text) for loc, text in ticks if text and low <= loc <= high)


def test_the_log_loss_axis_labels_powers_of_ten_across_decades_and_plain_numbers_within_one(tmp_path):
    """Across decades the minor ticks' labels piled up ("1000 500 600 ..."); over 0.78-1.4 the
    log ticks 0.8, 0.9, 1, 2 labelled nothing above 1."""
    import math

    _loss_runs(tmp_path / "decades", [1000, 15, 2, 0.5, 0.2], [3, 1, 0.6, 0.4, 0.3])
    labelled = _labelled_loss_ticks(plot_curves(tmp_path / "decades"))
    assert [loc for loc, _ in labelled] == pytest.approx([1, 10, 100, 1000]), labelled     # the powers of ten alone
    _loss_runs(tmp_path / "within", [1.4, 0.95], [0.8, 0.78])
    labelled = _labelled_loss_ticks(plot_curves(tmp_path / "within"))
    assert [text for _, text in labelled] == ["0.8", "1", "1.2", "1.4"], labelled
    _loss_runs(tmp_path / "one-power", [5, 1, 0.5], [0.4, 0.3])       # 10^0 alone inside: at least two
    labelled = _labelled_loss_ticks(plot_curves(tmp_path / "one-power"))
    assert len(labelled) >= 2 and all(math.log10(loc).is_integer() for loc, _ in labelled), labelled


def test_a_networks_other_runs_are_told_apart_by_their_dashes(tmp_path):
    _loss_runs(tmp_path, [0.5, 0.4], [0.6, 0.5], [0.7, 0.6], [0.8, 0.7])
    lines = {line.get_label(): line for line in plot_curves(tmp_path).axes[0].lines}
    assert lines["run0 (best unet)"].get_linestyle() == "-"
    assert [lines[f"run{i}"].get_linestyle() for i in (1, 2, 3)] == ["--", ":", "-."]
    assert len({lines[name].get_color() for name in lines}) == 1        # in the network's colour


def test_the_best_run_chart_names_its_dataset_and_draws_no_bar_for_a_missing_test_dice(tmp_path):
    from matplotlib.colors import to_rgba

    from labseg.report import plot_best

    fake_run(tmp_path, "tested", "unet", [0.6, 0.8], test=0.7)
    fake_run(tmp_path, "untested", "resnet34_unet", [0.9])
    ax = plot_best(collect_runs(tmp_path)).axes[0]
    assert ax.get_title() == "best run per network on sample"     # one dataset's runs, as curves.png says
    test_bars = [bar for bar in ax.patches if bar.get_facecolor() == to_rgba("lightgray")]
    assert [round(bar.get_height(), 3) for bar in test_bars] == [0.7]   # none of height 0 for "untested"


@pytest.mark.parametrize("networks", [1, 2])
def test_without_test_scores_the_best_run_bars_stand_on_their_labels(tmp_path, networks):
    """The valid bars made room for test bars that never came: left of their labels, and a
    single run's label hung off the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from labseg.report import plot_best

    for arch in ["unet", "resnet34_unet"][:networks]:
        fake_run(tmp_path, f"a-very-long-run-name-from-a-sweep_{arch}_img64_lr0.001_e40", arch, [0.6, 0.8])
    fig = plot_best(collect_runs(tmp_path))
    ax = fig.axes[0]
    centres = sorted(bar.get_x() + bar.get_width() / 2 for bar in ax.patches)
    assert centres == pytest.approx(sorted(ax.get_xticks()))
    low, high = ax.get_xlim()
    assert (low + high) / 2 == pytest.approx(sum(centres) / len(centres))      # the bars centred
    assert all(bar.get_width() <= (high - low) / 4 for bar in ax.patches)        # a bar, not a wall
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    for label in ax.get_xticklabels():                                           # on the figure
        box = label.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_the_report_of_runs_reads_their_records_without_importing_torch(tmp_path):
    """`labseg report` over a class's runs: records and figures only (torch and torchvision were
    ~75% of its time). A run's evaluation is shown, so the records were read."""
    import subprocess
    import sys

    runs = tmp_path / "runs"
    for name, arch in (("a", "unet"), ("b", "resnet34_unet")):
        run = fake_run(runs, name, arch, [0.6, 0.7], test=0.72, scheduler="cosine", stop_reason="completed all epochs")
        run.write_summary({**run.read_summary(), "trainval": {"images": 3, "names_sha1": "f00"}})
    code = ("import sys\nfrom labseg.cli import main\n"
            f"rc = main(['report', '--output-dir', {str(runs)!r}, '--report-dir', {str(tmp_path / 'report')!r}])\n"
            "print(rc, 'torch imported' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "0 no torch", (out.stdout[-500:], out.stderr[-500:])
    assert "0.720" in (tmp_path / "report" / "report.md").read_text()
