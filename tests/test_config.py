import re
from pathlib import Path

import pytest

from labseg.config import ConfigError, RunConfig, parse_duration, resolve_path, PROJECT_ROOT


def test_recipe_fills_only_missing_fields():
    c = RunConfig(arch="unet", lr=0.01).with_recipe().validate()
    assert c.lr == 0.01
    assert c.epochs and c.batch_size and c.loss and c.optimizer and c.scheduler


@pytest.mark.parametrize("field,value,expected", [
    ("arch", "vgg", "arch='vgg' is not valid; choose one of: unet, resnet34_unet"),
    ("loss", "hinge", "choose one of: bce, dice, bce_dice, tversky, focal, lovasz, bce_lovasz"),
    ("optimizer", "rmsprop", "choose one of: adam, adamw, sgd"),
    ("scheduler", "step", "choose one of: cosine, onecycle, plateau, none"),
    ("augment", "max", "choose one of: none, flip, light, strong, color"),
    ("drop_path", 1.0, "drop_path=1.0: expected a probability in [0, 1)"),
    ("swa", 1.0, "swa=1.0: expected the fraction of training where weight averaging starts"),
    ("sam", -0.05, "sam=-0.05: expected the radius rho in [0, 1]"),
    ("mosaic", 1.5, "mosaic=1.5: expected a probability in [0, 1]"),
    ("mosaic_until", -0.1, "mosaic_until=-0.1: expected a fraction of training in [0, 1] (1 = mosaics to the end)"),
    ("mosaic_background", 1.5, "mosaic_background=1.5: expected a probability in [0, 1] (0 = every mosaic quarter is a whole sample)"),
    ("low_res_scale", 1.5, "low_res_scale=1.5: expected a share of img_size in [0, 1], e.g. 0.75"),
    ("low_res_scale", "96", "low_res_scale='96'"),
    ("low_res_until", 2, "low_res_until=2: expected a fraction of training in [0, 1]"),
    ("elastic", 0.5, "elastic=0.5: expected the std of the elastic shifts as a share of the image side in [0, 0.25], e.g. 0.03 (0 = off)"),
    ("checkpoint_every", -1, "checkpoint_every=-1: expected seconds >= 0 between writes of last.pt, e.g. 60 (0 = after every epoch)"),
    ("decoder_attention", "cbam", "decoder_attention='cbam' is not valid; choose one of: none, scse"),
    ("output_stride", 8, "output_stride=8 is not valid; choose one of: 32, 16"),
    ("lr", 0, "lr=0: expected a positive number"),
    ("lr", -1e-3, "lr=-0.001"),
    ("epochs", 0, "epochs=0: expected a positive integer"),
    ("batch_size", -4, "batch_size=-4: expected a positive integer"),
    ("epochs", 2.5, "epochs=2.5"),
    ("img_size", 100, "img_size=100: must be divisible by 32 (ResNet34-UNet halves the size 5 times, UNet 4; one rule for both); try 96 or 128"),
    ("img_size", 0, "img_size=0: expected a positive size in px divisible by 32, e.g. 128"),
    ("img_size", 20, "img_size=20: must be divisible by 32 (ResNet34-UNet halves the size 5 times, UNet 4; one rule for both); try 32"),
    ("time_budget", "soon", "time_budget='soon'"),
    ("device", "tpu", "device='tpu' is not valid; choose one of: auto, cpu, cuda, mps"),
    ("warmup_epochs", -1, "warmup_epochs=-1: expected a number of epochs >= 0"),
    ("num_threads", -2, "num_threads=-2: expected a positive number of CPU threads"),
    ("log_every", 0, "log_every=0: expected a positive number of steps"),
    ("output_dir", "README.md", "output_dir='README.md': "),
    ("cache_dir", "pyproject.toml", "pyproject.toml is a file; expected a folder"),
    # once accepted, and met later as a numpy traceback, a bare TypeError, or a switch read as on
    ("seed", -1, "seed=-1: expected an integer >= 0"),
    ("seed", "x", "seed='x': expected an integer >= 0"),
    ("time_budget", float("nan"), "time_budget=nan: expected a positive duration"),
    ("time_budget", float("inf"), "time_budget=inf: expected a positive duration"),
    ("time_budget", True, "time_budget=True: expected a duration"),
    ("output_dir", None, "output_dir=None: expected a folder path"),
    ("data_dir", 3, "data_dir=3: expected a folder path"),
    ("amp", "no", "amp='no': expected True or False"),
    ("compile", 1, "compile=1: expected True or False"),
    # papermill -y 'lr: 1e-3': YAML reads an exponent without a dot as text; the message once
    # offered the user's own value as the example to follow
    ("lr", "1e-3", "lr='1e-3' is text, not a number; give it as a number (YAML, as in papermill -y, reads 1e-3"),
    ("ema", "0.99", "ema='0.99' is text, not a number"),
    ("amp", "1", "amp='1': expected True or False"),       # a switch, not a number to give as one
])
def test_bad_values_name_the_value_and_choices(field, value, expected):
    with pytest.raises(ConfigError) as e:
        RunConfig(**{field: value}).with_recipe().validate()
    assert expected in str(e.value)


def test_deep_supervision_is_accepted_for_both_networks():
    for arch in ("unet", "resnet34_unet"):
        assert RunConfig(arch=arch, deep_supervision=True).with_recipe().validate().deep_supervision


def test_unavailable_device_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="device='cuda' is not available"):
        RunConfig(device="cuda").validate()


def test_durations():
    assert parse_duration("25m") == 1500
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90s") == 90
    assert parse_duration(12) == 12
    assert parse_duration(None) is None
    # as a clock reads: a bare number after hours is minutes, after minutes seconds
    assert parse_duration("1h30") == parse_duration("1h 30") == 5400
    assert parse_duration("25m30") == 1530 and parse_duration("1h5m10") == 3910
    for bad in ("25 minutes", "30h1h", "1h30x", "h30", "1s30"):
        with pytest.raises(ConfigError):
            parse_duration(bad)


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="unknown config key"):
        RunConfig.from_dict({"arhc": "unet"})


def test_relative_paths_resolve_from_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("data/sample") == PROJECT_ROOT / "data" / "sample"
    assert resolve_path(tmp_path / "x") == tmp_path / "x"


def test_a_time_budget_without_epochs_trains_until_the_budget():
    from labseg.config import UNTIL_BUDGET

    assert RunConfig(time_budget="25m").with_recipe().epochs == UNTIL_BUDGET
    assert RunConfig(time_budget="25m", epochs=7).with_recipe().epochs == 7
    assert RunConfig().with_recipe().epochs < UNTIL_BUDGET


def test_default_run_names_say_which_data_and_which_parameters():
    from labseg.runs import run_name_for

    sample = RunConfig(arch="unet", data_dir="data/sample").with_recipe()
    real = RunConfig(arch="unet", data_dir="/x/oxford-pets-3breed/").with_recipe()
    assert run_name_for(sample).startswith("sample-unet-")
    assert run_name_for(real).startswith("oxford-pets-3breed-unet-")
    assert run_name_for(real).removeprefix("oxford-pets-3breed") == run_name_for(sample).removeprefix("sample")
    other = RunConfig(arch="unet", data_dir="data/sample", lr=3e-3, seed=2).with_recipe()
    assert run_name_for(other) != run_name_for(sample)


def test_swa_refuses_ema_and_non_cosine_schedules():
    with pytest.raises(ConfigError, match="choose one way of averaging"):
        RunConfig(swa=0.75, ema=0.99).with_recipe().validate()
    with pytest.raises(ConfigError, match="swa=0.75 needs scheduler='cosine'.*'onecycle'"):
        RunConfig(swa=0.75, scheduler="onecycle").with_recipe().validate()
    assert RunConfig(swa=0.75).with_recipe().validate().swa == 0.75


@pytest.mark.parametrize("arch,option,value", [
    ("unet", "output_stride", 16), ("unet", "drop_path", 0.1), ("unet", "decoder_attention", "scse"),
    ("resnet34_unet", "norm", "none"),
    ("smp_unet_resnet34", "deep_supervision", True), ("smp_unet_resnet34", "drop_path", 0.1),
    ("smp_unet_resnet34", "norm", "none"), ("smp_unet_resnet34", "output_stride", 16),
])
def test_a_layout_option_the_network_lacks_is_refused_by_name(arch, option, value):
    # before, unet took --drop-path 0.1 and trained without it, silently
    with pytest.raises(ConfigError, match=f"{option}={value!r} is for .*; {arch} has no such option"):
        RunConfig(arch=arch, **{option: value}).with_recipe().validate()


def test_layout_options_at_their_as_built_values_are_accepted_by_every_network():
    for arch in ("unet", "resnet34_unet", "smp_unet_resnet34"):
        RunConfig(arch=arch, norm="batch", drop_path=0.0, decoder_attention="none", output_stride=32,
                  deep_supervision=False).with_recipe().validate()
    assert RunConfig(arch="resnet34_unet", output_stride=16).with_recipe().validate().output_stride == 16
    assert RunConfig(arch="unet", norm="none").with_recipe().validate().norm == "none"


@pytest.mark.parametrize("img_size,scale,expected", [
    (128, 0.75, 96), (128, 0.5, 64), (256, 0.75, 192), (384, 0.75, 288), (160, 0.75, 128),
    (64, 0.75, 0),      # rounds to img_size: no low-resolution phase
    (64, 0.5, 32), (32, 0.5, 0), (128, 0.1, 0), (128, 0.0, 0), (128, 1.0, 0),
])
def test_low_res_size_is_the_scale_of_img_size_to_a_multiple_of_32(img_size, scale, expected):
    assert RunConfig(img_size=img_size, low_res_scale=scale).low_res_size == expected


def test_paths_and_numpy_numbers_become_plain_values_a_checkpoint_can_hold():
    """A Path or np.float64 (np.logspace in a notebook sweep) in a checkpoint made it unloadable."""
    import io

    import numpy as np
    import torch

    c = RunConfig(data_dir=Path("data/sample"), output_dir=Path("/tmp/runs"), lr=np.logspace(-3, -2, 2)[0],
                  epochs=np.int64(2), ema=np.float32(0.5)).with_recipe().validate()
    assert (c.data_dir, c.output_dir, c.lr, c.epochs) == ("data/sample", "/tmp/runs", 1e-3, 2)
    assert type(c.lr) is float and type(c.epochs) is int and type(c.ema) is float
    buffer = io.BytesIO()
    torch.save({"config": c.to_dict()}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["config"] == c.to_dict()


@pytest.mark.parametrize("fields, message", [
    (dict(arch="unet", crop_size=64), "crop_size=64 does nothing while crop_until=0.0: give crop_until"),
    (dict(arch="unet", crop_size=96, crop_until=0.5, img_size=64), "crop_size=96 is larger than img_size=64"),
    (dict(arch="unet", low_res_scale=0.5), "low_res_scale=0.5 does nothing while low_res_until=0.0"),
    (dict(arch="resnet34_unet", low_res_until=0.0), "low_res_scale=0.75 does nothing while low_res_until=0.0"),
])
def test_a_size_without_its_phase_is_refused_not_ignored(fields, message):
    """Crops and the low-resolution phase only happen before their *_until fraction: a size given
    without it trained exactly as if it were not given."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig(**fields).with_recipe().validate()
    RunConfig(arch="unet", crop_size=64, crop_until=0.5, low_res_scale=0.5, low_res_until=0.5).with_recipe().validate()


def test_resume_and_overwrite_together_are_refused(tmp_path):
    from labseg.train import fit

    with pytest.raises(ConfigError, match="resume and overwrite contradict each other"):
        fit(arch="unet", run_name="x", output_dir=str(tmp_path), resume=True, overwrite=True)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("switch,value,expected", [
    ("overwrite", "false", "overwrite='false': expected True or False"),
    ("overwrite", "no", "overwrite='no': expected True or False"),
    ("resume", "no", "resume='no': expected False, True (from last.pt), \"last\" or \"best\""),
    ("resume", 0, "resume=0: expected False, True"),
])
def test_a_switch_given_as_text_is_refused_not_read_as_on(tmp_path, switch, value, expected):
    """papermill -p overwrite false gives 04_train the text "false", which Python reads as true:
    it once deleted and retrained the run it was told to keep."""
    from labseg.train import fit

    with pytest.raises(ConfigError) as e:
        fit(arch="unet", run_name="x", output_dir=str(tmp_path), **{switch: value})
    assert expected in str(e.value) and not any(tmp_path.iterdir())


@pytest.mark.parametrize("switch", ["tta", "tune_threshold", "postprocess", "save"])
def test_an_evaluation_switch_given_as_text_is_refused(tmp_path, switch):
    from labseg.evaluate import evaluate_run

    with pytest.raises(ConfigError, match=re.escape(f"{switch}='no': expected True or False")):
        evaluate_run("no-such-run", output_dir=str(tmp_path), **{switch: "no"})


def test_extra_is_taken_as_a_dict_or_as_the_json_text_papermill_p_gives():
    from labseg.config import parse_extra

    assert parse_extra({"ema": 0.99}) == {"ema": 0.99}
    assert parse_extra('{"ema": 0.99, "weight_decay": 0.0}') == {"ema": 0.99, "weight_decay": 0.0}
    assert parse_extra("") == {} and parse_extra(None) == {}
    with pytest.raises(ConfigError, match=re.escape("extra='{ema: 0.99}' is not JSON")):
        parse_extra("{ema: 0.99}")
    with pytest.raises(ConfigError, match=r"extra=\[1, 2\]: expected a mapping of RunConfig fields"):
        parse_extra("[1, 2]")
    # a field given by name and again in extra once ended in "TypeError: dict() got multiple values"
    assert parse_extra({"ema": 0.99}, beside={"epochs": 2}) == {"ema": 0.99}
    with pytest.raises(ConfigError, match=re.escape("epochs in extra={'epochs': 3} is a parameter of its own: give "
                                                    "it as that parameter (e.g. -p epochs 3), not in extra")):
        parse_extra('{"epochs": 3}', beside={"epochs": 2, "lr": None})


def test_running_out_of_memory_is_told_apart_from_a_fault_in_the_code():
    from labseg.config import out_of_memory

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 33554432 bytes. Error code 12 (Cannot allocate memory)")
    assert out_of_memory(cpu) and out_of_memory(MemoryError())
    assert out_of_memory(type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"))
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.mark.parametrize("name", ["con", "NUL", "Com1", "aux.run", "lpt9.x", "run."])
def test_a_run_name_windows_cannot_hold_as_a_folder_is_refused(name):
    """Run folders travel (runs collected from several machines): CON, NUL.txt or COM1 are devices
    on Windows, and "run." is "run" there, another run's folder."""
    from labseg.config import check_portable_run_name

    with pytest.raises(ConfigError, match=rf"run_name={re.escape(repr(name))}: Windows cannot hold a folder of that name"):
        check_portable_run_name(name)
    check_portable_run_name("a" + name.rstrip("."))     # with more to it, a name like any
