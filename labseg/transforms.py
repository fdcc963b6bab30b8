"""Joint image/mask augmentation, in two equivalent forms.

* :func:`sample_transform` — torchvision transforms v2 on one sample, with the mask wrapped in
  ``tv_tensors.Mask`` so that geometric transforms use nearest sampling on it and colour jitter
  leaves it alone. Clear and standard; used for previews and the per-sample path.
* :class:`BatchAugment` — the same augmentations on a whole batch at once, on the training
  device. v2 transforms draw ONE set of random parameters per call, so calling them on a batch
  would flip/crop every image the same way. Here every sample gets its own flip, rotation,
  scale-crop and colour factors, applied through one ``affine_grid``/``grid_sample`` call
  (bilinear for images, nearest for labels, so masks stay binary).

``labseg bench`` measures both; the batched form is the training default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random augmentation; one instance per strength level."""

    hflip: float = 0.5                    # probability of a horizontal flip
    degrees: float = 0.0                  # rotation drawn from [-degrees, degrees]
    scale: tuple[float, float] = (1.0, 1.0)   # zoom factor (>1 crops in, <1 zooms out)
    translate: float = 0.0                # shift as a fraction of the size
    brightness: float = 0.0               # colour factors drawn from [1-x, 1+x]
    contrast: float = 0.0
    saturation: float = 0.0


LEVELS = {
    "none": None,
    "light": AugmentParams(hflip=0.5, degrees=10, scale=(0.9, 1.25), translate=0.06,
                           brightness=0.2, contrast=0.2, saturation=0.2),
    "strong": AugmentParams(hflip=0.5, degrees=25, scale=(0.75, 1.5), translate=0.12,
                            brightness=0.35, contrast=0.35, saturation=0.35),
}


def params_for(level: str) -> AugmentParams | None:
    if level not in LEVELS:
        raise ValueError(f"augment={level!r} is not valid; choose one of: {', '.join(LEVELS)}")
    return LEVELS[level]


# --------------------------------------------------------------------------- per sample (v2)
def sample_transform(level: str = "light") -> v2.Compose:
    """torchvision v2 pipeline for one (tv_tensors.Image, tv_tensors.Mask) pair, uint8 or float."""
    p = params_for(level) or AugmentParams(hflip=0.0)
    return v2.Compose([
        v2.RandomHorizontalFlip(p.hflip),
        v2.RandomAffine(degrees=p.degrees, translate=(p.translate, p.translate),
                        scale=p.scale),
        v2.ColorJitter(brightness=p.brightness, contrast=p.contrast, saturation=p.saturation),
    ])


def augment_sample(image: torch.Tensor, labels: torch.Tensor, level: str = "light"):
    """Augment one image (3×H×W) and its labels (H×W or 1×H×W) with :func:`sample_transform`."""
    image, labels = sample_transform(level)(tv_tensors.Image(image), tv_tensors.Mask(labels))
    return image.as_subclass(torch.Tensor), labels.as_subclass(torch.Tensor)


# --------------------------------------------------------------------------- batched
class BatchAugment:
    """Per-sample random flip + rotation + scale + shift + colour jitter on a whole batch.

    Call with images N×3×H×W float in [0, 1] and labels N×1×H×W uint8 on any device.
    """

    def __init__(self, level: str = "light"):
        self.level = level
        self.params = params_for(level)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        if self.params is None:
            return images, labels
        p, n, dev = self.params, images.shape[0], images.device

        def uniform(lo, hi):  # drawn on the CPU generator, so results do not depend on the device
            return (torch.rand(n, generator=generator) * (hi - lo) + lo).to(dev)

        # One 2×3 affine matrix per sample, mapping output coords to input coords in [-1, 1].
        angle = uniform(-p.degrees, p.degrees) * (math.pi / 180)
        zoom = torch.exp(uniform(math.log(p.scale[0]), math.log(p.scale[1])))
        flip = torch.where(uniform(0, 1) < p.hflip, -1.0, 1.0)
        tx, ty = uniform(-p.translate, p.translate) * 2, uniform(-p.translate, p.translate) * 2
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                             torch.stack([sin * flip, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # Nearest sampling keeps the labels exact; outside the image is background (0).
        labels = F.grid_sample(labels.to(images.dtype), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False).round_().to(torch.uint8)

        # Colour jitter, image only: brightness, contrast, saturation, each with its own factor.
        shape = (n, 1, 1, 1)
        images = images * uniform(1 - p.brightness, 1 + p.brightness).view(shape)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = (images - mean) * uniform(1 - p.contrast, 1 + p.contrast).view(shape) + mean
        gray = (0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3])
        images = (images - gray) * uniform(1 - p.saturation, 1 + p.saturation).view(shape) + gray
        return images.clamp_(0, 1), labels
