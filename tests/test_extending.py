"""Adding a network or a loss of one's own: labseg.models.register_model, losses.register_loss,
$LABSEG_PLUGINS; and a network that cannot train failing before it leaves a run folder."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from labseg import config
from labseg.config import ConfigError, RunConfig
from labseg.evaluate import evaluate_run
from labseg.losses import bce, register_loss
from labseg.models import MODELS, register_model
from labseg.train import fit


class TinyNet(nn.Module):
    """Two convolutions, one 2× pooling and back: the least a registered network must do."""

    def __init__(self, width: int = 8, deep_supervision: bool = False):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2))
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(width, 1, 3, padding=1))
        self.aux = nn.Conv2d(width, 1, 1) if deep_supervision else None

    def forward(self, x):
        h = self.down(x)
        logits = self.up(h)
        if self.aux is not None and self.training:
            return logits, [nn.functional.interpolate(self.aux(h), size=x.shape[-2:])]
        return logits


class HalfSize(TinyNet):
    def forward(self, x):
        return self.down(x)[:, :1]          # N×1×S/2×S/2: forgot to upsample


@pytest.fixture
def tiny(synthetic_root, tmp_path):
    return dict(data_dir=str(synthetic_root), img_size=32, batch_size=4, max_train_images=8, epochs=1,
                output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), progress=False)


def test_a_registered_network_and_loss_train_evaluate_and_resume(registry, tiny):
    register_model("tiny_net", TinyNet, recipe=dict(lr=3e-3, batch_size=4, deep_supervision=True),
                   options=("deep_supervision",))
    register_loss("half_bce", lambda logits, target, valid: 0.5 * bce(logits, target, valid))
    c = RunConfig(arch="tiny_net").with_recipe().validate()
    assert (c.lr, c.batch_size, c.deep_supervision, c.loss) == (3e-3, 4, True, "bce_dice")
    result = fit(arch="tiny_net", loss="half_bce", run_name="t", **tiny)
    assert result.summary["arch"] == "tiny_net" and result.run.read_config().loss == "half_bce"
    assert isinstance(result.model, TinyNet) and result.model.aux is not None    # the option reached it
    # by name from a runs folder other than outputs/runs, as the CLI's --output-dir does
    scores = evaluate_run("t", output_dir=tiny["output_dir"], progress=False, save=False)
    assert 0.0 <= scores["dice"] <= 1.0
    with pytest.raises(ConfigError, match="batch_size=0: expected a positive integer"):
        evaluate_run(result.run, batch_size=0, progress=False, save=False)
    again = fit({"arch": "tiny_net", "run_name": "t"}, resume=True, **{**tiny, "epochs": 2})   # a dict works too
    assert [r["epoch"] for r in again.history] == [1, 2]


def test_registration_mistakes_are_named(registry):
    with pytest.raises(ConfigError, match="recipe of 'tiny_net' sets deep_supervision=True, but deep_supervision "
                                          "is not in its options"):
        register_model("tiny_net", TinyNet, recipe=dict(deep_supervision=True))
    with pytest.raises(ConfigError, match=r"recipe of 'tiny_net' has unknown field\(s\) \['learning_rate'\]"):
        register_model("tiny_net", TinyNet, recipe=dict(learning_rate=1e-3))
    with pytest.raises(ConfigError, match="'unet' is one of labseg's networks"):
        register_model("unet", TinyNet)
    with pytest.raises(ConfigError, match="register_model option='depth' is not valid; choose one of: norm"):
        register_model("tiny_net", TinyNet, options=("depth",))
    assert "tiny_net" not in config.ARCHS and "tiny_net" not in MODELS
    with pytest.raises(ConfigError, match="arch='tiny_net' is not valid; choose one of: unet, resnet34_unet"):
        RunConfig(arch="tiny_net").with_recipe()
    register_model("tiny_net", TinyNet)
    with pytest.raises(ConfigError, match="deep_supervision=True is for unet and resnet34_unet; tiny_net has no"):
        RunConfig(arch="tiny_net", deep_supervision=True).with_recipe().validate()


def test_a_network_with_the_wrong_output_fails_before_it_claims_a_folder(registry, tiny, tmp_path):
    register_model("half_size", HalfSize)
    with pytest.raises(ConfigError, match=r"network 'half_size' returned 1×1×16×16 for a 1×3×32×32 batch in eval "
                                          r"mode; expected 1×1×32×32 logits"):
        fit(arch="half_size", run_name="h", **tiny)
    assert not (tmp_path / "runs" / "h").exists()


class FailsOnPhotos(nn.Module):
    """Passes the checks before a run claims its folder (they feed it zeros), fails on real images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        if self.training and bool(x.abs().sum() > 0):
            raise RuntimeError("this network cannot train on photos")
        return self.conv(x)


def test_a_run_that_dies_in_its_first_step_leaves_no_folder(registry, tiny, tmp_path):
    """A network that dies in the first step of training: the folder the run claimed goes, so the
    same command can be run again as it is."""
    register_model("fails_on_photos", FailsOnPhotos)
    with pytest.raises(RuntimeError, match="this network cannot train on photos"):
        fit(arch="fails_on_photos", run_name="one", **tiny)
    assert not (tmp_path / "runs" / "one").exists()


def test_plugins_named_in_the_environment_register_in_every_process(tmp_path):
    (tmp_path / "my_nets.py").write_text(
        "from torch import nn\nfrom labseg.models import register_model\n"
        "register_model('one_conv', lambda: nn.Conv2d(3, 1, 1))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "LABSEG_PLUGINS": "my_nets"}
    code = "from labseg.config import RunConfig; print(RunConfig(arch='one_conv').with_recipe().validate().lr)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "0.001", out.stderr
    out = subprocess.run([sys.executable, "-c", code], env={**env, "LABSEG_PLUGINS": "no_such_module"},
                         capture_output=True, text=True)
    assert out.returncode == 1 and "LABSEG_PLUGINS names 'no_such_module', which cannot be imported" in out.stderr


def test_the_check_of_a_networks_output_passes_labsegs_own():
    from labseg.models import build_model
    from labseg.train import check_logits

    for arch in ("unet", "resnet34_unet"):
        model = build_model(arch, deep_supervision=True).train()
        check_logits(model, arch, 32, torch.device("cpu"))
        assert model.training                     # left in the mode it was in


class TupleInTraining(TinyNet):
    """Returns (logits, [aux]) in training without registering deep_supervision."""

    def forward(self, x):
        logits = self.up(self.down(x))
        return (logits, [logits]) if self.training else logits


class SqueezedInTraining(TinyNet):
    def forward(self, x):
        logits = self.up(self.down(x))
        return logits[:, 0] if self.training else logits      # N×S×S: the channel dropped


class BatchMean(TinyNet):
    def forward(self, x):
        return self.up(self.down(x)).mean(0, keepdim=True)    # one output for the whole batch


class NeedsWidth(TinyNet):
    def __init__(self, width: int):
        super().__init__(width)


@pytest.mark.parametrize("net, expected", [
    (TupleInTraining, r"network 'bad' returned a tuple for a 2×3×32×32 batch in training mode; expected 2×1×32×32 "
                      r"logits \(a network returns \(logits, \[aux logits\]\) in training only with deep_supervision"),
    (SqueezedInTraining, r"network 'bad' returned 2×32×32 for a 2×3×32×32 batch in training mode; expected "
                         r"2×1×32×32 logits"),
    (BatchMean, r"network 'bad' returned 1×1×32×32 for a 2×3×32×32 batch in training mode"),
])
def test_a_network_whose_training_output_cannot_train_fails_before_it_claims_a_folder(registry, tiny, tmp_path,
                                                                                       net, expected):
    register_model("bad", net)
    with pytest.raises(ConfigError, match=expected):
        fit(arch="bad", run_name="b", **tiny)
    assert not (tmp_path / "runs" / "b").exists()


@pytest.mark.parametrize("loss, expected", [
    (lambda logits, target, valid: nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none"),
     r"loss 'mine' returned a tensor of shape 2×1×32×32 \(torch.float32\) for a batch of 2; expected one number"),
    (lambda logits, target, valid: 0.5, r"loss 'mine' returned a float for a batch of 2; expected one number"),
    (lambda logits, target, valid: bce(logits, target, valid).detach(), r"loss 'mine' returned a number with no "
                                                                        r"gradient"),
    (lambda logits, target, valid: bce(logits, target, valid) * float("nan"), r"loss 'mine' returned nan for "
                                                                              r"'tiny_net''s first output"),
])
def test_a_loss_that_cannot_train_is_named_before_the_run_claims_a_folder(registry, tiny, tmp_path, loss, expected):
    register_model("tiny_net", TinyNet)
    register_loss("mine", loss)
    with pytest.raises(ConfigError, match=expected):
        fit(arch="tiny_net", loss="mine", run_name="l", **tiny)
    assert not (tmp_path / "runs" / "l").exists()


def test_a_loss_that_turns_nan_in_the_first_step_says_nothing_was_kept(registry, tiny, tmp_path):
    from labseg.train import TrainingDiverged

    calls = {"n": 0}

    def nan_after_the_check(logits, target, valid):
        calls["n"] += 1
        return bce(logits, target, valid) * (float("nan") if calls["n"] > 1 else 1.0)

    register_model("tiny_net", TinyNet)
    register_loss("nan_later", nan_after_the_check)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, step 1; training stopped. No epoch had "
                                               r"finished, so nothing is kept"):
        fit(arch="tiny_net", loss="nan_later", run_name="n", **tiny)
    assert not (tmp_path / "runs" / "n").exists()


def test_more_registration_mistakes_are_named(registry, tmp_path):
    with pytest.raises(ConfigError, match=r"recipe of 'tiny_net' sets \['img_size', 'monitor'\], which a recipe "
                                          r"cannot: they have defaults of their own"):
        register_model("tiny_net", TinyNet, recipe=dict(lr=1e-3, img_size=64, monitor="valid_loss"))
    with pytest.raises(ConfigError, match=r"builder for 'tiny_net' is a network already built \(TinyNet\); pass "
                                          r"its class"):
        register_model("tiny_net", TinyNet())
    from labseg.models import build_model
    register_model("needs_width", NeedsWidth)
    with pytest.raises(ConfigError, match=r"network 'needs_width': its builder 'NeedsWidth' cannot be called with "
                                          r"no arguments \(missing a required argument: 'width'\)"):
        build_model("needs_width")
    register_model("pair", lambda: (TinyNet(), "extra"))
    with pytest.raises(ConfigError, match=r"network 'pair': its builder returned a tuple; expected an nn.Module"):
        build_model("pair")
    with pytest.raises(ConfigError, match="register_loss: 'bce' is one of labseg's losses; pick another name"):
        register_loss("bce", lambda logits, target, valid: (logits * 0).sum())
    with pytest.raises(ConfigError, match=r"register_loss: name 'MyLoss': expected lower-case letters"):
        register_loss("MyLoss", bce)
    assert "MyLoss" not in config.LOSSES
    # a record of a network or loss this process has not registered says how to register it;
    # a name typed now is a typo, and gets the choices alone
    import json

    from labseg.runs import RunDir, RunRecordError
    for field, record, expected in (("arch", {"arch": "not_here"}, r"register_model in this process.*LABSEG_PLUGINS"),
                                    ("loss", {"arch": "unet", "loss": "not_here"}, r"register_loss.*LABSEG_PLUGINS")):
        (tmp_path / field).mkdir()
        (tmp_path / field / "config.json").write_text(json.dumps(record))
        with pytest.raises(RunRecordError, match=rf"config.json: {field}='not_here' is not valid; .*{expected}"):
            RunDir(tmp_path / field).read_config()
    with pytest.raises(ConfigError, match=r"choose one of: unet, resnet34_unet, smp_unet_resnet34, needs_width, pair$"):
        RunConfig(arch="unett").validate()
