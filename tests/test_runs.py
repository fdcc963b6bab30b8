"""labseg.runs pieces tested on their own (the end-to-end run folder tests are in test_train.py)."""
import os

import pytest
import torch
from torch import nn

from labseg.runs import CheckpointError, atomic_write_bytes, load_weights


def test_weights_of_another_shape_are_named_not_loaded():
    """Same keys, same arch, one tensor of another shape: a CheckpointError naming the key and
    both shapes (Conv2d(3, 1, 1).weight is out × in × kh × kw = 1×3×1×1), and the model untouched."""
    model = nn.Conv2d(3, 1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"weight": torch.ones(1, 2, 1, 1), "bias": torch.ones(1)}
    with pytest.raises(CheckpointError, match=r"first mismatched key 'weight': \(1, 2, 1, 1\) vs \(1, 3, 1, 1\)"):
        load_weights(model, {"arch": "conv", "model": state}, "conv")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_atomic_write_replaces_the_file_and_never_rewrites_it_in_place(tmp_path):
    """A reader of the old file (here: a second link to it) keeps the old bytes whole; the path
    names a new file with the new bytes. Writing into the old file would change both at once."""
    path = tmp_path / "last.pt"
    path.write_bytes(b"old checkpoint")
    os.link(path, tmp_path / "reader")
    atomic_write_bytes(path, b"new checkpoint, longer")
    assert path.read_bytes() == b"new checkpoint, longer"
    assert (tmp_path / "reader").read_bytes() == b"old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "reader"]     # no temporary file left
