import pytest
import torch

from labseg.losses import LOSSES, build_loss, deep_supervised
from labseg.metrics import dice_score, iou_score, per_image_dice, pixel_accuracy, pooled_dice


def masks(*rows):
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 1, -1)


def test_dice_by_hand():
    pred = masks([1, 1, 0, 0])
    target = masks([1, 0, 0, 0])
    # 2·1 / (2 + 1)
    assert dice_score(pred, target) == pytest.approx(2 / 3)
    assert iou_score(pred, target) == pytest.approx(1 / 2)
    assert pixel_accuracy(pred, target) == pytest.approx(3 / 4)


def test_empty_vs_empty_is_one_and_empty_vs_something_is_zero():
    assert per_image_dice(masks([0, 0, 0]), masks([0, 0, 0])).tolist() == [1.0]
    assert per_image_dice(masks([0, 0, 0]), masks([0, 1, 0])).tolist() == [0.0]
    assert per_image_dice(masks([1, 0, 0]), masks([0, 0, 0])).tolist() == [0.0]


def test_threshold_at_half_and_logits():
    probs = masks([0.49, 0.5, 0.9, 0.1])
    target = masks([0, 1, 1, 0])
    assert dice_score(probs, target) == 1.0
    assert dice_score(torch.logit(probs), target, from_logits=True) == 1.0
    assert dice_score(probs, target, threshold=0.95) == 0.0


def test_per_image_mean_differs_from_pooled():
    # one big pet found perfectly, one small pet missed completely
    big = [1] * 90 + [0] * 10
    small = [1] * 2 + [0] * 98
    pred = masks(big, [0] * 100)
    target = masks(big, small)
    assert dice_score(pred, target) == pytest.approx(0.5)
    assert pooled_dice(pred, target) == pytest.approx(2 * 90 / (90 + 92))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_lower_for_better_predictions(name):
    loss = build_loss(name)
    target = masks([1, 1, 0, 0], [0, 1, 1, 0])
    valid = torch.ones_like(target)
    good = (target * 2 - 1) * 4
    bad = -good
    assert loss(good, target, valid) < loss(torch.zeros_like(target), target, valid) < loss(bad, target, valid)


@pytest.mark.parametrize("name", ["bce", "focal", "bce_dice", "dice"])
def test_invalid_pixels_do_not_count(name):
    loss = build_loss(name)
    target = masks([1, 0, 1, 0])
    logits = masks([5, -5, 5, 5])                    # last pixel wrong
    valid = masks([1, 1, 1, 0])                      # ...but ignored
    perfect = masks([5, -5, 5, -5])
    assert loss(logits, target, valid) == pytest.approx(loss(perfect, target, valid).item(), abs=1e-6)
    assert loss(logits, target, torch.ones_like(valid)) > loss(perfect, target, torch.ones_like(valid))


def test_unknown_loss_lists_choices():
    with pytest.raises(ValueError, match="bce, dice, bce_dice, tversky, focal"):
        build_loss("hinge")


def test_deep_supervised_loss_weighs_the_aux_outputs():
    loss = build_loss("bce_dice")
    supervised = deep_supervised(loss)
    target = masks([1, 1, 0, 0], [0, 1, 1, 0])
    valid = torch.ones_like(target)
    good, bad = (target * 2 - 1) * 4, (1 - target * 2) * 4
    # all outputs alike: the normalised weights give back the plain loss
    assert supervised((good, [good, good, good]), target, valid) == pytest.approx(loss(good, target, valid).item())
    # weights 1/8, 1/4, 1/2 (coarse to fine) and 1 for the logits, over their sum 15/8
    expected = (loss(good, target, valid) * (1 + 1 / 4 + 1 / 2) + loss(bad, target, valid) / 8) / (15 / 8)
    assert supervised((good, [bad, good, good]), target, valid) == pytest.approx(expected.item())
    assert supervised((good, [good, good, bad]), target, valid) > supervised((good, [bad, good, good]), target, valid)
