"""Progress bars: tqdm's, in a terminal and in Jupyter, that a saved notebook does not keep.

In Jupyter tqdm draws a widget. A widget closed when its pass ends stays in the notebook: hidden
while the kernel lives, but a notebook saved from JupyterLab and opened again shows each one as
"Error displaying widget: model not found", and an untrusted one as its first text, "0%". So a bar
here is shown through an IPython display handle and replaced by an empty output when it closes:
nothing of it is saved. (nbval sees the display message, not the update: notebooks/nbval_sanitize.cfg
makes a bar's text compare as the empty output the saved notebook holds.)

Written to a file (``labseg train ... > log.txt 2>&1``, a batch job's log), a bar redraws at most
every ``LOG_INTERVAL`` seconds: at every step it filled a 25-minute run's log with ~6000 redrawn
lines around its epoch lines, and a `tail -f` of a long epoch still moves.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

LOG_INTERVAL = 30.0     # seconds between a bar's redraws where stderr is not a terminal


def progress_modes(progress) -> tuple[bool, bool]:
    """``(bars, lines)`` for the ``progress`` argument of ``fit`` and ``evaluate_run``: True, bars
    and printed lines (the CLI); ``"bars"``, the bars alone (the notebooks); False, neither."""
    from labseg.config import ConfigError

    if isinstance(progress, bool):
        return progress, progress
    if isinstance(progress, str) and progress == "bars":
        return True, False
    raise ConfigError(f"progress={progress!r}: expected True (bars and printed lines), False (quiet) or "
                      '"bars" (the bars alone: a notebook, whose outputs show the rest)')


def _auto_tqdm():
    from tqdm.auto import tqdm      # widgets in Jupyter, text elsewhere

    return tqdm


def _is_widget(tqdm) -> bool:
    return any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)


def _open(tqdm, total: int, desc: str, show: bool):
    """A bar and, in Jupyter, the display handle it is shown through (else None)."""
    if show and _is_widget(tqdm):
        from IPython.display import display

        bar = tqdm(total=total, desc=desc, leave=False, display=False)
        return bar, display(bar.container, display_id=True)
    return tqdm(total=total, desc=desc, leave=False, disable=not show, **redraws(tqdm)), None


def redraws(tqdm) -> dict:
    """tqdm's options for how often a bar redraws: as tqdm does in Jupyter and in a terminal, at most
    every ``LOG_INTERVAL`` seconds where a text bar goes to a file."""
    return {} if _is_widget(tqdm) or _a_terminal() else {"mininterval": LOG_INTERVAL}


def _a_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):        # replaced by an object without it, or closed
        return False


def _done(bar, handle) -> None:
    """A pass ended, maybe before its last batch (a time budget): done, not failed (in Jupyter a bar
    closed short of its total turns red), and gone."""
    bar.total = min(bar.total or 0, bar.n)
    bar.close()
    if handle is not None:
        handle.update({"text/plain": ""}, raw=True)


@contextmanager
def pass_bar(total: int, desc: str, show: bool = True, tqdm=None):
    """The bar of one pass over ``total`` batches, gone when the pass ends. Not on an exception:
    an interrupted pass shows where it stopped."""
    bar, handle = _open(tqdm or _auto_tqdm(), total, desc, show)
    yield bar
    _done(bar, handle)


class RunBars:
    """The bars of a training run's passes, "train" and "validation". In a terminal each pass gets
    a bar of its own (the epoch line printed after it stays). In Jupyter one bar of each kind is
    reset for every pass, under the live plot, and both go when the run ends."""

    def __init__(self, show: bool, tqdm=None):
        self.tqdm, self.show = tqdm or _auto_tqdm(), show
        self.reuse = show and _is_widget(self.tqdm)
        self.kept: dict = {}        # kind -> (bar, display handle)

    @contextmanager
    def bar(self, kind: str, total: int, desc: str):
        if not self.reuse:
            with pass_bar(total, desc, self.show, self.tqdm) as bar:
                yield bar
            return
        if kind not in self.kept:
            self.kept[kind] = _open(self.tqdm, total, desc, True)
            bar = self.kept[kind][0]
        else:
            bar = self.kept[kind][0]
            bar.set_description_str(desc, refresh=False)     # before the reset, which draws the bar
            bar.set_postfix_str("", refresh=False)
            bar.reset(total=total)
        yield bar
        bar.refresh()       # its last step, which tqdm draws only mininterval after the one before

    def close(self) -> None:
        """The run ended (not on an exception): its bars are done, and gone."""
        for bar, handle in self.kept.values():
            _done(bar, handle)
        self.kept.clear()
