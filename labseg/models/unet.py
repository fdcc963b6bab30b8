"""UNet (Ronneberger et al., 2015), as in the paper but with padded convolutions.

Padding keeps every 3×3 convolution size-preserving, so the output has the input's size and the
skips need no cropping. The paper has no normalisation layers; ``norm="batch"`` (the default)
adds BatchNorm after each convolution, which trains much faster from scratch (see
``labseg.recipes``; ``norm="none"`` is the paper's). Also unlike the paper: no dropout at the end
of the contracting path, one logit per pixel (sigmoid, BCE+Dice) instead of a two-class softmax
with weighted cross-entropy, and He initialisation by fan-out (the paper's N is fan-in, 9·64).

Shapes for a 3×256×256 input (N omitted)::

    inc    64×256×256 ─────────────────────────────────────────────┐ skip
    down1 128×128×128 ─────────────────────────────────────┐       │
    down2 256×64×64   ─────────────────────────────┐       │       │
    down3 512×32×32   ─────────────────────┐       │       │       │
    down4 1024×16×16 → up1 512×32×32 → up2 256×64×64 → up3 128×128×128 → up4 64×256×256 → head 1×256×256
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_norm_relu(in_ch: int, out_ch: int, norm: str) -> list[nn.Module]:
    layers = [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=norm == "none")]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


class DoubleConv(nn.Sequential):
    """(3×3 conv → [BN] → ReLU) × 2: the paper's basic unit."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch"):
        super().__init__(*conv_norm_relu(in_ch, out_ch, norm), *conv_norm_relu(out_ch, out_ch, norm))


class Down(nn.Sequential):
    """2×2 max-pool, then DoubleConv: halves the size."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch"):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch, norm))


class Up(nn.Module):
    """2×2 transposed conv (halves the channels, doubles the size), concatenate the skip, DoubleConv."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch"):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, in_ch // 2, kernel_size=2, stride=2)
        # the skip has out_ch channels: it is the encoder level of the size this block makes
        self.conv = DoubleConv(in_ch // 2 + out_ch, out_ch, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """The classic UNet: 64→1024 channels, 4 down and 4 up steps, 1-channel logits at full size."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base: int = 64, norm: str = "batch",
                 deep_supervision: bool = False):
        super().__init__()
        c = [base * 2**i for i in range(5)]          # 64, 128, 256, 512, 1024
        self.inc = DoubleConv(in_channels, c[0], norm)
        self.down1 = Down(c[0], c[1], norm)
        self.down2 = Down(c[1], c[2], norm)
        self.down3 = Down(c[2], c[3], norm)
        self.down4 = Down(c[3], c[4], norm)
        self.up1 = Up(c[4], c[3], norm)
        self.up2 = Up(c[3], c[2], norm)
        self.up3 = Up(c[2], c[1], norm)
        self.up4 = Up(c[1], c[0], norm)
        self.head = nn.Conv2d(c[0], out_channels, kernel_size=1)
        # Deep supervision (Lee et al., 2015): 1×1 heads on up1..up3 give the decoder's inner
        # blocks a direct gradient from the mask, for a network that underfits a short budget.
        # Training only; inference uses the final head alone.
        self.aux_heads = (nn.ModuleList(nn.Conv2d(ch, out_channels, 1) for ch in c[3:0:-1])
                          if deep_supervision else None)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        check_input_size(x)
        x1 = self.inc(x)        # 64  × H    × W
        x2 = self.down1(x1)     # 128 × H/2  × W/2
        x3 = self.down2(x2)     # 256 × H/4
        x4 = self.down3(x3)     # 512 × H/8
        x5 = self.down4(x4)     # 1024× H/16
        u1 = self.up1(x5, x4)   # 512 × H/8
        u2 = self.up2(u1, x3)   # 256 × H/4
        u3 = self.up3(u2, x2)   # 128 × H/2
        logits = self.head(self.up4(u3, x1))    # 64 × H → 1 × H × W logits
        if self.aux_heads is None or not self.training:
            return logits
        # training with deep supervision: also 1 × H × W logits from the H/8, H/4, H/2 blocks
        return logits, [to_input_size(head(u), x) for head, u in zip(self.aux_heads, (u1, u2, u3))]


def to_input_size(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Logits from a coarser map, upsampled bilinearly to the input's H×W (as they are if equal)."""
    if logits.shape[-2:] == x.shape[-2:]:
        return logits
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def check_input_size(x: torch.Tensor, multiple: int = 32) -> None:
    """H and W divisible by 32, so that every skip lines up: ResNet34-UNet halves the size 5 times
    (UNet 4, which would do with 16; one rule for both keeps a run's size valid for either)."""
    if x.dim() != 4:
        raise ValueError(f"expected a batch N×C×H×W, got a tensor of shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(f"input size {h}×{w} is not divisible by {multiple}; resize or pad to e.g. "
                         f"{max(multiple, round(h / multiple) * multiple)}×{max(multiple, round(w / multiple) * multiple)}")


def init_weights(model: nn.Module) -> None:
    """He initialisation for ReLU networks trained from scratch; BN starts as identity."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
