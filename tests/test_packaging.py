"""environment.yml and pyproject.toml must not drift apart: pyproject is the one dependency list.
And labseg runs where its users are: files in a known encoding, whatever the locale's."""
import re
import subprocess
import sys
import textwrap
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


def test_labseg_names_the_encoding_of_each_file_it_reads_or_writes(tmp_path):
    """Windows reads and writes text in its code page (cp1252), not UTF-8: a file labseg opens
    without naming its encoding breaks there once it holds an accent (a path, a name, a comment).
    Python's EncodingWarning (``-X warn_default_encoding``) finds each such call; the warnings
    attributed to labseg's own modules are made errors."""
    script = textwrap.dedent("""
        import sys, warnings
        from pathlib import Path
        warnings.filterwarnings("error", category=EncodingWarning, module="labseg")
        import torch
        from labseg.data import load_split
        from labseg.machine import code_version, describe
        from labseg.runs import RunDir
        from labseg.sweep import load_grid
        from labseg.synthetic import write_synthetic_dataset

        here = Path(sys.argv[1])
        for _ in range(2):      # written, then found written (its stamp read)
            data = write_synthetic_dataset(here / "Données", n_trainval_per_breed=2, n_test_per_breed=1)
        for _ in range(2):      # the cache built, then read
            load_split(data, "test", 32, here / "cache", progress=False)
        run = RunDir(here / "run")
        run.path.mkdir()
        run.write_json("eval_test.json", {"data_dir": str(data)})
        assert run.read_json("eval_test.json") == {"data_dir": str(data)}
        (here / "grid.yaml").write_text("arch: [unet]   # José's grid\\n", encoding="utf-8")
        assert load_grid(here / "grid.yaml")["arch"] == ["unet"]
        describe(torch.device("cpu"), None, False), code_version()
    """)
    done = subprocess.run([sys.executable, "-X", "warn_default_encoding", "-c", script, str(tmp_path)],
                          capture_output=True, text=True, encoding="utf-8", cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
