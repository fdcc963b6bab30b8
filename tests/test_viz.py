"""labseg.viz: the tables and figures the notebooks show, without a browser."""
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from labseg import viz
from labseg.data import load_split
from labseg.models import build_model


@pytest.fixture(scope="module")
def split(synthetic_root, tmp_path_factory):
    return load_split(synthetic_root, "test", 32, tmp_path_factory.mktemp("cache"), progress=False)


def test_split_counts(synthetic_root):
    by_species, by_breed = viz.split_counts(synthetic_root)
    assert list(by_species.columns) == ["test", "trainval", "total"]
    assert by_species["total"].sum() == by_breed["total"].sum() == 72
    assert len(by_breed) == 4


def test_dataset_figures(split):
    assert np.all((viz.foreground_fractions(split) > 0) & (viz.foreground_fractions(split) < 1))
    sizes = viz.image_sizes(split)
    assert len(sizes) == len(split) and (sizes["width"] > 0).all()
    for fig in (viz.plot_image_sizes(sizes), viz.sample_grid(split, n=4), viz.show_example(split, 0),
                viz.augmentation_preview(split, 0, "strong", n=3)):
        assert isinstance(fig, Figure)


def test_sample_grid_shows_every_breed_at_random(split):
    breeds = {r.breed for r in split.records}
    for seed in range(3):
        titles = [ax.get_title() for ax in viz.sample_grid(split, n=len(breeds), seed=seed).axes if ax.get_images()]
        assert {t.split(" (")[0] for t in titles} == breeds        # one of each, whatever the draw
    shown = {tuple(ax.get_images()[0].get_array().ravel()[:64].tolist())
             for seed in range(3) for ax in viz.sample_grid(split, n=len(breeds), seed=seed).axes if ax.get_images()}
    assert len(shown) > len(breeds)                                 # other images on other seeds


def test_training_batch_shows_what_the_batch_augmentation_makes(split):
    def panels(**overrides):
        fig = viz.training_batch(split, n=4, seed=3, **overrides)
        return [ax.get_images()[0].get_array() for ax in fig.axes if ax.get_images()]

    plain = panels(augment="none", mosaic=0.0, copy_paste=0.0)
    idx = np.sort(np.random.default_rng(3).choice(len(split), size=4, replace=False))
    assert len(plain) == 4
    for panel, i in zip(plain, idx):          # no augmentation: the cached image with its mask
        assert np.array_equal(panel, viz.overlay(viz.hwc(split.images[i]), split.labels[i] != 0))
    mosaics = panels(augment="none", mosaic=1.0, copy_paste=0.0)
    assert all(not np.array_equal(a, b) for a, b in zip(plain, mosaics))


def test_layer_table_and_flops():
    model = build_model("unet", base=8)
    table = viz.layer_table(model, (1, 3, 32, 32))
    assert table["layer"].tolist()[0] == "inc" and table["output_shape"].iloc[-1] == "(1, 1, 32, 32)"
    assert table["parameters"].sum() == sum(p.numel() for p in model.parameters())
    flops = viz.count_flops(model, (1, 3, 32, 32))
    assert flops > 0 and viz.count_flops(model, (1, 3, 64, 64)) == 4 * flops
    assert model.training          # left as found


def test_live_plot_records_headless():
    live = viz.LivePlot("t", total_epochs=3)
    live([{"epoch": 1, "train_loss": 1.0, "valid_loss": 0.9, "valid_dice": 0.5, "valid_iou": 0.4}])
    assert len(live.history) == 1 and len(live.axes[1].lines) == 2


def test_threshold_changes_the_shown_dice(split):
    probs = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(len(split), 1, 32, 32).clone()
    d_lo, d_hi = viz.image_dice(probs, split, 0, 0.1), viz.image_dice(probs, split, 0, 0.9)
    assert d_lo != d_hi
    fig = viz.show_prediction(split, probs, 0, 0.9)
    assert f"Dice {d_hi:.3f}" in fig.axes[2].get_title()
    best, worst = viz.best_and_worst([0.2, 0.9, 0.5, 0.1], 2)
    assert best == [1, 2] and worst == [3, 0]


def test_config_table_says_a_budget_run_trains_until_its_budget():
    from labseg.config import RunConfig

    budget = viz.config_table(RunConfig(arch="unet", time_budget="25m").with_recipe().validate())["value"]
    assert budget["epochs"] == "until the time budget is spent" and budget["time_budget"] == "25m"
    fixed = viz.config_table(RunConfig(arch="unet", epochs=3).with_recipe().validate())["value"]
    assert fixed["epochs"] == 3 and fixed["time_budget"] == "" and fixed["arch"] == "unet"


def test_config_table_shows_what_the_recipe_turned_on():
    from labseg.config import RunConfig
    from labseg.recipes import BASE_RECIPE, recipe_for

    config = RunConfig(arch="resnet34_unet").with_recipe().validate()
    table = viz.config_table(config)["value"]
    # every field the network's recipe sets away from the common baseline is in the table, with its value
    changed = {k: v for k, v in recipe_for("resnet34_unet").items() if v != BASE_RECIPE[k]}
    assert {"mosaic", "deep_supervision", "low_res_scale"} <= set(changed)
    for name, value in changed.items():
        assert name in table.index and table[name] == value, name
    # and nothing else beyond the main fields: the baseline's zeros would only hide what matters
    assert set(table.index) == set(viz.CONFIG_FIELDS) | set(changed)


def test_feature_maps_show_the_input_beside_each_layers_channels(split):
    model = build_model("resnet34_unet")
    image = viz.normalized_image(split, 0)
    fig = viz.feature_maps(model, image, ["encoder.stem", "encoder.layer4"], n_channels=3)
    drawn = [ax for ax in fig.axes if ax.get_images()]
    assert len(drawn) == 1 + 2 * 3                          # the input, then 3 channels per layer
    shown = drawn[0].get_images()[0].get_array()
    assert drawn[0].get_title(loc="left") == "input: (3, 32, 32)"
    assert np.abs(shown.astype(int) - viz.hwc(split.images[0]).astype(int)).max() <= 1   # denormalised back
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
    assert titles[1:] == ["encoder.stem: (64, 16, 16)", "encoder.layer4: (512, 1, 1)"]


def test_notebook_helpers_name_what_is_wrong(split):
    probs = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(len(split), 1, 32, 32).clone()
    assert viz.image_dice(probs, split, -1, 0.5) == viz.image_dice(probs, split, len(split) - 1, 0.5)
    model = build_model("unet")
    with pytest.raises(KeyError, match="no layer 'nope' in UNet; its top-level layers: "):
        viz.feature_maps(model, torch.zeros(3, 32, 32), ["nope"])
    with pytest.raises(ValueError, match="the sweep is empty"):
        viz.plot_threshold_sweep({})
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['mosiac'\]; it takes augment, copy_paste, mosaic"):
        viz.training_batch(split, arch="unet", mosiac=1.0)


def test_breed_table_is_grouped_by_species_and_sorted_whatever_the_case():
    result = {"per_species": {"cat": {"images": 3, "dice": 0.8, "iou": 0.7}, "dog": {"images": 2, "dice": 0.6, "iou": 0.5}},
              "per_breed": {"Bengal": {"species": "cat", "images": 1, "dice": 0.8, "iou": 0.7},
                            "american_bulldog": {"species": "dog", "images": 2, "dice": 0.6, "iou": 0.5},
                            "abyssinian": {"species": "cat", "images": 2, "dice": 0.8, "iou": 0.7}}}
    species, breeds = viz.group_tables(result)
    assert list(breeds.index) == ["abyssinian", "Bengal", "american_bulldog"]
    assert list(breeds.columns) == ["species", "images", "dice", "iou"] and list(species.index) == ["cat", "dog"]
    for scores in result["per_breed"].values():          # an evaluation from before species was recorded
        del scores["species"]
    assert list(viz.group_tables(result)[1].index) == ["abyssinian", "american_bulldog", "Bengal"]


def test_a_threshold_tuned_to_the_end_of_the_grid_says_so():
    def best_label(sweep):
        fig = viz.plot_threshold_sweep(sweep)
        return fig.axes[0].get_legend_handles_labels()[1][0]

    assert best_label({0.2: 0.7, 0.5: 0.6, 0.8: 0.5}) == "best 0.20 (the grid's end: it may lie beyond)"
    assert best_label({0.2: 0.5, 0.5: 0.7, 0.8: 0.6}) == "best 0.50"


def test_the_variants_table_names_each_tuned_threshold():
    """The plain-tuned and the TTA-tuned thresholds differ (0.30 and 0.45 on a real run): each row
    says its own, rather than leave the reader to take the one in the sweep plot for both."""
    from labseg.viz import variants_table

    result = {"dice": 0.80, "iou": 0.70, "tta": {"dice": 0.81, "iou": 0.71},
              "threshold_tuned": {"dice": 0.82, "iou": 0.72, "threshold": 0.30},
              "tta_threshold_tuned": {"dice": 0.83, "iou": 0.73, "threshold": 0.45}}
    table = variants_table(result)
    assert list(table.index) == ["threshold 0.5", "threshold 0.5 + flip TTA", "threshold 0.30 (tuned on valid)",
                                 "flip TTA + threshold 0.45 (tuned on valid, with TTA)"]
    assert table.loc["flip TTA + threshold 0.45 (tuned on valid, with TTA)", "dice"] == 0.83


def test_scores_of_the_full_datasets_37_breeds_lie_as_bars_best_first_in_a_figure_of_bounded_width():
    """Side by side, 37 breeds made a figure 43 inches wide that a notebook cell shrank to
    unreadable labels; many groups lie as horizontal bars, sorted by Dice, best at the top."""
    import pandas as pd

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"dice": rng.uniform(0.7, 0.95, 37), "iou": rng.uniform(0.6, 0.9, 37),
                          "images": rng.integers(90, 100, 37)}, index=[f"breed_{i}" for i in range(37)])
    fig = viz.plot_group_scores(table, "per breed")
    width, height = fig.get_size_inches()
    assert width <= 8 and height > width
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    best_first = table.sort_values("dice", ascending=False)
    assert labels[::-1] == [f"{name} (n={n})" for name, n in zip(best_first.index, best_first["images"])]
    # a few groups stay side by side, one label and count under each pair of bars
    few = viz.plot_group_scores(table.iloc[:3], "per species")
    assert [t.get_text() for t in few.axes[0].get_xticklabels()] == [
        f"breed_{i}\n(n={table['images'].iloc[i]})" for i in range(3)]


def _history(n):
    return [dict(epoch=e, train_loss=1 / e, valid_loss=1.2 / e, valid_dice=0.9 - 0.5 / e, valid_iou=0.8 - 0.5 / e)
            for e in range(1, n + 1)]


def _visible_xticks(ax):
    ax.figure.draw_without_rendering()
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


def test_the_history_axis_runs_over_the_epochs_in_whole_numbers():
    """Frozen padded auto-ticks drew 30 epochs on an axis from -5 to 35."""
    for ax in viz.plot_history(_history(30)).axes:
        assert ax.get_xlim() == (0.5, 30.5)
        ticks = _visible_xticks(ax)
        assert all(float(t).is_integer() and 1 <= t <= 30 for t in ticks) and 4 <= len(ticks) <= 12, ticks
    assert [_visible_xticks(ax) for ax in viz.plot_history(_history(1)).axes] == [[1], [1]]


def test_the_live_plot_waits_for_its_first_epoch_and_spaces_its_ticks_to_the_planned_epochs():
    live = viz.LivePlot("unet", total_epochs=40)
    for ax in live.axes:
        assert [t.get_text() for t in ax.texts] == ["waiting for the first epoch"]
        assert not len(ax.get_yticks())                   # not an axis of -0.04 to 0.04
    live(_history(9))                                     # stopped by its time budget at 9 of 40
    for ax in live.axes:
        assert not ax.texts and ax.get_xlim() == (0.5, 40.5)
        ticks = _visible_xticks(ax)
        assert all(float(t).is_integer() for t in ticks) and len(ticks) <= 12 and max(ticks) >= 32, ticks   # not 1...9


def test_group_scores_keep_a_long_title_on_the_figure_and_the_legend_off_high_bars():
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    table = pd.DataFrame({"dice": [0.95, 0.97, 0.93], "iou": [0.91, 0.93, 0.9], "images": [51, 39, 32]},
                         index=["Abyssinian", "Bengal", "Birman"])
    fig = viz.plot_group_scores(table, "test scores per breed: " + "a-very-long-run-name-from-a-sweep_unet_img64" * 2)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    (ax,) = fig.axes
    title = ax.title.get_window_extent(renderer)
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width and title.y1 <= fig.bbox.height
    legend = (fig.legends or [ax.get_legend()])[0].get_window_extent(renderer)
    assert not any(legend.overlaps(bar.get_window_extent(renderer)) for bar in ax.patches)


def test_a_flat_threshold_sweep_looks_flat_and_its_legend_leaves_the_points_free():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    thresholds = [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]
    dice = [0.6815, 0.6835, 0.6848, 0.6855, 0.6858, 0.6865, 0.686, 0.685, 0.682]    # within 0.005
    fig = viz.plot_threshold_sweep(dict(zip(thresholds, dice)))
    (ax,) = fig.axes
    low, high = ax.get_ylim()
    assert high - low >= 0.05 and low < min(dice) and max(dice) < high     # not 0.681-0.690
    # falling from the grid's start: the longest legend, which covered the top left points
    thresholds = [0.2 + 0.05 * i for i in range(13)]
    dice = [0.72 - 0.0175 * i for i in range(13)]
    fig = viz.plot_threshold_sweep(dict(zip(thresholds, dice)))
    (ax,) = fig.axes
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    legend = (fig.legends or [ax.get_legend()])[0].get_window_extent(renderer)
    points = ax.transData.transform(np.column_stack([thresholds, dice]))
    assert not any(legend.x0 - 5 <= x <= legend.x1 + 5 and legend.y0 - 5 <= y <= legend.y1 + 5 for x, y in points)
    assert legend.x0 >= 0 and legend.x1 <= fig.bbox.width


def test_the_verdict_colours_are_the_only_colour_even_on_an_orange_photo():
    """On red and orange photos the vermillion of false pet vanished into the photo's colours:
    the verdicts are tinted over a greyscale copy."""
    from labseg.evaluate import ERROR_COLORS, error_overlay

    image = np.zeros((8, 8, 3), np.uint8)
    image[:] = (230, 110, 20)                       # orange fur, an orange blanket
    pred, truth = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    pred[:4, :4] = True                             # false pet
    pred[4:, 4:] = truth[4:, 4:] = True             # correct pet
    truth[:4, 4:] = True                            # missed pet
    out = error_overlay(image, pred, truth).astype(int)
    grey = round(0.299 * 230 + 0.587 * 110 + 0.114 * 20)
    assert (out[4:, :4] == grey).all()              # correct background: grey, no colour of its own
    for (rows, cols), verdict in [((slice(0, 4), slice(0, 4)), "false pet"), ((slice(4, 8), slice(4, 8)), "correct pet"),
                                  ((slice(0, 4), slice(4, 8)), "missed pet")]:
        expected = grey * 0.45 + np.array(ERROR_COLORS[verdict]) * 0.55
        assert np.abs(out[rows, cols] - expected).max() <= 1, verdict
