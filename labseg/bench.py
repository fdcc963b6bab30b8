"""``labseg bench``: throughput of the networks and of the data paths, measured side by side.

Every measurement is one "candidate" (a train step, an inference batch or a data batch of one
model or data path at one size). The candidates are timed INTERLEAVED in one process: each
round visits every candidate once, and the rounds repeat; a figure is the median over rounds,
and a ratio (ours vs smp, cached vs naive data, data vs step time) is the median of the ratios
taken within each round. So a slow spell on a shared machine hits both sides of a ratio alike.

What is measured, per size and batch size:

* ``train``  images/s of a full training step: forward, BCE-with-logits loss, backward, Adam step;
* ``infer``  images/s of a forward pass in eval mode under ``torch.inference_mode``;
* ``data``   images/s of augmented, normalised training batches: labseg's cached path
  (:class:`labseg.data.Batches` over a :class:`~labseg.data.CachedSplit` with
  ``BatchAugment("light")``) against a naive per-sample path written like a typical lab
  ``Dataset`` (PIL open + convert + resize per sample, ``augment_sample``, ``DataLoader``);
* ``memory`` the peak memory of one training step (see :func:`measure_memory` for what exactly);
* ``data_share`` the time to make one batch on the cached path as a % of one train step.

The reference is ``segmentation_models_pytorch.Unet("resnet34", encoder_weights=None,
classes=1)`` (the optional ``bench`` extra), run in its default contiguous format as a user
would, and once more in channels_last so that the comparison is also fair to it.

Output: one JSON object per line (each has a ``kind``), then a short table. On CUDA the timers
are read only after a synchronisation at the end of each timed chunk, never inside it.

    labseg bench --quick                    # about a minute on a 2-core CPU
    labseg bench                            # careful: warm-up, up to 5 interleaved rounds, medians
    labseg bench --data ../shared/data/oxford-pets-3breed --json-only > bench.jsonl
    python -m labseg.bench --help
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SMP = "smp_unet_resnet34"                # the reference, default (contiguous) memory format
SMP_CL = "smp_unet_resnet34_cl"          # the reference in channels_last, for a fair second look
FULL = "resnet34_unet_full_decoder"      # ablation: resnet34_unet with smp's fifth, full-size decoder block
REFERENCES = (SMP, SMP_CL, FULL)         # measured for comparison; no data share or targets of their own
DEFAULT_MODELS = ("unet", "resnet34_unet")
EPOCH_IMAGES = 3680                      # Oxford-IIIT Pet trainval
EPOCHS = 60

# Targets stated for the project; the benchmark reports whether each holds (tests never assert them).
TARGET_TRAIN_VS_SMP = 1.0                # resnet34_unet train img/s at 256 px ≥ 1.0 × smp
TARGET_INFER_VS_SMP = 1.2                # resnet34_unet inference img/s at 256 px ≥ 1.2 × smp
TARGET_SIZE = 256
TARGET_DATA_RATIO = 20.0                 # cached data path ≥ 20 × the naive path
TARGET_DATA_SHARE = 5.0                  # data time per step < 5% of the train-step time

# The keys every record of a kind carries (documented output format; tests check them).
RECORD_KEYS = {
    "env": ("kind", "device", "device_name", "cpu_capability", "torch", "threads", "batch_size", "quick", "amp",
            "compile", "channels_last", "data", "smp"),
    "train": ("kind", "model", "size", "batch_size", "img_per_s", "ms_per_batch", "img_per_s_min",
              "img_per_s_max", "rounds", "iters_per_round", "channels_last"),
    "infer": ("kind", "model", "size", "batch_size", "img_per_s", "ms_per_batch", "img_per_s_min",
              "img_per_s_max", "rounds", "iters_per_round", "channels_last"),
    "data": ("kind", "path", "size", "batch_size", "img_per_s", "ms_per_batch", "img_per_s_min",
             "img_per_s_max", "rounds", "iters_per_round"),
    "ratio": ("kind", "bench", "model", "vs", "size", "ratio"),
    "data_ratio": ("kind", "size", "ratio", "target", "holds"),
    "data_share": ("kind", "model", "size", "data_ms", "step_ms", "percent", "target", "holds"),
    "memory": ("kind", "model", "size", "batch_size", "method", "peak_mb", "baseline_mb",
               "increase_mb", "params_m", "state_mb"),
    "epoch_estimate": ("kind", "model", "size", "batch_size", "images", "seconds", "epoch_s", "run_minutes",
                       "epochs"),
    "target": ("kind", "name", "value", "threshold", "holds"),
    "note": ("kind", "message"),
    "done": ("kind", "seconds", "load_avg_1m"),
}

# rounds: planned; min_rounds: kept even when over budget; budget_s: the whole run's soft limit
# (rounds are cut to fit it); hard_s: past it, memory measurements are left out (quick only).
QUICK = dict(rounds=2, min_rounds=1, chunk_s=0.3, warm2_below_s=0.5, budget_s=50.0, hard_s=56.0)
CAREFUL = dict(rounds=5, min_rounds=2, chunk_s=1.0, warm2_below_s=3.0, budget_s=450.0, hard_s=None)


# --------------------------------------------------------------------------- small helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _r(x: float, digits: int = 4) -> float:
    """Round to `digits` significant digits (JSON stays readable)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, max(0, digits - 1 - int(math.floor(math.log10(abs(x))))))


def _load_avg():
    """The 1-minute load average (how busy the machine was), or None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _median(xs) -> float:
    return float(statistics.median(xs))


def smp_available() -> tuple[bool, str]:
    """(importable, version or the reason it is not)."""
    try:
        import segmentation_models_pytorch as smp
    except Exception as e:    # ImportError, or a broken install raising anything
        return False, f"{type(e).__name__}: {e}"
    return True, getattr(smp, "__version__", "?")


def build_smp():
    from labseg.models import build_model

    return build_model("smp_unet_resnet34")


# --------------------------------------------------------------------------- candidates
class Candidate:
    """One thing to time. ``run(k)`` does k iterations; ``chunk(k)`` times them (seconds/iter)."""

    kind = ""

    def __init__(self, name: str, size: int, device: torch.device):
        self.name, self.size, self.device = name, size, device
        self.iters = 1                  # iterations per timed chunk, set by calibrate()
        self.times: list[float] = []    # seconds per iteration, one entry per round

    @property
    def key(self):
        return (self.kind, self.name, self.size)

    def run(self, k: int) -> None:
        raise NotImplementedError

    def chunk(self, k: int) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.run(k)
        _sync(self.device)              # the only sync: after the whole chunk
        return (time.perf_counter() - t0) / k

    def warm_up(self, chunk_s: float, warm2_below_s: float, always_twice: bool = False) -> float:
        t = self.chunk(1)
        # The first call pays for kernel selection, caches, compiles: a second one calibrates, unless
        # the first was long on a CPU. On a GPU, or compiled, the first is long for those very
        # reasons, and calibrating on it gave 1 iteration a round: a latency, not a throughput.
        if t < warm2_below_s or always_twice:
            t = min(t, self.chunk(1))   # the faster call: a stall of a busy machine is not the cost
        self.iters = max(1, min(500, int(round(chunk_s / max(t, 1e-6)))))
        return t


class ModelState:
    """A network, its optimizer and its settings, shared by its train and infer candidates."""

    def __init__(self, name: str, model: torch.nn.Module, device: torch.device, channels_last: bool,
                 amp_dtype, compile: bool):
        self.name, self.device, self.channels_last, self.amp_dtype = name, device, channels_last, amp_dtype
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.params = sum(p.numel() for p in model.parameters())
        self.forward = torch.compile(model) if compile else model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def inputs(self, size: int, batch_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed + size)
        x = torch.randn(batch_size, 3, size, size, generator=g)
        y = (torch.rand(batch_size, 1, size, size, generator=g) > 0.5).float()
        x, y = x.to(self.device), y.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def train_step(self, x, y) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.forward(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        loss.backward()
        self.optimizer.step()


class TrainCandidate(Candidate):
    kind = "train"

    def __init__(self, state: ModelState, size: int, batch_size: int):
        super().__init__(state.name, size, state.device)
        self.state, self.batch_size = state, batch_size
        self.x, self.y = state.inputs(size, batch_size)

    def run(self, k):
        self.state.model.train()
        for _ in range(k):
            self.state.train_step(self.x, self.y)


class InferCandidate(Candidate):
    kind = "infer"

    def __init__(self, state: ModelState, train: TrainCandidate):
        super().__init__(state.name, train.size, state.device)
        self.state, self.batch_size, self.x = state, train.batch_size, train.x

    def run(self, k):
        self.state.model.eval()
        with torch.inference_mode(), self.state.autocast():
            for _ in range(k):
                self.state.forward(self.x)
        self.state.model.train()


class CachedDataCandidate(Candidate):
    """labseg's path: Batches over the CachedSplit, batched augmentation on the device."""

    kind = "data"

    def __init__(self, split, size, batch_size, device, channels_last):
        super().__init__("cached", size, device)
        from labseg.data import Batches
        from labseg.transforms import BatchAugment

        self.batch_size = batch_size
        self.batches = Batches(split, batch_size=batch_size, shuffle=True, augment=BatchAugment("light"),
                               device=device, drop_last=len(split) >= batch_size, channels_last=channels_last)
        self.epoch, self.it = 0, iter(self.batches)

    def next_batch(self):
        try:
            return next(self.it)
        except StopIteration:
            self.epoch += 1
            self.batches.set_epoch(self.epoch)
            self.it = iter(self.batches)
            return next(self.it)

    def run(self, k):
        for _ in range(k):
            self.next_batch()


class NaivePetDataset(torch.utils.data.Dataset):
    """The per-sample way, as a typical lab reference ``Dataset`` writes it (the baseline).

    Every ``__getitem__`` opens and decodes the JPEG and the trimap, resizes both to the training
    size, converts to tensors, builds the binary mask and augments the one sample with
    torchvision v2 (:func:`labseg.transforms.augment_sample`), then normalises.
    """

    def __init__(self, records, size: int, level: str = "light"):
        self.records, self.size, self.level = list(records), size, level

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from PIL import Image
        from torchvision.transforms import functional as TF

        from labseg.data import MEAN, STD
        from labseg.transforms import augment_sample

        r = self.records[i]
        image = Image.open(r.image_path).convert("RGB")
        trimap = Image.open(r.trimap_path)
        image = image.resize((self.size, self.size), Image.BILINEAR)
        trimap = trimap.resize((self.size, self.size), Image.NEAREST)
        image = TF.to_tensor(image)                                     # float 3×S×S in [0, 1]
        trimap = torch.from_numpy(np.array(trimap, dtype=np.uint8))
        mask = ((trimap == 1) | (trimap == 3)).to(torch.uint8).unsqueeze(0)   # pet incl. border
        image, mask = augment_sample(image, mask, self.level)
        image = TF.normalize(image, MEAN, STD)
        return image, mask.float()


class NaiveDataCandidate(Candidate):
    kind = "data"

    def __init__(self, records, size, batch_size, device, channels_last):
        super().__init__("naive", size, device)
        self.batch_size, self.channels_last = batch_size, channels_last
        self.loader = torch.utils.data.DataLoader(
            NaivePetDataset(records, size), batch_size=batch_size, shuffle=True, num_workers=0,
            drop_last=len(records) >= batch_size, generator=torch.Generator().manual_seed(0))
        self.it = iter(self.loader)

    def next_batch(self):
        try:
            image, mask = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            image, mask = next(self.it)
        image = image.to(self.device, non_blocking=True)         # the same product as the cached path
        mask = mask.to(self.device, non_blocking=True)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return image, mask

    def run(self, k):
        for _ in range(k):
            self.next_batch()


# --------------------------------------------------------------------------- memory
class _RssSampler:
    """Peak resident set size while the block runs, sampled from /proc/self/statm every ~1 ms."""

    PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __init__(self, interval: float = 0.001):
        self.interval = interval

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _RssSampler.PAGE

    def __enter__(self):
        self.baseline = self.peak = self.rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _malloc_trim() -> bool:
    """Give freed heap memory back to the OS (glibc), so the next step's RSS growth is its own."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


MEMORY_METHODS = {
    "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated over one train step (peak_mb), "
                                 "minus memory_allocated just before it (increase_mb): tensors only, "
                                 "not the caching allocator's reserve",
    "rss_sampled": "resident set size of the process sampled every ~1 ms from /proc/self/statm during "
                   "one train step; baseline_mb is the RSS right before the step, after gc and "
                   "malloc_trim(0) so that memory freed by earlier steps is not silently reused; "
                   "increase_mb = peak - baseline is what the step itself needs (activations, "
                   "gradients, autograd and oneDNN buffers). Sampling can miss peaks shorter than "
                   "~1 ms, so it is a slight lower bound",
    "ru_maxrss": "process-wide RSS high-water mark (getrusage) before and after one step: increase_mb "
                 "is 0 when an earlier step already peaked higher, so it is only a lower bound",
}


def measure_memory(cand: TrainCandidate) -> dict:
    """Peak memory of one training step of ``cand``; the record says which method and what it means."""
    state, dev = cand.state, cand.device
    params_m = state.params / 1e6
    state_mb = state.params * 4 * 3 / 2**20          # weights + Adam's two moments (grads are freed)
    rec = {"kind": "memory", "model": cand.name, "size": cand.size, "batch_size": cand.batch_size}
    gc.collect()
    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        cand.run(1)
        _sync(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        method = "cuda_max_memory_allocated"
    elif Path("/proc/self/statm").exists():
        _malloc_trim()
        with _RssSampler() as s:
            cand.run(1)
        base, peak = s.baseline, s.peak
        method = "rss_sampled"
    else:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024      # bytes on macOS, KiB on Linux
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        cand.run(1)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        method = "ru_maxrss"
    rec.update(method=method, peak_mb=_r(peak / 2**20), baseline_mb=_r(base / 2**20),
               increase_mb=_r(max(0, peak - base) / 2**20), params_m=_r(params_m), state_mb=_r(state_mb))
    return rec


# --------------------------------------------------------------------------- data
def _prepare_data(data_dir, sizes, tmp: Path, log):
    """(description, {size: CachedSplit}); the cache is built in `tmp`, outside the timings."""
    from labseg.data import load_split
    from labseg.synthetic import write_synthetic_dataset

    if data_dir is None:
        root = write_synthetic_dataset(tmp / "synthetic", n_trainval_per_breed=8, n_test_per_breed=0,
                                       image_size=(500, 375))
        description = "synthetic (labseg.synthetic, 32 trainval images of ~500x375 px JPEG)"
    else:
        root = Path(data_dir)
        description = str(root)
    log(f"caching {root} at {', '.join(map(str, sizes))} px (not timed)")
    splits = {s: load_split(root, "trainval", s, cache_dir=tmp / "cache", progress=False) for s in sizes}
    return description, splits


# --------------------------------------------------------------------------- the run
def _amp_dtype(amp, device: torch.device, note):
    from labseg.machine import native_bf16

    use = amp if amp is not None else device.type == "cuda"
    if not use:
        return None
    if device.type == "cuda":
        if native_bf16(device):
            return torch.bfloat16
        note("amp: bf16 is not supported on this GPU; measuring in fp32")
        return None
    return torch.bfloat16       # CPU autocast, only when asked for explicitly


def _summary(c: Candidate, batch_size: int) -> dict:
    per_s = [batch_size / t for t in c.times]
    rec = {"kind": c.kind}
    if c.kind == "data":
        rec["path"] = c.name
    else:
        rec["model"] = c.name
    rec.update(size=c.size, batch_size=batch_size, img_per_s=_r(batch_size / _median(c.times)),
               ms_per_batch=_r(_median(c.times) * 1000), img_per_s_min=_r(min(per_s)),
               img_per_s_max=_r(max(per_s)), rounds=len(c.times), iters_per_round=c.iters)
    if c.kind != "data":
        rec["channels_last"] = bool(c.state.channels_last)
    return rec


def _paired_ratio(a: Candidate, b: Candidate) -> float:
    """Median over rounds of time(b) / time(a): how many times faster a is than b."""
    return _median([tb / ta for ta, tb in zip(a.times, b.times)])


def run_bench(models=DEFAULT_MODELS, sizes=(128, 256), batch_size=8, device="auto", quick=False,
              amp=None, compile=False, channels_last=None, data_dir=None, include_smp=True, emit=print,
              *, epoch_estimate=False, decoder_ablation=False, rounds=None, budget_s=None, threads=None,
              log=None) -> list[dict]:
    """Run the benchmark; ``emit`` gets one JSON line per record as it is made. Returns the records.

    quick: few rounds and, on a CPU, the models only at the largest size (no ``unet`` above
    128 px, whose train step takes ~20 s there, and no smp channels_last line), under a ~1 minute
    budget. Otherwise: warm-up, up to 5 interleaved rounds (as many as fit ~7.5 minutes, at least
    2; ``rounds`` insists on a number; ``budget_s`` sets the time they are cut to fit, warm-up and
    the steps after the rounds included), medians. ``log`` (e.g. a stderr writer) gets
    progress lines. ``epoch_estimate`` (CUDA only) times one epoch of 3680 images per model/size.
    ``threads`` sets torch's CPU threads for the run (restored afterwards). ``decoder_ablation``
    adds resnet34_unet with a full-resolution fifth decoder block (as smp's Unet has), to measure
    what the lean decoder saves.
    """
    from labseg.config import pick_device
    from labseg.machine import channels_last_for, cpu_capability, device_name
    from labseg.models import build_model

    t_start = time.perf_counter()
    log = log or (lambda msg: None)
    records: list[dict] = []
    mode = dict(QUICK if quick else CAREFUL)
    if rounds is not None:      # asked for explicitly: exactly this many rounds, no budget cut
        mode.update(rounds=int(rounds), min_rounds=int(rounds))
    if budget_s is not None:    # e.g. the time limit a script runs it under: results before the cut
        if not (isinstance(budget_s, (int, float)) and math.isfinite(budget_s) and budget_s > 0):
            raise ValueError(f"budget_s={budget_s!r}: expected a positive number of seconds")
        mode["budget_s"] = float(budget_s)

    def out(rec: dict) -> dict:
        records.append(rec)
        emit(json.dumps(rec))
        return rec

    def note(message: str) -> None:
        out({"kind": "note", "message": message})
        log("note: " + message)

    models = tuple(dict.fromkeys(models))
    sizes = tuple(sorted(dict.fromkeys(int(s) for s in sizes)))
    for s in sizes:
        if s <= 0 or s % 32:
            raise ValueError(f"size {s} is not valid: sizes must be positive multiples of 32")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer")
    dev = pick_device(device)
    channels_last = channels_last_for(dev, channels_last)   # None: the format training would use here
    torch.manual_seed(0)
    pending: list[str] = []
    amp_dtype = _amp_dtype(amp, dev, pending.append)
    have_smp, smp_version = smp_available() if include_smp else (False, "not requested")
    with contextlib.ExitStack() as stack:   # the temporary dataset and cache go at the end
        if threads:
            old_threads = torch.get_num_threads()
            torch.set_num_threads(int(threads))
            stack.callback(torch.set_num_threads, old_threads)
        if dev.type == "cuda":      # as training sets it: the fastest cuDNN kernel per shape
            stack.callback(setattr, torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
            torch.backends.cudnn.benchmark = True
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="labseg-bench-")))
        description, splits = _prepare_data(data_dir, sizes, tmp, log)

        out({"kind": "env", "device": str(dev),
             "device_name": device_name(dev),
             "cpu_capability": cpu_capability(dev),
             "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
             "batch_size": batch_size, "quick": bool(quick),
             "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
             "compile": bool(compile), "channels_last": bool(channels_last), "data": description,
             "smp": smp_version if have_smp else None, "python": platform.python_version(),
             "rounds_planned": mode["rounds"], "load_avg_1m": _load_avg()})
        for message in pending:
            note(message)
        busy = _load_avg()
        if dev.type == "cpu" and busy is not None and busy > (os.cpu_count() or 1):
            note(f"the machine is busy (load average {busy} on {os.cpu_count()} cores): absolute figures "
                 "are unreliable; the interleaved ratios hold better. Compare runs only at similar load")
        if include_smp and not have_smp:
            note(f"segmentation_models_pytorch is not importable ({smp_version}); the smp reference is "
                 "skipped. Install the optional extra: pip install 'labseg[bench]'")

        # Which (model, size) pairs get model timings.
        model_sizes = sizes
        if quick and dev.type == "cpu" and len(sizes) > 1:
            model_sizes = (sizes[-1],)
            note(f"--quick on CPU: models timed at {sizes[-1]} px only (data paths at all sizes)")
        pairs = []
        extra = ((FULL,) if decoder_ablation else ()) + ((SMP, SMP_CL) if have_smp else ())
        for name in models + extra:
            if quick and dev.type == "cpu" and name == SMP_CL:
                note(f"--quick on CPU: the extra {SMP_CL} line is left out to stay within a minute; "
                     "run without --quick for it")
                continue
            for s in model_sizes:
                if quick and dev.type == "cpu" and name == "unet" and s > 128:
                    note(f"--quick on CPU: unet at {s} px skipped (one train step takes ~20 s on a 2-core "
                         "CPU); run without --quick to measure it")
                    continue
                pairs.append((name, s))

        # ---- build the candidates
        states: dict[str, ModelState] = {}
        for name, _ in pairs:
            if name in states:
                continue
            if name in (SMP, SMP_CL):
                # smp as a user runs it: contiguous; SMP_CL is the extra, channels_last line
                states[name] = ModelState(name, build_smp(), dev, name == SMP_CL, amp_dtype, compile)
            elif name == FULL:
                from labseg.models import ResNet34UNet

                states[name] = ModelState(name, ResNet34UNet(decoder_channels=(256, 128, 64, 32, 16)), dev,
                                          channels_last, amp_dtype, compile)
            else:
                states[name] = ModelState(name, build_model(name), dev, channels_last, amp_dtype, compile)
        trains = {(n, s): TrainCandidate(states[n], s, batch_size) for n, s in pairs}
        infers = {(n, s): InferCandidate(states[n], trains[n, s]) for n, s in pairs}
        cached = {s: CachedDataCandidate(splits[s], s, batch_size, dev, channels_last) for s in sizes}
        naive = {s: NaiveDataCandidate(splits[s].records, s, batch_size, dev, channels_last) for s in sizes}
        cands: list[Candidate] = [*trains.values(), *infers.values(), *cached.values(), *naive.values()]

        # ---- warm-up and calibration (iterations per chunk)
        log(f"warm-up of {len(cands)} candidates on {dev}")
        warm = {}
        for c in cands:
            warm[c.key] = t = c.warm_up(mode["chunk_s"], mode["warm2_below_s"],
                                        always_twice=dev.type == "cuda" or compile)
            log(f"  {c.kind:5s} {c.name:22s} {c.size:4d} px: {t * 1000:9.1f} ms/iter, {c.iters} iter/round")

        # ---- as many interleaved rounds as fit the budget (at least min_rounds)
        round_est = sum(c.iters * warm[c.key] for c in cands)
        after_est = sum(1.5 * warm[c.key] + 0.5 for c in trains.values())      # the memory steps
        if epoch_estimate and dev.type == "cuda":     # and one epoch of each network
            after_est += sum(EPOCH_IMAGES / batch_size * warm[c.key] for (name, _), c in trains.items()
                             if name not in REFERENCES)
        left = mode["budget_s"] - (time.perf_counter() - t_start) - after_est
        n_rounds = max(mode["min_rounds"], min(mode["rounds"], int(left // max(round_est, 1e-9))))
        if n_rounds < mode["rounds"]:
            note(f"{n_rounds} of {mode['rounds']} rounds: one round takes ~{round_est:.0f} s here, and this "
                 f"mode has a budget of ~{mode['budget_s']:.0f} s (set --rounds to insist)")
        t_rounds = time.perf_counter()
        for r in range(n_rounds):
            t0 = time.perf_counter()
            order = cands if r % 2 == 0 else cands[::-1]   # alternate the order: no fixed neighbour
            for c in order:
                c.times.append(c.chunk(c.iters))
            log(f"round {r + 1}/{n_rounds}: {time.perf_counter() - t0:.1f} s")
        log(f"timed rounds: {time.perf_counter() - t_rounds:.1f} s")

        # ---- throughput records
        for c in (*trains.values(), *infers.values()):
            out(_summary(c, batch_size))
        for s in sizes:
            out(_summary(cached[s], batch_size))
            out(_summary(naive[s], batch_size))

        # ---- ratios vs smp (default format and channels_last)
        for (name, s), tc in trains.items():
            if name in (SMP, SMP_CL):
                continue
            for ref in (SMP, SMP_CL) + ((FULL,) if name == "resnet34_unet" else ()):
                if (ref, s) in trains:
                    out({"kind": "ratio", "bench": "train", "model": name, "vs": ref, "size": s,
                         "ratio": _r(_paired_ratio(tc, trains[ref, s]))})
                    out({"kind": "ratio", "bench": "infer", "model": name, "vs": ref, "size": s,
                         "ratio": _r(_paired_ratio(infers[name, s], infers[ref, s]))})

        # ---- data paths: cached vs naive, and the data share of a step
        for s in sizes:
            ratio = _paired_ratio(cached[s], naive[s])
            out({"kind": "data_ratio", "size": s, "ratio": _r(ratio), "target": TARGET_DATA_RATIO,
                 "holds": bool(ratio >= TARGET_DATA_RATIO)})
        for (name, s), tc in trains.items():
            if name in REFERENCES:
                continue
            pct = 100 * _median([d / t for d, t in zip(cached[s].times, tc.times)])
            out({"kind": "data_share", "model": name, "size": s,
                 "data_ms": _r(_median(cached[s].times) * 1000), "step_ms": _r(_median(tc.times) * 1000),
                 "percent": _r(pct, 3), "target": TARGET_DATA_SHARE, "holds": bool(pct < TARGET_DATA_SHARE)})

        # ---- peak memory of a train step (after all timings: trimming the heap disturbs them)
        hard = mode["hard_s"]
        order = sorted(trains.values(), key=lambda c: (c.name == "unet", c.size))
        for c in order:
            est = _median(c.times) * 1.5 + 0.5
            if hard is not None and time.perf_counter() - t_start + est > hard:
                note(f"memory of {c.name} at {c.size} px not measured: over the --quick time budget")
                continue
            out(measure_memory(c))
        if any(r["kind"] == "memory" for r in records):
            method = next(r["method"] for r in records if r["kind"] == "memory")
            note(f"memory method {method}: {MEMORY_METHODS[method]}")

        # ---- one epoch, for a 60-epoch estimate
        if epoch_estimate:
            if dev.type != "cuda":
                for (name, s), tc in trains.items():
                    if name in REFERENCES:
                        continue
                    est = EPOCH_IMAGES / (batch_size / _median(tc.times)) * EPOCHS / 60
                    note(f"--epoch-estimate times a real epoch on CUDA only; on {dev} the train-step "
                         f"throughput extrapolates {name} at {s} px to ~{est:.0f} min for {EPOCHS} epochs "
                         f"of {EPOCH_IMAGES} images (data and validation not included)")
            else:
                for (name, s), tc in trains.items():
                    if name in REFERENCES:
                        continue
                    out(_epoch_estimate(tc, splits[s], channels_last, log))

        # ---- targets
        def target(name, value, threshold, holds):
            out({"kind": "target", "name": name, "value": None if value is None else _r(value),
                 "threshold": threshold, "holds": holds})

        for bench_kind, thr in (("train", TARGET_TRAIN_VS_SMP), ("infer", TARGET_INFER_VS_SMP)):
            for ref in (SMP, SMP_CL):
                rec = next((x for x in records if x["kind"] == "ratio" and x["bench"] == bench_kind
                            and x["model"] == "resnet34_unet" and x["vs"] == ref
                            and x["size"] == TARGET_SIZE), None)
                value = rec["ratio"] if rec else None
                target(f"resnet34_unet {bench_kind} @{TARGET_SIZE}px vs {ref}", value, thr,
                       None if value is None else bool(value >= thr))
        for x in [x for x in records if x["kind"] == "data_ratio"]:
            target(f"cached data vs naive @{x['size']}px", x["ratio"], TARGET_DATA_RATIO, x["holds"])
        for x in [x for x in records if x["kind"] == "data_share"]:
            target(f"data share of {x['model']} step @{x['size']}px (%)", x["percent"], TARGET_DATA_SHARE,
                   x["holds"])

    out({"kind": "done", "seconds": _r(time.perf_counter() - t_start), "load_avg_1m": _load_avg()})
    log(f"bench done in {time.perf_counter() - t_start:.1f} s")
    return records


def _epoch_estimate(tc: TrainCandidate, split, channels_last: bool, log, images: int = EPOCH_IMAGES) -> dict:
    """Time one real epoch (cached batches + train steps) over the split repeated to ``images``
    (the full dataset's 3680 trainval images)."""
    from labseg.data import Batches
    from labseg.transforms import BatchAugment

    dev, bs = tc.device, tc.batch_size
    idx = np.resize(np.arange(len(split)), images)
    batches = Batches(split, idx, bs, shuffle=True, augment=BatchAugment("light"), device=dev,
                      drop_last=True, channels_last=channels_last)
    state = tc.state
    state.model.train()
    _sync(dev)
    t0 = time.perf_counter()
    for batch in batches:
        state.train_step(batch.image, batch.target)
    _sync(dev)
    seconds = time.perf_counter() - t0
    timed = len(batches) * bs                   # drop_last: a whole number of batches
    epoch_s = seconds * EPOCH_IMAGES / timed    # scaled to the full dataset's epoch
    log(f"epoch of {tc.name} at {tc.size} px: {seconds:.1f} s for {timed} images")
    return {"kind": "epoch_estimate", "model": tc.name, "size": tc.size, "batch_size": bs,
            "images": timed, "seconds": _r(seconds), "epoch_s": _r(epoch_s), "epochs": EPOCHS,
            "run_minutes": _r(epoch_s * EPOCHS / 60)}


# --------------------------------------------------------------------------- the table
def format_table(records: list[dict]) -> str:
    """A short human summary of the records of one run."""
    env = next((r for r in records if r["kind"] == "env"), {})
    done = next((r for r in records if r["kind"] == "done"), {})
    by = {}
    for r in records:
        if r["kind"] in ("train", "infer"):
            by[r["kind"], r["model"], r["size"]] = r
    ratio = {(r["bench"], r["model"], r["vs"], r["size"]): r["ratio"] for r in records if r["kind"] == "ratio"}
    mem = {(r["model"], r["size"]): r for r in records if r["kind"] == "memory"}
    lines = [f"labseg bench on {env.get('device')} ({env.get('device_name')}, {env.get('threads')} threads), "
             f"torch {env.get('torch')}, batch {env.get('batch_size')}, channels_last "
             f"{'on' if env.get('channels_last') else 'off'}, amp {env.get('amp') or 'off'}, "
             f"compile {'on' if env.get('compile') else 'off'}, {'quick' if env.get('quick') else 'careful'}",
             f"data: {env.get('data')}; load average at start {env.get('load_avg_1m')}"
             + (f", at end {done.get('load_avg_1m')}; {done.get('seconds', 0):.0f} s in all" if done else ""), ""]

    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    w = max([22] + [len(k[1]) for k in by])
    head = f"{'model':{w}s} {'size':>4s} {'train img/s':>11s} {'infer img/s':>11s} " \
           f"{'train/smp':>9s} {'(cl)':>7s} {'infer/smp':>9s} {'(cl)':>7s} {'step MB':>8s}"
    lines += [head, "-" * len(head)]
    keys = sorted({(k[1], k[2]) for k in by}, key=lambda k: (k[1], k[0] in REFERENCES, k[0]))
    for model, size in keys:
        t, i = by.get(("train", model, size)), by.get(("infer", model, size))
        m = mem.get((model, size))
        lines.append(
            f"{model:{w}s} {size:4d} {t['img_per_s'] if t else float('nan'):11.2f} "
            f"{i['img_per_s'] if i else float('nan'):11.2f} "
            f"{x(ratio.get(('train', model, SMP, size))):>9s} {x(ratio.get(('train', model, SMP_CL, size))):>7s} "
            f"{x(ratio.get(('infer', model, SMP, size))):>9s} {x(ratio.get(('infer', model, SMP_CL, size))):>7s} "
            f"{('+%.0f' % m['increase_mb']) if m else '-':>8s}")
    lines.append("(ratios: ours ÷ smp Unet-resnet34 contiguous, and ÷ smp in channels_last; "
                 "step MB: memory increase during one train step)")
    for size in sorted({k[3] for k in ratio if k[2] == FULL}):
        lines.append(f"lean decoder: resnet34_unet ÷ {FULL} at {size} px: train "
                     f"{x(ratio.get(('train', 'resnet34_unet', FULL, size)))}, infer "
                     f"{x(ratio.get(('infer', 'resnet34_unet', FULL, size)))}")

    data = {(r["path"], r["size"]): r for r in records if r["kind"] == "data"}
    dratio = {r["size"]: r["ratio"] for r in records if r["kind"] == "data_ratio"}
    shares = {}
    for r in records:
        if r["kind"] == "data_share":
            shares.setdefault(r["size"], []).append(f"{r['model']} {r['percent']:.2f}%")
    if data:
        lines += ["", f"{'data path':10s} {'size':>4s} {'cached img/s':>12s} {'naive img/s':>11s} "
                      f"{'ratio':>7s}  data time % of train step"]
        for size in sorted(dratio):
            c, n = data.get(("cached", size)), data.get(("naive", size))
            lines.append(f"{'':10s} {size:4d} {c['img_per_s']:12.1f} {n['img_per_s']:11.1f} "
                         f"{dratio[size]:6.1f}x  {', '.join(shares.get(size, [])) or '-'}")
    for r in records:
        if r["kind"] == "epoch_estimate":
            lines.append(f"epoch of {EPOCH_IMAGES} images, {r['model']} at {r['size']} px: {r['epoch_s']:.1f} s "
                         f"-> {r['epochs']} epochs ≈ {r['run_minutes']:.1f} min")
    targets = [r for r in records if r["kind"] == "target"]
    if targets:
        lines += ["", "targets:"]
        for r in targets:
            verdict = "not measured" if r["holds"] is None else ("HOLDS" if r["holds"] else "MISSED")
            value = "-" if r["value"] is None else f"{r['value']:.3g}"
            op = "<" if "share" in r["name"] else "≥"
            lines.append(f"  {r['name']:48s} {value:>8s} (target {op} {r['threshold']:g})  {verdict}")
    notes = [r["message"] for r in records if r["kind"] == "note"]
    if notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
# The options and the command live in labseg.cli with the other commands' (argparse there imports
# no torch, so `labseg --help` is quick); `python -m labseg.bench` takes the same ones.
def main(argv=None) -> int:
    from labseg.cli import bench_parser

    args = bench_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
