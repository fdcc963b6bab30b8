"""nbval runs the notebooks in file order (01 → 06) in one pytest session: 04 trains, 05 and 06 read
that run. Their runs and report go to outputs/nbval/, emptied once per session, so the checked
outputs do not depend on the runs you have under outputs/runs (the notebooks' defaults read
$LABSEG_RUNS_DIR and $LABSEG_REPORT_DIR through labseg.workbook)."""
import os
import shutil

from labseg.config import PROJECT_ROOT

NBVAL_OUTPUTS = PROJECT_ROOT / "outputs" / "nbval"


def pytest_configure(config):
    if getattr(config.option, "nbval", False) or getattr(config.option, "nbval_lax", False):
        shutil.rmtree(NBVAL_OUTPUTS, ignore_errors=True)
        os.environ["LABSEG_RUNS_DIR"] = str(NBVAL_OUTPUTS / "runs")
        os.environ["LABSEG_REPORT_DIR"] = str(NBVAL_OUTPUTS / "report")
