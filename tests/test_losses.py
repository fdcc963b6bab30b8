"""The training losses, each checked against a value worked out by hand from its definition.

At logit 0 every pixel's probability is 1/2 and its binary cross-entropy ln 2 = 0.6931, which
keeps the soft Dice/Tversky/focal sums small fractions. The soft ratios add EPS = 1 pixel
to numerator and denominator. (tests/test_metrics.py holds the older
loss tests: ordering, ignored pixels, Lovász, deep supervision.)
"""
import math

import pytest
import torch

from labseg.losses import bce, dice, focal, tversky


def px(*rows):
    """N images of one row of pixels each: N×1×1×W."""
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 1, -1)


LN2 = math.log(2)


def test_bce_is_the_mean_over_valid_pixels_only():
    target = px([1, 0, 1, 0])
    logits = torch.zeros_like(target)
    valid = px([1, 1, 0, 0])
    # every pixel at logit 0 costs ln 2; 2 valid pixels → (2·ln 2) / 2 = ln 2 (not / 4 pixels = ln 2 / 2)
    assert bce(logits, target, valid).item() == pytest.approx(LN2, abs=1e-6)


def test_soft_dice_leaves_out_ignored_target_pixels():
    # p = 1/2 everywhere; the 4th pixel is pet but ignored (valid 0), so it counts nowhere:
    # tp = .5+.5 = 1, fp = .5 (pixel 2), fn = .5+.5 = 1  →  1 − (2·1 + 1)/(2·1 + .5 + 1 + 1) = 1 − 3/4.5 = 1/3
    target = px([1, 0, 1, 1])
    valid = px([1, 1, 1, 0])
    assert dice(torch.zeros_like(target), target, valid).item() == pytest.approx(1 / 3, abs=1e-6)


def test_soft_dice_is_per_image_then_averaged():
    # p = 1/2 everywhere. Image A all pet: tp 1, fp 0, fn 1 → 1 − 3/4 = 1/4.
    # Image B no pet: tp 0, fp 1, fn 0 → 1 − 1/2 = 1/2. Mean 3/8 (pooled over both would be 1 − 3/5 = 2/5).
    target = px([1, 1], [0, 0])
    ones = torch.ones_like(target)
    assert dice(torch.zeros_like(target), target, ones).item() == pytest.approx(3 / 8, abs=1e-6)


def test_tversky_weighs_misses_by_beta_and_false_alarms_by_alpha():
    ones = px([1, 1])
    # all pet, p = 1/2: tp 1, fp 0, fn 1 → 1 − (1 + 1)/(1 + 0.7·1 + 1) = 1 − 2/2.7 (beta = 0.7 on misses)
    misses = tversky(torch.zeros_like(ones), ones, ones)
    assert misses.item() == pytest.approx(1 - 2 / 2.7, abs=1e-6)
    # no pet, p = 1/2: tp 0, fp 1, fn 0 → 1 − 1/(0.3·1 + 1) = 1 − 1/1.3 (alpha = 0.3 on false alarms)
    alarms = tversky(torch.zeros_like(ones), torch.zeros_like(ones), ones)
    assert alarms.item() == pytest.approx(1 - 1 / 1.3, abs=1e-6)


def test_tversky_per_image_then_averaged():
    # the two images of the test above in one batch: the mean of their losses
    target = px([1, 1], [0, 0])
    loss = tversky(torch.zeros_like(target), target, torch.ones_like(target))
    assert loss.item() == pytest.approx(((1 - 2 / 2.7) + (1 - 1 / 1.3)) / 2, abs=1e-6)


def test_focal_by_hand_at_logit_zero():
    # p_t = 1/2, so (1 − p_t)^gamma = 1/4 at gamma 2, and ce = ln 2:
    # a pet pixel weighs alpha = 0.25 → 0.25 · 0.25 · ln 2;
    # a background pixel weighs 1 − alpha = 0.75 → 0.75 · 0.25 · ln 2
    pet, background = px([1]), px([0])
    one = torch.ones_like(pet)
    assert focal(torch.zeros_like(pet), pet, one).item() == pytest.approx(0.25 * 0.25 * LN2, abs=1e-7)
    assert focal(torch.zeros_like(pet), background, one).item() == pytest.approx(0.75 * 0.25 * LN2, abs=1e-7)


def test_focal_down_weights_easy_pixels_by_gamma():
    # logit ln 3: p = 3/4 on a pet pixel, p_t = 3/4, ce = −ln(3/4) = ln(4/3);
    # 0.25 · (1/4)^2 · ln(4/3) at gamma 2, and at gamma 0 just 0.25 · ln(4/3) (16× more)
    pet = px([1])
    logit = torch.full_like(pet, math.log(3))
    one = torch.ones_like(pet)
    assert focal(logit, pet, one).item() == pytest.approx(0.25 / 16 * math.log(4 / 3), abs=1e-7)
    assert focal(logit, pet, one, gamma=0.0).item() == pytest.approx(0.25 * math.log(4 / 3), abs=1e-7)
