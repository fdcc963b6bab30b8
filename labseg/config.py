"""The run configuration: one dataclass, validated once, shared by the CLI, the API and notebooks.

Every entry point (``labseg train``, ``labseg.train.fit``, the configuration cell of
``04_train``) builds a :class:`RunConfig` and calls :meth:`RunConfig.validate`, so a bad value
fails before any work, with the same message everywhere.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The network names RunConfig accepts: labseg's two, the peer (labseg.models.smp_unet), and any
# added by labseg.models.register_model (which appends here; a list for that reason).
ARCHS = ["unet", "resnet34_unet", "smp_unet_resnet34"]
OWN_MODELS = ("unet", "resnet34_unet")   # written in labseg.models; the rest are peers built by other libraries
# The options that change a network's layout, their "as built" value, and the networks that have
# them. Any other value on another network is an error, not silently ignored.
ARCH_OPTIONS = {
    "norm": ("batch", ("unet",)),
    "drop_path": (0.0, ("resnet34_unet",)),
    "decoder_attention": ("none", ("resnet34_unet",)),
    "output_stride": (32, ("resnet34_unet",)),
    "deep_supervision": (False, ("unet", "resnet34_unet")),
}
LOSSES = ["bce", "dice", "bce_dice", "tversky", "focal", "lovasz", "bce_lovasz"]   # + labseg.losses.register_loss
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "onecycle", "plateau", "none")
AUGMENTS = ("none", "flip", "light", "strong", "color")
DECODER_ATTENTIONS = ("none", "scse")
NORMS = ("batch", "none")
# Fields for which "none" is a value of its own (no augmentation, a constant lr, no BatchNorm), not
# "unset": a sweep's augment=none must train without augmentation, not with the recipe's.
NONE_IS_A_CHOICE = ("augment", "scheduler", "norm", "decoder_attention")
OUTPUT_STRIDES = (32, 16)       # ResNet34 encoder: with or without its max-pool
MONITORS = ("valid_dice", "valid_iou", "valid_loss")
MONITOR_MODE = {"valid_dice": "max", "valid_iou": "max", "valid_loss": "min"}    # which way is better
DEVICES = ("auto", "cpu", "cuda", "mps")
CHECKPOINTS = ("auto", "best", "last")   # "auto": runs.default_checkpoint
# Names Windows keeps for devices, with any extension: CON, NUL.txt, com1.x (case-insensitive)
WINDOWS_DEVICES = re.compile(r"(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\..*)?", re.IGNORECASE)
# What a run recorded before one of these options existed trained with: its config.json lacks
# the field, and it reads as this "off" value. Not the recipe's value: a recipe may adopt an
# option later (resnet34_unet's took mosaic 0.5 in round 12), and the old run did not use it.
BEFORE_OPTION_EXISTED = dict(ema=0.0, swa=0.0, sam=0.0, copy_paste=0.0, mosaic=0.0, mosaic_until=1.0, elastic=0.0,
                             mosaic_background=0.0,
                             crop_size=0, crop_until=0.0, low_res_scale=0.0, low_res_until=0.0,
                             drop_path=0.0, decoder_attention="none",
                             deep_supervision=False, output_stride=32)
PATH_FIELDS = ("data_dir", "output_dir", "cache_dir")   # folders: relative ones start at the project root
UNTIL_BUDGET = 100_000     # the epoch count of a run limited by its time budget alone


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it, which is not thread-safe, and
# checkpoints are written from a background thread. Files and folders labseg writes follow it.
UMASK = _current_umask()


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is the machine running out of memory: Python's MemoryError, torch's CPU allocator
    ("DefaultCPUAllocator: can't allocate memory", a RuntimeError) or its CUDA OutOfMemoryError.
    Torch-free, for the CLI."""
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)))


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the valid choices."""


def check_portable_run_name(name: str | None) -> None:
    """A new run's folder is made to be copied (runs collected from several machines): refuse a
    name that is no folder on Windows, a device there (CON, NUL.txt) or, with a trailing dot, the
    name without it. An existing folder of such a name still resumes and evaluates where it is."""
    if name is not None and (str(name).endswith(".") or WINDOWS_DEVICES.fullmatch(str(name))):
        raise ConfigError(f"run_name={name!r}: Windows cannot hold a folder of that name "
                          f"({'a trailing dot' if str(name).endswith('.') else 'a device name'}); pick another")


def check_choice(name: str, value, choices) -> None:
    """Raise :class:`ConfigError` (a ValueError) naming ``name``, ``value`` and the valid choices."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def check_switch(name: str, value) -> None:
    """A switch must be True or False: "no", "false" or 0 would read as on, or pass unnoticed
    (papermill's ``-p overwrite false`` gives the text "false")."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: expected True or False")


MAX_IMG_SIZE = 2048


def nearest_existing(path: Path) -> Path | None:
    """``path`` or its nearest parent that exists: where making ``path`` would start. None where
    that cannot be told (a folder on the way this user may not enter)."""
    for part in (path, *path.parents):
        try:
            if part.exists():
                return part
        except OSError:
            return None
    return None


def check_folder(name: str, value) -> Path:
    """``value`` resolved, if it is or can become a folder: a ConfigError where it, or a folder it
    would be made in, is a file (``README.md/cache``), found before any work rather than after it."""
    path = resolve_path(value)
    start = nearest_existing(path)
    if start is not None and not start.is_dir():
        raise ConfigError(f"{name}={str(value)!r}: {start} is a file; expected a folder")
    return path


def check_img_size(value, hint: str = "", at_most: int | None = MAX_IMG_SIZE) -> int:
    """``value`` if it is a side in px the networks take (a positive multiple of 32), else a
    ConfigError naming it and the nearest valid sizes. ``hint`` ends the message (say, what
    leaving the size unset does)."""
    if not _is_int(value) or value <= 0:
        raise ConfigError(f"img_size={value!r}: expected a positive size in px divisible by 32, "
                          f"e.g. 128{hint}")
    if at_most and value > at_most:     # a cache's or a training's: predict builds no cache
        raise ConfigError(f"img_size={value}: expected at most {at_most} px (the lab trains at 128-256; a "
                          f"cache of the full dataset at {at_most} px already takes ~46 GB){hint}")
    if value % 32:
        lo = value // 32 * 32
        nearest = f"{lo} or {lo + 32}" if lo else "32"
        raise ConfigError(f"img_size={value}: must be divisible by 32 (ResNet34-UNet halves the "
                          f"size 5 times, UNet 4; one rule for both); try {nearest}{hint}")
    return value


def resolve_path(path: str | Path) -> Path:
    """Resolve a path from the config: absolute stays, relative is taken from the project root.

    This is why a notebook behaves the same from the repo root, from ``notebooks/`` and under
    papermill: the current directory never matters. (The CLI turns paths typed in a shell into
    absolute paths first, so ``labseg train --data ./x`` means ``./x`` from where you typed it.)
    """
    p = Path(path).expanduser()
    return p if p.is_absolute() else (PROJECT_ROOT / p).resolve()


def recorded_path(path: str | Path) -> str:
    """A folder as a new run records it: inside the project, relative to its root (``data/sample``
    is each clone's own, and a project moved whole keeps it); elsewhere, absolute (a relative
    ``../shared/...`` would point elsewhere from a clone at another depth)."""
    p = Path(path).expanduser()
    p = Path(os.path.normpath(p if p.is_absolute() else PROJECT_ROOT / p))    # a link stays the link
    try:
        return p.relative_to(PROJECT_ROOT).as_posix()      # data/sample on Windows too: readable from any OS
    except ValueError:
        return str(p)


def parse_extra(extra, beside: dict | None = None) -> dict:
    """04_train's ``extra`` parameter as a dict: a dict, or the JSON text ``papermill -p extra
    '{"ema": 0.99}'`` passes (``-p`` gives every value as text; ``-y 'extra: {ema: 0.99}'`` a dict).
    ``beside``: the notebook's named parameters, which ``extra`` may not give again."""
    if extra is None:
        return {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra) if extra.strip() else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"extra={extra!r} is not JSON ({e.msg}); expected a mapping such as "
                              "'{\"weight_decay\": 0.0, \"ema\": 0.99}'") from None
    if not isinstance(extra, dict):
        raise ConfigError(f"extra={extra!r}: expected a mapping of RunConfig fields to values, "
                          "e.g. {\"weight_decay\": 0.0, \"ema\": 0.99}")
    if twice := sorted(set(extra) & set(beside or ())):
        one = len(twice) == 1
        raise ConfigError(f"{', '.join(twice)} in extra={extra!r} {'is a parameter' if one else 'are parameters'} "
                          f"of its own: give {'it' if one else 'each'} as that parameter (e.g. -p {twice[0]} "
                          f"{extra[twice[0]]!r}), not in extra")
    return extra


def parse_duration(value) -> float | None:
    """'25m', '1h30m' (or '1h30'), '90s', '1.5h' or a number of seconds -> seconds (None for no budget)."""
    if isinstance(value, bool):         # True is 1 to Python: one second, not "a budget"
        raise ConfigError(f"time_budget={value!r}: expected a duration such as '25m', '1h30m', '90s' or seconds")
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, (int, float)):
        if not _is_number(value) or value < 0:      # nan never runs out, inf never stops
            raise ConfigError(f"time_budget={value!r}: expected a positive duration such as '25m'")
        return float(value)
    text = str(value).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    # a bare number after hours is minutes, after minutes seconds, as a clock reads: 1h30, 25m30
    text = re.sub(r"([hm])\s*(\d+(?:\.\d+)?)$", lambda m: f"{m[1]}{m[2]}{'m' if m[1] == 'h' else 's'}", text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    units = [u for _, u in parts]
    if (not parts or "".join(n + u for n, u in parts) != text.replace(" ", "")
            or units != sorted(set(units), key="hms".index)):      # each unit once, hours first
        raise ConfigError(
            f"time_budget={value!r}: expected a duration such as '25m', '1h30m', '90s' or seconds")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(n) * scale[u] for n, u in parts)


@dataclass
class RunConfig:
    """Everything that defines a training run. Defaults are the recipe for ``arch``.

    Fields left at ``None`` are filled from :mod:`labseg.recipes` by :meth:`with_recipe`.
    """

    arch: str = "resnet34_unet"
    data_dir: str = "data/sample"          # official Oxford-IIIT Pet layout, real or synthetic
    img_size: int = 128                    # square side; must be divisible by 32
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: str | None = None
    scheduler: str | None = None
    warmup_epochs: float | None = None
    loss: str | None = None
    augment: str | None = None
    ema: float | None = None               # EMA decay of the weights (0 = off)
    swa: float | None = None               # average the weights from this fraction of training on (0 = off)
    sam: float | None = None               # sharpness-aware minimisation: radius rho of the weight step (0 = off)
    copy_paste: float | None = None        # probability of pasting another image's pet over a sample
    mosaic: float | None = None            # probability of replacing a sample by a 2×2 mosaic of four ...
    mosaic_until: float | None = None      # ... until this fraction of training, then whole images only
    mosaic_background: float | None = None # probability of a mosaic quarter being a pet-free window
    elastic: float | None = None           # elastic deformation: std of the control-point shifts, share of the side
    crop_size: int | None = None           # train on random crops of this size (px) ...
    crop_until: float | None = None        # ... until this fraction of training, then on whole images
    low_res_scale: float | None = None     # train on whole images at this share of img_size ...
    low_res_until: float | None = None     # ... until this fraction of training, then at img_size
    norm: str | None = None                # "batch" or "none" (UNet only; the paper has none)
    drop_path: float | None = None         # stochastic depth of the ResNet34 encoder (0 = off)
    decoder_attention: str | None = None   # "none" or "scse" (ResNet34-UNet decoder only)
    deep_supervision: bool | None = None   # auxiliary losses on the inner decoder blocks
    output_stride: int | None = None       # 32 or 16 (ResNet34-UNet: encoder without its max-pool)
    valid_fraction: float = 0.1
    seed: int = 0
    monitor: str = "valid_dice"
    patience: int = 0                      # early stopping after this many epochs without gain; 0 = off
    time_budget: str | float | None = None # e.g. "25m": stop cleanly when spent
    device: str = "auto"
    amp: bool | None = None                # mixed precision; None = on for CUDA and bf16-capable CPUs
    channels_last: bool | None = None      # None = the faster format here (machine.channels_last_for)
    compile: bool = False
    ignore_border: bool = False            # leave the trimap border band out of the loss
    max_train_images: int | None = None    # train on N images only, each breed in turn (quick runs)
    run_name: str | None = None
    output_dir: str = "outputs/runs"
    cache_dir: str = "data/cache"
    num_threads: int | None = None         # torch CPU threads; None = torch's default
    log_every: int = 20                    # steps between host syncs for the progress bar
    checkpoint_every: float = 60.0         # seconds between last.pt writes (0 = every epoch)

    def __post_init__(self):
        # A notebook passes a Path or a numpy number (np.logspace for a sweep) as readily as a
        # str or a float. Kept as they are, they would reach the checkpoint, which
        # torch.load(weights_only=True) then refuses: plain values only, from here on.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                setattr(self, f.name, os.fspath(value))
            elif type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
                setattr(self, f.name, value.item())

    # ------------------------------------------------------------------ helpers
    def with_recipe(self) -> "RunConfig":
        """A copy with every ``None`` field taken from the default recipe of ``arch``."""
        from labseg.recipes import recipe_for

        check_choice("arch", self.arch, ARCHS)
        filled = {k: v for k, v in recipe_for(self.arch).items() if getattr(self, k) is None}
        if self.epochs is None and parse_duration(self.time_budget):
            filled["epochs"] = UNTIL_BUDGET    # a budget and no epoch count: train until it is spent
        return dataclasses.replace(self, **filled)

    def validate(self) -> "RunConfig":
        """Check every value; raise :class:`ConfigError` naming the first bad one. Returns self."""
        c = self
        check_choice("arch", c.arch, ARCHS)
        for name, choices in (("loss", LOSSES), ("optimizer", OPTIMIZERS),
                              ("scheduler", SCHEDULERS), ("augment", AUGMENTS),
                              ("monitor", MONITORS), ("device", DEVICES)):
            value = getattr(c, name)
            if value is not None:
                check_choice(name, value, choices)
        if c.norm is not None:
            check_choice("norm", c.norm, NORMS)
        if c.decoder_attention is not None:
            check_choice("decoder_attention", c.decoder_attention, DECODER_ATTENTIONS)
        if c.output_stride is not None:
            check_choice("output_stride", c.output_stride, OUTPUT_STRIDES)
        for name, (as_built, archs) in ARCH_OPTIONS.items():
            value = getattr(c, name)
            if c.arch not in archs and value is not None and value != as_built:
                raise ConfigError(f"{name}={value!r} is for {' and '.join(archs)}; {c.arch} has no such option "
                                  f"(use {as_built!r} or leave it unset)")
        for f in dataclasses.fields(c):
            value, kind = getattr(c, f.name), str(f.type)
            if "bool" in kind and not (value is None and "None" in kind):
                check_switch(f.name, value)     # "no" or 0 for a switch would read as on, or pass unnoticed
            elif isinstance(value, str) and "str" not in kind and _reads_as_number(value):
                # -y 'lr: 1e-3': YAML reads an exponent without a dot as text
                raise ConfigError(f"{f.name}={value!r} is text, not a number; give it as a number (YAML, as in "
                                  "papermill -y, reads 1e-3 as text and 1.0e-3 as a number)")
        for name in ("epochs", "batch_size"):
            value = getattr(c, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ConfigError(f"{name}={value!r}: expected a positive integer")
        check_img_size(c.img_size)
        if c.lr is not None and not (_is_number(c.lr) and c.lr > 0):
            raise ConfigError(f"lr={c.lr!r}: expected a positive number such as 1e-3")
        if c.weight_decay is not None and not (_is_number(c.weight_decay) and c.weight_decay >= 0):
            raise ConfigError(f"weight_decay={c.weight_decay!r}: expected a number >= 0")
        if c.ema is not None and not (_is_number(c.ema) and 0 <= c.ema < 1):
            raise ConfigError(f"ema={c.ema!r}: expected a decay in [0, 1), e.g. 0.99 (0 = off)")
        if c.swa is not None and not (_is_number(c.swa) and 0 <= c.swa < 1):
            raise ConfigError(f"swa={c.swa!r}: expected the fraction of training where weight averaging "
                              "starts, in [0, 1), e.g. 0.75 (0 = off)")
        if c.swa and c.scheduler not in (None, "cosine"):
            raise ConfigError(f"swa={c.swa!r} needs scheduler='cosine' (it decays the lr to the "
                              f"averaging lr), not {c.scheduler!r}")
        if c.swa and c.ema:
            raise ConfigError(f"swa={c.swa!r} and ema={c.ema!r}: choose one way of averaging the weights "
                              "(set the other to 0)")
        if c.sam is not None and not (_is_number(c.sam) and 0 <= c.sam <= 1):
            raise ConfigError(f"sam={c.sam!r}: expected the radius rho in [0, 1], e.g. 0.05 (0 = off)")
        if c.copy_paste is not None and not (_is_number(c.copy_paste) and 0 <= c.copy_paste <= 1):
            raise ConfigError(f"copy_paste={c.copy_paste!r}: expected a probability in [0, 1]")
        if c.mosaic is not None and not (_is_number(c.mosaic) and 0 <= c.mosaic <= 1):
            raise ConfigError(f"mosaic={c.mosaic!r}: expected a probability in [0, 1]")
        if c.mosaic_until is not None and not (_is_number(c.mosaic_until) and 0 <= c.mosaic_until <= 1):
            raise ConfigError(f"mosaic_until={c.mosaic_until!r}: expected a fraction of training in [0, 1] "
                              "(1 = mosaics to the end)")
        if c.mosaic_background is not None and not (_is_number(c.mosaic_background) and 0 <= c.mosaic_background <= 1):
            raise ConfigError(f"mosaic_background={c.mosaic_background!r}: expected a probability in [0, 1] "
                              "(0 = every mosaic quarter is a whole sample)")
        if c.elastic is not None and not (_is_number(c.elastic) and 0 <= c.elastic <= 0.25):
            raise ConfigError(f"elastic={c.elastic!r}: expected the std of the elastic shifts as a share of the "
                              "image side in [0, 0.25], e.g. 0.03 (0 = off)")
        if c.drop_path is not None and not (_is_number(c.drop_path) and 0 <= c.drop_path < 1):
            raise ConfigError(f"drop_path={c.drop_path!r}: expected a probability in [0, 1), e.g. 0.1 (0 = off)")
        if c.crop_size is not None and (not _is_int(c.crop_size) or c.crop_size < 0 or c.crop_size % 32):
            raise ConfigError(f"crop_size={c.crop_size!r}: expected a size in px divisible by 32, "
                              "e.g. 64 (0 = no crops)")
        if c.crop_until is not None and not (_is_number(c.crop_until) and 0 <= c.crop_until <= 1):
            raise ConfigError(f"crop_until={c.crop_until!r}: expected a fraction of training in [0, 1]")
        if c.low_res_scale is not None and not (_is_number(c.low_res_scale) and 0 <= c.low_res_scale <= 1):
            raise ConfigError(f"low_res_scale={c.low_res_scale!r}: expected a share of img_size in [0, 1], e.g. "
                              "0.75 (0 = train at img_size throughout)")
        if c.low_res_until is not None and not (_is_number(c.low_res_until) and 0 <= c.low_res_until <= 1):
            raise ConfigError(f"low_res_until={c.low_res_until!r}: expected a fraction of training in [0, 1]")
        # A size without its phase length trained as if it were not given: said, not ignored.
        if c.crop_size and not c.crop_until:
            raise ConfigError(f"crop_size={c.crop_size} does nothing while crop_until={c.crop_until!r}: give crop_until, "
                              "the fraction of training on crops (e.g. 0.5), or crop_size 0 for no crops")
        if c.crop_size and _is_int(c.img_size) and c.crop_size > c.img_size:
            raise ConfigError(f"crop_size={c.crop_size} is larger than img_size={c.img_size}; expected a crop "
                              "of at most the image")
        if c.low_res_scale and not c.low_res_until:
            raise ConfigError(f"low_res_scale={c.low_res_scale} does nothing while low_res_until={c.low_res_until!r}: "
                              "give low_res_until, the fraction of training at the lower size (e.g. 0.5), or "
                              "low_res_scale 0 for none")
        if not (_is_number(c.valid_fraction) and 0 < c.valid_fraction < 1):
            raise ConfigError(f"valid_fraction={c.valid_fraction!r}: expected a number in (0, 1)")
        if not (_is_number(c.checkpoint_every) and c.checkpoint_every >= 0):
            raise ConfigError(f"checkpoint_every={c.checkpoint_every!r}: expected seconds >= 0 between "
                              "writes of last.pt, e.g. 60 (0 = after every epoch)")
        if c.warmup_epochs is not None and not (_is_number(c.warmup_epochs) and c.warmup_epochs >= 0):
            raise ConfigError(f"warmup_epochs={c.warmup_epochs!r}: expected a number of epochs >= 0 (0 = no warm-up)")
        if c.num_threads is not None and (not _is_int(c.num_threads) or c.num_threads <= 0):
            raise ConfigError(f"num_threads={c.num_threads!r}: expected a positive number of CPU threads "
                              "(leave it unset for torch's default)")
        if not _is_int(c.log_every) or c.log_every <= 0:
            raise ConfigError(f"log_every={c.log_every!r}: expected a positive number of steps, e.g. 20")
        for name in ("data_dir", "output_dir", "cache_dir"):
            if not isinstance(getattr(c, name), (str, os.PathLike)):
                raise ConfigError(f"{name}={getattr(c, name)!r}: expected a folder path")
        if not _is_int(c.seed) or c.seed < 0:
            raise ConfigError(f"seed={c.seed!r}: expected an integer >= 0")
        for name in ("output_dir", "cache_dir"):
            check_folder(name, getattr(c, name))
        if not _is_int(c.patience) or c.patience < 0:
            raise ConfigError(f"patience={c.patience!r}: expected an integer >= 0 (0 = off)")
        if c.max_train_images is not None and (not _is_int(c.max_train_images) or c.max_train_images <= 0):
            raise ConfigError(f"max_train_images={c.max_train_images!r}: expected a positive integer")
        if c.run_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", str(c.run_name)):
            raise ConfigError(f"run_name={c.run_name!r}: use letters, digits and . _ - = + only")
        parse_duration(c.time_budget)
        check_device(c.device)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(names))}")
        return cls(**data)

    @property
    def time_budget_s(self) -> float | None:
        return parse_duration(self.time_budget)

    @property
    def low_res_size(self) -> int:
        """The side in px of the early low-resolution epochs: ``low_res_scale`` × ``img_size`` to the
        nearest multiple of 32 (the networks' stride). 0 when there is no such phase: no scale, or
        one that rounds to ``img_size`` or to nothing (at 64 px, 0.75 rounds to 64: off)."""
        if not self.low_res_scale:
            return 0
        size = int(self.img_size * self.low_res_scale / 32 + 0.5) * 32
        return size if 32 <= size < self.img_size else 0


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def check_device(device: str) -> None:
    """Fail early, naming the device, when it is not available on this machine."""
    import torch

    check_choice("device", device, DEVICES)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not available on this machine (torch.cuda.is_available() "
                          "is False); available: " + ", ".join(available_devices()))
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device='mps' is not available on this machine; available: "
                          + ", ".join(available_devices()))


def available_devices() -> list[str]:
    import torch

    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append("mps")
    return out


def pick_device(device: str = "auto"):
    """The torch device for a config value: 'auto' prefers cuda, then mps, then cpu."""
    import torch

    check_device(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)
