"""The notebooks as regression tests: nbval catches a changed output; 04_train fails early on bad input."""
import shutil
import subprocess
import sys

import pytest

from labseg.config import PROJECT_ROOT
from labseg.workbook import NotebookFailed, run_notebook

NOTEBOOKS = PROJECT_ROOT / "notebooks"


def nbval(notebook, tmp_path):
    """pytest --nbval on one notebook in isolation (no project pytest config); returns the result."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"),
         "--rootdir", str(tmp_path), "--nbval", "--nbval-current-env",
         f"--nbval-sanitize-with={NOTEBOOKS / 'nbval_sanitize.cfg'}", str(notebook)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_nbval_passes_unchanged_and_catches_a_wider_unet(tmp_path):
    source = (NOTEBOOKS / "02_unet.ipynb").read_text()
    assert 'build_model(\\"unet\\", base=64)' in source
    same = tmp_path / "same"
    same.mkdir()
    shutil.copy(NOTEBOOKS / "02_unet.ipynb", same / "02_unet.ipynb")
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "02_unet.ipynb").write_text(source.replace('base=64)', 'base=32)'))

    passed = nbval(same / "02_unet.ipynb", same)
    assert passed.returncode == 0, passed.stdout[-3000:]
    failed = nbval(changed / "02_unet.ipynb", changed)
    assert failed.returncode != 0
    assert "Cell outputs differ" in failed.stdout and "7,763,041" in failed.stdout   # UNet at base=32


@pytest.mark.parametrize("params,expected", [
    ({"arch": "nope"}, "choose one of: unet, resnet34_unet"),
    ({"extra": {"nosuch": 1}}, "unknown config key(s) ['nosuch']; valid keys: "),
])
def test_train_notebook_rejects_a_bad_config_in_its_first_cells(tmp_path, params, expected):
    out = tmp_path / "bad.ipynb"
    with pytest.raises(NotebookFailed) as e:
        run_notebook("04_train", out, {**params, "output_dir": str(tmp_path / "runs")}, progress=False)
    message = str(e.value)
    assert "ConfigError" in message and expected in message
    import nbformat

    nb = nbformat.read(out, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    failing = [i for i, c in enumerate(code) if any(o.output_type == "error" for o in c.outputs)]
    assert failing and "config = RunConfig.from_dict(" in code[failing[0]].source   # the config cell, before training
    assert not (tmp_path / "runs").exists()


def test_train_notebook_overwrites_a_run_of_its_name_when_asked(tmp_path, synthetic_root, small_net_everywhere):
    """The error for a name in use says overwrite=True; 04_train has that parameter, and it replaces
    the run while the executed notebooks in its folder stay. (Any network will do: a small one; the
    run in the way is trained here, as 04_train's fit trains it.)"""
    from labseg.train import fit

    runs = tmp_path / "runs"
    params = {"arch": small_net_everywhere, "data_dir": str(synthetic_root), "img_size": 32, "epochs": 1,
              "max_train_images": 4, "run_name": "same", "output_dir": str(runs),
              "extra": {"cache_dir": str(tmp_path / "cache")}}
    fit(**{k: v for k, v in params.items() if k != "extra"}, **params["extra"], progress=False)
    first = (runs / "same" / "summary.json").stat().st_mtime_ns
    with pytest.raises(NotebookFailed, match=r"RunExistsError.*overwrite=True"):
        run_notebook("04_train", runs / "same" / "04_train-again.ipynb", params, progress=False)
    assert (runs / "same" / "summary.json").stat().st_mtime_ns == first
    run_notebook("04_train", runs / "same" / "04_train-over.ipynb", {**params, "overwrite": True}, progress=False)
    assert (runs / "same" / "summary.json").stat().st_mtime_ns != first
    assert (runs / "same" / "04_train-again.ipynb").is_file() and (runs / "same" / "04_train-over.ipynb").is_file()


# One case per notebook and per cell that refuses, run by papermill: the wiring (the check is called,
# with the notebook's name and, where it checks values, its globals, before the notebook's work).
# The other values those checks refuse are the functions' logic, run below in this process.
@pytest.mark.parametrize("notebook,params,expected,cell", [
    # papermill injects any name and only warns on stderr: the run went on with epochs=2
    ("04_train", {"epoch": 3}, "04_train has no parameter 'epoch' (did you mean epochs?); its parameters: arch, ",
     "check_parameters("),
    # once numpy's "expected non-negative integer", and a size of 100 px cached and shown without a word
    ("01_data", {"seed": -1}, "seed=-1: expected an integer >= 0", "check_parameters("),
    ("02_unet", {"feature_size": 100}, "feature_size=100: expected a size in px divisible by 32", "check_parameters("),
    ("04_train", {"extra": '{"epochs": 3}'}, "epochs in extra={'epochs': 3} is a parameter of its own",
     "RunConfig.from_dict("),
    # papermill --inject-paths adds PAPERMILL_INPUT_PATH and PAPERMILL_OUTPUT_PATH: its own, not refused
    # (and a mistyped folder once wrote an empty report over the real one)
    ("06_report", {"PAPERMILL_INPUT_PATH": "x", "output_dir": "{tmp}/runz"}, "no runs folder {tmp}/runz",
     "existing_runs_dir("),
    # once a TypeError after the whole evaluation
    ("05_evaluate", {"n_gallery": "ten"}, "n_gallery='ten': expected a positive number of images", "check_parameters("),
    ("06_report", {"output_dir": "{tmp}", "report_dir": "{tmp}/afile"}, "is a file; expected a folder",
     "existing_runs_dir("),
])
def test_a_notebook_refuses_a_parameter_it_lacks_or_a_bad_value_before_its_work(tmp_path, notebook, params,
                                                                               expected, cell):
    import nbformat

    (tmp_path / "afile").write_text("not a folder")
    params = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in params.items()}
    out = tmp_path / "out.ipynb"
    with pytest.raises(NotebookFailed) as e:
        runs = {"output_dir": str(tmp_path / "runs")} if notebook in ("04_train", "05_evaluate", "06_report") else {}
        run_notebook(notebook, out, {**runs, **params}, progress=False)
    assert expected.replace("{tmp}", str(tmp_path)) in str(e.value)
    code = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"]
    failing = [c for c in code if any(o.output_type == "error" for o in c.outputs)]
    assert len(failing) == 1 and cell in failing[0].source
    assert not (tmp_path / "runs").exists() and (tmp_path / "afile").read_text() == "not a folder"


def _as_papermill_left_the_kernel(monkeypatch, notebook, params):
    """The kernel of ``notebook`` as papermill leaves it for the cell that checks the parameters: its
    input history (the parameters cell, then the cell papermill injects, written by papermill's own
    translator: what check_parameters reads) and the globals those two cells made."""
    import types

    import IPython
    import nbformat
    from papermill.translators import translate_parameters

    nb = nbformat.read(NOTEBOOKS / f"{notebook}.ipynb", as_version=4)
    parameters = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    injected = translate_parameters("python3", "python", params, "Parameters")
    namespace = {}
    exec(parameters + "\n" + injected, namespace)
    namespace["In"] = ["", parameters, injected]
    monkeypatch.setattr(IPython, "get_ipython", lambda: types.SimpleNamespace(user_ns=namespace))
    return namespace


@pytest.mark.parametrize("notebook,params,expected", [
    ("04_train", {"patience": 3}, "Any other RunConfig field goes in extra, e.g. -p extra"),
    ("01_data", {"imgsize": 64}, "01_data has no parameter 'imgsize' (did you mean img_size?)"),
    # 05's checkpoint parameter has the CLI's name (--checkpoint); it was `which`, as in evaluate_run
    ("05_evaluate", {"tta": False, "which": "best"},
     "05_evaluate has no parameter 'tta', 'which' (renamed checkpoint)"),
    # -1 showed 23 of 24 images
    ("05_evaluate", {"n_gallery": -1}, "n_gallery=-1: expected a positive number"),
])
def test_the_parameter_check_refuses_a_name_a_notebook_lacks_or_a_bad_value(monkeypatch, notebook, params, expected):
    """check_parameters as the notebooks call it (the papermill cases above show they do), on the
    kernel's history and globals that papermill's injection leaves."""
    from labseg.config import ConfigError
    from labseg.workbook import check_parameters

    namespace = _as_papermill_left_the_kernel(monkeypatch, notebook, params)
    with pytest.raises(ConfigError) as e:
        check_parameters(notebook, namespace)
    assert expected in str(e.value)


def test_a_mistyped_runs_folder_is_refused(tmp_path):
    """06_report's check (its papermill case above): a mistyped folder once wrote an empty report
    over the real one."""
    from labseg.workbook import existing_runs_dir

    with pytest.raises(FileNotFoundError) as e:
        existing_runs_dir(str(tmp_path / "runz"))
    assert f"no runs folder {tmp_path}/runz" in str(e.value)


def test_a_kernel_that_dies_as_it_starts_is_started_once_more(tmp_path, monkeypatch, capsys):
    """Two kernels started at once can race for a port ("Kernel died before replying to
    kernel_info", zmq's "Address already in use"): no cell has run, so the notebook is started once
    more instead of failing the run. A second such death, or any other error, is raised."""
    import papermill

    calls = []

    def flaky(source, output, **_):
        calls.append(output)
        if len(calls) == 1:
            raise RuntimeError("Kernel died before replying to kernel_info")
        (tmp_path / "out.ipynb").write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", flaky)
    assert run_notebook("01_data", tmp_path / "out.ipynb", progress=False) == tmp_path / "out.ipynb"
    assert len(calls) == 2
    assert capsys.readouterr().err == ("labseg: the kernel for 01_data died as it started (Kernel died before "
                                       "replying to kernel_info); starting it once more\n")

    def failing_with(error):
        def execute(source, output, **_):
            calls.append(output)
            raise error
        return execute

    # a death at start-up twice: started twice, then raised; any other error: raised at once
    for error, match, starts in ((OSError("zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:5555')"),
                                  "Address already in use", 2),
                                 (RuntimeError("Kernel didn't respond in 60 seconds"), "didn't respond", 1)):
        calls.clear()
        monkeypatch.setattr(papermill, "execute_notebook", failing_with(error))
        with pytest.raises(type(error), match=match):
            run_notebook("01_data", tmp_path / "out.ipynb", progress=False)
        assert len(calls) == starts


def test_a_students_copy_of_a_notebook_may_add_a_parameter_and_still_has_the_others_checked(tmp_path):
    """The names known are the project notebook's and those of the parameters cell of the copy that
    papermill runs: a parameter a student added is no unknown name, a typo still is."""
    import nbformat
    import papermill as pm

    from labseg.workbook import KERNEL_ARGS, NOTEBOOK_DIR

    nb = nbformat.read(NOTEBOOKS / "06_report.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += '\ntitle = "runs"             # a parameter of the copy only'
    copy = tmp_path / "my_report.ipynb"
    nbformat.write(nb, copy)

    def run(params):
        with pytest.raises(pm.PapermillExecutionError) as e:
            pm.execute_notebook(str(copy), str(tmp_path / "out.ipynb"), parameters=params, cwd=str(NOTEBOOK_DIR),
                                progress_bar=False, kernel_name="python3", extra_arguments=KERNEL_ARGS)
        return f"{e.value.ename}: {e.value.evalue}"

    missing = str(tmp_path / "runz")
    assert run({"title": "mine", "output_dir": missing}).startswith(f"FileNotFoundError: no runs folder {missing}")
    assert "06_report has no parameter 'titel' (did you mean title?)" in run({"titel": "mine"})


def test_parameters_are_checked_from_the_kernels_history_in_and_out_of_order(monkeypatch):
    """check_parameters reads what papermill injected from the kernel's input history (IPython's
    ``In``, given here as a kernel would hold it): a student's copy adds extra_param; its executed
    notebook is then re-run by hand, out of order (the injected cell after another cell), and the
    added parameter still counts."""
    import types

    import IPython

    from labseg.config import ConfigError
    from labseg.workbook import check_parameters

    history = [""]      # In[0], as in a kernel
    kernel = types.SimpleNamespace(user_ns={"In": history})
    monkeypatch.setattr(IPython, "get_ipython", lambda: kernel)
    # a cell of one's own that begins "# Parameters", run first, is not taken for papermill's
    history.append("# Parameters\nimg_size = 64\nextra_param = 1")
    check_parameters("01_data")
    history += ["# Parameters\nimg_size = 32\nextra_param = 2", "x = 1", "# Parameters\nimg_size = 32\nextra_param = 2"]
    check_parameters("01_data")
    history.append("# Parameters\nimgsize = 32\nx = 2")
    with pytest.raises(ConfigError, match=r"01_data has no parameter 'imgsize' \(did you mean img_size\?\), 'x'"):
        check_parameters("01_data")


def test_an_executed_notebook_replaces_a_link_at_its_path_rather_than_writing_through_it(tmp_path, monkeypatch):
    """A sweep resumes an interrupted point it finds, executed notebook and all: a link there (a
    received folder) had papermill overwrite the file it pointed to with a notebook."""
    import papermill

    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    out = tmp_path / "run" / "04_train.ipynb"
    out.parent.mkdir()
    out.symlink_to(target)
    monkeypatch.setattr(papermill, "execute_notebook", lambda source, output, **_: open(output, "w").write("{}"))
    assert run_notebook("04_train", out, progress=False) == out
    assert target.read_text() == "my notes"
    assert out.read_text() == "{}" and not out.is_symlink()


def test_05_evaluates_a_run_whose_dataset_moved_when_given_data_dir(tmp_path, synthetic_root, small_net_everywhere):
    """The error for a run whose dataset is not where it trained says to give the folder; 05 had no
    parameter to give it (a class's runs, collected from the students' machines). (Any network will
    do: a small one.)"""
    import json

    from labseg.train import fit

    shutil.copytree(synthetic_root, tmp_path / "a")
    run = fit(arch=small_net_everywhere, data_dir=str(tmp_path / "a"), img_size=32, epochs=1, max_train_images=4,
              run_name="moved", output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"),
              progress=False).run
    (tmp_path / "a").rename(tmp_path / "b")
    params = {"run": "moved", "output_dir": str(tmp_path / "runs")}
    with pytest.raises(NotebookFailed, match=r"DatasetLayoutError: run moved was trained on .*/a, and .* give its folder: .*in 05_evaluate"):
        run_notebook("05_evaluate", tmp_path / "05-no.ipynb", params, progress=False)
    run_notebook("05_evaluate", tmp_path / "05.ipynb", {**params, "data_dir": str(tmp_path / "b")}, progress=False)
    evaluation = json.loads(next(run.path.glob("eval_test*.json")).read_text())
    assert evaluation["data_dir"] == str(tmp_path / "b")


def test_a_parameter_edited_after_the_configuration_cell_stops_the_training_cell(tmp_path):
    """A student edits arch and runs only the training cell: it trained the old config, saying
    nothing. It now stops before any work, naming what changed; run as written, it trains."""
    import nbformat
    import papermill as pm

    from labseg.workbook import KERNEL_ARGS, NOTEBOOK_DIR

    nb = nbformat.read(NOTEBOOKS / "04_train.ipynb", as_version=4)
    training = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "fit(" in c.source)
    nb.cells.insert(training, nbformat.v4.new_code_cell('arch = "resnet34_unet"   # edited; the configuration cell not run'))
    nbformat.write(nb, tmp_path / "edited.ipynb")
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(tmp_path / "edited.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"output_dir": str(tmp_path / "runs")}, cwd=str(NOTEBOOK_DIR),
                            kernel_name="python3", extra_arguments=KERNEL_ARGS, progress_bar=False)
    assert ("parameters changed since the configuration cell ran: arch = 'resnet34_unet' (was 'unet'); "
            "run the configuration cell again") in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_unchanged_parameters_compare_by_value_and_type():
    import numpy as np

    from labseg.config import ConfigError
    from labseg.workbook import check_unchanged, parameters_now

    namespace = {"arch": "unet", "epochs": 2, "extra": {"ema": 0.99}, "img_size": 64, "lr": None, "other": 1}
    used = parameters_now("04_train", namespace)
    assert "other" not in used and used["extra"] is not namespace["extra"]     # a copy: edits in place show
    check_unchanged(used, namespace, "the configuration cell")
    namespace["extra"]["ema"] = 0.9
    with pytest.raises(ConfigError, match=r"extra = \{'ema': 0.9\} \(was \{'ema': 0.99\}\)"):
        check_unchanged(used, namespace, "the configuration cell")
    namespace["extra"]["ema"] = 0.99
    for edited in (2.0, True, np.array([2, 2])):      # equal to 2 (or not one bool) yet another value
        with pytest.raises(ConfigError, match="epochs = "):
            check_unchanged(used, {**namespace, "epochs": edited}, "the configuration cell")
    # a parameter the later cell reads itself (04's resume) is left out: editing it needs no rebuild
    namespace["resume"] = False
    used = parameters_now("04_train", namespace, leave_out=("resume",))
    check_unchanged(used, {**namespace, "resume": True}, "the configuration cell")
    with pytest.raises(ConfigError, match="resume = True"):
        check_unchanged(parameters_now("04_train", namespace), {**namespace, "resume": True}, "the configuration cell")
