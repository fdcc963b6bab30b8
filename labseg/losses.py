"""Losses for binary segmentation on 1-channel logits.

Every loss takes ``(logits, target, valid)``, all N×1×H×W, where ``valid`` is 0 on pixels left
out of the loss (the trimap border with ``ignore_border``) and 1 elsewhere. Logits may come in
bf16/fp16 from autocast: each loss computes in float32.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from labseg.config import check_choice

EPS = 1.0   # smoothing of the soft Dice/Tversky ratios, in pixels: keeps empty masks well defined


def bce(logits, target, valid):
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (loss * valid).sum() / valid.sum().clamp_min(1)


def _soft_overlap(logits, target, valid):
    prob = torch.sigmoid(logits.float()) * valid
    target = target * valid
    dims = (1, 2, 3)
    tp = (prob * target).sum(dims)
    return tp, (prob * (1 - target)).sum(dims), ((1 - prob) * target).sum(dims)


def dice(logits, target, valid):
    """1 − soft Dice, per image then averaged, like the metric it stands in for."""
    tp, fp, fn = _soft_overlap(logits, target, valid)
    return (1 - (2 * tp + EPS) / (2 * tp + fp + fn + EPS)).mean()


def tversky(logits, target, valid, alpha: float = 0.3, beta: float = 0.7):
    """Tversky loss: weighs false negatives (beta) above false positives (alpha)."""
    tp, fp, fn = _soft_overlap(logits, target, valid)
    return (1 - (tp + EPS) / (tp + alpha * fp + beta * fn + EPS)).mean()


def focal(logits, target, valid, gamma: float = 2.0, alpha: float = 0.25):
    """Focal loss (Lin et al., 2017): down-weights the easy pixels."""
    logits = logits.float()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    loss = alpha_t * (1 - p_t) ** gamma * ce
    return (loss * valid).sum() / valid.sum().clamp_min(1)


def lovasz(logits, target, valid):
    """Lovász hinge (Berman et al., 2018): a convex surrogate of 1 − IoU, per image then averaged.

    Sort the hinge errors 1 − logit·sign from worst to best; the weight of the k-th error is what
    it adds to the Jaccard loss of the k worst pixels taken as wrong. Ignored pixels get error −1
    (no hinge loss) and no pet label, so they add nothing and change no weight of a positive error.
    """
    n = logits.shape[0]
    logits, target, valid = logits.float().reshape(n, -1), target.reshape(n, -1), valid.reshape(n, -1) > 0
    errors = (1 - logits * (2 * target - 1)).masked_fill(~valid, -1.0)
    errors, order = errors.sort(dim=1, descending=True)
    gt = (target * valid).gather(1, order)
    pets = gt.sum(1, keepdim=True)
    jaccard = 1 - (pets - gt.cumsum(1)) / (pets + (1 - gt).cumsum(1))
    weights = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return (F.relu(errors) * weights).sum(1).mean()


def bce_dice(logits, target, valid):
    return bce(logits, target, valid) + dice(logits, target, valid)


def bce_lovasz(logits, target, valid):
    return bce(logits, target, valid) + lovasz(logits, target, valid)


LOSSES = {"bce": bce, "dice": dice, "bce_dice": bce_dice, "tversky": tversky, "focal": focal,
          "lovasz": lovasz, "bce_lovasz": bce_lovasz}


def deep_supervised(loss_fn):
    """``loss_fn`` for a deep-supervised network's training output ``(logits, aux)``.

    ``aux`` holds full-size logits from the inner decoder blocks, coarse to fine. Each coarser
    output weighs half the next finer one (…, 1/4, 1/2, and 1 for the final logits), normalised
    to sum to 1: nnU-Net's weighting (Isensee et al., 2021), which also drops its coarsest output.
    """
    def loss(outputs, target, valid):
        logits, aux = outputs
        weights = [1.0] + [0.5 ** (len(aux) - i) for i in range(len(aux))]
        terms = [loss_fn(x, target, valid) for x in (logits, *aux)]
        return sum(w * t for w, t in zip(weights, terms)) / sum(weights)
    return loss


BUILT_IN = tuple(LOSSES)


def register_loss(name: str, fn) -> None:
    """Make ``fn(logits, target, valid) -> scalar`` usable as ``loss=name`` (see :func:`bce_dice` for
    the arguments: N×1×S×S logits and 0/1 targets, and the mask of pixels that count). Registering a
    name again replaces it (a notebook cell run twice); labseg's own names are refused: a run's
    records would name a loss it did not train with."""
    from labseg.config import LOSSES as NAMES, ConfigError

    if not (isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9_]*", name)):
        raise ConfigError(f"register_loss: name {name!r}: expected lower-case letters, digits and _ (a loss name)")
    if name in BUILT_IN:
        raise ConfigError(f"register_loss: {name!r} is one of labseg's losses; pick another name")
    if not callable(fn):
        raise ConfigError(f"register_loss: {name!r} is given {fn!r}; expected a function (logits, target, valid)")
    LOSSES[name] = fn
    if name not in NAMES:
        NAMES.append(name)


def build_loss(name: str):
    check_choice("loss", name, LOSSES)
    return LOSSES[name]
