"""environment.yml and pyproject.toml must not drift apart: pyproject is the one dependency list."""
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:     # Python 3.10 (requires-python allows it): the same parser, from PyPI
    import tomli as tomllib

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


def _distribution(requirement: str) -> str:
    """``"torch>=2.4"`` → ``"torch"``, names compared as pip does (case, ``-``/``_``/``.``)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=\[ ;]", requirement)[0]).lower()


def _third_party_imports(folder: Path) -> set[str]:
    """The top-level modules that the code under ``folder`` imports, stdlib and labseg left out."""
    import ast
    import sys

    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in ("labseg", "__future__")}


def test_pyproject_lists_what_the_code_imports():
    """Every module labseg imports is a dependency of its own (not one that happens to come with
    another), or, for the optional peer, in the bench extra."""
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_distribution(d) for d in project["dependencies"]}
    bench = {_distribution(d) for d in project["optional-dependencies"]["bench"]}
    providers = packages_distributions()
    imported = _third_party_imports(ROOT / "labseg")
    assert {"torch", "torchvision", "numpy", "PIL", "scipy", "papermill"} <= imported      # the walk works
    for module in sorted(imported):
        dists = {_distribution(d) for d in providers.get(module, [module])}
        declared = names | (bench if module == "segmentation_models_pytorch" else set())
        assert dists & declared, f"labseg imports {module} (from {sorted(dists)}): not in pyproject's dependencies"
    test = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["optional-dependencies"]["test"]}
    assert {"pytest", "nbval", "hypothesis"} <= test
    assert project["scripts"]["labseg"] == "labseg.cli:main"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme.split("## Layout")[0]
    assert re.search(r"^make test$", ci, re.M)
