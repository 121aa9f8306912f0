"""The typed config: what a YAML file may say, with defaults and ranges.

Every model forbids unknown keys so a typo fails before any work starts.
Config files hold only what differs from these defaults (the nanoGPT habit).
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

# What `data.stats: imagenet` means: ImageNet's mean and std per channel, in [0, 1] units.
IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

PosFloat = Annotated[float, Field(gt=0)]
PosInt = Annotated[int, Field(ge=1)]
# Image sizes in pixels: 8192 px squared is 200 MB a colour image, already far past any course config.
Pixels = Annotated[int, Field(ge=1, le=8192)]


def _takes(tp, kinds: tuple) -> bool:
    """Whether a field's annotation accepts a value of one of `kinds` (through unions, lists, Literals)."""
    if tp in kinds:
        return True
    if get_origin(tp) is Literal:
        return any(type(a) in kinds for a in get_args(tp))
    return any(_takes(a, kinds) for a in get_args(tp))


def _holds_bool(v) -> bool:
    return isinstance(v, bool) or (isinstance(v, list | tuple) and any(_holds_bool(x) for x in v))


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a folder (a run's, a study's), or None. One rule for both."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or any(ord(c) < 32 or c == "\x7f" for c in name):
        return "must be a plain word (it names a folder)"
    if len(name.encode("utf-8")) > 100:  # file systems allow 255 bytes; the run folder adds more
        return f"is {len(name.encode('utf-8'))} bytes long; at most 100 (it names a folder)"
    return None


class Strict(BaseModel):
    # inf and nan are never a sensible setting (an infinite lr passes `gt=0`)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_number(cls, data):
        # pydantic reads true as 1.0 for a number: `mixup: true` would mean alpha 1.0 unsaid.
        # The error carries the key (the loader adds it to the loc, as for a union's tag).
        for key, v in data.items() if isinstance(data, dict) else ():
            field = cls.model_fields.get(key)
            if not field or not _holds_bool(v) or _takes(field.annotation, (bool,)):
                continue
            if _takes(field.annotation, (int, float)):
                raise PydanticCustomError(
                    "bool_for_number", "takes a number, not {value}", {"key": key, "value": str(v).lower()}
                )
        return data


class LrSpread(Strict):
    """`{max: 1e-2, ratio: 3}` gives [max/9, max/3, max] over three layer groups;
    `{max: auto, ratio: 3}` runs lr_find with those ratios and uses its recommendation as max."""

    max: PosFloat | Literal["auto"]
    ratio: PosFloat = 3.0


LrSpec = PosFloat | list[PosFloat] | LrSpread | Literal["auto"]


class FineTune(Strict):
    """fastai's fine_tune: a frozen 1cycle, then unfrozen at [lr/100 .. lr]."""

    freeze_epochs: PosInt = 1
    ratio: PosFloat = 100.0


class Stage(Strict):
    name: str = "train"
    epochs: PosInt | None = None
    schedule: Literal["one_cycle", "sgdr", "constant", "warmup_cosine"] = "one_cycle"
    lr: LrSpec = 3e-3
    wd: Annotated[float, Field(ge=0)] | list[Annotated[float, Field(ge=0)]] | None = None
    # 1cycle
    pct_start: Annotated[float, Field(ge=0, le=1)] = 0.25
    div: PosFloat = 25.0
    div_final: PosFloat = 1e4
    moms: tuple[float, float, float] = (0.95, 0.85, 0.95)
    # SGDR: n_cycles of cycle_len epochs, each cycle_mult times longer than the last
    n_cycles: PosInt | None = None
    cycle_len: PosInt = 1
    cycle_mult: PosInt = 1
    save_cycles: bool = False
    # warmup + cosine
    warmup_pct: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # freezing; unset means "as the previous stage left it"
    freeze: Literal["body", "none"] | None = None
    freeze_to: Annotated[int, Field(ge=0)] | None = None
    unfreeze: bool = False
    train_bn: bool = False
    bn_freeze: bool = False
    # data per stage (progressive resizing, bigger batches later)
    size: Pixels | None = None
    bs: PosInt | None = None
    precompute: bool = False
    fine_tune: FineTune | None = None

    @model_validator(mode="after")
    def _epochs_or_cycles(self):
        if self.schedule == "sgdr":
            if self.n_cycles is None and self.epochs is None:
                raise ValueError("an sgdr stage needs n_cycles (or epochs)")
        elif self.epochs is None:
            raise ValueError("a stage needs epochs")
        if self.save_cycles and self.schedule != "sgdr":
            raise ValueError("save_cycles needs schedule: sgdr (it saves the weights at each cycle's end)")
        return self

    @property
    def total_epochs(self) -> int:
        if self.schedule == "sgdr" and self.n_cycles is not None:
            return sum(self.cycle_len * self.cycle_mult**k for k in range(self.n_cycles))
        return int(self.epochs)


class Train(Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = False  # sgd only
    betas: tuple[float, float] = (0.9, 0.99)
    eps: PosFloat = 1e-5
    wd: Annotated[float, Field(ge=0)] = 0.01
    loss: Literal["auto", "cross_entropy", "bce"] = "auto"
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # multi-label: the probability above which a tag is predicted, chosen on the validation set
    # for the best F2: one for every tag, or one per tag (saved in threshold.json; predict uses it)
    threshold: Literal["single", "per_class"] = "single"
    clip: PosFloat | None = None
    checkpoint_every: Literal["epoch"] | PosInt = "epoch"
    on_nan: Literal["stop", "skip"] = "stop"
    # each batch in `accumulate` micro-batches (less memory, same optimizer step); the batch the
    # optimizer sees stays data.bs, across all processes together
    accumulate: PosInt = 1
    sync_bn: bool = False  # several processes: BatchNorm statistics over the whole batch
    # decay per step of an exponential moving average of the weights (e.g. 0.999): validation,
    # checkpoints and predictions use the average; None: off
    ema: Annotated[float, Field(gt=0, lt=1)] | None = None
    early_stop: EarlyStop | None = None
    stages: Annotated[list[Stage], Field(min_length=1)]

    @model_validator(mode="after")
    def _nesterov_with_sgd(self):
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer: sgd with momentum > 0")
        return self


# The metrics a run can report (which ones depend on the task: single-label, multi-label, text).
METRICS = ("valid_loss", "train_loss", "accuracy", "fbeta", "accuracy_thresh", "bpc")
LOWER_IS_BETTER = ("valid_loss", "train_loss", "bpc")


def better_mode(monitor: str, mode: str = "auto") -> str:
    """min or max: `mode` when given, else min for losses (and bits per character), max otherwise."""
    if mode != "auto":
        return mode
    return "min" if monitor in LOWER_IS_BETTER or monitor.endswith(("loss", "error")) else "max"


def known_metric(name: str) -> str:
    if name not in METRICS:
        from trainer.registry import did_you_mean

        hint = did_you_mean(name, METRICS)
        raise ValueError(f"unknown metric '{name}' (one of {', '.join(METRICS)})" + (f"; {hint}" if hint else ""))
    return name


Metric = Annotated[str, AfterValidator(known_metric)]


class EarlyStop(Strict):
    """Stop the run after `patience` epochs in a row without an improvement of more than
    `min_delta` in `monitor` (Lightning's EarlyStopping)."""

    monitor: Metric = "valid_loss"
    patience: PosInt = 3
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    mode: Literal["auto", "min", "max"] = "auto"


class Checkpoint(Strict):
    """best.pt holds the best state by `monitor`; `keep: k` also keeps the k best of the whole run
    as checkpoints/top-1.pt .. top-k.pt, listed with their metric in checkpoints/index.json."""

    monitor: Metric = "valid_loss"
    mode: Literal["auto", "min", "max"] = "auto"
    keep: Annotated[int, Field(ge=0, le=100)] = 0


class Mlflow(Strict):
    # None: MLflow's own choice, $MLFLOW_TRACKING_URI or else sqlite:///mlflow.db in the working folder
    uri: str | None = Field(None, min_length=1, description="an MLflow tracking URI")
    experiment: str | None = Field(None, min_length=1, description="the MLflow experiment (default: the config's name)")


class Track(Strict):
    """Experiment trackers, any combination; metrics.csv stays the run's own record."""

    tensorboard: bool = False  # event files in RUN/tensorboard/
    mlflow: Mlflow | None = None
    every: PosInt = 50  # the train loss and lr every this many steps

    @field_validator("mlflow", mode="before")
    @classmethod
    def _mlflow_true(cls, v):
        return {} if v is True else None if v is False else v


class Distributed(Strict):
    """Several processes (torchrun, or `trainer fit --devices N`). auto: nccl on CUDA, gloo on the CPU."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"


class Transforms(Strict):
    preset: Literal["none", "side_on", "top_down", "pad_crop"] = "none"
    max_zoom: Annotated[float, Field(ge=1)] = 1.0
    max_rotate: Annotated[float, Field(ge=0, le=180)] = 10.0
    max_lighting: Annotated[float, Field(ge=0, lt=1)] = 0.2
    p_flip: Annotated[float, Field(ge=0, le=1)] = 0.5
    p_affine: Annotated[float, Field(ge=0, le=1)] = 0.75
    p_lighting: Annotated[float, Field(ge=0, le=1)] = 0.75
    pad: Annotated[int, Field(ge=0)] | None = None
    cutout: Annotated[int, Field(ge=0)] = 0  # side of a square blanked per image, in pixels (0: off)
    # automatic augmentation per image (magnitude and ops: RandAugment's; 31 bins as torchvision)
    auto: Literal["none", "randaugment", "trivialaugment", "autoaugment"] = "none"
    magnitude: Annotated[int, Field(ge=0, le=30)] = 9
    ops: PosInt = 2
    erasing: Annotated[float, Field(ge=0, le=1)] = 0.0  # random erasing's probability per image (timm's reprob)
    # MixUp / CutMix on training batches: Beta(alpha, alpha) weights (0: off), as timm's Mixup
    mixup: Annotated[float, Field(ge=0)] = 0.0
    cutmix: Annotated[float, Field(ge=0)] = 0.0
    mix_prob: Annotated[float, Field(ge=0, le=1)] = 1.0  # the chance a batch is mixed
    switch_prob: Annotated[float, Field(ge=0, le=1)] = 0.5  # CutMix's share when both are on

    @model_validator(mode="after")
    def _auto_keys(self, info: ValidationInfo):
        # magnitude and ops are RandAugment's: TrivialAugment draws a magnitude, AutoAugment has its
        # policy. A run's saved config from before this check still loads (it trained that way).
        if (info.context or {}).get("saved") or self.auto == "randaugment":
            return self
        for key, default in (("magnitude", 9), ("ops", 2)):
            if getattr(self, key) != default:
                raise ValueError(f"{key} is RandAugment's (auto: randaugment); with auto: {self.auto} it does nothing")
        return self

    def per_image(self) -> dict:
        """The per-image augmentation's keys (the data's); mixing acts on whole batches (the loop's)."""
        return self.model_dump(exclude={"preset", "mixup", "cutmix", "mix_prob", "switch_prob"})


class Tta(Strict):
    """n augmented views blended with the plain view (weight beta on the plain one). mode auto:
    deterministic flips (and, with pad_crop, fixed shifts) up to 64 px, seeded random views above."""

    n: Annotated[int, Field(ge=0)] = 4
    beta: Annotated[float, Field(ge=0, le=1)] = 0.25
    mode: Literal["auto", "flips", "random"] = "auto"


class Subset(Strict):
    """A seeded random subset of the items (quick experiments on a slice of a big dataset)."""

    train: PosInt | None = None
    valid: PosInt | None = None


class ImageData(Strict):
    path: str = Field(description="the dataset's folder")
    bs: PosInt = 64
    train: str = Field("train", description="the folder of training images, under data.path")
    test: str | None = None
    size: Pixels | None = None
    # how a non-square image becomes a square (fastai's ResizeMethod): crop its centre, squish it,
    # or pad it (with its reflection, or zeros) to keep all of it
    resize: Literal["crop", "squish", "pad"] = "crop"
    pad_mode: Literal["reflection", "zeros"] = "reflection"
    channels: Literal[1, 3] = 3
    stats: Literal["auto", "imagenet", "none"] | tuple[list[float], list[float]] | None = None
    cache_size: Pixels | None = None
    cache_dir: str | None = None
    on_bad_image: Literal["error", "skip"] = "error"
    valid_bs: PosInt | None = None
    subset: Subset | None = None
    # keep the decoded uint8 images on the GPU (no copy per batch); auto: when they take under
    # a quarter of its free memory. On the CPU the cache already is in memory (memory-mapped).
    on_device: Literal["auto"] | bool = "auto"

    @field_validator("stats")
    @classmethod
    def _positive_std(cls, v):
        if isinstance(v, tuple) and (len(v[0]) != len(v[1]) or not v[0] or any(s <= 0 for s in v[1])):
            raise ValueError("give [mean per channel] and [std per channel] of the same length, every std > 0")
        return v


class FolderData(ImageData):
    layout: Literal["folder"]
    valid: str = "valid"


class CsvData(ImageData):
    layout: Literal["csv"]
    labels: str = Field("labels.csv", description="the labels CSV, under data.path")
    # the CSV's columns by name (Kaggle's planet: image_name and tags); unset: the first two columns
    id_column: str | None = Field(None, min_length=1, description="the CSV column holding the image ids")
    label_column: str | None = Field(None, min_length=1, description="the CSV column holding the labels")
    suffix: str = Field("", description="the ending added to each id to name its image file, e.g. .jpg ('' for none)")
    valid_pct: Annotated[float, Field(gt=0, lt=1)] = 0.2
    valid_ids: str | None = None
    label_delim: str = " "


class TextData(Strict):
    layout: Literal["text"]
    path: str
    valid_path: str | None = None
    valid_pct: Annotated[float, Field(gt=0, lt=1)] = 0.1
    bs: PosInt = 64
    bptt: Annotated[int, Field(ge=5)] = 70


DataConfig = Annotated[FolderData | CsvData | TextData, Field(discriminator="layout")]


class ModelConfig(Strict):
    arch: str
    layers: list[PosInt] | None = None
    ps: Annotated[float, Field(ge=0, lt=1)] | None = None
    pretrained: bool | str = False
    n_fac: PosInt | None = None
    n_hidden: PosInt | None = None
    n_layers: PosInt | None = None
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    head: Literal["ours", "timm"] = "ours"  # timm archs only: timm's own classifier instead of ours

    def arch_kwargs(self) -> dict:
        """The options set for the architecture's factory (unset ones keep its defaults)."""
        return {
            k: v
            for k, v in self.model_dump(exclude={"arch"}).items()
            if v is not None and not (k == "pretrained" and v is False) and not (k == "head" and v == "ours")
        }


class Config(Strict):
    name: str = "run"
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None  # unset: a random seed, recorded in the run
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    compile: bool = False
    deterministic: bool = False
    channels_last: bool = False
    data: DataConfig
    model: ModelConfig
    train: Train
    transforms: Transforms = Transforms()
    tta: Tta = Tta()
    distributed: Distributed = Distributed()
    checkpoint: Checkpoint = Checkpoint()
    track: Track = Track()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if problem := name_problem(v):
            raise ValueError(f"name {problem}")
        return v
