"""The dataset: official Oxford-IIIT Pet layout, splits, trimap -> mask, quirks, cache, batches.

Data flow::

    folder --read_records--> [Record] --load_split (decode+resize once, cached)--> CachedSplit
           CachedSplit + indices --Batches--> (image float N×3×S×S, target N×1×S×S, valid N×1×S×S)

The real dataset has quirks (a GIF and an RGBA PNG named ``.jpg``, CMYK and grayscale JPEGs,
stray ``.mat`` files, split entries without a trimap, trimaps without pet pixels). None of them
may crash an epoch: images are converted to RGB, and a pair that cannot be used is skipped with
one line on stderr naming the file, and counted in :attr:`CachedSplit.skipped`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from labseg.config import UMASK, check_choice, check_folder, check_img_size, resolve_path
from labseg.progress import redraws
from labseg.transforms import channel_constant

SPLITS = ("trainval", "test", "list")
SPECIES = {1: "cat", 2: "dog"}
MAX_PIXELS = 40_000_000          # larger images are refused (decompression-bomb guard)
# Part of every cache's key: bump it when decoding or resizing changes what a cache holds, so that
# caches built before are rebuilt, not read (2: 0-1 float images decode to 0-255, c9543f9).
CACHE_VERSION = 2

# Label values stored in the cache: the trimap folded into one byte per pixel.
BACKGROUND, PET, BORDER = 0, 1, 2
# ImageNet statistics: a sensible fixed normalisation for natural photos.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

LAYOUT_HELP = """\
Expected the official Oxford-IIIT Pet layout:
  {root}/images/<Name>_<n>.jpg
  {root}/annotations/trimaps/<Name>_<n>.png   (1 = pet, 2 = background, 3 = border)
  {root}/annotations/trainval.txt, test.txt, list.txt
Get it with `labseg download {parent}` (needs internet), which unpacks it into
{parent}/oxford-iiit-pet, or by hand: download images.tar.gz and annotations.tar.gz from
https://www.robots.ox.ac.uk/~vgg/data/pets/ and unpack both into {root}.
For the embedded synthetic sample instead, run `labseg prepare --synthetic`."""


def layout_help(root: Path) -> str:
    """LAYOUT_HELP for ``root``: `labseg download DIR` unpacks into DIR/oxford-iiit-pet, so it is
    given the folder that puts the dataset at ``root`` when root has that name."""
    parent = root.parent if root.name == "oxford-iiit-pet" else root
    return LAYOUT_HELP.format(root=root, parent=parent)


class DatasetLayoutError(RuntimeError):
    """The dataset folder is missing or not laid out like Oxford-IIIT Pet."""


class BadSampleError(ValueError):
    """One image or trimap cannot be used; the message names the file and the reason."""


class _StderrHandler(logging.StreamHandler):
    """Write to whatever sys.stderr is now (Jupyter and pytest replace it), through tqdm.write:
    a note printed while a progress bar runs (caching, predicting) goes above the bar, not into it."""

    def emit(self, record):
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


log = logging.getLogger("labseg")
if not log.handlers:
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("labseg: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


# --------------------------------------------------------------------------- records and splits
@dataclass(frozen=True)
class Record:
    """One image of the dataset and what the split files say about it."""

    name: str            # e.g. "american_bulldog_12"
    breed: str           # e.g. "american_bulldog" (everything before the last "_")
    species: str         # "cat" or "dog"
    class_id: int        # 1..37 over all breeds
    image_path: Path
    trimap_path: Path


def breed_of(name: str) -> str:
    return name.rsplit("_", 1)[0]


def check_layout(root: str | Path) -> Path:
    """Return the resolved root, or fail fast describing the expected layout."""
    root = resolve_path(root)
    if root.exists() and not root.is_dir():
        raise DatasetLayoutError(f"{root} is a file; expected the dataset's folder, with images/ and "
                                 "annotations/ (trimaps/, trainval.txt, test.txt) inside")
    missing = _missing_parts(root)
    if missing:
        what = "does not exist" if not root.exists() else "is missing " + ", ".join(missing)
        # a folder inside the dataset (images/, annotations/trimaps/) given for the dataset's own
        above = next((up for up in root.parents[:2] if not _missing_parts(up)), None) if root.exists() else None
        if above is not None:
            raise DatasetLayoutError(f"dataset folder {root} is {root.relative_to(above)}/ inside the dataset "
                                     f"at {above}, not the dataset's own folder; give {above} instead")
        raise DatasetLayoutError(f"dataset folder {root} {what}.\n" + layout_help(root))
    return root


def check_recorded_dataset(data_dir: str | Path, run_name: str, give: str) -> None:
    """A run's recorded dataset folder is missing here: say so, and how to give where it is now
    (``give``), rather than advise downloading into the recorded place."""
    root = resolve_path(data_dir)
    if root.exists():
        return
    from labseg.synthetic import default_sample_dir

    if root == default_sample_dir():
        raise DatasetLayoutError(f"run {run_name} was trained on the synthetic sample, and {root} does not exist "
                                 "here: write it again with `labseg prepare --synthetic` (the same images)")
    raise DatasetLayoutError(f"run {run_name} was trained on {data_dir}, and {root} does not exist here (the "
                             f"dataset moved, or the run came from another machine); give its folder: {give}")


def _missing_parts(root: Path) -> list[str]:
    # folders must be folders and split files files (a folder named trainval.txt is missing it)
    return [p for p in ("images", "annotations/trimaps", "annotations/trainval.txt", "annotations/test.txt")
            if not ((root / p).is_file() if p.endswith(".txt") else (root / p).is_dir())]


def read_split_file(path: str | Path) -> list[tuple[str, int, int]]:
    """Parse a split file into (name, class_id, species_id) tuples.

    Tolerates blank lines, ``#`` comments and Windows line endings; a malformed line is
    reported and skipped.
    """
    path = Path(path)
    entries, seen = [], set()
    # utf-8-sig: a byte-order mark (Windows editors) must not become part of the first name.
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            name = parts[0]
            class_id = int(parts[1]) if len(parts) > 1 else 0
            species_id = int(parts[2]) if len(parts) > 2 else 0
        except ValueError:
            log.warning(f"skipped {path.name}:{lineno}: expected 'Name CLASS-ID SPECIES BREED-ID', got {line!r}")
            continue
        if name in seen:
            continue
        seen.add(name)
        entries.append((name, class_id, species_id))
    return entries


def read_records(root: str | Path, split: str) -> tuple[list[Record], list[tuple[str, str]]]:
    """The records of ``split`` whose image and trimap exist, and the (file, reason) skipped."""
    check_choice("split", split, SPLITS)
    root = check_layout(root)
    split_path = root / "annotations" / f"{split}.txt"
    if not split_path.exists():
        raise DatasetLayoutError(f"split file {split_path} does not exist.\n" + layout_help(root))
    records, skipped = [], []
    for name, class_id, species_id in read_split_file(split_path):
        image_path = root / "images" / f"{name}.jpg"
        trimap_path = root / "annotations" / "trimaps" / f"{name}.png"
        if not image_path.is_file():
            skipped.append((str(image_path), "listed in the split file but the image does not exist"))
        elif not trimap_path.is_file():
            skipped.append((str(trimap_path), "the image has no trimap"))
        else:
            # Cat breeds are Capitalised in the official names, dogs are lower case.
            species = SPECIES.get(species_id) or ("cat" if name[:1].isupper() else "dog")
            records.append(Record(name, breed_of(name), species, class_id, image_path, trimap_path))
    for path, reason in skipped:
        log.warning(f"skipped {path}: {reason}")
    if not records and not skipped:     # nothing to skip: the file names no image at all
        raise DatasetLayoutError(f"split {split_path} is empty: it lists no image (expected one line per image, "
                                 "'Name CLASS-ID SPECIES BREED-ID' or the name alone).\n" + layout_help(root))
    if not records:
        raise DatasetLayoutError(f"split {split_path} lists no usable image (skipped {len(skipped)}).\n"
                                 + layout_help(root))
    return records, skipped


def split_trainval(records: list[Record], valid_fraction: float = 0.1, seed: int = 0):
    """Deterministic breed-stratified split -> (train indices, valid indices) into ``records``.

    Each breed is shuffled with a generator seeded by (seed, breed), so the split of one breed
    does not change when another breed is added or the file order changes.
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction={valid_fraction!r}: expected a number in (0, 1)")
    by_breed: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_breed.setdefault(r.breed, []).append(i)
    train, valid = [], []
    for breed, idx in sorted(by_breed.items()):
        idx = sorted(idx, key=lambda i: records[i].name)
        rng = np.random.default_rng([seed, zlib.crc32(breed.encode())])
        order = [idx[j] for j in rng.permutation(len(idx))]
        n_valid = int(round(len(idx) * valid_fraction))
        if len(idx) >= 2:
            n_valid = min(max(n_valid, 1), len(idx) - 1)
        valid += order[:n_valid]
        train += order[n_valid:]
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(valid), dtype=np.int64)


def balanced_subset(records: list[Record], indices, n: int) -> np.ndarray:
    """``n`` of ``indices``, taken from each breed in turn, so that a subset keeps every breed.

    (The first ``n`` indices would not: records come sorted by breed, so 135 of the 3-breed
    subset's 270 training images would hold no Bengal at all.)"""
    by_breed: dict[str, list[int]] = {}
    for i in indices:
        by_breed.setdefault(records[i].breed, []).append(int(i))
    in_turn = [i for group in zip_longest(*by_breed.values()) for i in group if i is not None]
    return np.array(sorted(in_turn[:n]), dtype=np.int64)


# --------------------------------------------------------------------------- decoding one pair
def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or 32-bit grayscale: scale the value range down to 8 bits, don't clip it.
        a = np.asarray(im, dtype=np.float64)
        # A NaN or infinite pixel of a float image (a sensor's dead pixel) is black, and does not
        # set the range of the others: one NaN once made the whole image read as 0-255, one inf as 16-bit.
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        # I;16* is 16-bit by definition; for 32-bit "I"/"F" guess the range from the values.
        # A float image at most 1.0 is on the 0-1 scale (a float TIFF), not a nearly black 0-255 one.
        top = (65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255
               else 1.0 if im.mode == "F" and a.max(initial=0) <= 1.0 else 255.0)
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels become white rather than whatever colour hides under them.
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


# warnings.catch_warnings swaps process-wide state: without the lock, two cache-building threads
# could restore each other's filters (and a bomb warning would print instead of being refused).
# Only the header is read under it, so the threads hardly wait.
_WARNINGS_LOCK = threading.Lock()


def _open_checked(path: Path, check_size: bool = True) -> Image.Image:
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            previous = Image.MAX_IMAGE_PIXELS
            if not check_size and previous:     # read reduced (load_image): to 1/8 of each side, 64x fewer
                Image.MAX_IMAGE_PIXELS = max(previous, 64 * MAX_PIXELS)
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        # Pillow's own limit (above MAX_PIXELS) tripped while reading the header: nothing decoded.
        raise BadSampleError(f"{path}: refused by the decompression-bomb guard, not decoded ({e})") from None
    w, h = im.size
    if check_size and w * h > MAX_PIXELS:
        im.close()
        raise BadSampleError(f"{path}: {w}×{h} px exceeds the {MAX_PIXELS:,} px limit "
                             "(a guard against decompression bombs); resize the file or raise "
                             "labseg.data.MAX_PIXELS")
    if w < 1 or h < 1:
        raise BadSampleError(f"{path}: image has size {w}×{h}")
    return im


def load_image(path: str | Path, upright: bool = False, reduce: bool = False) -> np.ndarray:
    """Decode any image file to an RGB uint8 array (H×W×3), or raise :class:`BadSampleError`.

    ``upright``: turn it as its EXIF orientation says, as viewers show it (a phone photo given
    to predict). The dataset's trimaps match the stored pixels, so training reads those.
    ``reduce``: a JPEG of more than MAX_PIXELS is decoded at 1/2, 1/4 or 1/8 of its side (JPEG's
    own scaled decoding, cheap) to at most that many, rather than refused: a 48 MP phone photo
    given to predict. Other formats above MAX_PIXELS are refused as before."""
    path = Path(path)
    try:
        im = _open_checked(path, check_size=not reduce)
        with im:
            w, h = im.size
            if reduce and w * h > MAX_PIXELS:
                k = next((k for k in (2, 4, 8) if w * h / k ** 2 <= MAX_PIXELS), None)
                if im.format != "JPEG" or k is None:
                    raise BadSampleError(f"{path}: {w}×{h} px exceeds the {MAX_PIXELS:,} px limit (a guard "
                                         "against decompression bombs); resize the file (a JPEG is read at a "
                                         "reduced size up to 64 times that, 1/8 of each side)")
                im.draft("RGB", (math.ceil(w / k), math.ceil(h / k)))
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)                      # an animated GIF: its first frame
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im) if upright else im)
    except BadSampleError:
        raise
    except Exception as e:  # PIL raises many types for broken files; all mean "unusable"
        if path.is_file() and path.stat().st_size == 0:
            raise BadSampleError(f"{path}: empty file (0 bytes); expected an image") from None
        raise BadSampleError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def upright_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the image as viewers show it (EXIF orientation applied), from its header
    (nothing is decoded: Pillow's decompression-bomb warning does not apply)."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)
    with im:
        w, h = im.size
        turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)   # the orientations that swap the sides
    return (w, h) if turned else (h, w)


_SUFFIX_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def quirks(record: Record, labels: np.ndarray) -> list[str]:
    """What was odd about a pair that was kept anyway: a file whose format is not its suffix's,
    pixels converted to RGB, a trimap without any pet (the real data has each)."""
    notes = []
    with Image.open(record.image_path) as im:          # the header only
        fmt, mode = im.format, im.mode
    expected = _SUFFIX_FORMATS.get(record.image_path.suffix.lower())
    if expected and fmt != expected:
        notes.append(f"a {fmt} file named {record.image_path.suffix}")
    if mode != "RGB":
        notes.append(f"{mode} pixels converted to RGB")
    if not (labels != BACKGROUND).any():
        notes.append("its trimap has no pet pixel (kept: scored as all background)")
    return notes


def load_trimap(path: str | Path) -> np.ndarray:
    """Decode a trimap to uint8 H×W with values in {1, 2, 3}, or raise :class:`BadSampleError`."""
    path = Path(path)
    try:
        im = _open_checked(path)
        with im:
            im.load()
            a = np.asarray(im)
    except BadSampleError:
        raise
    except Exception as e:
        raise BadSampleError(f"{path}: cannot decode trimap ({type(e).__name__}: {e})") from None
    if a.ndim == 3:
        a = a[..., 0]
    if a.ndim != 2:
        raise BadSampleError(f"{path}: trimap has shape {a.shape}, expected H×W")
    values = np.unique(a)
    bad = values[~np.isin(values, (1, 2, 3))]
    if bad.size:
        raise BadSampleError(f"{path}: trimap holds values {bad[:5].tolist()}; expected only "
                             "1 (pet), 2 (background), 3 (border)")
    return a.astype(np.uint8)


MAX_SKIP_LINES = 20     # skipped pairs named one per line on stderr; the rest counted


def _skipped_hint(skipped: list[tuple[str, str]], n: int) -> str:
    """One cause behind most skipped pairs, said once: trimaps saved 0-based (0/1/2), as some
    re-exports of the dataset are, fail every one of them with the same values."""
    bad_values = [r for _, r in skipped if "trimap holds values [0" in r]
    if len(bad_values) < max(3, n // 2):
        return ""
    return (f"; {len(bad_values)} of {n} trimaps hold a 0: they look 0-based (0 = pet, 1 = background, "
            "2 = border), while Oxford-IIIT Pet's are 1, 2, 3; add 1 to every trimap pixel and run again")


def trimap_to_mask(trimap: np.ndarray) -> np.ndarray:
    """The lab's binary mask: pet = trimap ∈ {1, 3} (the border counts as pet)."""
    return np.isin(trimap, (1, 3)).astype(np.uint8)


def trimap_to_labels(trimap: np.ndarray) -> np.ndarray:
    """Fold a trimap into the cached labels: 0 background, 1 pet, 2 border."""
    labels = np.zeros(trimap.shape, np.uint8)
    labels[trimap == 1] = PET
    labels[trimap == 3] = BORDER
    return labels


def load_pair(record: Record) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 H×W×3, labels uint8 H×W) at the image's own size.

    A trimap of another size than its image is resized to it (nearest) with a warning.
    """
    image = load_image(record.image_path)
    labels = trimap_to_labels(load_trimap(record.trimap_path))
    if labels.shape != image.shape[:2]:
        log.warning(f"resized {record.trimap_path}: trimap is {labels.shape[1]}×{labels.shape[0]}, "
                    f"image is {image.shape[1]}×{image.shape[0]}")
        labels = np.asarray(Image.fromarray(labels).resize(image.shape[1::-1], Image.NEAREST))
    return image, labels


def resize_pair(image: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize to size×size: bilinear (antialiased) for the image, nearest for the labels."""
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    labels = np.asarray(Image.fromarray(labels).resize((size, size), Image.NEAREST))
    return image, labels


# --------------------------------------------------------------------------- the cache
@dataclass
class CachedSplit:
    """A split decoded and resized once: the arrays every epoch reads."""

    images: np.ndarray                  # N×3×S×S uint8
    labels: np.ndarray                  # N×S×S uint8, 0 background / 1 pet / 2 border
    records: list[Record]
    sizes: np.ndarray                   # N×2 original (height, width)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self):
        return len(self.records)

    @property
    def masks(self) -> np.ndarray:
        """Binary masks N×S×S (pet incl. border), as the lab defines them."""
        return (self.labels != BACKGROUND).astype(np.uint8)

    def subset(self, indices) -> "CachedSplit":
        indices = np.asarray(indices, dtype=np.int64)
        return CachedSplit(self.images[indices], self.labels[indices],
                           [self.records[i] for i in indices], self.sizes[indices], self.skipped)


def _cache_key(root: Path, split: str, size: int, records: list[Record]) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}|{root}|{split}|{size}".encode())
    for r in records:
        for p in (r.image_path, r.trimap_path):
            st = p.stat()
            h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def load_split(data_dir: str | Path, split: str, img_size: int, cache_dir: str | Path = "data/cache",
               progress: bool = True, workers: int | None = None) -> CachedSplit:
    """Decode and resize ``split`` once to img_size×img_size and cache it; later calls read the cache.

    The cache is keyed by dataset path, split, size and the files' sizes and times, so an edited
    dataset is rebuilt. It is written to a temporary folder and renamed into place, so an
    interrupted build never leaves a half cache behind.
    """
    check_img_size(img_size)        # before a cache of another size is taken for a damaged one
    root = check_layout(data_dir)
    records, skipped = read_records(root, split)
    folder = check_folder("cache_dir", cache_dir) / f"{root.name}-{split}-{img_size}-{_cache_key(root, split, img_size, records)}"
    if (folder / "meta.json").is_file():
        try:
            return _read_cache(folder, root, img_size)
        except _CacheDamaged as e:      # rebuilt from the images, which are the truth
            log.warning(f"cache {folder} is damaged ({e}); rebuilding it")
            shutil.rmtree(folder)
    elif folder.exists() or folder.is_symlink():
        # load_split renames a finished cache into place with its meta.json, so this is something
        # else (a partial delete, a sync tool's leftovers); in the way, it would fail every build.
        log.warning(f"cache {folder} has no meta.json (not a cache labseg wrote); rebuilding it")
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        else:
            folder.unlink()

    _check_cache_space(folder, len(records), img_size)      # before minutes of decoding, not after them

    from tqdm.auto import tqdm

    def decode(record):
        try:
            original = load_pair(record)
            image, lab = resize_pair(*original, img_size)
            return image, lab, original[1].shape, quirks(record, original[1])
        except BadSampleError as e:
            return e

    n = len(records)
    images = np.empty((n, 3, img_size, img_size), np.uint8)
    labels = np.empty((n, img_size, img_size), np.uint8)
    sizes = np.zeros((n, 2), np.int64)
    keep = np.zeros(n, bool)
    quirky: dict[str, list[str]] = {}
    unreadable = 0      # pairs that failed to decode (read_records named the missing ones already)
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(decode, records)
        for i, result in enumerate(tqdm(results, total=n, desc=f"caching {root.name}/{split} @{img_size}px",
                                        disable=not progress, leave=False, **redraws(tqdm))):
            if isinstance(result, BadSampleError):
                if unreadable < MAX_SKIP_LINES:    # the full dataset could print thousands
                    log.warning(f"skipped {result}")
                unreadable += 1
                skipped.append((str(records[i].image_path), str(result)))
                continue
            image, lab, sizes[i], notes = result
            if notes:
                quirky[records[i].name] = notes
                if progress:    # quiet callers (the notebooks, tests) find them in meta.json
                    log.info(f"note: {records[i].image_path}: {'; '.join(notes)}")
            images[i] = image.transpose(2, 0, 1)
            labels[i] = lab
            keep[i] = True
    kept = [r for r, k in zip(records, keep) if k]
    if unreadable > MAX_SKIP_LINES:
        log.warning(f"skipped {unreadable - MAX_SKIP_LINES} more of {split} (each is named in the cache's "
                    "meta.json and in CachedSplit.skipped)")
    hint = _skipped_hint(skipped, n)
    if not kept:
        raise DatasetLayoutError(f"no usable image in split {split} of {root} (all {n} skipped){hint}")
    if hint:
        log.warning(hint.strip())

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    os.chmod(tmp, 0o777 & ~UMASK)   # mkdtemp makes 0700: a cache another user built must stay readable
    try:
        for name, array in (("images", images), ("labels", labels), ("sizes", sizes)):
            np.save(tmp / f"{name}.npy", _kept_rows(array, keep))
        meta = {"root": str(root), "split": split, "img_size": img_size,
                "names": [r.name for r in kept], "skipped": skipped, "notes": quirky}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is None:
            # numpy's tofile says "Not enough free space to write N bytes" with no errno: named as the
            # disk error it is (a one-line message from the CLI, not a traceback), with what to do
            raise OSError(errno.ENOSPC, f"could not write the cache {folder} ({_cache_bytes(n, img_size) / 2**20:.0f} "
                                        f"MiB): {e}; free some space, or give --cache-dir (cache_dir=) on another "
                                        "disk") from e
        raise
    _remove_stale_caches(folder, root, split, img_size, progress)
    return _read_cache(folder, root, img_size)


def _remove_stale_caches(folder: Path, root: Path, split: str, img_size: int, say: bool) -> None:
    """Delete the other caches of this dataset's split at this size (the same dataset folder): built
    before its files changed, or by an older cache format, they are never read again, and each
    takes up to ~1 GB on the full dataset at 256 px. Caches of other folders, splits or sizes stay."""
    prefix = f"{root.name}-{split}-{img_size}-"
    gone, freed = 0, 0
    for other in folder.parent.iterdir():
        if (other == folder or other.is_symlink() or not other.is_dir()
                or not re.fullmatch(re.escape(prefix) + r"[0-9a-f]{12}", other.name)):
            continue
        try:
            if json.loads((other / "meta.json").read_text(encoding="utf-8")).get("root") != str(root):
                continue
            size = sum(f.stat().st_size for f in other.iterdir() if f.is_file())
            shutil.rmtree(other)
        except (OSError, ValueError):       # in use elsewhere, or not a cache labseg wrote: left
            continue
        gone, freed = gone + 1, freed + size
    if gone and say:
        log.info(f"removed {gone} older cache(s) of {root.name}/{split} at {img_size}px ({freed / 2**20:.0f} MiB): "
                 "built before its files changed")


def _cache_bytes(n: int, img_size: int) -> int:
    """What a cache of ``n`` images at ``img_size`` takes on disk: 3 bytes of image and 1 of label a pixel."""
    return n * (4 * img_size * img_size + 16) + 4096 * 4


def _check_cache_space(folder: Path, n: int, img_size: int) -> None:
    """Refuse a cache that cannot fit on its disk before any image is decoded (the full dataset's
    trainval at 256 px: ~0.9 GB and a minute or more of decoding)."""
    need = _cache_bytes(n, img_size)
    where = next((p for p in (folder.parent, *folder.parent.parents) if p.is_dir()), None)
    if where is None:
        return
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if free < need:
        raise OSError(errno.ENOSPC, f"the cache of {n} images at {img_size} px needs {need / 2**20:.0f} MiB in "
                                    f"{folder.parent} and its disk has {free / 2**20:.0f} MiB free; free some space "
                                    "(old caches in that folder can go), or give --cache-dir (cache_dir=) on another disk")


def _kept_rows(array: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``array[keep]`` without a second copy of the array (the full dataset at 256 px holds ~1 GB
    a split): the kept rows move up in place, and the first of them are returned as a view."""
    rows = np.flatnonzero(keep)
    for to, row in enumerate(rows):
        if to != row:
            array[to] = array[row]
    return array[:len(rows)]


class _CacheDamaged(Exception):
    """A cache folder that is not what load_split wrote (truncated, edited); it gets rebuilt."""


def _read_cache(folder: Path, root: Path, img_size: int) -> CachedSplit:
    """The cached split, checked against itself: every array one row per name, at ``img_size``
    (a shifted name list would pair each record with its neighbour's image, silently)."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        records_by_name = {r.name: r for r in read_records_quiet(root, meta["split"])}
        if unknown := [n for n in meta["names"] if n not in records_by_name]:
            raise _CacheDamaged(f"{len(unknown)} name(s) not in the split, e.g. {unknown[0]!r}")
        cached = CachedSplit(
            images=np.load(folder / "images.npy", mmap_mode="r"),
            labels=np.load(folder / "labels.npy", mmap_mode="r"),
            records=[records_by_name[n] for n in meta["names"]],
            sizes=np.load(folder / "sizes.npy"),
            skipped=[tuple(s) for s in meta["skipped"]],
        )
    except PermissionError:
        raise                                   # not damage: say so rather than rebuild
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
        raise _CacheDamaged(f"{type(e).__name__}: {e}") from None
    n, shapes = len(cached.records), (cached.images.shape, cached.labels.shape, cached.sizes.shape)
    if shapes != ((n, 3, img_size, img_size), (n, img_size, img_size), (n, 2)):
        raise _CacheDamaged(f"arrays of shapes {', '.join(map(str, shapes))} for {n} names at {img_size} px")
    return cached


def read_records_quiet(root: Path, split: str) -> list[Record]:
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return read_records(root, split)[0]
    finally:
        log.setLevel(level)


# --------------------------------------------------------------------------- batches
def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB batch -> ImageNet-normalised batch."""
    return (x - channel_constant(MEAN, x.device, x.dtype)) / channel_constant(STD, x.device, x.dtype)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    return (x * channel_constant(STD, x.device, x.dtype) + channel_constant(MEAN, x.device, x.dtype)).clamp(0, 1)


@dataclass
class Batch:
    image: torch.Tensor       # N×3×S×S float, normalised
    target: torch.Tensor      # N×1×S×S float in {0, 1}
    valid: torch.Tensor       # N×1×S×S float: 0 where the pixel is left out of the loss
    index: torch.Tensor       # N positions in the CachedSplit


class Batches:
    """Batches straight from the cached uint8 arrays: one fancy-index per batch, no per-sample Python.

    Augmentation (a :class:`labseg.transforms.BatchAugment`) runs on whole batches on the
    training device, drawing its random parameters per sample.
    """

    def __init__(self, split: CachedSplit, indices=None, batch_size: int = 16, *, shuffle: bool = False,
                 seed: int = 0, augment=None, device="cpu", drop_last: bool = False,
                 ignore_border: bool = False, channels_last: bool = False):
        self.split = split
        self.indices = np.arange(len(split)) if indices is None else np.asarray(indices, np.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment, self.device, self.drop_last = augment, torch.device(device), drop_last
        self.ignore_border, self.channels_last = ignore_border, channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int):
        """Each epoch shuffles differently, and the same way again after a resume."""
        self.epoch = epoch

    def __len__(self):
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = self.indices
        if self.shuffle:
            g = np.random.default_rng([self.seed, self.epoch])
            order = order[g.permutation(len(order))]
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + self.epoch)
        for b in range(len(self)):
            idx = np.sort(order[b * self.batch_size:(b + 1) * self.batch_size])
            yield self.make_batch(idx, gen)

    def make_batch(self, idx, generator=None) -> Batch:
        pin = self.device.type == "cuda"
        images = torch.from_numpy(np.ascontiguousarray(self.split.images[idx]))
        labels = torch.from_numpy(np.ascontiguousarray(self.split.labels[idx]))
        if pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        images = images.to(self.device, non_blocking=True).float()           # 0..255
        labels = labels.to(self.device, non_blocking=True).unsqueeze(1)
        if self.augment is not None:   # augments, scales and normalises in one pass
            image, labels = self.augment.augment_normalized(images, labels, MEAN, STD, generator=generator)
        else:
            image = normalize(images.div_(255))
        target = (labels != BACKGROUND).float()
        valid = (labels != BORDER).float() if self.ignore_border else torch.ones_like(target)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return Batch(image, target, valid, torch.from_numpy(idx))
