"""The peer the lab's issues measure against: segmentation_models_pytorch's ``Unet("resnet34")``.

Registered as ``smp_unet_resnet34`` so that the peer trains through labseg's own loop, data and
evaluation (``labseg train --arch smp_unet_resnet34``), and its figures in ``docs/results.md`` can
be rerun from the repo. It is built exactly as smp builds it, with fresh weights, and takes no
options: anything labseg added to its own networks (deep supervision, scSE, stochastic depth)
would make it something other than the peer. smp is the optional ``bench`` extra.
"""
from __future__ import annotations

from torch import nn

INSTALL = "pip install -e '.[bench]'"


def import_smp():
    """segmentation_models_pytorch, or an error that says how to install it."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise ModuleNotFoundError(f"arch 'smp_unet_resnet34' needs segmentation_models_pytorch, the optional "
                                  f"'bench' extra: {INSTALL} ({e})") from e
    return smp


def smp_unet_resnet34(**options) -> nn.Module:
    """``segmentation_models_pytorch.Unet("resnet34", encoder_weights=None, classes=1)``."""
    if options:
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise ValueError(f"smp_unet_resnet34 is built as segmentation_models_pytorch builds it and takes "
                         f"no options; got {given}")
    return import_smp().Unet("resnet34", encoder_weights=None, classes=1)
