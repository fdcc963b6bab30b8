"""The networks, built by name: ``build_model("unet")`` or ``build_model("resnet34_unet")``."""
from __future__ import annotations

from torch import nn

from labseg.config import check_choice
from labseg.models.resnet34_unet import ResNet34UNet
from labseg.models.unet import UNet

MODELS = {
    "unet": UNet,
    "resnet34_unet": ResNet34UNet,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a network by name with fresh weights (nothing is downloaded)."""
    check_choice("arch", name, MODELS)
    return MODELS[name](**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "build_model", "count_parameters", "UNet", "ResNet34UNet"]
