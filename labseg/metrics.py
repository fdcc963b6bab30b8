"""Dice, IoU and pixel accuracy, per image.

``dice_score`` is the lab's definition: threshold the probabilities at 0.5, compute
2|P∩G| / (|P| + |G|) for each image, and average over images; an image whose prediction and
ground truth are both empty scores 1.

How per-batch averaging differs: pooling all pixels of a batch into one Dice (what many training
scripts log) weighs large pets more than small ones and hides the images a model misses entirely.
A batch with one 90%-pet image predicted perfectly and one 2%-pet image missed completely scores
~0.99 pooled but 0.5 per image. labseg always reports the per-image mean.
"""
from __future__ import annotations

import torch


def _binary(pred: torch.Tensor, threshold: float, from_logits: bool) -> torch.Tensor:
    if pred.dtype == torch.bool:
        return pred
    if from_logits:
        pred = torch.sigmoid(pred.float())
    return pred >= threshold


def _truth(target: torch.Tensor) -> torch.Tensor:
    """The pet pixels of a 0/1 mask. An integer mask is compared with 0, not 0.5: comparing it with a
    float makes a float copy of every pixel."""
    if target.dtype == torch.bool:
        return target
    return target > 0.5 if target.is_floating_point() else target > 0


def _flat(x: torch.Tensor) -> torch.Tensor:
    """Images × pixels: N×H×W or N×1×H×W are N images; one H×W mask (2-D, or 1-D) is one image."""
    return x.reshape(x.shape[0], -1) if x.dim() > 2 else x.reshape(1, -1)


def _pair(pred: torch.Tensor, target: torch.Tensor, threshold: float, from_logits: bool):
    p, g = _flat(_binary(pred, threshold, from_logits)), _flat(_truth(target))
    if p.shape != g.shape:
        raise ValueError(f"prediction of shape {tuple(pred.shape)} and target of shape {tuple(target.shape)} "
                         f"differ in images or pixels ({tuple(p.shape)} against {tuple(g.shape)} as images × "
                         "pixels): expected masks of the same size, N×H×W or N×1×H×W, or one H×W mask each")
    return p, g


def in_chunks(fn, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``fn`` of a few images at a time, concatenated: its temporaries (an integer or fp32 copy of
    every pixel) stay those of ``chunk`` images, not of a whole test split (3669 images at 256 px)."""
    return torch.cat([fn(part) for part in images.split(chunk)]) if len(images) else fn(images)


def _count(mask: torch.Tensor) -> torch.Tensor:
    """True pixels of each image (a sum of booleans converts them to its integer type first)."""
    return in_chunks(lambda part: part.sum(1, dtype=torch.int32), mask)


def per_image_dice(pred, target, threshold: float = 0.5, from_logits: bool = False) -> torch.Tensor:
    """Dice of each image (N values). ``pred`` holds probabilities, logits or booleans, N×H×W or
    N×1×H×W; a 2-D H×W mask is one image."""
    # pixel counts of boolean masks: no float copy of every pixel (a test split at 256 px is GBs)
    p, g = _pair(pred, target, threshold, from_logits)
    inter = _count(p & g)
    total = _count(p) + _count(g)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), 1.0)


def per_image_iou(pred, target, threshold: float = 0.5, from_logits: bool = False) -> torch.Tensor:
    p, g = _pair(pred, target, threshold, from_logits)
    inter = _count(p & g)
    union = _count(p | g)
    return torch.where(union > 0, inter / union.clamp_min(1), 1.0)


def per_image_accuracy(pred, target, threshold: float = 0.5, from_logits: bool = False) -> torch.Tensor:
    p, g = _pair(pred, target, threshold, from_logits)
    return _count(p == g) / p.shape[1]


def dice_score(pred, target, threshold: float = 0.5, from_logits: bool = False) -> float:
    """The lab's Dice: per-image mean at ``threshold``, empty-vs-empty counted as 1."""
    return per_image_dice(pred, target, threshold, from_logits).mean().item()


def iou_score(pred, target, threshold: float = 0.5, from_logits: bool = False) -> float:
    return per_image_iou(pred, target, threshold, from_logits).mean().item()


def pixel_accuracy(pred, target, threshold: float = 0.5, from_logits: bool = False) -> float:
    return per_image_accuracy(pred, target, threshold, from_logits).mean().item()


def pooled_dice(pred, target, threshold: float = 0.5, from_logits: bool = False) -> float:
    """Dice over all pixels of the batch at once (shown only to contrast with ``dice_score``)."""
    p, g = (m.float() for m in _pair(pred, target, threshold, from_logits))
    total = p.sum() + g.sum()
    return 1.0 if total == 0 else (2 * (p * g).sum() / total).item()
