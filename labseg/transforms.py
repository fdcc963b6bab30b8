"""Joint image/mask augmentation, in two equivalent forms.

* :func:`sample_transform` — torchvision transforms v2 on one sample, with the mask wrapped in
  ``tv_tensors.Mask`` so that geometric transforms use nearest sampling on it and colour jitter
  leaves it alone. Clear and standard; used for previews and the per-sample path.
* :class:`BatchAugment` — the same augmentations on a whole batch at once, on the training
  device. v2 transforms draw ONE set of random parameters per call, so calling them on a batch
  would flip/crop every image the same way. Here every sample gets its own flip, rotation,
  scale-crop and colour factors, applied through one sampling grid and one ``grid_sample`` call
  (bilinear for images, nearest for labels, so masks stay binary).

``labseg bench`` measures both; the batched form is the training default.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from labseg.config import check_choice

if TYPE_CHECKING:
    from torchvision.transforms import v2


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x.to(device, dtype)``, but a CPU tensor goes to a GPU without stopping the host.

    A copy from ordinary (pageable) host memory makes the host wait until every kernel already
    queued has run, so each small parameter tensor of a batch would stall the CPU behind the
    previous training step; from pinned memory the copy is queued like a kernel.
    """
    if dtype is not None:
        x = x.to(dtype)
    if x.device.type == "cpu" and torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


@functools.lru_cache(maxsize=32)
def channel_constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values`` as a 1×C×1×1 tensor on ``device``, made once per device and dtype: made from
    Python numbers for every batch, it was a blocking host→GPU copy (a sync) each time. Shared:
    never modify it in place. Made outside inference mode, whatever the first caller's: an inference
    tensor, once cached, would fail every later use in training (autograd refuses to save it)."""
    with torch.inference_mode(False):
        return to_device(torch.tensor(values, dtype=dtype).view(1, -1, 1, 1), device)


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
    hue: float = 0.0                      # hue turn drawn from [-hue, hue] of a full circle
    grayscale: float = 0.0                # probability of dropping the colour altogether


LEVELS = {
    "none": None,
    "flip": AugmentParams(hflip=0.5),      # horizontal flips only: the peer (smp) setting
    "light": AugmentParams(hflip=0.5, degrees=10, scale=(0.9, 1.25), translate=0.06,
                           brightness=0.2, contrast=0.2, saturation=0.2),
    "strong": AugmentParams(hflip=0.5, degrees=25, scale=(0.75, 1.5), translate=0.12,
                            brightness=0.35, contrast=0.35, saturation=0.35),
    # "light" geometry with colour made unreliable: the budget runs' worst test images are
    # background (sofas, fur rugs, brick) whose colour matches the breed's coat.
    "color": AugmentParams(hflip=0.5, degrees=10, scale=(0.9, 1.25), translate=0.06,
                           brightness=0.2, contrast=0.2, saturation=0.2, hue=0.2, grayscale=0.1),
}

NO_AUGMENT = AugmentParams(hflip=0.0)      # identity, for crops without augmentation


def params_for(level: str) -> AugmentParams | None:
    check_choice("augment", level, LEVELS)
    return LEVELS[level]


# --------------------------------------------------------------------------- per sample (v2)
def sample_transform(level: str = "light") -> v2.Compose:
    """torchvision v2 pipeline for one (tv_tensors.Image, tv_tensors.Mask) pair, uint8 or float."""
    # imported here, not above: torchvision takes 1-3 s, which the cache and the training path never need
    from torchvision.transforms import v2

    p = params_for(level) or NO_AUGMENT
    return v2.Compose([
        v2.RandomHorizontalFlip(p.hflip),
        v2.RandomAffine(degrees=p.degrees, translate=(p.translate, p.translate),
                        scale=p.scale),
        v2.ColorJitter(brightness=p.brightness, contrast=p.contrast, saturation=p.saturation,
                       hue=p.hue),
        v2.RandomGrayscale(p.grayscale),
    ])


def augment_sample(image: torch.Tensor, labels: torch.Tensor, level: str = "light"):
    """Augment one image (3×H×W) and its labels (H×W or 1×H×W) with :func:`sample_transform`."""
    from torchvision import tv_tensors

    image, labels = sample_transform(level)(tv_tensors.Image(image), tv_tensors.Mask(labels))
    return image.as_subclass(torch.Tensor), labels.as_subclass(torch.Tensor)


# --------------------------------------------------------------------------- batched
class BatchAugment:
    """Per-sample random flip + rotation + scale + shift + colour jitter on a whole batch.

    Call with images N×3×H×W float in [0, 1] and labels N×1×H×W uint8 on any device; returns
    the same. :meth:`augment_normalized` is the training path: it takes raw 0..255 values and
    returns ImageNet-normalised images, folding the /255, the colour jitter and the
    normalisation into one per-sample 3×3 colour matrix, which is several times faster on a CPU
    than applying them one after another.
    """

    GRAY = (0.299, 0.587, 0.114)      # luma weights of the saturation jitter (as PIL/torchvision)
    # Hue turn by angle a as a linear map (SVG feColorMatrix "hueRotate"):
    #   H(a) = L + cos(a)·(I − L) + sin(a)·K, L = rows of HUE_LUMA; rows of K sum to 0, so grays stay.
    HUE_LUMA = (0.213, 0.715, 0.072)
    HUE_K = ((-0.213, -0.715, 0.928), (0.143, 0.140, -0.283), (-0.787, 0.715, 0.072))

    ELASTIC_GRID = 3      # control points per side: the UNet paper's "coarse 3 by 3 grid"

    def __init__(self, level: str = "light", crop_size: int | None = None, copy_paste: float = 0.0,
                 mosaic: float = 0.0, elastic: float = 0.0, mosaic_background: float = 0.0,
                 low_res_size: int | None = None):
        self.level = level
        self.params = params_for(level)
        # Elastic deformation (Ronneberger et al., 2015, the UNet paper's "key concept to train a
        # segmentation network with very few annotated images"): each of a 3×3 grid of control
        # points moves by a Gaussian shift with this std (a share of the image side), and bicubic
        # interpolation spreads the shifts over the pixels. New, smoothly bent pet outlines.
        self.elastic = elastic
        # Mosaic (Bochkovskiy et al., 2020, YOLOv4): with this probability a sample is replaced
        # by a 2×2 tiling of four samples of the batch, each at half size: pets small, off-centre
        # and next to other pets' backgrounds. Tried for the small test pets that the network
        # painted as one large blob; it helped as a regulariser instead (docs/results.md, round 12).
        self.mosaic = mosaic
        # Background quarters: with this probability each of a mosaic's three other quarters is,
        # instead of a whole sample at half size, the window of half the side (at its own scale)
        # where that sample has the fewest pet pixels. Aimed at the failures left after mosaic:
        # the network paints a car, a cushion or a fur blanket as the pet (docs/results.md,
        # round 17), because in every training image the salient object is the pet.
        self.mosaic_background = mosaic_background
        # Copy-paste (Ghiasi et al., 2021): with this probability a sample gets the pet of another
        # sample of the batch pasted over it (both already augmented), labels included. New
        # pet/background pairings for a network that has seen only a few hundred images.
        self.copy_paste = copy_paste
        # When set, return random crop_size × crop_size crops at the image's own scale (drawn
        # after the affine, so the crop sees a rotated/zoomed image): patch training, as nnU-Net
        # does, ~(H/crop)² fewer FLOPs per image. Set and cleared by ``fit`` as training progresses.
        self.crop_size = crop_size
        # When set, resample whole images to low_res_size × low_res_size (before any crop):
        # progressive resizing (fast.ai; Tan & Le, 2021, EfficientNetV2), cheaper early epochs at
        # a lower resolution, then the last ones at the evaluation size. The affine already
        # resamples every pixel, so the smaller grid costs nothing extra. Set by ``fit``.
        self.low_res_size = low_res_size

    # The run-config fields (beside ``augment``, the level) that set up training's augmentation.
    CONFIG_FIELDS = ("copy_paste", "mosaic", "mosaic_background", "elastic")

    @classmethod
    def from_config(cls, fields) -> BatchAugment:
        """The augmentation that a run config's or a recipe's fields (a mapping) ask for."""
        return cls(fields["augment"], **{k: fields[k] for k in cls.CONFIG_FIELDS})

    @property
    def is_identity(self) -> bool:
        return (self.params is None and not self.crop_size and not self.low_res_size and not self.copy_paste
                and not self.mosaic and not self.elastic)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        if self.is_identity:
            return images, labels
        return self._augment(images, labels, generator, scale=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def augment_normalized(self, images: torch.Tensor, labels: torch.Tensor, mean, std,
                           generator: torch.Generator | None = None):
        """Images N×3×H×W float in 0..255 → augmented and normalised by ``mean``/``std``."""
        if self.is_identity:
            m = channel_constant(tuple(mean), images.device, images.dtype)
            s = channel_constant(tuple(std), images.device, images.dtype)
            return (images / 255 - m) / s, labels
        return self._augment(images, labels, generator, scale=1 / 255, mean=mean, std=std)

    @staticmethod
    def grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``F.affine_grid(theta, (N, C, h, w), align_corners=False)`` by broadcasting.

        grid[n, i, j] = theta[n] @ (x_j, y_i, 1) with pixel-centre coordinates in [-1, 1]; built
        from two 1-D coordinate vectors, it is ~4× faster than affine_grid on a CPU.
        """
        n = theta.shape[0]
        xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1
        ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
        a, b, c = (theta[:, :, k].reshape(n, 1, 1, 2) for k in range(3))
        return torch.addcmul(torch.addcmul(c, a, xs.view(1, 1, w, 1)), b, ys.view(1, h, 1, 1))

    @classmethod
    def elastic_shifts(cls, n: int, h: int, w: int, sigma: float, generator=None) -> torch.Tensor:
        """N×h×w×2 smooth random shifts of sampling-grid coordinates (which span 2 per side).

        Control-point shifts ~ N(0, sigma) in shares of the side, ×2 in grid units; bicubic
        interpolation with aligned corners puts the control points on the corners, edge middles
        and centre, and makes the field smooth between them.
        """
        g = cls.ELASTIC_GRID
        coarse = torch.randn(n, 2, g, g, generator=generator) * (2 * sigma)
        fine = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
        return fine.permute(0, 2, 3, 1)

    def _augment(self, images, labels, generator, scale, mean, std):
        p, n, dev, dt = self.params or NO_AUGMENT, images.shape[0], images.device, images.dtype
        h, w = images.shape[-2:]
        # The image's size after any resize, then the crop's within it.
        size_h, size_w = (self.low_res_size, self.low_res_size) if self.low_res_size else (h, w)
        out_h, out_w = size_h, size_w
        if self.crop_size:
            out_h, out_w = min(self.crop_size, size_h), min(self.crop_size, size_w)

        def uniform(lo, hi):  # drawn on the CPU generator, so results do not depend on the device
            return (torch.rand(n, generator=generator, dtype=torch.float64) * (hi - lo) + lo)

        # One 2×3 affine matrix per sample, mapping output coords to input coords in [-1, 1].
        angle = uniform(-p.degrees, p.degrees) * (math.pi / 180)
        zoom = torch.exp(uniform(math.log(p.scale[0]), math.log(p.scale[1])))
        flip = torch.where(uniform(0, 1) < p.hflip, -1.0, 1.0).double()
        tx, ty = uniform(-p.translate, p.translate) * 2, uniform(-p.translate, p.translate) * 2
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                             torch.stack([sin * flip, cos, ty], 1)], 1)
        if (out_h, out_w) != (size_h, size_w):
            # A crop: output coords span out/size of the input, centred anywhere it fits.
            fx, fy = out_w / size_w, out_h / size_h
            cx, cy = uniform(-(1 - fx), 1 - fx), uniform(-(1 - fy), 1 - fy)
            theta[:, :, 2] += theta[:, :, 0] * cx[:, None] + theta[:, :, 1] * cy[:, None]
            theta[:, :, 0] *= fx
            theta[:, :, 1] *= fy
        grid = self.grid(to_device(theta, dev, dt), out_h, out_w)
        if self.elastic:
            grid = grid + to_device(self.elastic_shifts(n, out_h, out_w, self.elastic, generator), dev, dt)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # Nearest sampling keeps the labels exact; outside the image is background (0).
        labels = F.grid_sample(labels.to(dt), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False).round_().to(torch.uint8)

        # Colour jitter on the image only, as one affine colour map per sample:
        #   brightness b: x·b;  contrast c: (x − m)·c + m (m = image mean);  saturation s: (x − g)·s + g
        #   (g = gray value; s = 0 is grayscale);  hue: x → H·x
        #   compose to  A·x + o  with  A = c·b·(s·I + (1 − s)·1·wᵀ)·H,  o = (1 − c)·b·m.
        b = uniform(1 - p.brightness, 1 + p.brightness)
        c = uniform(1 - p.contrast, 1 + p.contrast)
        s = uniform(1 - p.saturation, 1 + p.saturation)
        s = torch.where(uniform(0, 1) < p.grayscale, 0.0, s)
        m = images.mean(dim=(1, 2, 3)).view(n, 1, 1)    # stays on the device: no host sync
        gray = torch.tensor(self.GRAY, dtype=torch.float64)
        eye = torch.eye(3, dtype=torch.float64)
        A = (c * b).view(n, 1, 1) * (s.view(n, 1, 1) * eye + (1 - s).view(n, 1, 1) * gray.view(1, 1, 3))
        if p.hue:
            turn = (uniform(-p.hue, p.hue) * (2 * math.pi)).view(n, 1, 1)
            luma = torch.tensor(self.HUE_LUMA, dtype=torch.float64).expand(3, 3)
            hue = luma + torch.cos(turn) * (eye - luma) + torch.sin(turn) * torch.tensor(self.HUE_K, dtype=torch.float64)
            A = A @ hue
        # ...then the input scale and the normalisation (x − μ)/σ, both linear too. The offset
        # o = (1 − c)·b·m needs the image mean m, so it is made on the device, where m is.
        mu = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1)
        inv_sigma = 1 / torch.tensor(std, dtype=torch.float64).view(1, 3, 1)
        matrix = to_device(A * scale * inv_sigma, dev, dt)
        cbs = to_device(((1 - c) * b * scale).view(n, 1, 1), dev, dt)
        offset = (cbs * m - to_device(mu, dev, dt)) * to_device(inv_sigma, dev, dt)     # n × 3 × 1
        out = torch.baddbmm(offset, matrix, images.reshape(n, 3, out_h * out_w)).view(n, 3, out_h, out_w)
        # Clamp to the colours of [0, 1] after jitter, expressed in the normalised space
        # (per channel with scalar bounds: far faster than broadcasting tensor bounds).
        for k in range(3):
            out[:, k].clamp_(-mean[k] / std[k], (1 - mean[k]) / std[k])
        if self.mosaic and n > 1:
            out, labels = self._mosaic(out, labels, uniform(0, 1) < self.mosaic, generator,
                                       self.mosaic_background)
        if self.copy_paste and n > 1:
            out, labels = self._paste(out, labels, uniform(0, 1) < self.copy_paste, generator)
        return out, labels

    @staticmethod
    def _mosaic(images, labels, chosen: torch.Tensor, generator, background: float = 0.0):
        """Replace sample i, where ``chosen[i]``, by [[i, a], [b, c]] of random others, each at half size.

        ``background``: the probability that a, b or c is instead that sample's most pet-free
        window of half the side, at full scale (:meth:`pet_free_windows`).
        """
        n, h, w = images.shape[0], *images.shape[-2:]
        if not chosen.any():
            return images, labels
        # Quarters 2-4: three other samples, at offsets 1..n-1 from i in random order (distinct
        # when n >= 4; a batch of 2 or 3 reuses its others in turn).
        order = torch.rand(n, n - 1, generator=generator).argsort(1) + 1
        offsets = order[:, torch.arange(3) % (n - 1)]
        own = torch.arange(n)[:, None]
        tiles = torch.cat([own, (own + offsets) % n], 1)[chosen]          # k × 4 sample indices
        half = ((h + 1) // 2, (w + 1) // 2)
        small_images = F.interpolate(images, size=half, mode="area")      # area: no aliasing of fur
        small_labels = F.interpolate(labels.float(), size=half, mode="nearest").to(labels.dtype)

        if background:
            # Each of quarters 2-4 may show its sample's most pet-free window instead: index n + j
            # of the pool below is sample j's window, the same size as its half-size copy.
            as_window = torch.rand(tiles.shape[0], 4, generator=generator) < background
            as_window[:, 0] = False                                        # the own pet stays
            tiles = tiles + n * as_window
            window_images, window_labels = BatchAugment.pet_free_windows(images, labels, half, generator)
            small_images = torch.cat([small_images, window_images])
            small_labels = torch.cat([small_labels, window_labels])

        def tile(small):  # k × 4 × C × h/2 × w/2 → k × C × h × w, cropped back when h or w is odd
            t = small[to_device(tiles, small.device)]
            top, bottom = torch.cat([t[:, 0], t[:, 1]], -1), torch.cat([t[:, 2], t[:, 3]], -1)
            return torch.cat([top, bottom], -2)[..., :h, :w]

        images, labels = images.clone(), labels.clone()
        where = to_device(chosen.nonzero().squeeze(1), images.device)
        images[where] = tile(small_images).to(images.dtype)
        labels[where] = tile(small_labels)
        return images, labels

    @staticmethod
    def pet_free_windows(images, labels, size: tuple[int, int], generator=None):
        """Per sample, the size[0] × size[1] window with the fewest pet pixels (images, labels).

        Windows start every quarter of ``size``; ties (often several windows hold no pet at
        all) are broken at random, so the crops do not all come from one corner.
        """
        n, (h, w), (wh, ww) = images.shape[0], images.shape[-2:], size
        pet = (labels != 0).float()
        stride = (max(wh // 4, 1), max(ww // 4, 1))
        share = F.avg_pool2d(pet, (wh, ww), stride)                  # n × 1 × rows × cols
        rows, cols = share.shape[-2:]
        jitter = to_device(torch.rand(n, 1, rows, cols, generator=generator), share.device) / (2 * wh * ww)
        best = (share + jitter).flatten(1).argmin(1)               # jitter < one pixel: ties only
        # Gather every sample's window at once (no per-sample loop, no sync with a GPU).
        ys = (best // cols * stride[0]).view(n, 1, 1) + torch.arange(wh, device=best.device).view(1, wh, 1)
        xs = (best % cols * stride[1]).view(n, 1, 1) + torch.arange(ww, device=best.device).view(1, 1, ww)
        index = (ys * w + xs).view(n, 1, wh * ww)                   # flat pixel index per window pixel

        def crop(x):
            flat = x.reshape(n, x.shape[1], h * w)
            return flat.gather(2, index.expand(n, x.shape[1], wh * ww)).view(n, x.shape[1], wh, ww)

        return crop(images), crop(labels)

    @staticmethod
    def _paste(images, labels, chosen: torch.Tensor, generator):
        """Paste the pet (labels ≠ 0) of sample ``donor[i]`` over sample i where ``chosen[i]``."""
        n = images.shape[0]
        donor = (torch.arange(n) + torch.randint(1, n, (n,), generator=generator)) % n   # never itself
        donor, chosen = to_device(donor, images.device), to_device(chosen, images.device)
        pet = (labels[donor] != 0) & chosen.view(n, 1, 1, 1)
        return torch.where(pet, images[donor], images), torch.where(pet, labels[donor], labels)
