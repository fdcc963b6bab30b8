"""Joint image/label augmentation: labels stay exact, parameters are per sample, runs reproduce."""
from __future__ import annotations

import pytest
import torch

from labseg.transforms import LEVELS, AugmentParams, BatchAugment, augment_sample, params_for

H, W = 24, 32


def labels_batch(n=4, seed=0) -> torch.Tensor:
    """N×1×H×W uint8 labels in {0, 1, 2}: blocks, so that there are large uniform regions."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 3, (n, 1, H // 4, W // 4), generator=g, dtype=torch.uint8)
    return coarse.repeat_interleave(4, 2).repeat_interleave(4, 3)


def images_batch(n=4, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    return torch.rand(n, 3, H, W, generator=g)


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_params(params: AugmentParams) -> BatchAugment:
    aug = BatchAugment("light")
    aug.params = params
    return aug


@pytest.mark.parametrize("level", ["light", "strong"])
@pytest.mark.parametrize("label_values", [(0, 1), (0, 2), (0, 1, 2)])
def test_labels_stay_in_their_label_set(level, label_values):
    """Nearest sampling only: 0 next to 2 (background next to border) must never produce a 1."""
    images = images_batch(8)
    labels = torch.tensor(label_values, dtype=torch.uint8)[labels_batch(8).long() % len(label_values)]
    out_images, out_labels = BatchAugment(level)(images, labels, generator=gen(1))
    assert out_labels.dtype == torch.uint8 and out_labels.shape == labels.shape
    assert set(torch.unique(out_labels).tolist()) <= set(label_values)
    assert not torch.equal(out_labels, labels)
    assert out_images.shape == images.shape and out_images.dtype == images.dtype
    assert out_images.min() >= 0 and out_images.max() <= 1


def test_image_and_labels_move_together():
    """A geometric-only augmentation of an image that *is* its mask: both must stay aligned.

    Nearest sampling picks the input pixel with the largest bilinear weight (>= 1/4), so where
    the label is 1 the bilinear image is >= 1/4, and where it is 0 the image is <= 3/4.
    """
    labels = labels_batch(16, seed=3).clamp(max=1)
    images = labels.float().repeat(1, 3, 1, 1)
    aug = with_params(AugmentParams(hflip=0.5, degrees=30, scale=(0.7, 1.4), translate=0.15))
    out_images, out_labels = aug(images, labels, generator=gen(5))
    assert not torch.equal(out_labels, labels)
    pet = out_labels.expand(-1, 3, -1, -1) == 1
    assert (out_images[pet] >= 0.25 - 1e-4).all()
    assert (out_images[~pet] <= 0.75 + 1e-4).all()


def test_parameters_are_drawn_per_sample():
    one_image, one_label = images_batch(1), labels_batch(1)
    images, labels = one_image.repeat(6, 1, 1, 1), one_label.repeat(6, 1, 1, 1)
    out_images, out_labels = BatchAugment("strong")(images, labels, generator=gen(0))
    distinct_images = {tuple(out_images[i].flatten().tolist()) for i in range(6)}
    distinct_labels = {tuple(out_labels[i].flatten().tolist()) for i in range(6)}
    assert len(distinct_images) == 6
    assert len(distinct_labels) >= 2
    # the colour factors are per sample too: a flat grey image comes out in several shades
    flat = torch.full((6, 3, H, W), 0.5)
    colour_only = with_params(AugmentParams(hflip=0.0, brightness=0.4))
    out, _ = colour_only(flat, torch.zeros(6, 1, H, W, dtype=torch.uint8), generator=gen(0))
    assert len({round(v, 5) for v in out[:, 0, H // 2, W // 2].tolist()}) == 6


def test_same_generator_seed_reproduces_the_output():
    images, labels = images_batch(5), labels_batch(5)
    a = BatchAugment("strong")(images, labels, generator=gen(42))
    b = BatchAugment("strong")(images, labels, generator=gen(42))
    c = BatchAugment("strong")(images, labels, generator=gen(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_inputs_are_not_modified_in_place():
    images, labels = images_batch(3), labels_batch(3)
    images_copy, labels_copy = images.clone(), labels.clone()
    BatchAugment("strong")(images, labels, generator=gen(0))
    assert torch.equal(images, images_copy) and torch.equal(labels, labels_copy)


def test_none_returns_the_input_unchanged():
    images, labels = images_batch(3), labels_batch(3)
    out_images, out_labels = BatchAugment("none")(images, labels, generator=gen(0))
    assert torch.equal(out_images, images) and torch.equal(out_labels, labels)
    assert params_for("none") is None


def test_hflip_only_with_probability_one_flips_exactly():
    images, labels = images_batch(4), labels_batch(4)
    flip = with_params(AugmentParams(hflip=1.0))
    out_images, out_labels = flip(images, labels, generator=gen(0))
    assert torch.equal(out_labels, labels.flip(-1))
    torch.testing.assert_close(out_images, images.flip(-1), atol=1e-5, rtol=0)
    same = with_params(AugmentParams(hflip=0.0))
    out_images, out_labels = same(images, labels, generator=gen(0))
    assert torch.equal(out_labels, labels)
    torch.testing.assert_close(out_images, images, atol=1e-5, rtol=0)


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="augment='medium'"):
        BatchAugment("medium")
    assert set(LEVELS) == {"none", "flip", "light", "strong", "color"}


def test_flip_level_mirrors_or_keeps_each_sample_exactly():
    images, labels = images_batch(16), labels_batch(16)
    out_images, out_labels = BatchAugment("flip")(images, labels, generator=gen(2))
    flipped = [not torch.equal(out_labels[i], labels[i]) for i in range(16)]
    assert 0 < sum(flipped) < 16
    for i, f in enumerate(flipped):
        want_l = labels[i].flip(-1) if f else labels[i]
        want_i = images[i].flip(-1) if f else images[i]
        assert torch.equal(out_labels[i], want_l)
        torch.testing.assert_close(out_images[i], want_i, atol=1e-5, rtol=0)


@pytest.mark.parametrize("level", ["light", "strong"])
@pytest.mark.parametrize("label_values", [(0, 1), (0, 1, 2)])
def test_augment_sample_keeps_mask_values(level, label_values):
    torch.manual_seed(0)  # v2 transforms draw from torch's global generator
    labels = labels_batch(1)[0, 0]
    labels = torch.tensor(label_values, dtype=torch.uint8)[labels.long() % len(label_values)]
    image = (images_batch(1)[0] * 255).to(torch.uint8)
    changed = False
    for _ in range(10):
        for lab in (labels, labels[None]):
            out_image, out_labels = augment_sample(image, lab, level)
            assert type(out_image) is torch.Tensor and type(out_labels) is torch.Tensor
            assert out_image.shape == image.shape and out_image.dtype == torch.uint8
            assert out_labels.shape == lab.shape and out_labels.dtype == torch.uint8
            assert set(torch.unique(out_labels).tolist()) <= set(label_values)
            changed |= not torch.equal(out_labels, lab)
    assert changed


def test_augment_sample_none_is_identity():
    labels = labels_batch(1)[0, 0]
    image = (images_batch(1)[0] * 255).to(torch.uint8)
    out_image, out_labels = augment_sample(image, labels, "none")
    assert torch.equal(out_image, image) and torch.equal(out_labels, labels)


def _windows(x: torch.Tensor, h: int, w: int):
    """Every h×w window of a C×H×W tensor."""
    return [x[:, i:i + h, j:j + w] for i in range(x.shape[1] - h + 1) for j in range(x.shape[2] - w + 1)]


def test_crops_are_windows_at_the_images_own_scale():
    labels = torch.randint(0, 3, (6, 1, H, W), generator=gen(1), dtype=torch.uint8)   # no flat regions
    crop = BatchAugment("none", crop_size=16)
    _, out = crop(images_batch(6), labels, generator=gen(0))
    assert out.shape == (6, 1, 16, 16)
    for n in range(6):
        assert any(torch.equal(out[n], win) for win in _windows(labels[n], 16, 16)), f"sample {n}"
    offsets = {tuple(out[n].flatten()[:8].tolist()) for n in range(6)}
    assert len(offsets) > 1, "every sample got the same crop"


def test_crops_follow_the_augmentation_and_the_normalised_path():
    images, labels = images_batch(4) * 255, labels_batch(4)
    crop = BatchAugment("strong", crop_size=16)
    out_images, out_labels = crop.augment_normalized(images, labels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                                                     generator=gen(0))
    assert out_images.shape == (4, 3, 16, 16) and out_labels.shape == (4, 1, 16, 16)
    assert set(out_labels.unique().tolist()) <= {0, 1, 2}
    crop.crop_size = None
    assert crop.augment_normalized(images, labels, (0.5,) * 3, (0.25,) * 3, generator=gen(0))[0].shape[-2:] == (H, W)


def test_low_res_resamples_the_whole_image():
    """Half the side with no other augmentation: the 2×2 mean of the image, the labels' own blocks."""
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (3, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = labels.repeat_interleave(4, 2).repeat_interleave(4, 3)             # 32×32, blocks of 4
    images = torch.rand(3, 3, 32, 32, generator=g)
    out_images, out_labels = BatchAugment("none", low_res_size=16)(images, labels, generator=gen(0))
    assert out_images.shape == (3, 3, 16, 16) and out_labels.shape == (3, 1, 16, 16)
    assert torch.allclose(out_images, torch.nn.functional.avg_pool2d(images, 2), atol=1e-5)
    assert torch.equal(out_labels, labels[..., ::2, ::2])


def test_low_res_then_crop_takes_windows_of_the_resized_image():
    labels = torch.randint(0, 3, (4, 1, 8, 8), generator=gen(2), dtype=torch.uint8)
    labels = labels.repeat_interleave(4, 2).repeat_interleave(4, 3)             # 32×32, blocks of 4
    aug = BatchAugment("none", low_res_size=16, crop_size=8)
    _, out = aug(torch.rand(4, 3, 32, 32, generator=gen(3)), labels, generator=gen(0))
    assert out.shape == (4, 1, 8, 8)
    small = labels[..., ::2, ::2]
    for n in range(4):
        assert any(torch.equal(out[n], win) for win in _windows(small[n], 8, 8)), f"sample {n}"


def test_low_res_with_the_recipe_augmentations_and_back_to_full_size():
    images = torch.rand(8, 3, 32, 32, generator=gen(4)) * 255
    labels = torch.randint(0, 3, (8, 1, 32, 32), generator=gen(5), dtype=torch.uint8)
    aug = BatchAugment("light", mosaic=1.0, low_res_size=16)
    out_images, out_labels = aug.augment_normalized(images, labels, (0.5,) * 3, (0.25,) * 3, generator=gen(0))
    assert out_images.shape == (8, 3, 16, 16) and out_labels.shape == (8, 1, 16, 16)
    assert set(out_labels.unique().tolist()) <= {0, 1, 2}
    aug.low_res_size = None
    assert aug.augment_normalized(images, labels, (0.5,) * 3, (0.25,) * 3, generator=gen(0))[0].shape[-2:] == (32, 32)


def test_copy_paste_puts_another_samples_pet_over_the_image():
    images, labels = images_batch(6), labels_batch(6, seed=3)
    paste = BatchAugment("none", copy_paste=1.0)
    out_images, out_labels = paste(images, labels, generator=gen(0))
    for i in range(6):
        donors = [j for j in range(6) if j != i and torch.equal(
            out_labels[i], torch.where(labels[j] != 0, labels[j], labels[i]))
            and torch.allclose(out_images[i], torch.where(labels[j] != 0, images[j], images[i]), atol=1e-5)]
        assert donors, f"sample {i} is not itself with another sample's pet pasted on"
    assert not torch.equal(out_labels, labels)
    untouched = BatchAugment("none", copy_paste=0.0)(images, labels, generator=gen(0))
    assert torch.equal(untouched[1], labels)


def test_mosaic_tiles_four_samples_of_the_batch_at_half_size():
    images, labels = images_batch(5), labels_batch(5, seed=4)
    out_images, out_labels = BatchAugment("none", mosaic=1.0)(images, labels, generator=gen(0))
    assert out_images.shape == images.shape and out_labels.shape == labels.shape
    small_images = images.reshape(5, 3, H // 2, 2, W // 2, 2).mean((3, 5))      # 2×2 averages
    small_labels = labels[..., ::2, ::2]
    h, w = H // 2, W // 2
    for i in range(5):
        quarters = [(slice(0, h), slice(0, w)), (slice(0, h), slice(w, W)),
                    (slice(h, H), slice(0, w)), (slice(h, H), slice(w, W))]
        sources = []
        for q, (rows, cols) in enumerate(quarters):
            match = [j for j in range(5) if torch.allclose(out_images[i, :, rows, cols], small_images[j], atol=1e-5)
                     and torch.equal(out_labels[i, :, rows, cols], small_labels[j])]
            assert match, f"quarter {q} of sample {i} is no sample of the batch at half size"
            sources.append(match)
        assert i in sources[0], "the top-left quarter is the sample itself"
        assert all(i not in s for s in sources[1:]), "the other quarters come from other samples"
        assert len({s[0] for s in sources[1:]}) == 3, "from three different samples"
    untouched_images, untouched_labels = BatchAugment("none", mosaic=0.0)(images, labels, generator=gen(0))
    assert torch.equal(untouched_images, images) and torch.equal(untouched_labels, labels)


def test_pet_free_windows_are_the_windows_with_the_fewest_pet_pixels():
    """Each sample's window comes from the sample itself, at its own scale, and no window of that
    size on the search grid (every quarter of its side) holds fewer pet pixels."""
    n, (wh, ww) = 6, (H // 2, W // 2)
    labels = torch.randint(0, 3, (n, 1, H, W), generator=gen(2), dtype=torch.uint8)
    labels[:, :, :, : W // 2] = 1                       # the left half is pet everywhere ...
    labels[1] = 1                                       # ... and sample 1 is pet all over
    images = images_batch(n)
    out_images, out_labels = BatchAugment.pet_free_windows(images, labels, (wh, ww), gen(0))
    assert out_images.shape == (n, 3, wh, ww) and out_labels.shape == (n, 1, wh, ww)
    grid = [(y, x) for y in range(0, H - wh + 1, wh // 4) for x in range(0, W - ww + 1, ww // 4)]
    for i in range(n):
        where = [(y, x) for y, x in grid if torch.equal(out_images[i], images[i, :, y:y + wh, x:x + ww])]
        assert where, f"sample {i}: the window is no window of its own image on the grid"
        y, x = where[0]
        assert torch.equal(out_labels[i], labels[i, :, y:y + wh, x:x + ww]), "labels cut elsewhere"
        pet = int((out_labels[i] != 0).sum())
        fewest = min(int((labels[i, :, a:a + wh, b:b + ww] != 0).sum()) for a, b in grid)
        assert pet == fewest, f"sample {i}: {pet} pet pixels, but a window with {fewest} exists"
        if i != 1:
            assert x >= W // 2, "a window reaching into the all-pet left half was chosen"
    assert bool((out_labels[1] == 1).all())             # all pet: any window, none better


def test_pet_free_windows_break_ties_at_random():
    labels = torch.zeros(8, 1, H, W, dtype=torch.uint8)          # no pet anywhere: all windows tie
    images = torch.arange(H * W, dtype=torch.float32).view(1, 1, H, W).expand(8, 3, H, W)
    out, _ = BatchAugment.pet_free_windows(images, labels, (H // 2, W // 2), gen(3))
    assert len({float(out[i, 0, 0, 0]) for i in range(8)}) > 1, "every tie went to the same window"


def test_mosaic_background_puts_pet_free_windows_in_the_other_quarters():
    """background=1: quarters 2-4 are other samples' pet-free windows at full scale, quarter 1 the
    sample itself at half size; background=0 keeps whole samples (the mosaic test above)."""
    n, (h, w) = 5, (H // 2, W // 2)
    images, labels = images_batch(n), labels_batch(n, seed=4)
    out_images, out_labels = BatchAugment("none", mosaic=1.0, mosaic_background=1.0)(images, labels, generator=gen(0))
    small_images = images.reshape(n, 3, h, 2, w, 2).mean((3, 5))
    _, win_labels = BatchAugment.pet_free_windows(images, labels, (h, w), gen(0))
    for i in range(n):
        assert torch.allclose(out_images[i, :, :h, :w], small_images[i], atol=1e-5), "own quarter"
        for rows, cols in ((slice(0, h), slice(w, W)), (slice(h, H), slice(0, w)), (slice(h, H), slice(w, W))):
            quarter_images, quarter_labels = out_images[i, :, rows, cols], out_labels[i, :, rows, cols]
            # Windows are drawn with their own random tie-breaks, so compare with the pet count
            # and the image of some window of some other sample, not with one call's output.
            sources = [j for j in range(n) if j != i and any(
                torch.allclose(quarter_images, images[j, :, y:y + h, x:x + w], atol=1e-5)
                and torch.equal(quarter_labels, labels[j, :, y:y + h, x:x + w])
                for y in range(0, H - h + 1, h // 4) for x in range(0, W - w + 1, w // 4))]
            assert sources, f"a quarter of sample {i} is no window of another sample"
            assert any(int((quarter_labels != 0).sum()) == int((win_labels[j] != 0).sum()) for j in sources), \
                f"a quarter of sample {i} is not its source's most pet-free window"


def test_hue_turns_keep_grays_and_move_colours():
    """Hue turns: a gray image stays gray whatever the angle; a red one stops being red."""
    aug = with_params(AugmentParams(hflip=0.0, hue=0.5))
    labels = labels_batch(32)
    gray = torch.full((32, 3, H, W), 0.4)
    out, _ = aug(gray, labels, generator=gen(2))
    torch.testing.assert_close(out, gray, atol=1e-5, rtol=0)
    red = torch.zeros(32, 3, H, W)
    red[:, 0] = 0.8
    out, _ = aug(red, labels, generator=gen(2))
    dominant = out.mean(dim=(2, 3)).argmax(dim=1)
    assert (dominant != 0).any() and (dominant == 0).any()
    assert out.min() >= 0 and out.max() <= 1


def test_grayscale_drops_the_colour():
    aug = with_params(AugmentParams(hflip=0.0, grayscale=1.0))
    out, _ = aug(images_batch(4), labels_batch(4), generator=gen(3))
    torch.testing.assert_close(out[:, 0], out[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 1], out[:, 2], atol=1e-5, rtol=0)
    none = with_params(AugmentParams(hflip=0.0, grayscale=0.0))
    out, _ = none(images_batch(4), labels_batch(4), generator=gen(3))
    assert (out[:, 0] - out[:, 1]).abs().max() > 0.1


def test_elastic_shifts_put_the_control_points_on_corners_and_centre_and_are_smooth():
    """The field equals the drawn 3×3 control shifts (×2: grid units) at the corners, edge middles
    and centre, has their spread, and changes little from one pixel to the next."""
    n, h, w, sigma = 64, 33, 41, 0.05
    shifts = BatchAugment.elastic_shifts(n, h, w, sigma, generator=gen(5))
    coarse = torch.randn(n, 2, 3, 3, generator=gen(5)) * (2 * sigma)
    assert shifts.shape == (n, h, w, 2)
    for gy, y in enumerate((0, h // 2, h - 1)):
        for gx, x in enumerate((0, w // 2, w - 1)):
            torch.testing.assert_close(shifts[:, y, x], coarse[:, :, gy, gx], atol=1e-5, rtol=0)
    control = shifts[:, [0, h // 2, h - 1]][:, :, [0, w // 2, w - 1]]
    assert 0.08 < control.std().item() < 0.12, "control shifts have a std of 2 * sigma in grid units"
    step = (shifts[:, 1:] - shifts[:, :-1]).abs().max()
    assert step < 0.25 * shifts.abs().max(), "neighbouring pixels move together"


def test_elastic_deformation_bends_images_and_labels_alike():
    """With elastic on (no other augmentation) every sample changes, labels stay in their set,
    and the labels move with the image: a pixel of a two-colour image keeps its label's colour."""
    n = 6
    labels = labels_batch(n, seed=7).clamp_max(1)
    images = labels.float().expand(n, 3, H, W).contiguous()      # white pet on black background
    out_images, out_labels = BatchAugment("none", elastic=0.05)(images, labels, generator=gen(8))
    assert set(out_labels.unique().tolist()) <= {0, 1}
    assert all(not torch.equal(out_labels[i], labels[i]) for i in range(n))
    pet, background = out_labels[:, 0] == 1, out_labels[:, 0] == 0
    assert (out_images[:, 0][pet] > 0.5).float().mean() > 0.97
    assert (out_images[:, 0][background] < 0.5).float().mean() > 0.97
    plain_images, plain_labels = BatchAugment("none", elastic=0.0)(images, labels, generator=gen(8))
    assert torch.equal(plain_images, images) and torch.equal(plain_labels, labels)


def test_flip_with_rotation_mirrors_the_rotated_sample():
    """hflip 1 after the same drawn rotation/zoom/shift is the unflipped output, mirrored.

    The flip negates the x of the output coords (a column of the affine), so the sample must be
    the left-right mirror image, not a shear, whatever the angle."""
    images, labels = images_batch(4), labels_batch(4)
    geometry = dict(degrees=30, scale=(0.9, 1.2), translate=0.1)
    plain, _ = with_params(AugmentParams(hflip=0.0, **geometry))(images, labels, generator=gen(7))
    flipped, _ = with_params(AugmentParams(hflip=1.0, **geometry))(images, labels, generator=gen(7))
    assert (plain - images).abs().max() > 0.1        # the geometry did move the pixels
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-4, rtol=0)


def _uniform_images(values, h=H, w=W):
    """N×3×h×w images, image i uniformly ``values[i]`` in every channel."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, h, w).contiguous()


def test_contrast_keeps_each_uniform_image_as_it_is():
    """contrast c: (x − m)·c + m with m the image's own mean; on a uniform image x = m, so x."""
    images = _uniform_images([0.2, 0.7, 0.4, 0.9])
    out, _ = with_params(AugmentParams(hflip=0.0, contrast=0.5))(images, labels_batch(4), generator=gen(1))
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_contrast_scales_each_image_about_its_own_mean():
    """Two-tone gray images: contrast c gives (x − m)·c + m, one c per image drawn in [0.5, 1.5]:
    the mean stays, the distance of every pixel from it scales by that c, and the c differ."""
    images = torch.full((4, 3, H, W), 0.4)
    images[..., W // 2:] = 0.6                             # m = 0.5; (x − m)·1.5 stays in [0, 1]
    out, _ = with_params(AugmentParams(hflip=0.0, contrast=0.5))(images, labels_batch(4), generator=gen(3))
    m = images.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3), keepdim=True), m, atol=1e-4, rtol=0)
    c = (out - m) / (images - m)                           # the factor at every pixel
    per_image = c.flatten(1).median(dim=1).values
    torch.testing.assert_close(c, per_image.view(4, 1, 1, 1).expand_as(c), atol=1e-3, rtol=0)
    assert ((per_image >= 0.5) & (per_image <= 1.5)).all() and (per_image - 1).abs().max() > 0.05


def test_contrast_after_brightness_keeps_a_uniform_image_as_brightness_made_it():
    """brightness b then contrast c on a uniform image v: b·v, then (b·v − b·v)·c + b·v = b·v.

    The same generator draws the same b with and without contrast (c is drawn after b)."""
    images = _uniform_images([0.2, 0.4, 0.5, 0.6])        # b·v ≤ 1.5·0.6: no clamping at 1
    labels = labels_batch(4)
    bright, _ = with_params(AugmentParams(hflip=0.0, brightness=0.5))(images, labels, generator=gen(4))
    both, _ = with_params(AugmentParams(hflip=0.0, brightness=0.5, contrast=0.5))(images, labels, generator=gen(4))
    factors = bright[:, :, 0, 0] / images[:, :, 0, 0]
    assert ((factors > 0.5) & (factors < 1.5)).all() and (factors - 1).abs().max() > 0.05   # b did scale them
    torch.testing.assert_close(both, bright, atol=1e-5, rtol=0)


def test_copy_paste_always_takes_the_pet_of_another_sample():
    """Two samples: image 0 black with its pet on the left half, image 1 white with its pet on the
    right half. Pasting the other's pet makes both: black left, white right, pet everywhere. A
    sample pasted onto itself would stay as it was."""
    half = W // 2
    images = torch.zeros(2, 3, H, W)
    images[1] = 1.0
    labels = torch.zeros(2, 1, H, W, dtype=torch.uint8)
    labels[0, :, :, :half] = 1
    labels[1, :, :, half:] = 1
    expected_image = torch.zeros(3, H, W)
    expected_image[:, :, half:] = 1.0
    paste = BatchAugment("none", copy_paste=1.0)
    for seed in range(20):
        out_images, out_labels = paste(images, labels, generator=gen(seed))
        assert (out_labels == 1).all(), f"seed {seed}: a sample did not get the other's pet"
        for i in range(2):
            torch.testing.assert_close(out_images[i], expected_image, atol=1e-6, rtol=0)


def test_mosaic_of_an_odd_sized_batch_keeps_its_size_and_the_own_sample_top_left():
    """7×9 images, four of them: each mosaic quarter is ceil(7/2)×ceil(9/2) = 4×5, the 2×2 tiling
    8×10 cropped back to 7×9. Image i is uniformly v_i, so its own (top-left) quarter is v_i and
    the other three are the three other values (distinct samples in a batch of 4)."""
    values = [0.1, 0.3, 0.6, 0.9]
    images = _uniform_images(values, 7, 9)
    labels = torch.zeros(4, 1, 7, 9, dtype=torch.uint8)
    out, out_labels = BatchAugment("none", mosaic=1.0)(images, labels, generator=gen(0))
    assert out.shape == (4, 3, 7, 9) and out_labels.shape == (4, 1, 7, 9)
    for i, v in enumerate(values):
        torch.testing.assert_close(out[i, :, :4, :5], torch.full((3, 4, 5), v), atol=1e-6, rtol=0)
        corners = [out[i, 0, 0, 0], out[i, 0, 0, 8], out[i, 0, 6, 0], out[i, 0, 6, 8]]
        assert sorted(round(c.item(), 4) for c in corners) == values      # all four samples, once each


def test_identity_augment_normalized_scales_0_255_to_0_1_then_normalises():
    # (x/255 − 0.5)/0.25: 0 → −2, 127.5 → 0, 255 → 2
    images = torch.tensor([0.0, 127.5, 255.0]).view(1, 1, 1, 3).expand(1, 3, 2, 3).contiguous()
    labels = torch.ones(1, 1, 2, 3, dtype=torch.uint8)
    out, out_labels = BatchAugment("none").augment_normalized(images, labels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.testing.assert_close(out, torch.tensor([-2.0, 0.0, 2.0]).view(1, 1, 1, 3).expand(1, 3, 2, 3))
    assert torch.equal(out_labels, labels)


def test_normalize_constants_are_made_once_per_device_and_dtype():
    """Made from Python numbers for every batch, the mean and std were a blocking host→GPU copy
    each time (a sync per valid batch); now each is one tensor per device and dtype, same values."""
    from labseg.data import MEAN, STD, denormalize, normalize
    from labseg.transforms import channel_constant

    x = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x), (x - mean) / std)
    torch.testing.assert_close(denormalize(normalize(x)), x)
    cpu = torch.device("cpu")
    assert channel_constant(MEAN, cpu, torch.float32) is channel_constant(MEAN, cpu, torch.float32)
    assert channel_constant(MEAN, cpu, torch.float64).dtype == torch.float64
    channel_constant.cache_clear()
    with torch.inference_mode():                    # made first by evaluation (predict_image)...
        normalize(torch.rand(1, 3, 2, 2))
    x = torch.rand(1, 3, 2, 2, requires_grad=True)  # ...then used in training
    normalize(x).sum().backward()
    assert x.grad is not None
