"""The typed config: what a YAML file may say, with defaults and ranges.

Every model forbids unknown keys so a typo fails before any work starts (base.Strict); the data
section is in data_schema. Config files hold only what differs from these defaults (the nanoGPT habit).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from trainer.config.base import Metric, Pixels, PosFloat, PosInt, Strict
from trainer.config.data_schema import DataConfig, Transforms, Tta


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a folder (a run's, a study's), or None. One rule for both."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or any(ord(c) < 32 or c == "\x7f" for c in name):
        return "must be a plain word (it names a folder)"
    if len(name.encode("utf-8")) > 100:  # file systems allow 255 bytes; the run folder adds more
        return f"is {len(name.encode('utf-8'))} bytes long; at most 100 (it names a folder)"
    return None


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


class ModelConfig(Strict):
    arch: str
    layers: list[PosInt] | None = None
    ps: Annotated[float, Field(ge=0, lt=1)] | None = None
    pretrained: bool | str = False
    # residual layers after each stride-2 layer (bnresnet, bnresnet2d): one number for every stage, or one per stage
    blocks: Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]] | None = None
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
