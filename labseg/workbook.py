"""Run the workbook's notebooks with papermill: one notebook, one training run, or all of them.

    run_notebook("01_data", out, params)        execute one notebook of notebooks/ into ``out``
    run_training_notebook(params)              04_train into its own run folder -> the folder
    run_workbook(epochs=3, img_size=64)        01 → 06 on the embedded sample -> report.md

Where runs and the report go: the notebooks' ``output_dir`` / ``report_dir`` parameters; left at
``None`` they are ``outputs/runs`` and ``outputs/report``, or ``$LABSEG_RUNS_DIR`` and
``$LABSEG_REPORT_DIR`` when set (the nbval tests set them to keep their runs apart from yours).
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import sys
import traceback
from pathlib import Path

from labseg.config import PROJECT_ROOT, check_folder, parse_extra, resolve_path
from labseg.runs import RunDir, RunExistsError, atomic_write_json, empty_folder, folder_contents, refuse_link

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
NOTEBOOKS = ("01_data", "02_unet", "03_resnet34_unet", "04_train", "05_evaluate", "06_report")
# Parameters of 04_train's `parameters` cell; any other RunConfig field goes through `extra`.
TRAIN_PARAMS = ("arch", "data_dir", "img_size", "epochs", "batch_size", "lr", "optimizer", "scheduler", "loss",
                "augment", "seed", "run_name", "device", "time_budget", "max_train_images", "output_dir", "extra",
                "resume", "overwrite")
NOT_CONFIG = ("extra", "output_dir", "run_name", "resume", "overwrite")     # the rest are RunConfig fields


class NotebookFailed(RuntimeError):
    """A notebook raised; the message is the error of the failing cell, ``ename`` its type's name."""

    def __init__(self, message: str, ename: str | None = None):
        super().__init__(message)
        self.ename = ename


def runs_dir(output_dir: str | Path | None = None) -> str:
    """The runs folder: ``output_dir``, else ``$LABSEG_RUNS_DIR``, else ``outputs/runs``."""
    return str(output_dir or os.environ.get("LABSEG_RUNS_DIR") or "outputs/runs")


def existing_runs_dir(output_dir: str | Path | None = None) -> str:
    """:func:`runs_dir`, refused when it is not a folder: a report of a mistyped folder would be an
    empty one, written over the report of the real runs."""
    runs = runs_dir(output_dir)
    if not resolve_path(runs).is_dir():
        raise FileNotFoundError(f"no runs folder {resolve_path(runs)}; train a run first (labseg train, "
                                "04_train) or give the folder the runs are in (output_dir, --output-dir)")
    return runs


def report_dir(path: str | Path | None = None) -> str:
    """The report folder: ``path``, else ``$LABSEG_REPORT_DIR``, else ``outputs/report``; refused
    when that is a file (found before the report's figures are made, not when they are written)."""
    folder = str(path or os.environ.get("LABSEG_REPORT_DIR") or "outputs/report")
    check_folder("report_dir", folder)
    return folder


def check_parameters(notebook: str, namespace: dict | None = None) -> None:
    """In a notebook that papermill runs: refuse a parameter its ``parameters`` cell lacks.

    papermill injects whatever it is given (``-p epoch 3``) and only warns on stderr, so the run
    would go on with the default. The names given are read from the cell papermill injected (its
    source begins ``# Parameters``), found in the kernel's input history; a notebook run by hand
    has none, and only the values in ``namespace`` are checked (see ``_VALUE_CHECKS``). Known are
    the parameters of ``notebooks/<notebook>.ipynb`` and those of the cell run just before the
    first injected one: papermill runs the notebook's parameters cell, then the cell it injects
    (never the first input: a cell of one's own that begins "# Parameters" is not taken for it),
    so a student's copy may add parameters, also when its executed notebook is re-run by hand.
    """
    import difflib

    from IPython import get_ipython

    from labseg.config import ConfigError

    ip = get_ipython()
    history = list(ip.user_ns.get("In", [])) if ip else []
    injected = [i for i, source in enumerate(history) if i >= 2 and source.startswith("# Parameters\n")]
    known = [k for k, _ in _notebook_parameters(notebook)]
    given = set()
    if injected:
        given = {n for n in _assigned(history[injected[-1]]) if not n.startswith("PAPERMILL_")}   # --inject-paths
        known = list(dict.fromkeys([*known, *_assigned(history[injected[0] - 1])]))
    if unknown := sorted(given - set(known)):
        renamed = _RENAMED.get(notebook, {})
        said = ", ".join(f"{name!r} (renamed {renamed[name]})" if name in renamed else
                         f"{name!r} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known, n=1))
                         else repr(name) for name in unknown)
        other = (" Any other RunConfig field goes in extra, e.g. -p extra '{\"patience\": 5}'."
                 if notebook == "04_train" else "")
        raise ConfigError(f"{notebook} has no parameter {said}; its parameters: {', '.join(known)}.{other}")
    for name, (expected, ok) in _VALUE_CHECKS.get(notebook, {}).items():
        if namespace is not None and name in namespace and not ok(namespace[name]):
            raise ConfigError(f"{name}={namespace[name]!r}: expected {expected}")


def parameters_now(notebook: str, namespace: dict, leave_out: tuple[str, ...] = ()) -> dict:
    """The values ``notebook``'s parameters have in ``namespace`` now: taken by the cell that builds
    from them, for :func:`check_unchanged` in the cell that then uses what it built. ``leave_out``:
    the parameters that the later cells read themselves (04's resume, 05's n_gallery)."""
    import copy

    return {name: copy.deepcopy(namespace[name]) for name, _ in _notebook_parameters(notebook)
            if name in namespace and name not in leave_out}


def check_unchanged(used: dict, namespace: dict, cell: str) -> None:
    """Refuse to go on when a parameter in ``namespace`` differs from ``used`` (:func:`parameters_now`):
    a student who edits the parameters cell and runs only the cell below would otherwise get what
    ``cell`` (the cell that built from them) made of the old values, told nothing."""
    from labseg.config import ConfigError

    def same(a, b) -> bool:
        try:
            return type(a) is type(b) and bool(a == b)
        except (TypeError, ValueError):     # values that do not compare to one bool (arrays)
            return a is b

    if changed := [f"{k} = {namespace[k]!r} (was {v!r})" for k, v in used.items()
                   if k in namespace and not same(namespace[k], v)]:
        raise ConfigError(f"parameters changed since {cell} ran: {', '.join(changed)}; run {cell} again, then this one")


def _assigned(source: str) -> list[str]:
    """The names a cell's top-level assignments bind, in order ([] for a cell that is not Python)."""
    import ast

    try:
        body = ast.parse(source).body
    except SyntaxError:
        return []
    return [t.id for node in body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]


# Parameters renamed since a recorded papermill command may have used them: the new name is given.
_RENAMED = {"05_evaluate": {"which": "checkpoint"}}


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_size(v) -> bool:
    from labseg.config import ConfigError, check_img_size

    try:
        check_img_size(v)
    except ConfigError:
        return False
    return True


# Notebook parameters that no function checks before the notebook's long work (04_train's are
# RunConfig's, checked before training; 05's run and checkpoint before the evaluation).
_SIZE = ("a size in px divisible by 32, e.g. 64", _is_size)
_VALUE_CHECKS = {
    "01_data": {"img_size": _SIZE, "seed": ("an integer >= 0", _is_count)},
    "02_unet": {"img_size": _SIZE, "feature_size": _SIZE},
    "03_resnet34_unet": {"img_size": _SIZE, "feature_size": _SIZE},
    "05_evaluate": {"n_gallery": ("a positive number of images", lambda v: _is_count(v) and v > 0)},
}


def notebook_path(name: str) -> Path:
    path = NOTEBOOK_DIR / (name if name.endswith(".ipynb") else name + ".ipynb")
    if not path.is_file():
        raise FileNotFoundError(f"notebook {path} does not exist; notebooks: {', '.join(NOTEBOOKS)}")
    return path


# The kernel's own log is silenced: ipykernel >= 7 warns about unencrypted TCP on every start,
# though the kernel listens on 127.0.0.1 for this process alone (local "ipc" sockets would avoid
# it, but leave socket files in the working folder that concurrent runs share), and when Ctrl-C
# or SIGTERM stops a run, nbclient closes the kernel's sockets while it is still replying, which
# it logs as a zmq traceback. What a notebook's cells raise reaches us in the notebook itself.
KERNEL_ARGS = ["--IPKernelApp.log_level=CRITICAL"]


class _NoDeadKernelNoise(logging.Filter):
    """Drop asyncio's "Task exception was never retrieved: DeadKernelError", which follows every
    interrupted notebook: nbclient kills the kernel it owns on Ctrl-C and leaves the cell's task
    to fail unobserved. The interrupt itself is reported (labseg.cli)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        # older nbclient/jupyter_client leave the cell's task pending instead: the same, said otherwise
        pending = message.startswith("Task was destroyed but it is pending") and "nbclient" in message
        return "DeadKernelError" not in message and not pending and not (
            record.exc_info and type(record.exc_info[1]).__name__ == "DeadKernelError")


_asyncio_log = logging.getLogger("asyncio")
if not any(isinstance(f, _NoDeadKernelNoise) for f in _asyncio_log.filters):
    _asyncio_log.addFilter(_NoDeadKernelNoise())


def run_notebook(name: str, output: str | Path, params: dict | None = None, *, progress: bool = True,
                 timeout: int | None = None) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with papermill into ``output`` (its folder is created).

    The kernel runs in ``notebooks/``, exactly as when a person opens the notebook. Raises
    :class:`NotebookFailed` naming the failing cell's error; the partly executed notebook stays
    at ``output`` for inspection. A link at ``output`` is replaced, not written through.
    """
    import papermill as pm

    output = Path(output).expanduser()
    if output.is_symlink():     # left in a run folder from someone's archive, it may point anywhere
        output.unlink()
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)     # papermill does not create it
    for attempt in (1, 2):
        try:
            pm.execute_notebook(str(notebook_path(name)), str(output), parameters=params or {},
                                cwd=str(NOTEBOOK_DIR), progress_bar=progress, execution_timeout=timeout,
                                kernel_name="python3", extra_arguments=KERNEL_ARGS)
            return output
        except pm.PapermillExecutionError as e:
            raise NotebookFailed(f"{name} failed in cell {e.exec_count}: {e.ename}: {e.evalue} "
                                 f"(executed notebook: {output})", ename=e.ename) from None
        except Exception as e:
            if attempt == 2 or not any(text in str(e) for text in KERNEL_START_FAILURES):
                raise
            print(f"labseg: the kernel for {name} died as it started ({_first_line(e)}); starting it once more",
                  file=sys.stderr, flush=True)
    return output


# A kernel that dies as it starts, before any cell ran (two kernels started at once can race for
# a port): safe to start once more. A kernel that dies later may have run cells: not retried.
KERNEL_START_FAILURES = ("Kernel died before replying to kernel_info", "Address already in use")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


@functools.lru_cache(maxsize=None)
def _notebook_parameters(name: str) -> tuple:
    """(name, default) of each parameter of a notebook's ``parameters`` cell, as papermill reads it."""
    import ast

    import papermill as pm

    found = pm.inspect_notebook(str(notebook_path(name)))
    return tuple((k, ast.literal_eval(v["default"])) for k, v in found.items())


def train_notebook_defaults() -> dict:
    """The RunConfig values of 04_train's parameters cell (papermill reads it): what a run through
    the notebook (a sweep point) has where it says nothing. They differ from ``labseg train``'s
    (unet at 64 px for 2 epochs, not the recipe's resnet34_unet at 128 px), and a None there is
    the recipe's value."""
    return {k: v for k, v in _notebook_parameters("04_train")
            if v is not None and k not in NOT_CONFIG}


def _clean_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def default_run_name(params: dict) -> str:
    """The run name 04_train would pick (labseg.runs.run_name_for), or one from the raw parameters."""
    from labseg.config import RunConfig
    from labseg.runs import run_name_for

    known = {**train_notebook_defaults(), **{k: v for k, v in params.items()
                                             if k in TRAIN_PARAMS and k not in NOT_CONFIG}}
    try:
        return run_name_for(RunConfig(**known, **(params.get("extra") or {})).with_recipe())
    except Exception:                      # an invalid value: the notebook will say which
        return _clean_name("-".join(f"{k}={v}" for k, v in sorted(known.items()))) or "run"


def free_run_folder(output_dir: str | Path, name: str) -> Path:
    """``output_dir/name``, or ``name-2``, ``name-3``... if that one already holds a run."""
    root = resolve_path(output_dir)
    for i in range(1, 10_000):
        folder = root / (name if i == 1 else f"{name}-{i}")
        if not folder.is_symlink() and (not folder.exists() or not any(folder.iterdir())):
            return folder
    raise FileExistsError(f"no free run folder next to {root / name}")


def run_training_notebook(params: dict, *, output_dir: str | Path | None = None, name: str | None = None,
                          exact: bool = False, progress: bool = True, raise_on_error: bool = True) -> Path:
    """Train through ``04_train`` with papermill; the executed notebook lands in the run folder.

    ``params`` are the notebook's parameters (unknown RunConfig fields go into ``extra``). The run
    is named ``name``, or ``params['run_name']``, or from the parameters; a folder that already
    holds a run gets a ``-2`` suffix, unless ``exact``: then a run interrupted there (a checkpoint,
    no summary) is resumed, and anything else in that folder is deleted first.
    A failed run leaves ``failed.json`` (error and parameters) in its folder; with
    ``raise_on_error`` the error is raised too. Returns the run folder.

    A run that another process is training (its ``.training`` lock held, before this run starts
    or by the time it fails) is left as it is, with no failed.json: a RunExistsError is raised,
    whatever ``raise_on_error``.
    """
    params = dict(params)
    extra = dict(parse_extra(params.pop("extra", None)))
    for key in [k for k in params if k not in TRAIN_PARAMS]:
        extra[key] = params.pop(key)
    if extra:
        params["extra"] = extra
    root = resolve_path(runs_dir(output_dir or params.get("output_dir")))
    name = _clean_name(str(name or params.get("run_name") or default_run_name(params)))
    folder = root / name if exact else free_run_folder(root, name)
    if not RunDir(folder).resumable():
        refuse_link(folder)     # a link to a run of one's own elsewhere is resumed; to anything else, refused
    if exact and folder.is_dir():
        # Decided and deleted under the run's training lock: a folder that another process trains
        # now (a sweep in a second terminal, a resume by hand) is neither resumed nor deleted here.
        try:
            with RunDir(folder).lock_for_training():
                _resume_or_empty(folder, params, progress)
        except RunExistsError:
            raise _trained_elsewhere(folder) from None
    folder.mkdir(parents=True, exist_ok=True)
    params.update(run_name=folder.name, output_dir=str(root))
    try:
        run_notebook("04_train", folder / "04_train.ipynb", params, progress=progress)
    except Exception as e:
        # This process emptied the folder (or resumes its own run), so a RunExistsError from fit means
        # another process took the run meanwhile (and may have finished it since): not this one's to
        # mark failed (a failed.json there makes a good run read as failed, and evaluate refuse it).
        if RunDir(folder).is_training() or (isinstance(e, NotebookFailed) and e.ename == "RunExistsError"):
            raise _trained_elsewhere(folder) from None
        atomic_write_json(folder / "failed.json", {
            "error": f"{type(e).__name__}: {e}" if not isinstance(e, NotebookFailed) else str(e),
            "params": params, "traceback": traceback.format_exc(limit=3)})
        if raise_on_error:
            raise
    return folder


def _resume_or_empty(folder: Path, params: dict, progress: bool) -> None:
    """A run interrupted in ``folder`` is resumed (``params["resume"]``); anything else there goes."""
    if RunDir(folder).resumable():    # unfinished as the sweep judges it (sweep.is_finished): resumed, never deleted
        params["resume"] = True         # nothing lost: the epochs it had are kept
        return
    if progress and (lost := folder_contents(folder, keep=".training")):
        print(f"labseg: replacing {folder}: deleting its {lost}", flush=True)
    empty_folder(folder, keep=".training")     # the lock held on it must stay the run's one lock


def _trained_elsewhere(folder: Path) -> RunExistsError:
    return RunExistsError(f"run {folder} is being trained by another process now (or was, meanwhile); it was "
                          "left as it is: run this again once that process has finished (or stop it)")


def run_workbook(epochs: int = 3, img_size: int = 64, *, data_dir: str = "data/sample",
                 archs=("unet", "resnet34_unet"), output_dir: str | None = None, report: str | None = None,
                 notebooks_out: str = "outputs/notebooks", progress: bool = True) -> Path:
    """The whole workbook on ``data_dir`` (default: the embedded sample, written if missing).

    01–03 → ``outputs/notebooks/``; 04 and then 05 once per network, their executed notebooks in
    the run's folder; 06 over every run. Returns ``outputs/report/report.md``.
    """
    from labseg.config import ConfigError, check_img_size
    from labseg.runs import RunDir

    # Checked before 01-03 run (a minute): a bad value would otherwise surface only in 04_train.
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs <= 0:
        raise ConfigError(f"epochs={epochs!r}: expected a positive integer")
    check_img_size(img_size)
    if data_dir == "data/sample":
        from labseg.synthetic import ensure_sample

        ensure_sample()
    out = resolve_path(notebooks_out)
    runs = runs_dir(output_dir)
    rep = report_dir(report)
    data_params = {"data_dir": data_dir, "img_size": img_size}
    for name in ("01_data", "02_unet", "03_resnet34_unet"):
        _say(progress, f"labseg demo: {name}")
        run_notebook(name, out / f"{name}.ipynb", data_params if name == "01_data" else {"img_size": img_size},
                     progress=progress)
    trained = []
    for arch in archs:
        _say(progress, f"labseg demo: 04_train, {arch}, {epochs} epochs at {img_size}px")
        folder = run_training_notebook({"arch": arch, "epochs": epochs, **data_params}, output_dir=runs,
                                       progress=progress)
        trained.append(RunDir(folder))
    for run in trained:   # each run's test scores, so that the report can compare the networks
        _say(progress, f"labseg demo: 05_evaluate on {run.name}")
        run_notebook("05_evaluate", run.path / "05_evaluate.ipynb", {"run": str(run.path), "output_dir": runs},
                     progress=progress)
    _say(progress, "labseg demo: 06_report")
    run_notebook("06_report", out / "06_report.ipynb", {"output_dir": runs, "report_dir": rep}, progress=progress)
    return resolve_path(rep) / "report.md"


def _say(on: bool, text: str) -> None:
    if on:
        print(text, flush=True)


def refresh_notebook_outputs(names=NOTEBOOKS, timeout: int = 900) -> None:
    """Re-execute the committed notebooks in place, in order, as nbval will (the reference outputs).

    Runs and report go to ``outputs/nbval/`` (emptied first when 04_train is among ``names``),
    exactly like ``notebooks/conftest.py`` arranges under pytest. Run after changing a notebook
    or anything whose printed output it checks:
    ``python -c "from labseg.workbook import refresh_notebook_outputs as r; r()"``.
    """
    import nbformat
    from nbclient import NotebookClient

    nbval_dir = PROJECT_ROOT / "outputs" / "nbval"
    if "04_train" in names:
        shutil.rmtree(nbval_dir, ignore_errors=True)
    saved = {k: os.environ.get(k) for k in ("LABSEG_RUNS_DIR", "LABSEG_REPORT_DIR")}
    os.environ.update(LABSEG_RUNS_DIR=str(nbval_dir / "runs"), LABSEG_REPORT_DIR=str(nbval_dir / "report"))
    try:
        for name in names:
            path = notebook_path(name)
            nb = nbformat.read(path, as_version=4)
            NotebookClient(nb, timeout=timeout, kernel_name="python3", extra_arguments=KERNEL_ARGS,
                           resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
            nbformat.write(nb, path)
            print(f"refreshed {path.name}", flush=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
