"""environment.yml and pyproject.toml must not drift apart: pyproject is the one dependency list."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_installs_this_package_from_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    conda = [d for d in deps if isinstance(d, str)]
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    # conda provides only the interpreter and pip; everything else comes from pyproject.toml
    assert sorted(re.split(r"[=<>]", d)[0] for d in conda) == ["pip", "python"]
    assert pip == ["-e .[test,bench]"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"test", "bench"} <= set(extras)


def test_python_versions_agree():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    major, minor = map(int, python.split("=")[1].split(".")[:2])
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    low = tuple(map(int, requires.lstrip(">=").split(".")))
    assert (major, minor) >= low


def test_pyproject_lists_what_the_code_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    for needed in ("torch", "torchvision", "numpy", "pillow", "matplotlib", "tqdm", "ipywidgets",
                   "jupyterlab", "papermill", "pyyaml", "pandas"):
        assert needed in names, needed
    test = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["optional-dependencies"]["test"]}
    assert {"pytest", "nbval", "hypothesis"} <= test
    assert project["scripts"]["labseg"] == "labseg.cli:main"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme.split("## Layout")[0]
    assert re.search(r"^make test$", ci, re.M)
