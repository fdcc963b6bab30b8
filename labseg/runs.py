"""Run folders: create, write atomically, list, load. And checkpoints, loaded safely.

One run is one folder ``outputs/runs/<run>/``::

    config.json     the RunConfig, as trained
    metrics.csv     one row per epoch (also metrics.json), rewritten whole after each last.pt
                    write (never ahead of the checkpoint a resume starts from)
    last.pt         the whole training state (model, optimizer, EMA, history) as of its latest
                    write: when best.pt improves, after the final epoch, otherwise at most every
                    ``checkpoint_every`` seconds (60)
    best.pt         the weights and records of the best epoch by the monitored metric, without
                    what only a resume reads (:func:`weights_only`)
    summary.json    best epoch and metrics, epochs run, time, why training stopped
    eval_*.json     evaluation results (labseg.evaluate; named by :func:`eval_file`)
    *.ipynb         the executed notebook, when the run came from papermill

Every record is written to a temporary file in the same folder and renamed into place, so a
crash, a kill or a full disk leaves the previous version intact, never half a file.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from labseg.config import (BEFORE_OPTION_EXISTED, CHECKPOINTS, MONITOR_MODE, UMASK, ConfigError, RunConfig,
                           _is_number, check_choice, nearest_existing, resolve_path)

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that save and load checkpoints, not above: reading a run's
# records (the report, 06_report, picking a run) then needs no torch, which takes seconds to import.
CHECKPOINT_FORMAT = 1


class RunExistsError(FileExistsError):
    """The run folder exists and neither resume nor overwrite was asked for."""


class RunRecordError(ValueError):
    """A run's JSON record (config.json, summary.json, ...) is not what labseg wrote; names the file."""


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, unsafe, or does not fit the model; the message says which."""


class LinkedRunFolderError(RunRecordError):
    """A run folder that is a link: labseg never trains into, empties or replaces one."""


def refuse_link(folder: Path) -> None:
    """A run folder that is a symbolic link (unpacked from someone's archive, made by hand) points
    at a folder labseg did not make: emptying it for a new run, ``--overwrite`` or a sweep would
    delete what that folder holds. Reading a linked run (evaluate, report, resume) is fine."""
    if folder.is_symlink():
        raise LinkedRunFolderError(f"run folder {folder} is a link to {os.readlink(folder)}; labseg trains into, "
                                   "empties and replaces only folders of its own: remove the link "
                                   f"(rm {folder}) or pick another run name")


# --------------------------------------------------------------------------- atomic writes
# The umask's file mode (labseg.config.UMASK): mkstemp makes 0600, which another user cannot read.
_FILE_MODE = 0o666 & ~UMASK


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename it: ``path`` is old or new, never half.

    An OSError (a full disk, say) is raised again with the file and the size in its message.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        if hasattr(os, "fchmod"):     # not on Windows before Python 3.13 (where modes do not apply)
            os.fchmod(fd, _FILE_MODE)   # mkstemp makes 0600; a record is as readable as any file here
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        left = ""
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            except OSError as gone:     # a folder made read-only meanwhile: say so, keep the real error
                left = f" (its unfinished copy {tmp} could not be removed: {gone.strerror or gone})"
        if isinstance(e, OSError):
            raise OSError(e.errno, f"could not write {path} ({_size(len(data))}): {e.strerror or e}; the "
                                   f"previous file, if any, is unchanged{left}") from e
        raise


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} bytes"


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def eval_file(split: str = "test", which: str = "best") -> str:
    """The run-folder file of an evaluation: ``eval_test.json`` (best.pt), ``eval_test_last.json`` (last.pt)."""
    return f"eval_{split}.json" if which == "best" else f"eval_{split}_{which}.json"


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """torch.save into memory, then an atomic write: the old file survives any failure."""
    import torch

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# What only a resume reads: the optimizer's moments (two thirds of resnet34_unet's 280 MB), the
# averaged and the trained weights' other copies, the scheduler's and the loss scaler's state.
TRAINING_STATE = ("optimizer", "scaler", "plateau", "ema", "swa", "raw_model", "holds_best")


def weights_only(checkpoint: dict) -> dict:
    """``checkpoint`` without :data:`TRAINING_STATE`: what best.pt keeps (evaluation, prediction
    and the report read the weights and records only; a resume goes on from last.pt)."""
    return {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}


def folder_contents(folder: Path, keep: str | None = None) -> str:
    """What deleting a run folder loses, in words: "5 files (2 evaluations: eval_test.json, …)".
    Files ending in ``keep`` are not counted. Empty when there is nothing."""
    files = sorted(p.name for p in Path(folder).rglob("*") if p.is_file() and not (keep and p.name.endswith(keep)))
    evals = [f for f in files if f.startswith("eval_")]
    if not files:
        return ""
    return f"{len(files)} file(s)" + (f" ({len(evals)} evaluation(s): {', '.join(evals)})" if evals else "")


class CheckpointWriter:
    """Writes checkpoints in a background thread so that training does not wait for the disk.

    ``submit`` serialises in the caller's thread (a snapshot: training may change the weights
    right after), then writes the bytes atomically to each path in a writer thread, one
    checkpoint at a time, then runs ``then``: records written there never run ahead of the
    checkpoint a resume starts from. A failed write is raised at the next ``submit`` or
    ``wait``; whatever happens, each file on disk is a complete old or new checkpoint. Call
    ``wait`` before reading the files or leaving the run.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._done = threading.Event()       # set by the writer thread when its write is over
        self._error: BaseException | None = None

    def submit(self, checkpoint: dict, *paths: str | Path, then=None, weights_to: str | Path | None = None) -> None:
        """Write ``checkpoint`` to each of ``paths``, then :func:`weights_only` of it to ``weights_to``
        (best.pt) if given; afterwards call ``then()`` (say, the records)."""
        import torch

        # The write before this one ends first: its bytes (resnet34_unet's 290 MB) and these are
        # never in memory together, on a laptop where they were a run's peak.
        self.wait()
        writes = []
        for content, to in ((checkpoint, paths), (weights_only(checkpoint), (weights_to,) if weights_to else ())):
            if to:
                buffer = io.BytesIO()
                torch.save(content, buffer)
                writes.extend((path, buffer.getbuffer()) for path in to)
        self._done.clear()
        self._thread = threading.Thread(target=self._write, args=(writes, then), name="labseg-checkpoint-writer")
        self._thread.start()

    def _write(self, writes, then) -> None:
        try:
            for path, data in writes:
                atomic_write_bytes(path, data)
            if then is not None:
                then()
        except BaseException as e:          # handed to the training thread by wait()
            self._error = e
        finally:
            self._done.set()

    def join(self) -> None:
        """Wait for the write in flight, without raising its error (for cleanup paths).

        A Ctrl-C (or SIGTERM) while waiting does not cut the write short: a checkpoint cut off at
        exit loses the epoch it holds and leaves a checkpoint-sized temporary file. The wait goes
        on, and the interrupt is raised once the file is on disk."""
        interrupted = False
        while self._thread is not None:
            try:
                # An Event, not Thread.join: a join that a KeyboardInterrupt cuts into can mark the
                # thread finished while it still runs (CPython 3.11), and a second join then returns.
                self._done.wait()
                self._thread.join()
                self._thread = None
            except KeyboardInterrupt:
                if not interrupted:
                    print("labseg: finishing the checkpoint being written first (a few seconds)", file=sys.stderr,
                          flush=True)
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt

    def wait(self) -> None:
        self.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint as untrusted input: ``weights_only=True``, so no code can run.

    Raises :class:`CheckpointError` naming the file for a missing, truncated, corrupt or unsafe
    file, or one that is not a labseg checkpoint.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} " + ("is a folder; expected a file written by labseg (torch.save)"
                                                      if path.is_dir() else "does not exist"))
    try:
        with warnings.catch_warnings():
            # A plain pickle (not torch.save's format) makes torch warn about its protocol and ask
            # for a torch issue before it refuses the file; the refusal below says what matters.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:     # it names a class or function to import: what could run code
            raise CheckpointError(f"checkpoint {path} was refused: it holds objects other than tensors and "
                                  "plain data, which could run code when loaded"
                                  f" ({found.group(1)}); labseg never writes such a "
                                  "file, so it came from elsewhere") from None
        raise CheckpointError(f"checkpoint {path} was refused: it is damaged or is not a torch.save file (its "
                              "pickle data cannot be read safely); nothing in it was run") from None
    except Exception as e:  # truncated zip, bad magic, EOF...: all mean "corrupt"
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
                              f"{_first_line(e)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a labseg checkpoint (expected a dict with "
                              "'arch', 'model', 'config' and 'format_version')")
    for key in ("model", "raw_model"):
        weights = ckpt.get(key, {})
        if not (isinstance(weights, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in weights.items())):
            raise CheckpointError(f"checkpoint {path} is not a labseg checkpoint: its {key!r} is a "
                                  f"{type(weights).__name__}, not a dict of named tensors (a state_dict)")
    if not isinstance(ckpt.get("format_version", 0), int):
        raise CheckpointError(f"checkpoint {path} has format_version {ckpt['format_version']!r}; expected an "
                              "integer (it was not written by labseg)")
    if ckpt.get("format_version", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {ckpt['format_version']}, newer than this "
                              f"labseg reads ({CHECKPOINT_FORMAT}); update labseg")
    return ckpt


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def load_weights(model: torch.nn.Module, ckpt: dict, arch: str, source: str = "checkpoint") -> None:
    """Load ``ckpt['model']`` into ``model`` (an ``arch``), or explain the first mismatch."""
    import torch

    state = ckpt["model"]
    theirs = ckpt.get("arch", "?")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if theirs != arch or missing or extra or shape:
        if missing:
            detail = f"first missing key {missing[0]!r} ({len(missing)} missing)"
        elif extra:
            detail = f"first unexpected key {extra[0]!r} ({len(extra)} unexpected)"
        elif shape:
            k = shape[0]
            detail = f"first mismatched key {k!r}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        else:
            detail = "keys match but the recorded arch differs"
        held = (f"{arch!r} weights that do not fit labseg's {arch!r} (from another labseg version, "
                "a network built elsewhere, or a registered network whose builder has changed since?)"
                if theirs == arch
                else f"a {theirs!r} model but a {arch!r} model was asked for")
        raise CheckpointError(f"{source} holds {held}: {detail}")
    # Tensors of the right names and shapes can still be of a kind the network never holds: integers or
    # booleans (cast silently to float), complex, sparse, or NaN (a mask of zeros, scored as a model).
    # Compared with the network's own tensor: a registered one may hold a sparse or a -inf buffer.
    for k, mine in expected.items():
        theirs_t = state[k]
        kind = (f"a {theirs_t.layout} tensor where {mine.layout} is expected" if theirs_t.layout != mine.layout else
                None if theirs_t.dtype == mine.dtype or (theirs_t.is_floating_point() and mine.is_floating_point())
                else f"a tensor of {theirs_t.dtype} where {mine.dtype} is expected")
        if (kind is None and theirs_t.is_floating_point() and theirs_t.layout == torch.strided
                and bool(torch.isfinite(mine).all()) and not bool(torch.isfinite(theirs_t).all())):
            kind = "NaN or infinite values"
        if kind:
            raise CheckpointError(f"{source} holds {kind} in {k!r}; labseg writes finite float weights, so it "
                                  "was written elsewhere or damaged")
    model.load_state_dict(state)


# --------------------------------------------------------------------------- which checkpoint
DECAYING_SCHEDULES = ("cosine", "onecycle")


DECAYED = 0.1     # a schedule counts as run through once the lr is down to this share of its peak


def default_checkpoint(scheduler: str | None, stop_reason: str | None, lr_left: float | None = None) -> str:
    """The checkpoint that stands for a run when none is named: ``"last"`` or ``"best"``.

    last.pt when the run finished a schedule that decays the learning rate to ~0 (all its epochs,
    or its time budget): the last epochs at a small lr scored above the epoch that ~30 valid
    images picked in 75 of 107 budget runs and below it in 9 (docs/results.md, round 21). best.pt when it
    stopped early, was interrupted, or kept a constant or plateau lr: then the last epoch is
    just the latest, and the best by valid Dice is the better guess.

    ``lr_left``, the last epoch's lr as a share of the peak (:func:`lr_left`; None for runs from
    before it was recorded): a short time budget can stop with its lr still high (1 minute of
    35 s epochs stopped at 54% of the peak), and that schedule did not finish: best.pt then.
    """
    reason = str(stop_reason or "")
    if scheduler not in DECAYING_SCHEDULES:
        return "best"
    if reason.startswith("completed all epochs"):     # all its epochs: the whole schedule
        return "last"
    if reason.startswith("time budget"):              # judged by the lr it stopped at
        return "last" if lr_left is None or lr_left <= DECAYED else "best"
    return "best"


def lr_left(summary: dict, lr, history=None) -> float | None:
    """The last epoch's lr as a share of the peak ``lr``, from a summary (None where unrecorded).

    A summary from before ``final_lr`` was recorded takes it from the last row of ``history``
    (metrics.json), which has always held each epoch's lr: without it, an old budget run that
    stopped with its lr still high would be judged by last.pt.
    """
    final = summary.get("final_lr")
    if final is None and history and isinstance(history[-1], dict):
        final = history[-1].get("lr")
    return final / lr if _is_number(final) and _is_number(lr) and lr > 0 else None


# --------------------------------------------------------------------------- run folders
def _claim(folder: Path) -> bool:
    """Atomically claim ``folder`` for one run: True for the one caller that gets it.

    A folder that exists but was never claimed (papermill creates it to hold the executed
    notebook before the notebook starts the run) can still be claimed, once; a link never is.
    """
    refuse_link(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:    # a parent that cannot hold folders (/proc, a file, read-only, no permission)
        raise ConfigError(f"output_dir={str(folder.parent)!r}: cannot create the run folder {folder} there "
                          f"({e.strerror or e}); expected a folder this user can write to") from None
    try:
        os.close(os.open(folder / ".claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))    # umask applies
        return True
    except FileExistsError:
        return False


def _unique_folder(base: Path) -> Path:
    """Claim ``base`` or ``base-2``, ``base-3``...: two runs never share a folder."""
    for i in range(1, 10_000):
        candidate = base if i == 1 else base.with_name(f"{base.name}-{i}")
        if not candidate.is_symlink() and not (candidate / "config.json").exists() and _claim(candidate):
            return candidate
    raise RunExistsError(f"could not find a free run folder next to {base}")


def _latest_stopped(base: Path, taken: Path) -> Path | None:
    """The newest of ``base``, ``base-2``... before ``taken`` that stopped with a checkpoint and no
    summary: the run that the same command, run again after an interrupt, meant to go on with."""
    number = int(taken.name.rsplit("-", 1)[1])
    for candidate in [base.with_name(f"{base.name}-{i}") for i in range(number - 1, 1, -1)] + [base]:
        if not candidate.is_symlink() and RunDir(candidate).resumable() and not RunDir(candidate).is_training():
            return candidate
    return None


def _unregistered_hint(recorded: dict) -> str:
    """For a record naming a network or loss this process does not know: a user's own, registered
    by a module the run's process imported and this one did not."""
    from labseg.config import ARCHS, LOSSES

    for field, known, what, register in (("arch", ARCHS, "network", "labseg.models.register_model"),
                                         ("loss", LOSSES, "loss", "labseg.losses.register_loss")):
        if recorded.get(field) not in (None, *known):
            return (f" (a {what} of your own is registered with {register} in this process; the CLI, "
                    "notebooks and sweeps import the module that does from $LABSEG_PLUGINS)")
    return ""


@dataclass
class RunDir:
    """A run's folder and its records."""

    path: Path

    @contextlib.contextmanager
    def lock_for_training(self):
        """Hold the run's ``.training`` lock while this process trains it; a second process that
        tries (the same resume in two terminals, a notebook and the CLI) gets a RunExistsError
        instead of both writing the same checkpoints. The operating system drops the lock when the
        process ends, however it ends, so a killed run never stays locked. (POSIX; elsewhere a no-op.)"""
        try:
            import fcntl
        except ImportError:
            yield self
            return
        lock = self.path / ".training"
        if lock.is_symlink():       # labseg's lock is a plain file: a link there would be followed by O_CREAT
            lock.unlink()
        fd = os.open(lock, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), _FILE_MODE)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunExistsError(f"run {self.path} is being trained by another process now; wait for "
                                     "it to finish (or stop it) before resuming it here") from None
            yield self
        finally:
            os.close(fd)            # closing the file releases the lock

    def is_training(self) -> bool | None:
        """Whether a process holds this run's training lock now (None where flock does not exist)."""
        try:
            import fcntl
        except ImportError:
            return None
        if not (self.path / ".training").is_file() or (self.path / ".training").is_symlink():
            return False
        with open(self.path / ".training", "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False                # closing the file lets the shared lock go

    def release(self) -> None:
        """Give up a folder claimed by a run that never wrote a checkpoint: its records go (an
        executed notebook stays), so the same command can simply be run again."""
        empty_folder(self.path, keep=".ipynb")
        if not any(self.path.iterdir()):
            self.path.rmdir()

    # ---- creation
    @classmethod
    def create(cls, output_dir: str | Path, name: str, *, overwrite: bool = False,
               exist: str = "suffix") -> "RunDir":
        """A new run folder ``output_dir/name``.

        If it exists: ``overwrite=True`` deletes it first; otherwise ``exist="suffix"`` takes a
        fresh ``name-2``... (and says so), ``exist="error"`` refuses.
        """
        base = resolve_path(output_dir) / name
        if overwrite or exist == "error":   # a name given: that folder or none (a default name moves on)
            refuse_link(base)
        if overwrite and base.exists() and cls(base).is_training():
            # Emptying it would delete the lock too, and both processes would then write one folder.
            raise RunExistsError(f"run {base} is being trained by another process now; stop that process "
                                 "before replacing the run with --overwrite")
        if overwrite and base.exists():
            if lost := folder_contents(base, keep=".ipynb"):
                print(f"labseg: --overwrite: deleting {lost} in {base}")
            empty_folder(base, keep=".ipynb")
        if exist == "error":
            # The claim decides: a process that loses it to another started at the same moment is
            # refused like one that finds the run there, never moved to NAME-2.
            if (base / ".claimed").exists() or (base / "config.json").exists() or not _claim(base):
                raise RunExistsError(f"run folder {base} exists; resume it (--resume; resume=True in fit and "
                                     "04_train), start over (--overwrite; overwrite=True), or pick another run name")
            return cls(base)
        path = _unique_folder(base)
        if path != base:
            print(f"labseg: run folder {base} exists; this run writes to {path} "
                  "(to continue that run instead: --resume, resume=True in fit and 04_train; to replace it: "
                  "--overwrite, overwrite=True; both need its name: --run-name, run_name)")
            if stopped := _latest_stopped(base, path):      # e.g. the run a notebook's interrupt stopped
                print(f"labseg: {stopped.name} stopped before its end and can be continued: --run-name "
                      f"{stopped.name} --resume (run_name={stopped.name!r}, resume=True)")
        return cls(path)

    @classmethod
    def open(cls, run: str | Path, output_dir: str | Path = "outputs/runs") -> "RunDir":
        """An existing run, by folder path or by name under ``output_dir``."""
        p = Path(run).expanduser()
        candidates = [p] if p.is_absolute() else [Path.cwd() / p, resolve_path(output_dir) / p, resolve_path(p)]
        candidates = list(dict.fromkeys(c.resolve() for c in candidates))   # each place once
        for c in candidates:
            if (c / "config.json").is_file():
                return cls(c.resolve())
        for c in candidates:    # a sweep point that failed before its run began: say so, and why
            if (c / "failed.json").is_file():
                error = read_record(c / "failed.json", dict).get("error") or ""
                raise FileNotFoundError(f"run {c} failed before it trained, so there is nothing to load "
                                        f"(failed.json: {error.splitlines()[0] if error else 'no error recorded'})")
        raise FileNotFoundError(f"no run folder {run!r} (looked for config.json in "
                                f"{', '.join(str(c) for c in candidates)}); runs here: "
                                f"{', '.join(r.name for r in list_runs(output_dir)) or 'none'}")

    @property
    def name(self) -> str:
        return self.path.name

    # ---- records
    def write_config(self, config: RunConfig) -> None:
        atomic_write_json(self.path / "config.json", config.to_dict())

    def read_config(self) -> RunConfig:
        """The recorded config. An option it lacks (a run from before the option existed) reads as
        off, which is what that run trained with (``config.BEFORE_OPTION_EXISTED``); any other
        recipe field it lacks, as the recipe's value. Its cache folder is this machine's: one that
        cannot be a folder here (``--cache-dir /scratch/u/cache`` of a cluster on a laptop, a path
        below a file) reads as the default; one deleted since is made again."""
        path = self.path / "config.json"
        recorded = read_record(path, dict)
        try:
            config = RunConfig.from_dict({**BEFORE_OPTION_EXISTED, **recorded}).with_recipe()
            if not _can_hold_a_cache(config.cache_dir):
                config = dataclasses.replace(config, cache_dir=RunConfig.cache_dir)
            # Validated: a value edited into the file by hand (say "img_size": "64") is named here as
            # the file's, not met later as a TypeError deep in the data code. Its device is not
            # checked: a run trained on a GPU is read on a laptop too.
            dataclasses.replace(config, device="auto").validate()
            return config
        except (ValueError, TypeError) as e:
            raise RunRecordError(f"{path}: {e}{_unregistered_hint(recorded)}") from None

    def write_metrics(self, history: list[dict]) -> None:
        """Rewrite metrics.json and metrics.csv with the whole history (atomic, no duplicates)."""
        atomic_write_json(self.path / "metrics.json", history)
        keys: list[str] = []
        for row in history:
            keys += [k for k in row if k not in keys]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")    # Unix line ends (csv's own are \r\n)
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(self.path / "metrics.csv", out.getvalue())

    def read_metrics(self) -> list[dict]:
        p = self.path / "metrics.json"
        return read_record(p, list) if p.is_file() else []

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.path / name, obj)

    def read_json(self, name: str, default=None):
        p = self.path / name
        return read_record(p, (dict, list)) if p.is_file() else default

    def write_summary(self, summary: dict) -> None:
        self.write_json("summary.json", summary)

    def read_summary(self) -> dict:
        """summary.json; {} when there is none, or when it is an earlier session's: a resume has
        since saved other epochs (metrics.json, written with each checkpoint, counts otherwise),
        so the run is unfinished, and its stop reason no longer says which checkpoint stands for it."""
        p = self.path / "summary.json"
        if not p.is_file():
            return {}
        summary = read_record(p, dict)
        return {} if self._outdated(summary) else summary

    def summary_outdated(self) -> bool:
        """Whether summary.json is there but of an earlier session (:meth:`read_summary` reads {})."""
        p = self.path / "summary.json"
        try:
            return p.is_file() and self._outdated(read_record(p, dict))
        except RunRecordError:          # damaged, not outdated: said where it is read
            return False

    def resumable(self) -> bool:
        """Stopped before its end with a checkpoint to go on from: no summary, or one a resume has
        since outdated (extended, then stopped), and no failed.json (a sweep point that failed)."""
        return ((not (self.path / "summary.json").exists() or self.summary_outdated())
                and not (self.path / "failed.json").exists()
                and any(self.checkpoint(w).is_file() for w in ("last", "best")))

    def _outdated(self, summary: dict) -> bool:
        try:
            saved = len(self.read_metrics())
        except RunRecordError:          # the summary still holds; the damaged record is reported where read
            saved = 0
        return bool(saved) and summary.get("epochs_run") not in (None, saved)

    def describe_checkpoint(self, which: str = "auto") -> str:
        """``"last.pt (epoch 40, valid Dice 0.8512)"``: the checkpoint ``which`` resolves to, with
        the epoch it holds and that epoch's valid Dice, from the records. A run picked by its best
        valid Dice may be evaluated on last.pt, whose own figure is another."""
        name = self.resolve_checkpoint(which)
        summary = self.read_summary()
        if not self.checkpoint(name).exists():      # said before an evaluation fails on it
            stopped = not summary and not any(self.checkpoint(w).exists() for w in ("best", "last"))
            return f"{name}.pt, which is missing" + (
                " (the run stopped before its first checkpoint: train it again with overwrite=True, "
                "--overwrite, or delete its folder)" if stopped else "")
        try:
            history = self.read_metrics()
        except RunRecordError:          # a damaged record: the name alone (the record says so where read)
            return f"{name}.pt"
        if summary.get("swa_epochs") and (name == "last" or summary.get("best_is_swa")):
            return (f"{name}.pt (weights averaged over its last {summary['swa_epochs']} epochs, valid Dice "
                    f"{summary['swa_valid_dice']:.4f})")
        if name == "best":      # best.pt is kept by the run's monitor (lowest for a loss)
            monitor = self.read_config().monitor
            sign = -1.0 if MONITOR_MODE.get(monitor) == "min" else 1.0
            scored = [r for r in history if isinstance(r.get(monitor), (int, float))]
            epoch = summary.get("best_epoch") or max(scored, key=lambda r: sign * r[monitor], default={}).get("epoch")
        else:
            epoch = history[-1].get("epoch") if history else None
        row = next((r for r in history if r.get("epoch") == epoch), None)
        if row is None or "valid_dice" not in row:
            return f"{name}.pt"
        return f"{name}.pt (epoch {epoch}, valid Dice {row['valid_dice']:.4f})"

    def resolve_checkpoint(self, which: str = "auto") -> str:
        """``"best"`` or ``"last"``; ``"auto"`` is this run's :func:`default_checkpoint`."""
        check_choice("checkpoint", which, CHECKPOINTS)
        if which != "auto":
            return which
        config, summary = self.read_config(), self.read_summary()
        return default_checkpoint(config.scheduler, summary.get("stop_reason"), self.lr_left(summary, config.lr))

    def lr_left(self, summary: dict, lr) -> float | None:
        """:func:`lr_left` of this run, reading metrics.json only for a summary without ``final_lr``."""
        if "final_lr" in summary:
            return lr_left(summary, lr)
        try:
            return lr_left(summary, lr, self.read_metrics())
        except RunRecordError:
            return None

    def checkpoint(self, which: str = "auto") -> Path:
        return self.path / f"{self.resolve_checkpoint(which)}.pt"


def empty_folder(folder: Path, keep: str) -> None:
    """Delete what a run folder holds, except the entries whose names end in ``keep`` (an executed
    notebook papermill may be writing now, a lock held on its file). A link is removed, never
    followed: papermill would write a kept notebook through it."""
    refuse_link(folder)
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.name.endswith(keep):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def read_record(path: Path, kind):
    """A JSON record of the expected ``kind``, or a RunRecordError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunRecordError(f"{path} is not valid JSON ({e}); labseg writes its records whole, so it was "
                             "edited or damaged elsewhere: restore it, or delete the run") from None
    if not isinstance(value, kind):
        raise RunRecordError(f"{path} holds a {type(value).__name__}; expected a JSON "
                             f"{'object' if kind is dict else 'array' if kind is list else 'object or array'}")
    _check_fields(path, value)
    return value


# The nested fields of labseg's records, checked where a record is read: a run folder received from
# elsewhere may hold anything, and one odd value there once ended `labseg report` for every run.
_OBJECTS_OF_OBJECTS = ("per_breed", "per_species")
_FIELD_KINDS = {
    "summary.json": {"machine": dict, "machines": list, "stop_reason": str, "skipped": list, "trainval": dict},
    "failed.json": {"params": dict, "error": str},
    # "tta": false is an evaluation's before e7594a9 (TTA off), still read as no TTA figure
    "eval_": {"tta": (dict, bool), "threshold_tuned": dict, "tta_threshold_tuned": dict, "postprocess": dict,
              "per_breed": dict, "per_species": dict, "checkpoint": str},
}


def _check_fields(path: Path, value) -> None:
    def refuse(what: str, found, expected: str):
        raise RunRecordError(f"{path}: {what} holds a {type(found).__name__}; expected {expected} (labseg writes "
                             "it so: the file was edited or written elsewhere)")

    if path.name == "metrics.json" and isinstance(value, list):
        for row in value:
            if not (isinstance(row, dict) and isinstance(row.get("epoch"), int)):
                refuse("a row", row, "an object with its epoch, one per epoch")
        return
    kinds = _FIELD_KINDS.get(path.name) or (_FIELD_KINDS["eval_"] if path.name.startswith("eval_") else {})
    if not isinstance(value, dict):
        return
    for field, kind in kinds.items():
        if value.get(field) is not None and not isinstance(value[field], kind):
            refuse(field, value[field], {dict: "a JSON object", list: "a JSON array", str: "text"}[
                kind if isinstance(kind, type) else kind[0]])
    for field in (*_OBJECTS_OF_OBJECTS, "machines"):
        for item in (value.get(field) or {}).values() if field != "machines" else value.get(field) or []:
            if not isinstance(item, dict):
                refuse(f"an entry of {field}", item, "a JSON object")


def list_runs(output_dir: str | Path = "outputs/runs") -> list[RunDir]:
    """The run folders under ``output_dir``, the one that trained last at the end."""
    root = resolve_path(output_dir)
    if not root.is_dir():
        return []
    return sorted((RunDir(p) for p in root.iterdir() if (p / "config.json").is_file()), key=trained_at)


def trained_at(run: RunDir) -> float:
    """When the run last trained (seconds since the epoch): the time its summary records, which a
    copy of the folder keeps; for a run without one (unfinished, or written before labseg recorded
    it), its config's or summary's file time. Never the folder's, which an evaluation or a notebook
    written into it moves, making an old run look like the latest."""
    try:
        finished = run.read_summary().get("finished_at")
        if isinstance(finished, str):
            return datetime.fromisoformat(finished).timestamp()
    except (OSError, ValueError):       # a damaged record: its file times below
        pass
    return max((run.path / name).stat().st_mtime for name in ("config.json", "summary.json")
               if (run.path / name).is_file())


def dataset_key(summary: dict, data_dir) -> str | None:
    """Which data a run trained on, the same on every machine: the fingerprint of its trainval image
    names, as its summary records it (``"trainval"``). Runs collected from several machines hold the
    dataset at as many paths; two datasets in folders of one name differ. A run recorded before
    that field: the fingerprint of its data folder's trainval list where the folder is here, else
    the folder's path."""
    digest = summary.get("trainval")
    if isinstance(digest, dict) and isinstance(digest.get("names_sha1"), str):
        return digest["names_sha1"]
    if not isinstance(data_dir, (str, os.PathLike)):
        return None
    path = resolve_path(data_dir)
    try:    # the split file's and the images' times: a dataset written or replaced since is read again
        stamp = tuple((path / p).stat().st_mtime_ns for p in ("annotations/trainval.txt", "images"))
    except OSError:                     # not here
        return str(path)
    # the pairs the run skipped (an image that would not decode) are not among the names it recorded
    skipped = frozenset(Path(str(s[0] if isinstance(s, (list, tuple)) and s else s)).stem
                        for s in summary.get("skipped") or [])
    return _names_sha1(str(path), stamp, skipped) or str(path)


@functools.lru_cache(maxsize=64)
def _names_sha1(folder: str, stamp: tuple, skipped: frozenset) -> str | None:
    from labseg.data import DatasetLayoutError, read_records_quiet

    try:
        records = read_records_quiet(Path(folder), "trainval")
    except (OSError, ValueError, DatasetLayoutError):       # not a dataset
        return None
    return hashlib.sha1("\n".join(sorted(r.name for r in records if r.name not in skipped)).encode()).hexdigest()


def _can_hold_a_cache(folder) -> bool:
    """Whether ``folder`` is a folder here, or can be made one: its nearest existing parent is a
    folder this user may write to."""
    if not isinstance(folder, (str, os.PathLike)):
        return False
    path = resolve_path(folder)
    start = nearest_existing(path)      # None inside a folder this user may not enter (another's home)
    return start is not None and start.is_dir() and (start == path or os.access(start, os.W_OK | os.X_OK))


def best_run(output_dir: str | Path = "outputs/runs", arch: str | None = None,
             metric: str = "best_valid_dice") -> RunDir:
    """The finished run with the highest ``metric`` in its summary (optionally of one arch), among
    the runs on the dataset of the latest finished one: valid Dice on the synthetic sample and on
    real photos are not comparable, and the latest run says which data one is working on."""
    finished = []
    for run in list_runs(output_dir):           # oldest first
        try:
            s = run.read_summary()
            if metric in s and (arch is None or s.get("arch") == arch):
                if not _is_number(s[metric]):
                    raise RunRecordError(f"{run.path / 'summary.json'}: {metric} is {s[metric]!r}; expected a number")
                finished.append((s[metric], run, dataset_key(s, run.read_config().data_dir)))
        except RunRecordError as e:             # one damaged folder must not hide every other run
            print(f"labseg: skipped run {run.name}: {e}", file=sys.stderr)
    if not finished:
        raise FileNotFoundError(f"no finished run{' of ' + arch if arch else ''} under "
                                f"{resolve_path(output_dir)}; train one with `labseg train`")
    data = finished[-1][2]
    return max((t for t in finished if t[2] == data), key=lambda t: t[0])[1]


def run_name_for(config: RunConfig) -> str:
    """A readable default name from the data set and the parameters that usually vary between runs."""
    dataset = Path(config.data_dir).name or "data"
    name = f"{dataset}-{config.arch}-{config.img_size}px-{config.loss}-lr{config.lr:g}-{config.augment}-s{config.seed}"
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)
