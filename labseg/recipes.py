"""Default, best-known training recipes, one per network.

A field of :class:`labseg.config.RunConfig` left at ``None`` is taken from here. Each choice has
a one-line reason; the measurements behind them are in ``docs/results.md``.
"""
from __future__ import annotations

_COMMON = dict(
    epochs=40,            # long enough for cosine decay to settle on small data
    batch_size=16,        # fits a laptop at 256 px; BatchNorm statistics stay stable
    optimizer="adamw",    # decoupled weight decay; Adam-level speed without its L2 coupling
    scheduler="cosine",   # no plateau tuning needed, ends at a low lr for a clean final model
    warmup_epochs=1.0,    # avoids the early BatchNorm/Adam blow-ups of from-scratch training
    weight_decay=1e-4,    # mild regularisation; from-scratch nets on few images overfit
    loss="bce_dice",      # BCE for stable gradients + Dice for the metric we are scored on
    augment="light",      # flips, small affine, scale-crop, colour jitter
    ema=0.0,              # off until measured to help
    copy_paste=0.0,       # off until measured to help
    crop_size=0,          # whole images throughout, unless a network's recipe says otherwise
    crop_until=0.0,
    norm="batch",         # BatchNorm trains far faster from scratch than the paper's plain UNet
)

RECIPES = {
    "resnet34_unet": dict(_COMMON, lr=1e-3),
    "unet": dict(_COMMON, lr=1e-3),
}


def recipe_for(arch: str) -> dict:
    """The recipe for ``arch`` as a fresh dict (raises KeyError for an unknown arch)."""
    return dict(RECIPES[arch])
