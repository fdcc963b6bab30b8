"""The comparison report: every run folder -> one table, curves and figures in ``outputs/report/``.

Everything here is read from the run records (``config.json``, ``summary.json``,
``metrics.json``, ``eval_test.json``, ``failed.json``); nothing is typed by hand::

    collect_runs(output_dir)      one row per run: parameters × metrics × status
    best_per_arch(table)          the best finished run of each network
    plot_curves(output_dir)       validation curves of the runs on one dataset, the best per network bold
    plot_best(table)              best validation/test Dice per network
    write_report(output_dir, report_dir)  report.md + PNGs, each written atomically
"""
from __future__ import annotations

import html
import io
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FormatStrFormatter, MaxNLocator, NullFormatter

from labseg.config import UNTIL_BUDGET, _is_number, resolve_path
from labseg.machine import run_machine_label
from labseg.runs import (RunDir, RunRecordError, atomic_write_bytes, atomic_write_text, dataset_key,
                         default_checkpoint, eval_file, read_record, trained_at)

PARAMS = ("arch", "img_size", "epochs", "time_budget", "batch_size", "lr", "optimizer", "scheduler", "loss",
          "augment", "seed", "max_train_images", "data_dir")
METRICS = ("best_valid_dice", "best_valid_iou", "best_epoch", "epochs_run", "train_seconds", "parameters")
TABLE_COLUMNS = ("run", "status", "dataset", *PARAMS, *METRICS, "checkpoint", "test_dice", "test_iou", "test_dice_tta",
                 "test_dice_best", "test_dice_last", "machine", "trained_at", "data_path", "data_key", "error")
MAX_LABELLED_RUNS = 12      # plot_curves names every run in its legend up to this many
LABELLED_PER_NETWORK = 3    # ... and beyond, the best this many of each network (a class's 40 runs)
ARCH_COLORS = {"unet": "tab:blue", "resnet34_unet": "tab:orange", "smp_unet_resnet34": "tab:green"}
OTHER_RUN_DASHES = ("--", ":", "-.")    # a network's runs other than its best, in its colour


def _read_json(path: Path, default=None):
    """A run's JSON record, ``default`` when the file is missing; RunRecordError when damaged."""
    return read_record(path, dict) if path.is_file() else default


def _read_quietly(path: Path):
    """A record for a table that the main table already flags as damaged when it is: None then."""
    try:
        return _read_json(path)
    except RunRecordError:
        return None


def _summary_quietly(folder: Path) -> dict:
    """A run's summary for a table that the main table already flags as damaged when it is: {} then."""
    try:
        return RunDir(folder).read_summary()
    except RunRecordError:
        return {}


def _by_checkpoint(recorded: dict) -> dict:
    """{"best": evaluation, "last": evaluation} from the files read as ``recorded`` (by the
    checkpoint their name says). Before eval_test_last.json existed, every evaluation went to
    eval_test.json, last.pt's included, and said so in its "checkpoint" field: it is last.pt's
    then, unless last.pt has a file of its own."""
    own = {which: ev if (ev or {}).get("checkpoint", which) == which else {} for which, ev in recorded.items()}
    for ev in recorded.values():
        owner = (ev or {}).get("checkpoint")
        if owner in own and not own[owner]:
            own[owner] = ev
    return {which: ev or {} for which, ev in own.items()}


def _is_epoch(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checkpoint_epochs(folder: Path, summary: dict) -> dict:
    """The epoch each checkpoint holds now, by the records: last.pt the run's last epoch, best.pt
    the summary's best_epoch (the last one where the averaged weights validated best); None where
    they do not say (no summary yet: best.pt moves as the run trains)."""
    try:
        history = RunDir(folder).read_metrics()
    except RunRecordError:              # named in the table where it is read
        history = []
    last = history[-1].get("epoch") if history and isinstance(history[-1], dict) else summary.get("epochs_run")
    best = last if summary.get("best_is_swa") else summary.get("best_epoch")
    return {"best": best if _is_epoch(best) else None, "last": last if _is_epoch(last) else None}


def _current(evaluations: dict, folder: Path, summary: dict) -> tuple[dict, list[str]]:
    """``evaluations`` (:func:`_by_checkpoint`) less those of an epoch their checkpoint no longer
    holds (``labseg evaluate`` while the run trained), and a note for each. An evaluation from
    before labseg recorded its epoch is kept."""
    epochs, kept, notes = _checkpoint_epochs(folder, summary), {}, []
    for which, ev in evaluations.items():
        then, now = ev.get("epoch"), epochs.get(which)
        if _is_epoch(then) and now is not None and then != now:
            notes.append(f"its test scores of {which}.pt are of epoch {then} (evaluated while it trained, or before "
                         f"it trained further) and {which}.pt now holds epoch {now}: evaluate it again (labseg "
                         f"evaluate {folder.name} --checkpoint {which})")
            ev = {}
        kept[which] = ev
    return kept, notes


def run_folders(output_dir: str | Path = "outputs/runs") -> list[Path]:
    """Folders under ``output_dir`` that hold a run record (config.json or failed.json), by name."""
    root = resolve_path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and ((p / "config.json").is_file() or (p / "failed.json").is_file()))


def folders_without_a_run(output_dir: str | Path = "outputs/runs") -> list[str]:
    """The folders under ``output_dir`` that hold no run record, each with the runs one level down
    (a student's archive unpacked into a folder of its name: ``name/name/config.json``), which the
    report would otherwise leave out without a word."""
    root = resolve_path(output_dir)
    if not root.is_dir():
        return []
    listed = set(run_folders(output_dir))
    said = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p not in listed and not p.name.startswith(".")):
        inside = [p.name for p in run_folders(folder)]
        said.append(f"`{md_text(folder.name)}`" + (f" (holds the run(s) {', '.join(md_text(n) for n in inside)} one level "
                                                    "down: move them up to be listed)" if inside else ""))
    return said


def run_row(folder: Path) -> dict:
    """One run as a flat dict: parameters, best metrics, test metrics and a status.

    ``checkpoint`` is the run's own checkpoint (:func:`labseg.runs.default_checkpoint`: last.pt
    once a decaying schedule finished, else best.pt) and ``test_*`` are its figures;
    ``test_dice_best`` and ``test_dice_last`` show both checkpoints where both were evaluated.
    """
    row = {"run": folder.name}
    try:
        config = _read_json(folder / "config.json", {}) or {}
        summary = RunDir(folder).read_summary()      # {} for a resumed run's stale one: unfinished
        failed = _read_json(folder / "failed.json")
    except RunRecordError as e:         # shown as damaged, not as a finished run with empty columns
        return {**row, "status": "damaged record", "error": str(e)}
    params = {**(failed or {}).get("params", {}), **config}
    row.update({k: params.get(k) for k in PARAMS})
    # Valid and test Dice on the synthetic sample and on real photos are not comparable: the
    # dataset (its folder's name) is a column, and best_per_arch compares runs of one dataset.
    row["dataset"] = Path(str(params["data_dir"])).name if params.get("data_dir") else None
    # The folder itself, resolved as training resolved it: two datasets in folders of the same
    # name are told apart, as runs.best_run tells them apart.
    row["data_path"] = str(resolve_path(params["data_dir"])) if params.get("data_dir") else None
    # ... and runs compare by what they trained on, not where: a class's runs hold one dataset at
    # as many paths as machines (runs.dataset_key)
    row["data_key"] = dataset_key(summary, params.get("data_dir"))
    row.update({k: summary.get(k) for k in METRICS})
    recorded = {}
    for which in ("best", "last"):
        try:
            recorded[which] = _read_json(folder / eval_file("test", which), {}) or {}
        except RunRecordError as e:
            recorded[which] = {}
            _note(row, str(e))
    evaluations, stale = _current(_by_checkpoint(recorded), folder, summary)
    for text in stale:
        _note(row, text)
    row["checkpoint"] = (default_checkpoint(params.get("scheduler"), summary.get("stop_reason"),
                                            RunDir(folder).lr_left(summary, params.get("lr"))) if summary else None)
    evaluation = evaluations.get(row["checkpoint"], {})
    row["test_dice"] = evaluation.get("dice")
    row["test_iou"] = evaluation.get("iou")
    row["test_dice_tta"] = (evaluation.get("tta") or {}).get("dice")
    row["test_dice_best"] = evaluations["best"].get("dice")
    row["test_dice_last"] = evaluations["last"].get("dice")
    # Budget runs are wall-clock bound: which machine and precision trained a run says how many
    # epochs it had (runs from before this record show none; a resumed run, each machine it used).
    row["machine"] = run_machine_label(summary)
    if failed is not None:
        row["status"], row["error"] = "failed", failed.get("error", "")
    elif "best_valid_dice" in summary and not _is_number(summary["best_valid_dice"]):
        return {**row, "status": "damaged record",
                "error": f"{folder / 'summary.json'}: best_valid_dice is {summary['best_valid_dice']!r}; "
                         "expected a number"}
    elif "best_valid_dice" in summary:
        row["status"], row["error"] = "finished", row.get("error")
        row["trained_at"] = trained_at(RunDir(folder))
        row["finished_at"] = summary.get("finished_at")       # for _note_copies (not a column)
        if not (folder / f"{row['checkpoint']}.pt").is_file():     # finished, but nothing left to evaluate
            _note(row, f"its checkpoint {row['checkpoint']}.pt is missing: it cannot be evaluated again")
        try:
            RunDir(folder).read_metrics()
        except RunRecordError as e:     # its curve is left out: say why
            _note(row, str(e))
    else:
        # No summary yet: still running, or stopped. Its epochs so far are in its records, and a
        # checkpoint makes it resumable (labseg train --run-name RUN --resume).
        try:
            history = RunDir(folder).read_metrics()
        except RunRecordError as e:
            history, row["error"] = [], str(e)
        if history:
            best_row = max(history, key=lambda h: h.get("valid_dice", float("-inf")))
            row.update(best_valid_dice=best_row.get("valid_dice"), best_valid_iou=best_row.get("valid_iou"),
                       best_epoch=best_row.get("epoch"), epochs_run=len(history))
        resumable = (folder / "last.pt").is_file() or (folder / "best.pt").is_file()
        training = RunDir(folder).is_training()     # None: cannot tell (no flock)
        if training is None:
            row["status"] = "running or stopped (resumable)" if resumable else "running or killed"
        else:
            row["status"] = "running" if training else "stopped (resumable)" if resumable else "stopped (killed)"
        row.setdefault("error", None)
    return row


def _note(row: dict, text: str) -> None:
    """Add ``text`` to the row's notes (its "error" column), after those already there."""
    row["error"] = "; ".join([*([row["error"]] if row.get("error") else []), text])


def collect_runs(output_dir: str | Path = "outputs/runs"):
    """Every run under ``output_dir`` as a DataFrame (one row per run, columns TABLE_COLUMNS)."""
    import pandas as pd

    rows = [run_row(f) for f in run_folders(output_dir)]
    _note_copies(rows)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _note_copies(rows: list[dict]) -> None:
    """Finished runs whose records agree to the millisecond they finished, the seconds they trained
    and their Dice are one run in several folders (a copied submission): each says which others."""
    same: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("status") == "finished" and isinstance(row.get("finished_at"), str):
            same.setdefault((row["finished_at"], row.get("train_seconds"), row.get("best_valid_dice"),
                             row.get("epochs_run")), []).append(row)
    for group in (g for g in same.values() if len(g) > 1):
        for row in group:
            others = ", ".join(r["run"] for r in group if r is not row)
            _note(row, f"the same run as {others} (its records agree to the millisecond it finished: a copy?)")


def evaluation_breakdown(output_dir: str | Path = "outputs/runs"):
    """Every run evaluated on test: plain Dice, flip TTA, the valid-tuned threshold, one-pet
    post-processing, and per breed.

    One row per evaluated checkpoint (``eval_test.json``: best.pt, ``eval_test_last.json``:
    last.pt); the gains of TTA, of the tuned threshold and of the post-processing are columns of
    their own so that they read apart from the plain figure.
    """
    import pandas as pd

    rows = []
    for folder, which, ev in ((f, which, ev) for f in run_folders(output_dir) for which, ev in _current(_by_checkpoint(
            {w: _read_quietly(f / eval_file("test", w)) for w in ("best", "last")}), f, _summary_quietly(f))[0].items()):
        if not ev:
            continue
        tta, tuned, post = ev.get("tta") or {}, ev.get("threshold_tuned") or {}, ev.get("postprocess") or {}
        row = {"run": folder.name, "arch": ev.get("arch"), "checkpoint": which,
               "images": ev.get("images"), "test_dice": ev.get("dice"), "tta_dice": tta.get("dice"),
               "tta_gain": _minus(tta.get("dice"), ev.get("dice")), "threshold": tuned.get("threshold"),
               # the threshold's own gain; an evaluation written before "tta_threshold_tuned" existed
               # tuned this one with TTA when TTA was on, and its gain is then over TTA's Dice
               "tuned_dice": tuned.get("dice"),
               "tuned_gain": _minus(tuned.get("dice"), tta.get("dice") if tuned.get("tta") else ev.get("dice")),
               "tta_tuned_dice": (ev.get("tta_threshold_tuned") or {}).get("dice"),
               "postprocess_dice": post.get("dice"), "postprocess_gain": _minus(post.get("dice"), ev.get("dice"))}
        row.update({f"{group} dice": v.get("dice") for group, v in (ev.get("per_breed") or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _minus(a, b):
    return None if a is None or b is None else a - b


def best_per_arch(table, metric: str = "best_valid_dice", dataset: str | None = None):
    """The best finished run of each network (rows of ``table``, indexed by arch), among the runs
    on ``dataset`` (a data folder's name): by default the data of the run that finished last
    (the images it trained on, :func:`labseg.runs.dataset_key`), the rule of :func:`labseg.runs.best_run` (which ``labseg evaluate`` uses), since a Dice
    on 4 synthetic images and one on 30 photos do not compare."""
    done = table[(table["status"] == "finished") & table[metric].notna()]
    if dataset is not None:
        done = done[done["dataset"] == dataset]
    elif not done.empty and done["trained_at"].notna().any():
        done = done[done["data_key"] == done.loc[done["trained_at"].astype(float).idxmax(), "data_key"]]
    if done.empty:
        return done.set_index("arch")
    # a tie goes to the run that finished first, as in runs.best_run (which labseg evaluate uses)
    import pandas as pd

    done = done.sort_values("trained_at", kind="stable", na_position="first",
                            key=lambda when: pd.to_numeric(when, errors="coerce"))
    best = done.loc[done.groupby("arch", sort=False)[metric].idxmax()]
    return best.set_index("arch").sort_index()


def best_per_dataset(table, metric: str = "best_valid_dice"):
    """:func:`best_per_arch` on each dataset the finished runs trained on, one row per network and
    dataset (``arch`` a column): the dataset of the run that finished last first, then the others
    by their latest run. A class's runs on the sample and on real photos each get their best."""
    import pandas as pd

    done = table[(table["status"] == "finished") & table[metric].notna()]
    if done.empty:
        return best_per_arch(table, metric).reset_index()
    latest = pd.to_numeric(done["trained_at"], errors="coerce").groupby(done["data_key"].fillna("")).max()
    keys = latest.sort_values(ascending=False, na_position="last").index
    best = pd.concat([best_per_arch(done[done["data_key"].fillna("") == key], metric).reset_index() for key in keys],
                     ignore_index=True)
    # Two datasets of one folder name (or runs from before labseg recorded their images, whose
    # folders are not here): told apart by their folder, or by their images' fingerprint.
    shared = best.groupby("dataset")["data_key"].transform("nunique") > 1
    best.loc[shared, "dataset"] = [f"{d} ({p})" if k == p else f"{d} (images {str(k)[:8]})"
                                   for d, p, k in best.loc[shared, ["dataset", "data_path", "data_key"]].itertuples(index=False)]
    return best


def load_histories(output_dir: str | Path = "outputs/runs") -> dict[str, list[dict]]:
    """Each run's per-epoch records (none for a run whose metrics.json is damaged: the table says so)."""
    histories = {}
    for f in run_folders(output_dir):
        try:
            histories[f.name] = RunDir(f).read_metrics()
        except RunRecordError:
            histories[f.name] = []
    return histories


def plot_curves(output_dir: str | Path = "outputs/runs", table=None, metric: str = "valid_dice",
                dataset: str | None = None) -> Figure:
    """Validation ``metric`` and valid loss per epoch of the runs on one dataset, the best run of
    each network bold: ``dataset`` (a data folder's name), by default :func:`best_per_arch`'s, the
    data of the run that finished last. Curves on other data do not compare, and a Dice on the
    synthetic sample drawn bold over real-photo runs read as the best of them."""
    table = collect_runs(output_dir) if table is None else table
    histories = load_histories(output_dir)
    best = set(best_per_arch(table, dataset=dataset)["run"]) if len(table) else set()
    on = curves_dataset(table, dataset)
    if on is not None:
        table = table[table["data_key"] == on[1]] if dataset is None else table[table["dataset"] == dataset]
    named = set(table["run"])
    if len(table) > MAX_LABELLED_RUNS:      # the legend stays readable: each network's few best by name
        import pandas as pd

        ranked_runs = table.assign(dice=pd.to_numeric(table["best_valid_dice"], errors="coerce")).dropna(subset=["dice"])
        named = set(ranked_runs.sort_values("dice", ascending=False).groupby("arch").head(LABELLED_PER_NETWORK)["run"])
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax_m, ax_l = fig.subplots(1, 2)
    others = {}         # a network's other runs so far: each its own dash, or they share one look
    for _, row in table.iterrows():
        history = histories.get(row["run"]) or []
        if not history:
            continue
        epochs = [h["epoch"] for h in history]
        is_best = row["run"] in best
        dash = "-"
        if not is_best:
            others[row["arch"]] = others.get(row["arch"], -1) + 1
            dash = OTHER_RUN_DASHES[others[row["arch"]] % len(OTHER_RUN_DASHES)]
        # Markers on every line: a run of one epoch is a single point, which a bare line never draws.
        style = dict(color=ARCH_COLORS.get(row["arch"], "tab:gray"), lw=2.6 if is_best else 1.0, ls=dash,
                     alpha=1.0 if is_best else 0.6, marker="o", ms=4 if is_best else 3)
        label = f"{row['run']} (best {row['arch']})" if is_best else row["run"] if row["run"] in named else None
        ax_m.plot(epochs, [h[metric] for h in history], label=label, **style)
        ax_l.plot(epochs, [h["valid_loss"] for h in history], **style)
    where = f" on {on[0]}" if on is not None else ""
    ax_m.set(xlabel="epoch", ylabel=metric.replace("_", " "), title=f"{metric.replace('_', ' ')} of every run{where}",
             ylim=(0, 1))
    # Log scale: a from-scratch run's first epochs can have a valid loss 100x the final one.
    losses = [y for line in ax_l.lines for y in line.get_ydata() if y > 0]
    if losses and min(losses) == max(losses):    # one value (one run, one epoch): a decade around it
        ax_l.set_ylim(min(losses) / 3, min(losses) * 3)
    ax_l.set(xlabel="epoch", ylabel="valid loss (log scale)", title="valid loss (thin, dashed: other runs)",
             yscale="log")
    last_epoch = max((h["epoch"] for run in table["run"] for h in histories.get(run) or []), default=1)
    for ax in (ax_m, ax_l):
        ax.grid(alpha=0.3)
        epoch_axis(ax, last_epoch)
    _log_loss_ticks(ax_l, losses)
    if ax_m.get_legend_handles_labels()[0]:   # long run names (sweeps): under the plots, not over the curves
        fig.legend(*ax_m.get_legend_handles_labels(), loc="outside lower center", fontsize=8)
    if not ax_m.lines:
        _say_empty(ax_m, "no run has finished an epoch yet")
    return fig


def epoch_axis(ax, last: int) -> None:
    """Epochs 1 to ``last`` on the x-axis, whole numbers (here and in viz's training curves):
    MaxNLocator(integer=True) falls back to 0.5, 0.6... when fewer than two whole numbers fit (runs
    of one epoch), so a few epochs get each their own tick."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True) if last > 5 else FixedLocator(range(1, last + 1)))
    ax.set_xlim(0.5, last + 0.5)


def _log_loss_ticks(ax, losses) -> None:
    """Labelled ticks for the log-scale loss axis: within one decade, a few plain numbers (0.8, 1,
    1.2, 1.4: the log ticks 0.8, 0.9, 1, 2 left none above 1 on 0.78-1.4); across decades, the
    powers of ten alone (labelled minor ticks piled up: "1000 500 600 ..."), at least two of them."""
    if not losses:
        return
    low, high = ax.get_ylim()
    if max(losses) / min(losses) < 10:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        return
    if sum(low <= 10.0 ** k <= high for k in range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)) < 2:
        ax.set_ylim(10.0 ** np.floor(np.log10(low)), 10.0 ** np.ceil(np.log10(high)))   # 0.3-5: 0.1, 1, 10
    ax.yaxis.set_minor_formatter(NullFormatter())


def curves_dataset(table, dataset: str | None = None) -> tuple[str, str] | None:
    """(name, folder) of the data :func:`plot_curves` draws when the runs are on more than one
    dataset: ``dataset``, or that of the best runs (the latest run's); None when there is one."""
    if not len(table) or table["data_key"].nunique(dropna=True) <= 1:
        return None
    if dataset is not None:
        return dataset, dataset
    best = best_per_arch(table)
    return (best["dataset"].iloc[0], best["data_key"].iloc[0]) if len(best) else None


def _say_empty(ax, text: str) -> None:
    """Write ``text`` across an empty plot, so that it does not read as a plot of zeros."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def plot_best(table) -> Figure:
    """Best validation Dice (and test Dice where evaluated) of each network's best run."""
    best = best_per_arch(table)
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(best))
    valid = best["best_valid_dice"].astype(float).to_numpy() if len(best) else np.array([])
    test = best["test_dice"].astype(float).to_numpy() if len(best) else np.array([])
    tested = np.isfinite(test)
    # a valid bar moves left of its label only to make room for a test bar beside it
    bars = ax.bar(x - 0.2 if tested.any() else x, valid, 0.4, color=[ARCH_COLORS.get(a, "tab:gray") for a in best.index])
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    if tested.any():    # no bar where there is no test Dice: an empty outlined one read as 0
        bars = ax.bar(x[tested] + 0.2, test[tested], 0.4, label="test Dice", color="lightgray", edgecolor="k")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    # centred, and room for two networks at least: one run's bar spanned the figure, its label off it
    half = max(len(best), 2) / 2 + 0.25
    ax.set_xlim((len(best) - 1) / 2 - half, (len(best) - 1) / 2 + half)
    # valid Dice is best.pt's (the epoch it was kept for); test Dice is of the run's own checkpoint
    checkpoints = best["checkpoint"] if "checkpoint" in best else [None] * len(best)
    ax.set_xticks(x, [f"{a}\n{_short(r)}" + (f"\ntest: {c}.pt" if isinstance(c, str) and np.isfinite(t) else "")
                      for a, r, c, t in zip(best.index, best["run"], checkpoints, test)], fontsize=8)
    # one dataset's runs (best_per_arch's): its name, as curves.png gives it
    where = f" on {best['dataset'].iloc[0]}" if len(best) and isinstance(best["dataset"].iloc[0], str) else ""
    ax.set(ylim=(0, 1.05), ylabel="Dice", title=f"best run per network{where}")
    ax.grid(axis="y", alpha=0.3)
    colours = [ARCH_COLORS.get(a, "tab:gray") for a in best.index] or ["tab:gray"]
    handles = [tuple(Patch(facecolor=c) for c in colours)]      # one swatch per network's colour
    labels = ["best valid Dice (best.pt)"]
    if np.isfinite(test).any():
        handles.append(Patch(facecolor="lightgray", edgecolor="k"))
        labels.append("test Dice (the checkpoint named below)")
    # under the axes: inside, the legend covered the bars' feet
    from matplotlib.legend_handler import HandlerTuple

    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncols=2,
               handler_map={tuple: HandlerTuple(ndivide=None, pad=0)})
    if not len(best):
        _say_empty(ax, "no finished run yet")
    return fig


def _short(name: str, width: int = 28) -> str:
    """A run name that fits under a bar: sweep names run to 80 characters."""
    return name if len(name) <= width else name[:width // 2 - 1] + "…" + name[-(width // 2):]


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# Counts: a column of them turns float in pandas once a run lacks one (NaN), but 3, not 3.0000.
COUNT_COLUMNS = {"best_epoch", "epochs_run", "epochs", "parameters", "img_size", "batch_size", "seed"}


def _fmt(value, column: str = "") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    if column == "epochs" and isinstance(value, (int, float, np.number)) and value >= UNTIL_BUDGET:
        return "budget"                     # trained until its time budget was spent
    if column == "parameters" and isinstance(value, (int, float, np.number)) and float(value).is_integer():
        return f"{int(value):,}"            # 31,038,532
    if column == "threshold" and isinstance(value, (float, np.floating)):
        return f"{value:.2f}"
    if column in COUNT_COLUMNS and isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if column in ("lr", "weight_decay") and isinstance(value, (int, float, np.number)):
        return f"{value:g}"                 # 1e-4 and 5e-05, which four decimals both print as 0.0001
    if column.endswith("_gain") and isinstance(value, (float, np.floating)):
        return f"{value:+.4f}"              # a gain has a sign: +0.0140, -0.0030
    if column == "trained_at":
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(float(value)))
    if isinstance(value, (float, np.floating)):
        if column.endswith("seconds"):      # durations: 7.9 and 14.4, not 7.9000 and 14.4
            return f"{value:.1f}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("\n", " ")


def md_text(value) -> str:
    """Text from a run folder (a name, a breed, an error) as it reads in a Markdown table cell: a
    received folder may hold anything, and `|`, a newline or HTML there would break the table or
    run in a viewer that renders HTML."""
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ").replace("`", "'")


def ranked(table):
    """``table`` as a ranking: finished runs by dataset and network, best valid Dice first; then the rest."""
    import pandas as pd

    done = table["status"] == "finished"
    return pd.concat([table[done].sort_values(["dataset", "arch", "best_valid_dice"], ascending=[True, True, False],
                                              na_position="last"), table[~done]])


def formatted(df, columns=None):
    """``df`` (or its ``columns``) as text, each value as report.md prints it: 1e-4 and 5e-05 for
    learning rates, "budget" for a run trained until its time budget, 0.8123 for a Dice, blanks
    for values a run lacks. For the notebooks, where raw pandas shows 100000 and 0.754928."""
    import pandas as pd

    columns = list(columns or df.columns)
    return pd.DataFrame({c: [_fmt(None if _isna(v) else v, c) for v in df[c]] for c in columns},
                        index=pd.RangeIndex(1, len(df) + 1), columns=columns)


MAX_BREED_COLUMNS = 8    # more breeds than this get a table of their own, one row per breed


def markdown_table(df, columns=None) -> str:
    """A GitHub-flavoured markdown table (no extra dependency)."""
    columns = list(columns or df.columns)
    lines = ["| " + " | ".join(md_text(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(md_text(_fmt(None if _isna(row[c]) else row[c], c)) for c in columns) + " |")
    return "\n".join(lines)


def _isna(v) -> bool:
    try:
        return v is None or bool(np.isnan(v))
    except (TypeError, ValueError):
        return False


def write_report(output_dir: str | Path = "outputs/runs", report_dir: str | Path = "outputs/report") -> Path:
    """Write ``report.md``, ``runs.csv``, ``curves.png`` and ``best_per_network.png``; return report.md.

    Every file is written to a temporary name and renamed, so a reader never sees half a report.
    A missing ``output_dir`` is refused: its report would be an empty one, written over the real one.
    """
    from labseg.workbook import existing_runs_dir

    existing_runs_dir(output_dir)
    out = resolve_path(report_dir)
    table = collect_runs(output_dir)
    best = best_per_arch(table)
    curves = plot_curves(output_dir, table)
    has_curves = bool(curves.axes[0].lines)
    on = curves_dataset(table)
    curves_on = f" on `{on[0]}` (runs on other data are left out: their curves do not compare)" if on else ""
    # A chart with nothing to show is not written, and one left from an earlier report removed.
    for name, fig, drawn in (("curves.png", curves, has_curves),
                             ("best_per_network.png", plot_best(table) if len(best) else None, len(best))):
        if drawn:
            atomic_write_bytes(out / name, figure_png(fig))
        else:
            (out / name).unlink(missing_ok=True)
    import pandas as pd

    # "epochs" of a run trained until its time budget is a sentinel (UNTIL_BUDGET), not a count:
    # blank in the CSV, where the time_budget column says what bounded it
    epochs = pd.to_numeric(table["epochs"], errors="coerce") if "epochs" in table else None
    csv = table if epochs is None else table.assign(epochs=epochs.where(epochs < UNTIL_BUDGET).astype("Int64"))
    if "trained_at" in csv:     # a date to read, not seconds since 1970
        when = pd.to_datetime(pd.to_numeric(csv["trained_at"], errors="coerce"), unit="s", utc=True)
        csv = csv.assign(trained_at=when.dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    atomic_write_text(out / "runs.csv", csv.to_csv(index=False))

    shown = ["run", "status", "dataset", "arch", "img_size", "epochs", "lr", "loss", "augment", "seed",
             "best_valid_dice", "best_valid_iou", "best_epoch", "checkpoint", "test_dice", "test_dice_tta",
             "test_dice_best", "test_dice_last", "train_seconds", "machine"]
    # Best first within each dataset and network, so the table reads as a ranking.
    finished = ranked(table[table["status"] == "finished"])
    others = table[table["status"] != "finished"]
    parts = [
        "# labseg: run report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from {len(table)} run folder(s) in "
        f"`{resolve_path(output_dir)}` ({len(finished)} finished, {len(others)} failed or unfinished).",
        "",
        "## Best run per network",
        "",
        *([f"On each dataset, `{best['dataset'].iloc[0]}` (the dataset of the run that finished last, which the "
           "figure and the curves show) first: a valid Dice on one dataset does not compare with one on another.", ""]
          if len(best) and finished["data_key"].nunique() > 1 else []),
        markdown_table(best_per_dataset(table), ["arch", "run", "dataset", "best_valid_dice", "best_valid_iou",
                                                 "best_epoch", "checkpoint", "test_dice", "test_iou", "parameters",
                                                 "train_seconds"])
        if len(best) else "_No finished run yet._",
        "",
        *(["![best run per network](best_per_network.png)", ""] if len(best) else []),
        "## Learning curves",
        "",
        (f"Validation Dice and loss per epoch of every run{curves_on}; the best run of each network is drawn bold.")
        if has_curves else "_No run has finished an epoch yet._",
        "",
        *(["![learning curves](curves.png)", ""] if has_curves else []),
        "## All runs",
        "",
        "`checkpoint` is the run's own checkpoint: last.pt once its decaying lr schedule finished, best.pt "
        "(best valid Dice) for a run stopped early; `test_dice` and `test_dice_tta` are its figures, "
        "`test_dice_best` and `test_dice_last` both checkpoints' plain test Dice.",
        "",
        markdown_table(finished, shown) if len(finished) else "_None._",
        "",
    ]
    noted = finished[finished["error"].notna() & (finished["error"].astype(str) != "")]
    if len(noted):      # e.g. a deleted checkpoint: the figures stand, the run cannot be evaluated again
        parts += ["Notes:", "", *[f"- `{md_text(r.run)}`: {md_text(r.error)}" for r in noted.itertuples()], ""]
    breakdown = evaluation_breakdown(output_dir)
    breeds = [c for c in breakdown.columns if c.endswith(" dice")]       # "{breed} dice", see above
    apart = len(breeds) > MAX_BREED_COLUMNS     # the full dataset's 37 breeds: a table of their own
    parts += ["## Test: flip TTA, tuned threshold, post-processing and per breed", "",
              "Plain = threshold 0.5, no TTA; the threshold is tuned on the valid images, never on test; "
              "post-processing keeps one pet per image (largest connected component, holes filled); "
              f"per-breed {'figures' if apart else 'columns'} are plain Dice.", "",
              markdown_table(breakdown.drop(columns=breeds) if apart else breakdown) if len(breakdown)
              else "_No run evaluated on test yet._", ""]
    if apart and len(breakdown):
        per_breed = breakdown[breeds].T
        per_breed.columns = [f"{r.run} {r.checkpoint}.pt" for r in breakdown.itertuples()]
        per_breed.index = [c.removesuffix(" dice") for c in breeds]
        parts += ["Plain test Dice per breed (one column per evaluated checkpoint):", "",
                  markdown_table(per_breed.rename_axis("breed").reset_index()), ""]
    if len(others):
        parts += ["## Failed or unfinished runs", "", markdown_table(others, ["run", "status", "arch", "error"]), ""]
    if unlisted := folders_without_a_run(output_dir):
        parts += ["Folders here that hold no run record, not listed above: " + "; ".join(unlisted) + ".", ""]
    parts += ["Every run's full parameters and metrics: `runs.csv`.", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts))
    return report
