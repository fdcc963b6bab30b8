"""Post-processing of predicted masks: one pet per image.

An Oxford-IIIT Pet trimap outlines one animal. The budget runs' worst valid and test images are
pets beside something of their colour (a white cupboard next to a cream cat), which the network
paints as a second, separate blob. Keeping the largest connected component and filling its holes
removes such blobs. nnU-Net post-processes the same way, and only where it raises the validation
Dice: :func:`labseg.evaluate.evaluate_run` reports that check and the test Dice with the step,
apart from the plain figure, like the other test-time options.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

# 8-connectivity: a pet's parts that touch only at a corner (a thin leg at 128 px) stay one pet.
_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2-D boolean mask (an empty mask stays empty)."""
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=_EIGHT_NEIGHBOURS)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]            # pixels per component; label 0 is background
    return labels == 1 + int(sizes.argmax())           # ties: the first component in scan order


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """One pet: the largest connected component of ``mask`` (H×W, boolean), its holes filled."""
    if np.ndim(mask) != 2:
        raise ValueError(f"clean_mask: expected a 2-D H×W mask, got shape {np.shape(mask)}")
    return ndimage.binary_fill_holes(keep_largest_component(mask))


def clean_masks(pred: torch.Tensor) -> torch.Tensor:
    """:func:`clean_mask` on each of N×1×H×W boolean masks; returns them on the CPU, same shape."""
    if pred.ndim != 4 or pred.shape[1] != 1:
        raise ValueError(f"clean_masks: expected N×1×H×W masks, got shape {tuple(pred.shape)}")
    masks = pred[:, 0].bool().cpu().numpy()
    return torch.from_numpy(np.stack([clean_mask(m) for m in masks]) if len(masks) else masks).unsqueeze(1)
