import pytest
import torch

from labseg.config import RunConfig
from labseg.models import MODELS, OWN_MODELS, build_model, count_parameters, model_kwargs
from labseg.models.resnet34_unet import BasicBlock, SCSE
from labseg.models.unet import check_input_size

try:
    import segmentation_models_pytorch as smp
except ImportError:      # the optional `bench` extra; `make test` installs it
    smp = None
NEEDS_SMP = pytest.mark.skipif(smp is None, reason="segmentation_models_pytorch (the bench extra) is not installed")
ALL_MODELS = [pytest.param(name, marks=NEEDS_SMP) if name not in OWN_MODELS else name for name in sorted(MODELS)]


@pytest.mark.parametrize("arch", ALL_MODELS)
@pytest.mark.parametrize("size", [64, 128, 256])
def test_output_is_one_channel_logits_at_input_size(arch, size):
    model = build_model(arch).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1, size, size)
    assert torch.isfinite(out).all()


def test_non_square_input_divisible_by_32():
    with torch.inference_mode():
        out = build_model("resnet34_unet").eval()(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 1, 64, 96)


@pytest.mark.parametrize("arch", OWN_MODELS)   # smp's Unet resizes inside its decoder instead
def test_size_not_divisible_by_32_is_a_clear_error(arch):
    with pytest.raises(ValueError, match=r"100×100 is not divisible by 32"):
        build_model(arch)(torch.randn(1, 3, 100, 100))


def test_parameter_counts():
    # UNet as in the paper (64→1024, transposed convs) + BatchNorm: the well-known ~31.0M.
    assert count_parameters(build_model("unet")) == 31_037_633
    # Without BatchNorm (the paper's form): 2 parameters fewer per channel of each of the 18 BNs,
    # conv biases added instead (1 per channel).
    assert count_parameters(build_model("unet", norm="none")) == 31_031_745
    # ResNet34 encoder (21.28M without its classifier) + the lean 4-block decoder.
    model = build_model("resnet34_unet")
    assert count_parameters(model.encoder) == 21_284_672
    assert count_parameters(model) == 24_429_537


def test_encoder_is_resnet34():
    enc = build_model("resnet34_unet").encoder
    assert [len(layer) for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4)] == [3, 4, 6, 3]
    assert enc.stem[0].kernel_size == (7, 7) and enc.stem[0].stride == (2, 2)
    # projection shortcuts where the shape changes, identity elsewhere
    assert enc.layer1[0].shortcut is None
    assert all(layer[0].shortcut is not None for layer in (enc.layer2, enc.layer3, enc.layer4))
    feats = enc(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]


def test_output_stride_16_runs_every_stage_at_twice_the_resolution_with_the_same_encoder():
    config = RunConfig(arch="resnet34_unet", output_stride=16, deep_supervision=False).with_recipe().validate()
    dense, plain = build_model("resnet34_unet", **model_kwargs(config)), build_model("resnet34_unet")
    # the encoder's weights are ResNet34's either way; only the max-pool is gone
    assert dense.encoder.state_dict().keys() == plain.encoder.state_dict().keys()
    assert isinstance(dense.encoder.maxpool, torch.nn.Identity)
    feats = dense.encoder(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    # three decoder blocks (skips layer3, layer2, layer1) and the head on the H/2 map of 64 channels
    assert len(dense.decoder.blocks) == 3 and dense.head.in_channels == 64
    dense.eval()
    with torch.inference_mode():
        out = dense(torch.randn(2, 3, 96, 64))
    assert out.shape == (2, 1, 96, 64) and torch.isfinite(out).all()
    dense.train()
    dense(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert dense.encoder.stem[0].weight.grad.abs().sum() > 0       # the stem still learns
    with pytest.raises(ValueError, match="output_stride=8 is not valid; choose one of: 32, 16"):
        build_model("resnet34_unet", output_stride=8)


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError, match="choose one of: unet, resnet34_unet, smp_unet_resnet34"):
        build_model("vgg")


@NEEDS_SMP
def test_the_peer_is_smps_unet_resnet34_as_smp_builds_it():
    peer, reference = build_model("smp_unet_resnet34"), smp.Unet("resnet34", encoder_weights=None, classes=1)
    assert type(peer) is type(reference)
    assert {k: v.shape for k, v in peer.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert count_parameters(peer) == count_parameters(reference) > count_parameters(build_model("resnet34_unet"))
    with pytest.raises(ValueError, match="takes no options; got deep_supervision=True"):
        build_model("smp_unet_resnet34", deep_supervision=True)


def test_the_peer_without_smp_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)    # import now raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"needs segmentation_models_pytorch.*pip install -e '\.\[bench\]'"):
        build_model("smp_unet_resnet34")


def test_no_weights_are_downloaded(monkeypatch):
    import torch.hub

    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    for name in MODELS if smp is not None else OWN_MODELS:
        build_model(name)


def test_stochastic_depth_drops_branches_in_training_only():
    from torchvision.ops import StochasticDepth

    plain, dropped = build_model("resnet34_unet"), build_model("resnet34_unet", drop_path=0.3)
    assert plain.state_dict().keys() == dropped.state_dict().keys()   # same checkpoints
    rates = [m.p for m in dropped.modules() if isinstance(m, StochasticDepth)]
    # the linear rule over all 16 blocks in order, layer1's first (rate 0) without a module
    assert rates == pytest.approx([0.3 * i / 15 for i in range(1, 16)])
    assert not any(isinstance(m, StochasticDepth) for m in plain.modules())
    for m in dropped.modules():       # non-zero residual branches, so that dropping one shows
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    x = torch.randn(4, 3, 64, 64)
    dropped.eval()
    with torch.no_grad():
        assert torch.equal(dropped(x), dropped(x))
        dropped.train()
        torch.manual_seed(0)
        a = dropped(x)
        torch.manual_seed(1)
        b = dropped(x)
    assert not torch.allclose(a, b)


def test_scse_decoder_starts_as_the_plain_network_and_its_gates_learn():
    config = RunConfig(arch="resnet34_unet", decoder_attention="scse", deep_supervision=False).with_recipe().validate()
    attended, plain = build_model("resnet34_unet", **model_kwargs(config)), build_model("resnet34_unet")
    gates = [m for m in attended.modules() if isinstance(m, SCSE)]
    assert len(gates) == 8                          # before and after each of the 4 decoder blocks
    assert not any(isinstance(m, SCSE) for m in plain.modules())
    keys = attended.load_state_dict(plain.state_dict(), strict=False)   # share all other weights
    assert not keys.unexpected_keys and keys.missing_keys
    assert all(".attention" in k for k in keys.missing_keys)
    x = torch.randn(2, 3, 64, 64)
    attended.eval(), plain.eval()
    with torch.no_grad():
        expected = plain(x)
        assert expected.abs().max() > 0
        assert torch.allclose(attended(x), expected, atol=1e-6)     # gates at 0.5 + 0.5: identity
    attended.train()
    attended(x).square().mean().backward()
    for gate in gates:                              # both branches of every gate get a gradient
        assert gate.cse[3].weight.grad.abs().sum() > 0
        assert gate.sse[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="decoder_attention='se' is not valid"):
        build_model("resnet34_unet", decoder_attention="se")


# arch → the decoder block nearest the bottleneck, which the coarsest aux head must reach
FIRST_DECODER_CONV = {"resnet34_unet": lambda m: m.decoder.blocks[0].conv1[0].weight,
                      "unet": lambda m: m.up1.conv[0].weight}


@pytest.mark.parametrize("arch", sorted(FIRST_DECODER_CONV))
def test_deep_supervision_adds_training_only_heads(arch):
    config = RunConfig(arch=arch, deep_supervision=True).with_recipe().validate()
    supervised, plain = build_model(arch, **model_kwargs(config)), build_model(arch)
    keys = supervised.load_state_dict(plain.state_dict(), strict=False)   # share all other weights
    assert not keys.unexpected_keys and keys.missing_keys
    assert all(k.startswith("aux_heads.") for k in keys.missing_keys)
    x = torch.randn(2, 3, 64, 64)
    supervised.eval(), plain.eval()
    with torch.no_grad():                           # inference: the plain network's logits, heads unused
        assert torch.equal(supervised(x), plain(x))
    supervised.train()
    logits, aux = supervised(x)
    assert logits.shape == (2, 1, 64, 64)
    assert [a.shape for a in aux] == [(2, 1, 64, 64)] * 3      # from the three inner decoder blocks
    sum(a.square().mean() for a in aux).backward()
    for head in supervised.aux_heads:               # every head, and the decoder below it, learns
        assert head.weight.grad.abs().sum() > 0
    assert FIRST_DECODER_CONV[arch](supervised).grad.abs().sum() > 0
    assert supervised.head.weight.grad is None      # the aux terms alone do not reach the final head


def test_resnet34_unet_decoder_output_stays_a_tensor_with_deep_supervision():
    model = build_model("resnet34_unet", deep_supervision=True).eval()
    with torch.no_grad():                           # what feature-map hooks see
        assert torch.is_tensor(model.decoder(model.encoder(torch.randn(1, 3, 64, 64))))


def test_basic_block_adds_the_shortcut_then_applies_relu():
    """ResNet's BasicBlock is relu(branch(x) + x). With its last BN scaled to 0 the branch adds
    nothing, so in eval mode (running mean 0, var 1, shift 0) the block is relu(x): −1 → 0, 2 → 2."""
    block = BasicBlock(2, 2).eval()
    torch.nn.init.zeros_(block.bn2.weight)
    x = torch.tensor([-1.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3)
    with torch.inference_mode():
        out = block(x)
    torch.testing.assert_close(out, torch.tensor([0.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3))


def test_resnet34_unet_starts_with_every_residual_branch_zeroed():
    """Goyal et al. (2017): the last BN of each of the 16 residual branches starts at scale 0, so a
    fresh block without a projection is relu(x), i.e. x itself for the non-negative maps it gets."""
    enc = build_model("resnet34_unet").encoder
    blocks = [b for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4) for b in layer]
    assert len(blocks) == 16 and all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    x = torch.rand(1, 64, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(enc.layer1[1].eval()(x), x)


def test_resnet_max_pool_is_3x3_stride_2_padding_1():
    """A lone maximum at pixel (1, 1) of a 4×4 map: 3×3 windows at stride 2, padded by 1, are
    centred on pixels 0 and 2 of each axis and all four cover pixel 1, so all four outputs are
    it (a 2×2 pool would give it to output (0, 0) only)."""
    pool = build_model("resnet34_unet").encoder.maxpool
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 5.0
    torch.testing.assert_close(pool(x), torch.full((1, 1, 2, 2), 5.0))


def test_input_width_not_divisible_by_32_is_refused_too():
    # 64 is fine, 100 is not; the nearest multiple of 32 to 100 is round(100/32)·32 = 96
    with pytest.raises(ValueError, match=r"input size 64×100 is not divisible by 32; resize or pad to e.g. 64×96"):
        check_input_size(torch.zeros(1, 3, 64, 100))
    with pytest.raises(ValueError, match=r"100×64 is not divisible by 32"):
        check_input_size(torch.zeros(1, 3, 100, 64))
    check_input_size(torch.zeros(1, 3, 64, 96))
