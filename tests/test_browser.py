"""The workbook as its users meet it: JupyterLab in a real (headless) Chromium, driven by Playwright.

nbval runs the cells without a browser, so it cannot see a widget that does not render, a missing
labextension or a kernel that is not registered. These tests start the server of ``make lab``
(:func:`labseg.lab.lab_command`) on a free loopback port, serving copies of the notebooks from a
temp folder (the committed notebooks are never touched), open them with the kernel their metadata
selects ("labseg"), run all cells, move the widgets' sliders and check that what is shown changes.
Screenshots go to outputs/screenshots/.

Chromium is Debian's (``apt-get install chromium`` -> /usr/bin/chromium, or $LABSEG_CHROMIUM);
Playwright's own browser download is not used. Without Chromium the tests are skipped with the
reason (``pytest -rs`` shows it); under CI (``CI=true``) a missing Chromium fails them, unless
.ci/run says it could not install it ($LABSEG_NO_BROWSER holds why). ``-m "not browser"`` leaves
them out.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from labseg.config import PROJECT_ROOT

CHROMIUM = os.environ.get("LABSEG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = PROJECT_ROOT / "outputs" / "screenshots"
NOTEBOOKS = PROJECT_ROOT / "notebooks"
SERVER_START_TIMEOUT = 120       # s, the server answering /api/status
RUN_ALL_TIMEOUT = 300            # s, "Run All Cells" of one notebook
WIDGET_TIMEOUT = 60              # s, a slider move redrawn

# What a broken widget looks like in the copies of 01_data (the slider callback itself is broken).
BROKEN = {
    # the callback raises once the index leaves 0: the traceback lands in the widget's output
    "raises": ('_show_example = viz.show_example\n'
               'def _broken_show_example(split, index, show_mask=True):\n'
               '    if index != 0:\n'
               '        raise RuntimeError("broken dataset browser (test_browser)")\n'
               '    return _show_example(split, index, show_mask)\n'
               'viz.show_example = _broken_show_example\n'),
    # the callback runs but ignores the slider: the image never changes
    "stale": ('_show_example = viz.show_example\n'
              'viz.show_example = lambda split, index, show_mask=True: _show_example(split, 0, show_mask)\n'),
}


# --------------------------------------------------------------------------- skip or fail
def _require_browser() -> None:
    """Skip (with the reason) when there is no browser to drive; under CI fail instead, unless
    .ci/run said why it has none ($LABSEG_NO_BROWSER)."""
    why = os.environ.get("LABSEG_NO_BROWSER")
    if why:
        pytest.skip(f"browser test skipped: {why}")
    missing = None
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing = f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set LABSEG_CHROMIUM)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "Playwright for Python is not installed (pip install -e '.[test]')"
    if missing:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but {missing}; .ci/run sets LABSEG_NO_BROWSER when it cannot install Chromium")
        pytest.skip(f"browser test skipped: {missing}")


# --------------------------------------------------------------------------- the workbook copies
def _copy_notebook(name: str, dest: Path, *, widget_patch: str | None = None) -> Path:
    """``notebooks/<name>.ipynb`` without outputs and widget state (metadata, kernelspec
    included, as committed); ``widget_patch`` goes in front of the widget cell's code."""
    import nbformat

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    if widget_patch:
        cell = next(c for c in nb.cells if c.cell_type == "code" and "viz.dataset_browser(" in c.source)
        cell.source = widget_patch + cell.source
    nbformat.write(nb, dest)
    return dest


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    _require_browser()
    root = tmp_path_factory.mktemp("lab")
    served = root / "notebooks"
    served.mkdir()
    for name in ("01_data", "05_evaluate"):
        _copy_notebook(name, served / f"{name}.ipynb")
    for variant, patch in BROKEN.items():
        _copy_notebook("01_data", served / f"01_data_broken_{variant}.ipynb", widget_patch=patch)
    # JupyterLab user settings for the test only: every cell rendered (no windowing), no news toast
    settings = root / "lab-settings"
    for plugin, values in {"notebook-extension/tracker": {"windowingMode": "none"},
                           "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}
                           }.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    yield root
    # the run's checkpoints (~0.6 GB) would otherwise sit in pytest's temp folder to the session's end
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_run(workdir):
    """A one-epoch ResNet34-UNet at 32 px on 8 images of the embedded sample, for 05_evaluate."""
    from labseg.synthetic import ensure_sample
    from labseg.train import fit

    ensure_sample()
    runs = workdir / "runs"
    result = fit(arch="resnet34_unet", img_size=32, epochs=1, max_train_images=8, output_dir=str(runs),
                 progress=False)
    return result.run


# --------------------------------------------------------------------------- the server
class Lab:
    def __init__(self, port: int, token: str, root: Path, log: Path):
        self.port, self.token, self.root, self.log = port, token, root, log

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path.lstrip('/')}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def shutdown_sessions(self) -> None:
        for session in self.api("sessions"):
            self.api(f"sessions/{session['id']}", "DELETE")


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (the kernels name their connection file, which
    lies in this test's runtime dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _stop_server(proc: subprocess.Popen, runtime_dir: Path) -> list[int]:
    """Stop the server's process group (SIGTERM: Jupyter shuts its kernels down; SIGKILL after
    30 s), then kill any kernel it left behind. Returns the pids that had to be killed."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    leftovers = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leftovers = _processes_mentioning(str(runtime_dir))
        if not leftovers:
            break
        time.sleep(0.5)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftovers


@pytest.fixture(scope="module")
def lab(workdir, tiny_run):
    """``make lab``'s server (labseg.lab.lab_command) on a free 127.0.0.1 port, serving the copies;
    05_evaluate finds the tiny run through $LABSEG_RUNS_DIR. Stopped at the end, whatever happened."""
    from labseg.lab import check_kernel, free_port, lab_command

    check_kernel()            # the "labseg" kernel is registered in this environment (make install)
    token = secrets.token_hex(16)
    port = free_port(0)
    runtime = workdir / "runtime"
    env = dict(os.environ,
               LABSEG_RUNS_DIR=str(tiny_run.path.parent), LABSEG_REPORT_DIR=str(workdir / "report"),
               JUPYTER_CONFIG_DIR=str(workdir / "jupyter-config"), JUPYTER_RUNTIME_DIR=str(runtime),
               JUPYTER_DATA_DIR=str(workdir / "jupyter-data"),
               JUPYTERLAB_SETTINGS_DIR=str(workdir / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(workdir / "lab-workspaces"),
               PYTHONUNBUFFERED="1")
    log = workdir / "jupyter.log"
    server = Lab(port, token, workdir / "notebooks", log)
    with open(log, "wb") as out:
        proc = subprocess.Popen(lab_command(server.root, port, token), cwd=server.root, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    leftovers = []
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                server.api("status")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {SERVER_START_TIMEOUT}s:\n{server.log_tail()}")
                time.sleep(0.5)
        yield server
    finally:
        leftovers = _stop_server(proc, runtime)
    assert not leftovers, f"processes left after the server stopped (killed now): {leftovers}"


@pytest.fixture(scope="module")
def browser(workdir):
    """Debian's Chromium, headless, with a fresh profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            user_data_dir=str(workdir / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def screenshots():
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


# --------------------------------------------------------------------------- driving JupyterLab
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"


class WidgetCheckFailed(AssertionError):
    """The browser shows a broken notebook or widget; the message says what it shows."""


def open_notebook(browser, lab: Lab, name: str):
    """``name`` in its own JupyterLab workspace, its kernel (the one the metadata selects) idle."""
    page = browser.new_page()
    page.goto(lab.url(f"lab/workspaces/{Path(name).stem}/tree/{name}"))
    page.wait_for_selector(f"{PANEL} .jp-Notebook .jp-Cell", timeout=90_000)
    deadline = time.monotonic() + 90
    while not any(Path(s["path"]).name == name and s["kernel"]["execution_state"] == "idle"
                  for s in lab.api("sessions")):
        if page.locator(".jp-Dialog").count():             # e.g. "Select Kernel": the kernel is missing
            raise WidgetCheckFailed(f"{name}: JupyterLab asks: {page.locator('.jp-Dialog').inner_text()}")
        if time.monotonic() > deadline:
            raise WidgetCheckFailed(f"{name}: no idle kernel after 90 s; sessions: {lab.api('sessions')}")
        page.wait_for_timeout(250)
    page.wait_for_selector(f"{PANEL} .jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
    left_tab = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
    if left_tab.count():
        left_tab.first.click()                             # fold the file browser away (screenshots)
    return page


def session_kernel(lab: Lab, name: str) -> str:
    sessions = [s for s in lab.api("sessions") if Path(s["path"]).name == name]
    assert sessions, f"no kernel session for {name}: {lab.api('sessions')}"
    return sessions[0]["kernel"]["name"]


def _cell_errors(page) -> list[str]:
    """Tracebacks shown anywhere in the notebook: cell outputs and widget outputs alike."""
    texts = page.locator(f"{PANEL} .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    return [t for t in texts.all_inner_texts() if re.search(r"Traceback|Error|Exception", t)]


def run_all_cells(page, name: str, timeout: float = RUN_ALL_TIMEOUT) -> None:
    """Run > Run All Cells, wait until the kernel is done, fail on any error output or unrun cell."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item:not(.lm-mod-disabled) .lm-Menu-itemLabel",
                 has_text=re.compile(r"^Run All Cells$")).click()
    prompts = f"{PANEL} .jp-CodeCell .jp-InputArea-prompt"
    page.wait_for_function(
        """sel => [...document.querySelectorAll(sel)].some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))""",
        arg=prompts, timeout=30_000)
    page.wait_for_function(
        """([sel, panel]) => {
            const status = document.querySelector(panel + ' .jp-Notebook-ExecutionIndicator')?.dataset.status;
            return status === 'idle' && ![...document.querySelectorAll(sel)].some(p => p.textContent.includes('*'));
        }""", arg=[prompts, PANEL], timeout=timeout * 1000, polling=500)
    errors = _cell_errors(page)
    if errors:
        raise WidgetCheckFailed(f"{name}: error output after Run All Cells:\n" + "\n---\n".join(errors)[-3000:])
    unrun = [i for i, p in enumerate(page.locator(prompts).all_inner_texts()) if not re.search(r"\[\d+\]", p)]
    if unrun:
        raise WidgetCheckFailed(f"{name}: code cells {unrun} did not run (Run All Cells stopped early)")


def save_and_read(page, lab: Lab, name: str):
    """Save the notebook from the browser and read it back: the kernel's outputs as JupyterLab kept them."""
    import nbformat

    page.locator(f"{PANEL} [data-command='docmanager:save']").click()
    page.wait_for_function(
        """name => { const t = [...document.querySelectorAll('.lm-DockPanel-tabBar .lm-TabBar-tab')]
                     .find(t => t.textContent.includes(name)); return t && !t.classList.contains('jp-mod-dirty'); }""",
        arg=name, timeout=30_000)
    return nbformat.read(lab.root / name, as_version=4)


def widget_of(page, marker: str):
    """The widget shown by the code cell whose source contains ``marker``."""
    cell = page.locator(f"{PANEL} .jp-CodeCell", has_text=marker).last
    widget = cell.locator(".jp-OutputArea-output .widget-vbox").first
    try:
        widget.wait_for(state="visible", timeout=WIDGET_TIMEOUT * 1000)
    except Exception:
        shown = cell.locator(".jp-OutputArea").inner_text() if cell.locator(".jp-OutputArea").count() else ""
        raise WidgetCheckFailed(f"the widget of `{marker}` did not render in the browser "
                                f"(labextension missing?); the cell shows: {shown[:500]!r}") from None
    widget.scroll_into_view_if_needed()
    return widget


def _image_src(output) -> str | None:
    # One atomic look that never waits: the callback may clear the output between a count() and a
    # get_attribute(), which would then wait 30 s for an image that is gone (a flaky timeout).
    srcs = output.locator("img").evaluate_all("imgs => imgs.map(i => i.getAttribute('src'))")
    return srcs[0] if srcs else None


def _png(src: str) -> np.ndarray:
    from PIL import Image

    assert src.startswith("data:image/png;base64,"), src[:60]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def move_slider(page, widget, label: str, fraction: float, *, timeout: float = WIDGET_TIMEOUT) -> dict:
    """Drag the handle of the slider described ``label`` to ``fraction`` of its track, like a user,
    and wait for the widget's output to be redrawn. Returns the readouts and the image before and
    after. Raises :class:`WidgetCheckFailed` when the callback shows an error, the image disappears
    or it does not change."""
    slider = widget.locator(".widget-slider", has=page.locator(".widget-label", has_text=label))
    if not slider.count():
        raise WidgetCheckFailed(f"no slider {label!r} in the widget: {widget.inner_text()[:300]!r}")
    output = widget.locator(".widget-output")
    output.locator("img").first.wait_for(state="visible", timeout=timeout * 1000)
    readout = slider.locator(".widget-readout")
    before = {"readout": readout.inner_text().strip(), "src": _image_src(output), "shot": output.screenshot()}

    handle = slider.locator(".noUi-handle")
    track = slider.locator(".noUi-base")
    hb, tb = handle.bounding_box(), track.bounding_box()
    page.mouse.move(hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2)
    page.mouse.down()
    page.mouse.move(tb["x"] + fraction * tb["width"], tb["y"] + tb["height"] / 2, steps=8)
    page.mouse.up()
    try:
        page.wait_for_function("([el, old]) => el.textContent.trim() !== old",
                               arg=[readout.element_handle(), before["readout"]], timeout=10_000)
    except Exception:
        raise WidgetCheckFailed(f"slider {label!r} did not move (readout still {before['readout']})") from None

    # wait for the redraw: a new image, an error, or the kernel idle for 3 s with nothing new
    deadline, idle_since = time.monotonic() + timeout, None
    indicator = page.locator(f"{PANEL} .jp-Notebook-ExecutionIndicator")
    while True:
        errors = [t for t in output.locator(".jp-OutputArea-output").all_inner_texts()
                  if re.search(r"Traceback|Error|Exception", t)]
        if errors:
            raise WidgetCheckFailed(f"moving slider {label!r} to {readout.inner_text().strip()} made the widget "
                                    f"show an error:\n{errors[0][-2000:]}")
        src = _image_src(output)
        idle = indicator.get_attribute("data-status") == "idle"
        idle_since = (idle_since or time.monotonic()) if idle else None
        if src is not None and src != before["src"] and idle and time.monotonic() - idle_since > 1.0:
            break                        # redrawn, and no further update on its way
        if idle_since and time.monotonic() - idle_since > 3.0:
            what = "shows no image any more" if src is None else "still shows the same image"
            raise WidgetCheckFailed(f"moving slider {label!r} from {before['readout']} to "
                                    f"{readout.inner_text().strip()}: the widget {what}")
        if time.monotonic() > deadline:
            raise WidgetCheckFailed(f"moving slider {label!r}: no redraw within {timeout}s")
        page.wait_for_timeout(250)
    after = {"readout": readout.inner_text().strip(), "src": _image_src(output), "shot": output.screenshot()}
    if _cell_errors(page):
        raise WidgetCheckFailed(f"error output after moving slider {label!r}: {_cell_errors(page)[0][-2000:]}")
    return {"before": before, "after": after}


def check_dataset_browser(browser, lab: Lab, name: str, shots: Path | None = None) -> dict:
    """The whole check of 01_data in the browser: the labseg kernel, Run All Cells without errors,
    the dataset browser rendered, its index slider moved, the image changed."""
    page = open_notebook(browser, lab, name)
    try:
        kernel = session_kernel(lab, name)
        if kernel != "labseg":
            raise WidgetCheckFailed(f"{name} runs kernel {kernel!r}, not 'labseg'")
        kernel_label = page.locator(f"{PANEL} .jp-KernelName").inner_text().strip()
        run_all_cells(page, name)
        widget = widget_of(page, "viz.dataset_browser(")
        if shots:
            (shots / f"{Path(name).stem}_browser_before.png").write_bytes(widget.screenshot())
        try:
            moved = move_slider(page, widget, "index", 0.5)
        finally:
            if shots:
                page.screenshot(path=str(shots / f"{Path(name).stem}.png"))
                (shots / f"{Path(name).stem}_browser_after.png").write_bytes(widget.screenshot())
        if moved["before"]["shot"] == moved["after"]["shot"]:
            raise WidgetCheckFailed("the widget's output area looks the same after moving the slider")
        saved = save_and_read(page, lab, name)
        errors = [o for c in saved.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        if errors:
            raise WidgetCheckFailed(f"{name} saved with error outputs: {[e.ename for e in errors]}")
        return {"kernel_label": kernel_label, **moved}
    finally:
        page.close()
        lab.shutdown_sessions()


# --------------------------------------------------------------------------- the tests
def test_make_lab_prints_its_url_and_serves_the_labseg_kernel_on_loopback(tmp_path):
    """No browser needed: `make lab`'s command (python -m labseg.lab) finds the labseg kernel the
    notebooks select, prints the URL with its token and serves on 127.0.0.1."""
    import nbformat

    from labseg.lab import check_kernel

    check_kernel()                 # registered in this environment by the Makefile's install step
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        assert nbformat.read(path, as_version=4).metadata.kernelspec.name == "labseg", path.name
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    proc = subprocess.Popen([sys.executable, "-m", "labseg.lab", "--port", "0", "--no-browser", "--root", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        printed = "".join(proc.stdout.readline() for _ in range(2))
        match = re.search(r"open (http://127\.0\.0\.1:(\d+)/lab\?token=(\w+))", printed)
        assert match, printed
        server = Lab(int(match[2]), match[3], tmp_path, tmp_path / "none.log")
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            try:
                specs = server.api("kernelspecs")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                assert proc.poll() is None and time.monotonic() < deadline, printed + proc.stdout.read()
                time.sleep(0.5)
        assert specs["default"] == "labseg"
        assert specs["kernelspecs"]["labseg"]["spec"]["display_name"] == "Python (labseg)"
        with urllib.request.urlopen(match[1], timeout=10) as page:   # the printed URL logs in
            assert page.status == 200
    finally:
        _stop_server(proc, tmp_path / "rt")


def test_lab_with_a_root_that_is_not_a_folder_says_so_before_any_url(tmp_path):
    from labseg.lab import main

    with pytest.raises(SystemExit) as exited:
        main(["--root", str(tmp_path / "nowhere"), "--port", "0", "--no-browser"])
    assert str(exited.value) == (f"labseg lab: --root {tmp_path / 'nowhere'} is not a folder; give the folder "
                                 "to serve (default: the project's notebooks/)")


@pytest.mark.browser
def test_01_data_dataset_browser_in_jupyterlab(browser, lab, screenshots):
    result = check_dataset_browser(browser, lab, "01_data.ipynb", screenshots)
    assert result["kernel_label"] == "Python (labseg)"
    assert result["before"]["readout"] == "0" and result["after"]["readout"] != "0"
    a, b = _png(result["before"]["src"]), _png(result["after"]["src"])
    assert a.shape != b.shape or np.abs(a.astype(int) - b.astype(int)).max() > 30   # another image


@pytest.mark.browser
def test_05_evaluate_threshold_explorer_in_jupyterlab(browser, lab, tiny_run, screenshots):
    name = "05_evaluate.ipynb"
    page = open_notebook(browser, lab, name)
    try:
        assert session_kernel(lab, name) == "labseg"
        run_all_cells(page, name)
        saved = save_and_read(page, lab, name)
        printed = "".join(o.text for c in saved.cells if c.cell_type == "code" for o in c.outputs
                          if o.get("name") == "stdout")
        # 05 evaluated the run this test made (and, named by no one, says why it took that one)
        assert re.search(rf"run {re.escape(tiny_run.name)}( \([^)]*\))?:", printed), printed[:500]

        widget = widget_of(page, "viz.threshold_explorer(")
        (screenshots / "05_evaluate_explorer_before.png").write_bytes(widget.screenshot())
        moved = move_slider(page, widget, "threshold", 1.0)   # 0.50 -> the right end, 0.95
        page.screenshot(path=str(screenshots / "05_evaluate.png"))
        (screenshots / "05_evaluate_explorer_after.png").write_bytes(widget.screenshot())
    finally:
        page.close()
        lab.shutdown_sessions()

    t0, t1 = float(moved["before"]["readout"]), float(moved["after"]["readout"])
    assert (t0, t1) == (0.5, 0.95), (t0, t1)
    # the figure: truth | probabilities | prediction at the threshold, titled with its Dice
    a, b = _png(moved["before"]["src"]), _png(moved["after"]["src"])
    assert a.shape == b.shape, (a.shape, b.shape)
    changed = np.abs(a.astype(int) - b.astype(int)).sum(2) > 30
    h, w = changed.shape
    left, right = changed[:, : w // 3], changed[:, 2 * w // 3:]
    assert not left.any(), "the truth panel changed with the threshold"
    rows = np.flatnonzero(right.any(1))
    assert rows.size, "the prediction panel did not change with the threshold"
    # changes both in the panel's title (threshold and Dice) and in its overlay below it
    title_band, body = rows[rows < 0.2 * h], rows[rows >= 0.2 * h]
    assert title_band.size and body.size, f"changed rows of the prediction panel: {rows.min()}..{rows.max()} of {h}"
    # and the Dice shown in that title is the one of the new threshold: it differs from 0.5's
    from labseg import viz

    test, probs = viz.predict_split(tiny_run, "test")
    d0, d1 = viz.image_dice(probs, test, 0, t0), viz.image_dice(probs, test, 0, t1)
    assert f"{d0:.3f}" != f"{d1:.3f}", (d0, d1)


@pytest.mark.browser
@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_a_broken_slider_callback_fails_the_check(browser, lab, screenshots, variant):
    """The same check on a copy of 01_data whose slider callback is broken must fail, saying why."""
    name = f"01_data_broken_{variant}.ipynb"
    expected = {"raises": r"show an error:.*RuntimeError: broken dataset browser",
                "stale": r"still shows the same image"}[variant]
    with pytest.raises(WidgetCheckFailed, match=re.compile(expected, re.S)) as failure:
        check_dataset_browser(browser, lab, name, screenshots)
    print(f"{name}: the check failed as it should: {str(failure.value)[:300]}")
