"""Resume fidelity: a run stopped after an epoch and resumed trains on exactly as if never stopped.

A resume must bring back everything that steers the next step: the weights, the optimizer's state
(Adam's moments and step count), the global step (the lr schedule), the EMA weights, the
early-stopping count and the time already spent. The runs here are the tiny synthetic ones of
tests/test_train.py, two epochs at most per ``fit`` call.
"""
from pathlib import Path

import pytest
import torch

from labseg.runs import RunDir, load_checkpoint, save_checkpoint
from labseg.train import fit


@pytest.fixture
def tiny(synthetic_root, tmp_path, small_net):
    """Arguments for a fast run: 32 px, 8 train images, everything written under tmp_path."""
    return dict(arch=small_net, data_dir=str(synthetic_root), img_size=32, batch_size=4, max_train_images=8,
                epochs=2, amp=False, output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"),
                progress=False)


class _Stop(Exception):
    """Raised from fit's per-epoch callback: the run stops as a killed one does, after epoch 1."""


def _stop_after_first_epoch(history):
    if len(history) == 1:
        raise _Stop


def _assert_same_tensors(a, b, what):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), what
    else:
        assert a == b, what


def test_stopped_and_resumed_run_ends_where_an_unbroken_run_ends(tiny):
    """Same config, same seed: 2 epochs in one go == 1 epoch, a stop, a resume for the 2nd.

    The augmentation and shuffle are seeded by (seed, epoch), so only the state a resume restores
    can make the two differ. EMA on, so that its averaged weights are compared too.
    """
    args = dict(ema=0.5, **tiny)
    whole = fit(run_name="whole", **args).run
    with pytest.raises(_Stop):
        fit(run_name="broken", callback=_stop_after_first_epoch, **args)
    broken = RunDir(whole.path.parent / "broken")
    assert load_checkpoint(broken.checkpoint("last"))["epoch"] == 1
    fit(run_name="broken", resume=True, **args)

    a, b = load_checkpoint(whole.checkpoint("last")), load_checkpoint(broken.checkpoint("last"))
    assert a["epoch"] == b["epoch"] == 2
    # the global step counts every optimizer step since the run began: 2 epochs × 2 batches of 4
    # (8 train images, batch_size 4, drop_last) = 4, on both sides
    assert a["step"] == b["step"] == 4
    # Adam's per-parameter step count: 4 steps over both epochs, not 2 restarted at the resume
    assert {int(s["step"]) for s in b["optimizer"]["state"].values()} == {4}
    _assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer state")
    assert [r["lr"] for r in a["history"]] == pytest.approx([r["lr"] for r in b["history"]])
    _assert_same_tensors(a["raw_model"], b["raw_model"], "trained weights")
    _assert_same_tensors(a["model"], b["model"], "EMA weights")
    _assert_same_tensors(a["ema"], b["ema"], "EMA state")


def test_resume_keeps_the_early_stopping_count(tiny):
    """patience 2, best at epoch 1 and none since: the first resumed epoch without a gain stops it."""
    args = dict(patience=2, **tiny)
    run = fit(run_name="p", **args).run               # 2 epochs: patience 2 cannot stop it yet
    ckpt = load_checkpoint(run.checkpoint("last"))
    # Make epoch 1 an unbeatable best (Dice 1.0): epoch 2 is then one epoch without a gain.
    history = [dict(ckpt["history"][0], valid_dice=1.0), *ckpt["history"][1:]]
    save_checkpoint(run.checkpoint("last"), {**ckpt, "history": history, "best": 1.0})
    result = fit(run_name="p", resume=True, **{**args, "epochs": 4})
    # epoch 3 cannot beat 1.0 either: 2 epochs without a gain = patience, so epoch 4 never runs
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert result.summary["stop_reason"] == "early stopping: no valid_dice gain in 2 epochs"


def test_resume_counts_the_time_already_spent(tiny):
    """train_seconds of a resumed run = seconds recorded before the stop + those of the new epochs."""
    args = {**tiny, "epochs": 1}
    run = fit(run_name="t", **args).run
    ckpt = load_checkpoint(run.checkpoint("last"))
    save_checkpoint(run.checkpoint("last"), {**ckpt, "elapsed": 1000.0})   # as if it had trained 1000 s
    result = fit(run_name="t", resume=True, **{**args, "epochs": 2})
    # 1000 s before the resume plus the second or so of epoch 2 (far less than a minute)
    assert 1000 <= result.summary["train_seconds"] < 1060
    assert 1000 <= load_checkpoint(run.checkpoint("last"))["elapsed"] < 1060


def _stop_after_epoch_2(history):
    if len(history) == 2:
        raise _Stop


def _stop_after_epoch_3(history):
    if len(history) == 3:
        raise _Stop


def test_a_resumed_run_stopped_again_is_judged_unfinished_not_by_its_old_summary(tiny):
    """summary.json is written when a session ends: after a resume that saved epoch 3 and was
    killed, the first session's "completed all epochs" no longer describes last.pt (trained part
    way into a longer schedule), so the run's own checkpoint is best.pt, as for any stopped run."""
    from labseg.report import run_row

    run = fit(run_name="r", **tiny).run
    assert run.resolve_checkpoint() == "last" and run_row(run.path)["status"] == "finished"
    with pytest.raises(_Stop):
        fit(run_name="r", resume=True, callback=_stop_after_epoch_3, **{**tiny, "epochs": 6, "checkpoint_every": 0})
    assert load_checkpoint(run.checkpoint("last"))["epoch"] == 3
    assert (run.path / "summary.json").is_file() and run.read_summary() == {}
    assert run.resolve_checkpoint() == "best"
    row = run_row(run.path)
    assert row["status"] != "finished" and row["epochs_run"] == 3
    result = fit(run_name="r", resume=True, **{**tiny, "epochs": 6})         # it finishes: current again
    assert run.read_summary()["epochs_run"] == 6 == len(result.history) and run.resolve_checkpoint() == "last"


def test_a_resume_killed_before_its_first_checkpoint_can_be_asked_again(tiny):
    """A resume with a larger patience writes it into config.json before it trains; killed before
    its first checkpoint, the same request again was refused as if that patience had stopped the run."""
    args = dict(patience=1, **tiny)
    run = fit(run_name="p", **args).run
    ckpt = load_checkpoint(run.checkpoint("last"))
    # epoch 1 an unbeatable best: no later epoch saves best.pt, and the run stopped early at epoch 2
    history = [dict(ckpt["history"][0], valid_dice=1.0), *ckpt["history"][1:]]
    save_checkpoint(run.checkpoint("last"), {**ckpt, "history": history, "best": 1.0})
    run.write_summary({**run.read_summary(), "stop_reason": "early stopping: no valid_dice gain in 1 epochs"})
    with pytest.raises(ValueError, match="stopped early .* resume with a larger --patience"):
        fit(run_name="p", resume=True, **{**args, "epochs": 6})                # nothing changed: refused
    with pytest.raises(_Stop):                  # patience 4, killed in epoch 3 before any checkpoint
        fit(run_name="p", resume=True, callback=_stop_after_epoch_3, **{**args, "epochs": 6, "patience": 4})
    assert run.read_config().patience == 4 and load_checkpoint(run.checkpoint("last"))["epoch"] == 2
    result = fit(run_name="p", resume=True, **{**args, "epochs": 6, "patience": 4})
    assert [r["epoch"] for r in result.history][:3] == [1, 2, 3]


@pytest.mark.parametrize("stopped_by", ["epochs", "time budget"])
def test_a_run_killed_before_its_summary_is_finished_by_a_resume_without_training(tiny, capsys, stopped_by):
    """Killed (or out of disk) after its last checkpoint but before summary.json: the report
    called it resumable while --resume refused it as trained. The resume now writes the summary
    (and the metrics as last.pt holds them) and trains nothing; asked again, it is refused."""
    if stopped_by == "epochs":
        args = {**tiny, "epochs": 2}
        run = fit(run_name="k", **args).run
        (run.path / "summary.json").unlink()
    else:                                           # killed after epoch 2, as if it had spent the hour
        args = {**tiny, "epochs": 50, "time_budget": "3600", "checkpoint_every": 0}
        with pytest.raises(_Stop):
            fit(run_name="k", callback=_stop_after_epoch_2, **args)
        run = RunDir(Path(tiny["output_dir"]) / "k")
        save_checkpoint(run.checkpoint("last"), {**load_checkpoint(run.checkpoint("last")), "elapsed": 3600.0})
    csv = (run.path / "metrics.csv").read_text().splitlines()
    (run.path / "metrics.csv").write_text("\n".join(csv[:-1]) + "\n")     # .csv one epoch behind .json
    before = run.checkpoint("last").read_bytes()
    capsys.readouterr()
    result = fit(run_name="k", resume=True, **args)
    said = capsys.readouterr().out
    assert "has trained all it was asked to (epoch 2 in last.pt)" in said
    assert "labseg: resuming" not in said and "labseg: training" not in said     # nothing is trained
    assert run.checkpoint("last").read_bytes() == before and len(result.history) == 2
    summary = run.read_summary()
    assert summary["epochs_run"] == 2 and summary["stop_reason"] == (
        "completed all epochs" if stopped_by == "epochs" else "time budget of 3600 spent")
    assert (run.path / "metrics.csv").read_text().splitlines() == csv
    with pytest.raises(ValueError, match="has already (trained all its 2 epochs|spent its time budget)"):
        fit(run_name="k", resume=True, **args)


def test_a_stopped_run_asked_for_fewer_epochs_than_it_was_started_for_is_refused_not_finished(tiny):
    """A 5-epoch run killed after epoch 2, resumed with --epochs 1: refused as before, not closed
    as "completed all epochs" with its config rewritten to 1."""
    with pytest.raises(_Stop):
        fit(run_name="s", callback=_stop_after_epoch_2, **{**tiny, "epochs": 5, "checkpoint_every": 0})
    run = RunDir(Path(tiny["output_dir"]) / "s")
    with pytest.raises(ValueError, match="has already trained all its 1 epochs; to train it further"):
        fit(run_name="s", resume=True, **{**tiny, "epochs": 1})
    assert run.read_config().epochs == 5 and not (run.path / "summary.json").exists()


def test_a_renamed_run_folder_resumes_under_its_new_name(tiny):
    """An instructor renames a run folder (``mv``) and trains it further: its records then name
    the folder it is in, not the one it was started in, and the old name leads nowhere."""
    run = fit(run_name="before", **{**tiny, "epochs": 1}).run
    run.path.rename(run.path.parent / "after")
    result = fit(run_name="after", resume=True, **tiny)
    moved = RunDir(run.path.parent / "after")
    assert result.run.path == moved.path and not run.path.exists()
    assert moved.read_config().run_name == "after"
    assert moved.read_summary()["run_name"] == "after" and moved.read_summary()["epochs_run"] == 2
