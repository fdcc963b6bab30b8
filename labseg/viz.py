"""What the notebooks show: dataset tables, model anatomy, figures and widgets.

Every plotting function builds a :class:`matplotlib.figure.Figure` directly (not through
``pyplot``) and returns it, so it works headless (papermill, nbval, report writing) and a
notebook shows it by making it the last expression of a cell. Widgets (ipywidgets) are thin
shells around functions that are tested without a browser.

Convention for the notebooks' printed numbers (nbval compares them): values that are exactly
reproducible (counts, shapes, parameters, FLOPs, dataset statistics) are printed with at most
three decimals; values that depend on floating-point training noise (losses, Dice, IoU) are
printed with four decimals, which ``notebooks/nbval_sanitize.cfg`` masks.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from labseg.config import UNTIL_BUDGET
from labseg.data import BACKGROUND, CachedSplit, balanced_subset, denormalize, load_split, read_records
from labseg.evaluate import ERROR_COLORS, error_overlay, overlay  # one tinting for the notebooks and predict's files
from labseg.report import epoch_axis


# --------------------------------------------------------------------------- small helpers
def hwc(image) -> np.ndarray:
    """A 3×H×W (uint8 or float in [0, 1]) tensor/array as H×W×3 uint8."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8)
    return a


def _grid(n: int, ncols: int, size: float = 2.2, title_space: float = 0.35) -> tuple[Figure, np.ndarray]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(size * ncols, (size + title_space) * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes:
        ax.set_axis_off()
    return fig, axes


# --------------------------------------------------------------------------- the dataset
def split_counts(data_dir: str | Path):
    """Images per split, species and breed (from the split files; pairs that exist on disk)."""
    import pandas as pd

    rows = []
    for split in ("trainval", "test"):
        records, _ = read_records(data_dir, split)
        for r in records:
            rows.append({"split": split, "species": r.species, "breed": r.breed})
    df = pd.DataFrame(rows)
    by_species = df.pivot_table(index="species", columns="split", aggfunc="size", fill_value=0)
    by_breed = df.pivot_table(index=["species", "breed"], columns="split", aggfunc="size", fill_value=0)
    for table in (by_species, by_breed):
        table["total"] = table.sum(axis=1)
        table.columns.name = None
    return by_species, by_breed


def image_sizes(split: CachedSplit):
    """Original (width, height) of every image of a cached split, as a DataFrame."""
    import pandas as pd

    return pd.DataFrame({"name": [r.name for r in split.records], "width": split.sizes[:, 1],
                         "height": split.sizes[:, 0]})


def foreground_fractions(split: CachedSplit) -> np.ndarray:
    """Share of pet pixels (border included) in each image, at the cached size."""
    labels = np.asarray(split.labels)
    return (labels != BACKGROUND).reshape(len(labels), -1).mean(1)


def plot_image_sizes(sizes_df) -> Figure:
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.scatter(sizes_df["width"], sizes_df["height"], s=12, alpha=0.6)
    ax1.set(xlabel="width (px)", ylabel="height (px)", title="original image sizes")
    ratio = sizes_df["width"] / sizes_df["height"]
    ax2.hist(ratio, bins=20, color="tab:green")
    ax2.set(xlabel="width / height", ylabel="images", title="aspect ratio (resized to a square)")
    return fig


def plot_foreground(fractions: np.ndarray, title: str = "pet share of the image") -> Figure:
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.hist(fractions, bins=20, range=(0, 1), color="tab:orange")
    ax.axvline(float(np.mean(fractions)), color="k", ls="--", label=f"mean {np.mean(fractions):.2f}")
    ax.set(xlabel="foreground fraction", ylabel="images", title=title)
    ax.legend()
    return fig


def sample_grid(split: CachedSplit, n: int = 8, seed: int = 0, ncols: int = 4, show_mask: bool = True) -> Figure:
    """``n`` random images of a cached split, the pet mask tinted on top: every breed in turn,
    so that 8 of 300 photos show all three breeds (random ones could miss one), grouped by breed."""
    idx = balanced_subset(split.records, np.random.default_rng(seed).permutation(len(split)), n)
    fig, axes = _grid(len(idx), ncols)
    for ax, i in zip(axes, idx):
        image = hwc(split.images[i])
        ax.imshow(overlay(image, split.labels[i] != BACKGROUND) if show_mask else image)
        r = split.records[i]
        ax.set_title(f"{r.breed} ({r.species})", fontsize=8)
    return fig


def augmentation_preview(split: CachedSplit, index: int = 0, level: str = "strong", n: int = 7,
                         seed: int = 0, ncols: int = 4) -> Figure:
    """One image and its mask (first panel) under ``n`` random draws of the augmentation."""
    from labseg.transforms import augment_sample

    torch.manual_seed(seed)
    image = torch.from_numpy(np.array(split.images[index]))
    labels = torch.from_numpy(np.array(split.labels[index]))
    fig, axes = _grid(n + 1, ncols)
    axes[0].imshow(overlay(hwc(image), labels.numpy() != BACKGROUND))
    axes[0].set_title("original", fontsize=8)
    for k, ax in enumerate(axes[1:n + 1], 1):
        aug_image, aug_labels = augment_sample(image, labels.unsqueeze(0), level)
        ax.imshow(overlay(hwc(aug_image), aug_labels[0].numpy() != BACKGROUND))
        ax.set_title(f"{level} #{k}", fontsize=8)
    return fig


def training_batch(split: CachedSplit, arch: str = "resnet34_unet", n: int = 8, seed: int = 0,
                   ncols: int = 4, **overrides) -> Figure:
    """``n`` training images as the network's recipe augments them, whole batch at once.

    Unlike :func:`augmentation_preview` this uses the training path, ``BatchAugment``, so it
    shows the batch-level augmentations too (mosaic, copy-paste). ``overrides`` replace recipe
    fields: ``augment`` and ``BatchAugment.CONFIG_FIELDS``. It is a batch from early in training:
    the recipe's mosaics stop after ``mosaic_until`` of it. It is shown at the split's own size;
    a recipe's ``low_res_scale`` trains those early epochs on smaller copies of the same images.
    """
    from labseg.recipes import recipe_for
    from labseg.transforms import BatchAugment

    if unknown := sorted(set(overrides) - {"augment", *BatchAugment.CONFIG_FIELDS}):
        raise TypeError(f"training_batch: unknown override(s) {unknown}; it takes augment, "
                        f"{', '.join(BatchAugment.CONFIG_FIELDS)}")
    recipe = {**recipe_for(arch), **overrides}
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(split), size=min(n, len(split)), replace=False))
    images = torch.from_numpy(np.stack([split.images[i] for i in idx])).float().div(255)
    labels = torch.from_numpy(np.stack([split.labels[i] for i in idx])).unsqueeze(1)
    augment = BatchAugment.from_config(recipe)
    images, labels = augment(images, labels, generator=torch.Generator().manual_seed(seed))
    fig, axes = _grid(len(idx), ncols)
    for ax, image, lab in zip(axes, images, labels):
        ax.imshow(overlay(hwc(image), lab[0].numpy() != BACKGROUND))
    shown = ["mosaic", "copy_paste", *(k for k in ("mosaic_background", "elastic") if recipe[k])]
    fig.suptitle(f"{arch} training batch: augment={recipe['augment']!r}, "
                 + ", ".join(f"{k}={recipe[k]}" for k in shown), fontsize=9)
    return fig


def show_example(split: CachedSplit, index: int, show_mask: bool = True) -> Figure:
    """One image of a split, optionally with its mask: what the browser widget draws."""
    fig = Figure(figsize=(4, 4.3), layout="constrained")
    ax = fig.subplots()
    image = hwc(split.images[index])
    ax.imshow(overlay(image, split.labels[index] != BACKGROUND) if show_mask else image)
    r = split.records[index]
    h, w = split.sizes[index]
    ax.set_title(f"{r.name}  ({r.species}, {w}×{h} px)", fontsize=9)
    ax.set_axis_off()
    return fig


def dataset_browser(data_dir: str | Path, img_size: int, cache_dir: str = "data/cache"):
    """ipywidgets: split dropdown, index slider, overlay checkbox -> the image."""
    import ipywidgets as widgets
    from IPython.display import display

    splits = {s: load_split(data_dir, s, img_size, cache_dir, progress=False) for s in ("trainval", "test")}
    split_w = widgets.Dropdown(options=list(splits), value="trainval", description="split")
    index_w = widgets.IntSlider(0, 0, len(splits["trainval"]) - 1, description="index")
    mask_w = widgets.Checkbox(True, description="overlay mask")
    out = widgets.Output()

    def redraw(*_):
        split = splits[split_w.value]
        index_w.max = len(split) - 1
        with out:
            out.clear_output(wait=True)
            display(show_example(split, min(index_w.value, len(split) - 1), mask_w.value))

    for w in (split_w, index_w, mask_w):
        w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([split_w, index_w, mask_w]), out])


# --------------------------------------------------------------------------- model anatomy
def layer_table(model: nn.Module, input_shape=(1, 3, 64, 64), depth: int = 1):
    """Output shape and parameters of every submodule down to ``depth`` (forward hooks)."""
    import pandas as pd

    rows, hooks = [], []
    for name, module in model.named_modules():
        if not name or name.count(".") >= depth:
            continue

        def hook(mod, inputs, output, name=name):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else \
                [tuple(o.shape) for o in output if isinstance(o, torch.Tensor)]
            rows.append({"layer": name, "type": type(mod).__name__, "output_shape": str(shape),
                         "parameters": sum(p.numel() for p in mod.parameters())})
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return pd.DataFrame(rows)


def count_flops(model: nn.Module, input_shape=(1, 3, 64, 64)) -> int:
    """FLOPs of one forward pass (torch.utils.flop_counter; a multiply-add counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(input_shape))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def model_facts(name: str, img_size: int = 64, **kwargs) -> dict:
    """Parameters, FLOPs and output shape of a freshly built network at ``img_size``."""
    from labseg.models import build_model, count_parameters

    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    shape = (1, 3, img_size, img_size)
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(shape))
    return {"network": name, "parameters": count_parameters(model),
            "GFLOPs": round(count_flops(model, shape) / 1e9, 3), "input_shape": str(shape),
            "output_shape": str(tuple(out.shape))}


def compare_models(names=("unet", "resnet34_unet"), img_size: int = 64):
    import pandas as pd

    return pd.DataFrame([model_facts(n, img_size) for n in names]).set_index("network")


def feature_maps(model: nn.Module, image: torch.Tensor, layers: list[str], n_channels: int = 6) -> Figure:
    """The first ``n_channels`` channels of each named layer's output for one normalised image,
    the image itself on the left so that the maps can be read against it."""
    captured, hooks = {}, []
    modules = dict(model.named_modules())
    if missing := [name for name in layers if name not in modules]:
        top = ", ".join(n for n in modules if n and "." not in n)
        raise KeyError(f"no layer {missing[0]!r} in {type(model).__name__}; its top-level layers: {top} "
                       "(inner ones as 'parent.child', see viz.layer_table)")
    for name in layers:
        hooks.append(modules[name].register_forward_hook(
            lambda m, i, o, name=name: captured.__setitem__(name, o.detach())))
    model.eval()
    try:
        with torch.no_grad():
            model(image.unsqueeze(0) if image.dim() == 3 else image)
    finally:
        for h in hooks:
            h.remove()
    fig = Figure(figsize=(1.6 * (n_channels + 1), 1.8 * len(layers)), layout="constrained")
    axes = fig.subplots(len(layers), n_channels + 1, squeeze=False)
    for ax in axes[:, 0]:
        ax.set_axis_off()
    picture = image if image.dim() == 3 else image[0]
    axes[0, 0].imshow(hwc(denormalize(picture.float().unsqueeze(0))[0]))
    axes[0, 0].set_title(f"input: {tuple(picture.shape)}", fontsize=8, loc="left")
    for row, name in zip(axes[:, 1:], layers):
        fmap = captured[name][0]
        for c, ax in enumerate(row):
            ax.set_axis_off()
            if c < fmap.shape[0]:
                ax.imshow(fmap[c].float().numpy(), cmap="viridis")
        row[0].set_title(f"{name}: {tuple(fmap.shape)}", fontsize=8, loc="left")
    return fig


# --------------------------------------------------------------------------- training curves
def plot_history(history: list[dict], axes=None, label: str | None = None, fig: Figure | None = None) -> Figure:
    """Loss (train, valid) and valid Dice/IoU per epoch on two axes."""
    if axes is None:
        fig = Figure(figsize=(10, 3.4), layout="constrained")
        axes = fig.subplots(1, 2)
    ax_loss, ax_dice = axes
    epochs = [r["epoch"] for r in history]
    prefix = f"{label} " if label else ""
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label=prefix + "train loss")
    ax_loss.plot(epochs, [r["valid_loss"] for r in history], "s--", label=prefix + "valid loss")
    ax_dice.plot(epochs, [r["valid_dice"] for r in history], "o-", label=prefix + "valid Dice")
    ax_dice.plot(epochs, [r["valid_iou"] for r in history], "s--", label=prefix + "valid IoU")
    # the train loss is of augmented batches (and sums the aux heads with deep supervision): it
    # need not sit below the valid loss
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (train: augmented batches, all heads)")
    ax_dice.set(xlabel="epoch", ylabel="score", title="validation", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        if history:
            ax.legend(fontsize=8)
            # whole epochs from 1: matplotlib's padded auto-ticks, frozen, ran -5 to 35 for 30 epochs;
            # to the longest history drawn on these axes (label: several runs on one pair)
            epoch_axis(ax, int(max(max(line.get_xdata(), default=0) for line in ax.lines)))
    return fig if fig is not None else axes[0].figure


CONFIG_FIELDS = ("arch", "data_dir", "img_size", "epochs", "time_budget", "batch_size", "lr", "weight_decay",
                 "optimizer", "scheduler", "warmup_epochs", "loss", "augment", "norm", "seed", "max_train_images")


# where things are and how the run is named: not how it trains
_NOT_TRAINING = ("run_name", "output_dir", "cache_dir", "device", "num_threads", "log_every", "checkpoint_every")


def config_table(config, fields=CONFIG_FIELDS):
    """A one-column table of a RunConfig's values: ``fields``, then every other field that differs
    from the recipes' common baseline (what the network's recipe or the user turned on, e.g.
    mosaics or deep supervision), so that the table describes the run that trains. A budget run's
    epochs read "until the budget"."""
    import pandas as pd

    from labseg.config import RunConfig
    from labseg.recipes import BASE_RECIPE

    baseline = {**RunConfig().to_dict(), **BASE_RECIPE}
    also = [k for k, v in config.to_dict().items()
            if k not in fields and k not in _NOT_TRAINING and v != baseline.get(k)]
    values = {k: getattr(config, k) for k in (*fields, *also)}
    if "epochs" in values and (values["epochs"] or 0) >= UNTIL_BUDGET:
        values["epochs"] = "until the time budget is spent"
    return pd.Series({k: "" if v is None else v for k, v in values.items()}, name="value").to_frame()


class LivePlot:
    """A ``fit(callback=...)`` that redraws the training curves in place after every epoch.

    In a notebook it shows one figure through an IPython display handle and updates it; under
    papermill the executed notebook keeps the final figure. Outside IPython it only records.
    """

    def __init__(self, title: str = "", total_epochs: int | None = None):
        self.fig = Figure(figsize=(10, 3.4), layout="constrained")
        self.axes = self.fig.subplots(1, 2)
        self.title, self.total = title, total_epochs
        self.history: list[dict] = []
        self.handle = None
        self._draw()
        try:
            from IPython import get_ipython
            from IPython.display import display

            if get_ipython() is not None:
                self.handle = display(self.fig, display_id=True)
        except ImportError:
            pass

    def _draw(self):
        for ax in self.axes:
            ax.clear()
        plot_history(self.history, self.axes)
        if self.total and self.total < UNTIL_BUDGET:     # a budget-limited run has no known end
            for ax in self.axes:    # a tick per epoch crammed 40 into a run the budget stopped at 9
                epoch_axis(ax, self.total)
        if not self.history:        # not empty axes of -0.04 to 0.04
            for ax in self.axes:
                ax.set_yticks([])
                if not (self.total and self.total < UNTIL_BUDGET):
                    ax.set_xticks([])
                ax.text(0.5, 0.5, "waiting for the first epoch", transform=ax.transAxes, ha="center",
                        va="center", color="0.4")
        self.fig.suptitle(self.title, fontsize=10)

    def __call__(self, history: list[dict]) -> None:
        self.history = list(history)
        self._draw()
        if self.handle is not None:
            self.handle.update(self.fig)


# --------------------------------------------------------------------------- evaluation
def plot_group_scores(table, title: str = "test scores") -> Figure:
    """Bar chart of Dice and IoU per group (a DataFrame indexed by group with dice/iou columns).

    Up to 8 groups (the species, the 3-breed subset) stand side by side; more (the full dataset's
    37 breeds) lie as horizontal bars, best at the top, in a figure that grows in height: side by
    side they made a figure 43 inches wide whose labels a notebook cell shrank to 2 px.
    """
    # n per bar: a breed of 4 test images swings far more than one of 60
    counts = table["images"] if "images" in table else [None] * len(table)
    labels = [f"{i} (n={int(n)})" if n is not None and n == n else str(i) for i, n in zip(table.index, counts)]
    if len(table) <= 8:
        fig = Figure(figsize=(max(4.5, 1.1 * len(table) + 2), 3.4), layout="constrained")
        ax = fig.subplots()
        x = np.arange(len(table))
        ax.bar(x - 0.2, table["dice"], 0.4, label="Dice")
        ax.bar(x + 0.2, table["iou"], 0.4, label="IoU")
        ax.set_xticks(x, [label.replace(" (n=", "\n(n=") for label in labels])
        ax.set(ylim=(0, 1), ylabel="score")
        ax.grid(axis="y", alpha=0.3)
    else:
        order = np.argsort(np.asarray(table["dice"], float), kind="stable")     # worst at the bottom
        fig = Figure(figsize=(6.5, 0.26 * len(table) + 1.3), layout="constrained")
        ax = fig.subplots()
        y = np.arange(len(table))
        ax.barh(y + 0.2, np.asarray(table["dice"], float)[order], 0.4, label="Dice")
        ax.barh(y - 0.2, np.asarray(table["iou"], float)[order], 0.4, label="IoU")
        ax.set_yticks(y, [labels[i] for i in order], fontsize=8)
        ax.set(xlim=(0, 1), xlabel="score")
        ax.grid(axis="x", alpha=0.3)
    # wrapped to the figure's width: a sweep's 64-character run name was cut off at both edges
    ax.set_title(textwrap.fill(title, width=int(fig.get_figwidth() * 8)))
    if len(table) > 8:
        ax.legend(loc="lower right")        # the worst groups' short bars: nothing to cover
    else:                                   # under the axes: inside, it covered a bar of Dice 0.9
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2)
    return fig


SWEEP_MIN_HALF_SPAN = 0.025     # the threshold sweep's Dice axis is this far above and below its centre at least


def plot_threshold_sweep(sweep: dict[float, float], title: str = "threshold sweep on valid") -> Figure:
    if not sweep:
        raise ValueError("plot_threshold_sweep: the sweep is empty; expected {threshold: Dice}, as "
                         "evaluate_run(..., tune_threshold=True) records it")
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    ts, ds = list(sweep), list(sweep.values())
    ax.plot(ts, ds, "o-")
    best = max(sweep, key=sweep.get)
    # at an end of the grid the optimum may lie beyond it (few valid images push it there too)
    edge = " (the grid's end: it may lie beyond)" if best in (min(ts), max(ts)) else ""
    ax.axvline(best, color="tab:red", ls="--", label=f"best {best:.2f}{edge}")
    ax.axvline(0.5, color="gray", ls=":", label="default 0.5")
    ax.set(xlabel="threshold", ylabel="mean Dice", title=title)
    # at least 0.05 of Dice tall: autoscaled to 0.681-0.690, a gain of 0.0007 looked like a peak
    low, high = ax.get_ylim()
    centre, half = (low + high) / 2, max((high - low) / 2, SWEEP_MIN_HALF_SPAN)
    ax.set_ylim(centre - half, centre + half)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)     # inside, it covered the points
    return fig


def gallery(split: CachedSplit, probs: torch.Tensor, indices, dice, threshold: float = 0.5,
            title: str = "", ncols: int = 4) -> Figure:
    """Each image twice: the true mask outlined, then the prediction against it (correct, false
    and missed pet pixels in three colours), with the image's Dice."""
    indices = list(indices)
    fig, axes = _grid(2 * len(indices), ncols)
    for k, i in enumerate(indices):
        image = hwc(split.images[i])
        pred = probs[i, 0].float().numpy() >= threshold
        truth = split.labels[i] != BACKGROUND
        axes[2 * k].imshow(overlay(image, truth))
        axes[2 * k].set_title(f"{split.records[i].name}\ntruth", fontsize=7)
        axes[2 * k + 1].imshow(error_overlay(image, pred, truth))
        axes[2 * k + 1].set_title(f"prediction, Dice {dice[i]:.2f}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    _error_legend(fig)
    return fig


def _error_legend(fig: Figure) -> None:
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=np.asarray(c) / 255, label=name) for name, c in ERROR_COLORS.items()],
               loc="outside lower center", ncols=3, fontsize=8, frameon=False)


def best_and_worst(dice, n: int = 4) -> tuple[list[int], list[int]]:
    """Indices of the ``n`` highest and ``n`` lowest per-image Dice (ties by index)."""
    dice = np.asarray(dice)
    return np.argsort(-dice, kind="stable")[:n].tolist(), np.argsort(dice, kind="stable")[:n].tolist()


def image_dice(probs: torch.Tensor, split: CachedSplit, index: int, threshold: float) -> float:
    from labseg.metrics import per_image_dice

    index = range(len(probs))[index]      # a negative index counts from the end, as elsewhere
    target = torch.from_numpy(np.asarray(split.labels[index] != BACKGROUND)).float()[None, None]
    return per_image_dice(probs[index:index + 1].float() >= threshold, target).item()


def show_prediction(split: CachedSplit, probs: torch.Tensor, index: int, threshold: float = 0.5) -> Figure:
    """Truth, probability map and thresholded prediction of one image, titled with its Dice."""
    fig = Figure(figsize=(9, 3.3), layout="constrained")
    axes = fig.subplots(1, 3)
    image = hwc(split.images[index])
    p = probs[index, 0].float().numpy()
    truth = split.labels[index] != BACKGROUND
    axes[0].imshow(overlay(image, truth))
    axes[0].set_title("truth", fontsize=9)
    im = axes[1].imshow(p, vmin=0, vmax=1, cmap="magma")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[1].set_title("pet probability", fontsize=9)
    axes[2].imshow(error_overlay(image, p >= threshold, truth))
    axes[2].set_title(f"threshold {threshold:.2f}: Dice {image_dice(probs, split, index, threshold):.3f}",
                      fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    _error_legend(fig)
    fig.suptitle(split.records[index].name, fontsize=10)
    return fig


def threshold_explorer(split: CachedSplit, probs: torch.Tensor):
    """ipywidgets: image slider + threshold slider -> truth, probabilities, prediction and Dice."""
    import ipywidgets as widgets
    from IPython.display import display

    index_w = widgets.IntSlider(0, 0, len(split) - 1, description="image")
    thr_w = widgets.FloatSlider(0.5, min=0.05, max=0.95, step=0.05, description="threshold")
    out = widgets.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            display(show_prediction(split, probs, index_w.value, thr_w.value))

    index_w.observe(redraw, names="value")
    thr_w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([index_w, thr_w]), out])


def normalized_image(split: CachedSplit, index: int) -> torch.Tensor:
    """Image ``index`` of a cached split as the networks see it: 3×S×S float, normalised."""
    from labseg.data import normalize

    x = torch.from_numpy(np.array(split.images[index])).float().div(255)
    return normalize(x.unsqueeze(0))[0]


def group_tables(result: dict):
    """(per species, per breed) DataFrames of an :func:`labseg.evaluate.evaluate_run` result."""
    import pandas as pd

    def table(key, name, columns=("images", "dice", "iou")):
        df = pd.DataFrame.from_dict(result[key], orient="index").reindex(columns=list(columns))
        df.index.name = name
        return df.round({"dice": 4, "iou": 4})     # 4 decimals, as the report prints them

    # breeds by species, then by name whatever its case (the dataset capitalises cat breeds)
    breeds = table("per_breed", "breed", ("species", "images", "dice", "iou"))
    breeds["species"] = breeds["species"].astype(object).where(breeds["species"].notna(), "")   # older records: none
    breeds = breeds.iloc[sorted(range(len(breeds)), key=lambda i: (breeds["species"].iloc[i],
                                                                    breeds.index[i].lower()))]
    return table("per_species", "species"), breeds


def variants_table(result: dict):
    """Plain prediction vs flip TTA vs a threshold tuned on valid vs one pet per image, from an
    evaluate_run result."""
    import pandas as pd

    rows = [{"variant": "threshold 0.5", "dice": result["dice"], "iou": result["iou"]}]
    if "tta" in result:
        rows.append({"variant": "threshold 0.5 + flip TTA", "dice": result["tta"]["dice"], "iou": result["tta"]["iou"]})
    # each with its own threshold: the one tuned with TTA differs from the plain one (0.45 and 0.30)
    for key, name in (("threshold_tuned", "threshold {:.2f} (tuned on valid)"),
                      ("tta_threshold_tuned", "flip TTA + threshold {:.2f} (tuned on valid, with TTA)")):
        if key in result:
            rows.append({"variant": name.format(result[key]["threshold"]), "dice": result[key]["dice"],
                         "iou": result[key]["iou"]})
    for key, name in (("postprocess", "threshold 0.5 + one pet"), ("tta_postprocess", "threshold 0.5 + flip TTA + one pet")):
        if key in result:   # one pet: the largest connected component, holes filled (labseg.postprocess)
            rows.append({"variant": name, "dice": result[key]["dice"], "iou": result[key]["iou"]})
    return pd.DataFrame(rows).set_index("variant").round(4)


def predict_split(run, split: str = "test", which: str = "auto", tta: bool = False, device="auto",
                  output_dir="outputs/runs"):
    """(CachedSplit, probabilities N×1×S×S) of a run on ``split`` ("test" or "valid"); ``run`` as
    :func:`labseg.evaluate.load_run_model` takes it."""
    from labseg.evaluate import run_split, batches_for_model, load_run_model, predict_probs

    model, config = load_run_model(run, which, device, output_dir)
    data = run_split(config, split, config.data_dir, progress=False)
    return data, predict_probs(model, batches_for_model(model, config, data), tta=tta)
