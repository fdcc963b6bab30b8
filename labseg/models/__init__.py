"""The networks, built by name: ``build_model("unet")`` or ``build_model("resnet34_unet")``.

``smp_unet_resnet34`` is the peer (segmentation_models_pytorch's Unet, the optional ``bench``
extra), registered so that it trains and is evaluated by the same code as labseg's own networks.
:func:`register_model` adds a network of your own under a name that training, evaluation, the
report, sweeps and the CLI then accept like these (``docs/design.md``, "Adding a network").
"""
from __future__ import annotations

import inspect
import re
from typing import Callable

from torch import nn

from labseg.config import ARCH_OPTIONS, ARCHS, OWN_MODELS, ConfigError, RunConfig, check_choice
from labseg.models.resnet34_unet import ResNet34UNet
from labseg.models.smp_unet import import_smp, smp_unet_resnet34
from labseg.models.unet import UNet

MODELS = {
    "unet": UNet,
    "resnet34_unet": ResNet34UNet,
    "smp_unet_resnet34": smp_unet_resnet34,
}
REQUIRES = {"smp_unet_resnet34": import_smp}   # networks that need a library not always installed


def register_model(name: str, builder: Callable[..., nn.Module], *, recipe: dict | None = None,
                   options: tuple[str, ...] = ()) -> None:
    """Make ``builder`` trainable as ``arch=name``: ``fit``, ``labseg train --arch``, 04_train, sweeps.

    ``builder(**options)`` returns a fresh network that maps N×3×S×S images (S divisible by 32)
    to N×1×S×S logits in eval mode; in training mode a deep-supervised one may return
    ``(logits, [aux logits, ...])``. ``recipe``: its training defaults, RunConfig fields over
    :data:`labseg.recipes.BASE_RECIPE`. ``options``: the layout fields of RunConfig that its
    builder takes (of ``config.ARCH_OPTIONS``, e.g. ``("deep_supervision",)``). Registering a
    name again replaces it (a notebook cell run twice). The CLI and notebooks run in other
    processes: list the module that registers in ``$LABSEG_PLUGINS`` for them to import.
    """
    from labseg.recipes import BASE_RECIPE, RECIPES

    if not (isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9_]*", name)):
        raise ConfigError(f"register_model: name {name!r}: expected lower-case letters, digits and _ (an arch name)")
    if name in OWN_MODELS or name in REQUIRES:
        raise ConfigError(f"register_model: {name!r} is one of labseg's networks; pick another name")
    if isinstance(builder, nn.Module):     # each run needs fresh weights, and this one would share them
        raise ConfigError(f"register_model: builder for {name!r} is a network already built "
                          f"({type(builder).__name__}); pass its class, or a function that builds a fresh one")
    if not callable(builder):
        raise ConfigError(f"register_model: builder for {name!r} is {builder!r}; expected a class or function "
                          "that returns an nn.Module")
    for option in options:
        check_choice("register_model option", option, ARCH_OPTIONS)
    recipe = dict(BASE_RECIPE, **(recipe or {}))
    fields = {f for f in RunConfig.__dataclass_fields__}
    if unknown := sorted(set(recipe) - fields):
        raise ConfigError(f"register_model: recipe of {name!r} has unknown field(s) {unknown}; valid: "
                          f"{', '.join(sorted(fields))}")
    # A recipe fills the fields a run leaves at None (RunConfig.with_recipe); a field with a value of
    # its own (img_size 128, seed 0, monitor ...) would never be read from it.
    recipe_fields = {f for f, spec in RunConfig.__dataclass_fields__.items() if spec.default is None}
    if fixed := sorted(set(recipe) - recipe_fields):
        raise ConfigError(f"register_model: recipe of {name!r} sets {fixed}, which a recipe cannot: they have "
                          "defaults of their own, so give them per run (fit(img_size=...), --img-size). A recipe "
                          f"sets: {', '.join(sorted(recipe_fields))}")
    for option, (as_built, _) in ARCH_OPTIONS.items():
        if option not in options and recipe.get(option, as_built) != as_built:
            raise ConfigError(f"register_model: recipe of {name!r} sets {option}={recipe[option]!r}, but {option} "
                              f"is not in its options; add it to options=(...) or leave it out of the recipe")
        if option not in options:
            recipe[option] = as_built
    MODELS[name] = builder
    RECIPES[name] = recipe
    if name not in ARCHS:
        ARCHS.append(name)
    for option, (as_built, archs) in list(ARCH_OPTIONS.items()):
        archs = tuple(a for a in archs if a != name) + ((name,) if option in options else ())
        ARCH_OPTIONS[option] = (as_built, archs)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a network by name with fresh weights (nothing is downloaded)."""
    check_choice("arch", name, MODELS)
    builder = MODELS[name]
    try:    # the call's arguments only: an error inside a builder keeps its own traceback
        inspect.signature(builder).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"network {name!r}: its builder {getattr(builder, '__name__', builder)!r} cannot be "
                          f"called with {kwargs or 'no arguments'} ({e}); labseg builds a registered network with "
                          "no arguments but the options it registered") from None
    except ValueError:      # no signature to read (a builtin): call it and see
        pass
    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"network {name!r}: its builder returned a {type(model).__name__}; expected an "
                          "nn.Module (a fresh network)")
    return model


def model_kwargs(config: RunConfig) -> dict:
    """The layout options of ``config.arch`` that differ from how the network is built by default.

    One table, ``config.ARCH_OPTIONS``, says which network has which option; RunConfig.validate
    has refused the others, so the peer (smp's Unet) gets none.
    """
    return {name: getattr(config, name) for name, (as_built, archs) in ARCH_OPTIONS.items()
            if config.arch in archs and getattr(config, name) not in (None, as_built)}


def check_installed(name: str) -> None:
    """Raise now, before any data or run folder is made, if network ``name`` needs a library
    that is not installed (only the peer does: segmentation_models_pytorch)."""
    check_choice("arch", name, MODELS)
    if name in REQUIRES:
        REQUIRES[name]()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "OWN_MODELS", "build_model", "check_installed", "count_parameters", "register_model",
           "UNet", "ResNet34UNet"]
