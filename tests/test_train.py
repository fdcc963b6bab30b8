"""The training loop, run folders and checkpoints, end to end on tiny synthetic data."""
import copy
import errno
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import labseg.cli
import labseg.data
import labseg.runs
import labseg.train
from labseg.config import PROJECT_ROOT, UNTIL_BUDGET, ConfigError, RunConfig
from labseg.data import Batches, balanced_subset, load_split, split_trainval
from labseg.evaluate import evaluate_run, format_result, load_run_model
from labseg.metrics import per_image_dice
from labseg.models import build_model
from labseg.recipes import recipe_for
from labseg.runs import (CheckpointError, CheckpointWriter, RunDir, default_checkpoint, load_checkpoint, load_weights,
                         save_checkpoint)
from labseg.resume import _merge_resumed
from labseg.train import (TrainingDiverged, WeightEMA, _amp_dtype, _epochs_since_best, _frozen_batchnorm_stats,
                          _sam_ascent, fit, load_optimizer_state, lr_factor)
from labseg.machine import channels_last_for
from labseg.transforms import BatchAugment
from labseg.viz import variants_table

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny(synthetic_root, tmp_path):
    """Arguments for a fast run: 32 px, a few images, everything written under tmp_path."""
    return dict(data_dir=str(synthetic_root), img_size=32, batch_size=4, max_train_images=8, epochs=2,
                output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), progress=False)


def test_overfits_eight_images(synthetic_root, tmp_path):
    # 50 epochs: 30 reached 0.899 (channels_last) and 0.892 (contiguous) in fp32 on an AVX2 CPU,
    # on the line; 50 reach 0.946 and 0.942 there.
    result = fit(arch="resnet34_unet", data_dir=str(synthetic_root), img_size=64, epochs=50, batch_size=8,
                 max_train_images=8, augment="none", lr=3e-3, warmup_epochs=0, seed=0,
                 output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), progress=False)
    trainval = load_split(synthetic_root, "trainval", 64, tmp_path / "cache", progress=False)
    train_idx, _ = split_trainval(trainval.records, 0.1, 0)
    (batch,) = list(Batches(trainval, balanced_subset(trainval.records, train_idx, 8), 8))
    result.model.eval()
    with torch.inference_mode():
        dice = per_image_dice(result.model(batch.image), batch.target, from_logits=True).mean().item()
    assert dice > 0.9, f"Dice on the 8 training images after 50 epochs: {dice:.3f}"


def test_run_folder_records(tiny, small_net):
    result = fit(arch=small_net, run_name="rec", **tiny)
    run = result.run
    for name in ("config.json", "metrics.csv", "metrics.json", "best.pt", "last.pt", "summary.json"):
        assert (run.path / name).is_file(), name
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]
    assert len((run.path / "metrics.csv").read_text().strip().splitlines()) == 3
    assert b"\r" not in (run.path / "metrics.csv").read_bytes()          # plain \n line ends
    assert run.read_config().arch == small_net
    summary = run.read_summary()
    assert summary["epochs_run"] == 2 and summary["best_epoch"] in (1, 2)
    ckpt = load_checkpoint(run.checkpoint("last"))
    assert ckpt["arch"] == small_net and ckpt["format_version"] == 1 and ckpt["config"]["img_size"] == 32
    assert not list(run.path.glob("*.tmp")), "temporary files left behind"
    # the trained network comes back ready to predict: eval mode, every module of it
    assert not any(m.training for m in result.model.modules())


@pytest.mark.parametrize("every", [0, 1e9])
def test_last_checkpoint_is_written_at_most_every_checkpoint_every_seconds(tiny, small_net, monkeypatch, every):
    """0 writes last.pt after every epoch; a long interval only when best.pt improves and at the end."""
    writes = []
    submit = CheckpointWriter.submit

    def observed(self, checkpoint, *paths, then=None, weights_to=None):
        writes.append((checkpoint["epoch"], sorted(Path(p).name for p in (*paths, *([weights_to] if weights_to else [])))))
        submit(self, checkpoint, *paths, then=then, weights_to=weights_to)

    monkeypatch.setattr(CheckpointWriter, "submit", observed)
    result = fit(arch=small_net, run_name="ck", checkpoint_every=every, **{**tiny, "epochs": 5})
    dice = [r["valid_dice"] for r in result.history]
    improved = [e for e, d in enumerate(dice, 1) if d > max(dice[:e - 1], default=-1)]
    assert [e for e, names in writes if "best.pt" in names] == improved
    expected = [1, 2, 3, 4, 5] if every == 0 else sorted(set(improved) | {5})
    assert [e for e, names in writes if "last.pt" in names] == expected
    assert load_checkpoint(result.run.checkpoint("last"))["epoch"] == 5
    assert [r["epoch"] for r in result.run.read_metrics()] == [1, 2, 3, 4, 5]


def test_resume_continues_without_duplicates(tiny, small_net, capsys):
    run = fit(arch=small_net, run_name="r", **tiny).run
    (run.path / "eval_test_last.json").write_text("{}")        # an evaluation of the 2-epoch weights
    (run.path / ".last.pt.abc123.tmp").write_bytes(b"cut")     # a write a kill cut short
    result = fit(arch=small_net, run_name="r", resume=True, **{**tiny, "epochs": 4})
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert [r["epoch"] for r in result.run.read_metrics()] == [1, 2, 3, 4]
    assert not list(run.path.glob("*.tmp")) and not (run.path / "eval_test_last.json").exists()
    assert (run.path / "eval_test_last.json.epoch-2").is_file()           # kept aside, not lost
    said = capsys.readouterr().out
    assert "removed 1 unfinished write(s)" in said and "eval_test_last.json → eval_test_last.json.epoch-2" in said


def test_a_resume_stopped_before_its_first_checkpoint_keeps_the_evaluations_of_the_weights(tiny, small_net, monkeypatch):
    """Its weights are still those the evaluations scored, so the report still shows them."""
    import labseg.train

    run = fit(arch=small_net, run_name="r", **tiny).run
    (run.path / "eval_test_last.json").write_text("{}")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(labseg.train, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(arch=small_net, run_name="r", resume=True, **{**tiny, "epochs": 4})
    assert (run.path / "eval_test_last.json").is_file()
    assert not list(run.path.glob("eval_*.epoch-*"))


def test_a_notebooks_interrupted_training_says_how_the_notebook_continues_it(tiny, small_net, monkeypatch, capsys):
    """A kernel interrupt in 04_train: the folder, the epoch kept and the parameters that resume it
    (the CLI says the same in its own terms), and the resume those parameters make goes on."""
    import labseg.train

    real, calls = labseg.train.train_one_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(labseg.train, "train_one_epoch", interrupted_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit(arch=small_net, **{**tiny, "epochs": 3, "progress": "bars"})
    said = capsys.readouterr().err
    name = re.search(r"set run_name = '([^']+)' and resume = True", said).group(1)
    assert "holds the run up to epoch 1" in said and f"labseg train --run-name {name} --resume" in said
    monkeypatch.setattr(labseg.train, "train_one_epoch", real)
    result = fit(arch=small_net, run_name=name, resume=True, **{**tiny, "epochs": 3})
    assert [r["epoch"] for r in result.history] == [1, 2, 3]


def test_a_resume_that_only_finishes_the_weight_averaging_sets_the_old_evaluations_aside(tiny, small_net, monkeypatch):
    """Stopped while averaging (SWA) after its last epoch: last.pt held the raw weights, and an
    evaluation of them stayed beside the averaged ones the resume wrote, scored as theirs."""
    import labseg.train

    real = labseg.train._finish_swa

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(labseg.train, "_finish_swa", interrupted)
    with pytest.raises(KeyboardInterrupt) as stopped:
        fit(arch=small_net, swa=0.5, run_name="swa-stopped", **tiny)
    # what the CLI says: the run is kept up to its last epoch (it said "nothing was kept")
    assert (stopped.value.run_folder.name, stopped.value.saved_epoch) == ("swa-stopped", 2)
    monkeypatch.setattr(labseg.train, "_finish_swa", real)
    run = RunDir(Path(tiny["output_dir"]) / "swa-stopped")
    (run.path / "eval_test_last.json").write_text("{}")         # an evaluation of the raw epoch-2 weights
    result = fit(arch=small_net, swa=0.5, run_name="swa-stopped", resume=True, **tiny)
    assert result.summary["swa_epochs"] >= 1
    assert not (run.path / "eval_test_last.json").exists() and (run.path / "eval_test_last.json.epoch-2").is_file()


def test_a_run_being_trained_is_not_resumed_by_a_second_process(tiny, small_net):
    """The same resume in two terminals would write the same checkpoints; the lock is the OS's,
    so a killed run is never left locked."""
    import labseg.runs

    run = fit(arch=small_net, run_name="busy", **{**tiny, "epochs": 1}).run
    with run.lock_for_training():           # as another process training it holds it
        with pytest.raises(labseg.runs.RunExistsError, match="is being trained by another process now"):
            fit(arch=small_net, run_name="busy", resume=True, **{**tiny, "epochs": 2})
    assert [r["epoch"] for r in fit(arch=small_net, run_name="busy", resume=True, **{**tiny, "epochs": 2}).history] == [1, 2]


def test_a_checkpoint_slimmed_to_its_weights_evaluates_but_does_not_resume(tiny, small_net):
    run = fit(arch=small_net, run_name="slim", **{**tiny, "epochs": 1}).run
    ckpt = load_checkpoint(run.checkpoint("last"))
    save_checkpoint(run.checkpoint("last"), {k: ckpt[k] for k in ("format_version", "arch", "config", "model")})
    with pytest.raises(CheckpointError, match=r"holds weights but no training state \(epoch, history, optimizer "
                                              r"missing\): it can be evaluated, not resumed"):
        fit(arch=small_net, run_name="slim", resume=True, **{**tiny, "epochs": 2})
    save_checkpoint(run.checkpoint("last"), {**ckpt, "format_version": "1"})
    with pytest.raises(CheckpointError, match="has format_version '1'; expected an integer"):
        load_checkpoint(run.checkpoint("last"))
    save_checkpoint(run.checkpoint("last"), {**ckpt, "epoch": "1", "history": None})
    with pytest.raises(CheckpointError, match=r"damaged training state \(epoch is a str, history is a NoneType\): it cannot be resumed \(labseg writes"):
        fit(arch=small_net, run_name="slim", resume=True, **{**tiny, "epochs": 2})
    # a received checkpoint's state, each once a raw traceback (and metrics.json rewritten with ["x", 5])
    metrics = (run.path / "metrics.json").read_bytes()
    for odd, said in (({"history": ["x", 5]}, r"\(a history row is not an epoch's record\): it cannot be resumed"),
                      ({"trainval": "x"}, r"\(trainval is 'x', not a record of the images\)"),
                      ({"optimizer": {"param_groups": [{"params": "x"}]}},
                       r"last.pt holds a training state that does not fit this run's optimizer or averaging "
                       r"\(\w+Error: .*\): it cannot be resumed")):
        save_checkpoint(run.checkpoint("last"), {**ckpt, **odd})
        with pytest.raises(CheckpointError, match=said):
            fit(arch=small_net, run_name="slim", resume=True, **{**tiny, "epochs": 2})
        assert (run.path / "metrics.json").read_bytes() == metrics


def test_a_kill_between_the_best_and_last_writes_resumes_from_best(tiny, small_net, capsys):
    """A run folder of an older labseg, which wrote best.pt first as a whole training state: a kill
    before last.pt left best.pt the later epoch."""
    import os

    run = fit(arch=small_net, run_name="k", checkpoint_every=0, **{**tiny, "epochs": 1}).run
    epoch1 = run.checkpoint("last").read_bytes()
    fit(arch=small_net, run_name="k", resume=True, checkpoint_every=0, **{**tiny, "epochs": 2})
    run.checkpoint("best").write_bytes(run.checkpoint("last").read_bytes())    # epoch 2, written first ...
    run.checkpoint("last").write_bytes(epoch1)                                  # ... last.pt never followed
    os.utime(run.checkpoint("last"), ns=(1_000_000_000, 1_000_000_000))
    (run.path / "summary.json").unlink()
    capsys.readouterr()
    result = fit(arch=small_net, run_name="k", resume=True, **{**tiny, "epochs": 3})
    out = capsys.readouterr().out
    assert "best.pt holds epoch 2, later than last.pt's 1" in out and "after epoch 2 (from best.pt)" in out
    assert [r["epoch"] for r in result.history] == [1, 2, 3]


def test_resume_keeps_the_plateau_lr_and_the_patience_count(tiny, small_net):
    run = fit(arch=small_net, run_name="p", scheduler="plateau", warmup_epochs=0, **{**tiny, "epochs": 1}).run
    ckpt = load_checkpoint(run.checkpoint("last"))
    reduced = ckpt["config"]["lr"] / 8          # as three plateau halvings leave it
    save_checkpoint(run.checkpoint("last"), {**ckpt, "base_lrs": [reduced] * len(ckpt["base_lrs"])})
    result = fit(arch=small_net, run_name="p", resume=True, **{**tiny, "epochs": 2})
    assert result.history[-1]["lr"] == pytest.approx(reduced)
    assert _epochs_since_best([{"valid_dice": d} for d in (0.5, 0.7, 0.6, 0.7)], "valid_dice") == 2
    assert _epochs_since_best([{"valid_loss": d} for d in (0.5, 0.4)], "valid_loss") == 0
    assert _epochs_since_best([], "valid_dice") == 0


def test_a_resumed_run_records_each_machine_it_trained_on(tiny, small_net, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    first = fit(arch=small_net, run_name="moved", amp=False, **tiny)
    assert "machines" not in json.loads((first.run.path / "summary.json").read_text())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    fit(arch=small_net, run_name="moved", resume=True, amp=False, **{**tiny, "epochs": 3})
    fit(arch=small_net, run_name="moved", resume=True, amp=False, **{**tiny, "epochs": 4})
    summary = json.loads((first.run.path / "summary.json").read_text())
    assert [(m["cpu_capability"], m["first_epoch"]) for m in summary["machines"]] == [
        ("AVX2", 1), ("AVX512", 3), ("AVX512", 4)]
    assert summary["machine"]["cpu_capability"] == "AVX512" and "first_epoch" not in summary["machine"]
    ckpt = load_checkpoint(first.run.checkpoint("last"))
    assert ckpt["machines"] == summary["machines"]
    # trained contiguous (AVX2), resumed in channels_last (AVX512): Adam's moments follow the weights
    weights = [p for p in ckpt["model"].values() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    moments = [s["exp_avg"] for s in ckpt["optimizer"]["state"].values() if s["exp_avg"].dim() == 4
               and s["exp_avg"].shape[1] > 1 and s["exp_avg"].shape[-1] > 1]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert moments and all(m.is_contiguous(memory_format=torch.channels_last) for m in moments)


def test_resumed_adam_moments_follow_their_weights_memory_format():
    """Moments saved contiguous, weights resumed in channels_last: the fused CPU Adam reads both as
    flat arrays, so the step is only right once the moments are in the weights' layout."""
    torch.manual_seed(0)
    saved = torch.nn.Conv2d(3, 4, 3)
    optimizer = torch.optim.Adam(saved.parameters(), lr=0.1, fused=True)
    saved(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()                                       # moments now exist, contiguous
    state = optimizer.state_dict()
    x = torch.randn(2, 3, 8, 8)
    after = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        resumed = copy.deepcopy(saved).to(memory_format=fmt)
        resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=0.1, fused=True)
        load_optimizer_state(resumed_optimizer, copy.deepcopy(state))
        assert all(slots["exp_avg"].stride() == p.stride() for p, slots in resumed_optimizer.state.items())
        resumed.zero_grad()
        resumed(x.contiguous(memory_format=fmt)).sum().backward()
        resumed_optimizer.step()
        after[fmt] = resumed.weight.detach()
    torch.testing.assert_close(after[torch.channels_last], after[torch.contiguous_format])


def test_resume_refuses_a_changed_config(tiny, small_net):
    fit(arch=small_net, run_name="r", **tiny)
    with pytest.raises(ConfigError, match="lr: recorded"):
        fit(arch=small_net, run_name="r", resume=True, lr=0.5, **tiny)


def test_same_run_name_never_shares_a_folder(tiny, small_net, capsys):
    a = fit(arch=small_net, **tiny).run                  # named from its parameters
    b = fit(arch=small_net, **tiny).run
    assert a.path != b.path and b.path.name == a.path.name + "-2"
    said = capsys.readouterr().out
    assert b.path.name in said and "resume=True in fit and 04_train" in said     # a notebook's words too
    # an unnamed run's records carry the name it got, so that its checkpoint and summary say which run
    assert b.read_config().run_name == b.path.name and b.read_summary()["run_name"] == b.path.name
    # A name given is that run's: refused rather than moved to NAME-2, where a notebook written
    # into NAME (papermill) would describe another run.
    fit(arch=small_net, run_name="same", **tiny)
    with pytest.raises(labseg.runs.RunExistsError, match=r"same exists; resume it \(--resume; resume=True in fit and 04_train\), start over \(--overwrite; overwrite=True\)"):
        fit(arch=small_net, run_name="same", **tiny)
    (a.path.parent / "same" / "eval_test.json").write_text("{}")
    capsys.readouterr()
    c = fit(arch=small_net, run_name="same", overwrite=True, **tiny).run
    assert c.path.name == "same" and not (c.path.parent / "same-2").exists()
    said = capsys.readouterr().out      # what --overwrite deleted is said, its evaluations named
    assert "--overwrite: deleting" in said and "1 evaluation(s): eval_test.json" in said


def test_corrupt_last_checkpoint_is_reported_and_an_older_labsegs_best_resumes(tiny, small_net):
    run = fit(arch=small_net, run_name="c", **tiny).run
    last = run.checkpoint("last")
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    # best.pt holds weights only: nothing to resume from, and the message does not send the user there
    with pytest.raises(CheckpointError, match=r"corrupt or truncated[^\n]*\.\nStart over with --overwrite") as refused:
        fit(arch=small_net, run_name="c", resume=True, **{**tiny, "epochs": 3})
    assert "--resume best" not in str(refused.value)
    assert last.stat().st_size == len(data) // 3, "the corrupt file must not be silently overwritten"
    # an older labseg's best.pt was a whole training state, and resumes
    run.checkpoint("best").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"corrupt or truncated[\s\S]*--resume best"):
        fit(arch=small_net, run_name="c", resume=True, **{**tiny, "epochs": 3})
    result = fit(arch=small_net, run_name="c", resume="best", **{**tiny, "epochs": 3})
    assert result.history[-1]["epoch"] == 3


def test_best_pt_keeps_the_best_epochs_weights_only(tiny, monkeypatch):
    """Two thirds of resnet34_unet's best.pt were the optimizer's moments, which only a resume reads,
    and a resume goes on from last.pt."""
    import labseg.runs

    seen = []
    write = labseg.runs.atomic_write_bytes
    monkeypatch.setattr(labseg.runs, "atomic_write_bytes", lambda path, data: (seen.append(Path(path).name),
                                                                                write(path, data))[1])
    result = fit(arch="resnet34_unet", run_name="f", ema=0.9, **tiny)
    run = result.run
    best, last = load_checkpoint(run.checkpoint("best")), load_checkpoint(run.checkpoint("last"))
    assert "optimizer" in last and "ema" in last and "raw_model" in last
    assert not {"optimizer", "ema", "raw_model", "scaler", "plateau", "swa", "holds_best"} & best.keys()
    assert {"arch", "config", "epoch", "history", "model"} <= best.keys()
    assert run.checkpoint("best").stat().st_size < run.checkpoint("last").stat().st_size / 2
    # last.pt first, best.pt after it, in each write
    pts = [name for name in seen if name.endswith(".pt")]
    assert pts and all(pts[i - 1] == "last.pt" for i, name in enumerate(pts) if name == "best.pt")
    # the weights are the best epoch's deployed (EMA) ones, and evaluate as before
    assert best["epoch"] == result.summary["best_epoch"]
    model, _ = load_run_model(run, "best")
    assert all(torch.equal(v, best["model"][k]) for k, v in model.state_dict().items())
    assert 0.0 <= evaluate_run(run, which="best", progress=False, data_dir=tiny["data_dir"])["dice"] <= 1.0
    with pytest.raises(CheckpointError, match=r"best.pt holds weights but no training state \(optimizer missing\): it "
                                              r"can be evaluated, not resumed \(best.pt keeps the best epoch's "
                                              r"weights only; a resume goes on from last.pt\)"):
        fit(arch="resnet34_unet", run_name="f", resume="best", **{**tiny, "epochs": 3})
    assert fit(arch="resnet34_unet", run_name="f", resume=True, **{**tiny, "epochs": 3}).history[-1]["epoch"] == 3
    # last.pt deleted by hand: said in one message, not "resuming from best.pt" and then a refusal
    run.checkpoint("last").unlink()
    with pytest.raises(CheckpointError, match=r"run f has no last.pt, and its best.pt keeps the best epoch's weights "
                                              r"only: it can be evaluated \(--checkpoint best\), not resumed"):
        fit(arch="resnet34_unet", run_name="f", resume=True, **{**tiny, "epochs": 4})


def test_a_new_run_of_a_name_windows_cannot_hold_is_refused_and_an_existing_one_resumes(tiny, small_net, tmp_path):
    with pytest.raises(ConfigError, match=r"run_name='aux': Windows cannot hold a folder of that name \(a device name\)"):
        fit(arch=small_net, run_name="aux", **{**tiny, "epochs": 1})
    assert not (Path(tiny["output_dir"]) / "aux").exists()
    run = fit(arch=small_net, run_name="x", **{**tiny, "epochs": 1}).run
    run.path.rename(run.path.with_name("aux"))      # a folder made before the rule, on Linux
    assert [r["epoch"] for r in fit(arch=small_net, run_name="aux", resume=True, **tiny).history] == [1, 2]


def test_a_kill_between_last_pt_and_best_pt_is_mended_by_the_resume(tiny, small_net, monkeypatch, capsys):
    """best.pt is written after last.pt: a kill between the two leaves last.pt holding the best
    epoch, and the resume writes best.pt from it before training on."""
    import labseg.resume
    import labseg.runs

    write = labseg.runs.atomic_write_bytes

    def killed_at_best(path, data):
        if Path(path).name == "best.pt":
            raise KeyboardInterrupt
        write(path, data)
    monkeypatch.setattr(labseg.runs, "atomic_write_bytes", killed_at_best)
    with pytest.raises(KeyboardInterrupt):
        fit(arch=small_net, run_name="k", **{**tiny, "epochs": 1})
    monkeypatch.setattr(labseg.runs, "atomic_write_bytes", write)
    run = RunDir.open("k", tiny["output_dir"])
    assert not run.checkpoint("best").exists() and load_checkpoint(run.checkpoint("last"))["holds_best"]
    capsys.readouterr()
    result = fit(arch=small_net, run_name="k", resume=True, **tiny)
    assert "best.pt written from last.pt, which holds the best epoch (1)" in capsys.readouterr().out
    best = load_checkpoint(run.checkpoint("best"))
    assert best["epoch"] == result.summary["best_epoch"] and "optimizer" not in best
    # a last.pt that holds the best epoch beside a best.pt written whole: the resume leaves best.pt be
    whole = fit(arch=small_net, run_name="w", **{**tiny, "epochs": 1}).run
    assert load_checkpoint(whole.checkpoint("last"))["holds_best"]
    rewritten = []
    monkeypatch.setattr(labseg.resume, "save_checkpoint", lambda path, ckpt: rewritten.append(path))
    capsys.readouterr()
    fit(arch=small_net, run_name="w", resume=True, **tiny)
    assert rewritten == [] and "best.pt written from last.pt" not in capsys.readouterr().out


def test_best_pt_of_the_same_epoch_and_step_but_another_best_is_rewritten_from_last_pt(tmp_path):
    """SWA's averaged weights are kept after the last epoch, at its epoch and step: where that epoch
    was best too, best.pt holds the same epoch and step with other weights, and a kill between the
    averaged last.pt and best.pt must still be mended from last.pt."""
    from labseg.resume import _best_from_last

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    common = {"format_version": 1, "arch": "unet", "epoch": 2, "step": 4, "history": [{"epoch": 1}, {"epoch": 2}]}
    save_checkpoint(run.checkpoint("best"), {**common, "best": 0.5, "model": {"w": torch.zeros(3)}})
    last = {**common, "best": 0.6, "model": {"w": torch.ones(3)}, "raw_model": {"w": torch.zeros(3)},
            "optimizer": {}, "holds_best": True}
    save_checkpoint(run.checkpoint("last"), last)
    _best_from_last(run, load_checkpoint(run.checkpoint("last")))
    best = load_checkpoint(run.checkpoint("best"))
    assert torch.equal(best["model"]["w"], torch.ones(3)) and best["best"] == 0.6 and "raw_model" not in best


def test_a_kill_before_the_averaged_best_pt_is_mended_and_the_summary_says_swa_is_best(tiny, small_net, monkeypatch, capsys):
    """The averaged weights validated best: last.pt holds them, a kill falls before best.pt, and the
    resume (which only writes the summary) keeps them as best.pt and says so (best_is_swa), rather
    than comparing their score with itself and recording that they were not best."""
    state = {"averaged": False}
    real_finish, real_write = labseg.train._finish_swa, labseg.runs.atomic_write_bytes

    def finish(*args, **kwargs):
        state["averaged"] = True
        return real_finish(*args, **kwargs)

    def killed_at_the_averaged_best(path, data):
        if state["averaged"] and Path(path).name == "best.pt":
            raise KeyboardInterrupt
        real_write(path, data)
    monkeypatch.setattr(labseg.train, "_finish_swa", finish)
    # every epoch and the averaged weights validate best: the last epoch's best.pt shares their step
    monkeypatch.setattr(labseg.train, "_improved", lambda metric, value, best: True)
    monkeypatch.setattr(labseg.runs, "atomic_write_bytes", killed_at_the_averaged_best)
    with pytest.raises(KeyboardInterrupt):
        fit(arch=small_net, swa=0.5, run_name="swa-k", **tiny)
    monkeypatch.undo()
    run = RunDir.open("swa-k", tiny["output_dir"])
    last = load_checkpoint(run.checkpoint("last"))
    assert last["holds_best"] and "raw_model" in last
    assert (load_checkpoint(run.checkpoint("best"))["epoch"], load_checkpoint(run.checkpoint("best"))["step"]) == (
        last["epoch"], last["step"])
    capsys.readouterr()
    result = fit(arch=small_net, swa=0.5, run_name="swa-k", resume=True, **tiny)
    assert "best.pt written from last.pt" in capsys.readouterr().out
    best = load_checkpoint(run.checkpoint("best"))
    assert all(torch.equal(v, best["model"][k]) for k, v in last["model"].items())
    assert result.summary["best_is_swa"] is True
    assert run.describe_checkpoint("best").startswith("best.pt (weights averaged over its last")


def test_a_disk_that_fails_the_first_best_pt_says_last_pt_holds_the_run(synthetic_root, small_net, tmp_path, capsys, monkeypatch):
    """best.pt is written after last.pt: a first best.pt that cannot be written leaves last.pt, not
    best.pt, to go on from, and the line says so."""
    real = labseg.runs.atomic_write_bytes

    def fails(path, data):
        if Path(path).name == "best.pt":
            raise OSError(errno.ENOSPC, f"could not write {path}: No space left on device")
        real(path, data)
    monkeypatch.setattr(labseg.runs, "atomic_write_bytes", fails)
    runs = tmp_path / "runs"
    args = ["train", "--arch", small_net, "--data", str(synthetic_root), "--img-size", "32", "--epochs", "2",
            "--max-train-images", "4", "--run-name", "d", "--output-dir", str(runs), "--cache-dir",
            str(tmp_path / "cache"), "--quiet"]
    out = _main(capsys, *args)
    assert out.returncode == 1 and "best.pt" not in out.stderr.split("holds", 1)[1]
    assert f"labseg: {runs / 'd'} holds its first checkpoint, last.pt; once the cause is fixed" in out.stderr
    monkeypatch.undo()
    out = _main(capsys, *args, "--resume")
    assert out.returncode == 0, out.stderr
    assert load_checkpoint(runs / "d" / "best.pt")["epoch"] == RunDir(runs / "d").read_summary()["best_epoch"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, small_net, monkeypatch):
    import labseg.train
    from labseg.losses import bce

    calls = {"n": 0}

    def loss_that_explodes(logits, target, valid):   # an input that diverges in epoch 2
        calls["n"] += 1
        loss = bce(logits, target, valid)
        return loss * float("nan") if calls["n"] > 3 else loss    # call 1: fit's check before the run

    monkeypatch.setattr(labseg.train, "build_loss", lambda name: loss_that_explodes)
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2"):
        fit(arch=small_net, run_name="nan", loss="bce", deep_supervision=False,   # one loss call a step
            **{**tiny, "epochs": 3, "max_train_images": 8, "batch_size": 4})
    run = RunDir(Path(tiny["output_dir"]) / "nan")
    ckpt = load_checkpoint(run.checkpoint("last"))
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("arch", ["resnet34_unet", "unet"])
def test_deep_supervision_trains_resumes_and_evaluates(tiny, arch):
    result = fit(arch=arch, deep_supervision=True, run_name="ds", **tiny)
    ckpt = load_checkpoint(result.run.checkpoint("last"))
    assert any(k.startswith("aux_heads.") for k in ckpt["model"])
    assert all(r["train_loss"] > 0 for r in result.history)
    resumed = fit(arch=arch, deep_supervision=True, run_name="ds", resume=True,
                  **{**tiny, "epochs": 3})
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    evaluation = evaluate_run(result.run.path, "test", tta=True, postprocess=True, progress=False, save=False)
    assert 0 <= evaluation["dice"] <= 1
    post = evaluation["postprocess"]
    assert post["images"] == evaluation["images"] and 0 <= post["dice"] <= 1
    assert 0 <= post["valid_dice"] <= 1 and 0 <= post["valid_dice_postprocessed"] <= 1
    assert evaluation["tta_postprocess"]["tta"] is True
    assert list(variants_table(evaluation).index) == [
        "threshold 0.5", "threshold 0.5 + flip TTA", "threshold 0.5 + one pet", "threshold 0.5 + flip TTA + one pet"]
    assert re.search(rf"one pet \(largest component, holes filled\): +Dice {post['dice']:.4f}", format_result(evaluation))
    with pytest.raises(ValueError, match="split='holdout' is not valid; choose one of: test, valid, train"):
        evaluate_run(result.run.path, "holdout", progress=False, save=False)


def test_the_peer_trains_with_its_own_recipe_and_evaluates(tiny):
    pytest.importorskip("segmentation_models_pytorch", reason="the peer needs the bench extra")
    result = fit(arch="smp_unet_resnet34", run_name="peer", **tiny)
    config = result.run.read_config()
    assert (config.optimizer, config.scheduler, config.augment, config.weight_decay, config.mosaic,
            config.deep_supervision) == ("adam", "none", "flip", 0.0, 0.0, False)
    assert load_checkpoint(result.run.checkpoint("best"))["arch"] == "smp_unet_resnet34"
    evaluation = evaluate_run(result.run.path, "test", progress=False, save=False)
    assert evaluation["checkpoint"] == "best"     # a constant lr: judged by its best epoch
    assert 0 <= evaluation["dice"] <= 1
    with pytest.raises(ConfigError, match="deep_supervision=True is for unet and resnet34_unet"):
        fit(arch="smp_unet_resnet34", run_name="peer-ds", deep_supervision=True, **tiny)


def test_the_peer_without_smp_fails_before_any_work(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)    # import now raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"smp_unet_resnet34' needs segmentation_models_pytorch"):
        fit(arch="smp_unet_resnet34", run_name="peer", **tiny)
    assert not Path(tiny["output_dir"]).exists()       # no run folder, no cache built
    assert not Path(tiny["cache_dir"]).exists()


@pytest.mark.parametrize("scheduler, stop_reason, expected", [
    ("cosine", "completed all epochs", "last"),
    ("onecycle", "time budget of 25m spent (no time for another epoch)", "last"),
    ("cosine", "time budget of 25m spent", "last"),
    ("cosine", "early stopping: no valid_dice gain in 5 epochs", "best"),
    ("plateau", "completed all epochs", "best"),
    ("none", "completed all epochs", "best"),
    ("cosine", None, "best"),                    # no summary: interrupted, or still running
])
def test_default_checkpoint_is_last_only_after_a_finished_decaying_schedule(scheduler, stop_reason, expected):
    assert default_checkpoint(scheduler, stop_reason) == expected


def test_a_resume_goes_on_with_the_images_it_started_on(tiny, small_net, tmp_path, capsys):
    """A moved dataset resumes; another one (here one image fewer) is refused before anything in
    the run folder changes: its valid Dice would have been compared with the old epochs'."""
    import shutil

    run = fit(arch=small_net, run_name="same", **{**tiny, "epochs": 1}).run
    config_before = (run.path / "config.json").read_bytes()
    capsys.readouterr()
    # a folder that is no dataset is refused without first being announced as the new one
    with pytest.raises(labseg.data.DatasetLayoutError, match="does not exist"):
        fit(arch=small_net, run_name="same", resume=True, **{**tiny, "epochs": 2, "data_dir": str(tmp_path / "nope")})
    assert "is now read from" not in capsys.readouterr().out
    # a run with nothing left to train says only that
    with pytest.raises(ConfigError, match="already trained all its 1 epochs"):
        fit(arch=small_net, run_name="same", resume=True, **{**tiny, "epochs": 1, "data_dir": str(tmp_path / "nope")})
    assert "is now read from" not in capsys.readouterr().out
    other = tmp_path / "other"
    shutil.copytree(tiny["data_dir"], other)
    listed = (other / "annotations" / "trainval.txt").read_text().splitlines()
    (other / "annotations" / "trainval.txt").write_text("\n".join(listed[1:]) + "\n")
    with pytest.raises(ConfigError, match=f"run same trained on {len(listed)} trainval images, and {other} holds "
                                          f"{len(listed) - 1} with other names"):
        fit(arch=small_net, run_name="same", resume=True, **{**tiny, "epochs": 2, "data_dir": str(other)})
    assert (run.path / "config.json").read_bytes() == config_before
    moved = tmp_path / "moved"
    shutil.copytree(tiny["data_dir"], moved)
    result = fit(arch=small_net, run_name="same", resume=True, **{**tiny, "epochs": 2, "data_dir": str(moved)})
    assert [r["epoch"] for r in result.history] == [1, 2] and run.read_config().data_dir == str(moved)
    assert f"labseg: the dataset is now read from {moved} (the run started on " in capsys.readouterr().out


def test_a_budget_that_stopped_with_the_lr_still_high_is_judged_by_best_pt():
    """A 1-minute budget of 35 s epochs stopped at 54% of the peak lr: its schedule did not finish."""
    from labseg.runs import lr_left

    stop = "time budget of 1m spent (no time for another epoch)"
    assert default_checkpoint("cosine", stop, lr_left({"final_lr": 0.00054}, 1e-3)) == "best"
    assert default_checkpoint("cosine", stop, lr_left({"final_lr": 0.00001}, 1e-3)) == "last"
    assert default_checkpoint("cosine", stop, lr_left({}, 1e-3)) == "last"      # a run from before final_lr


def test_evaluation_defaults_to_the_runs_own_checkpoint(tiny, small_net):
    """A finished cosine run is evaluated on last.pt, a constant-lr one on best.pt, unless one is named."""
    finished = fit(arch=small_net, run_name="cos", **tiny).run
    constant = fit(arch=small_net, run_name="const", scheduler="none", **tiny).run
    assert finished.checkpoint() == finished.path / "last.pt" and constant.checkpoint() == constant.path / "best.pt"
    ev = evaluate_run(finished, "test", progress=False)
    assert ev["checkpoint"] == "last" and (finished.path / "eval_test_last.json").is_file()
    assert not (finished.path / "eval_test.json").exists()
    assert format_result(ev).startswith("cos last.pt on test")
    assert evaluate_run(finished, "test", which="last", progress=False, save=False)["dice"] == ev["dice"]
    assert evaluate_run(constant, "test", progress=False)["checkpoint"] == "best"
    assert (constant.path / "eval_test.json").is_file()
    assert evaluate_run(finished, "test", which="best", progress=False)["checkpoint"] == "best"
    with pytest.raises(ConfigError, match="checkpoint='final' is not valid; choose one of: auto, best, last"):
        evaluate_run(finished, "test", which="final", progress=False)


def test_swa_deploys_the_mean_of_the_epoch_snapshots(tiny, small_net, monkeypatch):
    """swa=0.5 over 4 epochs averages the weights after epochs 2, 3 and 4 (progress 0.5, 0.75, 1)."""
    snapshots = []
    real = torch.optim.swa_utils.AveragedModel.update_parameters

    def spy(self, model):
        snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return real(self, model)
    monkeypatch.setattr(torch.optim.swa_utils.AveragedModel, "update_parameters", spy)
    result = fit(arch=small_net, swa=0.5, run_name="swa", **{**tiny, "epochs": 4})
    assert len(snapshots) == 3 and result.summary["swa_epochs"] == 3
    ckpt = load_checkpoint(result.run.checkpoint("last"))
    name = "down.0.weight"
    mean = sum(s[name] for s in snapshots) / 3
    assert torch.allclose(ckpt["model"][name], mean, atol=1e-6)
    assert torch.equal(ckpt["raw_model"][name], snapshots[-1][name])
    # BatchNorm statistics were measured again for the averaged weights, not copied from training.
    bn = "down.1.running_mean"
    assert not torch.allclose(ckpt["model"][bn], ckpt["raw_model"][bn])
    assert 0 <= result.summary["swa_valid_dice"] <= 1
    assert result.summary["best_is_swa"] == (load_checkpoint(result.run.checkpoint("best"))["model"][name]
                                             .equal(ckpt["model"][name]))
    # The lr falls to SWA_LR of the base by the start of averaging and stays there.
    assert lr_factor("cosine", 0.5, swa_start=0.5) == pytest.approx(0.1)
    assert lr_factor("cosine", 0.9, swa_start=0.5) == pytest.approx(0.1)
    assert lr_factor("cosine", 0.25, swa_start=0.5) == pytest.approx(0.55)
    # A resume continues the trained (raw) weights, not the averaged ones.
    resumed = fit(arch=small_net, swa=0.5, run_name="swa", resume=True, **{**tiny, "epochs": 5})
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4, 5] and resumed.summary["swa_epochs"] == 4


def test_the_time_swa_takes_to_finish_is_training_time(tiny, small_net, monkeypatch):
    """summary.json's train_seconds left out SWA's BatchNorm pass and the validation of the averaged
    weights, which last.pt's elapsed time counts (a resume goes on from it)."""
    import labseg.train

    real, dice = labseg.train.validate, iter([0.5, 0.6, 0.55, 0.58, 0.9])

    def scripted(*args, **kwargs):        # the epochs' valid Dice, then the averaged weights'
        scores, d = real(*args, **kwargs), next(dice)
        if d == 0.9:
            time.sleep(1.5)                 # a validation of the averaged weights that takes its time
        return {**scores, "valid_dice": d}
    monkeypatch.setattr(labseg.train, "validate", scripted)
    result = fit(arch=small_net, swa=0.5, run_name="swa-best", **{**tiny, "epochs": 4})
    summary = result.summary
    assert summary["best_is_swa"] and summary["swa_valid_dice"] == 0.9
    assert result.run.describe_checkpoint("best").startswith("best.pt (weights averaged over its last 3 epochs")
    elapsed = load_checkpoint(result.run.checkpoint("last"))["elapsed"]
    assert abs(summary["train_seconds"] - elapsed) < 0.5, (summary["train_seconds"], elapsed)


def test_resume_of_an_ema_run_continues_the_raw_weights(tiny, small_net, monkeypatch):
    """last.pt deploys the averaged weights as "model"; training must go on from "raw_model"."""
    first = fit(arch=small_net, ema=0.5, run_name="ema", **tiny)
    ckpt = load_checkpoint(first.run.checkpoint("last"))
    name = "down.0.weight"
    assert not torch.equal(ckpt["model"][name], ckpt["raw_model"][name])
    started_from = {}
    real = labseg.train.load_weights

    def spy(model, *args, **kwargs):
        real(model, *args, **kwargs)
        started_from.update({k: v.clone() for k, v in model.state_dict().items()})
    monkeypatch.setattr(labseg.train, "load_weights", spy)
    fit(arch=small_net, ema=0.5, run_name="ema", resume=True, **{**tiny, "epochs": 3})
    assert torch.equal(started_from[name], ckpt["raw_model"][name])


def test_weight_ema_averages_as_torchs_ema_does_and_keeps_its_state_dict():
    """WeightEMA is AveragedModel + get_ema_multi_avg_fn without the per-step host-device sync:
    the same weights and BatchNorm statistics after each update, and checkpoints that load either way."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    ours = WeightEMA(model, 0.9)
    theirs = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True)
    first = model[0].weight.detach().clone()
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(2, 3, 8, 8))          # moves BatchNorm's running statistics
        ours.update_parameters(model)
        theirs.update_parameters(model)
        for name, value in theirs.state_dict().items():
            if value.is_floating_point():
                assert torch.allclose(ours.state_dict()[name], value, rtol=0, atol=1e-6), (step, name)
    assert ours.state_dict().keys() == theirs.state_dict().keys() and ours.n_averaged.item() == 4
    # an average, not a copy of the last weights nor the first
    assert not torch.allclose(ours.module[0].weight, model[0].weight)
    assert not torch.allclose(ours.module[0].weight, first)
    # the step count is copied (torch's blend truncates it), the counter stays on the CPU
    assert ours.module[1].num_batches_tracked.item() == 4 and ours.n_averaged.device.type == "cpu"
    theirs.load_state_dict(ours.state_dict())


def test_sam_ascent_moves_the_weights_rho_along_the_gradient():
    torch.manual_seed(0)
    params = [torch.randn(3, 4), torch.randn(5)]
    before = [p.clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1e3          # a scaled (fp16-style) gradient: same step
    norm = torch.cat([p.grad.flatten() for p in params]).norm()
    steps = _sam_ascent(params, 0.05)
    assert torch.cat([s.flatten() for s in steps]).norm().item() == pytest.approx(0.05, rel=1e-5)
    for p, b, s in zip(params, before, steps):
        assert torch.allclose(p - b, 0.05 * p.grad / norm, atol=1e-7)
        assert torch.allclose(s, p - b)


def test_an_overflowed_scaled_gradient_makes_no_sam_step():
    """fp16 scaling overflows now and then (GradScaler skips that step); SAM's ascent on it was
    inf/inf = NaN added to the weights, which the step back could not take out."""
    params = [torch.tensor([1.0, 2.0, 3.0])]
    params[0].grad = torch.tensor([1.0, float("inf"), 2.0])
    steps = _sam_ascent(params, 0.05)
    torch._foreach_sub_(params, steps)              # as _sam_second_pass steps back
    assert torch.equal(params[0], torch.tensor([1.0, 2.0, 3.0]))


def test_frozen_batchnorm_stats_keep_the_running_statistics():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    bn = net[1]
    mean = bn.running_mean.clone()
    with _frozen_batchnorm_stats(net):
        net(torch.randn(2, 3, 8, 8) + 5)
    assert torch.equal(bn.running_mean, mean) and bn.momentum == 0.1
    net(torch.randn(2, 3, 8, 8) + 5)                 # outside the block the statistics move again
    assert not torch.equal(bn.running_mean, mean)


def test_sam_trains_to_other_weights_than_plain_steps(tiny, small_net):
    plain = fit(arch=small_net, run_name="plain", **{**tiny, "epochs": 1})
    sam = fit(arch=small_net, run_name="sam", sam=0.05, **{**tiny, "epochs": 1})
    assert sam.run.read_config().sam == 0.05 and plain.run.read_config().sam == 0.0
    name = "down.0.weight"
    a, b = plain.model.state_dict()[name], sam.model.state_dict()[name]
    assert torch.isfinite(b).all() and not torch.allclose(a, b)
    assert all(math.isfinite(r["train_loss"]) for r in sam.history)


def test_resume_of_a_run_recorded_before_newer_config_fields(tiny):
    """config.json of an older labseg lacks newer options: they read as off, which is how that run
    trained, even where today's recipe turns them on (resnet34_unet's mosaic)."""
    first = fit(arch="resnet34_unet", run_name="old", **tiny)
    path = first.run.path / "config.json"
    recorded = json.loads(path.read_text())
    assert recorded["mosaic"] == recipe_for("resnet34_unet")["mosaic"] > 0
    for key in ("sam", "output_stride", "mosaic", "mosaic_until", "mosaic_background", "low_res_scale"):
        del recorded[key]
    path.write_text(json.dumps(recorded))
    old = first.run.read_config()
    assert (old.sam, old.output_stride, old.mosaic, old.mosaic_until, old.mosaic_background,
            old.low_res_scale) == (0.0, 32, 0.0, 1.0, 0.0, 0.0)
    resumed = fit(arch="resnet34_unet", run_name="old", resume=True, **{**tiny, "epochs": 3})
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.run.read_config().mosaic == 0.0
    with pytest.raises(ConfigError, match="differs in sam: recorded 0.0, asked 0.05"):
        fit(arch="resnet34_unet", run_name="old", resume=True, sam=0.05, **{**tiny, "epochs": 4})


def test_mosaics_stop_at_mosaic_until(tiny, small_net, monkeypatch):
    """mosaic=1 with mosaic_until=0.5 over 4 epochs: mosaics in epochs 1 and 2, whole images after."""
    epochs, mosaic_epochs = [], []
    set_epoch, mosaic = Batches.set_epoch, BatchAugment._mosaic
    monkeypatch.setattr(Batches, "set_epoch", lambda self, e: (epochs.append(e), set_epoch(self, e))[1])
    monkeypatch.setattr(BatchAugment, "_mosaic",
                        staticmethod(lambda *args: (mosaic_epochs.append(epochs[-1]), mosaic(*args))[1]))
    fit(arch=small_net, mosaic=1.0, mosaic_until=0.5, run_name="close", **{**tiny, "epochs": 4})
    assert epochs == [1, 2, 3, 4] and sorted(set(mosaic_epochs)) == [1, 2]


def _before_each_forward(monkeypatch, arch, call) -> None:
    """``call(network, x)`` ahead of every forward pass of network ``arch`` (undone after the test)."""
    network = labseg.models.MODELS[arch]
    forward = network.forward
    monkeypatch.setattr(network, "forward", lambda self, x: (call(self, x), forward(self, x))[1])


def test_low_res_epochs_until_low_res_until(tiny, small_net, monkeypatch):
    """low_res_scale=0.5 at img_size 64 until half of 4 epochs: the model sees 32 px in epochs 1-2,
    64 px after; validation stays at 64 px throughout."""
    epochs, seen = [], []
    set_epoch = Batches.set_epoch
    monkeypatch.setattr(Batches, "set_epoch", lambda self, e: (epochs.append(e), set_epoch(self, e))[1])
    _before_each_forward(monkeypatch, small_net,
                         lambda net, x: seen.append((epochs[-1] if epochs else 0, net.training, x.shape[-1])))
    result = fit(arch=small_net, low_res_scale=0.5, low_res_until=0.5, run_name="lowres",
                 **{**tiny, "img_size": 64, "epochs": 4})
    train_sizes = {(e, size) for e, training, size in seen if training}     # epoch 0: fit's check of the network
    assert train_sizes == {(0, 64), (1, 32), (2, 32), (3, 64), (4, 64)}
    assert {size for _, training, size in seen if not training} == {64}
    assert result.run.read_config().low_res_scale == 0.5


def test_a_phase_ends_within_an_epoch(tiny, small_net, monkeypatch):
    """One epoch of four steps with low_res_until=0.5: two steps at 32 px, then two at 64 px. The
    phases changed only between epochs, so a budget of one long epoch never reached img_size."""
    seen = []
    _before_each_forward(monkeypatch, small_net, lambda net, x: seen.append((net.training, x.shape[-1])))
    fit(arch=small_net, low_res_scale=0.5, low_res_until=0.5, run_name="lowres1",
        **{**tiny, "img_size": 64, "epochs": 1, "batch_size": 2})
    assert [size for training, size in seen if training] == [64, 32, 32, 64, 64]    # first: fit's check at img_size


def test_resume_keeps_what_was_not_asked_again():
    """A budget run resumed without --time-budget keeps its epoch count (the recipe's 40 once
    replaced it); fields asked for again, and only those, are compared or changed."""
    recorded = RunConfig(arch="unet", img_size=64, seed=3, run_name="r", time_budget="25m").with_recipe()
    assert recorded.epochs == UNTIL_BUDGET
    merged = _merge_resumed(recorded, {"run_name": "r"})
    assert merged == recorded
    assert _merge_resumed(recorded, {"run_name": "r", "epochs": 7}).epochs == 7
    assert _merge_resumed(recorded, {"arch": "unet", "seed": 3}) == recorded      # given again, the same
    with pytest.raises(ConfigError, match="differs in lr"):
        _merge_resumed(recorded, {"run_name": "r", "lr": 0.5})
    with pytest.raises(ConfigError, match="arch: recorded 'unet', asked 'resnet34_unet'"):
        _merge_resumed(recorded, {"arch": "resnet34_unet"})
    # a folder given again agrees however it is spelt: relative (to the project root), absolute, Path
    assert _merge_resumed(recorded, {"data_dir": PROJECT_ROOT / "data" / "sample",
                                     "output_dir": str(PROJECT_ROOT / "outputs/runs")}) == recorded
    # where the run, its cache and its dataset are may change (a run copied to another machine)
    moved = _merge_resumed(recorded, {"data_dir": "/elsewhere/pets", "output_dir": "/elsewhere/runs"})
    assert (moved.data_dir, moved.output_dir, moved.arch) == ("/elsewhere/pets", "/elsewhere/runs", "unet")


def test_time_budget_stops_cleanly(tiny, small_net):
    result = fit(arch=small_net, run_name="tb", time_budget=1, **{**tiny, "epochs": 200})
    assert result.summary["stop_reason"].startswith("time budget")
    assert 1 <= result.summary["epochs_run"] < 200
    assert result.run.checkpoint("best").is_file()
    # spent, though maybe with a few seconds left over: a resume with the same budget is refused
    with pytest.raises(ConfigError, match="has already spent its time budget of 1; to train it further"):
        fit(arch=small_net, run_name="tb", resume=True, **{**tiny, "epochs": None})


def test_a_budget_spent_inside_an_epoch_stops_after_the_step_that_spent_it(tiny, small_net, monkeypatch):
    """An epoch longer than the whole budget (the full dataset on a CPU): the run stops inside its
    first epoch, after the step that spent the budget, and that part of an epoch is validated and kept."""
    steps = []

    def slow(net, x):                   # 0.4 s a training step: four of them are 1.6 s, over the 1 s
        if net.training:
            steps.append(x.shape[0])
            time.sleep(0.4)
    _before_each_forward(monkeypatch, small_net, slow)
    result = fit(arch=small_net, run_name="inside", time_budget=1, **{**tiny, "batch_size": 2, "epochs": 3})
    assert result.summary["stop_reason"] == "time budget of 1 spent"
    assert result.summary["epochs_run"] == 1 and load_checkpoint(result.run.checkpoint("last"))["epoch"] == 1
    assert 1 <= len(steps) - 1 < 4      # after fit's check of the network: fewer than the epoch's 4 steps


def test_the_time_budget_counts_the_validation_that_follows_the_steps(tiny, small_net, monkeypatch):
    """A budget of 5 s, epochs of ~0.05 s (small_net) and a validation of 3 s (370 images of the full dataset
    took 80 s on a CPU): after the first epoch (~3.1 s) another epoch and its validation do not
    fit, so the run stops there; counting the steps alone, it started a second and ended ~2 s late."""
    import labseg.train

    real = labseg.train.validate

    def slow_validation(*args, **kwargs):
        time.sleep(3.0)
        return real(*args, **kwargs)
    monkeypatch.setattr(labseg.train, "validate", slow_validation)
    result = fit(arch=small_net, run_name="tbv", time_budget=5, **{**tiny, "epochs": 200})
    # On a busy machine the start and epoch 1 alone can spend the 5 s (the budget then ends inside
    # it, and the reason says only that); what must not happen is a second epoch begun.
    assert result.summary["epochs_run"] == 1
    assert result.summary["stop_reason"] in ("time budget of 5 spent (no time for another epoch)",
                                             "time budget of 5 spent")


def test_one_slow_validation_does_not_stop_a_budget_run_early(tiny, small_net, monkeypatch):
    """The second validation takes 3 s (a cold cache, kernel autotuning), the others a few ms, and
    epochs of the small network ~0.05 s: with 5 s of budget, reserving that one validation's time
    stopped the run after epoch 2 with ~1.5 s left; the quickest validation is what one costs."""
    import labseg.train

    real, calls = labseg.train.validate, []

    def one_slow_validation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(3.0)
        return real(*args, **kwargs)
    monkeypatch.setattr(labseg.train, "validate", one_slow_validation)
    result = fit(arch=small_net, run_name="slow2", time_budget=5, **{**tiny, "epochs": 10_000})
    assert result.summary["stop_reason"].startswith("time budget")
    # the reserve of the slow validation stopped it after epoch 2; a loaded machine (another process on
    # both cores) has run it to only 3 epochs, which a "> 3" here failed
    assert result.summary["epochs_run"] > 2
    # the reserve goes into the checkpoint, for the first epoch of a resume
    assert 0 < load_checkpoint(result.run.checkpoint("last"))["valid_seconds"] < 3


def test_lr_schedule_shapes():
    assert lr_factor("cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor("cosine", 0.5) == pytest.approx(0.505)
    assert lr_factor("cosine", 1.0) == pytest.approx(0.01)
    assert lr_factor("cosine", 0.0, step=0, warmup_steps=10) == pytest.approx(0.01)
    assert lr_factor("cosine", 0.0, step=5, warmup_steps=10) == pytest.approx(0.505)
    assert lr_factor("cosine", 0.5, step=20, warmup_steps=10) == pytest.approx(0.505)
    assert lr_factor("onecycle", 0.3) == pytest.approx(1.0)
    assert lr_factor("onecycle", 1.0) == pytest.approx(1e-4)
    assert lr_factor("none", 0.7) == 1.0 and lr_factor("plateau", 0.01, 1, 4) == pytest.approx(0.2575)


def test_warm_up_ends_by_a_twentieth_of_training_however_long_an_epoch_is():
    """An epoch of warm-up (413 steps: the full dataset at batch 8) under a budget shorter than an
    epoch: the lr reaches its peak by 5% of the budget, not after the budget."""
    assert lr_factor("none", 0.025, step=10, warmup_steps=413) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor("none", 0.05, step=20, warmup_steps=413) == pytest.approx(1.0)
    assert lr_factor("cosine", 0.5, step=38, warmup_steps=413) == pytest.approx(0.505)
    # a first step that took 6% of the budget by itself (torch.compile) does not end the warm-up,
    assert lr_factor("none", 0.06, step=1, warmup_steps=413) == pytest.approx(0.01 + 0.99 / 3)
    # and a budget of a few 12-s steps (256 px, batch 32, on a CPU) is at its peak lr by the third
    assert lr_factor("none", 0.6, step=3, warmup_steps=8) == pytest.approx(1.0)
    # where an epoch is a small part of training, the warm-up is the epoch, as before
    assert lr_factor("none", 0.001, step=5, warmup_steps=10) == pytest.approx(0.505)


# --------------------------------------------------------------------------- checkpoints
def test_disk_full_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"arch": "unet", "model": {"w": torch.ones(3)}, "format_version": 1})
    before = path.read_bytes()

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"arch": "unet", "model": {"w": torch.zeros(3)}, "format_version": 1})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "a temporary file was left behind"
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))



def test_background_writer_snapshots_and_writes_every_path(tmp_path):
    weights = torch.ones(1000)
    writer = CheckpointWriter()
    writer.submit({"arch": "unet", "model": {"w": weights}, "format_version": 1},
                  tmp_path / "last.pt", tmp_path / "best.pt")
    weights.zero_()                      # training goes on changing the weights in place
    writer.wait()
    for name in ("last.pt", "best.pt"):
        assert torch.equal(load_checkpoint(tmp_path / name)["model"]["w"], torch.ones(1000)), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_background_writer_raises_a_failed_write_at_the_next_call(tmp_path):
    (tmp_path / "not_a_folder").write_text("a file where the run folder should be")
    writer = CheckpointWriter()
    writer.submit({"model": {}}, tmp_path / "not_a_folder" / "last.pt")
    with pytest.raises(OSError, match="not_a_folder/last.pt"):
        writer.wait()
    writer.wait()                        # reported once, then the writer is usable again


def test_a_full_disk_names_the_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"arch": "unet", "model": {"w": torch.ones(3)}, "format_version": 1})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(labseg.runs.os, "fsync", disk_full)
    with pytest.raises(OSError, match=r"could not write .*last\.pt \([\d.]+ KiB\): No space left") as e:
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]       # no temporary file left


@pytest.mark.parametrize("failing, nth, code, reason", [
    ("last.pt", 2, errno.ENOSPC, "No space left on device"),         # epoch 2's checkpoint
    ("last.pt", 2, errno.EACCES, "Permission denied"),               # the folder made read-only
    ("summary.json", 1, errno.ENOSPC, "No space left on device"),    # after the last checkpoint
])
def test_a_disk_that_fails_mid_run_is_one_error_and_the_command_that_goes_on(synthetic_root, small_net, tmp_path, capsys,
                                                                            monkeypatch, failing, nth, code, reason):
    """The disk fails a write: no traceback, the file and the reason, which epoch last.pt still
    holds and how to go on; once the disk is fixed, that command finishes the run."""
    real, writes = labseg.runs.atomic_write_bytes, []

    def fails(path, data):
        if Path(path).name == failing:
            writes.append(path)
            if len(writes) == nth:
                raise OSError(code, f"could not write {path}: {reason}")
        real(path, data)
    monkeypatch.setattr(labseg.runs, "atomic_write_bytes", fails)
    runs = tmp_path / "runs"
    args = ["train", "--arch", small_net, "--data", str(synthetic_root), "--img-size", "32", "--epochs", "3",
            "--max-train-images", "4", "--run-name", "d", "--output-dir", str(runs), "--cache-dir",
            str(tmp_path / "cache"), "--checkpoint-every", "0", "--quiet"]
    out = _main(capsys, *args)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"labseg: error: [Errno {code}] could not write {runs / 'd' / failing}: {reason}" in out.stderr
    held = 1 if failing == "last.pt" else 3
    assert (f"labseg: {runs / 'd'} holds the run up to epoch {held}; once the cause is fixed, continue with "
            f"`labseg train --run-name d --output-dir {runs} --resume`") in out.stderr
    assert load_checkpoint(runs / "d" / "last.pt")["epoch"] == held
    monkeypatch.undo()
    out = _main(capsys, *args, "--resume")
    assert out.returncode == 0, out.stderr
    assert RunDir(runs / "d").read_summary()["epochs_run"] == 3


def test_running_out_of_memory_mid_run_is_one_line_saying_what_to_reduce_and_how_to_go_on(synthetic_root, small_net, tmp_path,
                                                                                           capsys, monkeypatch):
    """torch's CPU allocator failing (a laptop's memory full) in epoch 2: what to reduce, which epoch
    last.pt holds and the command that continues, not the allocator's traceback."""
    real = labseg.train.train_one_epoch

    def out_of_memory_in_epoch_2(*args, **kwargs):
        if args[8] == 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 33554432 bytes. Error code 12 (Cannot allocate memory)")
        return real(*args, **kwargs)
    monkeypatch.setattr(labseg.train, "train_one_epoch", out_of_memory_in_epoch_2)
    runs = tmp_path / "runs"
    out = _main(capsys, "train", "--arch", small_net, "--data", str(synthetic_root), "--img-size", "32", "--epochs", "3",
                "--max-train-images", "4", "--run-name", "m", "--output-dir", str(runs), "--cache-dir",
                str(tmp_path / "cache"), "--quiet")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert ("labseg: error: out of memory (can't allocate memory: you tried to allocate 33554432 bytes. Error code 12 "
            "(Cannot allocate memory)); close other programs, or train a new run with a smaller --batch-size or "
            "--img-size") in out.stderr
    assert (f"labseg: {runs / 'm'} holds the run up to epoch 1; once the cause is fixed, continue with "
            f"`labseg train --run-name m --output-dir {runs} --resume`") in out.stderr


def test_an_oserror_that_is_no_disk_trouble_keeps_its_traceback(capsys, monkeypatch):
    """Only the disk's errors become one line: a fault in the code that raises an OSError
    (IsADirectoryError, say) is raised as it is."""
    def faulty(args):
        open(Path(__file__).parent)
    monkeypatch.setattr(labseg.cli, "cmd_report", faulty)
    with pytest.raises(IsADirectoryError):
        labseg.cli.main(["report"])


def test_a_run_killed_between_its_first_best_pt_and_last_pt_resumes_from_best(tiny, small_net, capsys):
    run = fit(arch=small_net, run_name="b", **{**tiny, "epochs": 1}).run
    # an older labseg wrote best.pt first, a whole training state: a kill left only it
    run.checkpoint("best").write_bytes(run.checkpoint("last").read_bytes())
    run.checkpoint("last").unlink()
    capsys.readouterr()
    result = fit(arch=small_net, run_name="b", resume=True, **tiny)
    assert "run b has no last.pt yet; resuming from best.pt" in capsys.readouterr().out
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_amp_follows_the_flag_on_cpu(tiny, small_net):
    from labseg.config import RunConfig
    cpu = torch.device("cpu")
    assert _amp_dtype(RunConfig(amp=False), cpu) is None
    assert _amp_dtype(RunConfig(amp=True), cpu) is torch.bfloat16
    result = fit(arch=small_net, amp=True, **tiny)           # bf16 autocast end to end, fp32 loss
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}   # fp32 master weights


@pytest.mark.parametrize("capability, expected", [("AVX2", False), ("AVX512", True)])
def test_memory_format_by_default_follows_the_cpu(tiny, monkeypatch, capability, expected):
    """channels_last unset: contiguous tensors on a CPU with AVX2 and no AVX512, channels_last on
    others; a flag wins. The network and every batch it trains on are in that format, config.json
    keeps the choice as asked (unset), and evaluation on another CPU gives the same Dice."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cpu = torch.device("cpu")
    assert channels_last_for(cpu) is expected
    assert channels_last_for(cpu, True) is True and channels_last_for(cpu, False) is False
    assert channels_last_for(torch.device("cuda")) is True

    def channels_last(t):   # unambiguous for these shapes: more than one channel and pixel
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    seen = []
    _before_each_forward(monkeypatch, "resnet34_unet", lambda net, x: seen.append(
        (channels_last(x), frozenset(channels_last(p) for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1
                                     and p.shape[-1] > 1))))
    result = fit(arch="resnet34_unet", run_name=f"format-{capability}", **tiny)
    assert seen and set(seen) == {(expected, frozenset({expected}))}
    assert json.loads((result.run.path / "config.json").read_text())["channels_last"] is None
    # summary.json records what was used, with the CPU's capability that decided it
    machine = json.loads((result.run.path / "summary.json").read_text())["machine"]
    assert machine["memory_format"] == ("channels_last" if expected else "contiguous")
    assert machine["cpu_capability"] == capability and machine["device"] == "cpu"

    dice = evaluate_run(result.run, split="valid", which="last", progress=False, save=False)["dice"]
    other = "AVX512" if capability == "AVX2" else "AVX2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    seen.clear()
    assert evaluate_run(result.run, split="valid", which="last", progress=False, save=False)["dice"] == pytest.approx(dice, abs=1e-4)
    assert set(seen) == {(not expected, frozenset({not expected}))}


def test_fp16_trains_with_loss_scaling_and_records_the_scaler(tiny, small_net, monkeypatch):
    # fp16 autocast (GPUs without bf16) must go through a GradScaler; forced here on the CPU.
    import labseg.train
    monkeypatch.setattr(labseg.train, "_amp_dtype", lambda config, device: torch.float16)
    result = fit(arch=small_net, run_name="fp16", **tiny)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)
    scaler = load_checkpoint(result.run.checkpoint("last"))["scaler"]
    assert scaler and scaler["scale"] > 0
    assert json.loads((result.run.path / "summary.json").read_text())["machine"]["precision"] == "fp16"

class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# Any warning fails the test: torch's own about the plain pickle's protocol is labseg's to hide.
@pytest.mark.filterwarnings("error")
def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    for name, save in (("zip.pt", lambda p, o: torch.save(o, p)),
                       ("plain.pt", lambda p, o: p.write_bytes(pickle.dumps(o)))):
        path = tmp_path / name
        save(path, {"arch": "unet", "model": {}, "payload": _Exploit(marker)})
        with pytest.raises(CheckpointError, match="was refused: it (holds objects other than tensors|is damaged)"):
            load_checkpoint(path)
        assert not marker.exists(), "unpickling ran code"
    noise = tmp_path / "noise.pt"        # damaged, not dangerous: said so, and torch's advice not quoted
    noise.write_bytes(bytes(range(256)) * 400)
    with pytest.raises(CheckpointError, match="was refused: it is damaged or is not a torch.save file") as e:
        load_checkpoint(noise)
    assert "could run code" not in str(e.value) and "weights_only" not in str(e.value)


def test_checkpoint_of_the_other_arch_names_both_and_the_key(tmp_path):
    unet = build_model("unet")
    path = tmp_path / "unet.pt"
    save_checkpoint(path, {"arch": "unet", "model": unet.state_dict(), "format_version": 1, "config": {}})
    with pytest.raises(CheckpointError) as e:
        load_weights(build_model("resnet34_unet"), load_checkpoint(path), "resnet34_unet")
    msg = str(e.value)
    assert "'unet'" in msg and "'resnet34_unet'" in msg and "first missing key 'encoder.stem.0.weight'" in msg


def test_checkpoint_with_extra_or_missing_keys(tmp_path):
    model = build_model("resnet34_unet")
    state = model.state_dict()
    extra = {**state, "bonus.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="first unexpected key 'bonus.weight'"):
        load_weights(model, {"arch": "resnet34_unet", "model": extra}, "resnet34_unet")
    missing = dict(state)
    missing.pop("head.weight")
    with pytest.raises(CheckpointError, match="first missing key 'head.weight'") as e:
        load_weights(model, {"arch": "resnet34_unet", "model": missing}, "resnet34_unet")
    # the same arch name on both sides: the message says the layouts differ, not "a X but a X"
    assert "do not fit labseg's 'resnet34_unet'" in str(e.value) and "but a" not in str(e.value)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a labseg checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    # safe to unpickle, but its weights are not a state_dict: named, not an AttributeError later
    for weights, kind in (({"w": 1}, "dict"), (torch.zeros(2), "Tensor"), (None, "NoneType")):
        torch.save({"arch": "unet", "model": weights, "format_version": 1}, path)
        with pytest.raises(CheckpointError, match=rf"{path}.*'model' is a {kind}, not a dict of named tensors"):
            load_checkpoint(path)


# --------------------------------------------------------------------------- processes
def _labseg(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "labseg.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, **kwargs)


def _main(capsys, *args):
    """labseg.cli.main in this process (no interpreter start): (returncode, stdout, stderr)."""
    from labseg.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_mid_epoch_then_resume(synthetic_root, tmp_path, sig):
    """SIGTERM (kill, a batch system's limit) stops like Ctrl-C: the write in flight finishes."""
    args = ["train", "--data", str(synthetic_root), "--img-size", "32", "--batch-size", "2", "--epochs", "4",
            "--max-train-images", "16", "--run-name", "killed", "--output-dir", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / "cache"), "--log-every", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "labseg.cli", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "killed" / "metrics.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and json.loads(metrics.read_text()):
            break
        time.sleep(0.05)
    if not metrics.is_file():       # the training failed, or the machine is too loaded to reach an epoch
        proc.kill()
        pytest.fail(f"no epoch recorded within 300 s; the training's stderr ends: {proc.communicate()[1][-2000:]}")
    time.sleep(0.5)                                   # into epoch 2
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(sig)
    stderr = proc.communicate()[1]
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "stopped by SIGTERM" in stderr and "Traceback" not in stderr, stderr
        assert not list(metrics.parent.glob("*.tmp"))
        # the message names the run and the epoch its checkpoint holds, and the command to go on
        saved = torch.load(metrics.parent / "last.pt", weights_only=True)["epoch"]
        assert (f"{metrics.parent} holds the run up to epoch {saved} (continue with `labseg train --run-name "
                f"killed --output-dir {tmp_path / 'runs'} --resume`)") in stderr, stderr
    done = [r["epoch"] for r in json.loads(metrics.read_text())]
    assert done and done[-1] < 4
    out = _labseg(*args, "--resume")
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stdout
    epochs = [r["epoch"] for r in json.loads(metrics.read_text())]
    assert epochs == [1, 2, 3, 4]


def test_cli_resume_takes_what_is_not_given_from_the_run(synthetic_root, small_net, tmp_path, capsys):
    """`labseg train --run-name RUN --resume`, as the README says it: no option repeated. More
    epochs may be asked for, and config.json then says so; a finished run is not retrained."""
    where = ["--output-dir", str(tmp_path / "runs")]
    out = _main(capsys, "train", "--arch", small_net, "--data", str(synthetic_root), "--img-size", "32", "--seed", "3",
                  "--epochs", "1", "--max-train-images", "4", "--run-name", "again", "--quiet",
                  "--cache-dir", str(tmp_path / "cache"), *where)
    assert out.returncode == 0, out.stderr
    out = _main(capsys, "train", "--run-name", "again", "--resume", "--epochs", "2", "--quiet", *where)
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stdout and f"training {small_net}" in out.stdout
    run = RunDir(tmp_path / "runs" / "again")
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]
    config = run.read_config()
    assert (config.arch, config.img_size, config.seed, config.epochs) == (small_net, 32, 3, 2)
    out = _main(capsys, "train", "--run-name", "again", "--resume", *where)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "run again has already trained all its 2 epochs; to train it further, resume with more" in out.stderr
    out = _main(capsys, "train", "--run-name", "again", "--resume", "--seed", "4", *where)
    assert out.returncode == 2 and "differs in seed: recorded 3, asked 4" in out.stderr
    for name in ("best.pt", "last.pt"):       # as if killed in its first epoch
        (tmp_path / "runs" / "again" / name).unlink()
    out = _main(capsys, "train", "--run-name", "again", "--resume", "--epochs", "3", *where)
    assert out.returncode == 2 and "--overwrite" in out.stderr
    assert "run again has no complete checkpoint (it stopped before its first epoch ended)" in out.stderr
    # killed while its first checkpoint was being written: said so, and the unfinished file goes
    (tmp_path / "runs" / "again" / ".best.pt.x1y2z3.tmp").write_bytes(b"\0" * 1000)
    out = _main(capsys, "train", "--run-name", "again", "--resume", "--epochs", "3", *where)
    assert out.returncode == 2 and "its first checkpoint was being written when the process was killed" in out.stderr
    assert not list((tmp_path / "runs" / "again").glob("*.tmp"))


def test_a_run_that_cannot_start_leaves_no_folder(tmp_path):
    runs = tmp_path / "runs"
    for _ in range(2):
        with pytest.raises(labseg.data.DatasetLayoutError, match="does not exist"):
            fit(arch="unet", data_dir=str(tmp_path / "nowhere"), run_name="stub", output_dir=str(runs),
                cache_dir=str(tmp_path / "cache"), progress=False)
    assert not runs.exists() or not list(runs.iterdir())
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(labseg.data.DatasetLayoutError, match="notes.txt is a file; expected the dataset's folder"):
        fit(arch="unet", data_dir=str(tmp_path / "notes.txt"), output_dir=str(runs), progress=False)
    assert not runs.exists() or not list(runs.iterdir())
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['nosuch'\]; valid keys: amp, arch, "):
        fit(arch="unet", nosuch=1, output_dir=str(runs), progress=False)


def test_cli_train_evaluate_predict(synthetic_root, tmp_path):
    common = ["--output-dir", str(tmp_path / "runs")]
    out = _labseg("train", "--data", str(synthetic_root), "--img-size", "32", "--epochs", "1",
                  "--max-train-images", "4", "--run-name", "cli", "--cache-dir", str(tmp_path / "cache"), "--evaluate",
                  *common)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "runs" / "cli"
    assert "cli best.pt on test (24 images at 32 px): Dice" in out.stdout
    assert "cli last.pt on test (24 images at 32 px)" in out.stdout
    assert "this run's checkpoint is last.pt (stop: completed all epochs; scheduler cosine)" in out.stdout
    # one epoch: best.pt and last.pt are one save's bytes, evaluated once and recorded for both
    assert "cli last.pt on test (24 images at 32 px): Dice" in out.stdout and "(the same weights as best.pt" in out.stdout
    evaluated = {which: json.loads((run / name).read_text())
                 for which, name in (("best", "eval_test.json"), ("last", "eval_test_last.json"))}
    assert evaluated["last"].pop("same_weights_as") == "best" and "same_weights_as" not in evaluated["best"]
    assert {which: e.pop("checkpoint") for which, e in evaluated.items()} == {"best": "best", "last": "last"}
    assert evaluated["best"] == evaluated["last"] and "tta" in evaluated["last"]
    for name in ("eval_test.json", "eval_test_last.json"):
        (run / name).unlink()                         # the evaluate commands below write them again
    out = _labseg("evaluate", str(run), "--tta", "--tune-threshold")  # the run's own: its cosine schedule finished
    assert out.returncode == 0, out.stderr
    assert "cli last.pt on test (24 images at 32 px): Dice" in out.stdout
    for breed in ("Blobcat", "Stripecat", "fluffy_dog", "spot_dog", "cat", "dog"):
        assert f"  {breed} " in out.stdout
    assert "with flip TTA" in out.stdout and "tuned on valid" in out.stdout and "flip TTA + threshold" in out.stdout
    assert not (run / "eval_test.json").exists()
    result = json.loads((run / "eval_test_last.json").read_text())
    # the tuned threshold reads apart from TTA; the two together are a variant of their own
    assert result["threshold_tuned"]["tta"] is False and result["tta_threshold_tuned"]["tta"] is True
    assert set(result["per_breed"]) == {"Blobcat", "Stripecat", "fluffy_dog", "spot_dog"}
    out = _labseg("evaluate", str(run), "--checkpoint", "best")   # kept beside last.pt's, not over it
    assert out.returncode == 0, out.stderr
    assert json.loads((run / "eval_test.json").read_text())["checkpoint"] == "best"
    assert json.loads((run / "eval_test_last.json").read_text()) == result
    out = _labseg("predict", str(run), str(synthetic_root / "images"), "--out", str(tmp_path / "pred"))
    assert out.returncode == 0, out.stderr
    masks = sorted((tmp_path / "pred").glob("*_mask.png"))
    assert len(masks) == len(list((synthetic_root / "images").glob("*.jpg")))
    from PIL import Image

    first = sorted((synthetic_root / "images").glob("*.jpg"))[0]
    assert Image.open(tmp_path / "pred" / f"{first.stem}_mask.png").size == Image.open(first).size


def test_cli_predict_and_evaluate_name_what_is_wrong(tiny, small_net, tmp_path, capsys, monkeypatch):
    run = fit(arch=small_net, run_name="p", **tiny).run
    runs = ["--output-dir", tiny["output_dir"]]
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 120, 40)).save(pictures / "a.jpg")
    Image.new("RGB", (20, 10), (20, 120, 40)).save(pictures / "a.png")
    (pictures / "notes.jpg").write_text("not a picture")
    out = _main(capsys, "predict", "p", str(pictures), "--out", str(tmp_path / "pred"), *runs)   # a run by name
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "2 masks and overlays written" in out.stdout and f"(predicted by {run.path / 'last.pt'})" in out.stdout
    assert "labseg: error: 1 of 3 images could not be read:" in out.stderr and "notes.jpg" in out.stderr
    assert sorted(p.name for p in (tmp_path / "pred").glob("*_mask.png")) == ["a_jpg_mask.png", "a_png_mask.png"]
    assert Image.open(tmp_path / "pred" / "a_png_mask.png").size == (20, 10)
    # predicting into the source folder, twice: its own masks and overlays are not predicted again
    for _ in range(2):
        out = _main(capsys, "predict", "p", str(pictures), "--out", str(pictures), *runs)
        assert "2 masks and overlays written" in out.stdout
    assert sorted(p.name for p in pictures.glob("*_mask*.png")) == ["a_jpg_mask.png", "a_png_mask.png"]
    for where in (pictures / "a.jpg", pictures / "a.jpg" / "masks"):     # a file, a folder to make in one
        out = _main(capsys, "predict", "p", str(pictures), "--out", str(where), *runs)
        assert out.returncode == 2 and f"out='{where}': {pictures / 'a.jpg'} is a file; expected a folder" in out.stderr
    # without --out: the project's outputs/, from any folder, like every other output of labseg
    import shutil
    import uuid

    default = f"outputs/test-predictions-{uuid.uuid4().hex[:8]}"     # the project's, removed below
    monkeypatch.setattr(labseg.cli, "PREDICTIONS_DIR", default)
    monkeypatch.chdir(tmp_path)
    try:
        out = _main(capsys, "predict", "p", str(pictures / "a.png"), *runs)
        assert out.returncode == 0 and f"written to {PROJECT_ROOT / default} (predicted by" in out.stdout
        assert (PROJECT_ROOT / default / "a_mask.png").is_file() and not (tmp_path / "outputs").exists()
    finally:
        shutil.rmtree(PROJECT_ROOT / default, ignore_errors=True)
    # one unreadable image given alone: one error line, no "0 masks written" and no repeat
    (pictures / "empty.jpg").write_bytes(b"")
    for name, reason in (("notes.jpg", "cannot decode image (UnidentifiedImageError"),
                         ("empty.jpg", "empty file (0 bytes); expected an image")):
        out = _main(capsys, "predict", "p", str(pictures / name), "--out", str(tmp_path / "one"), *runs)
        assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
        assert f"labseg: error: {pictures / name}: {reason}" in out.stderr
        assert "skipped" not in out.stderr and "could not be read" not in out.stderr
    (pictures / "empty.jpg").unlink()
    for args, expected in ((["--img-size", "50"], "img_size=50: must be divisible by 32 (ResNet34-UNet halves the size 5 times, UNet 4; one rule for both); try 32 or 64 (or leave it unset"),
                           (["--threshold", "2"], "threshold=2.0: expected a probability between 0 and 1")):
        out = _main(capsys, "predict", str(run.path), str(pictures / "a.jpg"), "--out", str(tmp_path / "x"), *args)
        assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr
    out = _main(capsys, "evaluate", "p", "--runs-dir", tiny["output_dir"])      # --output-dir's other name
    assert out.returncode == 0, out.stderr
    assert "p last.pt on test" in out.stdout
    out = _main(capsys, "evaluate", *runs)                  # no run named: which one, and why
    dice = run.read_summary()["best_valid_dice"]
    assert f"labseg: no RUN given; evaluating p, the best valid Dice ({dice:.4f}) among the finished runs on " in out.stdout
    (run.path / "last.pt").rename(run.path / "kept.pt")     # a missing checkpoint: what to do next
    out = _main(capsys, "evaluate", "p", *runs)
    assert out.returncode == 2 and "last.pt does not exist; best.pt is there: use it with --checkpoint best" in out.stderr
    (run.path / "best.pt").rename(run.path / "kept-best.pt")
    out = _main(capsys, "evaluate", "p", *runs)
    assert out.returncode == 2 and "run p has no checkpoint: it stopped before its first epoch ended" in out.stderr
    (run.path / "kept.pt").rename(run.path / "last.pt")
    (run.path / "kept-best.pt").rename(run.path / "best.pt")
    # paths typed in a shell start where it is; the API's relative paths start at the project root
    monkeypatch.chdir(tmp_path)
    out = _main(capsys, "predict", "p", "pictures/a.png", "--out", "typed", *runs)
    assert out.returncode == 0 and (tmp_path / "typed" / "a_mask.png").is_file(), out.stderr
    from labseg.evaluate import predict_images

    with pytest.raises(FileNotFoundError, match=f"{PROJECT_ROOT / 'pictures' / 'a.png'} is neither an image"):
        predict_images(run, "pictures/a.png", tmp_path / "api", progress=False)


def test_cli_finds_runs_through_labseg_runs_dir_as_the_notebooks_do(tiny, small_net, tmp_path, capsys, monkeypatch):
    """$LABSEG_RUNS_DIR moves the runs of every command, not only the notebooks': a run trained
    there is evaluated, predicted with and reported by name, without --output-dir."""
    from labseg.runs import RunDir

    runs = tmp_path / "elsewhere"
    monkeypatch.setenv("LABSEG_RUNS_DIR", str(runs))
    monkeypatch.setenv("LABSEG_REPORT_DIR", str(tmp_path / "report"))
    options = ["--arch", small_net, "--data", tiny["data_dir"], "--img-size", "32", "--batch-size", "4",
               "--max-train-images", "8", "--epochs", "1", "--cache-dir", tiny["cache_dir"], "--quiet"]
    out = _main(capsys, "train", *options, "--run-name", "env-run")
    assert out.returncode == 0, out.stderr
    assert RunDir(runs / "env-run").read_summary()["epochs_run"] == 1
    assert not (Path(tiny["output_dir"]) / "env-run").exists()
    out = _main(capsys, "evaluate", "env-run")
    assert out.returncode == 0 and "env-run last.pt on test" in out.stdout, out.stderr
    out = _main(capsys, "evaluate")                         # no run named: the best of those there
    assert out.returncode == 0 and "labseg: no RUN given; evaluating env-run" in out.stdout, out.stderr
    image = sorted((Path(tiny["data_dir"]) / "images").glob("*.jpg"))[0]
    out = _main(capsys, "predict", "env-run", str(image), "--out", str(tmp_path / "pred"))
    assert out.returncode == 0 and f"(predicted by {runs / 'env-run' / 'last.pt'})" in out.stdout, out.stderr
    out = _main(capsys, "report")
    assert out.returncode == 0 and "env-run" in (tmp_path / "report" / "report.md").read_text(), out.stderr


def test_prepare_takes_a_typed_cache_dir_from_the_shell_as_train_does(synthetic_root, tmp_path, capsys,
                                                                     monkeypatch):
    """prepare once read --cache-dir from the project root and train from the shell's folder, so
    train decoded the whole dataset again into a second cache."""
    monkeypatch.chdir(tmp_path)
    out = _main(capsys, "prepare", "--data", str(synthetic_root), "--img-size", "32", "--cache-dir", "mycache")
    assert out.returncode == 0, out.stderr
    folders = sorted(p.name for p in (tmp_path / "mycache").iterdir())
    assert len(folders) == 2 and all(f"in {tmp_path / 'mycache' / name}" in out.stdout for name in folders)
    given = labseg.cli.given_options(labseg.cli.build_parser().parse_args(      # what `labseg train` hands fit
        ["train", "--data", str(synthetic_root), "--cache-dir", "mycache", "--img-size", "32"]))
    config = RunConfig.from_dict(given)
    trainval = load_split(config.data_dir, "trainval", 32, config.cache_dir, progress=False)
    assert Path(trainval.images.filename).parent.parent == tmp_path / "mycache"     # the same cache, not rebuilt
    assert sorted(p.name for p in (tmp_path / "mycache").iterdir()) == folders


def test_cli_other_commands_name_what_is_wrong(tmp_path, capsys):
    out = _main(capsys, "prepare", "--img-size", "50", "--cache-dir", str(tmp_path / "cache"))
    assert out.returncode == 2 and "img_size=50: must be divisible by 32 (ResNet34-UNet halves the size 5 times, UNet 4; one rule for both); try 32 or 64" in out.stderr
    out = _main(capsys, "report", "--output-dir", str(tmp_path / "typo"), "--report-dir", str(tmp_path / "rep"))
    assert out.returncode == 2 and f"no runs folder {tmp_path / 'typo'}" in out.stderr
    # a negative budget reaches the check that says what a duration is (argparse took it for an option)
    out = _main(capsys, "train", "--time-budget", "-5m", "--output-dir", str(tmp_path / "runs"))
    assert out.returncode == 2 and "time_budget='-5m': expected a duration such as '25m'" in out.stderr
    assert not (tmp_path / "rep").exists()
    out = _main(capsys, "demo", "--epochs", "0")
    assert out.returncode == 2 and "epochs=0: expected a positive integer" in out.stderr
    out = _main(capsys, "train", "--resume")
    assert out.returncode == 2 and "--resume needs --run-name RUN" in out.stderr


@pytest.mark.parametrize("args,expected", [
    (["--arch", "vgg"], "arch='vgg' is not valid; choose one of: unet, resnet34_unet"),
    (["--lr", "0"], "lr=0"),
    (["--img-size", "100"], "img_size=100: must be divisible by 32"),
    (["--optimizer", "lbfgs"], "choose one of: adam, adamw, sgd"),
    (["--data", "/nonexistent/pets"], "Expected the official Oxford-IIIT Pet layout"),
])
def test_cli_bad_values_fail_before_work_without_traceback(args, expected, tmp_path):
    out = _labseg("train", "--output-dir", str(tmp_path / "runs"), *args)
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_help(capsys):
    from labseg.cli import build_parser

    out = _labseg("--help")          # once through the installed entry point
    assert out.returncode == 0 and "usage: labseg [-h] COMMAND" in out.stdout and "``" not in out.stdout
    for cmd in ("download", "prepare", "train", "evaluate", "predict", "demo", "sweep", "report", "bench"):
        with pytest.raises(SystemExit) as exited:      # the rest in this process: each help is its parser's
            build_parser().parse_args([cmd, "--help"])
        assert exited.value.code == 0 and "usage: labseg " + cmd in capsys.readouterr().out


def test_every_runs_folder_option_is_also_runs_dir():
    """--runs-dir names the same option as --output-dir on every command that has it (train's
    comes from RunConfig), so it reads apart from predict's --out, where masks go."""
    from labseg.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    having = {}
    for name, parser in commands.items():
        for action in parser._actions:
            if "--output-dir" in action.option_strings:
                having[name] = action
    assert {"train", "evaluate", "predict", "sweep", "report"} <= set(having)
    positional = {"predict": ["RUN", "IMAGES"]}       # the others' are optional
    for name, action in having.items():
        assert "--runs-dir" in action.option_strings and action.dest == "output_dir", name
        args = build_parser().parse_args([name, *positional.get(name, []), "--runs-dir", "elsewhere"])
        assert args.output_dir == "elsewhere", name


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(False, False, False), (True, False, True), (False, True, True)])
def test_cpu_bf16_is_on_only_with_the_cpus_own_bf16_instructions(monkeypatch, avx512_bf16, amx, expected):
    """oneDNN says it can run bf16 on any AVX512 CPU, where it is emulated and slower than fp32:
    the default turns autocast on only with AVX512-BF16 or AMX, whatever oneDNN says."""
    import labseg.train

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert labseg.train.native_bf16(torch.device("cpu")) is expected
    assert (labseg.train._amp_dtype(RunConfig(), torch.device("cpu")) is torch.bfloat16) is expected


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_a_gpu_without_native_bf16_trains_in_fp16(monkeypatch, native, expected):
    """torch counts emulated bf16 by default (a T4, a V100): there fp16 with a GradScaler is the
    faster autocast, so only native bf16 counts."""
    import labseg.train

    def is_bf16_supported(including_emulation=True):
        return native or including_emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert labseg.train._amp_dtype(RunConfig(), torch.device("cuda")) is expected


@pytest.mark.parametrize("flags,expected", [("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True),
                                            ("fpu amx_tile amx_bf16", True)])
def test_without_torchs_cpu_probes_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path, flags, expected):
    import labseg.machine

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    read = labseg.machine._cpu_flags
    assert read(cpuinfo) == set(flags.split()) and read(tmp_path / "missing") == set()
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)     # a torch without the probe
    monkeypatch.setattr(labseg.machine, "_cpu_flags", lambda: read(cpuinfo))    # "this CPU": the file above
    assert labseg.machine.native_bf16(torch.device("cpu")) is expected


def test_download_fails_fast_offline(tmp_path, monkeypatch):
    from torchvision.datasets import OxfordIIITPet

    from labseg.download import DownloadError, download

    # port 9 on loopback is closed: the same path as a machine without internet, at once
    monkeypatch.setattr(OxfordIIITPet, "_RESOURCES", (("https://127.0.0.1:9/images.tar.gz", "0"),))
    with pytest.raises(DownloadError, match=r"cannot reach 127.0.0.1[\s\S]*by hand[\s\S]*images.tar.gz"):
        download(tmp_path)
    assert not (tmp_path / "oxford-iiit-pet" / "images").exists()
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    with pytest.raises(DownloadError, match="notes.txt is a file; expected the folder to download the dataset into"):
        download(tmp_path / "notes.txt")


def test_download_finds_a_dataset_already_in_its_folder(synthetic_root, tmp_path, monkeypatch):
    from torchvision.datasets import OxfordIIITPet

    from labseg.download import download

    monkeypatch.setattr(OxfordIIITPet, "_RESOURCES", (("https://127.0.0.1:9/images.tar.gz", "0"),))  # no network
    assert download(synthetic_root) == Path(synthetic_root).resolve()


def test_a_failed_point_says_it_failed_rather_than_missing(tmp_path):
    folder = tmp_path / "point"
    folder.mkdir()
    (folder / "failed.json").write_text(json.dumps({"error": "ConfigError: arch='nope' is not valid"}))
    with pytest.raises(FileNotFoundError, match=r"point failed before it trained.*arch='nope' is not valid"):
        RunDir.open("point", tmp_path)


def test_distributed_two_processes_on_cpu(synthetic_root, tmp_path):
    """Two ranks under a time budget: they stop together (each rank's own clock once let one
    start an epoch the other never joined, a crash under gloo and a hang under NCCL)."""
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
         "-m", "labseg.train", "--data", str(synthetic_root), "--img-size", "32", "--time-budget", "8s",
         "--batch-size", "4", "--max-train-images", "8", "--run-name", "ddp", "--output-dir",
         str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet", "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["ddp"], f"only rank 0 writes one run folder, got {runs}"
    epochs = [r["epoch"] for r in json.loads((tmp_path / "runs" / "ddp" / "metrics.json").read_text())]
    assert epochs and epochs == list(range(1, len(epochs) + 1))          # (about 5-8 epochs here)
    assert RunDir(tmp_path / "runs" / "ddp").read_summary()["stop_reason"].startswith("time budget of 8s spent")
    model, config = load_run_model(tmp_path / "runs" / "ddp", "best", device="cpu")   # in this one process
    assert config.deep_supervision and any(k.startswith("aux_heads.") for k in model.state_dict())


def _clock_agreement(rank: int, port: int, results) -> None:
    """One of two gloo ranks whose clocks read apart (rank 1 has spent 100 s more)."""
    import torch.distributed as td

    from labseg.train import _Clock, _Distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=2)
    try:
        dist = _Distributed(rank, 2, torch.device("cpu"))
        clock = _Clock(total_steps=1000, budget=50.0, elapsed_before=100.0 * rank, agree_max=dist.agree_max)
        clock.tick()
        results[rank] = (clock.seen, clock.out_of_time(), clock.progress(), dist.from_main({"rank": rank}))
    finally:
        td.destroy_process_group()


def test_torchrun_ranks_read_one_clock_and_rank_0s_scores():
    """Under torchrun each rank's own clock let one rank stop (or start a step) where another did
    not, and their lrs drift apart: every decision reads the ranks' largest time, and the valid
    scores that decide early stopping are rank 0's."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_clock_agreement, args=(29531, results), nprocs=2, join=True)
    (seen0, stop0, progress0, main0), (seen1, stop1, progress1, main1) = results[0], results[1]
    assert seen0 == seen1 >= 100.0 and stop0 and stop1 and progress0 == progress1
    assert main0 == main1 == {"rank": 0}


@pytest.mark.realdata
def test_real_data_short_train_and_evaluate(real_root, tmp_path):

    result = fit(arch="resnet34_unet", data_dir=str(real_root), img_size=64, epochs=1, batch_size=8,
                 max_train_images=32, output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"),
                 progress=False)
    ev = evaluate_run(result.run, "test", progress=False)
    assert ev["images"] == 199
    assert set(ev["per_breed"]) == {"Abyssinian", "Bengal", "american_bulldog"}
    assert set(ev["per_species"]) == {"cat", "dog"}
    assert 0.0 <= ev["dice"] <= 1.0


def test_training_and_evaluation_go_on_past_broken_files(synthetic_root, small_net, tmp_path, capfd):
    """A copy of the sample with a truncated JPEG and a text file named .jpg in trainval and test."""
    import shutil


    root = tmp_path / "broken"
    shutil.copytree(synthetic_root, root)
    trainval = [l.split()[0] for l in (root / "annotations" / "trainval.txt").read_text().splitlines() if l.strip()]
    test = [l.split()[0] for l in (root / "annotations" / "test.txt").read_text().splitlines() if l.strip()]
    jpeg = (root / "images" / f"{trainval[0]}.jpg").read_bytes()
    (root / "images" / f"{trainval[0]}.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "images" / f"{test[0]}.jpg").write_text("not an image")
    result = fit(arch=small_net, data_dir=str(root), img_size=32, epochs=1, batch_size=4, max_train_images=8,
                 output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), progress=True)
    assert result.summary["skipped_pairs"] == 1
    assert trainval[0] in result.summary["skipped"][0][0]
    ev = evaluate_run(result.run, "test", progress=False)
    assert ev["skipped_pairs"] == 1 and ev["images"] == len(test) - 1
    assert list(variants_table(ev).index) == ["threshold 0.5"]      # no TTA asked, none shown
    assert "flip TTA" not in format_result(ev)
    err = capfd.readouterr().err
    assert f"skipped {root / 'images' / trainval[0]}.jpg" in err and f"{test[0]}.jpg" in err


def test_a_dataset_with_no_validation_image_is_refused_before_training(synthetic_root, tiny, tmp_path):
    """One image per breed (a student's quickest subset) leaves valid empty: said before an epoch."""
    import shutil

    one = tmp_path / "one"
    shutil.copytree(synthetic_root, one)
    lines, breeds = [], set()
    for line in (one / "annotations" / "trainval.txt").read_text().splitlines():
        breed = line.split()[0].rsplit("_", 1)[0]
        if breed not in breeds:
            breeds.add(breed)
            lines.append(line)
    (one / "annotations" / "trainval.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=f"no validation image: {len(lines)} trainval image\\(s\\) of {len(breeds)} "
                                          "breed\\(s\\)"):
        fit(arch="unet", run_name="one", **{**tiny, "data_dir": str(one), "max_train_images": None})
    assert not (tmp_path / "runs" / "one").exists()
    # valid_fraction 0.6 rounds each breed's single image to valid: nothing to train on, which
    # trained nothing and was recorded as a finished run before
    with pytest.raises(ConfigError, match=f"no training image: valid_fraction=0.6 puts all {len(lines)} "):
        fit(arch="unet", run_name="one", **{**tiny, "data_dir": str(one), "max_train_images": None,
                                           "valid_fraction": 0.6})
    assert not (tmp_path / "runs" / "one").exists()


def test_progress_bars_alone_print_no_epoch_lines_and_a_bad_progress_value_is_named(tiny, small_net, capsys):
    fit(arch=small_net, **{**tiny, "epochs": 1, "progress": True})
    said = capsys.readouterr()
    assert "epoch   1  train_loss" in said.out and "epoch 1/1" in said.err     # a line, and the bar (stderr)
    fit(arch=small_net, **{**tiny, "epochs": 1, "progress": "bars", "run_name": "bars-only"})
    said = capsys.readouterr()
    assert "train_loss" not in said.out and "epoch 1/1" in said.err and "validation" in said.err
    with pytest.raises(ConfigError, match=r"progress='yes': expected True .* False .* or \"bars\""):
        fit(arch=small_net, **{**tiny, "progress": "yes"})


def test_a_run_records_a_dataset_outside_the_project_absolute_and_names_it_when_it_moved(tiny, small_net, tmp_path):
    """A path relative to the project root that leaves it (README's ``../shared/...``) would point
    elsewhere from a clone at another depth: it is recorded absolute, one inside stays relative."""
    import shutil

    from labseg.config import recorded_path

    assert recorded_path(PROJECT_ROOT / "data" / "sample") == os.path.join("data", "sample")
    assert recorded_path("data/sample") == os.path.join("data", "sample")
    mine = tmp_path / "pets"
    shutil.copytree(tiny["data_dir"], mine)        # the session's dataset stays where it is
    relative = os.path.relpath(mine, PROJECT_ROOT)
    assert relative.startswith("..")
    run = fit(arch=small_net, run_name="rel", **{**tiny, "epochs": 1, "data_dir": relative}).run
    assert run.read_config().data_dir == str(mine.resolve())
    moved = tmp_path / "moved"
    shutil.move(mine, moved)
    with pytest.raises(labseg.data.DatasetLayoutError, match=r"run rel was trained on .*, and .* does not exist here "
                                                             r"\(the dataset moved, .*give its folder: labseg evaluate "
                                                             r"rel --data DIR"):
        evaluate_run(run, progress=False, save=False)
    with pytest.raises(labseg.data.DatasetLayoutError, match="give its folder: labseg train --run-name rel --resume "
                                                             "--data DIR"):
        fit(arch=small_net, run_name="rel", resume=True, **{**tiny, "epochs": 2, "data_dir": str(mine)})
    assert evaluate_run(run, data_dir=str(moved), progress=False, save=False)["dice"] >= 0.0


def test_a_dataset_linked_into_the_project_is_recorded_as_the_link_and_a_missing_sample_says_how_to_write_it(
        tmp_path, monkeypatch):
    import labseg.synthetic
    from labseg.config import recorded_path
    from labseg.data import check_recorded_dataset

    link = PROJECT_ROOT / "outputs" / f"test-link-{os.getpid()}"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(tmp_path)
    try:    # docs/benchmarks.md links the 3-breed data to data/pets3: runs name it so, wherever it lies
        assert recorded_path(f"outputs/{link.name}") == os.path.join("outputs", link.name)
        assert recorded_path(link) == os.path.join("outputs", link.name)
    finally:
        link.unlink()
    monkeypatch.setattr(labseg.synthetic, "default_sample_dir", lambda: tmp_path / "sample")
    with pytest.raises(labseg.data.DatasetLayoutError, match=r"run r was trained on the synthetic sample, and .* does "
                                                             r"not exist here: write it again with `labseg prepare "
                                                             r"--synthetic`"):
        check_recorded_dataset(tmp_path / "sample", "r", "--data DIR")


def test_a_run_whose_steps_take_one_image_is_refused_where_batchnorm_cannot_train_on_it(tiny):
    """resnet34_unet's deepest map is 1×1 at 32 px, and BatchNorm in training mode refuses one
    value per channel: batch_size 1 at 32 px, or one training image, or a 32 px low-resolution
    phase of a larger img_size, once died at the first step (after the run folder was made)."""
    from labseg.train import check_batches_of_one

    runs = Path(tiny["output_dir"])
    for options, size in (({"batch_size": 1}, "img_size"), ({"max_train_images": 1}, "img_size"),
                          ({"img_size": 64, "batch_size": 1, "low_res_scale": 0.5, "low_res_until": 0.5},
                           "low_res_scale or crop_size")):
        with pytest.raises(ConfigError, match=r"'resnet34_unet' cannot train on one image at a time at 32px: .*"
                                              rf"Give batch_size 2 or more .* \({size}\)"):
            fit(arch="resnet34_unet", run_name="one", **{**tiny, **options})
        assert not runs.exists()
    # a 2×2 map (64 px) trains on one image; so does unet at 32 px (its deepest map is 2×2)
    check_batches_of_one(build_model("resnet34_unet"), RunConfig(arch="resnet34_unet", img_size=64), torch.device("cpu"))
    check_batches_of_one(build_model("unet", base=8), RunConfig(arch="unet", img_size=32), torch.device("cpu"))


def test_swa_measures_batchnorm_on_whole_batches(tiny):
    """SWA's BatchNorm pass took a last batch of the remainder: 9 training images at batch 4 gave
    one of a single image, which at 32 px killed the run after all its epochs had trained."""
    result = fit(arch="resnet34_unet", swa=0.5, run_name="swa9", **{**tiny, "max_train_images": 9})
    assert result.summary["swa_epochs"] == 2 and result.summary["train_images"] == 9


def test_a_batch_that_the_processes_cannot_share_evenly_is_refused(tiny, small_net, monkeypatch):
    """Under torchrun each process takes batch_size / world images: batch 1 on 2 processes was a
    ZeroDivisionError, batch 3 silently trained batches of 2 (here: 3 processes)."""
    run = fit(arch=small_net, run_name="done", **{**tiny, "epochs": 1}).run
    evaluate_run(run, "test", progress=False)
    before = {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()}
    monkeypatch.setattr(labseg.train._Distributed, "from_env", classmethod(lambda cls: cls(rank=0, world=3)))
    for batch in (1, 4):
        with pytest.raises(ConfigError, match=f"batch_size={batch} with 3 processes: expected a multiple of 3"):
            fit(arch=small_net, run_name="ddp", **{**tiny, "batch_size": batch})
    assert not (Path(tiny["output_dir"]) / "ddp").exists()
    # a resume refused so leaves the run's records as they were (its evaluations were once set aside
    # and its config rewritten first: the report lost its test figures)
    with pytest.raises(ConfigError, match="batch_size=4 with 3 processes"):
        fit(arch=small_net, run_name="done", resume=True, **{**tiny, "epochs": 2})
    assert {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()} == before


def test_a_low_res_scale_that_rounds_away_is_said(tiny, capsys):
    """Sizes are multiples of 32: low_res_scale 0.5 of 32 px rounds back to 32 px, so there is no
    low-resolution phase. Given by the user, that is said rather than recorded as if it trained so."""
    fit(arch="resnet34_unet", run_name="lowres", low_res_scale=0.5, low_res_until=0.5, **{**tiny, "epochs": 1})
    out = capsys.readouterr().out
    assert "low_res_scale 0.5 of 32px rounds to 32px (sizes are multiples of 32): no low-resolution phase" in out
    fit(arch="resnet34_unet", run_name="recipe", **{**tiny, "epochs": 1})    # the recipe's 0.75: nothing said
    assert "no low-resolution phase" not in capsys.readouterr().out


def test_fits_config_and_callback_are_checked_before_anything(tiny):
    """fit("cfg.yaml") was an AttributeError deep in the resume code; fit(callback=3) failed after a
    whole epoch had trained."""
    with pytest.raises(ConfigError, match=r"config='cfg.yaml': expected a RunConfig, a dict of its fields or None"):
        fit("cfg.yaml", **tiny)
    with pytest.raises(ConfigError, match=r"callback=3: expected a function of the history, or None"):
        fit(arch="unet", callback=3, **tiny)
    assert not Path(tiny["output_dir"]).exists()
