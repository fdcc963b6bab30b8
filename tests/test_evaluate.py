"""labseg.evaluate: flip TTA, per-breed scores, and the threshold tuned on valid (never on test)."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import labseg.evaluate
from labseg.data import Batches, CachedSplit, Record, load_split, split_trainval
from labseg.evaluate import batches_for_model, evaluate_run, format_result, load_run_model, predict_probs, score
from labseg.train import fit


def _split(labels, breeds, species) -> CachedSplit:
    """A CachedSplit built by hand: labels N×H×W (0 background, 1 pet), random uint8 images."""
    labels = np.asarray(labels, np.uint8)
    n, h, w = labels.shape
    images = np.random.default_rng(0).integers(0, 256, (n, 3, h, w), dtype=np.uint8)
    records = [Record(f"{b}_{i}", b, s, 1, Path(f"{b}_{i}.jpg"), Path(f"{b}_{i}.png"))
               for i, (b, s) in enumerate(zip(breeds, species))]
    return CachedSplit(images, labels, records, np.full((n, 2), (h, w)))


# --------------------------------------------------------------------------- flip TTA
def test_flip_tta_of_a_mirror_symmetric_network_is_its_plain_prediction():
    """A 1×1 convolution commutes with mirroring: mirror, predict, mirror back = predict. So flip
    TTA, the mean of the two, is the plain prediction, on images that are not symmetric."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 1, 1)
    batches = Batches(_split(np.zeros((3, 4, 6)), ["a", "a", "b"], ["cat", "cat", "dog"]), batch_size=2)
    plain = predict_probs(model, batches)
    assert (plain - plain.flip(-1)).abs().max() > 0.01          # the prediction is not symmetric
    tta = predict_probs(model, batches, tta=True)
    torch.testing.assert_close(tta.float(), plain.float(), atol=1e-3, rtol=0)   # float16 outputs


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror_mirrored_back():
    """A 1×3 kernel that is not mirror-symmetric: TTA must differ from the plain prediction, and be
    the mean of the two logits (the mirrored one mirrored back) through the sigmoid."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 1, (1, 3), padding=(0, 1))
    batches = Batches(_split(np.zeros((3, 4, 6)), ["a", "a", "b"], ["cat", "cat", "dog"]), batch_size=2)
    x = torch.cat([b.image for b in batches])
    with torch.no_grad():
        expected = torch.sigmoid((model(x) + model(x.flip(-1)).flip(-1)) / 2)
        plain = torch.sigmoid(model(x))
    tta = predict_probs(model, batches, tta=True).float()
    torch.testing.assert_close(tta, expected, atol=1e-3, rtol=0)       # float16 outputs
    assert (tta - plain).abs().max() > 0.01


# --------------------------------------------------------------------------- per breed
def test_per_breed_and_species_scores_are_means_of_their_images():
    """Three 1×4 images, breed a (cat) twice and b (dog) once, Dice and IoU by hand:
    a_0: truth 1100, pred 1000 → Dice 2·1/(1+2) = 2/3, IoU 1/2
    a_1: truth 1111, pred 1111 → Dice 1, IoU 1
    b_2: truth 1000, pred 1111 → Dice 2·1/(4+1) = 2/5, IoU 1/4
    so breed a: Dice (2/3 + 1)/2 = 5/6, IoU (1/2 + 1)/2 = 3/4; breed b: Dice 2/5, IoU 1/4."""
    split = _split([[[1, 1, 0, 0]], [[1, 1, 1, 1]], [[1, 0, 0, 0]]], ["a", "a", "b"], ["cat", "cat", "dog"])
    probs = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.float16).view(3, 1, 1, 4) * 0.9
    summary = score(probs, split).summary()
    assert [summary["per_breed"][b].pop("species") for b in ("a", "b")] == ["cat", "dog"]
    assert summary["per_breed"]["a"] == pytest.approx({"dice": 5 / 6, "iou": 3 / 4, "images": 2})
    assert summary["per_breed"]["b"] == pytest.approx({"dice": 2 / 5, "iou": 1 / 4, "images": 1})
    assert summary["per_species"]["cat"] == pytest.approx({"dice": 5 / 6, "iou": 3 / 4, "images": 2})
    assert summary["per_species"]["dog"] == pytest.approx({"dice": 2 / 5, "iou": 1 / 4, "images": 1})
    # overall: the mean of the three images
    assert summary["dice"] == pytest.approx((2 / 3 + 1 + 2 / 5) / 3)
    assert summary["iou"] == pytest.approx((1 / 2 + 1 + 1 / 4) / 3)


# --------------------------------------------------------------------------- tuned threshold
@pytest.fixture(scope="module")
def small_run(synthetic_root, tmp_path_factory, small_net_for_module):
    """A one-epoch run of the small registered network (conftest.py)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    return fit(arch=small_net_for_module, run_name="small", data_dir=str(synthetic_root), img_size=32, epochs=1,
               amp=False, max_train_images=8, output_dir=str(tmp / "runs"), cache_dir=str(tmp / "cache"),
               progress=False).run


@pytest.fixture
def sweeps(monkeypatch):
    """Every call of labseg.evaluate.threshold_sweep: (probs, split, its result); the real one runs."""
    calls = []
    real = labseg.evaluate.threshold_sweep

    def spy(probs, split, *args, **kwargs):
        result = real(probs, split, *args, **kwargs)
        calls.append((probs.clone(), split, result))
        return result
    monkeypatch.setattr(labseg.evaluate, "threshold_sweep", spy)
    return calls


def _valid_and_test(run):
    """The run's valid split (its own breed-stratified share of trainval) and its test split."""
    c = run.read_config()
    trainval = load_split(c.data_dir, "trainval", c.img_size, c.cache_dir, progress=False)
    _, valid_idx = split_trainval(trainval.records, c.valid_fraction, c.seed)
    return trainval.subset(valid_idx), load_split(c.data_dir, "test", c.img_size, c.cache_dir, progress=False)


def test_threshold_is_tuned_on_the_valid_split(small_run, sweeps):
    result = evaluate_run(small_run, "test", tune_threshold=True, device="cpu", progress=False, save=False)
    valid, test = _valid_and_test(small_run)
    assert not {r.name for r in valid.records} & {r.name for r in test.records}
    ((probs, split, sweep),) = sweeps
    assert [r.name for r in split.records] == [r.name for r in valid.records]
    model, c = load_run_model(small_run, "auto", "cpu")
    torch.testing.assert_close(probs, predict_probs(model, batches_for_model(model, c, valid)))
    tuned = result["threshold_tuned"]
    assert tuned["valid_sweep"] == sweep and tuned["threshold"] == max(sweep, key=sweep.get)
    assert tuned["images"] == len(test) and not tuned["tta"]


def test_tuned_threshold_is_scored_without_tta(small_run, sweeps):
    """"threshold_tuned" is the plain network at the threshold tuned on its plain valid
    probabilities, TTA asked for or not: its effect read apart from the flip's."""
    result = evaluate_run(small_run, "test", tta=True, tune_threshold=True, device="cpu", progress=False,
                          save=False)
    valid, test = _valid_and_test(small_run)
    model, c = load_run_model(small_run, "auto", "cpu")
    plain_valid = predict_probs(model, batches_for_model(model, c, valid))
    plain_test = predict_probs(model, batches_for_model(model, c, test))
    tuned = result["threshold_tuned"]
    assert tuned["tta"] is False
    # its sweep is one made on the plain valid probabilities (a TTA one may be made as well)
    plain_sweeps = [sweep for probs, split, sweep in sweeps if [r.name for r in split.records] == [
        r.name for r in valid.records] and torch.allclose(probs.float(), plain_valid.float(), atol=1e-3)]
    assert tuned["valid_sweep"] in plain_sweeps and tuned["threshold"] == max(tuned["valid_sweep"],
                                                                               key=tuned["valid_sweep"].get)
    assert tuned["dice"] == pytest.approx(score(plain_test, test, threshold=tuned["threshold"]).dice.mean())


def test_a_plainer_evaluation_keeps_the_recorded_variants_of_the_same_data(small_run, tmp_path, capsys):
    """A plain `labseg evaluate` after one with TTA and a tuned threshold used to erase those
    figures from eval_*.json (and the report's columns); on other data the file is replaced."""
    from labseg.evaluate import eval_file

    name = eval_file("test", small_run.resolve_checkpoint())
    full = evaluate_run(small_run, "test", tta=True, tune_threshold=True, device="cpu", progress=False)
    plain = evaluate_run(small_run, "test", device="cpu", progress=False)
    assert "tta" not in plain                                     # what the call returns: what it computed
    recorded = small_run.read_json(name)
    assert recorded["tta"]["dice"] == pytest.approx(full["tta"]["dice"])
    assert recorded["threshold_tuned"]["threshold"] == full["threshold_tuned"]["threshold"]
    assert recorded["threshold_tuned"]["dice"] == pytest.approx(full["threshold_tuned"]["dice"])
    assert recorded["dice"] == plain["dice"]
    # a recorded evaluation on another dataset is not merged into this one
    small_run.write_json(name, {**recorded, "data_dir": str(tmp_path / "elsewhere")})
    evaluate_run(small_run, "test", device="cpu", progress=False)
    assert "tta" not in small_run.read_json(name)
    assert f"held the evaluation on {tmp_path / 'elsewhere'}" in capsys.readouterr().err


def test_an_evaluation_records_the_epoch_of_its_weights_and_keeps_no_figures_of_other_weights(small_run, tmp_path):
    """eval_*.json names the epoch its checkpoint holds (shown in the printed line), and the TTA or
    tuned-threshold figures of an evaluation of another epoch are not carried into a plainer one."""
    import shutil

    from labseg.evaluate import eval_file
    from labseg.runs import RunDir, load_checkpoint

    run = RunDir(shutil.copytree(small_run.path, tmp_path / "small"))
    which = run.resolve_checkpoint()
    epoch = load_checkpoint(run.checkpoint(which))["epoch"]
    full = evaluate_run(run, "test", tta=True, device="cpu", progress=False)
    assert full["epoch"] == epoch == run.read_json(eval_file("test", which))["epoch"]
    assert format_result(full).splitlines()[0].endswith(f"accuracy {full['accuracy']:.4f}  (epoch {epoch})")
    # the same name, other weights: a record of epoch + 5 (as a copied-over run folder would leave)
    run.write_json(eval_file("test", which), {**full, "epoch": epoch + 5})
    evaluate_run(run, "test", device="cpu", progress=False)
    recorded = run.read_json(eval_file("test", which))
    assert recorded["epoch"] == epoch and "tta" not in recorded
    # an early labseg wrote every evaluation to eval_test.json, last.pt's too, naming its checkpoint
    other = "best" if which == "last" else "last"
    evaluate_run(run, "test", which=other, tta=True, device="cpu", progress=False)
    old_record = {k: v for k, v in run.read_json(eval_file("test", other)).items() if k != "epoch"}
    run.write_json(eval_file("test", other), {**old_record, "checkpoint": which})      # and no epoch yet
    assert "tta" not in evaluate_run(run, "test", which=other, device="cpu", progress=False)
    assert "tta" not in run.read_json(eval_file("test", other))


def test_the_printed_evaluation_lists_each_species_with_its_breeds_under_it(small_run):
    """The species lines looked like two more breeds; 37 breeds of two species read as one list."""
    result = evaluate_run(small_run, "test", device="cpu", progress=False, save=False)
    names = [line.split()[0] for line in format_result(result).splitlines()[1:]]
    indents = [len(line) - len(line.lstrip()) for line in format_result(result).splitlines()[1:]]
    expected = []
    for species in result["per_species"]:
        expected += [(species, 2)] + [(b, 4) for b, m in result["per_breed"].items() if m["species"] == species]
    assert list(zip(names, indents)) == expected
    assert sorted(n for n, i in expected if i == 4) == sorted(result["per_breed"])


def test_an_evaluation_with_tta_runs_each_image_and_its_mirror_once(small_run):
    """Plain and flip-TTA probabilities come from one pass (the plain logits are the TTA average's
    first half): two forward passes per batch of test and of valid, not three; the figures are
    those of predicting plain and TTA apart."""
    model, c = load_run_model(small_run, "auto", "cpu")
    valid, test = _valid_and_test(small_run)
    plain_test = score(predict_probs(model, batches_for_model(model, c, test)), test)
    tta_valid = predict_probs(model, batches_for_model(model, c, valid), tta=True)
    tta_test = predict_probs(model, batches_for_model(model, c, test), tta=True)

    images = []
    real_load = labseg.evaluate._load_run_model

    def counted(*args, **kwargs):
        net, config, epoch = real_load(*args, **kwargs)
        net.register_forward_hook(lambda module, inputs, output: images.append(len(inputs[0])))
        return net, config, epoch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(labseg.evaluate, "_load_run_model", counted)
        predictions = {}
        result = evaluate_run(small_run, "test", tta=True, tune_threshold=True, device="cpu", progress=False,
                              save=False, predictions=predictions)
    assert sum(images) == 2 * (len(test) + len(valid))
    assert predictions["probs"].is_inference()      # predicted without autograd's records
    assert result["dice"] == pytest.approx(plain_test.dice.mean())
    assert result["tta"]["dice"] == pytest.approx(score(tta_test, test).dice.mean())
    tuned = result["tta_threshold_tuned"]
    assert tuned["valid_sweep"] == labseg.evaluate.threshold_sweep(tta_valid, valid)


def test_an_evaluation_hands_over_the_probabilities_it_scored(small_run):
    """05_evaluate's galleries take the split and probabilities evaluate_run scored, instead of
    predicting the test split a second time: the same images, and the Dice of the result."""
    predictions = {}
    result = evaluate_run(small_run, "test", device="cpu", progress=False, save=False, predictions=predictions)
    data, probs = predictions["data"], predictions["probs"]
    assert [r.name for r in data.records] == list(score(probs, data).names) and len(probs) == result["images"]
    assert score(probs, data).dice.mean() == pytest.approx(result["dice"])


def test_checkpoints_of_other_weights_are_each_evaluated(small_run, tmp_path):
    """evaluate_checkpoints takes best.pt's evaluation for last.pt only when the two hold the same
    weights (best.pt keeps them without last.pt's training state); a last.pt with other weights is
    evaluated on its own."""
    import shutil

    from labseg.evaluate import evaluate_checkpoints
    from labseg.runs import RunDir, load_checkpoint

    run = RunDir(shutil.copytree(small_run.path, tmp_path / "small"))
    same = evaluate_checkpoints(run, "test", ("best", "last"), device="cpu", progress=False, save=False)
    assert [r["checkpoint"] for r in same] == ["best", "last"] and same[1]["same_weights_as"] == "best"
    ckpt = load_checkpoint(run.checkpoint("last"))
    ckpt["model"] = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, run.checkpoint("last"))      # zero weights: a constant prediction, another Dice
    best, last = evaluate_checkpoints(run, "test", ("best", "last"), device="cpu", progress=False)
    assert "same_weights_as" not in last and last["checkpoint"] == "last"
    assert last["dice"] != best["dice"] and best["dice"] == same[0]["dice"]
    assert run.read_json("eval_test_last.json")["dice"] == last["dice"]
    # "auto" is one of the two (last.pt: the cosine schedule finished), evaluated once
    assert [r["checkpoint"] for r in evaluate_checkpoints(run, "test", ("auto", "last"), device="cpu",
                                                          progress=False, save=False)] == ["last"]


def test_overlay_outlines_the_mask_and_error_overlay_tells_the_three_verdicts_apart():
    import numpy as np

    from labseg.evaluate import ERROR_COLORS, PET_COLOR, error_overlay, overlay

    image = np.full((20, 20, 3), 100, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    out = overlay(image, mask)
    assert (out[5, 5:15] == PET_COLOR).all() and (out[5:15, 14] == PET_COLOR).all()    # the outline, 1 px at 20 px
    assert not (out[6, 6] == PET_COLOR).all() and (out[6, 6] != 100).any()            # inside: tinted, not painted
    assert (out[~mask] == 100).all()                                                  # outside untouched
    truth = np.zeros((20, 20), bool)
    truth[5:15, 10:20] = True
    verdict = error_overlay(image, mask, truth, alpha=1.0)
    assert (verdict[10, 12] == ERROR_COLORS["correct pet"]).all()
    assert (verdict[10, 6] == ERROR_COLORS["false pet"]).all()
    assert (verdict[10, 17] == ERROR_COLORS["missed pet"]).all()
    assert (verdict[2, 2] == 100).all()                                                # true background: as is


def test_every_source_gets_an_output_name_of_its_own():
    """a.jpg once became a_jpg, as a_jpg.png did, and dup.jpg and dup.JPG one dup_jpg: the later
    mask overwrote the earlier while both were counted as written."""
    from labseg.evaluate import output_names

    files = [Path(n) for n in sorted(["a.jpg", "a.png", "a_jpg.png", "dup.jpg", "dup.JPG", "solo.jpeg"])]
    names = output_names(files)
    assert names[Path("a_jpg.png")] == "a_jpg" and names[Path("solo.jpeg")] == "solo"    # unique stems kept
    assert names[Path("a.jpg")] == "a_jpg-2" and names[Path("a.png")] == "a_png"
    assert {names[Path("dup.jpg")], names[Path("dup.JPG")]} == {"dup_jpg", "dup_jpg-2"}
    assert len({n.lower() for n in names.values()}) == len(files)


def test_a_folder_is_predicted_without_its_earlier_outputs_but_with_photos_named_like_them(tmp_path, caplog):
    from labseg.evaluate import _sources_in

    for name in ("photo.jpg", "photo_mask.png", "photo_overlay.png", "my_mask.jpg", "lone_mask.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.jpg").write_bytes(b"")
    assert [p.name for p in _sources_in(tmp_path)] == ["lone_mask.png", "my_mask.jpg", "photo.jpg"]
    assert "not searched: the subfolder(s) sub of" in caplog.text
    # a kept photo's own outputs, from an earlier prediction into this folder, are left out too
    for name in ("lone_mask_mask.png", "lone_mask_overlay.png", "my_mask_mask.png", "my_mask_overlay.png"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in _sources_in(tmp_path)] == ["lone_mask.png", "my_mask.jpg", "photo.jpg"]


def test_a_photo_over_the_pixel_limit_is_predicted_at_its_full_size(small_run, tmp_path, monkeypatch, caplog):
    """Read at a reduced size (JPEG's scaled decoding), its mask is written at the photo's own size,
    the overlay at the reduced one; an EXIF-turned photo gets the upright size."""
    from PIL import Image

    import labseg.data
    from labseg.evaluate import predict_images

    monkeypatch.setattr(labseg.data, "MAX_PIXELS", 100 * 80)
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (240, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photos / "wide.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6                                    # "rotate 90°": shown 240 wide, 400 high
    Image.fromarray(pixels).save(photos / "turned.jpg", quality=90, exif=exif)
    result = predict_images(small_run, photos, tmp_path / "out", device="cpu", progress=False)
    assert len(result.written) == 2 and not result.skipped
    assert Image.open(tmp_path / "out" / "wide_mask.png").size == (400, 240)
    assert Image.open(tmp_path / "out" / "wide_overlay.png").size == (100, 60)
    assert Image.open(tmp_path / "out" / "turned_mask.png").size == (240, 400)
    assert "400×240 px read at 100×60" in caplog.text


def test_scores_are_shown_when_the_run_folder_cannot_take_their_record(small_run, tmp_path, capsys, monkeypatch):
    """A read-only run folder (or a full disk): the evaluation was computed, then lost to the write's
    error with nothing shown; now it is printed, with a note that it is not recorded."""
    import shutil

    from labseg.cli import main
    from labseg.runs import RunDir

    run = RunDir(shutil.copytree(small_run.path, tmp_path / "runs" / "ro"))
    for name in run.path.glob("eval_*.json"):
        name.unlink()

    def read_only(self, name, obj):
        raise PermissionError(13, f"could not write {self.path / name} (1.0 KiB): Permission denied")
    monkeypatch.setattr(RunDir, "write_json", read_only)
    capsys.readouterr()
    assert main(["evaluate", "ro", "--output-dir", str(tmp_path / "runs"), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "ro last.pt on test (" in out.out and "Dice" in out.out
    assert f"labseg: the evaluation is not recorded: [Errno 13] could not write {run.path / 'eval_test'}" in out.err
    assert not list(run.path.glob("eval_*.json"))


def test_evaluating_a_run_still_training_warns_that_the_scores_are_of_an_epoch_midway(small_run, capsys):
    """`labseg evaluate RUN` while RUN trains scored a mid-training checkpoint without a word, and
    the figures read as the finished run's. It still evaluates (a student may peek), and says so."""
    from labseg.runs import load_checkpoint

    which = small_run.resolve_checkpoint()
    epoch = load_checkpoint(small_run.checkpoint(which))["epoch"]
    with small_run.lock_for_training():         # as the process training it holds it
        result = evaluate_run(small_run, "test", device="cpu", progress=False, save=False)
    assert result["dice"] is not None
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [f"labseg: run small is still training: these scores are of {which}.pt at epoch {epoch}, not of "
                    "the finished run; evaluate it again once it has finished"]
    evaluate_run(small_run, "test", device="cpu", progress=False, save=False)
    assert "still training" not in capsys.readouterr().err


@pytest.mark.parametrize("options,said", [
    ({"tta": "no"}, "tta='no': expected True or False"),
    ({"postprocess": "no"}, "postprocess='no': expected True or False"),
    ({"threshold": "0.5"}, "threshold='0.5': expected a probability between 0 and 1, e.g. 0.5 (a number, not text)"),
])
def test_predict_refuses_a_switch_or_threshold_given_as_text(tmp_path, options, said):
    """predict_images(tta="no") predicted with TTA, as evaluate_run once did; "0.5" as a threshold
    was refused with an example that read the same."""
    from labseg.config import ConfigError
    from labseg.evaluate import predict_images

    with pytest.raises(ConfigError, match=f"^{re.escape(said)}$"):
        predict_images("any", tmp_path / "photo.jpg", tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_predict_takes_the_progress_modes_evaluate_takes(tmp_path):
    from labseg.evaluate import predict_images

    with pytest.raises(FileNotFoundError, match="is neither an image file nor a folder"):    # past the checks
        predict_images("any", tmp_path / "photo.jpg", tmp_path / "out", progress="bars")
    with pytest.raises(FileNotFoundError, match="is neither an image file nor a folder"):    # no cache: no 2048 cap
        predict_images("any", tmp_path / "photo.jpg", tmp_path / "out", img_size=2560)


def test_the_cli_writes_its_lines_to_a_console_that_cannot_encode_them(small_run, monkeypatch, tmp_path):
    """Windows output redirected to a file or a pipe is cp1252: a line with → once raised
    UnicodeEncodeError after the whole evaluation; it is written escaped."""
    import io
    import shutil

    import labseg.cli

    run = shutil.copytree(small_run.path, tmp_path / "small")
    streams = {name: io.TextIOWrapper(io.BytesIO(), encoding="cp1252") for name in ("stdout", "stderr")}
    for name, stream in streams.items():
        monkeypatch.setattr(f"sys.{name}", stream)
    assert labseg.cli.main(["evaluate", str(run), "--postprocess"]) in (0, None)
    streams["stdout"].flush()
    out = streams["stdout"].buffer.getvalue().decode("cp1252")
    assert "valid Dice" in out and "\\u2192" in out      # the arrow, escaped
