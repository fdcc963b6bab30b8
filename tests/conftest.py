"""Shared fixtures. Keep this small: fixtures only."""
from pathlib import Path

import pytest

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
