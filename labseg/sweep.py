"""Parameter sweeps: a grid of 04_train runs through papermill, one run folder per point.

    grid = load_grid("sweep.yaml")                  # {arch: [unet, resnet34_unet], lr: [1e-3, 3e-4], epochs: 2}
    grid = parse_sets(["arch=unet,resnet34_unet", "lr=1e-3"])
    results = run_sweep(grid)                       # list of {run, status, params, ...}

Each point is named from its parameters (``arch=unet+epochs=2+lr=0.001``), so running the same
sweep again skips the points that finished (``force=True`` redoes them) and retries the ones
that failed. Every point's configuration is validated before the first run; a point that fails
while training leaves ``failed.json`` in its folder and the sweep goes on. A point that another
process is training now (its run's ``.training`` lock held) is skipped and left as it is.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path

from labseg.config import NONE_IS_A_CHOICE, PATH_FIELDS, check_folder, resolve_path
from labseg.runs import LinkedRunFolderError, RunDir, RunExistsError

# A point whose folder another process is training now: skipped, neither failed nor deleted. The
# sweep's exit status does not count it (nothing failed); run the sweep again once it finishes.
BUSY = "being trained by another process (skipped)"


class SweepError(ValueError):
    """The grid is malformed (not a mapping, an empty list, a --set without '=')."""


def coerce(value, key: str | None = None):
    """'1e-3' -> 0.001, '64' -> 64, 'null'/'~' -> None (the recipe's value), 'true' -> True; other
    text stays. 'none' is the value "none" for a field that has it (augment=none: no augmentation,
    ``config.NONE_IS_A_CHOICE``), else None. An empty value is an error (``lr=1e-3,,3e-4``)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    low = text.lower()
    if not text:
        raise SweepError(f"{key or 'a parameter'}: an empty value (two commas in a row, or one at the end); "
                         "write null for the recipe's value")
    if low == "none" and key in NONE_IS_A_CHOICE:
        return "none"
    if low in ("none", "null", "~"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _as_list(key, value) -> list:
    """One value, or an iterable of them (a list, ``range(3)``, ``np.logspace(...)``), as a list."""
    if getattr(value, "ndim", 1) > 1:
        raise SweepError(f"{key}: an array of {value.ndim} dimensions; expected one value or a list of them")
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__") or getattr(value, "ndim", 1) == 0:
        value = [value]
    values = [v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v for v in value]
    if not values:
        raise SweepError(f"{key}: empty list of values")
    return [coerce(v, str(key).strip()) for v in values]


def load_grid(path: str | Path) -> dict[str, list]:
    """A YAML mapping of parameter -> value or list of values."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"grid file {path} " + ("is a folder; expected a YAML file such as grid.yaml"
                                                if path.is_dir() else "does not exist"))
    try:
        data = yaml.safe_load(path.read_bytes())     # bytes: YAML is UTF-8 (or -16 with a BOM), whatever the locale
    except yaml.YAMLError as e:
        raise SweepError(f"{path} is not valid YAML ({e.__class__.__name__}, {getattr(e, 'problem', '') or e}); "
                         "expected a mapping such as {arch: [unet, resnet34_unet], lr: [1e-3, 3e-4]}") from None
    if not isinstance(data, dict) or not data:
        raise SweepError(f"{path}: expected a mapping such as {{arch: [unet, resnet34_unet], lr: [1e-3, 3e-4]}}")
    return {str(k): _as_list(k, v) for k, v in data.items()}


def parse_sets(items: list[str]) -> dict[str, list]:
    """``["arch=unet,resnet34_unet", "lr=1e-3"]`` -> ``{"arch": ["unet", "resnet34_unet"], "lr": [0.001]}``."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise SweepError(f"--set {item!r}: expected NAME=VALUE[,VALUE...], e.g. lr=1e-3,3e-4")
        key, _, values = item.partition("=")
        if key.strip() in grid:
            raise SweepError(f"--set {key.strip()} is given twice; give its values once, e.g. "
                             f"{key.strip()}=V1,V2")
        grid[key.strip()] = _as_list(key, values.split(","))
    return grid


def expand(grid: dict[str, list]) -> list[dict]:
    """Every combination, in the grid's key order (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


MAX_NAME = 200      # characters of a point's folder name, below the 255 bytes of most file systems


def point_name(params: dict, prefix: str | None = None, whole_paths: bool = False,
               limit: int | None = MAX_NAME) -> str:
    """A run name from the parameters: ``arch=unet+epochs=2+lr=0.001`` (keys sorted). A folder
    is named by its last part (``data_dir=oxford-pets-3breed``), not its whole path: two folders of
    one name in one grid are named whole by :func:`point_names`, and a finished run of another
    sweep under the same name is told apart by :func:`recorded_differs`. ``limit=None``: the
    names of sweeps before session 35, never cut."""
    def fmt(k, v):
        if k in PATH_FIELDS and isinstance(v, (str, Path)) and Path(str(v)).name and not whole_paths:
            return Path(str(v)).name
        return f"{v:g}" if isinstance(v, float) else str(v)

    name = "+".join(f"{k}={fmt(k, v)}" for k, v in sorted(params.items()) if k not in ("run_name",))
    # the folder's own name, prefix included: a rerun finds the point it finished
    name = re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{prefix}+{name}" if prefix else name)
    if limit and len(name) > limit:    # file systems stop at 255 bytes: the start, and a digest of the whole
        name = f"{name[:limit - 9]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def point_names(points: list[dict], prefix: str | None = None) -> list[str]:
    """Each point's name; points that the short names would merge (two data folders of one name,
    ``/a/pets`` and ``/b/pets``) are named with their whole paths instead."""
    short = [point_name(p, prefix) for p in points]
    return [point_name(p, prefix, whole_paths=True) if short.count(name) > 1 else name
            for p, name in zip(points, short)]


def _fields(params: dict) -> dict:
    """The RunConfig fields a point sets: its parameters, with ``extra``'s spread among them."""
    from labseg.config import parse_extra

    return {**{k: v for k, v in params.items() if k != "extra"}, **parse_extra(params.get("extra"))}


def point_config(params: dict):
    """The configuration 04_train trains a point with: its parameters over the notebook's defaults,
    the rest from the network's recipe (not validated)."""
    from labseg.config import RunConfig
    from labseg.workbook import train_notebook_defaults

    return RunConfig.from_dict({**train_notebook_defaults(), **_fields(params)}).with_recipe()


def check_points(points: list[dict]) -> None:
    """Validate every point's configuration before the first run starts.

    A value that can never train (an unknown arch, ``drop_path`` on unet, a misspelt key) stops
    the sweep now, with every such point named, rather than as a failed run hours in. Failures
    that only training finds (a missing dataset, a diverging run) still fail their point alone.
    """
    bad = []
    for params in points:
        try:
            point_config(params).validate()
        except (ValueError, TypeError) as e:
            bad.append(f"  {point_name(params)}: {e}")
    if bad:
        raise SweepError(f"{len(bad)} of {len(points)} sweep points are invalid; nothing was run:\n" + "\n".join(bad))


def is_finished(folder: Path) -> bool:
    return "best_valid_dice" in (RunDir(folder).read_summary() or {}) and not (folder / "failed.json").exists()


# Settings that change where a run reads and writes or how fast it goes, not what it learns; a
# run records the device it resolved ("cpu" for "auto"), so these are not compared.
WHERE_AND_HOW_FAST = ("device", "num_threads", "log_every", "compile", "checkpoint_every", "output_dir", "cache_dir")


# How long a run trains, which `labseg train --resume` may change: a point trained further by hand
EXTENDABLE = ("epochs", "time_budget", "patience")


def recorded_differs(folder: Path, params: dict) -> str | None:
    """What the run recorded in ``folder`` set otherwise than ``params`` asks, or None: a point's
    name does not hold every digit of a value or the whole path of a folder, so a finished run of
    that name may be of another point (``data_dir=/a/pets`` against ``/b/pets``)."""
    try:
        recorded = RunDir(folder).read_config().to_dict()
    except (OSError, ValueError) as e:      # RunRecordError, ConfigError: say so rather than skip
        return f"its config.json cannot be read ({e})"
    asked = _fields(params)
    # Every field, not only those the grid names: a value from the recipe or 04_train's defaults
    # (a registered network's recipe edited since) makes this point another run too. Not those a
    # resume may change and the grid leaves out: a point trained further by hand is still this one.
    for key, mine in point_config(params).to_dict().items():
        if key in WHERE_AND_HOW_FAST or key == "run_name" or key not in recorded:
            continue
        if key in EXTENDABLE and key not in asked:
            continue
        theirs = recorded[key]
        if key in PATH_FIELDS and theirs is not None and mine is not None:
            mine, theirs = resolve_path(mine), resolve_path(theirs)
        if mine != theirs:
            if key in asked and asked[key] is not None:
                return f"it was trained with {key}={recorded[key]!r}, this point asks for {asked[key]!r}"
            return (f"it was trained with {key}={recorded[key]!r}, where this point now takes {key}={mine!r} "
                    "from the recipe or 04_train's defaults (edited since it trained?)")
    return None


def run_sweep(grid: dict[str, list], *, output_dir: str | Path | None = None, force: bool = False,
              prefix: str | None = None, progress: bool = True) -> list[dict]:
    """Run every point of ``grid`` through 04_train; return one result dict per point."""
    from labseg.workbook import run_training_notebook, runs_dir

    root = check_folder("output_dir", runs_dir(output_dir))     # README.md/runs: before the first point
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"grid={grid!r}: expected a mapping of parameters to values, e.g. "
                         "{'arch': ['unet', 'resnet34_unet'], 'lr': [1e-3, 3e-4]}")
    if "run_name" in grid:
        raise SweepError("run_name: a sweep names each point from its parameters; give prefix (--prefix) to "
                         "begin the names with words of your own")
    grid = {str(k): _as_list(k, v) for k, v in grid.items()}    # one value is a list of one, not of its letters
    points = expand(grid)
    check_points(points)
    names = point_names(points, prefix)
    results = []
    for i, (params, name) in enumerate(zip(points, names), 1):
        folder = root / name
        # a folder named as sweeps named them before session 35 (whole paths) is found again too
        before = root / point_name(params, prefix, whole_paths=True, limit=None)
        if not folder.exists() and before.exists():
            name, folder = before.name, before
        unrecorded = None
        finished = not force and is_finished(folder)
        other = recorded_differs(folder, params) if finished else None
        if other:       # a finished run of this name, trained otherwise: not this point's to skip
            status = "failed"
        elif finished:
            status = "done before (skipped; --force redoes it)"
        else:
            if progress:
                print(f"labseg sweep: [{i}/{len(points)}] {name}", flush=True)
            try:
                folder = run_training_notebook(params, output_dir=root, name=name, exact=True,
                                               progress=progress, raise_on_error=False)
                status = "finished" if is_finished(folder) else "failed"
            except RunExistsError as e:     # left to the process training it; not this sweep's to fail
                status, unrecorded = BUSY, str(e)
            except LinkedRunFolderError as e:   # a link where the point goes: nothing written through it
                status, unrecorded = "failed", str(e)
        if unrecorded:      # a point with no records of this sweep's to read
            error, summary = unrecorded, {}
        else:
            error = (f"{folder} holds another run: {other}; give the sweep a --prefix of its own (or --output-dir) "
                     "to keep the two apart") if other else (RunDir(folder).read_json("failed.json") or {}).get("error")
            summary = {} if other else RunDir(folder).read_summary()
        results.append({"run": name, "status": status, "best_valid_dice": summary.get("best_valid_dice"),
                        "error": error, "folder": str(folder), **params})
        if progress:
            detail = error if status in ("failed", BUSY) else (f"best valid Dice {summary['best_valid_dice']:.4f}" if summary.get("best_valid_dice") is not None
                      else "no valid Dice recorded")
            print(f"labseg sweep: {name}: {status}; {detail}", flush=True)
    return results


def format_results(results: list[dict]) -> str:
    lines = [f"{'status':<9} {'valid Dice':>10}  run"]
    for r in results:
        dice = f"{r['best_valid_dice']:.4f}" if r.get("best_valid_dice") is not None else "-"
        status = "skipped" if r["status"].startswith("done") or r["status"] == BUSY else r["status"]
        lines.append(f"{status:<9} {dice:>10}  {r['run']}" + (f"\n{'':21}{r['error']}" if r.get("error") else ""))
    return "\n".join(lines)
