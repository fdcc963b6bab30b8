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
    # two data folders of one name in one grid: those points are named with their whole paths
    from labseg.sweep import point_names
    same_name = expand({"arch": ["unet"], "data_dir": ["/a/pets", "/b/pets", "/c/other"]})
    assert point_names(same_name) == ["arch=unet+data_dir=_a_pets", "arch=unet+data_dir=_b_pets",
                                      "arch=unet+data_dir=other"]
    # the names before session 35 (whole paths, never cut) are found again, however long
    deep = {"arch": "unet", "data_dir": "/" + "/".join(["folder"] * 40)}
    assert len(point_name(deep, whole_paths=True, limit=None)) > 200 and len(point_name(deep)) < 200
    # a name longer than a file system takes keeps its start and a digest of the whole
    long_a, long_b = (point_name({"arch": "unet", "run_note": "x" * 300 + end}) for end in "ab")
    assert len(long_a) == 200 and long_a.startswith("arch=unet+run_note=xxx") and long_a != long_b
    with pytest.raises(SweepError):
        parse_sets(["arch"])


def test_none_is_a_value_where_a_field_has_it_and_an_empty_item_is_refused(tmp_path):
    """augment=none means no augmentation, not the recipe's augmentation: the two points of
    augment=none,flip must differ (they trained the same run before). null is the recipe's value."""
    from labseg.sweep import check_points

    grid = parse_sets(["augment=none,flip", "scheduler=None", "norm=none", "decoder_attention=none",
                       "time_budget=none", "lr=null"])
    assert grid == {"augment": ["none", "flip"], "scheduler": ["none"], "norm": ["none"],
                    "decoder_attention": ["none"], "time_budget": [None], "lr": [None]}
    (tmp_path / "grid.yaml").write_text("augment: [none, flip]\nscheduler: null\n")
    assert load_grid(tmp_path / "grid.yaml") == {"augment": ["none", "flip"], "scheduler": [None]}
    check_points(expand(parse_sets(["arch=unet", "augment=none,flip", "norm=none"])))    # valid values
    with pytest.raises(SweepError, match="lr: an empty value"):
        parse_sets(["lr=1e-3,,3e-4"])


def test_tiny_sweep_records_failures_and_skips_finished(tmp_path, synthetic_root, small_net_everywhere):
    # the bookkeeping of a sweep's points, whatever they train: a small network
    missing = tmp_path / "no-such-dataset"          # valid config; only training finds it missing
    net = small_net_everywhere
    grid = {"data_dir": [str(synthetic_root), str(missing)], "arch": [net], "epochs": [1], "img_size": [32],
            "max_train_images": [4], "batch_size": [4], "cache_dir": [str(tmp_path / "cache")]}
    runs = tmp_path / "runs"
    results = run_sweep(grid, output_dir=runs, progress=False)
    by_data = {r["data_dir"]: r for r in results}
    good, failed = by_data[str(synthetic_root)], by_data[str(missing)]
    assert good["status"] == "finished", good
    assert failed["status"] == "failed"
    assert str(missing) in failed["error"]
    ok, bad = runs / good["run"], runs / failed["run"]
    assert (ok / "04_train.ipynb").is_file() and (ok / "summary.json").is_file()
    assert json.loads((bad / "failed.json").read_text())["params"]["data_dir"] == str(missing)
    assert (bad / "04_train.ipynb").is_file()
    assert "failed" in format_results(results)
    grid = {**grid, "data_dir": [str(synthetic_root)]}

    mtime = (ok / "summary.json").stat().st_mtime_ns
    again = run_sweep({**grid, "arch": [net]}, output_dir=runs, progress=False)
    assert again[0]["status"].startswith("done before")
    assert (ok / "summary.json").stat().st_mtime_ns == mtime
    # a point that names its run is still the point of that folder (run_name is not compared)
    from labseg.sweep import recorded_differs
    assert recorded_differs(ok, {k: v[0] for k, v in grid.items()} | {"run_name": "mine"}) is None
    assert "it was trained with epochs=1, this point asks for 2" in recorded_differs(
        ok, {k: v[0] for k, v in grid.items()} | {"epochs": 2})
    # a value the grid leaves to the recipe counts too: the recipe edited since makes it another run
    from labseg.recipes import RECIPES
    kept = dict(RECIPES[net])
    try:
        RECIPES[net]["lr"] = 0.01
        assert ("it was trained with lr=0.003, where this point now takes lr=0.01 from the recipe or 04_train's "
                "defaults") in recorded_differs(ok, {k: v[0] for k, v in grid.items()})
        # a field a resume may change, left out of the grid: the point trained further by hand is still this one
        left_out = {k: v[0] for k, v in grid.items() if k != "epochs"}
        RECIPES[net]["lr"] = kept["lr"]
        assert recorded_differs(ok, left_out) is None
        # ... but not where it trains: 04_train's default dataset is not the one it trained on
        assert "it was trained with data_dir=" in recorded_differs(ok, {k: v for k, v in left_out.items()
                                                                          if k != "data_dir"})
    finally:
        RECIPES[net] = kept
    # a point finished under the name sweeps gave before (the whole path) is found, not trained again
    old_name = point_name({k: v[0] for k, v in grid.items()}, whole_paths=True, limit=None)
    assert old_name != good["run"] and str(synthetic_root).replace("/", "_") in old_name
    (ok).rename(runs / old_name)
    (found,) = run_sweep(grid, output_dir=runs, progress=False)
    assert found["status"].startswith("done before") and found["run"] == old_name
    (runs / old_name).rename(ok)
    # a folder is named by its last part; another folder of that name is another point, not skipped
    assert f"data_dir={synthetic_root.name}+" in good["run"] and str(tmp_path) not in good["run"]
    elsewhere = tmp_path / "elsewhere" / synthetic_root.name
    (other,) = run_sweep({**grid, "data_dir": [str(elsewhere)]}, output_dir=runs, progress=False)
    assert other["run"] == good["run"] and other["status"] == "failed"
    assert f"holds another run: it was trained with data_dir={str(synthetic_root)!r}" in other["error"]
    assert f"this point asks for {str(elsewhere)!r}; give the sweep a --prefix" in other["error"]
    assert other["error"].endswith("to keep the two apart")     # not --force: it would redo every point
    assert (ok / "summary.json").stat().st_mtime_ns == mtime


def test_invalid_points_stop_the_sweep_before_any_run(tmp_path):
    grid = {"arch": ["unet", "resnet34_unet", "nope"], "drop_path": [0.1], "epochs": [1]}
    with pytest.raises(SweepError) as e:
        run_sweep(grid, output_dir=tmp_path / "runs", progress=False)
    message = str(e.value)
    assert message.startswith("2 of 3 sweep points are invalid; nothing was run")
    assert "arch=unet+drop_path=0.1+epochs=1: drop_path=0.1 is for resnet34_unet" in message
    assert "arch=nope+drop_path=0.1+epochs=1: arch='nope' is not valid" in message
    assert "arch=resnet34_unet" not in message
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SweepError, match=r"ephocs=1: unknown config key\(s\) \['ephocs'\]"):
        run_sweep({"arch": ["unet"], "ephocs": [1]}, output_dir=tmp_path / "runs", progress=False)


def test_points_are_checked_with_the_values_04_train_runs_them_with():
    """A point that leaves arch out trains 04_train's unet, not labseg train's resnet34_unet: a unet
    option passes, a resnet34_unet one is refused before any run, naming unet."""
    from labseg.sweep import check_points
    from labseg.workbook import default_run_name, train_notebook_defaults

    assert train_notebook_defaults()["arch"] == "unet" and train_notebook_defaults()["img_size"] == 64
    check_points(expand(parse_sets(["norm=none", "epochs=1"])))
    with pytest.raises(SweepError, match=r"decoder_attention='scse' is for resnet34_unet; unet has no such option"):
        check_points(expand(parse_sets(["decoder_attention=scse", "epochs=1"])))
    assert default_run_name({"epochs": 1}).startswith("sample-unet-64px")


def test_a_key_set_twice_is_refused():
    with pytest.raises(SweepError, match="--set img_size is given twice; give its values once"):
        parse_sets(["img_size=32", "img_size=64"])


def test_cli_prints_a_bad_sweep_as_an_error_not_a_traceback(tmp_path, capsys):
    from labseg.cli import main

    assert main(["sweep", "--set", "arch", "--output-dir", str(tmp_path)]) == 2
    assert "labseg: error: --set 'arch': expected NAME=VALUE" in capsys.readouterr().err
    assert main(["sweep", "--set", "arch=unet", "--set", "drop_path=0.1", "--output-dir", str(tmp_path)]) == 2
    assert "labseg: error: 1 of 1 sweep points are invalid; nothing was run" in capsys.readouterr().err


def test_a_grid_file_that_is_not_yaml_or_missing_is_an_error_naming_it(tmp_path, capsys):
    from labseg.cli import main

    bad = tmp_path / "grid.yaml"
    bad.write_text("arch: [unet\nlr: 1e-3\n")
    with pytest.raises(SweepError, match=r"grid.yaml is not valid YAML \(ParserError"):
        load_grid(bad)
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert f"labseg: error: grid file {tmp_path / 'nope.yaml'} does not exist" in capsys.readouterr().err


def test_a_rerun_resumes_an_interrupted_point_and_finds_a_prefixed_one(tmp_path, synthetic_root,
                                                                       small_net_everywhere):
    from labseg.train import fit

    # the resume's bookkeeping, whatever the point trains: a small network
    common = {"arch": small_net_everywhere, "img_size": 32, "max_train_images": 4, "data_dir": str(synthetic_root),
              "cache_dir": str(tmp_path / "cache")}     # not the project's data/cache
    grid = {k: [v] for k, v in {**common, "epochs": 2}.items()}
    name = point_name({**common, "epochs": 2}, "my run")
    assert name.startswith("my_run+arch=small_net+")
    # the point as a kill in its second epoch leaves it: one epoch in last.pt, no summary
    fit(**common, epochs=1, run_name=name, output_dir=str(tmp_path), progress=False)
    (tmp_path / name / "summary.json").unlink()
    (result,) = run_sweep(grid, output_dir=tmp_path, prefix="my run", progress=False)
    assert result["status"] == "finished" and result["run"] == name, result
    assert [r["epoch"] for r in json.loads((tmp_path / name / "metrics.json").read_text())] == [1, 2]
    notebook = (tmp_path / name / "04_train.ipynb").read_text()
    assert "resuming" in notebook                           # epoch 1 was kept, not trained again
    (again,) = run_sweep(grid, output_dir=tmp_path, prefix="my run", progress=False)
    assert again["status"].startswith("done before")


def test_redoing_a_finished_point_says_what_it_deletes(tmp_path, capsys):
    from labseg.workbook import run_training_notebook

    folder = tmp_path / "runs" / "point"
    folder.mkdir(parents=True)
    for name in ("summary.json", "best.pt", "eval_test.json", "eval_test_last.json"):
        (folder / name).write_text("{}")
    # A point that fails at once (no such dataset) still replaces the finished run it was given.
    run_training_notebook({"arch": "unet", "epochs": 1, "img_size": 32, "data_dir": str(tmp_path / "none")},
                          output_dir=tmp_path / "runs", name="point", exact=True, raise_on_error=False)
    said = capsys.readouterr().out
    assert f"replacing {folder}: deleting its 4 file(s) (2 evaluation(s): eval_test.json, eval_test_last.json)" in said
    assert not (folder / "eval_test.json").exists() and (folder / "failed.json").is_file()


def test_ctrl_c_stops_a_sweep_with_one_line_and_the_point_resumable(tmp_path, synthetic_root, small_net_everywhere):
    """Ctrl-C during a point: the sweep says what to do next, with no traceback from the kernel
    (zmq) or from asyncio (DeadKernelError), and the point keeps its epochs for the rerun. (Any
    network will do: a small one, in the sweep's process and its kernel through $LABSEG_PLUGINS.)"""
    import signal
    import subprocess
    import sys

    runs = tmp_path / "runs"
    sets = {"arch": small_net_everywhere, "img_size": 32, "epochs": 500, "max_train_images": 4, "batch_size": 4,
            "data_dir": str(synthetic_root), "cache_dir": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "labseg.cli", "sweep", "--output-dir", str(runs)]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    # SIGINT as a terminal's Ctrl-C delivers it, also where the test runner ignores it
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not list(runs.glob("*/last.pt")) and time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.5)
        assert list(runs.glob("*/last.pt")), "no epoch finished"
        sweep.send_signal(signal.SIGINT)
        output, _ = sweep.communicate(timeout=120)
    finally:
        sweep.kill()
    assert sweep.returncode == 130, output
    assert "labseg: sweep interrupted; run the same command again" in output
    assert "Traceback" not in output and "DeadKernelError" not in output and "zmq" not in output, output
    (point,) = [p for p in runs.iterdir() if p.is_dir()]
    assert (point / "last.pt").is_file() and not (point / "summary.json").exists()
    assert json.loads((point / "metrics.json").read_text())        # its epochs are kept for the rerun


def test_a_point_extended_and_stopped_is_resumed_not_deleted(tmp_path):
    """A finished point that the user resumed for more epochs, stopped after a checkpoint: its
    summary.json is an earlier session's. The sweep counts it unfinished, and so must the rerun,
    which used to take it for finished and delete it (checkpoints included) to run it afresh."""
    from labseg.runs import RunDir
    from labseg.sweep import is_finished
    from labseg.workbook import run_training_notebook

    folder = tmp_path / "runs" / "point"
    folder.mkdir(parents=True)
    run = RunDir(folder)
    run.write_summary({"best_valid_dice": 0.5, "epochs_run": 2})
    run.write_metrics([{"epoch": e, "valid_dice": 0.5} for e in (1, 2, 3)])
    (folder / "last.pt").write_bytes(b"the extended run's weights")
    assert run.summary_outdated() and not is_finished(folder)
    run_training_notebook({"arch": "unet", "epochs": 4, "img_size": 32, "data_dir": str(tmp_path / "none")},
                          output_dir=tmp_path / "runs", name="point", exact=True, raise_on_error=False,
                          progress=False)
    assert (folder / "last.pt").read_bytes() == b"the extended run's weights"      # resumed (and failed), kept


def test_a_point_another_process_is_training_is_skipped_and_left_untouched(tmp_path, capsys):
    """A second sweep (or a resume by hand) training a point's folder holds its .training lock:
    this sweep used to delete that folder under it and write failed.json into it, so the good run
    read as failed and evaluate refused it. Now the point is skipped, its folder left as it is, and
    the sweep's exit status does not count it as failed."""
    from labseg.cli import main
    from labseg.runs import RunDir

    sets = {"arch": "unet", "epochs": 1, "img_size": 32, "data_dir": str(tmp_path / "none")}
    folder = tmp_path / "runs" / point_name(sets)
    folder.mkdir(parents=True)
    for name in (".claimed", "config.json"):        # a run started, before its first checkpoint
        (folder / name).write_text("{}")
    with RunDir(folder).lock_for_training():        # as the process training it holds it
        before = sorted(p.name for p in folder.iterdir())
        (result,) = run_sweep({k: [v] for k, v in sets.items()}, output_dir=tmp_path / "runs", progress=False)
        assert result["status"] == "being trained by another process (skipped)", result
        assert "is being trained by another process now (or was, meanwhile); it was left as it is" in result["error"]
        assert format_results([result]).splitlines()[1].startswith("skipped")
        argv = ["sweep", "--output-dir", str(tmp_path / "runs"), "--quiet"]
        assert main(argv + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]) == 0
        assert "skipped" in capsys.readouterr().out
        assert sorted(p.name for p in folder.iterdir()) == before
    assert not (folder / "failed.json").exists()


def test_a_run_taken_by_another_process_while_its_notebook_starts_gets_no_failed_json(tmp_path, monkeypatch):
    """Another process may claim the folder between the check and 04_train's fit, which then
    refuses the run: the failure is not this run's, and a failed.json there would mark the other
    process's good run as failed."""
    from contextlib import ExitStack

    import labseg.workbook
    from labseg.runs import RunDir, RunExistsError

    held = ExitStack()

    def taken_meanwhile(name, output, params, **_):
        (output.parent / "config.json").write_text("{}")
        held.enter_context(RunDir(output.parent).lock_for_training())      # the other process trains it
        raise labseg.workbook.NotebookFailed(f"04_train failed in cell 5: RunExistsError: run folder "
                                             f"{output.parent} exists; resume it")

    monkeypatch.setattr(labseg.workbook, "run_notebook", taken_meanwhile)
    with held, pytest.raises(RunExistsError, match="is being trained by another process now"):
        labseg.workbook.run_training_notebook({"arch": "unet", "epochs": 1, "img_size": 32}, output_dir=tmp_path,
                                              name="point", exact=True, raise_on_error=False, progress=False)
    assert (tmp_path / "point" / "config.json").is_file() and not (tmp_path / "point" / "failed.json").exists()


def test_a_run_another_process_took_and_finished_while_the_notebook_started_gets_no_failed_json(tmp_path,
                                                                                                 monkeypatch):
    """As above, with the other process done by the time 04_train's fit refuses the name: no lock
    is held any more, but the refusal is still not this run's failure (the next sweep would delete
    the good run as a failed one)."""
    import labseg.workbook
    from labseg.runs import RunExistsError

    def taken_and_finished(name, output, params, **_):
        (output.parent / "config.json").write_text("{}")
        (output.parent / "summary.json").write_text("{}")
        raise labseg.workbook.NotebookFailed(f"04_train failed in cell 5: RunExistsError: run folder "
                                             f"{output.parent} exists; resume it", ename="RunExistsError")

    monkeypatch.setattr(labseg.workbook, "run_notebook", taken_and_finished)
    with pytest.raises(RunExistsError, match="being trained by another process now .or was, meanwhile."):
        labseg.workbook.run_training_notebook({"arch": "unet", "epochs": 1, "img_size": 32}, output_dir=tmp_path,
                                              name="point", exact=True, raise_on_error=False, progress=False)
    assert not (tmp_path / "point" / "failed.json").exists()


def test_a_point_replaced_under_its_lock_keeps_the_lock_file(tmp_path, monkeypatch):
    """The sweep empties a failed point's folder while it holds the run's .training lock: deleting
    the lock's file too let a second process lock a new file of that name, both "holding" the lock."""
    import labseg.workbook

    folder = tmp_path / "point"
    folder.mkdir()
    (folder / "failed.json").write_text('{"error": "x"}')
    (folder / "04_train.ipynb").write_text("{}")
    (folder / ".training").write_text("")
    lock_file = (folder / ".training").stat().st_ino
    seen = []

    def run_notebook(name, output, params, **_):
        seen.append(sorted(p.name for p in folder.iterdir()))
        seen.append((folder / ".training").stat().st_ino)

    monkeypatch.setattr(labseg.workbook, "run_notebook", run_notebook)
    labseg.workbook.run_training_notebook({"arch": "unet", "epochs": 1, "img_size": 32}, output_dir=tmp_path,
                                          name="point", exact=True, progress=False)
    assert seen == [[".training"], lock_file]


def test_a_point_whose_folder_is_a_link_fails_with_nothing_written_through_it(tmp_path):
    """A link where a point's folder goes (a run folder unpacked from an archive) is that point's
    failure, named; the sweep goes on, and the folder it points to is left as it was."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    sets = {"arch": "unet", "epochs": 1, "img_size": 32, "data_dir": str(tmp_path / "none")}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / point_name(sets)).symlink_to(victim)
    (result,) = run_sweep({k: [v] for k, v in sets.items()}, output_dir=tmp_path / "runs", progress=False)
    assert result["status"] == "failed" and f"is a link to {victim}" in result["error"], result
    assert format_results([result]).splitlines()[1].startswith("failed")
    assert [p.name for p in victim.iterdir()] == ["notes.txt"] and (victim / "notes.txt").read_text() == "mine"


def test_a_grid_given_through_the_api_is_read_as_the_cli_reads_it(tmp_path):
    """run_sweep took one value as a list of its letters ({"arch": "unet"}: points arch=u, arch=n...,
    data_dir a point per character), a number as a TypeError, {} as one point named '', a run_name as
    nothing, and extra as JSON text as "'str' object is not a mapping"."""
    with pytest.raises(SweepError, match="expected a mapping of parameters to values"):
        run_sweep({}, output_dir=tmp_path / "runs", progress=False)
    with pytest.raises(SweepError, match="run_name: a sweep names each point from its parameters"):
        run_sweep({"arch": ["unet"], "run_name": ["a", "b"]}, output_dir=tmp_path / "runs", progress=False)
    with pytest.raises(SweepError, match=r"1 of 1 sweep points are invalid.*\n  arch=nosuch: arch='nosuch'") as e:
        run_sweep({"arch": "nosuch"}, output_dir=tmp_path / "runs", progress=False)
    with pytest.raises(SweepError, match=r"(?s)1 of 1 sweep points are invalid.*extra='\{bad' is not JSON"):
        run_sweep({"arch": "unet", "extra": "{bad"}, output_dir=tmp_path / "runs", progress=False)
    with pytest.raises(SweepError, match=r"(?s)1 of 1 sweep points are invalid.*lr=-1.0"):
        run_sweep({"arch": "unet", "lr": -1.0}, output_dir=tmp_path / "runs", progress=False)
    assert "arch=u:" not in str(e.value) and not (tmp_path / "runs").exists()   # once a point per letter


def test_a_folder_given_as_the_grid_file_is_named_as_a_folder(tmp_path):
    with pytest.raises(SweepError, match=f"grid file {tmp_path} is a folder; expected a YAML file"):
        load_grid(tmp_path)


def test_a_runs_folder_below_a_file_is_refused_before_the_first_point(tmp_path, capsys):
    """`labseg sweep --output-dir README.md/runs` ended in a traceback (NotADirectoryError) at the
    first point's folder; it is one line, before any point."""
    from labseg.cli import main

    (tmp_path / "README.md").write_text("a file")
    capsys.readouterr()
    assert main(["sweep", "--set", "arch=unet", "--output-dir", str(tmp_path / "README.md" / "runs"), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"labseg: error: output_dir='{tmp_path / 'README.md' / 'runs'}': "
                                       f"{tmp_path / 'README.md'} is a file; expected a folder\n")


def test_a_range_or_an_array_is_a_list_of_values():
    """range(3) for seeds and np.logspace for learning rates once swept as one value each."""
    import numpy as np

    from labseg.sweep import _as_list

    seeds, lrs = _as_list("seed", range(3)), _as_list("lr", np.array([1e-3, 3e-4]))
    assert seeds == [0, 1, 2] and lrs == [1e-3, 3e-4]
    assert [type(v) for v in seeds + lrs] == [int] * 3 + [float] * 2
    assert _as_list("extra", {"ema": 0.99}) == [{"ema": 0.99}] and _as_list("arch", "unet") == ["unet"]


def test_an_interrupted_point_reached_through_a_link_is_resumed(tmp_path, monkeypatch):
    """A point moved to another disk and linked back (an interrupted run: a checkpoint, no summary)
    is resumed, as `labseg train --resume` resumes it; only a link to anything else is refused."""
    import labseg.workbook
    from labseg.workbook import run_training_notebook

    elsewhere = tmp_path / "big" / "intr"
    elsewhere.mkdir(parents=True)
    (elsewhere / "last.pt").write_bytes(b"a checkpoint")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "intr").symlink_to(elsewhere)
    started = []
    monkeypatch.setattr(labseg.workbook, "run_notebook", lambda name, out, params, **_: started.append(params))
    run_training_notebook({"arch": "unet"}, output_dir=tmp_path / "runs", name="intr", exact=True)
    assert started and started[0]["resume"] is True and (elsewhere / "last.pt").read_bytes() == b"a checkpoint"


def test_an_array_of_no_or_two_dimensions_is_one_value_or_refused():
    import numpy as np

    from labseg.sweep import _as_list

    assert _as_list("lr", np.array(1e-3)) == [1e-3]
    with pytest.raises(SweepError, match="lr: an array of 2 dimensions; expected one value or a list of them"):
        _as_list("lr", np.ones((2, 2)))


def test_a_grid_file_is_read_as_yaml_whatever_the_locales_encoding(tmp_path):
    """YAML is UTF-8 (or UTF-16 with a BOM); read as text in the locale's encoding, an accented path
    in a grid came out wrong on Windows (cp1252), and a UTF-16 file failed everywhere."""
    grid = 'data_dir: ["C:/Users/José/Données pets"]\narch: unet   # Álvaro’s grid\n'
    for encoding in ("utf-8", "utf-16"):
        path = tmp_path / f"grid-{encoding}.yaml"
        path.write_text(grid, encoding=encoding)
        assert load_grid(path) == {"data_dir": ["C:/Users/José/Données pets"], "arch": ["unet"]}
