"""The networks, built by name: ``build_model("unet")`` or ``build_model("resnet34_unet")``.

``smp_unet_resnet34`` is the peer (segmentation_models_pytorch's Unet, the optional ``bench``
extra), registered so that it trains and is evaluated by the same code as labseg's own networks.
"""
from __future__ import annotations

from torch import nn

from labseg.config import check_choice
from labseg.models.resnet34_unet import ResNet34UNet
from labseg.models.smp_unet import import_smp, smp_unet_resnet34
from labseg.models.unet import UNet

MODELS = {
    "unet": UNet,
    "resnet34_unet": ResNet34UNet,
    "smp_unet_resnet34": smp_unet_resnet34,
}
OWN_MODELS = ("unet", "resnet34_unet")   # written here; the rest are peers built by other libraries


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a network by name with fresh weights (nothing is downloaded)."""
    check_choice("arch", name, MODELS)
    return MODELS[name](**kwargs)


def check_installed(name: str) -> None:
    """Raise now, before any data or run folder is made, if network ``name`` needs a library
    that is not installed (only the peer does: segmentation_models_pytorch)."""
    check_choice("arch", name, MODELS)
    if name not in OWN_MODELS:
        import_smp()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "OWN_MODELS", "build_model", "check_installed", "count_parameters", "UNet", "ResNet34UNet"]
