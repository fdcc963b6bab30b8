"""The training loop, read top to bottom in :func:`_fit` (sections marked ``# ----``; the loop
proper starts at "the loop:"), and its step loop, :func:`train_one_epoch`; :func:`fit` checks
the arguments, resolves the config (the recipe fills what is left out) and calls it.

    config → data (cached arrays, breed-stratified valid split) → model → optimizer → loop:
        for each epoch: train_one_epoch (augmented batches) → validate → records → checkpoints
    → summary.json

The checks before a run claims a folder, SAM's second pass and the augmentation phases are small
functions below the loop, so that the loop reads as its steps; continuing a stopped run is
:mod:`labseg.resume`'s (``_restore`` here puts a checkpoint's state back into the new network).

The learning rate follows a schedule of *progress*, the larger of (steps done / all steps) and
(time spent / time budget), so a run cut short by ``time_budget`` still warms up and decays fully.

Run on several processes with ``torchrun --nproc_per_node=N -m labseg.train --arch ...``:
each rank trains on its shard of every batch (DistributedDataParallel); rank 0 alone writes.
"""
from __future__ import annotations

import functools
import math
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn

from labseg.config import (MONITOR_MODE, UNTIL_BUDGET, ConfigError, RunConfig, check_portable_run_name, check_switch,
                           out_of_memory, pick_device, recorded_path)
from labseg.data import Batches, balanced_subset, check_layout, load_split, split_trainval
from labseg.losses import build_loss, deep_supervised
from labseg.machine import (channels_last_for, code_version, describe as describe_machine, give_back_freed_memory,
                            native_bf16)
from labseg.metrics import per_image_dice, per_image_iou
from labseg.models import build_model, check_installed, count_parameters, model_kwargs
from labseg.progress import RunBars, progress_modes
from labseg.resume import (asked_fields, check_same_images, images_digest, open_resumed, set_aside_evaluations,
                           update_resumed_folder)
from labseg.runs import CHECKPOINT_FORMAT, CheckpointError, CheckpointWriter, RunDir, _first_line, load_weights, run_name_for
from labseg.transforms import BatchAugment


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class FitResult:
    run: RunDir
    history: list[dict]
    summary: dict
    model: nn.Module = field(repr=False)


# --------------------------------------------------------------------------- pieces
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on norms and biases: decaying them only fights BatchNorm's scale.
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernels update all tensors in one pass: ~2.5× faster steps than the default on CPU.
    device = next(model.parameters()).device.type
    fused = {"fused": True} if device in ("cpu", "cuda") else {}
    if config.optimizer == "adam":
        # Adam's weight_decay is an L2 term in the gradient (the classic form).
        return torch.optim.Adam(groups, lr=config.lr, **fused)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, **fused)
    return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True, **fused)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state, each per-weight tensor in its weight's memory format.

    A run resumed where the default format differs (saved contiguous on an AVX2 CPU, resumed in
    channels_last on an AVX512 CPU or a GPU, or the other way) would pair weights and Adam moments
    of different layouts, and torch's fused CPU Adam walks both as flat arrays: the moments of one
    weight would update another, silently (seen with torch 2.14).
    """
    optimizer.load_state_dict(state)
    for param, slots in optimizer.state.items():
        for name, value in slots.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                slots[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


SWA_LR = 0.1   # the lr while weights are averaged (SWA), as a fraction of the base lr
# Warm-up never takes more than this share of training: counted in steps alone, one epoch of
# warm-up outlasted a time budget shorter than an epoch (full dataset, 256 px, on a CPU), and the
# whole run trained at a few % of its lr while the cosine decayed by time.
WARMUP_MAX_SHARE = 0.05
# ... and never fewer steps than this: a first step that takes 5% of a budget by itself
# (torch.compile, a cold cache) would otherwise end the warm-up at step 1. Few, since where 20
# steps outlast 5% of a budget (the full dataset at 256 px on a CPU), 20 steps of warm-up kept
# the lr under half its peak while the cosine decayed by time.
WARMUP_MIN_STEPS = 3


def lr_factor(schedule: str, progress: float, step: int = 0, warmup_steps: int = 0,
              swa_start: float = 0.0) -> float:
    """Multiplier of the base lr: a linear warm-up over the first ``warmup_steps`` steps (or the first
    ``WARMUP_MAX_SHARE`` of ``progress`` but at least ``WARMUP_MIN_STEPS``, whichever ends first),
    times the schedule's decay at ``progress`` ∈ [0, 1] of training (steps or time budget,
    whichever is further).

    With ``swa_start`` (cosine only), the cosine reaches ``SWA_LR`` at that fraction of training and
    the lr stays there while the weights are averaged: a constant lr keeps the averaged models
    apart, which is what makes their mean better than any one of them (Izmailov et al., 2018).
    """
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "onecycle":     # its own warm-up: ramp up over 30% (from lr/25), then cosine to ~0
        peak = 0.3
        if progress < peak:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * progress / peak)) / 2
        return 0.5 * (1 + math.cos(math.pi * (progress - peak) / (1 - peak))) * (1 - 1e-4) + 1e-4
    if warmup_steps > 0:
        warmed = max(step / warmup_steps, min(progress / WARMUP_MAX_SHARE, step / WARMUP_MIN_STEPS))
    else:
        warmed = 1.0
    warm = min(1.0, 0.01 + 0.99 * warmed)
    if schedule == "cosine":       # from 1 down to 0.01 of the base lr (or to SWA_LR by swa_start)
        floor, end = (SWA_LR, swa_start) if swa_start else (0.01, 1.0)
        return warm * (0.5 * (1 + math.cos(math.pi * min(progress / end, 1.0))) * (1 - floor) + floor)
    return warm                    # "plateau" (ReduceLROnPlateau scales on top) and "none"


class WeightEMA(torch.optim.swa_utils.AveragedModel):
    """The exponential moving average of the weights and BatchNorm statistics that AveragedModel with
    get_ema_multi_avg_fn keeps, updated without a host-device sync. torch's update compares and
    copies its step counter, a CPU tensor, to the GPU at every step (a blocking copy, so the host
    waits for the step to finish); here the counter is only read on the CPU. The state_dict is
    AveragedModel's, so checkpoints of either load in the other."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()],
                         [t.detach() for t in (*model.parameters(), *model.buffers())], strict=True))
        weights = [(mine, theirs) for mine, theirs in pairs if mine.is_floating_point()]
        if self.n_averaged.item() == 0:        # on the CPU: the first update copies the model
            for mine, theirs in pairs:
                mine.copy_(theirs)
        else:
            # the call torch's EMA makes: mine += (1 - decay) * (theirs - mine), one kernel per group
            torch._foreach_lerp_([m for m, _ in weights], [t for _, t in weights], 1 - self.decay)
            for mine, theirs in pairs:         # counts (num_batches_tracked) are copied, not averaged
                if not mine.is_floating_point():
                    mine.copy_(theirs)
        self.n_averaged += 1


@torch.no_grad()
def _sam_ascent(params: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """Move the weights by rho along their gradient (SAM, Foret et al. 2021); returns the steps.

    The step is rho·g/‖g‖ over all parameters, so a scaled (fp16) gradient gives the same step.
    A scaled gradient that overflowed (inf: GradScaler then skips the step) gives no step at all;
    inf/inf would have put NaN into the weights for good. Computed on the device: no host sync."""
    grads = [p.grad for p in params]
    # the L2 norm of all gradients together (torch.nn.utils.get_total_norm, which torch < 2.6 lacks)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    steps = torch._foreach_mul(grads, rho / (norm + 1e-12))
    finite = torch.isfinite(norm)
    steps = [torch.where(finite, s, torch.zeros_like(s)) for s in steps]
    torch._foreach_add_(params, steps)
    return steps


@contextmanager
def _frozen_batchnorm_stats(model: nn.Module):
    """BatchNorm layers keep their running statistics (momentum 0) inside this block.

    SAM's second pass sees the same batch at perturbed weights; its statistics must not count twice."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


def _whole_batches(split, indices, batch_size: int, **options) -> Batches:
    """Batches of ``batch_size`` images, the remainder left out (a last batch of one image would
    give BatchNorm the statistics of that image alone); one batch of them all where there are
    fewer images than a batch."""
    batches = Batches(split, indices, batch_size, drop_last=True, **options)
    if len(batches) == 0:
        batches.drop_last = False
    return batches


def _finish_swa(swa, batches: Batches) -> nn.Module:
    """The averaged network with BatchNorm statistics recomputed for its own weights.

    The running means and variances of the averaged models do not belong to the averaged weights,
    so one pass over the training images (no augmentation) measures them again."""
    torch.optim.swa_utils.update_bn((b.image for b in batches), swa.module)
    return swa.module


@torch.inference_mode()
def validate(model: nn.Module, batches: Batches, loss_fn, amp_dtype=None, bars: "RunBars | None" = None) -> dict:
    """Valid loss and per-image Dice/IoU, accumulated on the device (one sync at the end); a bar
    from the run's ``bars``, if given."""
    was_training = model.training
    model.eval()
    dev = batches.device
    loss_sum, n = torch.zeros((), device=dev), 0
    dice, iou = [], []
    with (bars or RunBars(False)).bar("validation", len(batches), "validation") as bar:
        for batch in batches:
            with _autocast(dev, amp_dtype):
                logits = model(batch.image)
            logits = logits.float()
            loss_sum += loss_fn(logits, batch.target, batch.valid) * len(batch.index)
            n += len(batch.index)
            dice.append(per_image_dice(logits, batch.target, from_logits=True))
            iou.append(per_image_iou(logits, batch.target, from_logits=True))
            bar.update()
    model.train(was_training)
    return {"valid_loss": (loss_sum / max(n, 1)).item(),
            "valid_dice": torch.cat(dice).mean().item(), "valid_iou": torch.cat(iou).mean().item()}


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _amp_dtype(config: RunConfig, device: torch.device):
    # Default (amp=None): on for CUDA, and on a CPU with native bf16, where it trains ~1.8x faster
    # (resnet34_unet 15.8 -> 28 img/s, unet 2.2 -> 4.5 img/s at 128 px, batch 16; docs/benchmarks.md).
    use = config.amp if config.amp is not None else (device.type == "cuda" or native_bf16(device))
    if not use:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.bfloat16


def _improved(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if MONITOR_MODE[metric] == "min" else value > best


# --------------------------------------------------------------------------- the loop
def fit(config: RunConfig | dict | None = None, *, resume: bool | str = False, overwrite: bool = False,
        progress: bool | str = True, callback=None, **overrides) -> FitResult:
    """Train a model as ``config`` says and record the run. Returns the run, its history and the
    trained network (in eval mode).

    ``progress``: True, a bar for each pass and a line per epoch; ``"bars"``, the bars alone (the
    notebooks, whose live plot shows each epoch); False, quiet.

    ``resume``: False for a new run; True or ``"last"`` to continue ``config.run_name`` from
    ``last.pt``; ``"best"`` to continue from ``best.pt`` where an older labseg kept a training state
    in it (best.pt now keeps the weights only).
    ``callback(history)`` is called after every epoch (live plots in the notebook).
    Keyword ``overrides`` set config fields, e.g. ``fit(arch="unet", epochs=3)``. On resume, the
    fields of ``config`` still at RunConfig's defaults count as not given; pass a field as a
    keyword to have it checked against the run's record.
    """
    check_switch("overwrite", overwrite)    # papermill's -p overwrite false is the text "false"
    if not (isinstance(resume, bool) or resume in ("last", "best")):
        raise ConfigError(f"resume={resume!r}: expected False, True (from last.pt), \"last\" or \"best\"")
    if resume and overwrite:    # which one was meant cannot be guessed, and one of them loses the run
        raise ConfigError("resume and overwrite contradict each other: --resume continues the run, "
                          "--overwrite deletes it and starts over; give one")
    # the lines printed (per epoch, and the data's notes): a notebook's "bars" leave them to its live plot
    show_bars, lines = progress_modes(progress)
    if callback is not None and not callable(callback):     # found now, not after the first epoch
        raise ConfigError(f"callback={callback!r}: expected a function of the history, or None")
    if isinstance(config, dict):
        config = RunConfig.from_dict(config)   # fit({"arch": "unet", ...}) as well as fit(RunConfig(...))
    elif config is not None and not isinstance(config, RunConfig):
        raise ConfigError(f"config={config!r}: expected a RunConfig, a dict of its fields or None (a file of "
                          "them: RunConfig.from_dict(yaml.safe_load(open(path))))")
    asked = asked_fields(config, overrides)   # what the caller set; a resume checks it against the record
    given = config.to_dict() if config is not None else {}
    config = RunConfig.from_dict({**given, **overrides}).with_recipe().validate()
    check_installed(config.arch)
    if not resume:      # an existing folder resumes under its name, whatever it is
        check_portable_run_name(config.run_name)
    # Resources held while training (the run's .training lock) are let go however fit ends.
    try:
        with ExitStack() as held:
            return _fit(held, config, asked, resume=resume, overwrite=overwrite, show_bars=show_bars, lines=lines,
                        callback=callback)
    finally:
        give_back_freed_memory()    # the optimizer, batches and checkpoint buffers: freed, and returned


def _fit(held: ExitStack, config: RunConfig, asked: dict, *, resume, overwrite, show_bars: bool, lines: bool,
         callback) -> FitResult:
    """:func:`fit`'s body, for a checked ``config`` (``asked``: the fields the caller gave); ``held``
    keeps what must be released when it returns or raises."""
    dist = _Distributed.from_env()
    device = dist.device or pick_device(config.device)
    if device.type == "cuda":
        # The shapes repeat every step: cuDNN times its kernels once per shape and keeps the fastest.
        torch.backends.cudnn.benchmark = True
    if config.num_threads:
        torch.set_num_threads(config.num_threads)

    # ---- a resumed run: its recorded config and checkpoint (a new run's folder is made below,
    # once the data and the network are ready, so that a run that cannot start leaves none)
    run, resumed, resumed_from, summary_only = None, None, None, False
    if resume:
        which = "best" if resume == "best" else "last"
        run, config, resumed, resumed_from, summary_only = open_resumed(config, asked, which, dist, held)
    else:
        check_layout(config.data_dir)
        config = replace(config, data_dir=recorded_path(config.data_dir))   # valid from another clone too
    if config.batch_size % dist.world:      # before the data's cache is built, and a resumed folder touched
        raise ConfigError(f"batch_size={config.batch_size} with {dist.world} processes: expected a multiple of "
                          f"{dist.world}, the images of a step shared out evenly (each process takes batch_size/"
                          f"{dist.world})")

    seed_everything(config.seed)
    amp_dtype = _amp_dtype(config, device)
    # fp16 (GPUs without bf16, e.g. a T4) needs loss scaling against gradient underflow; with
    # bf16 or fp32 the scaler is disabled and passes everything through.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- data: cached arrays, breed-stratified valid split of trainval
    trainval = load_split(config.data_dir, "trainval", config.img_size, config.cache_dir, progress=lines)
    train_idx, valid_idx = split_trainval(trainval.records, config.valid_fraction, config.seed)
    if resumed is not None:
        check_same_images(resumed, trainval, config, run)
    _check_split_sizes(trainval, train_idx, valid_idx, config)
    if config.max_train_images:
        train_idx = balanced_subset(trainval.records, train_idx, config.max_train_images)
    augment = BatchAugment.from_config(vars(config))
    channels_last = channels_last_for(device, config.channels_last)
    batch_options = dict(device=device, channels_last=channels_last, ignore_border=config.ignore_border)
    train_batches = _whole_batches(trainval, dist.shard(train_idx), config.batch_size // dist.world, shuffle=True,
                                   seed=config.seed, augment=augment, **batch_options)
    valid_batches = Batches(trainval, valid_idx, config.batch_size, **batch_options)

    # ---- model, optimizer, loss
    model = build_model(config.arch, **model_kwargs(config)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=MONITOR_MODE[config.monitor], factor=0.5,
                                                          patience=3) if config.scheduler == "plateau" else None)
    loss_fn = build_loss(config.loss)
    # A deep-supervised network returns (logits, aux logits) in training; validation sees logits only.
    train_loss_fn = deep_supervised(loss_fn) if config.deep_supervision else loss_fn
    ema = WeightEMA(model, config.ema) if config.ema else None
    # SWA averages one snapshot per epoch from config.swa of training on (equal weights).
    swa = torch.optim.swa_utils.AveragedModel(model) if config.swa else None
    eval_model = ema.module if ema is not None else model    # the weights validated, kept and returned
                                                             # (unless SWA's replace them at the end)
    # the lrs the schedule scales: config.lr, or what ReduceLROnPlateau has made of it
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    history, best, first_epoch = [], None, 1
    if resumed is not None:
        _restore(resumed, str(resumed_from), config, model, optimizer, plateau, ema, swa, scaler)
        base_lrs = list(resumed.get("base_lrs") or [config.lr] * len(base_lrs))
        history, best, first_epoch = list(resumed["history"]), resumed.get("best"), resumed["epoch"] + 1
        if dist.is_main:
            run.write_metrics(history)     # the checkpoint's history is the truth after a kill
        if dist.is_main and not summary_only:
            print(f"labseg: resuming {run.path} after epoch {resumed['epoch']} (from {resumed_from.name})")
    step_model = dist.wrap(model)
    if config.compile:
        step_model = torch.compile(step_model)
    warmup_steps = int(round((config.warmup_epochs or 0) * len(train_batches)))

    # ---- the clock starts: the lr schedule and the time budget follow it (over all sessions of a run)
    done = resumed or {}
    clock = _Clock(total_steps=len(train_batches) * config.epochs, budget=config.time_budget_s,
                   step=done.get("step", 0), elapsed_before=done.get("elapsed", 0.0), agree_max=dist.agree_max,
                   reserve=_seconds(done.get("valid_seconds")))

    # ---- the run folder, claimed only now that the network is known to give the right output
    check_logits(model, config.arch, config.img_size, device, channels_last)
    check_training_step(model, config, train_loss_fn, device, channels_last)
    if min(train_batches.batch_size, len(train_batches.indices)) == 1:
        check_batches_of_one(model, config, device, channels_last)
    if resumed is not None and dist.is_main:
        # only once every check has passed: a refused resume leaves the run's records as they were
        update_resumed_folder(run, config, resumed, resumed_from)
    if not resume and dist.is_main:
        # A name given is that run's: an existing one is refused (resume or overwrite it), never
        # silently moved to NAME-2, where a notebook written into NAME would describe the wrong run.
        run = RunDir.create(config.output_dir, config.run_name or run_name_for(config), overwrite=overwrite,
                            exist="error" if config.run_name else "suffix")
        held.enter_context(run.lock_for_training())
        config = replace(config, run_name=run.path.name)    # the records name their run
        run.write_config(config)
    machine = describe_machine(device, amp_dtype, channels_last)
    # A resumed run may continue on another machine: the checkpoint carries one record per session.
    sessions = [*((resumed.get("machines") or []) if resumed is not None else []),
                {**machine, "world_size": dist.world, "first_epoch": first_epoch, "code": code_version()}]
    if dist.is_main and not summary_only:
        print(f"labseg: training {config.arch} ({count_parameters(model) / 1e6:.1f}M parameters) on {device} "
              f"({machine['precision']}, {machine['memory_format']}), "
              f"{len(train_idx)} train / {len(valid_idx)} valid images at {config.img_size}px → {run.path}")
        if config.low_res_size and config.low_res_until:
            print(f"labseg: whole images at {config.low_res_size}px for the first {config.low_res_until:.0%} of "
                  f"training (low_res_scale {config.low_res_scale:g}), then at {config.img_size}px")
        elif config.low_res_scale and "low_res_scale" in asked:     # the recipe's at 64 px goes without saying
            print(f"labseg: low_res_scale {config.low_res_scale:g} of {config.img_size}px rounds to "
                  f"{'nothing' if config.img_size * config.low_res_scale < 16 else f'{config.img_size}px'} "
                  "(sizes are multiples of 32): no low-resolution phase")

    # ---- checkpoints: last.pt at most every checkpoint_every seconds, best.pt at each new best
    writer = CheckpointWriter()     # serialises and writes in the background, each file atomically

    def checkpoint(epoch: int, deployed: nn.Module | None = None, holds_best: bool = False) -> dict:
        """Everything a resume needs; ``deployed`` (averaged weights) goes in "model" if given.
        ``holds_best``: these weights are best.pt's too (a resume rewrites best.pt from them if a
        kill fell between the two writes)."""
        ckpt = {"format_version": CHECKPOINT_FORMAT, "arch": config.arch, "config": config.to_dict(),
                "epoch": epoch, "step": clock.step, "elapsed": clock.spent(), "valid_seconds": clock.reserve,
                "best": best, "history": history,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "plateau": plateau.state_dict() if plateau is not None else None,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "ema": ema.state_dict() if ema is not None else None,
                "swa": swa.state_dict() if swa is not None else None, "machines": sessions,
                "trainval": images_digest(trainval),
                "base_lrs": list(base_lrs), "holds_best": holds_best}
        if deployed is not None:    # evaluate and deploy the averaged weights
            ckpt["model"] = deployed.state_dict()
            ckpt["raw_model"] = model.state_dict()
        return ckpt

    saved_at, saved_epoch = time.perf_counter(), first_epoch - 1
    on_disk = {"epoch": first_epoch - 1}      # last.pt's epoch once written (the writer thread sets it)

    def written(epoch: int, rows: list[dict]) -> None:
        on_disk["epoch"] = epoch
        run.write_metrics(rows)

    def replacing_the_weights() -> None:
        if resumed is not None and saved_epoch == first_epoch - 1:     # a resume's first write
            set_aside_evaluations(run, first_epoch - 1)

    def save(epoch: int, best_too: bool = False) -> None:
        """last.pt (and best.pt), then the records up to ``epoch``."""
        nonlocal saved_at, saved_epoch
        if dist.is_main:
            replacing_the_weights()
            # Serialising resnet34_unet's 290 MB (weights and AdamW moments) takes ~0.35 s of the
            # training thread (~3% of a bf16 epoch at 128 px on 2 cores) and the write 0.2-1.3 s
            # on the same cores, hence at most every `checkpoint_every` s, best.pt excepted.
            # best.pt keeps the weights only (93 MB), after last.pt: a kill between the two leaves
            # last.pt holding the best epoch, and a resume writes best.pt from it
            # (resume.update_resumed_folder).
            writer.submit(checkpoint(epoch, ema.module if ema is not None else None, holds_best=best_too),
                          run.checkpoint("last"), weights_to=run.checkpoint("best") if best_too else None,
                          then=functools.partial(written, epoch, list(history)))
        saved_at, saved_epoch = time.perf_counter(), epoch

    # ---- the loop: train an epoch, validate, record, checkpoint, decide whether to go on
    stop_reason, since_best = "completed all epochs", _epochs_since_best(history, config.monitor)
    bars = RunBars(show_bars and dist.is_main)
    no_gain = f"early stopping: no {config.monitor} gain in {config.patience} epochs"
    of_epochs = f"/{config.epochs}" if config.epochs < UNTIL_BUDGET else f" ({config.time_budget} budget)"
    try:
        for epoch in range(first_epoch, config.epochs + 1):
            train_batches.set_epoch(epoch)
            clock.tick()
            # only on a resume: its last session had stopped, and was killed before writing the summary
            if clock.budget and clock.seen >= clock.budget:
                stop_reason = f"time budget of {config.time_budget} spent"
                break
            if config.patience and since_best >= config.patience:
                stop_reason = no_gain
                break
            _set_augment_phase(augment, config, clock.progress())
            epoch_start = time.perf_counter()
            try:
                train_loss, images, out_of_time = train_one_epoch(
                    step_model, model, train_batches, optimizer, train_loss_fn, config, clock, base_lrs, epoch,
                    scaler=scaler, ema=ema, amp_dtype=amp_dtype, warmup_steps=warmup_steps,
                    desc=f"epoch {epoch}{of_epochs}", augment=augment, bars=bars)
            except TrainingDiverged as e:
                writer.join()       # a checkpoint being written counts as kept
                kept = run is None or any(run.checkpoint(w).exists() for w in ("best", "last"))
                where = (f"The last good checkpoint is kept in {run.path if run else '(rank 0)'}" if kept else
                         "No epoch had finished, so nothing is kept")
                raise TrainingDiverged(f"{e}; training stopped. {where}. Try a lower lr (now {config.lr:g}) "
                                       "or another loss.") from None
            seconds = time.perf_counter() - epoch_start
            if swa is not None and clock.progress() >= config.swa:
                swa.update_parameters(model)

            # Under torchrun every rank takes rank 0's scores: the ranks' copies differ in their
            # BatchNorm statistics after the last step, and early stopping must stop them all.
            valid_start = time.perf_counter()
            scores = dist.from_main(validate(eval_model, valid_batches, loss_fn, amp_dtype, bars=bars))
            clock.validated(dist.agree_max(time.perf_counter() - valid_start))
            row = {"epoch": epoch, "train_loss": train_loss, **scores,
                   "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 2),
                   "images_per_s": round(images * dist.world / max(seconds, 1e-9), 2)}
            history.append(row)
            improved = _improved(config.monitor, row[config.monitor], best)
            if improved:
                best = row[config.monitor]
            if plateau is not None:     # stepped before the checkpoint, so that it holds this epoch's
                plateau.step(row[config.monitor])
                base_lrs[:] = [g["lr"] for g in optimizer.param_groups]
            if improved or time.perf_counter() - saved_at >= config.checkpoint_every:
                save(epoch, best_too=improved)
            if callback is not None:
                callback(history)
            if dist.is_main and lines:
                print(_epoch_line(row, improved))

            since_best = 0 if improved else since_best + 1
            if out_of_time:
                stop_reason = f"time budget of {config.time_budget} spent"
                break
            if clock.budget and clock.tick() + dist.agree_max(seconds) + clock.reserve > clock.budget:
                stop_reason = f"time budget of {config.time_budget} spent (no time for another epoch)"
                break
            if config.patience and since_best >= config.patience:
                stop_reason = no_gain
                break
        bars.close()
        trained_for = clock.spent()         # the summary's, as last.pt records it: without the last write
        if history and saved_epoch != history[-1]["epoch"]:
            save(history[-1]["epoch"])      # the final epoch is always in last.pt
        writer.wait()
    except BaseException as e:
        writer.join()
        kept = any(run.checkpoint(w).exists() for w in ("best", "last")) if dist.is_main else True
        if not resume and not kept:
            run.release()   # died before its first checkpoint (a network's first step, Ctrl-C): nothing to keep
        if (isinstance(e, (KeyboardInterrupt, OSError)) or out_of_memory(e)) and dist.is_main:
            # for the message that says what to do next (cli.main): resume, or simply run it again
            e.run_folder, e.saved_epoch = (run.path, on_disk["epoch"]) if kept else (None, None)
        if isinstance(e, KeyboardInterrupt) and dist.is_main and show_bars and not lines:
            # a notebook's kernel interrupt: cli.main says this in its terms, a notebook in its own
            print(_how_to_go_on(run.path if kept else None, on_disk["epoch"]), file=sys.stderr)
        raise
    finally:
        writer.join()       # the last submitted checkpoint is on disk before any error propagates

    # ---- the summary (and, with SWA, the averaged weights)
    summary = _summary(config, history, stop_reason, trained_for, count_parameters(model), trainval,
                       len(train_idx), len(valid_idx))
    # Where and how the run trained (a budget run's figures depend on it): "machine" is this, the
    # last, session; a resumed run lists every session's, from the epoch it started at, in "machines".
    summary["machine"] = {**machine, "world_size": dist.world}
    if len(sessions) > 1:
        summary["machines"] = sessions
    # when and from what code: the order of runs (runs.trained_at) survives copying their folders
    summary["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    summary["code"] = sessions[-1]["code"]      # this session's; each session's is in "machines"
    final_model = eval_model
    if swa is not None and int(swa.n_averaged) > 0:
        # The averaged weights become last.pt (and best.pt if they validate best); their valid
        # figures go in the summary, not in the per-epoch history. Stopped here (an interrupt, a
        # full disk), the run is kept up to its last epoch, and a resume does only this.
        with _where_the_run_is(run, on_disk["epoch"]) if dist.is_main else nullcontext():
            final_model = _finish_swa(swa, _whole_batches(trainval, train_idx, config.batch_size, **batch_options))
            scores = validate(final_model, valid_batches, loss_fn, amp_dtype)
            # A resume that trained no epoch after last.pt kept the averaged weights ("raw_model": the
            # trained ones beside them): "best" already holds their score, and whether they validated
            # best is what that write recorded (holds_best), not a second comparison with itself.
            finished_before = (resumed is not None and "raw_model" in resumed
                               and first_epoch > history[-1]["epoch"])
            improved = (bool(resumed.get("holds_best")) if finished_before
                        else _improved(config.monitor, scores[config.monitor], best))
            if improved:
                best = scores[config.monitor]
            summary.update({"swa_epochs": int(swa.n_averaged), "swa_valid_dice": scores["valid_dice"],
                            "swa_valid_iou": scores["valid_iou"], "swa_valid_loss": scores["valid_loss"],
                            "best_is_swa": improved,
                            # its BatchNorm pass and validation are training time too, as last.pt records it
                            "train_seconds": round(clock.spent(), 1)})
            if dist.is_main:
                replacing_the_weights()     # a resume that trained no epoch but finishes the averaging
                writer.submit(checkpoint(history[-1]["epoch"], final_model, holds_best=improved),
                              run.checkpoint("last"), weights_to=run.checkpoint("best") if improved else None)
                writer.wait()
                if lines:
                    print(f"labseg: weights averaged over the last {int(swa.n_averaged)} epochs: valid_dice "
                          f"{scores['valid_dice']:.4f}{' (best: now best.pt)' if improved else ''}")
    if dist.is_main:
        with _where_the_run_is(run, on_disk["epoch"]):
            run.write_summary(summary)
        if lines:
            skipped = f"skipped {summary['skipped_pairs']} unusable pairs; " if summary["skipped_pairs"] else ""
            print(f"labseg: {stop_reason}; best {config.monitor} {summary['best_' + config.monitor]:.4f} "
                  f"at epoch {summary['best_epoch']}; {skipped}records in {run.path}")
    dist.close()
    return FitResult(run, history, summary, final_model.eval())


@contextmanager
def _where_the_run_is(run: RunDir, epoch: int):
    """An OSError here (a full disk) or an interrupt carries the run folder and last.pt's epoch, for
    the line that says how to go on (cli.main); a resume then finishes the run."""
    try:
        yield
    except (OSError, KeyboardInterrupt) as e:
        e.run_folder, e.saved_epoch = run.path, epoch
        raise


def train_one_epoch(step_model: nn.Module, model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
                    loss_fn, config: RunConfig, clock: "_Clock", base_lrs: list[float], epoch: int, *,
                    scaler=None, ema=None, amp_dtype=None, warmup_steps: int = 0, desc: str = "",
                    show_progress: bool = True, augment=None, bars: "RunBars | None" = None) -> tuple[float, int, bool]:
    """One pass over the training batches: the lr for this step, forward, loss, backward, optimizer
    step. Returns the epoch's mean loss, the images it stepped on (this process's) and whether the
    time budget ran out before its end.

    ``step_model`` is ``model`` as the steps call it (wrapped by DDP or torch.compile, or itself).
    ``augment`` (the batches' BatchAugment) takes its phase for the progress after each step: a
    phase that ended with an epoch never ended in a budget of one or two long epochs.
    ``bars`` (the run's :class:`labseg.progress.RunBars`) gives the epoch its progress bar.
    """
    if scaler is None:      # fp32 and bf16: a scaler that passes everything through
        scaler = torch.amp.GradScaler(batches.device.type, enabled=False)
    loss_sum, steps, images, out_of_time = torch.zeros((), device=batches.device), 0, 0, False
    shown: dict[str, str] = {}      # the loss and lr the bar shows, as of the last sync
    with (bars or RunBars(show_progress)).bar("train", len(batches), desc) as bar:
        for batch in batches:
            # this step's lr = base lr (ReduceLROnPlateau may have lowered it) × warm-up × schedule(progress)
            factor = lr_factor(config.scheduler, clock.progress(), step=clock.step, warmup_steps=warmup_steps,
                               swa_start=config.swa)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor

            with _autocast(batches.device, amp_dtype):
                out = step_model(batch.image)   # logits, or (logits, [aux logits]) with deep supervision
            # loss_fn is the training loss (deep_supervised when the model has aux heads); outside
            # autocast on purpose: each loss computes in fp32 (labseg.losses)
            loss = loss_fn(out, batch.target, batch.valid)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.sam:
                _sam_second_pass(step_model, model, batch, loss_fn, optimizer, scaler, config.sam, amp_dtype)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)

            loss_sum += loss.detach()
            steps, images = steps + 1, images + len(batch.index)
            clock.step += 1
            clock.tick()
            if augment is not None:
                _set_augment_phase(augment, config, clock.progress())   # for the next batch
            if steps % config.log_every == 0 or steps == len(batches) or steps == 1:
                mean = (loss_sum / steps).item()       # the only host sync of the step loop
                if clock.agree_max(float(not math.isfinite(mean))):     # on any rank: all stop
                    raise TrainingDiverged(f"loss became {mean} at epoch {epoch}, step {steps}")
                shown = {"loss": f"{mean:.4f}", "lr": f"{optimizer.param_groups[0]['lr']:.2e}"}
            if not bar.disable and (clock.budget or steps % config.log_every == 0 or steps in (1, len(batches))):
                # the bar's own estimate is the epoch's; under a budget, what is left of the budget
                # (host time: no sync), each step, since a budget may end an epoch before log_every
                left = {"budget_left": _mmss(clock.budget - clock.seen)} if clock.budget else {}
                bar.set_postfix({**shown, **left}, refresh=False)     # in this order (keywords are sorted)
            bar.update()
            if clock.out_of_time():
                out_of_time = True
                break
    return (loss_sum / max(steps, 1)).item(), images, out_of_time


# --------------------------------------------------------------------------- pieces of the loop
@dataclass
class _Clock:
    """Where training stands: optimizer steps taken, and seconds spent, earlier sessions of a
    resumed run included. The lr schedule and the augmentation phases follow its progress.

    The decisions read the time as of the last :meth:`tick` (each step, each epoch), not each its
    own: under torchrun ``agree_max`` makes that every rank's largest, so that all ranks take the
    same lr and stop at the same step (each rank's own clock let one start a step the others
    never joined, and their lrs drift apart).
    """

    total_steps: int
    budget: float | None = None                # seconds, or None: no time budget
    step: int = 0
    elapsed_before: float = 0.0                # seconds spent by the sessions before this one
    agree_max: Callable[[float], float] = float     # _Distributed.agree_max; one process: as is
    started: float = field(default_factory=time.perf_counter)
    seen: float = 0.0                          # spent() as of the last tick, agreed by the ranks
    reserve: float = 0.0                       # seconds a validation takes (the quickest measured; 0: none yet)

    def spent(self) -> float:
        return time.perf_counter() - self.started + self.elapsed_before

    def tick(self) -> float:
        """Read the time for the decisions up to the next tick; every rank must call it alike."""
        self.seen = self.agree_max(self.spent())
        return self.seen

    def progress(self) -> float:
        """Fraction of training done: by steps, or by time when a budget is set, whichever is further."""
        return max(self.step / max(self.total_steps, 1), self.seen / self.budget if self.budget else 0.0)

    def validated(self, seconds: float) -> None:
        """A validation took ``seconds`` (agreed by the ranks). The quickest one is kept: each
        validates the same images on the same network, so a slower one is a one-off (a cold
        cache, kernel autotuning) that would stop the run an epoch early. Before the first (a
        run's first epoch), none is reserved: a budget shorter than an epoch ends one validation late."""
        self.reserve = seconds if not self.reserve else min(self.reserve, seconds)

    def out_of_time(self) -> bool:
        """The budget is spent, or will be by the end of the validation that follows."""
        return bool(self.budget) and self.seen + self.reserve > self.budget


def _sam_second_pass(step_model, model, batch, loss_fn, optimizer, scaler, rho: float, amp_dtype) -> None:
    """SAM (Foret et al. 2021): take the gradient again at the worst nearby weights (a flatter
    minimum), then leave the weights where they were, for the optimizer to step from with it."""
    params = [p for p in model.parameters() if p.grad is not None]
    steps = _sam_ascent(params, rho)
    with _frozen_batchnorm_stats(model), _autocast(batch.image.device, amp_dtype):
        out = step_model(batch.image)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss_fn(out, batch.target, batch.valid)).backward()
    with torch.no_grad():
        torch._foreach_sub_(params, steps)      # back to the weights the step starts from


def _seconds(value) -> float:
    """A checkpoint's record of seconds, or 0.0 where it has none (older) or a damaged one."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else 0.0


def _mmss(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds // 60 % 60:02d}"


def _set_augment_phase(augment: BatchAugment, config: RunConfig, progress: float) -> None:
    """The augmentations that change over training, set for ``progress`` ∈ [0, 1]."""
    augment.crop_size = config.crop_size if config.crop_size and progress < config.crop_until else None
    # Progressive resizing: the early epochs on smaller images (faster steps), the last ones at
    # img_size, the size valid and test images are scored at.
    low_res = config.low_res_size and progress < config.low_res_until
    augment.low_res_size = config.low_res_size if low_res else None
    # Mosaics can stop before the end (YOLOv8's close_mosaic): the last epochs then see single,
    # full-size pets, as every valid and test image is.
    augment.mosaic = config.mosaic if progress < config.mosaic_until else 0.0


def _how_to_go_on(folder, epoch: int) -> str:
    """After a notebook's training was interrupted: what is kept, and how the notebook goes on."""
    if folder is None:
        return ("labseg: interrupted before the run's first checkpoint: nothing was kept; run the cell "
                "again to start over")
    held = f"the run up to epoch {epoch}" if epoch else "its first checkpoint, last.pt"
    return (f"labseg: interrupted; {folder} holds {held}. To continue it, set run_name = {folder.name!r} "
            "and resume = True, and run the configuration and training cells again "
            f"(`labseg train --run-name {folder.name} --resume` in a terminal)")


def _epoch_line(row: dict, improved: bool) -> str:
    """The line printed after each epoch; ``*`` marks a new best checkpoint."""
    return (f"epoch {row['epoch']:3d}  train_loss {row['train_loss']:.4f}  valid_loss {row['valid_loss']:.4f}  "
            f"valid_dice {row['valid_dice']:.4f}  valid_iou {row['valid_iou']:.4f}  "
            f"{row['images_per_s']:.1f} img/s{'  * new best' if improved else ''}")


def _check_split_sizes(trainval, train_idx, valid_idx, config: RunConfig) -> None:
    """Both splits hold images: found now, not by torch.cat after a whole epoch, and an untrained
    network is not recorded as a finished run."""
    if len(valid_idx) == 0:
        breeds = len({r.breed for r in trainval.records})
        raise ConfigError(f"no validation image: {len(trainval.records)} trainval image(s) of {breeds} breed(s) in "
                          f"{config.data_dir} leave none at valid_fraction={config.valid_fraction}; the split "
                          "takes valid images from breeds with 2 or more, so that each breed also keeps one "
                          "to train on: add images")
    if len(train_idx) == 0:
        raise ConfigError(f"no training image: valid_fraction={config.valid_fraction} puts all "
                          f"{len(trainval.records)} trainval image(s) in {config.data_dir} in the valid split "
                          "(a breed with a single image gives it to one split only); lower valid_fraction or "
                          "add images")


def _restore(resumed: dict, source: str, config: RunConfig, model, optimizer, plateau, ema, swa, scaler) -> None:
    """Put a checkpoint's training state back into the freshly built network and optimizer."""
    # With EMA or SWA, "model" holds the averaged weights and "raw_model" the trained ones.
    load_weights(model, {**resumed, "model": resumed.get("raw_model", resumed["model"])}, config.arch,
                 source=source)
    try:
        load_optimizer_state(optimizer, resumed["optimizer"])
        for part, key in ((plateau, "plateau"), (ema, "ema"), (swa, "swa")):
            if part is not None and resumed.get(key):
                part.load_state_dict(resumed[key])
        if scaler.is_enabled() and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:     # torch's own checks, or none
        raise CheckpointError(f"{source} holds a training state that does not fit this run's optimizer or "
                              f"averaging ({type(e).__name__}: {_first_line(e)}): it cannot be resumed; evaluate "
                              "it, or start over with --overwrite") from None


def check_logits(model: nn.Module, arch: str, img_size: int, device, channels_last: bool = False) -> None:
    """Fail before a run folder is claimed if ``model`` does not map N×3×S×S images to N×1×S×S
    logits in eval mode (a student's own network, registered with labseg.models.register_model)."""
    was_training = model.training
    model.eval()
    try:
        image = torch.zeros(1, 3, img_size, img_size, device=device)
        with torch.inference_mode():     # in the memory format the batches will have
            out = model(image.to(memory_format=torch.channels_last) if channels_last else image)
    finally:
        model.train(was_training)
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (1, 1, img_size, img_size)):
        raise ConfigError(f"network {arch!r} returned {_shape(out)} for a 1×3×{img_size}×{img_size} batch in eval "
                          f"mode; expected 1×1×{img_size}×{img_size} logits (one channel, the input's size)")


def check_training_step(model: nn.Module, config: RunConfig, train_loss_fn, device, channels_last: bool = False) -> None:
    """Fail before a run folder is claimed if the network's training-mode output on a batch of 2, or
    the loss of it, is not what a step needs: N×1×S×S logits (``(logits, [aux logits])`` with
    deep_supervision), and one finite number autograd can differentiate. The network's BatchNorm
    statistics and the random state are left as they were."""
    size, arch = config.img_size, config.arch
    with _probe(model, device):
        image = torch.zeros(2, 3, size, size, device=device)
        out = model(image.to(memory_format=torch.channels_last) if channels_last else image)
        _check_training_output(out, arch, size, config.deep_supervision)
        target = torch.zeros(2, 1, size, size, device=device)
        target[..., : size // 2] = 1.0      # half pet, half background: every loss is defined there
        loss = train_loss_fn(out, target, torch.ones_like(target))
    scalar = isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()
    if not scalar:
        got = f"a tensor of shape {_shape(loss)} ({loss.dtype})" if isinstance(loss, torch.Tensor) else _shape(loss)
        raise ConfigError(f"loss {config.loss!r} returned {got} for a batch of 2; expected one number, a 0-dim "
                          "float tensor (average the pixels' and the images' losses: .mean())")
    if not loss.requires_grad:
        raise ConfigError(f"loss {config.loss!r} returned a number with no gradient: computed outside autograd "
                          "(.item(), numpy, torch.no_grad or .detach())? The step could not learn from it")
    if not math.isfinite(loss.item()):
        raise ConfigError(f"loss {config.loss!r} returned {loss.item()} for {arch!r}'s first output (zero "
                          "images, a half-pet target); expected a finite number")


def check_batches_of_one(model: nn.Module, config: RunConfig, device, channels_last: bool = False) -> None:
    """For a run whose steps take one image (batch_size 1, or one training image): fail before a
    run folder is claimed where the network cannot train on one image at the smallest size the run
    trains at. BatchNorm in training mode needs more than one value per channel, and resnet34_unet's
    deepest map is 1×1 at 32 px (the lowest-resolution phase or the crops of a larger img_size)."""
    size = min(s for s in (config.img_size, config.low_res_size, config.crop_size) if s)
    with _probe(model, device):
        image = torch.zeros(1, 3, size, size, device=device)
        try:
            model(image.to(memory_format=torch.channels_last) if channels_last else image)
        except ValueError as e:
            if "more than 1 value per channel" not in str(e):
                raise
            raise ConfigError(f"{config.arch!r} cannot train on one image at a time at {size}px: its deepest "
                              "BatchNorm would see a single value per channel. Give batch_size 2 or more (and at "
                              "least 2 training images), or train at a larger size "
                              f"({'img_size' if size == config.img_size else 'low_res_scale or crop_size'})") from None


@contextmanager
def _probe(model: nn.Module, device):
    """A training-mode forward that leaves no trace: BatchNorm statistics, mode and random state
    are put back afterwards."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, value in model.named_buffers():
                value.copy_(buffers[name])


def _shape(x) -> str:
    """What a network or loss returned, for a message: 2×1×64×64, or "a tuple"."""
    return "×".join(map(str, x.shape)) or "()" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


def _check_training_output(out, arch: str, size: int, deep_supervision: bool) -> None:
    expected = f"2×1×{size}×{size} logits"
    where = f"network {arch!r} returned"
    batch = f"for a 2×3×{size}×{size} batch in training mode"
    if deep_supervision:
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], (tuple, list))):
            raise ConfigError(f"{where} {_shape(out)} {batch}; with deep_supervision a network returns "
                              f"(logits, [aux logits, ...]) in training, each {expected}")
        for x in (out[0], *out[1]):
            if not (isinstance(x, torch.Tensor) and tuple(x.shape) == (2, 1, size, size)):
                raise ConfigError(f"{where} an output of {_shape(x)} {batch}; expected {expected}, the main "
                                  "one and each auxiliary one")
    elif not (isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 1, size, size)):
        hint = (" (a network returns (logits, [aux logits]) in training only with deep_supervision, "
                "which it lists in register_model's options=)" if isinstance(out, (tuple, list)) else "")
        raise ConfigError(f"{where} {_shape(out)} {batch}; expected {expected}{hint}")


def _summary(config, history, stop_reason, seconds, n_params, trainval, n_train, n_valid) -> dict:
    metric = config.monitor
    better = min if MONITOR_MODE[metric] == "min" else max
    best_row = better(history, key=lambda r: r[metric]) if history else {}
    return {
        "arch": config.arch, "run_name": config.run_name, "img_size": config.img_size,
        "epochs_run": len(history), "best_epoch": best_row.get("epoch"),
        "best_valid_dice": best_row.get("valid_dice"), "best_valid_iou": best_row.get("valid_iou"),
        "best_valid_loss": best_row.get("valid_loss"),
        "final_valid_dice": history[-1]["valid_dice"] if history else None,
        # how far the lr schedule got: runs.default_checkpoint takes last.pt only once it decayed
        "final_lr": history[-1]["lr"] if history else None,
        "stop_reason": stop_reason, "train_seconds": round(seconds, 1), "parameters": n_params,
        "train_images": n_train, "valid_images": n_valid,
        "skipped_pairs": len(trainval.skipped), "skipped": trainval.skipped,
        # which images, the same on every machine: runs collected from a class compare by it (runs.dataset_key)
        "trainval": images_digest(trainval),
    }


def _epochs_since_best(history: list[dict], monitor: str) -> int:
    """Epochs of ``history`` after its best one by ``monitor``: early stopping's count, kept over a resume."""
    best, since = None, 0
    for row in history:
        if _improved(monitor, row[monitor], best):
            best, since = row[monitor], 0
        else:
            since += 1
    return since


# --------------------------------------------------------------------------- distributed
@dataclass
class _Distributed:
    """torchrun support: rank/world from the environment; a no-op in a single process."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None
    cpu_group: object = None        # for the ranks' agreements: gloo, on the host, no GPU sync

    @classmethod
    def from_env(cls) -> "_Distributed":
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
            return cls()
        import torch.distributed as td

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", rank))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
            td.init_process_group("nccl")
            return cls(rank, world, device, td.new_group(backend="gloo"))
        td.init_process_group("gloo")
        return cls(rank, world, torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: np.ndarray) -> np.ndarray:
        """Each rank takes every world-th image (the DistributedSampler rule), all ranks equal-sized."""
        if self.world == 1:
            return indices
        n = len(indices) // self.world * self.world
        return indices[:n][self.rank::self.world]

    def agree_max(self, value: float) -> float:
        """The largest ``value`` over the ranks (in one process: ``value``), for a decision that
        every rank must take alike."""
        if self.world == 1:
            return float(value)
        import torch.distributed as td

        t = torch.tensor([float(value)], dtype=torch.float64)
        td.all_reduce(t, td.ReduceOp.MAX, group=self.cpu_group)
        return t.item()

    def from_main(self, value):
        """Rank 0's ``value`` on every rank (in one process: ``value``)."""
        if self.world == 1:
            return value
        import torch.distributed as td

        box = [value]
        td.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.destroy_process_group()


def main(argv=None) -> int:
    """``python -m labseg.train`` (and torchrun) take the same options as ``labseg train``."""
    from labseg.cli import main as cli_main

    return cli_main(["train", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
