"""labseg bench: the records it emits and the CLI flags. No timing assertions: speed targets are
reported by the benchmark itself (docs/benchmarks.md), never asserted in tests."""
import json

import pytest
import torch

from labseg import bench
from labseg.cli import _flat, bench_parser, build_parser, cmd_bench
from labseg.machine import channels_last_for
from labseg.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    # A few small images: the data paths only need some batches, not photo-sized JPEGs.
    return write_synthetic_dataset(tmp_path_factory.mktemp("bench-data"), n_trainval_per_breed=2,
                                   n_test_per_breed=0, image_size=(96, 72))


@pytest.fixture(scope="module")
def run(tiny_data):
    lines = []
    # One thread: on a busy shared CPU, two OpenMP threads fighting other processes are far slower.
    records = bench.run_bench(models=("resnet34_unet",), sizes=(64,), batch_size=2, device="cpu",
                              quick=True, rounds=1, data_dir=str(tiny_data), emit=lines.append, threads=1,
                              decoder_ablation=True)
    return lines, records


def test_every_line_is_a_json_record_with_the_documented_keys(run):
    lines, records = run
    assert [json.loads(line) for line in lines] == records
    for rec in records:
        assert rec["kind"] in bench.RECORD_KEYS, rec
        missing = set(bench.RECORD_KEYS[rec["kind"]]) - set(rec)
        assert not missing, f"{rec['kind']} record lacks {missing}: {rec}"


def test_throughput_records_are_positive(run):
    _, records = run
    kinds = {r["kind"] for r in records}
    assert {"env", "train", "infer", "data", "data_ratio", "data_share", "target", "done"} <= kinds
    train = [r for r in records if r["kind"] == "train" and r["model"] == "resnet34_unet"]
    infer = [r for r in records if r["kind"] == "infer" and r["model"] == "resnet34_unet"]
    assert len(train) == 1 and len(infer) == 1
    assert {(r["path"], r["size"]) for r in records if r["kind"] == "data"} == {("cached", 64), ("naive", 64)}
    for r in records:
        if r["kind"] in ("train", "infer", "data"):
            assert r["size"] == 64 and r["batch_size"] == 2 and r["rounds"] == 1
            for key in ("img_per_s", "ms_per_batch", "img_per_s_min", "img_per_s_max"):
                assert r[key] > 0, r
        if r["kind"] in ("data_ratio", "ratio"):
            assert r["ratio"] > 0, r
        if r["kind"] == "data_share":
            assert r["percent"] > 0 and r["step_ms"] > 0 and r["data_ms"] > 0
        if r["kind"] == "memory":
            assert r["peak_mb"] > 0 and r["increase_mb"] >= 0 and r["params_m"] > 0
            assert r["method"] in bench.MEMORY_METHODS
        if r["kind"] == "target":
            assert r["holds"] in (True, False, None)
    env = records[0]
    # the memory format training would pick on this CPU (channels_last unless AVX2 without AVX512)
    assert env["kind"] == "env" and env["device"] == "cpu"
    assert env["channels_last"] is channels_last_for(torch.device("cpu"))
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_smp_reference_or_a_clear_note(run):
    """Whether smp is installed is found here, not asked of bench.smp_available: a broken detection
    would otherwise drop the reference and pass as "not installed" (that branch has its own test)."""
    import importlib.util

    _, records = run
    if importlib.util.find_spec("segmentation_models_pytorch") is not None:
        refs = {(r["vs"], r["bench"]) for r in records if r["kind"] == "ratio" and r["model"] == "resnet34_unet"}
        # --quick on a CPU leaves out the extra channels_last smp line, and says so
        assert refs == {(ref, b) for ref in (bench.SMP, bench.FULL) for b in ("train", "infer")}
        assert any(r["kind"] == "note" and bench.SMP_CL in r["message"] for r in records)
        contiguous = next(r for r in records if r["kind"] == "train" and r["model"] == bench.SMP)
        assert contiguous["channels_last"] is False
    else:
        assert any(r["kind"] == "note" and "segmentation_models_pytorch" in r["message"] for r in records)


def test_missing_smp_is_a_note_not_a_crash(monkeypatch, tiny_data):
    monkeypatch.setattr(bench, "smp_available", lambda: (False, "ModuleNotFoundError: no smp here"))
    lines = []
    records = bench.run_bench(models=(), sizes=(64,), batch_size=2, device="cpu", quick=True, rounds=1,
                              data_dir=str(tiny_data), emit=lines.append, threads=1)
    assert any(r["kind"] == "note" and "pip install" in r["message"] for r in records)
    assert not any(r["kind"] in ("train", "ratio") for r in records)
    assert {r["path"] for r in records if r["kind"] == "data"} == {"cached", "naive"}
    assert "notes:" in bench.format_table(records)


def test_epoch_estimate_trains_a_real_epoch_and_scales_it_to_the_full_dataset(tiny_data, tmp_path):
    # On CUDA only in `labseg bench`; here on the CPU, on 6 images, so that it has run before a GPU sees it.
    from labseg.data import load_split
    from labseg.models import build_model

    split = load_split(tiny_data, "trainval", 32, cache_dir=tmp_path, progress=False)
    state = bench.ModelState("resnet34_unet", build_model("resnet34_unet"), torch.device("cpu"), False, None, False)
    before = [p.detach().clone() for p in state.model.parameters()]
    rec = bench._epoch_estimate(bench.TrainCandidate(state, 32, 2), split, False, lambda m: None, images=6)
    assert set(rec) == set(bench.RECORD_KEYS["epoch_estimate"])
    assert rec["images"] == 6 and rec["batch_size"] == 2 and rec["seconds"] > 0
    assert rec["epoch_s"] == pytest.approx(rec["seconds"] * bench.EPOCH_IMAGES / 6, rel=1e-3)
    assert rec["run_minutes"] == pytest.approx(rec["epoch_s"] * bench.EPOCHS / 60, rel=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, state.model.parameters())), "no step was taken"
    assert f"epoch of {bench.EPOCH_IMAGES} images, resnet34_unet at 32 px" in bench.format_table([rec])


def test_table_names_models_data_and_targets(run):
    _, records = run
    table = bench.format_table(records)
    assert "resnet34_unet" in table and "cached img/s" in table and "targets:" in table


def test_decoder_ablation_is_compared_but_has_no_targets_of_its_own(run):
    _, records = run
    assert any(r["kind"] == "ratio" and r["vs"] == bench.FULL for r in records)
    assert any(r["kind"] == "train" and r["model"] == bench.FULL for r in records)
    assert not any(r["kind"] == "data_share" and r["model"] in bench.REFERENCES for r in records)
    assert "lean decoder" in bench.format_table(records)


def test_bad_size_is_refused():
    with pytest.raises(ValueError, match="multiples of 32"):
        bench.run_bench(sizes=(100,), emit=lambda line: None)


def test_cli_parser_accepts_the_flags():
    parser = build_parser()      # labseg's own, the bench command's options among the others'
    args = parser.parse_args([
        "bench", "--quick", "--device", "cpu", "--batch-size", "4", "--sizes", "128,256", "--models",
        "resnet34_unet", "unet", "--amp", "--compile", "--no-channels-last", "--epoch-estimate",
        "--json-only", "--data", "some/dir", "--rounds", "3", "--threads", "1", "--no-smp",
        "--decoder-ablation", "--budget", "90"])
    assert args.func is cmd_bench
    assert args.quick and args.amp is True and args.compile and args.channels_last is False
    assert args.epoch_estimate and args.json_only and not args.smp and args.decoder_ablation
    assert _flat(args.sizes) == [128, 256]
    assert _flat(args.models) == ["resnet34_unet", "unet"]
    assert (args.batch_size, args.rounds, args.threads, args.data, args.device) == (4, 3, 1, "some/dir", "cpu")
    assert args.budget == 90

    defaults = parser.parse_args(["bench"])
    assert defaults.amp is None and defaults.channels_last is None and defaults.smp is True
    assert defaults.sizes is None and defaults.models is None and not defaults.quick
    assert _flat(parser.parse_args(["bench", "--sizes", "128", "256"]).sizes) == [128, 256]
    assert parser.parse_args(["bench", "--no-amp"]).amp is False


@pytest.mark.parametrize("argv", [["bench", "--models", "vgg"], ["bench", "--sizes", "big"],
                                  ["bench", "--device", "tpu"]])
def test_cli_parser_refuses_bad_values(argv, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(argv)


def test_the_peer_is_the_reference_not_a_model_to_measure(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--models", "smp_unet_resnet34"])
    assert "smp_unet_resnet34: not a labseg network; choose from unet, resnet34_unet" in capsys.readouterr().err


def test_labseg_help_and_a_mistyped_option_answer_without_importing_torch():
    """The options of every command, bench's included, are read before anything imports torch
    (3.8 s and 0.8 GB of `labseg --help` were torch and torchvision, needed by no option)."""
    import subprocess
    import sys

    code = ("import sys\nfrom labseg.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    for argv in (["--help"], ["train", "--help"], ["bench", "--help"], ["train", "--no-such-option"]):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().endswith("no torch"), (argv, out.stdout[-300:], out.stderr[-300:])
    out = subprocess.run([sys.executable, "-c", code, "evaluate", "no-such-run", "--output-dir", "/nonexistent"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("torch imported")   # the check can fail: a command does import it


def test_the_errors_the_cli_tells_in_one_line_are_found_by_their_names():
    """cli names them by module and class (it imports none: a SIGTERM during that import, seconds
    with torch, cut into the error's handling); a class renamed or moved must fail here, not when
    its error is raised."""
    import importlib

    from labseg.cli import _TOLD_IN_ONE_LINE, _told_in_one_line

    for module in _TOLD_IN_ONE_LINE:
        importlib.import_module(module)
    told = _told_in_one_line()
    assert len(told) == sum(map(len, _TOLD_IN_ONE_LINE.values())) + 3
    assert all(isinstance(c, type) and issubclass(c, Exception) for c in told)


def test_module_parser_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        bench_parser().parse_args(["--help"])
    assert e.value.code == 0
    assert "--epoch-estimate" in capsys.readouterr().out


class _SlowFirstCall(bench.Candidate):
    """A candidate whose first call is slow (a GPU's kernel selection, a compile), the rest fast."""

    kind = "test"

    def __init__(self):
        super().__init__("slow-first", 32, torch.device("cpu"))
        self.calls = 0

    def run(self, k):
        import time

        for _ in range(k):
            time.sleep(0.6 if self.calls == 0 else 0.01)
            self.calls += 1


def test_a_slow_first_call_on_a_gpu_or_compiled_is_not_what_calibrates_the_rounds():
    once = _SlowFirstCall()
    once.warm_up(chunk_s=0.5, warm2_below_s=0.1)                      # a CPU: the long call stands
    assert once.iters == 1 and once.calls == 1
    twice = _SlowFirstCall()
    twice.warm_up(chunk_s=0.5, warm2_below_s=0.1, always_twice=True)  # GPU or compile: calibrated on the 2nd
    assert twice.calls == 2 and twice.iters >= 10


def test_a_budget_cuts_the_rounds_to_fit_and_still_ends_with_results(tiny_data, monkeypatch):
    monkeypatch.setitem(bench.CAREFUL, "chunk_s", 0.02)        # short chunks: the rule, not the timing
    lines = []
    records = bench.run_bench(models=("resnet34_unet",), sizes=(64,), batch_size=2, device="cpu",
                              budget_s=0.5, data_dir=str(tiny_data), include_smp=False, emit=lines.append,
                              threads=1)
    trains = [r for r in records if r["kind"] == "train"]
    assert trains and all(r["rounds"] == bench.CAREFUL["min_rounds"] for r in trains)
    assert any(r["kind"] == "note" and "2 of 5 rounds" in r["message"] for r in records)
    assert records[-1]["kind"] == "done"
    for bad in (0, float("inf")):
        with pytest.raises(ValueError, match=f"budget_s={bad!r}: expected a positive number of seconds"):
            bench.run_bench(budget_s=bad, emit=lambda line: None)
