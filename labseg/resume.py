"""Continuing a stopped run: which fields a resume may change, the checks before it trains again,
and what it finds in the run folder (the checkpoint to start from, a summary left unwritten, the
writes a kill cut short). :func:`labseg.train.fit` calls these; ``_restore`` there puts the
checkpoint's training state back into the network and optimizer it builds.

    fit(run_name=..., resume=True) → open_resumed (config.json + what was asked, last.pt, or an
    older labseg's newer best.pt; refused if nothing is left to train) → check_same_images →
    update_resumed_folder (best.pt from last.pt if a kill fell between them) → (at its first new
    checkpoint) set_aside_evaluations
"""
from __future__ import annotations

import hashlib
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from labseg.config import PATH_FIELDS, UNTIL_BUDGET, ConfigError, RunConfig, resolve_path
from labseg.data import check_layout, check_recorded_dataset
from labseg.runs import CheckpointError, RunDir, load_checkpoint, save_checkpoint, weights_only

if TYPE_CHECKING:
    from labseg.train import _Distributed

# Fields a resumed run may change; anything else must match the recorded config.
RESUMABLE = {"epochs", "time_budget", "device", "num_threads", "log_every", "patience", "compile",
             "checkpoint_every",
             # where things are, which may change when a run moves (another machine, a copied folder)
             "output_dir", "cache_dir", "data_dir"}


def asked_fields(config: RunConfig | None, overrides: dict) -> dict:
    """The fields a caller of ``fit`` asked for: the keyword overrides, and those of a config
    object that differ from RunConfig's defaults (a default was not asked for)."""
    if config is None:
        return dict(overrides)
    defaults = RunConfig().to_dict()
    return {**{k: v for k, v in config.to_dict().items() if v != defaults[k]}, **overrides}


def _merge_resumed(recorded: RunConfig, asked: dict) -> RunConfig:
    """The recorded config, with the few fields a resume may change taken from ``asked`` (the
    fields given again; any other field given must agree with the record)."""
    rec = recorded.to_dict()
    changed = {k: (rec[k], v) for k, v in asked.items()
               if k not in RESUMABLE and k != "run_name" and v is not None and not _same_value(k, v, rec[k])}
    if changed:
        diff = ", ".join(f"{k}: recorded {a!r}, asked {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"resume must keep the run's config; differs in {diff}")
    return RunConfig.from_dict({**rec, **{k: v for k, v in asked.items()
                                          if k in RESUMABLE and v is not None and not _same_value(k, v, rec[k])}})


def _same_value(name: str, asked, recorded) -> bool:
    """Whether a value given on resume agrees with the record: a folder agrees however it is
    spelt (relative to the project root or absolute, str or Path)."""
    if name in PATH_FIELDS and asked is not None and recorded is not None:
        return resolve_path(asked) == resolve_path(recorded)
    return asked == recorded


def open_resumed(config: RunConfig, asked: dict, which: str, dist: "_Distributed",
                  held: ExitStack) -> tuple[RunDir, RunConfig, dict, Path, bool]:
    """The run to resume, its config (the record, with what a resume may change taken from
    ``asked``), the checkpoint to continue from and its file, and whether only its summary is left
    to write; refuses what cannot be resumed."""
    if not config.run_name:
        raise ConfigError("resume needs run_name: the run to continue")
    run = RunDir.open(config.run_name, config.output_dir)
    if dist.is_main:
        held.enter_context(run.lock_for_training())     # one process at a time trains a run
    # compared with what was asked, not with today's recipe: a recipe that has changed since
    # the run started is no reason to refuse (or alter) the resume
    recorded = run.read_config()
    # a folder renamed since (``mv``) resumes under its new name, and its records say so
    config = replace(_merge_resumed(recorded, asked), run_name=run.path.name).validate()
    if which == "last" and not run.checkpoint("last").exists() and run.checkpoint("best").exists():
        if not _holds_training_state(run.checkpoint("best")):     # last.pt deleted by hand
            raise CheckpointError(f"run {run.path.name} has no last.pt, and its best.pt keeps the best epoch's "
                                  "weights only: it can be evaluated (--checkpoint best), not resumed; start over "
                                  "with --overwrite (deletes the run)")
        # killed between the first best.pt and the first last.pt, as older labseg wrote them (best.pt first)
        if dist.is_main:
            print(f"labseg: run {run.path.name} has no last.pt yet; resuming from best.pt")
        which = "best"
    try:
        resumed = load_checkpoint(run.checkpoint(which))
    except CheckpointError as e:
        other = "best" if which == "last" else "last"
        if not any(run.checkpoint(w).exists() for w in ("best", "last")):
            unfinished = sorted(run.path.glob(".*.tmp"))
            for path in unfinished:         # checkpoint-sized: not left to pile up
                path.unlink(missing_ok=True)
            why = ("its first checkpoint was being written when the process was killed; the unfinished file "
                   "is removed" if unfinished else "it stopped before its first epoch ended")
            raise CheckpointError(f"run {run.path.name} has no complete checkpoint ({why}): start it over with "
                                  "--overwrite") from None
        instead = (f"Resume from the {other} checkpoint with --resume {other}, or start over"
                   if _holds_training_state(run.checkpoint(other)) else "Start over")
        raise CheckpointError(f"{e}.\n{instead} with --overwrite (deletes the run).") from None
    if lacking := [k for k in ("epoch", "history", "optimizer") if k not in resumed]:
        kept = (" (best.pt keeps the best epoch's weights only; a resume goes on from last.pt)"
                if which == "best" and lacking == ["optimizer"] else "")
        raise CheckpointError(f"checkpoint {run.checkpoint(which)} holds weights but no training state "
                              f"({', '.join(lacking)} missing): it can be evaluated, not resumed{kept}")
    kinds = {"epoch": int, "history": list, "optimizer": dict}
    wrong = [f"{k} is a {type(resumed[k]).__name__}" for k, kind in kinds.items()
             if not isinstance(resumed[k], kind) or isinstance(resumed[k], bool)]
    if not wrong and not all(isinstance(row, dict) and isinstance(row.get("epoch"), int) for row in resumed["history"]):
        wrong = ["a history row is not an epoch's record"]
    trainval = resumed.get("trainval")
    if trainval is not None and not (isinstance(trainval, dict) and isinstance(trainval.get("names_sha1"), str)
                                     and isinstance(trainval.get("images"), int)):
        wrong.append(f"trainval is {trainval!r:.40}, not a record of the images")
    if wrong:
        raise CheckpointError(f"checkpoint {run.checkpoint(which)} holds a damaged training state ("
                              f"{', '.join(wrong)}): it cannot be resumed (labseg writes an int epoch, a history "
                              "of one record per epoch, a dict optimizer state and a record of the images)")
    if which == "last" and (newer := _newer_best(run, resumed)) is not resumed:
        resumed, which = newer, "best"
    summary_only = _check_not_finished(run, resumed, config)
    if summary_only and dist.is_main:
        print(f"labseg: run {run.path.name} has trained all it was asked to (epoch {resumed['epoch']} in "
              f"{run.checkpoint(which).name}) but its session stopped before writing summary.json; "
              "writing it now, without training")
    if _same_value("data_dir", config.data_dir, recorded.data_dir):
        check_recorded_dataset(config.data_dir, run.name, f"labseg train --run-name {run.name} --resume --data DIR")
    else:
        check_layout(config.data_dir)      # announced once the resume can go on, and the folder is a dataset
        if dist.is_main:
            print(f"labseg: the dataset is now read from {config.data_dir} (the run started on "
                  f"{recorded.data_dir}); its valid split is the same for the same images")
    return run, config, resumed, run.checkpoint(which), summary_only


def _check_not_finished(run: RunDir, start: dict, config: RunConfig) -> bool:
    """Refuse to resume a run that has nothing left to train, saying how to train it further.
    True for a run that has trained all it was asked to but has no summary of it (killed, or a full
    disk, after its last checkpoint): the resume trains nothing and writes the summary."""
    done, budget = start["epoch"], config.time_budget_s
    recorded, summary = _stopped_under(run, start), run.read_summary()
    # why the run stopped, if its summary is of the checkpoint resumed from (not of an older session)
    summarised = summary.get("epochs_run") == done
    stopped = (summary.get("stop_reason") or "") if summarised else ""

    def reached(c: RunConfig) -> bool:      # the epochs or the time budget of c, all trained
        return ((c.epochs < UNTIL_BUDGET and done >= c.epochs)
                or bool(c.time_budget_s and start.get("elapsed", 0.0) >= c.time_budget_s))

    # what the run was started for and what is asked now both trained: only the summary is missing
    # (fewer epochs than it was started for, on a run stopped short of them, is refused below)
    if not summarised and reached(recorded) and reached(config):
        return True
    trained_all = config.epochs < UNTIL_BUDGET and done >= config.epochs
    if trained_all:
        raise ConfigError(f"run {run.path.name} has already trained all its {config.epochs} epochs; to train "
                          f"it further, resume with more (--epochs N with N > {done}), or evaluate it")
    if budget and (start.get("elapsed", 0.0) >= budget or (stopped.startswith("time budget")
                                                           and budget <= (recorded.time_budget_s or 0))):
        raise ConfigError(f"run {run.path.name} has already spent its time budget of {config.time_budget}; "
                          "to train it further, resume with a larger --time-budget, or evaluate it")
    if stopped.startswith("early stopping") and config.patience and config.patience <= recorded.patience:
        raise ConfigError(f"run {run.path.name} stopped early ({stopped}); to train it further, resume with a "
                          f"larger --patience (now {config.patience}) or --patience 0, or evaluate it")
    return False


def _stopped_under(run: RunDir, start: dict) -> RunConfig:
    """The config with the patience and time budget that the session which saved ``start`` trained
    under (its checkpoint's): config.json already holds what a later resume asked for when that
    resume was killed before its first checkpoint, and would refuse the same request again."""
    recorded = run.read_config()
    saved = start.get("config") if isinstance(start.get("config"), dict) else {}
    try:
        then = replace(recorded, **{k: saved[k] for k in ("patience", "time_budget") if k in saved})
        then.time_budget_s          # a budget that does not parse: config.json's, as before
        return then
    except (TypeError, ValueError):
        return recorded


def _best_from_last(run: RunDir, last: dict) -> None:
    """best.pt from ``last`` (which holds the best epoch), unless best.pt already holds that write:
    best.pt is written after last.pt, and a kill between the two left it an older epoch or none.
    The best value counts too: SWA's averaged weights, kept after the last epoch, share its epoch
    and step, and a last epoch that was best left best.pt at that step with other weights."""
    path = run.checkpoint("best")
    try:
        best = load_checkpoint(path) if path.is_file() else {}
    except CheckpointError:
        best = {}
    if (best.get("epoch"), best.get("step"), best.get("best")) != (last["epoch"], last.get("step"), last.get("best")):
        save_checkpoint(path, weights_only(last))
        print(f"labseg: best.pt written from last.pt, which holds the best epoch ({last['epoch']}): the run "
              "was stopped between the two writes")


def _holds_training_state(path: Path) -> bool:
    """Whether the checkpoint at ``path`` can be resumed from (best.pt cannot, unless an older
    labseg wrote it)."""
    try:
        return path.is_file() and "optimizer" in load_checkpoint(path)
    except CheckpointError:
        return False


def _newer_best(run: RunDir, last: dict) -> dict:
    """best.pt instead of ``last`` when it holds a later epoch: a kill fell between the two
    writes of a run folder from an older labseg, which wrote best.pt first, as a whole training
    state. (best.pt is now written after last.pt, with the weights only: :func:`_best_from_last`.)"""
    best_path, last_path = run.checkpoint("best"), run.checkpoint("last")
    if not best_path.is_file() or best_path.stat().st_mtime_ns <= last_path.stat().st_mtime_ns:
        return last
    try:
        best = load_checkpoint(best_path)
    except CheckpointError:
        return last
    if best.get("epoch", 0) > last["epoch"] and "optimizer" in best:
        print(f"labseg: best.pt holds epoch {best['epoch']}, later than last.pt's {last['epoch']} (the run was "
              "stopped between the two writes); resuming from best.pt")
        return best
    return last


def update_resumed_folder(run: RunDir, config: RunConfig, resumed: dict | None = None,
                          resumed_from: Path | None = None) -> None:
    """Once a resume is sure to go on: config.json says what the run now trains to (e.g. more
    epochs, or its moved dataset), best.pt is written from last.pt where a kill fell between the
    two writes, and the writes a kill of the stopped session cut short go."""
    if config.to_dict() != run.read_config().to_dict():
        run.write_config(config)
    if resumed is not None and resumed.get("holds_best") and resumed_from == run.checkpoint("last"):
        _best_from_last(run, resumed)
    stale = sorted(run.path.glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        print(f"labseg: removed {len(stale)} unfinished write(s) left by the stopped session")


def set_aside_evaluations(run: RunDir, epoch: int) -> None:
    """Before a resumed run's first new checkpoint replaces the weights of ``epoch``: move their
    evaluations aside (a report would pair them with the new weights). Not earlier: a resume
    stopped before it wrote a checkpoint leaves the weights, and so their scores, as they were."""
    moved = []
    for path in sorted(run.path.glob("eval_*.json")):
        path.replace(path.with_name(f"{path.name}.epoch-{epoch}"))
        moved.append(f"{path.name} → {path.name}.epoch-{epoch}")
    if moved:
        print(f"labseg: the evaluations of the weights at epoch {epoch} are kept aside ({', '.join(moved)}); "
              "evaluate the run again once it has trained")


def images_digest(trainval) -> dict:
    """Which images a run trains and validates on, in a few bytes: their count and a hash of their names."""
    names = "\n".join(sorted(r.name for r in trainval.records))
    return {"images": len(trainval.records), "names_sha1": hashlib.sha1(names.encode()).hexdigest()}


def check_same_images(resumed: dict, trainval, config: RunConfig, run: RunDir) -> None:
    """A resume goes on with the images the run started on: a moved dataset is fine, another one
    is not (its valid Dice would be compared with the old epochs' to pick best.pt and stop early)."""
    recorded = resumed.get("trainval")
    if recorded is None:                # a checkpoint from before this record: not checked
        return
    now = images_digest(trainval)
    if now["names_sha1"] != recorded["names_sha1"]:
        raise ConfigError(f"run {run.name} trained on {recorded['images']} trainval images, and {config.data_dir} "
                          f"holds {now['images']} with other names: a resume goes on with the same images (a moved "
                          "dataset is fine); train a new run on this data instead")
