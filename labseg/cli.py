"""The ``labseg`` command: parse arguments, then call the library. What lives here turns options
into calls (bench's defaults included; :func:`labseg.bench.run_bench` measures) and errors into
one-line messages and exit codes.

    labseg download DIR          get Oxford-IIIT Pet through torchvision
    labseg prepare               write the synthetic sample and/or build the caches
    labseg train                 train a model (every RunConfig field is an option)
    labseg evaluate [RUN]        test Dice/IoU overall, per species, per breed
    labseg predict RUN SOURCE    masks and overlays for an image or a folder
    labseg bench                 throughput of models and data paths
    labseg demo                  the whole workbook on the synthetic sample
    labseg sweep [GRID.yaml]     a grid of trainings through notebooks/04_train (papermill)
    labseg report                every run -> outputs/report/ (table, curves, figures)
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from labseg.config import (CHECKPOINTS, OWN_MODELS, PATH_FIELDS, ConfigError, RunConfig, out_of_memory, pick_device,
                           resolve_path)

PREDICTIONS_DIR = "outputs/predictions"     # labseg predict's default folder, in the project

HELP = {
    "arch": "network: unet, resnet34_unet, or smp_unet_resnet34 (the peer, segmentation_models_pytorch's "
            "Unet; needs the bench extra)",
    "data_dir": "dataset folder in the official Oxford-IIIT Pet layout (default: the synthetic sample)",
    "img_size": "training size in px, divisible by 32",
    "epochs": "epochs to train",
    "batch_size": "images per step",
    "lr": "peak learning rate",
    "weight_decay": "weight decay of conv/linear weights",
    "optimizer": "adam, adamw or sgd",
    "scheduler": "cosine, onecycle, plateau or none",
    "warmup_epochs": "linear warm-up length in epochs",
    "loss": "bce, dice, bce_dice, tversky, focal, lovasz or bce_lovasz",
    "augment": "none, flip (horizontal flips only), light, strong or color (light + hue turns and grayscale)",
    "ema": "EMA decay of the weights, e.g. 0.99 (0 = off)",
    "swa": "stochastic weight averaging from this fraction of training on, e.g. 0.75 (0 = off)",
    "sam": "sharpness-aware minimisation with this radius rho, e.g. 0.05 (0 = off; 2 passes per step)",
    "copy_paste": "probability of pasting another training image's pet over an image (0 = off)",
    "mosaic": "probability of replacing a training image by a 2x2 mosaic of four at half size (0 = off) ...",
    "mosaic_until": "... until this fraction of training (time or epochs), then whole images (1 = to the end)",
    "mosaic_background": "probability that each of a mosaic's three other quarters is the window of its sample "
                         "with the fewest pet pixels, at full scale (0 = off)",
    "elastic": "elastic deformation (Ronneberger et al.): std of the shifts of a 3x3 grid of control points, "
               "as a share of the image side, e.g. 0.03 (0 = off)",
    "crop_size": "train on random crops of this size in px (0 = whole images) ...",
    "crop_until": "... until this fraction of training (time or epochs), then on whole images",
    "low_res_scale": "train on whole images resized to this share of img-size, to the nearest multiple of 32 "
                     "(0.75: 96 px at img-size 128; 0 = at img-size throughout) ...",
    "low_res_until": "... until this fraction of training (time or epochs), then at img-size",
    "norm": "UNet normalisation: batch or none (the paper's)",
    "drop_path": "ResNet34-UNet: stochastic depth, drop probability of the last encoder block (0 = off)",
    "decoder_attention": "ResNet34-UNet: decoder attention, none or scse (Roy et al., 2018)",
    "output_stride": "ResNet34-UNet: 32 (ResNet's layout) or 16 (no max-pool: every stage at 2x the resolution)",
    "deep_supervision": "also supervise the inner decoder blocks through 1x1 heads (training only)",
    "valid_fraction": "share of trainval held out for validation, per breed",
    "seed": "random seed (split, init, shuffling, augmentation)",
    "monitor": "metric for best.pt and early stopping: valid_dice, valid_iou, valid_loss",
    "patience": "early stopping after N epochs without gain (0 = off)",
    "time_budget": "stop cleanly after this much training time, e.g. 25m, 1h30m or 90s; a bare number is "
                   "seconds (0 = no budget). Without --epochs, the budget alone ends the run",
    "device": "auto, cpu, cuda or mps",
    "amp": "mixed precision (default: on for CUDA and for CPUs with native bf16, e.g. AVX512-BF16)",
    "channels_last": "channels_last memory format (default: on, except on a CPU with AVX2 and no AVX512, "
                     "where contiguous tensors train faster)",
    "compile": "torch.compile the model",
    "ignore_border": "leave the trimap's border band out of the loss",
    "max_train_images": "train on N of the training images only, taken from each breed in turn (quick checks)",
    "run_name": "run folder name under --output-dir (default: made from the parameters)",
    "output_dir": "where run folders go (default: outputs/runs, or $LABSEG_RUNS_DIR when set)",
    "cache_dir": "where decoded, resized arrays are cached",
    "num_threads": "CPU threads for torch",
    "log_every": "steps between progress-bar updates (each one syncs with the device)",
    "checkpoint_every": "seconds between writes of last.pt, which a resume starts from; best.pt and the "
                        "final epoch are always written (0 = after every epoch)",
}
CHECKPOINT_HELP = ("best, last, or auto (the default): last.pt for a run that finished its decaying lr "
                   "schedule, best.pt (best valid Dice) for one stopped early or interrupted")


def _field_type(f: dataclasses.Field):
    ann = str(f.type)
    if "bool" in ann:
        return bool
    if ann.startswith("int"):
        return int
    if ann.startswith("float"):
        return float
    return str


# Shorter or plainer names beside a field's own flag. --runs-dir: every command's --output-dir is
# where run folders are, which predict's --out (where masks go) made easy to misread.
OPTION_ALIASES = {"data_dir": ["--data"], "output_dir": ["--runs-dir"]}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per RunConfig field; defaults stay None so the config's own defaults apply."""
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        aliases = [flag] + OPTION_ALIASES.get(f.name, [])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = HELP.get(f.name, "")
        if default is not None and "(default:" not in help_text:
            help_text = f"{help_text} (default: {default})"
        elif default is None and "(default:" not in help_text and (by_arch := _recipe_values(f.name)):
            help_text = f"{help_text} (default: the recipe's, {by_arch})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(*aliases, dest=f.name, type=kind, default=None, help=help_text,
                                metavar=f.name.upper())


def _recipe_values(name: str) -> str:
    """What each network's recipe sets ``name`` to, for --help: "1e-3" or "unet 4, resnet34_unet 8"."""
    from labseg.recipes import RECIPES

    values = {arch: recipe[name] for arch, recipe in RECIPES.items() if name in recipe}
    if not values:
        return ""
    if len(set(map(repr, values.values()))) == 1:
        return f"{next(iter(values.values()))}"
    return ", ".join(f"{arch} {value}" for arch, value in values.items())


def given_options(args: argparse.Namespace) -> dict:
    """The RunConfig fields given on the command line; paths typed in the shell are taken from the cwd."""
    values = {}
    for f in dataclasses.fields(RunConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = str(Path(v).expanduser().resolve()) if f.name in PATH_FIELDS else v
    return values


def runs_folder(typed: str | None) -> Path:
    """Where runs are: ``--output-dir`` as typed (from the cwd), else ``$LABSEG_RUNS_DIR``, else
    outputs/runs (labseg.workbook.runs_dir: the notebooks' rule, so every command finds the same runs)."""
    from labseg.workbook import runs_dir

    return Path(typed).expanduser().resolve() if typed else resolve_path(runs_dir())


# --------------------------------------------------------------------------- commands
def cmd_download(args) -> int:
    from labseg.download import download

    path = download(args.dir)
    print(f"labseg: Oxford-IIIT Pet is in {path}\n  train on it with: labseg train --data {path}")
    return 0


def cmd_prepare(args) -> int:
    from labseg.data import load_split
    from labseg.synthetic import default_sample_dir, write_synthetic_dataset

    from labseg.config import check_img_size

    for size in args.img_size:
        check_img_size(size)
    data = Path(args.data).resolve() if args.data else default_sample_dir()
    if args.synthetic or not args.data:
        t = time.perf_counter()
        write_synthetic_dataset(data, seed=args.seed)
        print(f"labseg: synthetic sample in {data} ({time.perf_counter() - t:.1f} s)")
    # a folder typed in a shell starts where it is, as train's --cache-dir does; the default is the project's
    cache_dir = Path(args.cache_dir).expanduser().resolve() if args.cache_dir else "data/cache"
    for size in args.img_size:
        for split in ("trainval", "test"):
            cached = load_split(data, split, size, cache_dir)
            print(f"labseg: {split} @{size}px: {len(cached)} images cached in {Path(cached.images.filename).parent}, "
                  f"{len(cached.skipped)} skipped")
    return 0


def cmd_train(args) -> int:
    from labseg.train import fit

    given = given_options(args)
    if args.resume and not given.get("run_name"):
        print("labseg: error: --resume needs --run-name RUN (the run to continue)", file=sys.stderr)
        return 2
    if args.evaluate:
        # Imported now, with the code training runs on: an edit made during a long run must not
        # break its evaluation at the end.
        from labseg.evaluate import evaluate_checkpoints, format_result
    if "output_dir" not in given and os.environ.get("LABSEG_RUNS_DIR"):
        given["output_dir"] = str(runs_folder(None))
    # Only the options given: a resume takes every other one from the run's config.json.
    result = fit(resume=args.resume or False, overwrite=args.overwrite, progress=not args.quiet, **given)
    if result.run is None:          # a torchrun rank other than 0: rank 0 reports
        return 0
    print(f"labseg: run folder {result.run.path}")
    args.phase, args.run_folder = "evaluate", result.run.path      # what Ctrl-C from here on stops
    if args.evaluate:
        # Both checkpoints, so that each run records how far apart they are; the run's own
        # figure is the default checkpoint's (runs.default_checkpoint).
        for evaluated in evaluate_checkpoints(result.run, "test", ("best", "last"), tta=True, tune_threshold=True,
                                              postprocess=True, progress=not args.quiet):
            print(format_result(evaluated))
        print(f"labseg: this run's checkpoint is {result.run.resolve_checkpoint()}.pt "
              f"(stop: {result.summary['stop_reason']}; scheduler {result.run.read_config().scheduler})")
    return 0


def cmd_evaluate(args) -> int:
    from labseg.evaluate import evaluate_run, format_result
    from labseg.runs import RunDir, best_run

    runs = runs_folder(args.output_dir)
    run = RunDir.open(args.run, runs) if args.run else best_run(runs)
    if not args.run:                    # say which run, and why that one
        print(f"labseg: no RUN given; evaluating {run.name}, the best valid Dice "
              f"({run.read_summary()['best_valid_dice']:.4f}) among the finished runs on "
              f"{Path(run.read_config().data_dir).name} (the latest run's data)")
    result = evaluate_run(run, args.split, which=args.checkpoint, tta=args.tta, tune_threshold=args.tune_threshold,
                          postprocess=args.postprocess, data_dir=str(Path(args.data).resolve()) if args.data else None,
                          device=args.device)
    print(format_result(result))
    return 0


def cmd_predict(args) -> int:
    from labseg.evaluate import predict_images

    # paths typed in a shell are taken from the cwd; the API takes relative ones from the project root,
    # and so does the default, like every other output of labseg (outputs/README.md)
    out = resolve_path(PREDICTIONS_DIR) if args.out is None else Path(args.out).resolve()
    done = predict_images(args.run, Path(args.source).resolve(), out, img_size=args.img_size, threshold=args.threshold,
                          tta=args.tta, postprocess=args.postprocess, which=args.checkpoint, device=args.device,
                          output_dir=runs_folder(args.output_dir))
    n = len(done.written)
    print(f"labseg: {n} mask{'s' if n != 1 else ''} and overlay{'s' if n != 1 else ''} written to "
          f"{out} (predicted by {done.checkpoint})")
    if done.skipped:
        print(f"labseg: error: {len(done.skipped)} of {len(done.skipped) + len(done.written)} images could not "
              "be read:\n  " + "\n  ".join(done.skipped), file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    """The main job on the embedded sample: run the workbook's notebooks 01→06 with papermill."""
    from labseg.workbook import run_workbook

    report = run_workbook(epochs=args.epochs, img_size=args.img_size)
    print(f"labseg: demo finished. Report: {report}\n  run folders: {runs_folder(None)}")
    return 0


def cmd_sweep(args) -> int:
    """A grid of 04_train runs through papermill (YAML file and/or --set NAME=V1,V2)."""
    from labseg.sweep import format_results, load_grid, parse_sets, run_sweep

    grid = load_grid(args.grid) if args.grid else {}
    grid.update(parse_sets(args.set or []))
    if not grid:
        raise SystemExit("labseg: error: give a grid file or at least one --set NAME=VALUE[,VALUE...]")
    for key in ("data_dir", "output_dir"):        # paths typed in a shell are taken from the cwd
        if key in grid:
            grid[key] = [str(Path(v).expanduser().resolve()) if isinstance(v, str) else v for v in grid[key]]
    results = run_sweep(grid, output_dir=str(runs_folder(args.output_dir)), force=args.force, prefix=args.prefix,
                        progress=not args.quiet)
    print(format_results(results))
    return 1 if any(r["status"] == "failed" for r in results) else 0


def cmd_report(args) -> int:
    """Collect every run into outputs/report/ (report.md, runs.csv, figures)."""
    from labseg.report import write_report
    from labseg.workbook import existing_runs_dir, report_dir

    out = existing_runs_dir(runs_folder(args.output_dir))
    rep = report_dir(Path(args.report_dir).expanduser().resolve() if args.report_dir else None)
    print(f"labseg: report written to {write_report(out, rep)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labseg", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Binary pet segmentation on Oxford-IIIT Pet with UNet and ResNet34-UNet: data, training,\n"
                    "evaluation, prediction and reports. `labseg COMMAND --help` gives a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("download", help="download Oxford-IIIT Pet (images + trimaps) with torchvision")
    p.add_argument("dir", help="folder to download into")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("prepare", help="write the synthetic sample and build the caches")
    p.add_argument("--data", help="dataset folder (default: the synthetic sample in data/sample)")
    p.add_argument("--synthetic", action="store_true", help="(re)write the synthetic sample into --data")
    p.add_argument("--img-size", type=int, nargs="+", default=[128], help="sizes to cache (default: 128)")
    p.add_argument("--cache-dir", help="cache folder (default: data/cache in the project)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic sample")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a network and record the run",
                       description="Train a network. Options left out come from the recipe of --arch.")
    add_config_arguments(p)
    p.add_argument("--resume", nargs="?", const="last", choices=("last", "best"),
                   help="continue --run-name from last.pt (best: from best.pt, where an older labseg "
                        "kept a training state in it)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run folder of that name first")
    p.add_argument("--evaluate", action="store_true",
                   help="evaluate best.pt and last.pt on test (plain, flip TTA, tuned threshold, one pet) after; "
                        "once when they hold the same weights")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="Dice/IoU of a run on test: overall, per species, per breed")
    p.add_argument("run", nargs="?", help="run folder or name (default: the best run by valid Dice among those on "
                                          "the dataset of the latest finished run)")
    p.add_argument("--split", default="test", choices=("test", "valid"), help="split to score (default: test)")
    p.add_argument("--checkpoint", default="auto", choices=CHECKPOINTS, help=CHECKPOINT_HELP)
    p.add_argument("--tta", action="store_true", help="also report horizontal-flip test-time augmentation")
    p.add_argument("--tune-threshold", action="store_true", help="also report a threshold tuned on valid")
    p.add_argument("--postprocess", action="store_true",
                   help="also report one pet per image (largest connected component, holes filled)")
    p.add_argument("--data", help="dataset folder (default: the run's)")
    p.add_argument("--output-dir", *OPTION_ALIASES["output_dir"], help="where runs are (default: outputs/runs, or $LABSEG_RUNS_DIR when set)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict masks for an image or a folder")
    p.add_argument("run", help="run folder or name")
    p.add_argument("source", help="an image file or a folder of images")
    p.add_argument("--out", default=None, help=f"output folder (default: the project's {PREDICTIONS_DIR}, from any "
                                               "folder)")
    p.add_argument("--img-size", type=int, help="network input size (default: the run's)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default: 0.5)")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
    p.add_argument("--postprocess", action="store_true",
                   help="keep one pet per image (largest connected component, holes filled)")
    p.add_argument("--checkpoint", default="auto", choices=CHECKPOINTS, help=CHECKPOINT_HELP)
    p.add_argument("--output-dir", *OPTION_ALIASES["output_dir"], help="where to find RUN by name (default: outputs/runs, or $LABSEG_RUNS_DIR when set); the masks go to --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="run the whole workbook (notebooks 01-06) on the synthetic sample")
    p.add_argument("--epochs", type=int, default=3, help="epochs per network (default: 3)")
    p.add_argument("--img-size", type=int, default=64, help="training size (default: 64)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sweep", help="run a grid of trainings through notebooks/04_train (papermill)",
                       description="Run every combination of the grid through notebooks/04_train.ipynb; one "
                                   "run folder (with its executed notebook) per point, named from its "
                                   "parameters. Finished points are skipped unless --force; failed points "
                                   "are recorded (failed.json) and the sweep goes on. A parameter the grid "
                                   "leaves out takes 04_train's default (unet, 64 px, 2 epochs on the "
                                   "synthetic sample), not `labseg train`'s.")
    p.add_argument("grid", nargs="?", help="YAML file: {arch: [unet, resnet34_unet], lr: [1e-3, 3e-4], epochs: 2}")
    p.add_argument("--set", action="append", metavar="NAME=V1[,V2...]",
                   help="a parameter and its values (repeatable); overrides the file's. null = the "
                        "recipe's value; none is the value none where it is one (augment=none: no augmentation)")
    p.add_argument("--force", action="store_true",
                   help="redo points that already finished (their folders, evaluations included, are replaced)")
    p.add_argument("--prefix", help="prefix of the run names")
    p.add_argument("--output-dir", *OPTION_ALIASES["output_dir"], help="where run folders go (default: outputs/runs, or $LABSEG_RUNS_DIR when set)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="collect every run into outputs/report/ (table, curves, figures)",
                       description="Collect every run folder under --output-dir into a report: report.md (a "
                                   "table of every run, the best per network, test Dice with and without "
                                   "TTA), runs.csv and the figures curves.png and best_per_network.png.")
    p.add_argument("--output-dir", *OPTION_ALIASES["output_dir"], help="where the runs are (default: outputs/runs, or $LABSEG_RUNS_DIR when set)")
    p.add_argument("--report-dir", help="where the report goes (default: outputs/report, or $LABSEG_REPORT_DIR when set)")
    p.set_defaults(func=cmd_report)

    _bench_options(sub.add_parser("bench", help="throughput of models and data paths (train, inference, data, "
                                  "memory)", description=BENCH_DESCRIPTION))
    return parser


# --------------------------------------------------------------------------- labseg bench's options
# Here with the other commands' (labseg.bench, which measures, imports torch; this module does not,
# so that `labseg --help` answers at once); `python -m labseg.bench` takes the same ones.
BENCH_DESCRIPTION = ("Throughput of the networks (train step, inference) against smp's Unet-resnet34, of the "
                     "cached vs a naive per-sample data path, and the peak memory of a train step, measured "
                     "interleaved in one process. Prints one JSON object per line, then a table.")


def bench_parser() -> argparse.ArgumentParser:
    return _bench_options(argparse.ArgumentParser(prog="python -m labseg.bench", description=BENCH_DESCRIPTION))


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected sizes such as 128,256") from None


def _model_list(text: str) -> list[str]:
    names = text.replace(",", " ").split()
    bad = [n for n in names if n not in OWN_MODELS]
    if bad:      # the peer is not on the list: it is the reference every line is measured against
        raise argparse.ArgumentTypeError(f"{', '.join(bad)}: not a labseg network; choose from "
                                         f"{', '.join(OWN_MODELS)} (smp's Unet is always the reference)")
    return names


def _flat(lists) -> list:
    return [x for item in lists or () for x in (item if isinstance(item, list) else [item])]


def _bench_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--quick", action="store_true",
                   help="about one minute: 2 rounds; on a CPU the models only at the largest size, "
                        "no unet above 128 px and no smp channels_last line (default: careful, "
                        "warm-up + up to 5 interleaved rounds within ~7.5 minutes)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (default: auto = cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch for every measurement (default: 8 on CPU, 32 on CUDA)")
    p.add_argument("--sizes", type=_int_list, nargs="+", action="extend", default=None, metavar="S",
                   help="square input sizes in px, multiples of 32, as 128 256 or 128,256 (default: 128 256)")
    p.add_argument("--models", type=_model_list, nargs="+", action="extend", default=None, metavar="NAME",
                   help=f"labseg networks to measure, from {', '.join(OWN_MODELS)} (default: both)")
    p.add_argument("--no-smp", dest="smp", action="store_false",
                   help="leave out the segmentation_models_pytorch reference")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for every model (default: on for CUDA where bf16 is supported, off on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model, smp included")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format for labseg's models and batches (default: as training "
                        "uses it: on, except on a CPU with AVX2 and no AVX512); smp runs contiguous, plus one "
                        "extra channels_last line")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="dataset in the official layout for the data-path benchmark, e.g. "
                        "../shared/data/oxford-pets-3breed (default: a synthetic one of ~500x375 px JPEGs, "
                        "written to a temporary folder)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's default, usually the number of cores)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds (default: 5, or 2 with --quick)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="seconds the whole bench should take: the rounds are cut to fit, at least 2 "
                        "(default: ~450, ~50 with --quick; a script's time limit, so that it ends with results)")
    p.add_argument("--decoder-ablation", action="store_true",
                   help="also measure resnet34_unet_full_decoder: resnet34_unet with a fifth decoder block at "
                        "full resolution (as smp's Unet has), to show what the lean decoder saves")
    p.add_argument("--epoch-estimate", action="store_true",
                   help="CUDA: time one epoch of 3680 images (the cached split repeated) per model and "
                        "size, and report the estimated time of a 60-epoch run")
    p.add_argument("--json-only", action="store_true",
                   help="print only the JSON lines (no progress, no table)")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args) -> int:
    from labseg.bench import DEFAULT_MODELS, format_table, run_bench

    try:
        dev = pick_device(args.device)
    except ConfigError as e:
        print(f"labseg bench: error: {e}", file=sys.stderr)
        return 2
    batch_size = args.batch_size or (32 if dev.type == "cuda" else 8)
    data_dir = None
    if args.data:
        data_dir = Path(args.data).expanduser().resolve()     # relative to where it was typed
    json_only = args.json_only

    def log(msg):
        if not json_only:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    def emit(line):
        print(line, flush=True)

    try:
        records = run_bench(models=tuple(_flat(args.models) or DEFAULT_MODELS),
                            sizes=tuple(_flat(args.sizes) or (128, 256)),
                            batch_size=batch_size, device=args.device, quick=args.quick, amp=args.amp,
                            compile=args.compile, channels_last=args.channels_last,
                            data_dir=str(data_dir) if data_dir else None, include_smp=args.smp, emit=emit,
                            epoch_estimate=args.epoch_estimate, decoder_ablation=args.decoder_ablation,
                            rounds=args.rounds, budget_s=args.budget,
                            threads=args.threads, log=log)
    except (ValueError, ConfigError) as e:
        print(f"labseg bench: error: {e}", file=sys.stderr)
        return 2
    if not json_only:
        print()
        print(format_table(records))
    return 0


def _joined_negative_budget(argv: list[str]) -> list[str]:
    """``--time-budget -5m`` as ``--time-budget=-5m``: argparse takes "-5m" for an option and says
    "expected one argument"; joined, the value reaches the check that says what a duration is."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--time-budget" and i + 1 < len(argv) and re.match(r"-\d", argv[i + 1]):
            out.append(f"--time-budget={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.EACCES, errno.EPERM}


def _say_how_to_go_on(e: BaseException, args) -> None:
    """After a training that a disk stopped: which epoch its last.pt holds, and the resume command."""
    if args.command == "train" and getattr(e, "run_folder", None):
        held = f"the run up to epoch {e.saved_epoch}" if e.saved_epoch else "its first checkpoint, last.pt"
        print(f"labseg: {e.run_folder} holds {held}; once the cause is fixed, continue with "
              f"`{_resume_command(args, Path(e.run_folder))}`", file=sys.stderr)


def _allocator_message(e: BaseException) -> str:
    """The allocator's own words, without torch's enforce-fail prefix (runs._first_line cuts any
    error to a line, but cli imports nothing torch-side on an error)."""
    text = str(e).strip()
    # torch's "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: ..."
    text = text.split("DefaultCPUAllocator: ", 1)[-1]
    return (text.splitlines() or [type(e).__name__])[0][:200]


def _less_memory(args) -> str:
    """What to reduce, by command: training's step memory grows with the batch and the image's area."""
    if args.command in ("train", "sweep"):
        return ("close other programs, or train a new run with a smaller --batch-size or --img-size (memory grows with "
                "both; the recipes' batches are unet 4, resnet34_unet 8; a resume keeps the run's own)")
    if args.command == "predict":
        return "close other programs, or predict smaller photos (the mask is made at each photo's own size)"
    return "close other programs and run again"


def _resume_command(args, folder: Path) -> str:
    return f"labseg train --run-name {folder.name}" + (
        f" --output-dir {args.output_dir}" if getattr(args, "output_dir", None) else "") + " --resume"


# Bad input and the run's own refusals, which the CLI tells in one line, by the module that defines each
_TOLD_IN_ONE_LINE = {
    "labseg.config": ("ConfigError",), "labseg.data": ("BadSampleError", "DatasetLayoutError"),
    "labseg.download": ("DownloadError",), "labseg.runs": ("CheckpointError", "RunExistsError", "RunRecordError"),
    "labseg.sweep": ("SweepError",), "labseg.train": ("TrainingDiverged",), "labseg.workbook": ("NotebookFailed",),
}


def _told_in_one_line() -> tuple[type[Exception], ...]:
    """The classes of :data:`_TOLD_IN_ONE_LINE`, from the modules loaded: one not loaded raised
    nothing. Not imported, neither before the command (some bring torch, which `labseg report`
    needs not) nor after its error (seconds, in which a SIGTERM would cut into the handling)."""
    loaded = [getattr(sys.modules[module], name) for module, names in _TOLD_IN_ONE_LINE.items()
              if module in sys.modules for name in names]
    return (*loaded, FileNotFoundError, FileExistsError, PermissionError)


def _lossless_or_escaped_output() -> None:
    """labseg's lines hold a few non-ASCII signs (→, ×): where stdout or stderr cannot encode them
    (Windows output redirected to a file or a pipe is cp1252; a Latin-1 locale), they are written
    escaped rather than raising UnicodeEncodeError in the middle of a run."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding not in ("utf8", "utf8sig") and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


def main(argv=None) -> int:
    _lossless_or_escaped_output()
    args = build_parser().parse_args(_joined_negative_budget(list(sys.argv[1:] if argv is None else argv)))
    # SIGTERM (kill, a batch system's time limit, docker stop) stops like Ctrl-C: the checkpoint
    # being written is finished and the records are consistent; otherwise the epoch was lost and
    # a checkpoint-sized temporary file left behind.
    terminated = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        return args.func(args) or 0
    except Exception as e:
        if isinstance(e, _told_in_one_line()):
            code = 1 if getattr(e, "run_folder", None) else 2      # a run stopped by its disk, or bad input
        elif isinstance(e, OSError) and (e.errno in DISK_ERRNOS or getattr(e, "run_folder", None)):
            code = 1        # the disk, not the code (full, read-only, over quota, failing): one line naming the file
        elif out_of_memory(e):
            print(f"labseg: error: out of memory ({_allocator_message(e)}); {_less_memory(args)}", file=sys.stderr)
            _say_how_to_go_on(e, args)
            return 1
        else:
            raise           # a fault in the code, to be seen with its traceback
        print(f"labseg: error: {e}", file=sys.stderr)
        _say_how_to_go_on(e, args)
        return code
    except KeyboardInterrupt as e:
        if terminated:
            print("labseg: stopped by SIGTERM", file=sys.stderr)
        if args.command == "train" and getattr(args, "phase", None) == "evaluate":
            print(f"labseg: training finished and is recorded; its evaluation was interrupted (run it with "
                  f"`labseg evaluate {args.run_folder} --tta --tune-threshold --postprocess`)", file=sys.stderr)
        elif args.command == "train" and getattr(e, "run_folder", None):
            # fit says where the run is and which epoch its checkpoint holds (train._fit)
            folder = Path(e.run_folder)
            print(f"labseg: interrupted; {folder} holds the run up to epoch {e.saved_epoch} (continue with "
                  f"`{_resume_command(args, folder)}`)", file=sys.stderr)
        elif args.command == "train" and args.resume:
            print(f"labseg: interrupted before the resumed run trained an epoch; run {args.run_name} is as it was "
                  "(continue it with the same command)", file=sys.stderr)
        elif args.command == "train":
            print("labseg: interrupted before the run's first checkpoint: nothing was kept (no run folder is "
                  "left); run the same command again to start it", file=sys.stderr)
        elif args.command == "sweep":
            print("labseg: sweep interrupted; run the same command again: finished points are skipped and "
                  "an interrupted one resumes from its last.pt", file=sys.stderr)
        else:
            print(f"labseg: {args.command} interrupted", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
