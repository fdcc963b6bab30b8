import numpy as np
import pytest
import torch

from labseg.data import BACKGROUND, PET, CachedSplit, Record
from labseg.evaluate import score
from labseg.postprocess import clean_mask, clean_masks, keep_largest_component


def grid(*rows: str) -> np.ndarray:
    """A boolean mask drawn with '#' (pet) and '.' (background)."""
    return np.array([[c == "#" for c in row] for row in rows])


def test_the_largest_component_stays_and_a_smaller_blob_goes():
    mask = grid("##...",
                "##..#",
                ".....")
    assert (keep_largest_component(mask) == grid("##...",
                                                 "##...",
                                                 ".....")).all()


def test_pieces_touching_at_a_corner_are_one_pet():
    mask = grid("#...",
                ".#..",
                "..##")
    assert (keep_largest_component(mask) == mask).all()


def test_empty_and_single_component_masks_are_unchanged():
    empty = np.zeros((4, 5), bool)
    assert not keep_largest_component(empty).any() and not clean_mask(empty).any()
    one = grid(".##.", ".##.")
    assert (clean_mask(one) == one).all()


def test_clean_mask_fills_holes_but_not_gaps_open_to_the_border():
    ring = grid("#####",
                "#...#",
                "#####")
    assert clean_mask(ring).all()
    horseshoe = grid("#.#",          # the gap between the legs reaches the edge: background
                     "#.#",
                     "###")
    assert (clean_mask(horseshoe) == horseshoe).all()


def test_clean_masks_works_per_image_and_checks_its_shape():
    a = grid("#..#", "#...")
    b = grid("....", "..##")
    out = clean_masks(torch.from_numpy(np.stack([a, b])).unsqueeze(1))
    assert out.shape == (2, 1, 2, 4) and out.dtype == torch.bool
    assert (out[0, 0].numpy() == grid("#...", "#...")).all() and (out[1, 0].numpy() == b).all()
    with pytest.raises(ValueError, match=r"expected N×1×H×W masks, got shape \(2, 4\)"):
        clean_masks(torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected a 2-D H×W mask, got shape \(1, 2, 4\)"):
        clean_mask(np.zeros((1, 2, 4), bool))


def test_score_with_postprocess_drops_a_false_blob():
    truth = grid("##....",
                 "##....",
                 "......")
    pred = grid("##....",
                "##..##",           # a second blob of "pet" colour
                "......")
    labels = np.where(truth, PET, BACKGROUND).astype(np.uint8)[None]
    split = CachedSplit(np.zeros((1, 3, 3, 6), np.uint8), labels,
                        [Record("Abyssinian_1", "Abyssinian", "cat", 1, None, None)], np.array([[3, 6]]))
    probs = torch.from_numpy(pred).float().view(1, 1, 3, 6)
    plain, cleaned = score(probs, split), score(probs, split, postprocess=True)
    assert plain.dice[0] == pytest.approx(2 * 4 / (6 + 4))
    assert cleaned.dice[0] == 1.0
    assert cleaned.summary()["postprocess"] is True and "postprocess" not in plain.summary()
