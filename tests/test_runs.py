"""labseg.runs pieces tested on their own (the end-to-end run folder tests are in test_train.py)."""
import os
import re

import pytest
import torch
from torch import nn

from labseg.runs import CheckpointError, atomic_write_bytes, load_weights


def test_weights_of_another_shape_are_named_not_loaded():
    """Same keys, same arch, one tensor of another shape: a CheckpointError naming the key and
    both shapes (Conv2d(3, 1, 1).weight is out × in × kh × kw = 1×3×1×1), and the model untouched."""
    model = nn.Conv2d(3, 1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"weight": torch.ones(1, 2, 1, 1), "bias": torch.ones(1)}
    with pytest.raises(CheckpointError, match=r"first mismatched key 'weight': \(1, 2, 1, 1\) vs \(1, 3, 1, 1\)"):
        load_weights(model, {"arch": "conv", "model": state}, "conv")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_atomic_write_replaces_the_file_and_never_rewrites_it_in_place(tmp_path):
    """A reader of the old file (here: a second link to it) keeps the old bytes whole; the path
    names a new file with the new bytes. Writing into the old file would change both at once."""
    path = tmp_path / "last.pt"
    path.write_bytes(b"old checkpoint")
    os.link(path, tmp_path / "reader")
    atomic_write_bytes(path, b"new checkpoint, longer")
    assert path.read_bytes() == b"new checkpoint, longer"
    assert (tmp_path / "reader").read_bytes() == b"old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "reader"]     # no temporary file left


def test_a_write_that_fails_names_the_file_even_when_its_copy_cannot_be_removed(tmp_path, monkeypatch):
    """A run folder made read-only while training: the rename fails, and so does removing the
    unfinished copy; the error is still the write's (which file, the old one kept), not the removal's."""
    path = tmp_path / "best.pt"
    path.write_bytes(b"old")

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "replace", refused)
    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(path, b"x" * 3000)
    monkeypatch.undo()
    (copy,) = tmp_path.glob(".best.pt.*.tmp")
    assert str(info.value) == (f"[Errno 13] could not write {path} (2.9 KiB): Permission denied; the previous "
                               f"file, if any, is unchanged (its unfinished copy {copy} could not be removed: "
                               "Permission denied)")
    assert path.read_bytes() == b"old"


def _recorded_run(root, name, dice=0.5, **config):
    from labseg.config import RunConfig
    from labseg.runs import RunDir

    run = RunDir(root / name)
    run.path.mkdir(parents=True)
    run.write_config(RunConfig(arch="unet", img_size=64, epochs=1, **config).with_recipe())
    run.write_summary({"arch": "unet", "best_valid_dice": dice})
    return run


def test_overwrite_refuses_a_run_another_process_is_training(tmp_path):
    """--overwrite on a run being trained would delete its lock and records while it writes them:
    refused, and nothing in the folder is touched."""
    from labseg.runs import RunDir, RunExistsError

    run = _recorded_run(tmp_path, "busy")
    with run.lock_for_training():           # as the process training it holds it
        before = sorted(p.name for p in run.path.iterdir())
        with pytest.raises(RunExistsError, match="being trained by another process now"):
            RunDir.create(tmp_path, "busy", overwrite=True)
    assert sorted(p.name for p in run.path.iterdir()) == before
    assert RunDir.create(tmp_path, "busy", overwrite=True).path == run.path      # once it is free: replaced


def test_a_hand_edited_config_value_is_named_with_its_file(tmp_path):
    import json

    from labseg.runs import RunRecordError

    run = _recorded_run(tmp_path, "edited")
    config = json.loads((run.path / "config.json").read_text())
    (run.path / "config.json").write_text(json.dumps({**config, "img_size": "64"}))
    with pytest.raises(RunRecordError, match=r"edited/config.json: img_size='64'"):
        run.read_config()


def test_a_gpu_run_is_read_on_a_machine_without_one(tmp_path):
    run = _recorded_run(tmp_path, "gpu", device="cuda")
    assert run.read_config().device == "cuda"


def test_best_run_skips_a_summary_with_a_non_numeric_metric(tmp_path, capsys):
    import json

    from labseg.runs import best_run

    _recorded_run(tmp_path, "good", dice=0.5)
    bad = _recorded_run(tmp_path, "edited", dice=0.9)
    (bad.path / "summary.json").write_text(json.dumps({"arch": "unet", "best_valid_dice": "0.9"}))
    assert best_run(tmp_path).name == "good"
    assert "skipped run edited" in capsys.readouterr().err


def test_ctrl_c_twice_while_a_checkpoint_is_written_still_finishes_it(tmp_path, capsys):
    """An impatient second Ctrl-C used to cut the write off at exit: the epoch was lost and a
    checkpoint-sized temporary file stayed. join() now waits the write out, then raises."""
    import signal
    import threading
    import time

    from labseg.runs import CheckpointWriter, load_checkpoint

    records_written = threading.Event()

    def slow_records():                 # the records after the checkpoint: a slow disk
        time.sleep(1.5)
        records_written.set()

    writer = CheckpointWriter()
    writer.submit({"arch": "unet", "model": {"w": torch.ones(3)}, "epoch": 1}, tmp_path / "last.pt",
                  then=slow_records)
    for delay in (0.2, 0.5):            # two Ctrl-Cs while it writes
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        writer.join()
    assert records_written.is_set()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp"))
    assert "finishing the checkpoint being written first" in capsys.readouterr().err


def test_a_run_folder_that_cannot_be_made_names_the_output_dir(tmp_path):
    """--output-dir under a file (or /proc, a read-only disk): what cannot be made, and why; the
    claim marker is an ordinary file (0644 under umask 022), not an executable."""
    from labseg.config import ConfigError
    from labseg.runs import RunDir

    (tmp_path / "afile").write_text("")
    runs = tmp_path / "afile" / "runs"
    with pytest.raises(ConfigError, match=rf"output_dir='{runs}': cannot create the run folder {runs / 'r'} there "
                                          r"\(Not a directory\); expected a folder this user can write to"):
        RunDir.create(runs, "r")
    previous = os.umask(0o022)
    try:
        run = RunDir.create(tmp_path / "runs", "r")
    finally:
        os.umask(previous)
    assert (run.path / ".claimed").stat().st_mode & 0o777 == 0o644


def test_a_run_name_claimed_by_another_process_at_the_same_moment_is_refused_not_suffixed(tmp_path, monkeypatch):
    """Two `labseg train --run-name r` started together: the one that loses the folder's claim
    fell through to r-2, where a notebook written into r would describe the wrong run. A name given
    is refused (exist="error") whether the other run is found there or wins the claim meanwhile."""
    import labseg.runs
    from labseg.runs import RunDir, RunExistsError

    real_claim = labseg.runs._claim

    def lost(folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".claimed").touch()           # the other process claims it first
        return real_claim(folder)

    monkeypatch.setattr(labseg.runs, "_claim", lost)
    with pytest.raises(RunExistsError, match=r"run folder .*/r exists; resume it"):
        RunDir.create(tmp_path, "r", exist="error")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]         # no r-2
    monkeypatch.setattr(labseg.runs, "_claim", real_claim)
    assert RunDir.create(tmp_path, "s", exist="error").path == tmp_path / "s"


def test_a_default_name_taken_names_the_stopped_run_the_command_meant_to_continue(tmp_path, capsys):
    """A notebook's training interrupted, then its cell run again: the new run goes to NAME-3 and
    the message names NAME-2, the stopped one, not NAME, which finished."""
    from labseg.runs import RunDir

    def made(name, *files):
        (tmp_path / name).mkdir()
        for f in ("config.json", *files):
            (tmp_path / name / f).write_text("{}")
    made("r", "summary.json", "last.pt", "best.pt")     # finished
    made("r-2", "last.pt", "best.pt")                   # stopped at a checkpoint
    assert RunDir.create(tmp_path, "r").path == tmp_path / "r-3"
    said = capsys.readouterr().out
    assert "r-2 stopped before its end and can be continued: --run-name r-2 --resume" in said
    RunDir.create(tmp_path, "r")        # r-4: the newest stopped one is still r-2 (r-3 holds no checkpoint)
    assert "--run-name r-2 --resume" in capsys.readouterr().out
    made("s", "summary.json", "last.pt")
    RunDir.create(tmp_path, "s")        # nothing stopped: the message says nothing of it
    assert "stopped before its end" not in capsys.readouterr().out


def _victim(tmp_path):
    """A folder of someone's own, and what it holds, to check afterwards that nothing was touched."""
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "thesis.tex").write_text("precious")
    (victim / "sub" / "data.csv").write_text("x")
    return victim, sorted((str(p.relative_to(victim)), p.read_bytes() if p.is_file() else b"")
                          for p in victim.rglob("*"))


def test_a_run_folder_that_is_a_link_is_never_trained_into_emptied_or_replaced(tmp_path):
    """A run folder unpacked from someone's archive can be a link (zip and tar recreate them).
    Training under its name once claimed it and, stopped before its first checkpoint, emptied the
    folder it pointed to; --overwrite emptied it outright. Both are refused, naming the link."""
    from labseg.runs import LinkedRunFolderError, RunDir, empty_folder
    from labseg.workbook import run_training_notebook

    victim, held = _victim(tmp_path)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "evil").symlink_to(victim)
    for options in ({"overwrite": True}, {"exist": "error"}):      # a name given: that folder or none
        with pytest.raises(LinkedRunFolderError, match=f"run folder {runs / 'evil'} is a link to {victim}"):
            RunDir.create(runs, "evil", **options)
    (runs / "evil-2").symlink_to(victim)
    assert RunDir.create(runs, "evil").path == runs / "evil-3"    # a default name moves on, past links too
    with pytest.raises(LinkedRunFolderError, match="remove the link"):
        empty_folder(runs / "evil", keep=".ipynb")
    with pytest.raises(LinkedRunFolderError):   # a sweep's point, before any kernel starts
        run_training_notebook({"arch": "unet"}, output_dir=runs, name="evil", exact=True)
    assert sorted((str(p.relative_to(victim)), p.read_bytes() if p.is_file() else b"")
                  for p in victim.rglob("*")) == held


def test_links_inside_a_run_folder_are_removed_not_followed(tmp_path):
    """A dangling `.training` link once made the lock create a file where it pointed, and a
    kept `.ipynb` link let papermill write a notebook through it."""
    from labseg.runs import RunDir, empty_folder

    victim, held = _victim(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".training").symlink_to(victim / "created_by_lock")
    (run / "04_train.ipynb").symlink_to(victim / "thesis.tex")
    (run / "last.pt").write_bytes(b"x")
    with RunDir(run).lock_for_training():
        assert RunDir(run).is_training()
    assert (run / ".training").is_file() and not (run / ".training").is_symlink()
    empty_folder(run, keep=".ipynb")
    assert not any(run.iterdir())
    assert sorted((str(p.relative_to(victim)), p.read_bytes() if p.is_file() else b"")
                  for p in victim.rglob("*")) == held


@pytest.mark.parametrize("weight,said", [
    (torch.ones(1, 3, 1, 1, dtype=torch.int64), "a tensor of torch.int64 where torch.float32 is expected"),
    (torch.ones(1, 3, 1, 1, dtype=torch.bool), "a tensor of torch.bool where torch.float32 is expected"),
    (torch.ones(1, 3, 1, 1, dtype=torch.complex64), "a tensor of torch.complex64 where torch.float32 is expected"),
    (torch.ones(1, 3, 1, 1).to_sparse(), "a torch.sparse_coo tensor where torch.strided is expected"),
    (torch.full((1, 3, 1, 1), float("nan")), "NaN or infinite values"),
])
def test_weights_of_a_kind_labseg_never_writes_are_named_not_loaded(weight, said):
    """A received checkpoint of the right names and shapes once loaded integer, boolean or complex
    weights by casting them, and NaN ones into a model scored 0 or predicting no pet; sparse ones
    gave a traceback per tensor. Each is one CheckpointError naming the file and the tensor."""
    model = nn.Conv2d(3, 1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"^run/best.pt holds {re.escape(said)} in 'weight'; labseg writes"):
        load_weights(model, {"arch": "conv", "model": {"weight": weight, "bias": torch.ones(1)}}, "conv",
                     source="run/best.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # float64 weights are weights: cast, as torch loads them
    load_weights(model, {"arch": "conv", "model": {"weight": torch.full((1, 3, 1, 1), 2.0, dtype=torch.float64),
                                                   "bias": torch.ones(1)}}, "conv")
    assert torch.equal(model.weight, torch.full((1, 3, 1, 1), 2.0))


def test_a_folder_where_a_checkpoint_goes_is_named_as_a_folder(tmp_path):
    from labseg.runs import load_checkpoint

    (tmp_path / "last.pt").mkdir()
    with pytest.raises(CheckpointError, match=r"last.pt is a folder; expected a file written by labseg"):
        load_checkpoint(tmp_path / "last.pt")


def test_a_runs_cache_folder_is_its_own_only_where_that_folder_can_be_here(tmp_path):
    """A run trained with --cache-dir /scratch/u/cache on a cluster and evaluated on a laptop failed
    to create that folder; a received config.json could name a path below a file. The cache is this
    machine's: a recorded folder that cannot be one here reads as the default."""
    import json

    run = _recorded_run(tmp_path, "moved")
    config = json.loads((run.path / "config.json").read_text())
    (tmp_path / "README.md").write_text("a file")
    for elsewhere in (tmp_path / "README.md" / "cache", tmp_path / "README.md"):
        (run.path / "config.json").write_text(json.dumps({**config, "cache_dir": str(elsewhere)}))
        assert run.read_config().cache_dir == "data/cache"
    # a scratch cache deleted since is made again where it was (not moved into the project)
    for mine in (tmp_path / "mine", tmp_path / "scratch" / "cache"):
        (tmp_path / "mine").mkdir(exist_ok=True)
        (run.path / "config.json").write_text(json.dumps({**config, "cache_dir": str(mine)}))
        assert run.read_config().cache_dir == str(mine)
    assert not (tmp_path / "scratch").exists()


def test_a_networks_own_infinite_buffer_loads(tmp_path):
    """A registered network may hold -inf on purpose (a mask, "no lower clamp"): its own checkpoint
    loads; NaN is refused only where the network's own tensor is finite."""
    model = nn.Conv2d(3, 1, 1)
    model.register_buffer("lo", torch.tensor(float("-inf")))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    load_weights(model, {"arch": "conv", "model": state}, "conv")
    assert model.lo.item() == float("-inf")


def test_a_cache_folder_in_a_folder_one_may_not_enter_reads_as_the_default(tmp_path, monkeypatch):
    """Another student's --cache-dir ~/cache (a home of mode 0700): Path.exists raised
    PermissionError there, and one such run stopped `labseg evaluate`'s pick for every run."""
    import json
    from pathlib import Path

    run = _recorded_run(tmp_path, "theirs")
    private = tmp_path / "anna"
    (run.path / "config.json").write_text(json.dumps({**json.loads((run.path / "config.json").read_text()),
                                                      "cache_dir": str(private / "cache")}))
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if str(self).startswith(str(private)):
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)
    monkeypatch.setattr(Path, "stat", stat)
    assert run.read_config().cache_dir == "data/cache"


def test_records_and_the_sample_are_written_where_os_has_no_fchmod(tmp_path, monkeypatch):
    """Windows before Python 3.13 has no os.fchmod (file modes do not apply there): every record
    write and labseg prepare once failed on it with AttributeError."""
    import os

    from labseg.runs import atomic_write_json, read_record
    from labseg.synthetic import write_synthetic_dataset

    monkeypatch.delattr(os, "fchmod")
    atomic_write_json(tmp_path / "record.json", {"dice": 0.9})
    assert read_record(tmp_path / "record.json", dict) == {"dice": 0.9}
    assert (write_synthetic_dataset(tmp_path / "sample", n_trainval_per_breed=1, n_test_per_breed=1)
            / "annotations" / "trainval.txt").is_file()


def test_a_checkpoint_is_serialised_only_once_the_write_before_it_is_done(tmp_path, monkeypatch):
    """Two serialised checkpoints in memory at once (290 MB each for resnet34_unet) were the peak of
    a run on a small laptop: the next one is made after the write in flight has ended."""
    import time

    import labseg.runs
    from labseg.runs import CheckpointWriter, load_checkpoint

    events, real_write, real_save = [], labseg.runs.atomic_write_bytes, torch.save

    def slow_write(path, data):
        time.sleep(0.5)
        real_write(path, data)
        events.append(("written", os.path.basename(path)))

    def save(obj, f, *args, **kwargs):
        events.append(("serialised", obj["epoch"]))
        real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(labseg.runs, "atomic_write_bytes", slow_write)
    monkeypatch.setattr(torch, "save", save)
    writer = CheckpointWriter()
    for epoch in (1, 2):
        writer.submit({"arch": "unet", "model": {"w": torch.ones(3)}, "epoch": epoch}, tmp_path / "last.pt",
                      weights_to=tmp_path / "best.pt")
    writer.wait()
    assert events == [("serialised", 1), ("serialised", 1), ("written", "last.pt"), ("written", "best.pt"),
                      ("serialised", 2), ("serialised", 2), ("written", "last.pt"), ("written", "best.pt")]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2
