"""Experiment configuration: one JSON file -> typed, validated dataclasses.

Every section is a dataclass; unknown or misspelt keys are rejected with the file, the key path and the
closest valid key. Paths are resolved against the config file's folder after expanding environment
variables written as ``${VAR}`` or ``${VAR:-default}`` (the shipped configs use
``${ISLKERAS_DATA:-../../shared/data}`` so the data root can be moved with one variable).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from islkeras.errors import ConfigError  # noqa: E402  (re-exported)


# --------------------------------------------------------------------------------------------- sections
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


@dataclass
class PipelineConfig:
    crop_size: int = 512
    crops_per_field: int = 1  #: random crops taken from each field read
    normalization: Literal["zscore", "dataset", "minmax", "percentile"] = "zscore"
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.8])
    augment: bool = True  #: the 8 rot90/flip symmetries, identical for input and target
    drop_empty: bool = False  #: drop crops whose target is empty (below the stored threshold)
    empty_fraction: float = 0.005  #: a crop is empty when fewer target pixels are above threshold
    shuffle_buffer: int = 64
    #: column of the split CSV (data.split.csv), e.g. the experiment a field comes from: training draws
    #: fields so that every group of that column is sampled equally often, whatever its number of fields
    balance_by: Optional[str] = None
    eval_mode: Literal["grid", "whole"] = "grid"  #: val/test crops: fixed grid of crops, or whole fields
    cache: bool = True  #: keep decoded records in memory (fields are read once)
    seed: int = 0


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


# --------------------------------------------------------------------------------------------- parsing
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
#: JSON scalar types of the config: accepted Python types and their name in errors
_SCALARS = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number"),
            str: (str, "a string")}


def expand_path(value: str, base_dir: Union[str, Path]) -> str:
    """Expand ``${VAR}``/``${VAR:-default}`` and ``~``, then resolve against base_dir."""

    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        if os.environ.get(var) is None and default is None:
            raise ConfigError(f"environment variable {var} is not set (used in path {value!r})")
        return os.environ.get(var, default)

    p = Path(os.path.expanduser(_ENV.sub(sub, value)))
    return str(Path(os.path.normpath(p if p.is_absolute() else Path(base_dir) / p)))


def _is_internal(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("internal"))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, source: str) -> Any:
    """Convert a JSON value to the annotated type, raising ConfigError with the key path."""
    origin = typing.get_origin(tp)
    where = f"{source}: {path}"
    if origin is Union:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: null is not allowed, expected {_type_name(tp)}")
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path, source)
            except ConfigError:  # try the next type of the union
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {json.dumps(value)[:60]}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: {json.dumps(value)} is not one of {_type_name(tp)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {json.dumps(value)[:60]}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp) or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {json.dumps(value)[:60]}")
        if origin is not dict:
            return _from_dict(tp, value, path, source)
        _, vt = typing.get_args(tp)
        return {str(k): _convert(v, vt, f"{path}.{k}", source) for k, v in value.items()}
    if tp in _SCALARS:  # a bool is not accepted as a number
        types, what = _SCALARS[tp]
        if not isinstance(value, types) or (isinstance(value, bool) and tp is not bool):
            raise ConfigError(f"{where}: expected {what}, got {json.dumps(value)[:60]}")
        return float(value) if tp is float else value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _from_dict(cls: type, data: dict, path: str, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not _is_internal(f)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(filter(None, [path, close[0]]))!r}?" if close else ""
            valid = ", ".join(fields)
            raise ConfigError(f"{source}: unknown key {'.'.join(filter(None, [path, key]))!r}{hint} "
                              f"(valid keys: {valid})")
    kwargs = {}
    for name, f in fields.items():
        sub = ".".join(filter(None, [path, name]))
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], sub, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {sub!r}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not _is_internal(f)
                and not (f.metadata.get("omit_default") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def _validate(cfg: ExperimentConfig) -> None:
    src = cfg.source
    d = cfg.data
    if not d.inputs:
        raise ConfigError(f"{src}: data.inputs must name at least one channel")
    for key in ("inputs", "targets", "masks"):
        for i, name in enumerate(getattr(d, key)):
            if name not in d.channels:
                close = difflib.get_close_matches(name, list(d.channels), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{src}: data.{key}[{i}] names channel {name!r}, which is not in data.channels "
                                  f"({', '.join(d.channels)}){hint}")
    for name, ch in d.channels.items():
        if isinstance(ch.planes, str) and ch.planes != "all":
            raise ConfigError(f"{src}: data.channels.{name}.planes must be \"all\" or a list of z indices")
        if isinstance(ch.planes, list) and (not ch.planes or any(p < 0 for p in ch.planes)):
            raise ConfigError(f"{src}: data.channels.{name}.planes must be a non-empty list of indices >= 0")
        if ch.time < 0 or (isinstance(ch.channel, int) and ch.channel < 0):
            raise ConfigError(f"{src}: data.channels.{name}: time and a channel index must be >= 0")
    s = d.split
    modes = [m for m in ("csv", "fractions", "spatial") if getattr(s, m) is not None]
    if len(modes) != 1:
        raise ConfigError(f"{src}: data.split needs exactly one of csv, fractions, spatial (got {modes or 'none'})")
    fr = s.fractions if s.fractions is not None else (s.spatial.fractions if s.spatial else None)
    if fr is not None:
        bad = set(fr) - {"train", "val", "test"}
        if bad:
            raise ConfigError(f"{src}: data.split fractions: unknown split(s) {sorted(bad)}; use train/val/test")
        if any(v < 0 for v in fr.values()) or abs(sum(fr.values()) - 1.0) > 1e-6:
            raise ConfigError(f"{src}: data.split fractions must be >= 0 and sum to 1 (got {fr})")
    if s.csv is not None and ":" not in s.csv:
        raise ConfigError(f"{src}: data.split.csv must look like 'fields.csv:column', got {s.csv!r}")
    for sect, key in (("data", "shard_size"), ("pipeline", "crops_per_field"), ("training", "batch_size"),
                      ("training", "epochs"), ("training", "steps_per_epoch")):
        if getattr(getattr(cfg, sect), key) < 1:
            raise ConfigError(f"{src}: {sect}.{key} must be >= 1")
    p = cfg.pipeline
    if p.crop_size < 16 or p.crop_size % 32 != 0:
        raise ConfigError(f"{src}: pipeline.crop_size must be a multiple of 32 and >= 32 (got {p.crop_size})")
    from islkeras.data.normalize import STAT_PERCENTILES

    if not (len(p.percentiles) == 2 and p.percentiles[0] < p.percentiles[1]
            and all(q in STAT_PERCENTILES for q in p.percentiles)):
        raise ConfigError(
            f"{src}: pipeline.percentiles must be [low, high] from the stored percentiles "
            f"({', '.join(f'{q:g}' for q in STAT_PERCENTILES)}), got {p.percentiles}"
        )
    if p.balance_by is not None and s.csv is None:
        raise ConfigError(f"{src}: pipeline.balance_by {p.balance_by!r} names a column of the split CSV, "
                          f"but data.split.csv is not set")
    t = cfg.training
    if t.learning_rate <= 0:
        raise ConfigError(f"{src}: training.learning_rate must be > 0")
    if cfg.loss.kind in ("l1", "l2", "pix2pix", "perceptual") and not d.targets and cfg.transfer is None:
        raise ConfigError(f"{src}: data.targets is empty; an ISL experiment needs at least one target channel")
    tr = cfg.transfer
    if tr is not None:
        if tr.mask_channel not in d.channels:
            raise ConfigError(
                f"{src}: transfer.mask_channel {tr.mask_channel!r} is not in data.channels ({', '.join(d.channels)})")
        if tr.train_fields is not None and tr.train_fields < 1:
            raise ConfigError(f"{src}: transfer.train_fields must be >= 1 or null (all), got {tr.train_fields}")
        if tr.sweep_train_fields is not None and (not tr.sweep_train_fields or min(tr.sweep_train_fields) < 1):
            raise ConfigError(f"{src}: transfer.sweep_train_fields must be a non-empty list of integers >= 1")
        if tr.isl_learning_rate is not None and tr.isl_learning_rate <= 0:
            raise ConfigError(f"{src}: transfer.isl_learning_rate must be > 0 or null")
        if not 0.0 < tr.threshold < 1.0:
            raise ConfigError(f"{src}: transfer.threshold must be between 0 and 1, got {tr.threshold}")
    w = cfg.model.encoder_weights
    if w not in (None, "imagenet") and not Path(w).is_file():
        raise ConfigError(f"{src}: model.encoder_weights: no weights file at {w} (use null, \"imagenet\" or a file)")
    vw = cfg.loss.vgg_weights
    if cfg.loss.kind == "perceptual" and vw not in (None, "imagenet") and not Path(vw).is_file():
        raise ConfigError(f"{src}: loss.vgg_weights: no weights file at {vw} (use \"imagenet\", null or a file)")


def _resolve_paths(cfg: ExperimentConfig) -> None:
    b = cfg.base_dir
    # (section, path key, values that are not paths)
    for section, key, keep in ((cfg.data, "root", ()), (cfg.data, "records", ()), (cfg.training, "runs_dir", ()),
                               (cfg.training, "init_from", (None,)),
                               (cfg.model, "encoder_weights", (None, "imagenet")),
                               (cfg.loss, "vgg_weights", (None, "imagenet")),
                               (cfg.transfer, "isl_run", (None,)), (cfg.transfer, "pretrain", (None,))):
        if section is not None and getattr(section, key) not in keep:
            setattr(section, key, expand_path(getattr(section, key), b))


def from_dict(data: dict, base_dir: Union[str, Path] = ".", source: str = "<dict>",
              overrides: Optional[dict] = None) -> ExperimentConfig:
    """Build a validated config from a dict. ``overrides`` maps dotted keys to values (CLI ``--set``)."""
    data = json.loads(json.dumps(data))  # deep copy, JSON types only
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    for dotted, value in (overrides or {}).items():
        node, *parents, last = [data, *dotted.split(".")]
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                at = ".".join(parents[:i + 1])
                raise ConfigError(f"--set {dotted}: {at} is {json.dumps(node)[:40]} in {source}, not an object; "
                                  f"set {at} as a whole, e.g. --set '{at}={{\"{last}\": ...}}'")
        node[last] = value
    cfg = _from_dict(ExperimentConfig, data, "", source)
    cfg.base_dir = str(Path(base_dir).resolve())
    cfg.source = source
    _resolve_paths(cfg)
    _validate(cfg)
    return cfg


def load_config(path: Union[str, Path], overrides: Optional[dict] = None,
                data_root: Optional[str] = None) -> ExperimentConfig:
    """Read, parse and validate an experiment JSON file.

    ``data_root`` (CLI ``--data-root``) replaces ``data.root``; ``overrides`` maps dotted keys to values.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    overrides = dict(overrides or {})
    if data_root is not None:
        overrides["data.root"] = str(Path(data_root).resolve())
    return from_dict(data, base_dir=path.parent, source=str(path), overrides=overrides)


def parse_set_option(items: typing.Iterable[str]) -> dict:
    """Parse CLI ``--set key.path=JSON`` items (a value that is not JSON is taken as a string)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out
