"""ResNet34-UNet: a ResNet34 encoder (He et al., 2016) with a UNet decoder, trained from scratch.

Encoder, decoder and head are separate modules (as in segmentation_models_pytorch), so either
side can be swapped or inspected on its own.

Shapes for a 3×256×256 input (N omitted)::

    encoder  stem   64×128×128 (7×7 conv, stride 2) ──────────────────────────┐ skips
             layer1 64×64×64   (max-pool, 3 BasicBlocks) ─────────────────┐  │
             layer2 128×32×32  (4 BasicBlocks) ──────────────────────┐    │  │
             layer3 256×16×16  (6 BasicBlocks) ─────────────────┐    │    │  │
             layer4 512×8×8    (3 BasicBlocks)                  │    │    │  │
    decoder  512×8×8 → 256×16×16 → 128×32×32 → 64×64×64 → 32×128×128
    head     1×128×128 logits (3×3 conv) → bilinear ×2 → 1×256×256

A lean decoder, by measurement: segmentation_models_pytorch's Unet adds a fifth block of two
3×3 convs at full resolution (16 channels at 256×256). On a CPU those full-size convs, norms and
activations cost about 30% of a training step while adding little to a mask that is smooth
at that scale, so this decoder stops at H/2 and upsamples the logits bilinearly. The measured
effect is in ``docs/benchmarks.md`` (``labseg bench``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from labseg.config import DECODER_ATTENTIONS, OUTPUT_STRIDES, check_choice
from labseg.models.unet import check_input_size, init_weights, to_input_size


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convs with an identity shortcut, or a 1×1 projection when the shape changes.

    ``drop_path`` > 0: stochastic depth (Huang et al., 2016), the residual branch of a training
    sample is dropped with that probability, a regulariser for training from scratch on little data.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.drop_path(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class ResNet34Encoder(nn.Module):
    """ResNet34 without its classifier; returns the feature map of every stage.

    ``drop_path``: stochastic depth of the last block, rising linearly from 0 over the 16 blocks.
    ``output_stride``: 32 is ResNet's own layout; 16 leaves out the max-pool, so layer1..layer4
    run at twice the resolution (H/2 … H/16): the same weights at 3.9× the encoder's FLOPs (9.3
    against 2.4 GFLOP at 128 px; 13.0 against 3.7 for the whole network, whose train step on an
    AMX CPU in bf16 is 1.75× slower). On 128 px inputs layer4 then sees 8×8 cells instead of 4×4.
    """

    channels = (64, 64, 128, 256, 512)      # stem, layer1..layer4
    blocks = (3, 4, 6, 3)

    def __init__(self, in_channels: int = 3, drop_path: float = 0.0, output_stride: int = 32):
        super().__init__()
        check_choice("output_stride", output_stride, OUTPUT_STRIDES)
        # stochastic depth per block, 16 of them: the linear rule of Huang et al., 0 for the first;
        # each layer takes the next ones, in order
        n = sum(self.blocks)
        rates = iter([drop_path * i / (n - 1) for i in range(n)])
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if output_stride == 32 else nn.Identity()
        self.in_ch = 64
        self.layer1 = self._make_layer(64, self.blocks[0], rates=rates)
        self.layer2 = self._make_layer(128, self.blocks[1], stride=2, rates=rates)
        self.layer3 = self._make_layer(256, self.blocks[2], stride=2, rates=rates)
        self.layer4 = self._make_layer(512, self.blocks[3], stride=2, rates=rates)

    def _make_layer(self, out_ch: int, blocks: int, stride: int = 1, rates=None) -> nn.Sequential:
        """``blocks`` BasicBlocks; the first changes the width (and halves the size when stride=2).
        ``rates``: an iterator of drop-path rates, one taken per block (none: 0)."""
        rates = [next(rates) for _ in range(blocks)] if rates is not None else [0.0] * blocks
        layers = [BasicBlock(self.in_ch, out_ch, stride, rates[0])]
        self.in_ch = out_ch
        layers += [BasicBlock(out_ch, out_ch, drop_path=rate) for rate in rates[1:]]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s0 = self.stem(x)                    # 64  × H/2
        s1 = self.layer1(self.maxpool(s0))   # 64  × H/4   (H/2 with output_stride 16, as below)
        s2 = self.layer2(s1)                 # 128 × H/8   (H/4)
        s3 = self.layer3(s2)                 # 256 × H/16  (H/8)
        s4 = self.layer4(s3)                 # 512 × H/32  (H/16)
        return [s0, s1, s2, s3, s4]


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze & excitation (Roy et al., 2018): x·cSE(x) + x·sSE(x).

    cSE re-weights channels from the global average of each, sSE re-weights pixels from a 1×1
    conv over the channels. The last conv of each gate starts at zero, so both gates start at
    0.5 and the module at the identity.
    """

    def __init__(self, ch: int, reduction: int = 16):
        super().__init__()
        hidden = max(ch // reduction, 1)
        self.cse = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, hidden, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, ch, 1), nn.Sigmoid())
        self.sse = nn.Sequential(nn.Conv2d(ch, 1, 1), nn.Sigmoid())

    def reset_gates(self) -> None:
        for conv in (self.cse[3], self.sse[0]):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cse(x) + x * self.sse(x)


class DecoderBlock(nn.Module):
    """Upsample ×2 (nearest), concatenate the skip, then 3×3 conv → BN → ReLU, twice.

    ``attention=True``: scSE on the concatenated input and on the output, as
    segmentation_models_pytorch's ``decoder_attention_type="scse"`` places it.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, attention: bool = False):
        super().__init__()
        self.attention1 = SCSE(in_ch + skip_ch) if attention else nn.Identity()
        self.conv1 = nn.Sequential(conv3x3(in_ch + skip_ch, out_ch), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(conv3x3(out_ch, out_ch), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))
        self.attention2 = SCSE(out_ch) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")     # to the skip's size
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.attention2(self.conv2(self.conv1(self.attention1(x))))


class UNetDecoder(nn.Module):
    """UNet decoder over the encoder's stages: one block per skip, coarse to fine.

    From the deepest map (512 × H/32), each block doubles the size and joins the skip of that
    size, giving 256 × H/16, 128 × H/8, 64 × H/4 and 32 × H/2 with the default channels. It stops at
    H/2, the stem's size (there is no full-size skip); the head's logits are upsampled ×2. A fifth
    channel count adds a block at full size with no skip, as segmentation_models_pytorch's Unet
    has (``labseg bench`` measures that variant).
    """

    def __init__(self, encoder_channels=(64, 64, 128, 256, 512), channels=(256, 128, 64, 32),
                 attention: bool = False):
        super().__init__()
        skips = [*encoder_channels[:-1][::-1], 0]           # 256, 128, 64, 64 (then none at full size)
        ins = [encoder_channels[-1], *channels[:-1]]        # 512, 256, 128, 64
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o, attention) for i, s, o in zip(ins, skips, channels))

    def forward(self, features: list[torch.Tensor], all_blocks: bool = False):
        """The last block's output; with ``all_blocks``, every block's output, coarse to fine."""
        x, skips = features[-1], features[:-1][::-1]
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
            outs.append(x)
        return outs if all_blocks else x


class ResNet34UNet(nn.Module):
    """ResNet34 encoder → UNet decoder → 3×3 head: N×3×H×W images to N×1×H×W logits.

    The decoder ends at H/2 and the head's logits are upsampled ×2 (bilinear) to the input size.
    With ``output_stride=16`` the stem's output (H/2) is not a skip: layer1 has that size too.
    The decoder then has three blocks (H/8, H/4, H/2: 256, 128, 64 channels) and the head reads
    the H/2 map, as with the default layout.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1,
                 decoder_channels=(256, 128, 64, 32), drop_path: float = 0.0,
                 decoder_attention: str = "none", deep_supervision: bool = False,
                 output_stride: int = 32):
        super().__init__()
        check_choice("decoder_attention", decoder_attention, DECODER_ATTENTIONS)
        self.encoder = ResNet34Encoder(in_channels, drop_path, output_stride)
        # output_stride 16: the stem's map (H/2) is as coarse as layer1's, so it is no skip and
        # the decoder needs one block fewer to reach H/2
        self.skip_from = 0 if output_stride == 32 else 1
        if self.skip_from:
            decoder_channels = tuple(decoder_channels[:-1])
        self.decoder = UNetDecoder(ResNet34Encoder.channels[self.skip_from:], decoder_channels,
                                   decoder_attention == "scse")
        self.head = nn.Conv2d(decoder_channels[-1], out_channels, 3, padding=1)
        # Deep supervision (Lee et al., 2015): a 1×1 head on each inner decoder block gives those
        # blocks a direct gradient from the mask. Used in training only; inference ignores them.
        self.aux_heads = (nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in decoder_channels[:-1])
                          if deep_supervision else None)
        init_weights(self)
        for m in self.modules():                  # zero-init the last BN of each residual branch:
            if isinstance(m, BasicBlock):         # blocks start as identities (Goyal et al., 2017)
                nn.init.zeros_(m.bn2.weight)
            elif isinstance(m, SCSE):             # so do the attention gates (init_weights' He
                m.reset_gates()                   # init would saturate the 1-channel sSE gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        check_input_size(x)                              # 3 × H × W, H and W multiples of 32
        features = self.encoder(x)[self.skip_from:]      # 64 × H/2, 64 × H/4, … 512 × H/32
        if self.aux_heads is None or not self.training:
            decoded = self.decoder(features)             # 32 × H/2
            return to_input_size(self.head(decoded), x)  # 1 × H/2 → 1 × H × W
        # training with deep supervision: also 1 × H × W logits from the inner blocks
        # (H/16, H/8, H/4 with output_stride 32)
        blocks = self.decoder(features, all_blocks=True)
        aux = [to_input_size(head(b), x) for head, b in zip(self.aux_heads, blocks)]
        return to_input_size(self.head(blocks[-1]), x), aux
