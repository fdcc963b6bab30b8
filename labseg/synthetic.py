"""A small synthetic stand-in for the Oxford-IIIT Pet dataset, in its exact on-disk layout.

Why: the real dataset is ~800 MB and cannot ship with the project, yet the demos, the notebooks
and the tests need a dataset to run on. This module draws one in a couple of seconds, with
numpy and Pillow only, and writes it the way the official archive is laid out, so the same
loading code reads the real and the synthetic data:

    root/images/<Name>_<k>.jpg                 RGB JPEGs of varying sizes
    root/annotations/trimaps/<Name>_<k>.png    mode "L": 1 = pet, 2 = background, 3 = border band
    root/annotations/list.txt                  "#" header lines, then "Image CLASS-ID SPECIES BREED-ID"
    root/annotations/trainval.txt, test.txt    the same entries, split
    root/labseg_synthetic.json                 our stamp: the parameters, written last

Each image is a cluttered background (smooth gradients, muted shapes, noise) with one
textured "pet". The breed sets the texture and the main colour, the species sets the shape
(cats: round body, round head, pointed ears; dogs: long body, legs, snout, floppy ear), so a
model has something to learn, but the edges, the clutter and JPEG noise keep it from trivial.
Like the real data, a grayscale JPEG and a CMYK JPEG hide among the RGB ones.

Everything is drawn from `numpy.random.default_rng([seed, class_id, k])`, so an image depends
only on the seed and its own name: the output is byte-for-byte reproducible.
"""
from __future__ import annotations

import colorsys
import contextlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from labseg.config import UMASK, ConfigError

CAT, DOG = 1, 2  # SPECIES codes used by the official list files
STAMP_NAME = "labseg_synthetic.json"
FORMAT_VERSION = 1  # bump when the drawing changes, so old stamps no longer match


@dataclass(frozen=True)
class Breed:
    name: str  # cats Capitalised, dogs lower_case, as in the real dataset
    species: int
    pattern: str  # texture drawn on the pet, see `pet_colours`
    colour: tuple[int, int, int]  # dominant fur colour
    accent: tuple[int, int, int]  # colour of the pattern


BREEDS = (
    Breed("Blobcat", CAT, "patches", (215, 130, 50), (245, 240, 230)),  # ginger with white patches
    Breed("Stripecat", CAT, "stripes", (150, 145, 140), (45, 40, 38)),  # grey tabby
    Breed("fluffy_dog", DOG, "fur", (200, 160, 90), (110, 75, 35)),  # long golden hair
    Breed("spot_dog", DOG, "spots", (235, 235, 228), (25, 25, 25)),  # dalmatian
)
# Official numbering: CLASS-ID over all breeds in case-insensitive name order,
# BREED-ID within each species in the same order.
BREEDS = tuple(sorted(BREEDS, key=lambda b: b.name.lower()))

# Quirk of the real data: a few JPEGs are grayscale or CMYK, not RGB. The first trainval image
# of each breed named here is saved in that mode, so loaders must convert("RGB").
ODD_MODES = {"Blobcat": "L", "spot_dog": "CMYK"}


def breed_ids(breeds=BREEDS) -> dict[str, tuple[int, int, int]]:
    """Map breed name -> (CLASS-ID, SPECIES, BREED-ID), numbered like the official list.txt."""
    ids, per_species = {}, {CAT: 0, DOG: 0}
    for class_id, breed in enumerate(breeds, start=1):
        per_species[breed.species] += 1
        ids[breed.name] = (class_id, breed.species, per_species[breed.species])
    return ids


# ----------------------------------------------------------------------------- drawing helpers

def smooth_noise(rng, shape, cells) -> np.ndarray:
    """Standardised smooth noise: a coarse random grid of `cells` (rows, cols) upsampled bicubically."""
    h, w = shape
    coarse = rng.random((max(2, int(cells[0])), max(2, int(cells[1]))), dtype=np.float32)
    fine = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def muted_colour(rng) -> np.ndarray:
    """A dull, low-saturation RGB colour (walls, floors, sofas), in 0..255."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.8))
    return np.array(rgb, dtype=np.float32) * 255


def ellipse(u, v, cx, cy, rx, ry, angle=0.0) -> np.ndarray:
    """Boolean mask of a (rotated) ellipse in the (u, v) coordinate arrays."""
    c, s = np.cos(angle), np.sin(angle)
    du, dv = u - cx, v - cy
    a, b = (c * du + s * dv) / rx, (-s * du + c * dv) / ry
    return a * a + b * b <= 1.0


def wobbly_blob(rng, u, v, cx, cy, rx, ry, wobble) -> np.ndarray:
    """An ellipse whose radius wanders with the angle (a few random low harmonics)."""
    du, dv = (u - cx) / rx, (v - cy) / ry
    theta = np.arctan2(dv, du)
    radius = 1.0
    for k in range(2, 6):
        radius = radius + wobble * rng.uniform(-1, 1) / k * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(du, dv) <= radius


def triangle(u, v, p0, p1, p2) -> np.ndarray:
    """Boolean mask of a triangle: the point lies on the same side of all three edges."""
    def side(a, b):
        return (b[0] - a[0]) * (v - a[1]) - (b[1] - a[1]) * (u - a[0])
    d0, d1, d2 = side(p0, p1), side(p1, p2), side(p2, p0)
    return ((d0 >= 0) & (d1 >= 0) & (d2 >= 0)) | ((d0 <= 0) & (d1 <= 0) & (d2 <= 0))


def cat_shape(rng, u, v) -> np.ndarray:
    """Sitting cat, about 2 units wide: round wobbly body, round head, two pointed ears, a tail."""
    body = wobbly_blob(rng, u, v, 0.0, 0.3, 1.0, rng.uniform(0.8, 1.0), wobble=0.25)
    hx, hy, hr = rng.uniform(-0.3, 0.3), -0.8, rng.uniform(0.5, 0.6)
    shape = body | ellipse(u, v, hx, hy, hr, hr * 0.92)
    for side in (-1, 1):
        tip = (hx + side * rng.uniform(0.35, 0.55), hy - hr - rng.uniform(0.3, 0.5))
        shape |= triangle(u, v, (hx + side * 0.1, hy - 0.3), (hx + side * hr, hy - 0.1), tip)
    side = rng.choice((-1, 1))
    return shape | ellipse(u, v, side * 1.1, 0.75, 0.55, 0.13, angle=side * rng.uniform(0.2, 0.8))


def dog_shape(rng, u, v) -> np.ndarray:
    """Standing dog, about 4 units long: long body, four legs, head with snout and floppy ear, tail."""
    shape = wobbly_blob(rng, u, v, 0.0, 0.0, 1.35, rng.uniform(0.5, 0.65), wobble=0.15)
    for leg_x in (-1.0, -0.65, 0.6, 0.95):
        shape |= ellipse(u, v, leg_x, 0.85, 0.13, 0.5, angle=rng.uniform(-0.25, 0.25))
    hx, hy = 1.35, -0.6 + rng.uniform(-0.15, 0.15)
    shape |= ellipse(u, v, hx, hy, 0.5, 0.42)
    shape |= ellipse(u, v, hx + 0.5, hy + 0.18, 0.38, 0.22)  # snout
    shape |= ellipse(u, v, hx - 0.2, hy + 0.3, 0.17, 0.42, angle=0.3)  # floppy ear
    tail = rng.uniform(0.3, 1.0)  # how steeply the tail rises from the rear end of the body
    return shape | ellipse(u, v, -1.25 - 0.4 * np.cos(tail), -0.4 * np.sin(tail), 0.45, 0.1, angle=tail)


def grow(mask, radius) -> np.ndarray:
    """Binary dilation by a disk of `radius` px, as an OR of shifted copies (no scipy needed)."""
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= padded[radius + dy:radius + dy + h, radius + dx:radius + dx + w]
    return out


def trimap_from_mask(mask, band) -> np.ndarray:
    """Official trimap values: 1 pet, 2 background, 3 a band straddling the outline."""
    inside = ~grow(~mask, band)  # erosion; past the image edge counts as pet, so no band there
    trimap = np.full(mask.shape, 2, dtype=np.uint8)
    trimap[grow(mask, band)] = 3
    trimap[inside] = 1
    return trimap


# ----------------------------------------------------------------------------- one image

def draw_background(rng, h, w) -> np.ndarray:
    """Clutter: a gradient between two muted colours, soft blotches, a few shapes, fine grain."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * x / w + np.sin(angle) * y / h
    ramp = ((ramp - ramp.min()) / (np.ptp(ramp) + 1e-6))[..., None]
    img = muted_colour(rng) * (1 - ramp) + muted_colour(rng) * ramp
    img += 18 * smooth_noise(rng, (h, w), (rng.integers(3, 7), rng.integers(3, 7)))[..., None]
    for _ in range(rng.integers(3, 8)):  # furniture, toys, windows
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.05, 0.3) * w, rng.uniform(0.05, 0.3) * h
        if rng.random() < 0.5:
            shape = (np.abs(x - cx) <= rx) & (np.abs(y - cy) <= ry)
        else:
            shape = ellipse(x, y, cx, cy, rx, ry, angle=rng.uniform(0, np.pi))
        opacity = rng.uniform(0.4, 0.9)
        img[shape] = (1 - opacity) * img[shape] + opacity * muted_colour(rng)
    return img + 6 * rng.standard_normal((h, w, 1), dtype=np.float32)


def pet_colours(rng, breed, u, v, shape) -> np.ndarray:
    """Fur colour per pixel: the breed's colour, its pattern in the accent colour, soft shading."""
    h, w = shape
    base = np.array(breed.colour, np.float32) * rng.uniform(0.85, 1.1)
    accent = np.array(breed.accent, np.float32)
    if breed.pattern == "stripes":  # wavy bands across the body, in pet coordinates
        phase = rng.uniform(9, 12) * u + 0.8 * np.sin(3 * v + rng.uniform(0, 2 * np.pi))
        weight = np.clip((np.sin(phase) - 0.1) * 2.5, 0, 1)
    elif breed.pattern == "spots":  # small sharp dots: only the highest bumps of fine noise
        weight = np.clip((smooth_noise(rng, shape, (h / 7, w / 7)) - 1.2) * 3, 0, 1)
    elif breed.pattern == "patches":  # large soft patches of the accent colour
        weight = np.clip(smooth_noise(rng, shape, (h / 30, w / 30)) * 2 - 0.3, 0, 1)
    else:  # "fur": streaks (quick across, slow along) plus grain
        streaks = smooth_noise(rng, shape, (h / 2, w / 10)) + 0.5 * rng.standard_normal(shape)
        weight = np.clip(0.35 + 0.25 * streaks, 0, 1)
    colour = base * (1 - weight[..., None]) + accent * weight[..., None]
    shading = 1.0 - 0.12 * np.minimum(u * u + v * v, 3.0)  # a little volume: darker at the rim
    return colour * shading[..., None]


def draw_pet_mask(rng, breed, h, w):
    """Place one pet covering 15-60% of the image; returns (mask, u, v) with pet coordinates."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(-0.6, 0.6) if breed.species == CAT else rng.uniform(-0.35, 0.35)
    flip = rng.choice((-1.0, 1.0))  # facing left or right
    shape_seed = rng.integers(2**32)  # the same shape is redrawn at each trial scale

    def pet_at(cx, cy, scale):
        du, dv = (x - cx) / scale, (y - cy) / scale
        u = flip * (np.cos(angle) * du + np.sin(angle) * dv)
        v = -np.sin(angle) * du + np.cos(angle) * dv
        shape_fn = cat_shape if breed.species == CAT else dog_shape
        return shape_fn(np.random.default_rng(shape_seed), u, v), u, v

    # Trial at a small scale in the centre: measure the area and extent, then scale to the target.
    scale0 = 0.12 * min(h, w)
    mask0, _, _ = pet_at(w / 2, h / 2, scale0)
    target = rng.uniform(0.18, 0.55)
    scale = scale0 * np.sqrt(target / mask0.mean())
    ys, xs = np.nonzero(mask0)
    k = scale / scale0  # extents of the pet around its centre at the final scale
    left, right = (w / 2 - xs.min()) * k, (xs.max() + 1 - w / 2) * k
    top, bottom = (h / 2 - ys.min()) * k, (ys.max() + 1 - h / 2) * k
    # Keep the whole pet in view when it fits; otherwise centre it (and let it be cut off).
    cx = rng.uniform(left, w - right) if left + right < w else (w + left - right) / 2
    cy = rng.uniform(top, h - bottom) if top + bottom < h else (h + top - bottom) / 2
    mask, u, v = pet_at(cx, cy, scale)
    while mask.mean() < 0.15:  # a big pet cut off by a narrow frame: enlarge until enough shows
        scale *= 1.1
        mask, u, v = pet_at(cx, cy, scale)
    return mask, u, v


def draw_sample(seed, breed, class_id, k, image_size):
    """One (RGB uint8 image, trimap uint8) pair; depends only on (seed, class_id, k, image_size)."""
    rng = np.random.default_rng([seed, class_id, k])
    w, h = (int(round(s * rng.uniform(0.75, 1.25))) for s in image_size)  # photos differ in size
    background = draw_background(rng, h, w)
    mask, u, v = draw_pet_mask(rng, breed, h, w)
    pet = pet_colours(rng, breed, u, v, (h, w))
    # Soften the pet's edge (a 3x3 box blur of the mask), as real photos blur at the outline.
    padded = np.pad(mask.astype(np.float32), 1, mode="edge")
    alpha = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))[..., None] / 9
    image = background * (1 - alpha) + pet * alpha
    image = image * rng.uniform(0.8, 1.15) + 3 * rng.standard_normal((h, w, 3))  # exposure, grain
    band = max(1, round(min(h, w) / 80))  # ~2 px at 160x120, wider for bigger images
    return np.clip(image, 0, 255).astype(np.uint8), trimap_from_mask(mask, band)


# ----------------------------------------------------------------------------- the dataset

def _read_stamp(root: Path):
    try:
        return json.loads((root / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_stamp(root: Path, stamp: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{STAMP_NAME}.", suffix=".tmp", dir=root)    # one per writer
    if hasattr(os, "fchmod"):     # not on Windows before Python 3.13 (where modes do not apply)
        os.fchmod(fd, 0o666 & ~UMASK)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(stamp, indent=2) + "\n")
    os.replace(tmp, root / STAMP_NAME)  # atomic: a reader sees the old or the new stamp


def write_synthetic_dataset(root, *, n_trainval_per_breed=12, n_test_per_breed=6,
                            image_size=(160, 120), seed=0, overwrite=False) -> Path:
    """Write the synthetic dataset under `root` in the official layout and return `root`.

    image_size is the nominal (width, height); each image's width and height are jittered by up
    to +-25%. If `root` already holds a complete dataset with the same parameters it is kept as
    is (unless overwrite=True). A folder with images/ or annotations/ but no stamp of ours
    (e.g. the real dataset) is never written into.

    It is written in a temporary folder beside `root` and renamed into place, as the decoded-array
    cache is (labseg.data): an interrupted write leaves no half dataset, and two processes writing
    it at once (two `labseg prepare`, two notebooks) each finish, leaving one whole dataset.
    """
    if n_trainval_per_breed < 1 or n_test_per_breed < 0:
        raise ValueError("need n_trainval_per_breed >= 1 and n_test_per_breed >= 0")
    # checked before anything is written: a bad seed used to fail half-way, leaving a stamped,
    # incomplete folder; below 16×12 px the drawn pet can vanish
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise ConfigError(f"seed={seed!r}: expected an integer >= 0")
    if not (len(image_size) == 2 and int(image_size[0]) >= 16 and int(image_size[1]) >= 12):
        raise ConfigError(f"image_size={tuple(image_size)!r}: expected (width, height) of at least (16, 12)")
    root = Path(root)
    if root.is_symlink():   # a linked sample is rewritten where the link points; the link stays
        root = root.resolve()
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} is a file; expected a folder to write the synthetic dataset into")
    params = {"n_trainval_per_breed": int(n_trainval_per_breed), "n_test_per_breed": int(n_test_per_breed),
              "image_size": [int(image_size[0]), int(image_size[1])], "seed": int(seed)}
    stamp = {"generator": "labseg.synthetic", "version": FORMAT_VERSION, "params": params}
    done = {**stamp, "complete": True}
    old = _read_stamp(root)
    if not overwrite and old == done:
        return root
    _refuse_foreign(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(tmp, 0o777 & ~UMASK)   # mkdtemp makes 0700: a sample another user wrote must stay readable
        _write_files(tmp, n_trainval_per_breed, n_test_per_breed, image_size, seed)
        _write_stamp(tmp, done)         # last: only now is the dataset complete
        _put_in_place(tmp, root, done, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)      # gone already once renamed into place
    return root


def _refuse_foreign(root: Path) -> None:
    if _read_stamp(root) is None and ((root / "images").exists() or (root / "annotations").exists()):
        raise FileExistsError(f"{root} holds a dataset not written by labseg.synthetic; not touching it")


OURS = ("images", "annotations", STAMP_NAME)


def _put_in_place(tmp: Path, root: Path, done: dict, overwrite: bool) -> None:
    """Rename the finished dataset ``tmp`` to ``root``. An older one there is moved aside first
    (what else the folder holds is moved back) and deleted; where another writer has put the same
    dataset in place meanwhile, theirs stays."""
    for attempt in range(5):
        try:
            os.replace(tmp, root)       # atomic, where root is missing or empty
            return
        except OSError:
            pass
        if _read_stamp(root) == done and (attempt or not overwrite):
            return                      # another writer's, whole: the same files
        _refuse_foreign(root)           # a real dataset put there meanwhile is not touched
        aside = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(root, aside)
        except FileNotFoundError:       # another writer moved it aside first
            continue
        try:
            os.replace(tmp, root)
        except OSError:                 # another writer's is in place already; the next round keeps it
            pass
        for entry in aside.iterdir():   # the folder's other files stay in it
            if entry.name not in OURS and not entry.name.startswith(f".{STAMP_NAME}."):
                with contextlib.suppress(OSError):
                    os.rename(entry, root / entry.name)
        shutil.rmtree(aside, ignore_errors=True)
    if _read_stamp(root) != done:
        raise OSError(f"could not put the synthetic dataset in place at {root}: other processes kept rewriting "
                      "it; run this again")


def _write_files(root: Path, n_trainval_per_breed, n_test_per_breed, image_size, seed) -> None:
    (root / "images").mkdir()
    (root / "annotations" / "trimaps").mkdir(parents=True)

    ids = breed_ids()
    n_per_breed = n_trainval_per_breed + n_test_per_breed
    splits = {"trainval": [], "test": []}
    for breed in BREEDS:
        class_id, species, breed_id = ids[breed.name]
        # Like the official split, trainval and test numbers are interleaved, not in two blocks.
        order = np.random.default_rng([seed, class_id]).permutation(np.arange(1, n_per_breed + 1))
        in_trainval = set(order[:n_trainval_per_breed].tolist())
        first_trainval = min(in_trainval)
        for k in range(1, n_per_breed + 1):
            name = f"{breed.name}_{k}"
            image, trimap = draw_sample(seed, breed, class_id, k, image_size)
            picture = Image.fromarray(image)
            if k == first_trainval and breed.name in ODD_MODES:
                picture = picture.convert(ODD_MODES[breed.name])
            picture.save(root / "images" / f"{name}.jpg", quality=90)
            Image.fromarray(trimap).save(root / "annotations" / "trimaps" / f"{name}.png")
            split = "trainval" if k in in_trainval else "test"
            splits[split].append(f"{name} {class_id} {species} {breed_id}")

    n_cats = sum(b.species == CAT for b in BREEDS)
    header = ["#Image CLASS-ID SPECIES BREED ID", f"#ID: 1:{len(BREEDS)} Class ids", "#SPECIES: 1:Cat 2:Dog",
              f"#BREED ID: 1-{n_cats}:Cat 1:{len(BREEDS) - n_cats}:Dog",
              "#All images with 1st letter as capital are cat images",
              "#images with small first letter are dog images"]
    everything = sorted(splits["trainval"] + splits["test"], key=_entry_order)
    annotations = root / "annotations"
    (annotations / "list.txt").write_text("\n".join(header + everything) + "\n", encoding="utf-8")
    for split, lines in splits.items():
        (annotations / f"{split}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _entry_order(line: str):
    """Sort list entries by class id, then image number (breed names contain underscores)."""
    name, class_id = line.split()[:2]
    return int(class_id), int(name.rsplit("_", 1)[1])


def default_sample_dir() -> Path:
    """<project root>/data/sample, where the project root holds the `labseg` package folder."""
    return Path(__file__).resolve().parent.parent / "data" / "sample"


def ensure_sample(root=None) -> Path:
    """The embedded sample dataset with the default parameters, generated on first use."""
    return write_synthetic_dataset(root if root is not None else default_sample_dir())
