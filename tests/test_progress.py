"""labseg.progress: the bars of training and evaluation, in a terminal and in Jupyter."""
import nbformat
from nbclient import NotebookClient
from tqdm.notebook import tqdm as notebook_tqdm
from tqdm.std import tqdm as text_tqdm

from labseg.config import PROJECT_ROOT
from labseg.progress import RunBars, pass_bar
from labseg.workbook import KERNEL_ARGS

WIDGET = "application/vnd.jupyter.widget-view+json"


def test_a_notebook_run_reuses_one_bar_of_each_kind_and_a_pass_cut_short_ends_done_not_red():
    """One bar per kind, reset for every pass (not one per epoch); each pass ends drawn at its last
    step; a pass a time budget cut short is done, not failed (a red bar that stays)."""
    bars = RunBars(True, tqdm=notebook_tqdm)
    seen = []
    for total, steps in ((5, 5), (5, 5), (3, 2)):       # the last pass cut after 2 of its 3 batches
        with bars.bar("train", total, f"epoch {len(seen) + 1}") as bar:
            for _ in range(steps):
                bar.update()
            seen.append((bar, bar.total, bar.desc))
    with bars.bar("validation", 1, "validation") as valid_bar:
        valid_bar.update()      # within tqdm's mininterval of the start: not drawn until the pass ends
    assert valid_bar.container.children[1].value == 1       # shown done until the next validation, not 0/1
    assert all(b is seen[0][0] for b, _, _ in seen) and valid_bar is not seen[0][0]
    assert [(t, d) for _, t, d in seen] == [(5, "epoch 1"), (5, "epoch 2"), (3, "epoch 3")]
    bars.close()
    _, progress, _ = seen[0][0].container.children
    assert progress.bar_style != "danger" and bars.kept == {}

    text = RunBars(True, tqdm=text_tqdm)       # a terminal: a bar for each pass, gone when it ends
    with text.bar("train", 2, "epoch 1") as first:
        first.update(2)
        shown = not first.disable
    with text.bar("train", 2, "epoch 2") as second:
        second.update()
    assert shown and second is not first and text.kept == {}


def test_a_notebook_keeps_no_bar_once_its_passes_ended(tmp_path):
    """A closed widget stays in the saved notebook, and JupyterLab shows it on reopening as "Error
    displaying widget: model not found": the bars are emptied outputs once done. A bar of a pass
    that raised stays, showing where it stopped."""
    code = (
        "from labseg.progress import RunBars, pass_bar\n"
        "bars = RunBars(True)\n"
        "for epoch in range(3):\n"
        "    with bars.bar('train', 4, f'epoch {epoch}') as bar:\n"
        "        bar.update(4)\n"
        "    with bars.bar('validation', 1, 'validation') as bar:\n"
        "        bar.update()\n"
        "bars.close()\n"
        "with pass_bar(2, 'test') as bar:\n"
        "    bar.update(2)\n"
        "print('done')\n")
    failing = ("from labseg.progress import pass_bar\n"
               "try:\n"
               "    with pass_bar(3, 'test') as bar:\n"
               "        bar.update()\n"
               "        raise RuntimeError('stop')\n"
               "except RuntimeError:\n"
               "    pass\n")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code), nbformat.v4.new_code_cell(failing)])
    NotebookClient(nb, timeout=120, kernel_name="python3", extra_arguments=KERNEL_ARGS,
                   resources={"metadata": {"path": str(PROJECT_ROOT)}}).execute()
    outputs = nb.cells[0].outputs
    shown = [o for o in outputs if o.output_type == "display_data"]
    assert len(shown) == 3                          # 2 kept for the run's 6 passes, 1 for the test pass
    assert all(WIDGET not in o.data and o.data["text/plain"] == "" for o in shown)
    assert outputs[-1].text == "done\n"
    (left,) = nb.cells[1].outputs
    assert WIDGET in left.data and "test:" in left.data["text/plain"]


def test_a_bar_in_a_terminal_closes_after_its_pass_and_a_hidden_one_draws_nothing(capsys):
    with pass_bar(3, "test", True, tqdm=text_tqdm) as bar:
        bar.update(3)
    assert "test:   0%|" in capsys.readouterr().err      # drawn, then wiped when the pass ended (leave=False)
    with pass_bar(3, "quiet", False, tqdm=text_tqdm) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_a_progress_value_other_than_true_false_or_bars_is_named_before_any_work():
    import pytest

    from labseg.config import ConfigError
    from labseg.evaluate import evaluate_run
    from labseg.progress import progress_modes
    from labseg.train import fit

    assert [progress_modes(p) for p in (True, False, "bars")] == [(True, True), (False, False), (True, False)]
    for value in (1, "yes", None):
        with pytest.raises(ConfigError, match=rf"progress={value!r}: expected True .*, False .* or \"bars\""):
            progress_modes(value)
    with pytest.raises(ConfigError, match="progress='yes'"):
        evaluate_run("no-such-run", progress="yes")         # named before the run is looked for
    with pytest.raises(ConfigError, match="progress=1"):
        fit(arch="unet", progress=1)


def test_a_bar_written_to_a_log_file_redraws_seldom_and_in_a_terminal_as_tqdm_does(capsys, monkeypatch):
    """`labseg train > log.txt 2>&1`: the log keeps the epoch lines, not a redraw at every step."""
    import sys
    import time

    def draws(pass_desc):
        with pass_bar(40, pass_desc, True, tqdm=text_tqdm) as bar:
            for _ in range(40):
                time.sleep(0.01)
                bar.update()
        return capsys.readouterr().err.count(f"{pass_desc}:")

    logged = draws("to a file")             # capsys's stderr is no terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    shown = draws("in a terminal")
    assert logged <= 2 < 3 <= shown         # drawn at its start (and wiped at its end); ~4 times at 0.1 s


def test_the_cache_bar_written_to_a_log_file_redraws_seldom_too(tmp_path, capsys):
    """Caching the full dataset before a first `labseg train > log` redrew every 0.1 s."""
    import re
    import time

    import labseg.data
    from labseg.data import load_split
    from labseg.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "data", n_trainval_per_breed=4, n_test_per_breed=1)
    real = labseg.data.load_image

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return real(*args, **kwargs)
    labseg.data.load_image = slow
    try:
        load_split(root, "trainval", 32, tmp_path / "cache", progress=True, workers=1)
    finally:
        labseg.data.load_image = real
    said = capsys.readouterr().err
    # drawn when it starts and again after each note it makes room for; at 0.1 s, every image or two
    assert "caching" in said and not re.search(r"\| *[1-9]\d*/16 ", said)
