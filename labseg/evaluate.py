"""Evaluation and prediction with a trained run.

* :func:`evaluate_run` — Dice, IoU and accuracy on a split: overall, per species, per breed,
  with optional horizontal-flip test-time augmentation, a tuned threshold and one-pet
  post-processing (:mod:`labseg.postprocess`), written to the run folder as ``eval_<split>.json``
  (best.pt) or ``eval_<split>_last.json`` (last.pt).
* :func:`predict_images` — masks for one image or a folder, at the original resolution, saved as
  PNG masks and overlays.
"""
from __future__ import annotations

import io
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from labseg.config import ConfigError, RunConfig, check_choice, check_folder, check_img_size, check_switch, pick_device, resolve_path
from labseg.data import (BadSampleError, Batches, CachedSplit, check_recorded_dataset, load_image, load_split, log,
                         normalize, split_trainval, upright_size)
from labseg.metrics import in_chunks, per_image_accuracy, per_image_dice, per_image_iou
from labseg.machine import channels_last_for, give_back_freed_memory
from labseg.models import build_model, model_kwargs
from labseg.postprocess import clean_mask, clean_masks
from labseg.progress import pass_bar, progress_modes, redraws
from labseg.runs import (CheckpointError, RunDir, RunRecordError, atomic_write_bytes, eval_file, load_checkpoint,
                         load_weights)

THRESHOLDS = tuple(np.round(np.arange(0.2, 0.81, 0.05), 2).tolist())


def load_run_model(run: RunDir | str | Path, which: str = "auto", device="auto",
                   output_dir: str | Path = "outputs/runs"):
    """(model in eval mode, its RunConfig) from a run folder's ``best.pt`` or ``last.pt``.

    ``which="auto"``: last.pt for a run that finished its decaying schedule, else best.pt
    (:func:`labseg.runs.default_checkpoint`). ``run``: a RunDir, a folder, or a run's name under
    ``output_dir``.
    """
    model, config, _ = _load_run_model(run, which, device, output_dir)
    return model, config


def _load_run_model(run, which, device, output_dir="outputs/runs"):
    """:func:`load_run_model`, plus the epoch the checkpoint holds (None where it does not say)."""
    run = run if isinstance(run, RunDir) else RunDir.open(run, output_dir)
    config = run.read_config()
    path = run.checkpoint(which)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:        # say what to do next: the other checkpoint, or train again
        other = run.path / ("last.pt" if path.name == "best.pt" else "best.pt")
        if other.is_file():
            raise CheckpointError(f"{e}; {other.name} is there: use it with --checkpoint "
                                  f"{other.stem}") from None
        if not path.exists():
            raise CheckpointError(f"run {run.name} has no checkpoint: it stopped before its first epoch ended; "
                                  f"train it again with `labseg train --run-name {run.name} --overwrite` (and its "
                                  "options)") from None
        raise

    model = build_model(config.arch, **model_kwargs(config))
    load_weights(model, ckpt, config.arch, source=str(path))
    device = pick_device(device) if isinstance(device, str) else device
    model = model.to(device).eval()
    if channels_last_for(device, config.channels_last):
        model = model.to(memory_format=torch.channels_last)
    epoch = ckpt.get("epoch")
    return model, config, epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def batches_for_model(model, config: RunConfig, data: CachedSplit, batch_size: int = 16) -> Batches:
    """Batches of ``data`` on ``model``'s device, in the memory format :func:`load_run_model` chose."""

    device = next(model.parameters()).device
    return Batches(data, batch_size=batch_size, device=device,
                   channels_last=channels_last_for(device, config.channels_last))


def predict_probs(model, batches: Batches, tta: bool = False, progress: bool = False,
                  desc: str = "predicting") -> torch.Tensor:
    """Pet probabilities N×1×S×S (CPU, float16 to keep memory small) for every batch; with ``tta``,
    averaged with the prediction on the mirrored image, mirrored back."""
    plain, mirrored = predict_plain_and_tta(model, batches, tta, progress, desc)
    return mirrored if tta else plain


@torch.inference_mode()      # no autograd records: half the memory, and tensors that plot as they are
def predict_plain_and_tta(model, batches: Batches, tta: bool = True, progress: bool = False,
                          desc: str = "predicting") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The plain probabilities and (with ``tta``, else None) the flip-TTA ones from one pass: the
    TTA average takes the plain logits rather than computing them again (a third of an
    evaluation's forward passes)."""
    model.eval()
    plain, mirrored = [], []
    # a bar: the test split at 256 px takes minutes on 2 cores, and silence reads as a hang
    with pass_bar(len(batches), desc, progress) as bar:
        for batch in batches:
            logits = model(batch.image).float()
            plain.append(torch.sigmoid(logits).to("cpu", torch.float16))
            if tta:
                averaged = (logits + model(batch.image.flip(-1)).float().flip(-1)) / 2
                mirrored.append(torch.sigmoid(averaged).to("cpu", torch.float16))
            bar.update()
    return torch.cat(plain), torch.cat(mirrored) if tta else None


@dataclass
class Evaluation:
    """Per-image scores on a split and their summaries."""

    names: list[str]
    breeds: list[str]
    species: list[str]
    dice: np.ndarray
    iou: np.ndarray
    accuracy: np.ndarray
    threshold: float = 0.5
    tta: bool = False
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"dice": float(self.dice.mean()), "iou": float(self.iou.mean()),
                "accuracy": float(self.accuracy.mean()), "images": len(self.names),
                "threshold": self.threshold, "tta": self.tta,
                "per_species": self._group(self.species),
                "per_breed": {breed: {"species": self._species_of(breed), **scores}
                              for breed, scores in self._group(self.breeds).items()}, **self.extra}

    def _group(self, keys) -> dict:
        keys = np.asarray(keys)
        return {k: {"dice": float(self.dice[keys == k].mean()), "iou": float(self.iou[keys == k].mean()),
                    "images": int((keys == k).sum())} for k in sorted(set(keys.tolist()), key=str.lower)}

    def _species_of(self, breed: str) -> str:
        return next(s for b, s in zip(self.breeds, self.species) if b == breed)

    def table(self):
        """A pandas DataFrame with one row per image."""
        import pandas as pd

        return pd.DataFrame({"name": self.names, "breed": self.breeds, "species": self.species,
                             "dice": self.dice, "iou": self.iou, "accuracy": self.accuracy})


def score(probs: torch.Tensor, split: CachedSplit, threshold: float = 0.5, tta: bool = False,
          postprocess: bool = False) -> Evaluation:
    """Per-image scores of ``probs`` thresholded at ``threshold`` (``postprocess``: one pet per mask)."""
    target = torch.from_numpy(np.asarray(split.masks)).unsqueeze(1)
    pred = at_threshold(probs, threshold)
    if postprocess:
        pred = clean_masks(pred)
    return Evaluation([r.name for r in split.records], [r.breed for r in split.records],
                      [r.species for r in split.records], per_image_dice(pred, target).numpy(),
                      per_image_iou(pred, target).numpy(), per_image_accuracy(pred, target).numpy(),
                      threshold, tta, {"postprocess": True} if postprocess else {})


def threshold_sweep(probs: torch.Tensor, split: CachedSplit, thresholds=THRESHOLDS) -> dict[float, float]:
    """Mean Dice at each threshold: pick the best on valid, never on test."""
    target = torch.from_numpy(np.asarray(split.masks)).unsqueeze(1)
    return {float(t): per_image_dice(at_threshold(probs, t), target).mean().item() for t in thresholds}


def at_threshold(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """``probs >= threshold`` as booleans, compared in fp32 a few images at a time: one fp32 copy
    of a whole test split's fp16 probabilities is 4 bytes a pixel (3669 images at 256 px: 1 GB)."""
    return in_chunks(lambda part: part.float() >= threshold, probs)


def evaluate_run(run: RunDir | str | Path, split: str = "test", *, which: str = "auto", tta: bool = False,
                 tune_threshold: bool = False, postprocess: bool = False, data_dir: str | None = None,
                 batch_size: int = 16, device="auto", progress: bool | str = True, save: bool = True,
                 output_dir: str | Path = "outputs/runs", predictions: dict | None = None) -> dict:
    """Evaluate a run on ``split`` ("test" or "valid"); returns and saves the results.

    The result holds the plain evaluation (threshold 0.5, no TTA) and, when asked, the flip-TTA,
    tuned-threshold and post-processed variants separately, so their effects can be read apart: the
    threshold is tuned on the plain valid probabilities ("threshold_tuned"); with ``tta`` too, a
    threshold tuned on the flip-TTA ones gives the combination ("tta_threshold_tuned").
    ``postprocess`` (:mod:`labseg.postprocess`) also records the valid Dice without and with the
    step: the check that decides, as in nnU-Net, whether to use it. ``which``: "best", "last" or
    "auto" (last.pt for a run that finished its decaying schedule, else best.pt).

    ``predictions``, a dict, receives the split (``"data"``) and its plain probabilities
    (``"probs"``), for galleries without predicting the split again (minutes for the full
    dataset's test split on a CPU). ``progress``: True, the bars of the passes over the images and
    of a cache being built, with its notes; ``"bars"``, the passes' bars alone (the notebooks, whose
    outputs nbval compares: a cache is there or not by the machine); False, none.
    """
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ConfigError(f"batch_size={batch_size!r}: expected a positive integer")
    for name, value in (("tta", tta), ("tune_threshold", tune_threshold), ("postprocess", postprocess),
                        ("save", save)):
        check_switch(name, value)       # tta="no" would run the TTA
    progress, data_progress = progress_modes(progress)
    run = run if isinstance(run, RunDir) else RunDir.open(run, output_dir)
    which = run.resolve_checkpoint(which)
    model, config, epoch = _load_run_model(run, which, device)
    if run.is_training():       # a peek is allowed; the scores are of the checkpoint as it is now
        print(f"labseg: run {run.name} is still training: these scores are of {which}.pt at epoch "
              f"{epoch if epoch is not None else '?'}, not of the finished run; evaluate it again once it "
              "has finished", file=sys.stderr, flush=True)
    if not data_dir:
        check_recorded_dataset(config.data_dir, run.name, f"labseg evaluate {run.name} --data DIR "
                                                          "(data_dir=DIR in Python and in 05_evaluate)")
    data_dir = data_dir or config.data_dir
    cached = run_split(config, split, data_dir, data_progress)
    batches = batches_for_model(model, config, cached, batch_size)
    probs, probs_tta = predict_plain_and_tta(model, batches, tta, progress, f"{split}{', with flip TTA' if tta else ''}")
    plain = score(probs, cached)
    if predictions is not None:
        predictions.update(data=cached, probs=probs)
    # "tta" names the flip-TTA variant below; the plain scores carry no flag of that name.
    plain_scores = {k: v for k, v in plain.summary().items() if k != "tta"}
    result = {"run": run.name, "arch": config.arch, "split": split, "checkpoint": which, "epoch": epoch,
              "img_size": config.img_size,
              "data_dir": str(data_dir), "skipped_pairs": len(cached.skipped), **plain_scores}
    if tta:
        result["tta"] = score(probs_tta, cached, tta=True).summary()
    if tune_threshold or postprocess:
        valid = run_split(config, "valid", data_dir, data_progress)
        valid_batches = batches_for_model(model, config, valid, batch_size)
        valid_tta = tta and tune_threshold      # the TTA threshold is tuned on TTA's valid probabilities
        valid_probs, valid_tta_probs = predict_plain_and_tta(model, valid_batches, valid_tta, progress,
                                                             f"valid{', with flip TTA' if valid_tta else ''}")
    if tune_threshold:
        result["threshold_tuned"] = _tuned(probs, cached, valid_probs, valid)
        if tta:
            result["tta_threshold_tuned"] = _tuned(probs_tta, cached, valid_tta_probs, valid, tta=True)
    if postprocess:
        checked = {"valid_dice": score(valid_probs, valid).dice.mean().item(),
                   "valid_dice_postprocessed": score(valid_probs, valid, postprocess=True).dice.mean().item()}
        result["postprocess"] = {**checked, **score(probs, cached, postprocess=True).summary()}
        if tta:
            result["tta_postprocess"] = score(probs_tta, cached, tta=True, postprocess=True).summary()
    if save:
        _record(run, eval_file(split, which), result)
    give_back_freed_memory()        # the passes' activations and score copies, in a kernel that lives on
    return result


def _record(run: RunDir, file: str, result: dict) -> None:
    """Keep ``result`` in the run folder; where it cannot be written (a read-only folder, a full
    disk) the scores are still returned and shown, with a note, rather than lost to the error."""
    try:
        run.write_json(file, _merged_with_recorded(run, file, result))
    except OSError as e:
        log.warning(f"the evaluation is not recorded: {e}")


def evaluate_checkpoints(run: RunDir | str | Path, split: str = "test", which=("best", "last"), *,
                         output_dir: str | Path = "outputs/runs", **options) -> list[dict]:
    """:func:`evaluate_run` for each checkpoint in ``which``, with the same ``options``.

    A checkpoint that holds the same weights as one evaluated before (best.pt and last.pt written
    by one save, when the last epoch was the best) takes that evaluation, marked
    ``"same_weights_as"``, instead of computing it again: ~30 s per budget run at 128 px on 2 cores.
    """
    run = run if isinstance(run, RunDir) else RunDir.open(run, output_dir)
    results: dict[str, dict] = {}
    for name in dict.fromkeys(run.resolve_checkpoint(w) for w in which):
        path = run.checkpoint(name)
        twin = next((done for done in results if path.is_file() and _same_weights(run.checkpoint(done), path)), None)
        if twin is None:
            results[name] = evaluate_run(run, split, which=name, **options)
            continue
        results[name] = {**results[twin], "checkpoint": name, "same_weights_as": twin}
        if options.get("save", True):
            _record(run, eval_file(split, name), results[name])
    return list(results.values())


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold the same network and weights (best.pt keeps the weights of
    last.pt's training state, so their bytes differ)."""
    try:
        first, second = load_checkpoint(a), load_checkpoint(b)
    except CheckpointError:
        return False
    ours, theirs = first["model"], second["model"]
    return (first["arch"] == second["arch"] and ours.keys() == theirs.keys()
            and all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours))


VARIANTS = ("tta", "threshold_tuned", "tta_threshold_tuned", "postprocess", "tta_postprocess")


def _merged_with_recorded(run: RunDir, name: str, result: dict) -> dict:
    """``result`` plus the variants the recorded evaluation has and this one did not compute.

    A plain ``labseg evaluate`` after one with ``--tta --tune-threshold`` used to erase those
    figures, and the report's columns went blank. The recorded file is of the same weights (a
    resume moves a run's evaluations aside) and, when its data_dir is the same, of the same images,
    so its variants still hold. On other data it is replaced, and that is said.
    """
    try:
        recorded = run.read_json(name) or {}
    except RunRecordError:
        return result
    if not recorded.get("data_dir") or resolve_path(recorded["data_dir"]) != resolve_path(result["data_dir"]):
        if recorded:
            print(f"labseg: {run.path / name} held the evaluation on {recorded.get('data_dir')}; it now holds the "
                  f"one on {result['data_dir']}", file=sys.stderr)
        return result
    if any(recorded.get(k, result.get(k)) != result.get(k) for k in ("checkpoint", "epoch")):
        return result       # other weights (an old eval_test.json of last.pt, another epoch): nothing holds
    kept = {k: recorded[k] for k in VARIANTS if k in recorded and k not in result}
    return {**result, **kept}


def _tuned(probs: torch.Tensor, split: CachedSplit, valid_probs: torch.Tensor, valid: CachedSplit,
           tta: bool = False) -> dict:
    """Scores on ``split`` at the threshold that does best on valid (never tuned on test)."""
    sweep = threshold_sweep(valid_probs, valid)
    best = max(sweep, key=sweep.get)
    return {"threshold": best, "valid_sweep": sweep, **score(probs, split, threshold=best, tta=tta).summary()}


def run_split(config: RunConfig, split: str, data_dir, progress: bool) -> CachedSplit:
    """A run's ``split``: "test", or its own "valid" / "train" part of trainval (the split it trained on)."""
    check_choice("split", split, ("test", "valid", "train"))
    if split == "test":
        return load_split(data_dir, "test", config.img_size, config.cache_dir, progress=progress)
    trainval = load_split(data_dir, "trainval", config.img_size, config.cache_dir, progress=progress)
    train_idx, valid_idx = split_trainval(trainval.records, config.valid_fraction, config.seed)
    return trainval.subset(valid_idx if split == "valid" else train_idx)


def format_result(result: dict) -> str:
    """A few readable lines: overall, per species, per breed (and TTA / tuned threshold)."""
    # scored at the run's img_size, against the trimaps resized to it (docs/results.md)
    at = f" at {result['img_size']} px" if result.get("img_size") else ""
    lines = [f"{result['run']} {result['checkpoint']}.pt on {result['split']} ({result['images']} images{at}): "
             f"Dice {result['dice']:.4f}  IoU {result['iou']:.4f}  accuracy {result['accuracy']:.4f}"
             + (f"  (epoch {result['epoch']})" if result.get("epoch") is not None else "")
             + (f"  (the same weights as {result['same_weights_as']}.pt: its evaluation)"
                if result.get("same_weights_as") else "")]
    # each species, then its breeds indented under it (37 breeds of two species read as one list)
    def group(name: str, m: dict, indent: str) -> str:
        return f"{indent}{name:<{48 - len(indent)}} Dice {m['dice']:.4f}  IoU {m['iou']:.4f}  ({m['images']} images)"

    breeds = result.get("per_breed", {})
    for species, m in result.get("per_species", {}).items():
        lines.append(group(species, m, "  "))
        lines += [group(b, bm, "    ") for b, bm in breeds.items() if bm.get("species") == species]
    lines += [group(b, bm, "  ") for b, bm in breeds.items() if bm.get("species") not in result.get("per_species", {})]

    def variant(label: str, m: dict, note: str = "") -> str:     # one column of figures for every variant
        return f"  {label + ':':<46} Dice {m['dice']:.4f}  IoU {m['iou']:.4f}{note}"

    if "tta" in result:
        lines.append(variant("with flip TTA", result["tta"]))
    if "threshold_tuned" in result:
        t = result["threshold_tuned"]
        lines.append(variant(f"threshold {t['threshold']:.2f} (tuned on valid)", t))
    if "tta_threshold_tuned" in result:
        t = result["tta_threshold_tuned"]
        lines.append(variant(f"flip TTA + threshold {t['threshold']:.2f} (tuned with TTA)", t))
    if "postprocess" in result:
        p = result["postprocess"]
        lines.append(variant("one pet (largest component, holes filled)", p,
                             f"  (valid Dice {p['valid_dice']:.4f} → {p['valid_dice_postprocessed']:.4f})"))
    if "tta_postprocess" in result:
        lines.append(variant("flip TTA + one pet", result["tta_postprocess"]))
    if result.get("skipped_pairs"):
        lines.append(f"  skipped {result['skipped_pairs']} unusable pairs")
    return "\n".join(lines)


# --------------------------------------------------------------------------- prediction
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"}


@torch.inference_mode()
def predict_image(model, image: np.ndarray, img_size: int, tta: bool = False,
                  size: tuple[int, int] | None = None) -> np.ndarray:
    """Pet probability H×W (float32) at the image's own resolution, or at ``size`` (H, W): the
    original's, for an image decoded at a reduced size."""
    dev = next(model.parameters()).device
    x = torch.tensor(image).permute(2, 0, 1).unsqueeze(0).float().div(255).to(dev)   # a copy: PIL's arrays are read-only
    x = normalize(F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True,
                                align_corners=False))
    logits = model(x)
    if tta:
        logits = (logits + model(x.flip(-1)).flip(-1)) / 2
    logits = F.interpolate(logits.float(), size=size or image.shape[:2], mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)[0, 0].cpu().numpy()


# Okabe & Ito's colour-blind-safe palette. Blue stands out on orange fur, red cars and brown
# blankets, where the red tint used before vanished; with vermillion and yellow it tells correct,
# false and missed pet pixels apart for red-green colour-blind eyes too.
PET_COLOR = (0, 114, 178)
ERROR_COLORS = {"correct pet": PET_COLOR, "false pet": (213, 94, 0), "missed pet": (240, 228, 66)}


def overlay(image: np.ndarray, mask: np.ndarray, color=PET_COLOR, alpha: float = 0.35) -> np.ndarray:
    """``image`` (H×W×3 uint8) with ``mask`` tinted in ``color`` and outlined in it, so that the
    mask's edge shows on any photo (the outline is ~1/160 of the image side, at least 1 px)."""
    out = image.astype(np.float32).copy()
    m = np.asarray(mask).astype(bool)
    _tint(out, m, color, alpha)
    out[_edge(m, max(1, round(min(m.shape) / 160)))] = color
    return out.astype(np.uint8)


def error_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """A greyscale copy of ``image`` with each pixel's verdict tinted (``ERROR_COLORS``): pet
    predicted and true, pet predicted where there is none, pet missed. Correct background stays
    grey. The verdicts are the only colour: on a red or orange photo the vermillion of false pet
    vanished into the photo's own colours, whatever the palette."""
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    grey = np.rint(image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))    # luma
    out = np.repeat(grey[..., None], 3, axis=-1)
    for m, color in zip((pred & truth, pred & ~truth, ~pred & truth), ERROR_COLORS.values()):
        _tint(out, m, color, alpha)
    return out.astype(np.uint8)


def _tint(out: np.ndarray, mask: np.ndarray, color, alpha: float) -> None:
    """Blend ``color`` into the float image ``out`` where ``mask`` is set, in place."""
    out[mask] = out[mask] * (1 - alpha) + np.asarray(color, np.float32) * alpha


def _edge(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels of ``mask`` within ``width`` px of its border (the mask minus its erosion)."""
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
                 & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


@dataclass
class Predictions:
    """What :func:`predict_images` did: the masks written and the files it could not read."""

    written: list[Path]
    skipped: list[str]          # one line per unreadable file, naming it and why
    checkpoint: Path | None = None      # the weights that predicted them


PREDICTION_SUFFIXES = ("_mask", "_overlay")    # the files predict_images writes: <name>_mask.png, ...


def predict_images(run: RunDir | str | Path, source: str | Path, out_dir: str | Path, *, img_size: int | None = None,
                   threshold: float = 0.5, tta: bool = False, postprocess: bool = False, which: str = "auto",
                   device="auto", progress: bool = True, output_dir: str | Path = "outputs/runs") -> Predictions:
    """Predict masks for one image or every image in a folder; save ``<name>_mask.png`` (0/255)
    and ``<name>_overlay.png`` at the original resolution (``<name>_<ext>_...`` where two files
    share a name, e.g. ``a.jpg`` and ``a.png``). Unreadable files in a folder are skipped and
    reported; one unreadable image given alone raises :class:`~labseg.data.BadSampleError`.
    ``postprocess`` keeps one pet per image (:func:`labseg.postprocess.clean_mask`)."""
    from tqdm.auto import tqdm

    if img_size is not None:
        check_img_size(img_size, hint=" (or leave it unset for the run's own)", at_most=None)
    for name, value in (("tta", tta), ("postprocess", postprocess)):
        check_switch(name, value)       # tta="no" would run the TTA
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 < threshold < 1):
        raise ConfigError(f"threshold={threshold!r}: expected a probability between 0 and 1, e.g. 0.5"
                          + (" (a number, not text)" if isinstance(threshold, str) else ""))
    source = resolve_path(source)     # relative: from the project root, as every path of the API
    out_dir = check_folder("out", out_dir)      # README.md/masks: before the first prediction, not at its write
    if source.is_dir():
        files = _sources_in(source)
        if not files:
            raise FileNotFoundError(f"{source} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
    elif source.is_file():
        files = [source]
    else:
        raise FileNotFoundError(f"{source} is neither an image file nor a folder")
    run = run if isinstance(run, RunDir) else RunDir.open(run, output_dir)
    model, config = load_run_model(run, which, device)
    img_size = img_size or config.img_size
    names = output_names(files)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for path in tqdm(files, desc="predicting", disable=not progress, **redraws(tqdm)):
        try:
            # as a viewer shows it (EXIF orientation); a photo above MAX_PIXELS decoded smaller
            image = load_image(path, upright=True, reduce=True)
            full = upright_size(path)
        except BadSampleError as e:
            if not source.is_dir():     # the one image asked for: an error, not a note and a repeat
                raise
            log.warning(f"skipped {e}")
            skipped.append(str(e))
            continue
        mask = predict_image(model, image, img_size, tta, size=full) >= threshold
        if postprocess:
            mask = clean_mask(mask)
        name = names[path]
        shown = mask
        if image.shape[:2] != full:     # the mask at the photo's size, the overlay at the decoded one
            log.warning(f"{path}: {full[1]}×{full[0]} px read at {image.shape[1]}×{image.shape[0]}; its mask is "
                        "written at the full size, its overlay at the reduced one")
            shown = np.asarray(Image.fromarray(mask).resize(image.shape[1::-1], Image.Resampling.NEAREST))
        # written whole or not at all, as every record: a Ctrl-C leaves no truncated PNG
        atomic_write_bytes(out_dir / f"{name}_mask.png", _png(Image.fromarray((mask * 255).astype(np.uint8))))
        atomic_write_bytes(out_dir / f"{name}_overlay.png", _png(Image.fromarray(overlay(image, shown))))
        written.append(out_dir / f"{name}_mask.png")
    return Predictions(written, skipped, run.checkpoint(which))


def output_names(files: list[Path]) -> dict[Path, str]:
    """Each source's output name (``<name>_mask.png``, ``<name>_overlay.png``), one per source,
    unique as a case-insensitive file system sees it: the stem; ``<stem>_<ext>`` where stems
    clash (``a.jpg``, ``a.png``, ``dup.JPG``); ``-2``, ``-3``... where that is taken too (``a.jpg``
    beside ``a_jpg.png``). Unique stems are served first, so a file keeps its own name."""
    stems = Counter(p.stem.lower() for p in files)
    names: dict[Path, str] = {}
    used: set[str] = set()
    for unique_stems in (True, False):
        for p in files:
            if (stems[p.stem.lower()] == 1) != unique_stems:
                continue
            base = p.stem if unique_stems else f"{p.stem}_{p.suffix.lstrip('.').lower()}"
            name, i = base, 2
            while name.lower() in used:
                name, i = f"{base}-{i}", i + 1
            used.add(name.lower())
            names[p] = name
    return names


def _sources_in(folder: Path) -> list[Path]:
    """The images in ``folder`` to predict: all but the masks and overlays that a prediction of
    the others wrote here before (a photo of one's own named ``x_mask.png`` is predicted).
    Subfolders are not searched, and that is said."""
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    looks_written = [p for p in images if p.suffix.lower() == ".png" and p.stem.endswith(PREDICTION_SUFFIXES)]
    others = [p for p in images if p not in looks_written]
    sources = others
    for _ in range(len(looks_written) + 1):     # to a fixed point: a kept x_mask.png has outputs of its own
        ours = {f"{name}{suffix}.png".lower() for name in output_names(sources).values() for suffix in PREDICTION_SUFFIXES}
        kept = sorted(others + [p for p in looks_written if p.name.lower() not in ours])
        if kept == sources:
            break
        sources = kept
    if subfolders := sorted(p.name for p in folder.iterdir() if p.is_dir()):
        log.warning(f"not searched: the subfolder(s) {', '.join(subfolders)} of {folder} (predict takes the "
                    "images in the folder itself; give a subfolder to predict its images)")
    return sources


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # zlib's fastest level: ~3.5x quicker than PIL's default for masks and overlays, files ~8% larger
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
