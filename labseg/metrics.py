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


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if x.dim() > 2 else x.reshape(1, -1) if x.dim() == 1 else x


def per_image_dice(pred, target, threshold: float = 0.5, from_logits: bool = False) -> torch.Tensor:
    """Dice of each image (N values). ``pred`` holds probabilities, logits or booleans; N×... shapes."""
    p = _flat(_binary(pred, threshold, from_logits)).float()
    g = _flat(target > 0.5).float()
    inter = (p * g).sum(1)
    total = p.sum(1) + g.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def per_image_iou(pred, target, threshold: float = 0.5, from_logits: bool = False) -> torch.Tensor:
    p = _flat(_binary(pred, threshold, from_logits)).float()
    g = _flat(target > 0.5).float()
    inter = (p * g).sum(1)
    union = p.sum(1) + g.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def per_image_accuracy(pred, target, threshold: float = 0.5, from_logits: bool = False) -> torch.Tensor:
    p = _flat(_binary(pred, threshold, from_logits))
    g = _flat(target > 0.5)
    return (p == g).float().mean(1)


def dice_score(pred, target, threshold: float = 0.5, from_logits: bool = False) -> float:
    """The lab's Dice: per-image mean at ``threshold``, empty-vs-empty counted as 1."""
    return per_image_dice(pred, target, threshold, from_logits).mean().item()


def iou_score(pred, target, threshold: float = 0.5, from_logits: bool = False) -> float:
    return per_image_iou(pred, target, threshold, from_logits).mean().item()


def pixel_accuracy(pred, target, threshold: float = 0.5, from_logits: bool = False) -> float:
    return per_image_accuracy(pred, target, threshold, from_logits).mean().item()


def pooled_dice(pred, target, threshold: float = 0.5, from_logits: bool = False) -> float:
    """Dice over all pixels of the batch at once (shown only to contrast with ``dice_score``)."""
    p = _binary(pred, threshold, from_logits).float()
    g = (target > 0.5).float()
    total = p.sum() + g.sum()
    return 1.0 if total == 0 else (2 * (p * g).sum() / total).item()
