"""Checks across keys of a parsed config (one-line ConfigError naming the key), and path resolution."""
from __future__ import annotations

import difflib
from pathlib import Path

from islkeras.config.parse import expand_path
from islkeras.errors import ConfigError


def validate(cfg) -> None:
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
    a = p.augmentation()
    # transform -> (bound of its range's low end, whether low may equal it); brightness is unbounded
    lows = {"zoom": (0.2, False), "contrast": (0.0, False), "gamma": (0.0, False), "blur": (0.0, True),
            "noise": (0.0, True), "brightness": (None, True)}
    for name, (bound, inclusive) in lows.items():
        t = getattr(a, name)
        low_ok = bound is None or (len(t.range) == 2 and (t.range[0] >= bound if inclusive else t.range[0] > bound))
        if not 0.0 <= t.p <= 1.0 or len(t.range) != 2 or t.range[0] > t.range[1] or not low_ok:
            need = "" if bound is None else f" and low {'>=' if inclusive else '>'} {bound:g}"
            raise ConfigError(f"{src}: pipeline.augment.{name}: p must be in [0, 1] and range [low, high] with low <= "
                              f"high{need} (got p {t.p:g}, range {t.range})")
    if a.zoom.p > 0 and a.zoom.range[1] > 5:
        raise ConfigError(f"{src}: pipeline.augment.zoom.range {a.zoom.range}: a factor above 5 is not a zoom")
    if not 0.0 <= a.noise.poisson <= 1.0:
        raise ConfigError(f"{src}: pipeline.augment.noise.poisson must be a probability in [0, 1], got {a.noise.poisson}")
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


def resolve_paths(cfg) -> None:
    b = cfg.base_dir
    # (section, path key, values that are not paths)
    for section, key, keep in ((cfg.data, "root", ()), (cfg.data, "records", ()), (cfg.training, "runs_dir", ()),
                               (cfg.training, "init_from", (None,)),
                               (cfg.model, "encoder_weights", (None, "imagenet")),
                               (cfg.loss, "vgg_weights", (None, "imagenet")),
                               (cfg.transfer, "isl_run", (None,)), (cfg.transfer, "pretrain", (None,))):
        if section is not None and getattr(section, key) not in keep:
            setattr(section, key, expand_path(getattr(section, key), b))
