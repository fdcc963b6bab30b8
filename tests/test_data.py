"""The data layer: layout checks, split files, splits, image/trimap quirks, the cache, batches.

Every fixture file is drawn here with numpy/Pillow into tmp_path; nothing is mocked.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from labseg import data
from labseg.data import (BORDER, PET, BadSampleError, Batches, CachedSplit, DatasetLayoutError, check_layout,
                         Record, balanced_subset, denormalize, load_image, load_split, load_trimap, read_records,
                         read_split_file, split_trainval, trimap_to_labels, trimap_to_mask)
from labseg.transforms import BatchAugment

S = 32  # cache side used by the tests: small and divisible by 32


# =========================================================================== helpers
def rgb_array(h=24, w=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def trimap_array(h=24, w=32) -> np.ndarray:
    """Left third pet (1), a border column (3), the rest background (2)."""
    t = np.full((h, w), 2, np.uint8)
    t[:, : w // 3] = 1
    t[:, w // 3] = 3
    return t


def make_layout(root: Path) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    for split in ("trainval", "test"):
        f = root / "annotations" / f"{split}.txt"
        if not f.exists():
            f.write_text("")
    return root


def write_split(root: Path, names, split="trainval") -> None:
    lines = [f"{n} 1 {1 if n[:1].isupper() else 2} 1" for n in names]
    (root / "annotations" / f"{split}.txt").write_text("".join(line + "\n" for line in lines))


def add_pair(root: Path, name: str, image=None, trimap="default", *, fmt="JPEG", **save) -> tuple[Path, Path]:
    """Write images/<name>.jpg (any content, any real format) and its trimap.

    image: None (a random RGB JPEG), a PIL image (saved as `fmt`), or raw bytes.
    trimap: "default", None (no trimap file), a uint8 array (saved as PNG), a PIL image or bytes.
    """
    image_path = root / "images" / f"{name}.jpg"
    trimap_path = root / "annotations" / "trimaps" / f"{name}.png"
    if image is None:
        image = Image.fromarray(rgb_array())
    if isinstance(image, bytes):
        image_path.write_bytes(image)
    else:
        image.save(image_path, format=fmt, **save)
    if isinstance(image, Image.Image):
        w, h = image.size
    else:
        w, h = 32, 24
    if isinstance(trimap, str):
        trimap = trimap_array(h, w)
    if trimap is None:
        pass
    elif isinstance(trimap, bytes):
        trimap_path.write_bytes(trimap)
    elif isinstance(trimap, Image.Image):
        trimap.save(trimap_path, format="PNG")
    else:
        Image.fromarray(trimap).save(trimap_path, format="PNG")
    return image_path, trimap_path


def constant_png(path: Path, width: int, height: int, value: int = 7) -> None:
    """A valid 8-bit grayscale PNG of one value, streamed row by row: 10000×10000 is ~120 KB."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    z = zlib.compressobj(9)
    row = b"\x00" + bytes([value]) * width  # filter byte 0, then the pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def records_for(sizes: dict[str, int]) -> list[Record]:
    out = []
    for breed, n in sizes.items():
        for k in range(1, n + 1):
            name = f"{breed}_{k}"
            out.append(Record(name, breed, "cat", 1, Path(f"{name}.jpg"), Path(f"{name}.png")))
    return out


# =========================================================================== 1. trimap -> mask
def test_trimap_to_mask_counts_border_as_pet():
    trimap = np.array([[1, 2, 3], [3, 2, 1]], np.uint8)
    mask = trimap_to_mask(trimap)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[1, 0, 1], [1, 0, 1]])


def test_trimap_to_labels_folds_to_background_pet_border():
    trimap = np.array([[1, 2, 3], [2, 3, 1]], np.uint8)
    labels = trimap_to_labels(trimap)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [[PET, 0, BORDER], [0, BORDER, PET]])
    assert (PET, BORDER) == (1, 2)
    # the cached labels and the binary mask agree: pet = anything not background
    np.testing.assert_array_equal((labels != 0).astype(np.uint8), trimap_to_mask(trimap))


# =========================================================================== 2. splits
def test_split_trainval_is_deterministic_and_seed_dependent():
    records = records_for({"Abyssinian": 30, "Bengal": 25, "beagle": 20})
    a = split_trainval(records, 0.2, seed=1)
    b = split_trainval(records, 0.2, seed=1)
    c = split_trainval(records, 0.2, seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert set(a[1].tolist()) != set(c[1].tolist())
    for train, valid in (a, c):
        assert train.dtype == np.int64 and valid.dtype == np.int64
        assert not set(train.tolist()) & set(valid.tolist())
        assert sorted(train.tolist() + valid.tolist()) == list(range(len(records)))


def test_split_trainval_does_not_depend_on_record_order():
    records = records_for({"Abyssinian": 30, "Bengal": 25, "beagle": 20})
    shuffled = records[:]
    random.Random(5).shuffle(shuffled)
    _, valid = split_trainval(records, 0.2, seed=3)
    _, valid2 = split_trainval(shuffled, 0.2, seed=3)
    assert {records[i].name for i in valid} == {shuffled[i].name for i in valid2}


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_split_trainval_is_stratified_by_breed(fraction):
    sizes = {"Abyssinian": 40, "Bengal": 23, "Sphynx": 7, "beagle": 3, "pug": 2, "boxer": 1}
    records = records_for(sizes)
    train, valid = split_trainval(records, fraction, seed=0)
    for breed, n in sizes.items():
        n_valid = sum(records[i].breed == breed for i in valid)
        n_train = sum(records[i].breed == breed for i in train)
        assert n_valid + n_train == n
        if n >= 2:
            assert 1 <= n_valid <= n - 1, (breed, n_valid)
        assert abs(n_valid - n * fraction) <= 1, (breed, n, n_valid)  # ≈ fraction of each breed


def test_balanced_subset_takes_each_breed_in_turn():
    records = records_for({"Abyssinian": 30, "Bengal": 25, "beagle": 3})
    train, _ = split_trainval(records, 0.2, seed=0)
    half = balanced_subset(records, train, len(train) // 2)
    assert half.dtype == np.int64 and list(half) == sorted(half) and set(half.tolist()) <= set(train.tolist())
    counts = {b: sum(records[i].breed == b for i in half) for b in ("Abyssinian", "Bengal", "beagle")}
    beagles = sum(records[i].breed == "beagle" for i in train)
    assert counts["beagle"] == beagles                        # a small breed gives all it has ...
    assert abs(counts["Abyssinian"] - counts["Bengal"]) <= 1   # ... and the others share the rest
    assert sum(counts.values()) == len(train) // 2
    np.testing.assert_array_equal(balanced_subset(records, train, 10_000), train)


def test_split_trainval_default_is_ten_percent():
    records = records_for({"Abyssinian": 50, "Bengal": 30, "beagle": 20})
    train, valid = split_trainval(records, seed=0)
    assert len(valid) == 10 and len(train) == 90
    for breed, n in (("Abyssinian", 50), ("Bengal", 30), ("beagle", 20)):
        assert sum(records[i].breed == breed for i in valid) == n // 10


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_trainval_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="valid_fraction"):
        split_trainval(records_for({"A": 5}), fraction)


# =========================================================================== 3. split files, layout
@pytest.fixture
def small_root(tmp_path):
    """Three good pairs: two cats and a dog."""
    root = make_layout(tmp_path / "pets")
    for i, name in enumerate(["Cat_1", "Cat_2", "dog_1"]):
        add_pair(root, name, Image.fromarray(rgb_array(seed=i)))
    return root


def test_split_file_blank_lines_comments_crlf_duplicates(small_root, capsys):
    text = ("#Image CLASS-ID SPECIES BREED ID\r\n"
            "\r\n"
            "Cat_1 1 1 1\r\n"
            "   \r\n"
            "# a comment in the middle\r\n"
            "dog_1 2 2 1\r\n"
            "Cat_1 1 1 1\r\n"        # duplicate
            "\tCat_2 1 1 1  \r\n")   # stray whitespace
    (small_root / "annotations" / "trainval.txt").write_bytes(text.encode())
    records, skipped = read_records(small_root, "trainval")
    assert [r.name for r in records] == ["Cat_1", "dog_1", "Cat_2"]
    assert [r.species for r in records] == ["cat", "dog", "cat"]
    assert [r.class_id for r in records] == [1, 2, 1]
    assert all("\r" not in r.name for r in records)
    assert skipped == []
    assert stderr_lines(capsys) == []


def test_split_file_with_utf8_bom(small_root):
    """Windows editors save UTF-8 with a byte-order mark; it must not become part of the first name."""
    (small_root / "annotations" / "trainval.txt").write_bytes("\ufeffCat_1 1 1 1\r\ndog_1 2 2 1\r\n".encode())
    records, skipped = read_records(small_root, "trainval")
    assert [r.name for r in records] == ["Cat_1", "dog_1"]
    assert skipped == []


def test_split_file_names_that_do_not_exist_are_skipped_with_a_warning(small_root, capsys):
    write_split(small_root, ["Cat_1", "Ghost_7", "dog_1"])
    records, skipped = read_records(small_root, "trainval")
    assert [r.name for r in records] == ["Cat_1", "dog_1"]
    assert len(skipped) == 1 and skipped[0][0].endswith("Ghost_7.jpg") and skipped[0][1]
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and "Ghost_7.jpg" in lines[0]


def test_split_file_malformed_line_is_reported_and_skipped(small_root, capsys):
    (small_root / "annotations" / "trainval.txt").write_text("Cat_1 1 1 1\nCat_2 one cat\ndog_1 2 2 1\n")
    assert [name for name, *_ in read_split_file(small_root / "annotations" / "trainval.txt")] == ["Cat_1", "dog_1"]
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and "trainval.txt:2" in lines[0]


def test_split_file_name_only_lines_are_accepted(small_root):
    (small_root / "annotations" / "trainval.txt").write_text("Cat_1\ndog_1\n")
    records, _ = read_records(small_root, "trainval")
    assert [(r.name, r.species) for r in records] == [("Cat_1", "cat"), ("dog_1", "dog")]


@pytest.mark.parametrize("content", ["", "\n\n", "#only a header\r\n# and a comment\r\n"])
def test_empty_split_is_a_layout_error(small_root, content):
    (small_root / "annotations" / "test.txt").write_text(content)
    with pytest.raises(DatasetLayoutError, match="test.txt is empty: it lists no image"):
        load_split(small_root, "test", S, cache_dir=small_root.parent / "cache", progress=False)


def test_split_whose_entries_all_miss_is_a_layout_error(small_root, capsys):
    write_split(small_root, ["Ghost_1", "Ghost_2"], split="test")
    with pytest.raises(DatasetLayoutError, match=r"no usable image \(skipped 2\)"):
        read_records(small_root, "test")
    err = capsys.readouterr().err
    assert "Ghost_1.jpg" in err and "Ghost_2.jpg" in err


def _assert_layout_help(message: str, root: Path):
    assert str(root) in message
    for part in ("images/", "annotations/trimaps/", "trainval.txt", "test.txt", "labseg download"):
        assert part in message, part


def test_the_layout_help_names_the_download_that_fills_the_folder(tmp_path):
    """`labseg download DIR` unpacks into DIR/oxford-iiit-pet: for a missing .../oxford-iiit-pet
    the help names its parent, for any other folder it says where the download will land."""
    from labseg.data import layout_help

    named = tmp_path / "oxford-iiit-pet"
    assert f"`labseg download {tmp_path}`" in layout_help(named)
    other = tmp_path / "pets"
    assert f"`labseg download {other}`" in layout_help(other) and f"{other}/oxford-iiit-pet" in layout_help(other)


def test_missing_dataset_folder(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError) as info:
        load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    assert "does not exist" in str(info.value)
    _assert_layout_help(str(info.value), root)


def test_wrongly_laid_out_folder(tmp_path):
    """Images unpacked flat, without annotations: the error names what is missing."""
    root = tmp_path / "flat"
    root.mkdir()
    Image.fromarray(rgb_array()).save(root / "Cat_1.jpg")
    with pytest.raises(DatasetLayoutError) as info:
        read_records(root, "trainval")
    message = str(info.value)
    assert "is missing" in message and "annotations/trimaps" in message.split("\n")[0]
    _assert_layout_help(message, root)


@pytest.mark.parametrize("inside", ["images", "annotations", "annotations/trimaps"])
def test_a_folder_inside_the_dataset_is_pointed_to_the_dataset(synthetic_root, inside):
    """--data .../images (a likely slip) names the dataset's own folder, not a download into images/."""
    with pytest.raises(DatasetLayoutError) as info:
        check_layout(synthetic_root / inside)
    assert str(info.value) == (f"dataset folder {synthetic_root / inside} is {inside}/ inside the dataset at "
                               f"{synthetic_root}, not the dataset's own folder; give {synthetic_root} instead")
    assert "labseg download" not in str(info.value)


def test_missing_list_file_and_bad_split_name(small_root):
    with pytest.raises(DatasetLayoutError, match="list.txt"):
        read_records(small_root, "list")
    with pytest.raises(ValueError, match="split='valid'"):
        read_records(small_root, "valid")


def test_non_image_files_in_images_are_ignored(small_root, capsys):
    (small_root / "images" / "Cat_1.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(100))
    (small_root / "images" / "Cat_9.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(100))
    (small_root / "images" / "notes.txt").write_text("hello")
    write_split(small_root, ["Cat_1", "Cat_2", "dog_1"])
    split = load_split(small_root, "trainval", S, cache_dir=small_root.parent / "cache", progress=False)
    assert [r.name for r in split.records] == ["Cat_1", "Cat_2", "dog_1"]
    assert split.skipped == []
    assert stderr_lines(capsys) == []


# =========================================================================== 4. image quirks
def _jpeg_bytes():
    return encoded(Image.fromarray(rgb_array()), "JPEG", quality=90)


def _animated_gif():
    frames = [Image.new("P", (32, 24), i) for i in (3, 9)]
    for f in frames:
        f.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _palette(colours):
    """A 'P' image of 32×24: four vertical bands of the given palette entries."""
    idx = np.repeat(np.arange(4, dtype=np.uint8), 8)[None].repeat(24, 0)
    im = Image.frombytes("P", (32, 24), idx.tobytes())
    im.putpalette([v for c in colours for v in c] + [0] * (3 * (256 - len(colours))))
    return im


COLOURS = [(200, 30, 40), (10, 220, 90), (40, 50, 230), (250, 250, 10)]


def _bands(colours=COLOURS) -> np.ndarray:
    return np.repeat(np.array(colours, np.uint8), 8, axis=0)[None].repeat(24, 0)


def _rgba_png():
    a = np.zeros((24, 32, 4), np.uint8)
    a[..., :3] = (10, 120, 200)
    a[:, :16, 3] = 255          # left half opaque
    a[:, 16:, 3] = 0            # right half fully transparent: must come out white
    expected = np.empty((24, 32, 3), np.uint8)
    expected[:, :16] = (10, 120, 200)
    expected[:, 16:] = 255
    return Image.fromarray(a), expected


def _gray_halves(mid, top, dtype, mode):
    """A gray image, left half ``mid`` and right half ``top`` on its mode's own scale, and the RGB it
    must give: mid gray (128) and white, whatever the scale."""
    g = np.full((24, 32), top, dtype)
    g[:, :16] = mid
    im = Image.fromarray(g)
    assert im.mode == mode
    expected = np.empty((24, 32, 3), np.uint8)
    expected[:, :16] = 128
    expected[:, 16:] = 255
    return im, expected


def _sixteen_bit():             # mid gray well above 255: clipping would give white
    return _gray_halves(65535 // 2 + 1, 65535, np.uint16, "I;16")


def _float_zero_to_one():       # a float TIFF on the 0-1 scale: 0.5 is mid gray, not 0.5 of 255 (near black)
    return _gray_halves(0.5, 1.0, np.float32, "F")


def _float_with_a_dead_pixel(value):
    """The 0-1 float TIFF with one NaN or infinite pixel, which reads black: one such pixel once set
    the range of all the others (0-255 for NaN, 16-bit for inf) and the image came out near black."""
    image, expected = _float_zero_to_one()
    g = np.asarray(image).copy()
    g[0, 0] = value
    expected[0, 0] = 0
    return Image.fromarray(g), expected


def _with_format(pair, fmt):
    image, expected = pair
    return image, fmt, {}, expected


LOADED_CASES = {
    # name -> (PIL image, format to save it in, save kwargs, expected RGB array, tolerance)
    "gif_named_jpg": lambda: (_palette(COLOURS), "GIF", {}, _bands(), 0),
    "rgba_png_named_jpg": lambda: (*_with_format(_rgba_png(), "PNG"), 0),
    "png16_named_jpg": lambda: (*_with_format(_sixteen_bit(), "PNG"), 0),
    "float_tiff_zero_to_one": lambda: (*_with_format(_float_zero_to_one(), "TIFF"), 0),
    "float_tiff_with_a_nan": lambda: (*_with_format(_float_with_a_dead_pixel(np.nan), "TIFF"), 0),
    "float_tiff_with_an_inf": lambda: (*_with_format(_float_with_a_dead_pixel(np.inf), "TIFF"), 0),
    "cmyk_jpeg": lambda: (Image.fromarray(_bands()).convert("CMYK"), "JPEG", {"quality": 95}, _bands(), 12),
    "grayscale_jpeg": lambda: (Image.fromarray(np.full((24, 32), 77, np.uint8)), "JPEG", {"quality": 95},
                               np.full((24, 32, 3), 77, np.uint8), 2),
    "palette_png": lambda: (_palette(COLOURS), "PNG", {}, _bands(), 0),
    "rgba_png": lambda: (*_with_format(_rgba_png(), "PNG"), 0),
    "la_png": lambda: (Image.fromarray(np.dstack([np.full((24, 32), 60, np.uint8),
                                                  np.full((24, 32), 255, np.uint8)])),
                       "PNG", {}, np.full((24, 32, 3), 60, np.uint8), 0),
    "rgb_png": lambda: (Image.fromarray(_bands()), "PNG", {}, _bands(), 0),
}


@pytest.mark.parametrize("case", sorted(LOADED_CASES))
def test_image_quirk_is_converted_to_rgb(case, tmp_path):
    image, fmt, save, expected, atol = LOADED_CASES[case]()
    path = tmp_path / f"{case}.jpg"
    image.save(path, format=fmt, **save)
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_allclose(out.astype(int), expected.astype(int), atol=atol)


@pytest.mark.parametrize("case", sorted(LOADED_CASES))
def test_image_quirk_is_loaded_by_load_split(case, tmp_path, capsys):
    root = make_layout(tmp_path / "pets")
    add_pair(root, "Cat_1")
    image, fmt, save, expected, _ = LOADED_CASES[case]()
    add_pair(root, "Cat_2", image, fmt=fmt, **save)
    write_split(root, ["Cat_1", "Cat_2"])
    split = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=True)
    assert [r.name for r in split.records] == ["Cat_1", "Cat_2"]
    assert split.skipped == []
    # kept, with one line naming the file and what was converted (every case is odd for a .jpg)
    (line,) = [line for line in stderr_lines(capsys) if "labseg:" in line]
    assert "note: " in line and line.count("Cat_2.jpg") == 1 and "Cat_1" not in line
    expected_note = {"gif_named_jpg": "a GIF file named .jpg", "cmyk_jpeg": "CMYK pixels converted to RGB",
                     "rgb_png": "a PNG file named .jpg"}.get(case, "")
    assert expected_note in line
    # the cached image is the converted one (resized); a constant region stays that colour
    cached = np.asarray(split.images[1]).transpose(1, 2, 0)
    assert cached.shape == (S, S, 3)
    expected_small = np.asarray(Image.fromarray(expected).resize((S, S), Image.BILINEAR))
    np.testing.assert_allclose(cached.astype(int), expected_small.astype(int), atol=16)


def test_animated_gif_uses_first_frame(tmp_path):
    path = tmp_path / "anim.jpg"
    path.write_bytes(_animated_gif())
    out = load_image(path)
    assert out.shape == (24, 32, 3)
    assert (out == (3, 252, 7)).all()


def test_palette_with_transparency_becomes_white(tmp_path):
    im = _palette(COLOURS)
    path = tmp_path / "ptrans.png"
    im.save(path, transparency=1)  # the second band is transparent
    out = load_image(path)
    np.testing.assert_array_equal(out[:, 8:16], 255)
    np.testing.assert_array_equal(out[:, :8], np.broadcast_to(COLOURS[0], (24, 8, 3)))


def test_sixteen_bit_dark_image_is_not_brightened(tmp_path):
    """A 16-bit image is scaled by its bit depth, not by its own maximum."""
    g = np.full((8, 8), 200, np.uint16)  # 200 / 65535: nearly black
    path = tmp_path / "dark16.png"
    Image.fromarray(g).save(path)
    assert Image.open(path).mode == "I;16"
    assert load_image(path).max() <= 1


def test_one_pixel_image_loads_and_fills_the_cache(tmp_path, capsys):
    root = make_layout(tmp_path / "pets")
    add_pair(root, "Cat_1")
    add_pair(root, "Cat_2", Image.new("RGB", (1, 1), (12, 34, 56)), fmt="PNG",
             trimap=np.ones((1, 1), np.uint8))
    write_split(root, ["Cat_1", "Cat_2"])
    split = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    assert [r.name for r in split.records] == ["Cat_1", "Cat_2"]
    np.testing.assert_array_equal(split.images[1], np.broadcast_to(np.array([12, 34, 56], np.uint8)[:, None, None],
                                                                   (3, S, S)))
    np.testing.assert_array_equal(split.labels[1], PET)
    np.testing.assert_array_equal(split.sizes[1], (1, 1))
    assert stderr_lines(capsys) == []


def _truncated_jpeg():
    b = _jpeg_bytes()
    return b[: len(b) // 2]


SKIPPED_CASES = {
    "truncated_jpeg": _truncated_jpeg,
    "zero_bytes": lambda: b"",
    "text_named_jpg": lambda: b"this is not an image, just some text\n" * 3,
    "html_error_page": lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
    "only_jpeg_header": lambda: _jpeg_bytes()[:20],
}


@pytest.mark.parametrize("case", sorted(SKIPPED_CASES))
def test_unreadable_image_raises_bad_sample(case, tmp_path):
    path = tmp_path / f"{case}.jpg"
    path.write_bytes(SKIPPED_CASES[case]())
    with pytest.raises(BadSampleError) as info:
        load_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("case", sorted(SKIPPED_CASES))
def test_unreadable_image_is_skipped_by_load_split(case, tmp_path, capsys):
    root = make_layout(tmp_path / "pets")
    add_pair(root, "Cat_1")
    bad_image, _ = add_pair(root, "Cat_2", SKIPPED_CASES[case]())
    add_pair(root, "dog_1")
    write_split(root, ["Cat_1", "Cat_2", "dog_1"])
    split = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    assert [r.name for r in split.records] == ["Cat_1", "dog_1"]
    assert split.images.shape == (2, 3, S, S) and split.labels.shape == (2, S, S)
    assert len(split.skipped) == 1
    path, reason = split.skipped[0]
    assert path == str(bad_image) and str(bad_image) in reason
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and str(bad_image) in lines[0]


def test_decompression_bomb_is_refused_without_decoding(tmp_path, capsys):
    path = tmp_path / "huge.png"
    constant_png(path, 10_000, 10_000)
    assert path.stat().st_size < 1_000_000
    for loader in (load_image, load_trimap):
        with pytest.raises(BadSampleError) as info:
            loader(path)
        message = str(info.value)
        assert str(path) in message and "decompression-bomb guard" in message
        assert "100000000" in message.replace(",", "") and "cannot decode" not in message


def test_image_over_our_own_limit_is_refused(tmp_path):
    """Between MAX_PIXELS and Pillow's limit our own guard answers, before decoding."""
    side = int(data.MAX_PIXELS ** 0.5) + 10
    path = tmp_path / "big.png"
    constant_png(path, side, side)
    with pytest.raises(BadSampleError, match="decompression") as info:
        load_image(path)
    assert f"{side}×{side}" in str(info.value) and "MAX_PIXELS" in str(info.value)


def test_a_jpeg_over_the_limit_is_read_reduced_when_asked_and_refused_otherwise(tmp_path, monkeypatch):
    """predict reads a photo above MAX_PIXELS (a 48 MP phone photo) at 1/2, 1/4 or 1/8 of its side
    by JPEG's own scaled decoding; training, and other formats, still refuse it."""
    monkeypatch.setattr(data, "MAX_PIXELS", 100 * 80)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)       # and above Pillow's own guard, as 108 MP is
    Image.fromarray(rgb_array(h=240, w=400)).save(tmp_path / "big.jpg", quality=95)      # 12x the limit
    with pytest.raises(BadSampleError, match="decompression-bomb guard"):
        load_image(tmp_path / "big.jpg")
    small = load_image(tmp_path / "big.jpg", reduce=True)
    assert small.shape == (60, 100, 3)                               # 1/4 of the side: 6,000 px
    assert data.upright_size(tmp_path / "big.jpg") == (240, 400)
    Image.fromarray(rgb_array(h=240, w=400)).save(tmp_path / "big.png")
    with pytest.raises(BadSampleError, match="resize the file"):
        load_image(tmp_path / "big.png", reduce=True)


def test_decompression_bomb_is_skipped_by_load_split(tmp_path, capsys):
    root = make_layout(tmp_path / "pets")
    add_pair(root, "Cat_1")
    image_path = root / "images" / "Cat_2.jpg"
    constant_png(image_path, 10_000, 10_000)
    (root / "annotations" / "trimaps" / "Cat_2.png").write_bytes(
        encoded(Image.fromarray(np.full((10, 10), 2, np.uint8)), "PNG"))
    write_split(root, ["Cat_1", "Cat_2"])
    split = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    assert [r.name for r in split.records] == ["Cat_1"]
    assert len(split.skipped) == 1 and "decompression" in split.skipped[0][1].lower()
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and str(image_path) in lines[0]


# =========================================================================== 5. trimaps
def test_missing_trimap_is_skipped(tmp_path, capsys):
    root = make_layout(tmp_path / "pets")
    add_pair(root, "Cat_1")
    add_pair(root, "Cat_2", trimap=None)
    write_split(root, ["Cat_1", "Cat_2"])
    split = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    assert [r.name for r in split.records] == ["Cat_1"]
    expected = root / "annotations" / "trimaps" / "Cat_2.png"
    assert len(split.skipped) == 1 and split.skipped[0][0] == str(expected)
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and str(expected) in lines[0]


def test_trimap_of_another_size_is_resized(tmp_path, capsys):
    """Image 64×48, trimap 32×24 (half size): nearest upsampling keeps it exact."""
    root = make_layout(tmp_path / "pets")
    add_pair(root, "Cat_1")
    small = np.full((24, 32), 2, np.uint8)
    small[:, :16] = 1
    small[:, 16:20] = 3
    add_pair(root, "Cat_2", Image.fromarray(rgb_array(48, 64)), trimap=small)
    write_split(root, ["Cat_1", "Cat_2"])
    split = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    assert [r.name for r in split.records] == ["Cat_1", "Cat_2"] and split.skipped == []
    np.testing.assert_array_equal(split.sizes[1], (48, 64))
    # trimap 32 wide -> image 64 wide -> cache 32 wide: the cache columns are the trimap's columns.
    expected = np.zeros((S, S), np.uint8)
    expected[:, :16] = PET
    expected[:, 16:20] = BORDER
    np.testing.assert_array_equal(split.labels[1], expected)
    np.testing.assert_array_equal(split.masks[1], (expected != 0).astype(np.uint8))
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and "Cat_2.png" in lines[0] and "resized" in lines[0]


@pytest.mark.parametrize("bad", [(0,), (0, 255), (4, 7)])
def test_trimap_with_other_values_is_skipped(tmp_path, capsys, bad):
    root = make_layout(tmp_path / "pets")
    add_pair(root, "Cat_1")
    t = trimap_array()
    for k, v in enumerate(bad):
        t[k, :] = v
    _, trimap_path = add_pair(root, "Cat_2", trimap=t)
    write_split(root, ["Cat_1", "Cat_2"])
    with pytest.raises(BadSampleError) as info:
        load_trimap(trimap_path)
    assert str(trimap_path) in str(info.value) and str(list(bad)) in str(info.value)
    capsys.readouterr()
    split = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    assert [r.name for r in split.records] == ["Cat_1"]
    assert len(split.skipped) == 1 and str(list(bad)) in split.skipped[0][1]
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and str(trimap_path) in lines[0] and str(list(bad)) in lines[0]


def test_zero_based_trimaps_get_one_hint_and_the_lines_are_capped(tmp_path, capsys, monkeypatch):
    """Trimaps re-exported 0-based fail one by one, each line true but the cause unsaid; on the
    full dataset that was 3,680 lines. One hint names the cause, and the per-file lines stop."""
    import labseg.data

    monkeypatch.setattr(labseg.data, "MAX_SKIP_LINES", 3)
    root = make_layout(tmp_path / "pets")
    names = [f"Cat_{i}" for i in range(1, 6)]
    for name in names:
        add_pair(root, name, trimap=trimap_array() - 1)         # 0 pet, 1 background, 2 border
    write_split(root, names)
    capsys.readouterr()
    with pytest.raises(labseg.data.DatasetLayoutError, match=r"all 5 skipped\); 5 of 5 trimaps hold a 0: they "
                                                            r"look 0-based .* add 1 to every trimap pixel"):
        load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    lines = stderr_lines(capsys)
    assert len([line for line in lines if "trimap holds values [0" in line]) == 3
    assert "skipped 2 more of trainval" in lines[-1]


def test_the_capped_lines_name_unreadable_pairs_after_the_missing_ones(tmp_path, capsys, monkeypatch):
    """read_records names every listed-but-missing file; the cap counts only the pairs that fail
    to decode, so those are named too and "N more" is the number left unnamed."""
    import labseg.data

    monkeypatch.setattr(labseg.data, "MAX_SKIP_LINES", 2)
    root = make_layout(tmp_path / "pets")
    good, broken, missing = ["Cat_1"], [f"Cat_{i}" for i in (2, 3, 4)], [f"Ghost_{i}" for i in (1, 2, 3)]
    for name in good + broken:
        add_pair(root, name)
    for name in broken:
        (root / "images" / f"{name}.jpg").write_bytes(b"not a picture")
    write_split(root, good + broken + missing)
    capsys.readouterr()
    split = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    assert [r.name for r in split.records] == good and len(split.skipped) == 6
    err = capsys.readouterr().err
    assert all(f"{name}.jpg" in err for name in missing)
    assert sum(f"{name}.jpg" in err for name in broken) == 2
    assert "skipped 1 more of trainval" in err


@pytest.mark.parametrize("leftover", ["folder-without-meta", "file"])
def test_a_cache_folder_without_meta_json_is_rebuilt(synthetic_root, tmp_path, leftover, caplog):
    """A finished cache always has its meta.json (renamed into place with it): a folder without one
    (a partial delete) or a file at its path is in the way, and used to fail every build."""
    good = data.load_split(synthetic_root, "test", 32, tmp_path / "cache", progress=False)
    names, images = [r.name for r in good.records], np.array(good.images)
    folder = Path(good.images.filename).parent
    del good
    if leftover == "file":
        import shutil

        shutil.rmtree(folder)
        folder.write_text("not a cache")
    else:
        (folder / "meta.json").unlink()
    again = data.load_split(synthetic_root, "test", 32, tmp_path / "cache", progress=False)
    assert [r.name for r in again.records] == names and np.array_equal(np.array(again.images), images)
    assert f"cache {folder} has no meta.json" in caplog.text and "rebuilding it" in caplog.text


def test_cache_labels_are_resized_without_mixing_values(tmp_path):
    """Border (2) next to background (0), at a non-integer scale: no pet (1) may appear between."""
    root = make_layout(tmp_path / "pets")
    t = np.full((50, 70), 2, np.uint8)
    t[:, :33] = 3
    t[10:20, 40:45] = 3
    add_pair(root, "Cat_1", Image.fromarray(rgb_array(50, 70)), trimap=t)
    write_split(root, ["Cat_1"])
    split = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    assert set(np.unique(split.labels[0]).tolist()) == {0, BORDER}


def test_trimap_without_pet_pixels_is_kept(tmp_path, capsys):
    root = make_layout(tmp_path / "pets")
    add_pair(root, "Cat_1")
    add_pair(root, "Cat_2", trimap=np.full((24, 32), 2, np.uint8))
    write_split(root, ["Cat_1", "Cat_2"])
    split = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    assert [r.name for r in split.records] == ["Cat_1", "Cat_2"] and split.skipped == []
    assert (split.labels[1] == 0).all() and split.labels[0].any()
    assert stderr_lines(capsys) == []                    # quiet (progress=False), but recorded:
    import json

    (meta,) = [json.loads(m.read_text()) for m in (tmp_path / "cache").glob("*/meta.json")]
    assert meta["notes"] == {"Cat_2": ["its trimap has no pet pixel (kept: scored as all background)"]}


def test_rgb_trimap_reads_its_first_channel(tmp_path):
    t = trimap_array()
    path = tmp_path / "rgb_trimap.png"
    Image.fromarray(np.dstack([t, t, t])).save(path)
    out = load_trimap(path)
    assert out.dtype == np.uint8 and out.shape == t.shape
    np.testing.assert_array_equal(out, t)


def test_unreadable_trimap_raises_bad_sample(tmp_path):
    path = tmp_path / "t.png"
    path.write_bytes(b"")
    with pytest.raises(BadSampleError, match="trimap"):
        load_trimap(path)


# =========================================================================== 6. the cache
def _blocky_root(tmp_path):
    """Two 64×64 pairs built of 2×2 blocks, so that the 32 px cache is known exactly."""
    root = make_layout(tmp_path / "pets")
    for i, name in enumerate(["Cat_1", "dog_1"]):
        colour = np.array([40 + 100 * i, 90, 200 - 100 * i], np.uint8)
        image = np.broadcast_to(colour, (64, 64, 3)).copy()
        t = np.full((64, 64), 2, np.uint8)
        t[: 32 + 16 * i, :20] = 1
        t[: 32 + 16 * i, 20:24] = 3
        add_pair(root, name, Image.fromarray(image), trimap=t, fmt="PNG")
    write_split(root, ["Cat_1", "dog_1"])
    return root


def _expected_labels(i):
    e = np.zeros((S, S), np.uint8)
    e[: 16 + 8 * i, :10] = PET
    e[: 16 + 8 * i, 10:12] = BORDER
    return e


def test_cache_shapes_dtypes_and_content(tmp_path):
    root = _blocky_root(tmp_path)
    split = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    assert isinstance(split, CachedSplit) and len(split) == 2
    assert split.images.shape == (2, 3, S, S) and split.images.dtype == np.uint8
    assert split.labels.shape == (2, S, S) and split.labels.dtype == np.uint8
    assert split.masks.shape == (2, S, S) and set(np.unique(split.masks).tolist()) <= {0, 1}
    np.testing.assert_array_equal(split.sizes, [[64, 64], [64, 64]])
    for i in range(2):
        colour = np.array([40 + 100 * i, 90, 200 - 100 * i], np.uint8)
        np.testing.assert_array_equal(split.images[i], np.broadcast_to(colour[:, None, None], (3, S, S)))
        np.testing.assert_array_equal(split.labels[i], _expected_labels(i))
    sub = split.subset([1])
    assert len(sub) == 1 and sub.records[0].name == "dog_1"
    np.testing.assert_array_equal(sub.labels[0], _expected_labels(1))


def test_second_load_reads_the_cache(tmp_path):
    root = _blocky_root(tmp_path)
    cache = tmp_path / "cache"
    first = load_split(root, "trainval", S, cache_dir=cache, progress=False)
    folders = [p for p in cache.iterdir()]
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()  # no temporary folder left
    second = load_split(root, "trainval", S, cache_dir=cache, progress=False)
    assert isinstance(second.images, np.memmap) and isinstance(second.labels, np.memmap)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert [r.name for r in second.records] == ["Cat_1", "dog_1"]
    # Proof that the arrays come from the cache file and not from a new decode: alter the file.
    marked = np.load(folders[0] / "labels.npy")
    marked[0, 0, 0] = 7
    np.save(folders[0] / "labels.npy", marked)
    third = load_split(root, "trainval", S, cache_dir=cache, progress=False)
    assert third.labels[0, 0, 0] == 7
    assert sorted(p.name for p in cache.iterdir()) == [folders[0].name]


def test_editing_a_trimap_rebuilds_the_cache(tmp_path):
    root = _blocky_root(tmp_path)
    cache = tmp_path / "cache"
    load_split(root, "trainval", S, cache_dir=cache, progress=False)
    trimap = root / "annotations" / "trimaps" / "Cat_1.png"
    st = trimap.stat()
    Image.fromarray(np.full((64, 64), 1, np.uint8)).save(trimap)  # all pet now
    os.utime(trimap, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    split = load_split(root, "trainval", S, cache_dir=cache, progress=False)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1     # the old one is gone
    np.testing.assert_array_equal(split.labels[0], PET)
    np.testing.assert_array_equal(split.labels[1], _expected_labels(1))


def test_a_rebuilt_cache_removes_the_older_caches_of_its_dataset_split_and_size_only(tmp_path, caplog):
    """A changed dataset (or cache format) is cached again under a new key; the old cache was never
    read again and stayed (0.96 GB a split of the full dataset at 256 px). It goes; the caches of
    another folder of the same name, another split and another size stay."""
    root = _blocky_root(tmp_path)
    cache = tmp_path / "cache"
    twin = _blocky_root(tmp_path / "elsewhere")     # also named "pets"
    assert twin.name == root.name
    write_split(root, ["Cat_1"], split="test")
    for folder, split, size in ((root, "trainval", S), (root, "trainval", 2 * S), (twin, "trainval", S), (root, "test", S)):
        load_split(folder, split, size, cache_dir=cache, progress=False)
    before = {p.name for p in cache.iterdir()}
    trimap = root / "annotations" / "trimaps" / "Cat_1.png"
    st = trimap.stat()
    os.utime(trimap, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    with caplog.at_level("INFO", logger="labseg"):
        load_split(root, "trainval", S, cache_dir=cache, progress=True)
    after = {p.name for p in cache.iterdir()}
    assert len(before) == len(after) == 4 and len(before - after) == 1 and len(after - before) == 1
    (gone,) = before - after
    assert gone.startswith(f"pets-trainval-{S}-")
    assert re.search(rf"removed 1 older cache\(s\) of pets/trainval at {S}px \(\d+ MiB\): built before its files "
                     "changed", caplog.text)


def test_editing_a_trimap_to_the_same_file_size_rebuilds_the_cache(tmp_path):
    """An edit that keeps the byte count (uncompressed PNG: the size depends on the shape only) is
    still seen: the cache key holds each file's modification time beside its size."""
    root = _blocky_root(tmp_path)
    cache = tmp_path / "cache"
    trimap = root / "annotations" / "trimaps" / "Cat_1.png"
    before = np.asarray(Image.open(trimap))
    Image.fromarray(before).save(trimap, compress_level=0)
    size = trimap.stat().st_size
    first = load_split(root, "trainval", S, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(first.labels[0], _expected_labels(0))
    st = trimap.stat()
    Image.fromarray(np.full((64, 64), 1, np.uint8)).save(trimap, compress_level=0)  # all pet now
    assert trimap.stat().st_size == size                    # same byte count, other content
    os.utime(trimap, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    split = load_split(root, "trainval", S, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(split.labels[0], PET)     # trimap value 1 everywhere → PET
    np.testing.assert_array_equal(split.labels[1], _expected_labels(1))


def test_other_size_gets_its_own_cache(tmp_path):
    root = _blocky_root(tmp_path)
    cache = tmp_path / "cache"
    a = load_split(root, "trainval", S, cache_dir=cache, progress=False)
    b = load_split(root, "trainval", 2 * S, cache_dir=cache, progress=False)
    assert a.images.shape[-1] == S and b.images.shape[-1] == 2 * S
    assert len(list(cache.iterdir())) == 2


def test_skipped_entries_survive_the_cache(tmp_path, capsys):
    root = make_layout(tmp_path / "pets")
    add_pair(root, "Cat_1")
    bad, _ = add_pair(root, "Cat_2", b"not an image")
    write_split(root, ["Cat_1", "Cat_2"])
    first = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    second = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    assert first.skipped == second.skipped and len(second.skipped) == 1
    assert second.skipped[0][0] == str(bad)
    assert [r.name for r in second.records] == ["Cat_1"]


def test_all_images_broken_is_a_layout_error(tmp_path):
    root = make_layout(tmp_path / "pets")
    add_pair(root, "Cat_1", b"")
    write_split(root, ["Cat_1"])
    with pytest.raises(DatasetLayoutError, match="no usable image"):
        load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)


def test_synthetic_dataset_loads_with_its_odd_modes(synthetic_root, tmp_path, capsys):
    split = load_split(synthetic_root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    listed = [line.split()[0] for line in (synthetic_root / "annotations" / "trainval.txt").read_text().splitlines()]
    assert [r.name for r in split.records] == listed and split.skipped == []
    assert split.images.shape == (len(listed), 3, S, S)
    assert set(np.unique(split.labels).tolist()) == {0, 1, 2}
    assert stderr_lines(capsys) == []


# =========================================================================== 7. Batches
@pytest.fixture(scope="module")
def synth_split(synthetic_root, tmp_path_factory):
    return load_split(synthetic_root, "trainval", S, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def _order(batches):
    return [i for b in batches for i in b.index.tolist()]


def test_batches_shapes_dtypes_and_values(synth_split):
    n = len(synth_split)
    batches = Batches(synth_split, batch_size=5)
    out = list(batches)
    assert len(out) == len(batches) == -(-n // 5)
    for b in out:
        k = len(b.index)
        assert b.image.shape == (k, 3, S, S) and b.image.dtype == torch.float32
        assert b.target.shape == (k, 1, S, S) and b.target.dtype == torch.float32
        assert b.valid.shape == (k, 1, S, S)
        assert b.index.dtype == torch.int64
        assert set(torch.unique(b.target).tolist()) <= {0.0, 1.0}
        assert (b.valid == 1).all()
        idx = b.index.numpy()
        np.testing.assert_array_equal(b.target[:, 0].numpy(), synth_split.masks[idx])
        restored = (denormalize(b.image) * 255).round().numpy()
        np.testing.assert_allclose(restored, synth_split.images[idx], atol=1)
    assert sorted(_order(out)) == list(range(n))


def test_batches_shuffle_is_deterministic_per_seed_and_epoch(synth_split):
    n = len(synth_split)
    b = Batches(synth_split, batch_size=4, shuffle=True, seed=7)
    e0 = _order(b)
    assert _order(b) == e0
    b.set_epoch(1)
    e1 = _order(b)
    assert e1 != e0 and sorted(e1) == sorted(e0) == list(range(n))
    b.set_epoch(0)
    assert _order(b) == e0  # the same again after a "resume"
    assert _order(Batches(synth_split, batch_size=4, shuffle=True, seed=7)) == e0
    assert _order(Batches(synth_split, batch_size=4, shuffle=True, seed=8)) != e0
    assert _order(Batches(synth_split, batch_size=4)) == list(range(n))


def test_batches_drop_last_and_indices(synth_split):
    n = len(synth_split)
    assert n % 5 != 0
    keep = Batches(synth_split, batch_size=5, shuffle=True, drop_last=False)
    drop = Batches(synth_split, batch_size=5, shuffle=True, drop_last=True)
    assert len(drop) == n // 5 and len(list(drop)) == n // 5
    assert all(len(b.index) == 5 for b in drop)
    assert len(list(keep)) == n // 5 + 1 and len(_order(keep)) == n
    subset = np.array([3, 1, 10, 20, 21])
    sub = Batches(synth_split, subset, batch_size=2, shuffle=True)
    assert sorted(_order(sub)) == sorted(subset.tolist())


def test_batches_ignore_border_marks_exactly_the_border(synth_split):
    for b in Batches(synth_split, batch_size=8, ignore_border=True):
        labels = torch.from_numpy(np.asarray(synth_split.labels[b.index.numpy()])).unsqueeze(1)
        assert torch.equal(b.valid == 0, labels == BORDER)
        assert set(torch.unique(b.valid).tolist()) <= {0.0, 1.0}
        assert torch.equal(b.target == 1, labels != 0)  # the border still counts as pet
    assert (np.asarray(synth_split.labels) == BORDER).any()


def test_batches_with_augmentation_are_reproducible_and_binary(synth_split):
    def run(epoch):
        b = Batches(synth_split, batch_size=6, shuffle=True, seed=1, augment=BatchAugment("strong"),
                    ignore_border=True)
        b.set_epoch(epoch)
        return list(b)
    a, again, other = run(0), run(0), run(1)
    for x, y in zip(a, again):
        assert torch.equal(x.image, y.image) and torch.equal(x.target, y.target) and torch.equal(x.index, y.index)
    assert any(not torch.equal(x.image, y.image) for x, y in zip(a, other))
    plain = list(Batches(synth_split, batch_size=6, shuffle=True, seed=1, ignore_border=True))
    assert any(not torch.equal(x.target, y.target) for x, y in zip(a, plain))  # it did augment
    for x in a:
        assert set(torch.unique(x.target).tolist()) <= {0.0, 1.0}
        assert set(torch.unique(x.valid).tolist()) <= {0.0, 1.0}
        assert not ((x.valid == 0) & (x.target == 0)).any()  # the ignored band is border, i.e. pet


# =========================================================================== 9. real data
@pytest.mark.realdata
def test_real_test_split_loads(real_root, tmp_path, capsys):
    split = load_split(real_root, "test", 64, cache_dir=tmp_path, progress=False)
    listed = list(dict.fromkeys(name for name, *_ in read_split_file(real_root / "annotations" / "test.txt")))
    kept = [r.name for r in split.records]
    skipped_names = [Path(p).stem for p, _ in split.skipped]
    assert len(kept) + len(split.skipped) == len(listed)
    assert set(kept) | set(skipped_names) == set(listed) and not set(kept) & set(skipped_names)
    lines = stderr_lines(capsys)
    for path, reason in split.skipped:  # every skip says which file and why, once
        assert Path(path).is_relative_to(real_root) and reason
        assert sum(path in line for line in lines) == 1, path
    assert split.images.shape == (len(kept), 3, 64, 64) and split.labels.shape == (len(kept), 64, 64)
    # Files that are not RGB JPEGs (the RGBA PNG named .jpg is in this split) are kept, as RGB.
    odd = []
    for r in split.records:
        with Image.open(r.image_path) as im:
            if im.format != "JPEG" or im.mode != "RGB":
                odd.append(r.name)
    assert odd, "expected at least one non-RGB-JPEG file in the real test split"
    for i, r in enumerate(split.records):
        if r.name in odd:
            rgb = load_image(r.image_path)
            assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            np.testing.assert_array_equal(split.sizes[i], rgb.shape[:2])


@pytest.mark.realdata
def test_real_quirky_files_via_a_custom_split(real_root, tmp_path, capsys):
    """The real GIF (whose trimap has no pet pixel), the RGBA PNG and a .mat file, in a split of our own.

    The files are linked, not copied, into a layout in tmp_path.
    """
    names = ["Abyssinian_34", "Abyssinian_5", "Abyssinian_1"]
    root = make_layout(tmp_path / "real")
    for name in names:
        for sub, ext in (("images", ".jpg"), ("annotations/trimaps", ".png")):
            src = real_root / sub / f"{name}{ext}"
            if not src.exists():
                pytest.skip(f"{src} is not in this copy of the real data")
            (root / sub / f"{name}{ext}").symlink_to(src)
    mat = next((real_root / "images").glob("*.mat"), None)
    if mat is not None:
        (root / "images" / mat.name).symlink_to(mat)
    write_split(root, names, split="test")
    split = load_split(root, "test", 64, cache_dir=tmp_path / "cache", progress=True)
    assert [r.name for r in split.records] == names and split.skipped == []
    gif = names.index("Abyssinian_34")
    with Image.open(split.records[gif].image_path) as im:
        assert im.format == "GIF"
    assert (load_trimap(split.records[gif].trimap_path) == 2).all()  # really all background...
    assert (split.labels[gif] == 0).all()                           # ...and kept, and said
    notes = [line for line in stderr_lines(capsys) if "note: " in line]
    gif_note = next(line for line in notes if "Abyssinian_34.jpg" in line)
    assert "a GIF file named .jpg" in gif_note and "its trimap has no pet pixel" in gif_note
    assert any("Abyssinian_5.jpg" in line and "RGBA pixels converted to RGB" in line for line in notes)
    for r in split.records:
        assert load_image(r.image_path).shape[2] == 3


# =========================================================================== 10. fuzz
def _valid_bytes():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    tri = Image.fromarray(rng.integers(1, 4, (12, 16), dtype=np.uint8))
    return [encoded(rgb, "JPEG", quality=80), encoded(rgb, "PNG"), encoded(tri, "PNG"), encoded(tri, "JPEG")]


VALID = _valid_bytes()


@st.composite
def mutated(draw):
    b = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 16))]
    return bytes(b)


@pytest.fixture(scope="module")
def fuzz_dir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.one_of(st.binary(max_size=512), mutated(),
                      st.sampled_from(VALID).flatmap(lambda v: st.binary(max_size=64).map(lambda t: v[:24] + t))))
def test_fuzz_loaders_only_decode_or_raise_bad_sample(blob, fuzz_dir):
    path = fuzz_dir / "fuzz.jpg"
    path.write_bytes(blob)
    try:
        image = load_image(path)
    except BadSampleError as e:
        assert "\n" not in str(e) and str(path) in str(e)  # one warning line, naming the file
        event("image refused")
    else:
        event("image decoded")
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8
        assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] >= 1 and image.shape[1] >= 1
    try:
        trimap = load_trimap(path)
    except BadSampleError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        event("trimap decoded")
        assert isinstance(trimap, np.ndarray) and trimap.dtype == np.uint8 and trimap.ndim == 2
        assert set(np.unique(trimap).tolist()) <= {1, 2, 3}


def test_fuzz_inputs_include_decodable_ones():
    """The fuzz test is only meaningful if the unmutated inputs decode."""
    with tempfile.TemporaryDirectory() as d:
        for blob in VALID:
            path = Path(d) / "x.jpg"
            path.write_bytes(blob)
            assert load_image(path).shape == (12, 16, 3)
        path.write_bytes(VALID[2])
        assert load_trimap(path).shape == (12, 16)


def test_a_cache_folder_is_as_readable_as_the_umask_allows(synthetic_root, tmp_path):
    """mkdtemp's 0700 kept an instructor's prebuilt cache from every other user."""
    from labseg.config import UMASK

    split = data.load_split(synthetic_root, "test", 32, tmp_path / "cache", progress=False)
    folder = Path(split.images.filename).parent
    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~UMASK


def test_upright_turns_a_photo_as_its_exif_orientation_says(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 100, 50))
    exif = image.getexif()
    exif[0x0112] = 6                        # "rotate 90° clockwise to view": a phone held upright
    image.save(tmp_path / "phone.jpg", exif=exif)
    assert data.load_image(tmp_path / "phone.jpg").shape == (20, 40, 3)              # as stored
    assert data.load_image(tmp_path / "phone.jpg", upright=True).shape == (40, 20, 3)  # as shown


def _drop_first_name(folder):
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "names": meta["names"][1:]}))


@pytest.mark.parametrize("damage", [
    lambda f: (f / "images.npy").write_bytes((f / "images.npy").read_bytes()[:5000]),      # truncated
    lambda f: (f / "labels.npy").write_bytes(b""),
    lambda f: (f / "meta.json").write_text((f / "meta.json").read_text()[:100]),         # cut-off JSON
    _drop_first_name,                           # silently paired each record with its neighbour's image
    lambda f: np.save(f / "images.npy", np.zeros((3, 3, 16, 16), np.uint8)),
], ids=["truncated-images", "empty-labels", "cut-meta", "shifted-names", "wrong-size"])
def test_a_damaged_cache_is_rebuilt(synthetic_root, tmp_path, damage, caplog):
    good = data.load_split(synthetic_root, "test", 32, tmp_path / "cache", progress=False)
    names, images = [r.name for r in good.records], np.array(good.images)
    folder = Path(good.images.filename).parent
    del good
    damage(folder)
    again = data.load_split(synthetic_root, "test", 32, tmp_path / "cache", progress=False)
    assert [r.name for r in again.records] == names and np.array_equal(np.array(again.images), images)
    assert f"cache {folder} is damaged" in caplog.text and "rebuilding it" in caplog.text


def test_a_cache_folder_below_a_file_or_a_size_as_text_is_refused_before_any_decoding(tmp_path, capsys):
    """`labseg prepare --cache-dir README.md/cache` decoded every image, then ended in a traceback
    (NotADirectoryError); `load_split(..., "64")` took the cache of size 64 for a damaged one,
    deleted it, then failed in numpy."""
    from labseg.cli import main
    from labseg.config import ConfigError

    root = make_layout(tmp_path / "pets")
    add_pair(root, "Cat_1")
    write_split(root, ["Cat_1"])
    write_split(root, ["Cat_1"], "test")
    (tmp_path / "README.md").write_text("a file")
    capsys.readouterr()
    assert main(["prepare", "--data", str(root), "--cache-dir", str(tmp_path / "README.md" / "cache"),
                 "--img-size", "32"]) == 2
    err = capsys.readouterr().err
    assert f"cache_dir='{tmp_path / 'README.md' / 'cache'}': {tmp_path / 'README.md'} is a file; expected a folder" in err
    built = load_split(root, "trainval", S, cache_dir=tmp_path / "cache", progress=False)
    cache = sorted((tmp_path / "cache").iterdir())
    with pytest.raises(ConfigError, match=r"img_size='32': expected a positive size in px divisible by 32"):
        load_split(root, "trainval", str(S), cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(ConfigError, match=r"img_size=4096: expected at most 2048 px"):
        load_split(root, "trainval", 4096, cache_dir=tmp_path / "cache", progress=False)
    assert sorted((tmp_path / "cache").iterdir()) == cache and len(built) == 1


def test_a_cache_that_cannot_fit_on_its_disk_is_refused_before_decoding_and_a_full_disk_is_one_line(
        small_root, tmp_path, monkeypatch):
    write_split(small_root, ["Cat_1", "Cat_2", "dog_1"])
    # too little free space: refused with the size and --cache-dir, before any image is decoded
    monkeypatch.setattr(data.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    monkeypatch.setattr(data, "load_pair", lambda r: pytest.fail("decoded although the cache cannot fit"))
    with pytest.raises(OSError) as e:
        data.load_split(small_root, "trainval", 32, tmp_path / "cache", progress=False)
    assert e.value.errno == errno.ENOSPC and "--cache-dir" in str(e.value)
    monkeypatch.undo()

    # the disk fills while the arrays are written: numpy's errno-less OSError becomes ENOSPC, no half cache
    def full(path, array):
        raise OSError("Not enough free space to write 12 bytes after offset 128")
    monkeypatch.setattr(data.np, "save", full)
    with pytest.raises(OSError) as e:
        data.load_split(small_root, "trainval", 32, tmp_path / "cache", progress=False)
    assert e.value.errno == errno.ENOSPC and "could not write the cache" in str(e.value)
    assert not any((tmp_path / "cache").iterdir())
