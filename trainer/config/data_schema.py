"""The data section of a config (a folder of images, a labels CSV, a text file) and what the images
go through (augmentation, test-time augmentation)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from trainer.config.base import Pixels, PosInt, Strict

# What `data.stats: imagenet` means: ImageNet's mean and std per channel, in [0, 1] units.
IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


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
