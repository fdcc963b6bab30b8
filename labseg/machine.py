"""What a run or a benchmark ran on: the device, its name, and the precision and memory format chosen;
and what code it ran (:func:`code_version`).

Budget runs are wall-clock bound, so the same command gives ~40 epochs on one 2-core CPU and ~200
on another; a run's figures mean little without this record. ``fit`` writes it into
``summary.json`` (``"machine"``, and ``"machines"``, one per session, for a run resumed), ``labseg
bench`` into its ``env`` line, and the report shows :func:`run_machine_label` per run.
"""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that ask it, not above: the report labels runs' machines from
# their records alone and needs no torch, which takes seconds to import.

def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (the platform's processor elsewhere)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """``"bf16"`` or ``"fp16"`` for autocast, ``"fp32"`` without."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp_dtype]


def cpu_capability(device: torch.device) -> str | None:
    """The vector ISA torch dispatches to on a CPU (``"AVX2"``, ``"AVX512"``, ...); None elsewhere.

    It decides the CPU's speed and the default memory format (channels_last_for below), and the
    model name alone may not say it.
    """
    import torch

    return torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else None


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 convolutions natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX).

    Without native support, CPU autocast emulates bf16 and is slower than fp32, so it stays off.
    """
    import torch

    if device.type == "cuda":
        # by default torch counts emulated bf16 (a T4, a V100), slower there than fp16 + GradScaler
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # The CPU's own bf16 instructions, not oneDNN's "can run bf16" (torch.ops.mkldnn.
        # _is_mkldnn_bf16_supported), which says yes on any AVX512 CPU: there bf16 is emulated,
        # a resnet34_unet step 1.83 s against fp32's 1.45 s (oneDNN capped at AVX512_CORE).
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except (AttributeError, RuntimeError):         # private torch API gone: ask the kernel
            return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def _cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux); empty where ``cpuinfo`` cannot be read."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def channels_last_for(device: torch.device, flag: bool | None = None) -> bool:
    """Whether to run the networks and batches in channels_last: ``flag`` when set, else on where it
    is the faster format.

    A CPU with AVX2 and no AVX512 runs contiguous tensors faster (fp32 train steps at 128 px:
    resnet34_unet 1.15x, unet 1.25x); with AVX512, channels_last won (1.12x, resnet34_unet, fp32)
    and bf16 runs on its NHWC kernels; CUDA and MPS keep it too. Measured in docs/benchmarks.md.
    """
    if flag is not None:
        return bool(flag)
    return cpu_capability(device) != "AVX2"


def describe(device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool) -> dict:
    """The record of one training process: where it ran and how (JSON-ready)."""
    import torch

    record = {"device": str(device), "device_name": device_name(device),
              "precision": precision_name(amp_dtype),
              "memory_format": "channels_last" if channels_last else "contiguous",
              "threads": torch.get_num_threads(), "torch": str(torch.__version__)}
    if device.type == "cpu":
        record["cpu_capability"] = cpu_capability(device)
    return record


def machine_label(record: dict | None) -> str | None:
    """A short label for a table: ``"AMD EPYC (AVX2), fp32"``, ``"NVIDIA H100 80GB HBM3, bf16"``."""
    if not record:
        return None
    name = record.get("device_name") or record.get("device", "?")
    if record.get("cpu_capability"):
        name = f"{name} ({record['cpu_capability']})"
    return f"{name}, {record.get('precision', '?')}"


def run_machine_label(summary: dict) -> str | None:
    """The label of every machine a run trained on, in order: a run resumed elsewhere shows both."""
    labels = [machine_label(record) for record in summary.get("machines") or [summary.get("machine")]]
    return " + ".join(dict.fromkeys(label for label in labels if label)) or None


def code_version() -> dict:
    """labseg's version and, in a git checkout, the commit and whether labseg/ differed from it:
    what a run's figures came from (``summary.json``'s ``"code"``). No git, no commit: the version alone."""
    from labseg import __version__
    from labseg.config import PROJECT_ROOT

    code: dict = {"labseg": __version__}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True,
                                  encoding="utf-8", errors="replace", timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")      # the project's own repository, not one around a copy of it
    if top is not None and Path(top).resolve() == PROJECT_ROOT.resolve() and (commit := git("rev-parse", "HEAD")):
        code["commit"] = commit
        changed = git("status", "--porcelain", "--", "labseg")
        if changed is not None:
            code["labseg_changed"] = bool(changed)     # uncommitted edits: the commit alone does not say
    return code


def give_back_freed_memory() -> None:
    """Hand the heap that a training or an evaluation freed back to the OS (glibc's malloc_trim).
    glibc keeps it otherwise: a notebook kernel that ran 04_train at 256 px sat at 1.4 GB of
    anonymous memory afterwards, 0.7 GB of it freed tensors, for as long as the kernel lived.
    A no-op where there is no glibc (macOS, Windows, musl)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
