"""The sections of an experiment config: one dataclass each (field comments are the documentation)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from islkeras.config.parse import to_dict

__all__ = ["Zoom", "Brightness", "Contrast", "Gamma", "Blur", "Noise", "AugmentConfig", "ChannelSpec", "SpatialSplit", "SplitSpec", "DataConfig", "PipelineConfig", "ModelConfig", "LossConfig",
           "EarlyStoppingConfig", "TrainingConfig", "TransferConfig", "ExperimentConfig"]


@dataclass
class ChannelSpec:
    """Where one named channel of a field lives (``channel``: its name or index in a CZI/ND2/LIF/OME file)."""

    file: str  #: file name (glob allowed) inside the field folder, or a pattern with ``{field}``
    planes: Union[str, list[int]] = "all"  #: ``"all"`` or a list of z indices into a 3-D stack
    projection: Literal["none", "max", "mean"] = "none"  #: collapse the selected planes into one
    channel: Optional[Union[str, int]] = field(default=None, metadata={"omit_default": True})  #: in the file
    time: int = field(default=0, metadata={"omit_default": True})  #: time point of a time-lapse file


@dataclass
class SpatialSplit:
    """Split each field into disjoint horizontal bands (for data sets with a single field)."""

    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    margin: int = 32  #: pixels dropped between neighbouring bands so no crop straddles two splits
    axis: Literal["y", "x"] = "y"


@dataclass
class SplitSpec:
    """How fields are assigned to train/val/test. Exactly one of csv, fractions or spatial is used."""

    csv: Optional[str] = None  #: ``"fields.csv:split"`` -- CSV (relative to data.root) and its column
    id_column: Optional[str] = None  #: CSV column with the field name (default: the first column)
    fractions: Optional[dict[str, float]] = None  #: seeded random fractions, e.g. {"train": .8, ...}
    seed: int = 0
    spatial: Optional[SpatialSplit] = None


@dataclass
class DataConfig:
    root: str  #: folder holding the fields (resolved against the config file)
    channels: dict[str, ChannelSpec]
    inputs: list[str]  #: channel names stacked as network input
    targets: list[str] = field(default_factory=list)  #: channel names predicted
    masks: list[str] = field(default_factory=list)  #: optional label/mask channels (segmentation)
    fields: str = "*"  #: glob of field folders under root (one folder per field)
    split: SplitSpec = field(default_factory=lambda: SplitSpec(fractions={"train": 0.8, "val": 0.1, "test": 0.1}))
    records: str = "records"  #: output folder of convert (resolved against the config file)
    shard_size: int = 8  #: fields per TFRecord shard
    workers: int = 0  #: parallel readers in convert (0 = number of CPUs)
    #: micrometres per pixel of the fields: a number (every field), ``"fields.csv:column"`` (per field, a column of
    #: a CSV under data.root) or ``"metadata"`` (each field's TIFF: ImageJ resolution/spacing or OME PhysicalSizeX/Y);
    #: null: unknown (fields are not resampled)
    pixel_size_um: Optional[Union[float, str]] = field(default=None, metadata={"omit_default": True})


# Robustness augmentation (pipeline.augment): each transform has a probability ``p`` (0 = off) and a range; all run on
# training crops only, after the crop, seeded by pipeline.seed; nothing of it at evaluation.
@dataclass
class Zoom:
    p: float = 0.0
    range: list[float] = field(default_factory=lambda: [0.75, 1.33])  #: scale factor (>1: objects larger), log-uniform


@dataclass
class Brightness:
    p: float = 0.0
    range: list[float] = field(default_factory=lambda: [-0.3, 0.3])  #: offset added to the normalised input


@dataclass
class Contrast:
    p: float = 0.0
    range: list[float] = field(default_factory=lambda: [0.67, 1.5])  #: factor around the crop's mean, log-uniform


@dataclass
class Gamma:
    p: float = 0.0
    range: list[float] = field(default_factory=lambda: [0.67, 1.5])  #: exponent on the crop scaled to [0, 1]


@dataclass
class Blur:
    p: float = 0.0
    range: list[float] = field(default_factory=lambda: [0.5, 2.0])  #: Gaussian sigma in pixels (defocus)


@dataclass
class Noise:
    p: float = 0.0
    range: list[float] = field(default_factory=lambda: [0.02, 0.2])  #: Gaussian sigma, in units of the crop's std
    poisson: float = 0.0  #: probability that the noise is Poisson (shot noise of the same relative strength)


@dataclass
class AugmentConfig:
    """``pipeline.augment`` as an object; ``true`` is ``{"dihedral": true}``, ``false`` turns everything off."""

    dihedral: bool = True  #: the 8 rot90/flip symmetries, identical for input and target
    zoom: Zoom = field(default_factory=Zoom)  #: input and target resampled identically, crop size kept
    brightness: Brightness = field(default_factory=Brightness)  #: inputs only, as are the four below
    contrast: Contrast = field(default_factory=Contrast)
    gamma: Gamma = field(default_factory=Gamma)
    blur: Blur = field(default_factory=Blur)
    noise: Noise = field(default_factory=Noise)


@dataclass
class PipelineConfig:
    crop_size: int = 512
    crops_per_field: int = 1  #: random crops taken from each field read
    normalization: Literal["zscore", "dataset", "minmax", "percentile"] = "zscore"
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.8])
    #: training augmentation: true = the 8 rot90/flip symmetries (input and target alike), false = none, or an
    #: object (AugmentConfig) adding zoom, brightness/contrast/gamma, blur and noise
    augment: Union[bool, AugmentConfig] = True
    drop_empty: bool = False  #: drop crops whose target is empty (below the stored threshold)
    empty_fraction: float = 0.005  #: a crop is empty when fewer target pixels are above threshold
    shuffle_buffer: int = 64
    #: column of the split CSV (data.split.csv), e.g. the experiment a field comes from: training draws
    #: fields so that every group of that column is sampled equally often, whatever its number of fields
    balance_by: Optional[str] = None
    eval_mode: Literal["grid", "whole"] = "grid"  #: val/test crops: fixed grid of crops, or whole fields
    cache: bool = True  #: keep decoded records in memory (fields are read once)
    seed: int = 0
    #: the model's working pixel size in micrometres: fields are resampled to it at conversion (null: the median
    #: pixel size of the training fields when data.pixel_size_um is set, else no resampling)
    pixel_size_um: Optional[float] = field(default=None, metadata={"omit_default": True})

    def augmentation(self) -> "AugmentConfig":
        """``augment`` as an AugmentConfig (a bool becomes rot90/flip on or everything off)."""
        if isinstance(self.augment, AugmentConfig):
            return self.augment
        return AugmentConfig(dihedral=bool(self.augment))


@dataclass
class ModelConfig:
    architecture: Literal["unet_sm", "unet"] = "unet_sm"  #: segmentation-models U-Net or plain U-Net
    backbone: str = "densenet121"
    encoder_weights: Optional[str] = None  #: null, "imagenet" or a path to a local weights file
    encoder_freeze: bool = False
    decoder_filters: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])
    unet_filters: int = 32  #: first-level filters of the plain U-Net (doubles per level)
    unet_depth: int = 4


@dataclass
class LossConfig:
    kind: Literal["l1", "l2", "pix2pix", "perceptual"] = "l1"
    # pix2pix
    l1_lambda: float = 100.0
    discriminator_lr: Optional[float] = None  #: default: training.learning_rate
    patchgan_filters: int = 64
    # perceptual
    content_weight: float = 0.8
    pixel_weight: float = 0.1
    tv_weight: float = 0.1
    style_weight: float = 0.0
    pixel_loss: Literal["l1", "l2"] = "l1"
    vgg_layers: list[str] = field(default_factory=lambda: ["block2_conv2", "block3_conv4", "block4_conv4"])
    vgg_weights: Optional[str] = "imagenet"  #: "imagenet", null (random; tests only) or a local file


@dataclass
class EarlyStoppingConfig:
    monitor: str = "val_pcc"
    mode: Literal["max", "min", "auto"] = "auto"
    patience: int = 10
    restore_best_weights: bool = True


@dataclass
class TrainingConfig:
    batch_size: int = 4  #: global batch size (split over replicas)
    epochs: int = 10
    steps_per_epoch: int = 100
    validation_steps: Optional[int] = None  #: default: all validation crops
    validation: bool = True  #: records need val fields; false: no validation, best epoch on training metrics
    learning_rate: float = 1e-3
    lr_schedule: Optional[Literal["cosine", "plateau"]] = None
    early_stopping: Optional[EarlyStoppingConfig] = field(default_factory=EarlyStoppingConfig)
    max_minutes: Optional[float] = None  #: safety cap: stop after the epoch that crosses it (reported)
    strategy: Literal["default", "mirrored", "multiworker", "auto"] = "default"
    devices: Optional[list[str]] = None  #: for mirrored: named devices (default all local GPUs)
    mixed_precision: Optional[Literal["mixed_float16", "mixed_bfloat16"]] = None
    jit_compile: bool = False
    seed: int = 0
    runs_dir: str = "runs"  #: run folders go to <runs_dir>/<name>/<timestamp>/
    init_from: Optional[str] = None  #: run folder or SavedModel whose weights (head too) start training


@dataclass
class TransferConfig:
    """``islkeras transfer``: nuclei segmentation initialised from an ISL model (see islkeras.segmentation.transfer)."""

    isl_run: Optional[str] = None  #: ISL run folder or SavedModel; null trains from scratch
    mask_channel: str = "mask"
    train_fields: Optional[int] = None  #: use only the first N train fields, sorted by name (null = all)
    init: Literal["all_calibrated", "all_but_head", "all"] = "all_calibrated"  #: see islkeras.segmentation.transfer
    threshold: float = 0.5
    calibration_slope: Optional[float] = None  #: all_calibrated: logit = slope*(z - t); null: background at p~0.0025
    keep_start: bool = True  #: all_calibrated: score the start on val/test; keep it if no epoch beats it on val
    freeze_batchnorm: bool = False  #: ISL-initialised runs keep the ISL BatchNorm statistics (frozen)
    isl_learning_rate: Optional[float] = None  #: learning rate of ISL-initialised runs (null: training.learning_rate)
    # few-image experiment (islkeras.segmentation.experiment): set sweep_train_fields to run it
    sweep_train_fields: Optional[list[int]] = None  #: e.g. [1, 3, 18]: ISL-initialised vs scratch per N
    compare_scratch: bool = True  #: in a sweep, also train every N from scratch
    pretrain: Optional[str] = None  #: ISL experiment config trained first when isl_run is null (sweep only)
    pretrain_set: dict[str, Any] = field(default_factory=dict)  #: dotted-key overrides for the pretrain config


@dataclass
class ExperimentConfig:
    name: str
    data: DataConfig
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    transfer: Optional[TransferConfig] = None
    description: str = ""
    #: folder of the config file; relative paths were resolved against it (not part of the JSON)
    base_dir: str = field(default=".", metadata={"internal": True})
    source: str = field(default="<dict>", metadata={"internal": True})

    # ------------------------------------------------------------------ convenience
    def to_dict(self) -> dict:
        return to_dict(self)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: Union[str, Path]) -> None:
        from islkeras.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


