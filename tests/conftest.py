"""Shared fixtures. Keep this small: fixtures (and what they build) only."""
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
from torch import nn

import labseg.config

REAL_DATA = Path(labseg.config.PROJECT_ROOT).parent / "shared" / "data" / "oxford-pets-3breed"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic dataset in the official layout (written once per test session)."""
    from labseg.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="session")
def real_root():
    """The real 3-breed subset beside the repo (../shared/data/oxford-pets-3breed), or skip."""
    if not (REAL_DATA / "images").is_dir() or not (REAL_DATA / "annotations").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (expected the 3-breed Oxford-IIIT Pet "
                    "subset in ../shared/data beside the repo)")
    return REAL_DATA


# --------------------------------------------------------------------------- registered networks
@contextmanager
def _registry_kept():
    """Networks and losses registered inside are gone after it (the registry is module state)."""
    from labseg import config, losses, models, recipes

    tables = (models.MODELS, recipes.RECIPES, config.ARCHS, config.ARCH_OPTIONS, losses.LOSSES, config.LOSSES)
    saved = [table.copy() for table in tables]
    try:
        yield
    finally:
        for live, old in zip(tables, saved):
            live.clear()
            live.update(old) if isinstance(live, dict) else live.extend(old)


@pytest.fixture
def registry():
    """Registrations made by a test are undone after it."""
    with _registry_kept():
        yield


class SmallNet(nn.Module):
    """A few thousand weights (labseg's own networks hold 24-31 M): a run trains, checkpoints and
    evaluates in about a second."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2))
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, x):
        return self.up(self.down(x))


def _register_small_net() -> str:
    from labseg.models import register_model

    register_model("small_net", SmallNet, recipe=dict(lr=3e-3, batch_size=4))
    return "small_net"


@pytest.fixture
def small_net():
    """``arch="small_net"`` for one test (registered through the public API, undone after it)."""
    with _registry_kept():
        yield _register_small_net()


@pytest.fixture(scope="module")
def small_net_for_module():
    """``arch="small_net"`` for the tests of one module (for module-scoped runs)."""
    with _registry_kept():
        yield _register_small_net()


@pytest.fixture
def small_net_everywhere(tmp_path_factory, monkeypatch):
    """``arch="small_net"`` in this process and in those a test starts (notebook kernels, sweeps,
    the CLI): they know it through $LABSEG_PLUGINS, as tests/test_extending.py lists a plugin, with
    a module that registers it as ``small_net`` does here."""
    plugins = tmp_path_factory.mktemp("plugins")
    (plugins / "labseg_small_net.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('labseg_tests_conftest', {str(Path(__file__))!r})\n"
        "conftest = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(conftest)\n"
        "conftest._register_small_net()\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("LABSEG_PLUGINS", ",".join(filter(None, [os.environ.get("LABSEG_PLUGINS"), "labseg_small_net"])))
    with _registry_kept():
        yield _register_small_net()
