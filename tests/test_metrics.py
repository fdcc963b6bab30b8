import pytest
import torch

from labseg.losses import LOSSES, build_loss, deep_supervised
from labseg.metrics import dice_score, iou_score, per_image_dice, per_image_iou, pixel_accuracy, pooled_dice


def masks(*rows):
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 1, -1)


def test_dice_by_hand():
    pred = masks([1, 1, 0, 0])
    target = masks([1, 0, 0, 0])
    # 2·1 / (2 + 1)
    assert dice_score(pred, target) == pytest.approx(2 / 3)
    assert iou_score(pred, target) == pytest.approx(1 / 2)
    assert pixel_accuracy(pred, target) == pytest.approx(3 / 4)


def test_scores_of_many_images_in_any_mask_type_are_each_images_own():
    """150 images (counted a few at a time: past the chunks' edges) as probabilities against 0/1
    masks in uint8, float and bool: each image's Dice, IoU and accuracy as numpy computes them."""
    import numpy as np

    rng = np.random.default_rng(0)
    prob = rng.random((150, 1, 8, 8)).astype(np.float32)
    truth = rng.random((150, 8, 8)) < rng.random((150, 1, 1))        # pets of every size, some empty
    truth[7] = False
    p, g = (prob[:, 0] >= 0.5).reshape(150, -1), truth.reshape(150, -1)
    inter, total, union = (p & g).sum(1), p.sum(1) + g.sum(1), (p | g).sum(1)
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    for target in (torch.from_numpy(truth.astype(np.uint8)), torch.from_numpy(truth.astype(np.float32)),
                   torch.from_numpy(truth)):
        assert per_image_dice(torch.from_numpy(prob), target).numpy() == pytest.approx(dice)
        assert per_image_iou(torch.from_numpy(prob), target).numpy() == pytest.approx(iou)
        assert pixel_accuracy(torch.from_numpy(prob), target) == pytest.approx((p == g).mean())


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


def test_one_hxw_mask_is_one_image_and_mismatched_sizes_are_refused():
    # a student's single mask: 2·2 / (3 + 3) over the whole image, not one Dice per row
    pred = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    target = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    assert dice_score(pred, target) == pytest.approx(2 / 3)
    assert iou_score(pred, target) == pytest.approx(2 / 4)
    assert dice_score(pred, target) == dice_score(pred[None, None], target[None, None])
    with pytest.raises(ValueError, match=r"prediction of shape \(2, 1, 4, 4\) and target of shape \(2, 1, 8, 8\)"):
        dice_score(torch.ones(2, 1, 4, 4), torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="differ in images or pixels"):
        pooled_dice(torch.ones(2, 16), torch.ones(4, 4, 2))


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


@pytest.mark.parametrize("name", ["bce", "focal", "bce_dice", "dice", "lovasz", "bce_lovasz"])
def test_invalid_pixels_do_not_count(name):
    loss = build_loss(name)
    target = masks([1, 0, 1, 0])
    logits = masks([5, -5, 5, 5])                    # last pixel wrong
    valid = masks([1, 1, 1, 0])                      # ...but ignored
    perfect = masks([5, -5, 5, -5])
    assert loss(logits, target, valid) == pytest.approx(loss(perfect, target, valid).item(), abs=1e-6)
    assert loss(logits, target, torch.ones_like(valid)) > loss(perfect, target, torch.ones_like(valid))


def test_lovasz_hinge_equals_the_jaccard_loss_on_hard_predictions():
    # At logits of ±1·sign (error 0) or 0 (error 1) the Lovász extension is the set function
    # itself: 1 − IoU of the predicted mask, per image, then the mean over images.
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(5, 1, 9, 7, generator=g) < 0.4).float()
    target[3] = 0                                              # an image without pet pixels
    wrong = torch.rand(5, 1, 9, 7, generator=g) < 0.3
    wrong[4] = False                                           # a perfect image
    logits = torch.where(wrong, torch.zeros_like(target), 2 * target - 1)
    pred = torch.where(wrong, 1 - target, target)
    inter, union = (pred * target).sum((1, 2, 3)), ((pred + target) > 0).float().sum((1, 2, 3))
    expected = torch.where(union > 0, 1 - inter / union.clamp_min(1), torch.zeros_like(union))
    lovasz = build_loss("lovasz")
    ones = torch.ones_like(target)
    assert lovasz(logits, target, ones).item() == pytest.approx(expected.mean().item(), abs=1e-6)
    per_image = [lovasz(logits[i:i + 1], target[i:i + 1], ones[i:i + 1]).item() for i in range(5)]
    assert per_image == pytest.approx(expected.tolist(), abs=1e-6)


def test_lovasz_with_ignored_pixels_equals_lovasz_without_them():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 6, 6, generator=g) * 2
    target = (torch.rand(3, 1, 6, 6, generator=g) < 0.5).float()
    valid = (torch.rand(3, 1, 6, 6, generator=g) < 0.7).float()
    lovasz = build_loss("lovasz")
    kept = [lovasz(logits[i][valid[i] > 0].view(1, 1, 1, -1), target[i][valid[i] > 0].view(1, 1, 1, -1),
                   torch.ones(1, 1, 1, int(valid[i].sum()))) for i in range(3)]
    assert lovasz(logits, target, valid).item() == pytest.approx(torch.stack(kept).mean().item(), abs=1e-6)


def test_lovasz_gradient_pushes_wrong_pixels_the_right_way():
    target = masks([1, 1, 0, 0])
    logits = masks([2.0, -0.5, 0.3, -3.0]).requires_grad_()   # pixels 1 and 2 are wrong
    build_loss("lovasz")(logits, target, torch.ones_like(target)).backward()
    grad = logits.grad.flatten().tolist()
    assert grad[1] < 0 < grad[2]          # raise the missed pet pixel, lower the false one
    assert grad[3] == 0                   # a confidently right pixel has no hinge loss


def test_unknown_loss_lists_choices():
    with pytest.raises(ValueError, match="bce, dice, bce_dice, tversky, focal, lovasz, bce_lovasz"):
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


def test_iou_of_empty_vs_empty_is_one_like_dice():
    # no pet predicted and none there: a perfect image, IoU 1 (as Dice), not 0/0 → 0
    empty = masks([0, 0, 0], [0, 0, 0])
    assert per_image_iou(empty, empty).tolist() == [1.0, 1.0]
    assert iou_score(masks([0, 0, 0]), masks([0, 1, 0])) == 0.0


def test_pooled_dice_of_an_all_empty_batch_is_one():
    # nothing predicted and nothing there in the whole batch: 1, as the per-image Dice says
    empty = masks([0, 0, 0], [0, 0, 0])
    assert pooled_dice(empty, empty) == 1.0
    assert dice_score(empty, empty) == 1.0
