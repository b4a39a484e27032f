"""Experiment configuration: defaults, YAML loading, `key=value` overrides and validation.

One config holds a part's data, synthesis, model, training and prediction settings (configs/partN.yaml).
Unknown keys and wrong types fail with an error that names the key; the resolved config is saved with each run.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path

import yaml

from synth.engine import SynthConfig
from core.io import InputError, competition_dir

DEFAULTS: dict = {
    "part": 1,
    # ok_crop [x0, y0, x1, y1]: each OK image cut to that box wherever it is read (a selvage, a fixture cut away)
    "data": {"root": "data/sample", "ok_dir": None, "test_dir": None, "holdout": 0.2, "holdout_seed": 0,
             "ok_crop": None},
    "synth": SynthConfig().to_dict(),
    "model": {
        "arch": "evidence_unet", "encoder": "tu-tf_efficientnet_lite0", "weights": "lite", "in_channels": 1,
        "decoder_channels": [128, 64, 32, 16, 8], "image_head": True, "deep_supervision": True, "cgm": True,
        "coreset_ratio": 0.1, "normal_crops": 128,
        "padim_dims": 100, "ae_latent": 100, "ae_width": 16,  # the baselines' own settings
        "zoom": 1.0,  # patchcore: each crop resized by this factor before the backbone (finer patches)
        "bank_flip": True,  # patchcore's and evidence_unet's banks also hold the OK crops' mirror images
    },
    "train": {
        "epochs": 12, "steps_per_epoch": 40, "batch_size": 16, "lr": 2e-3, "weight_decay": 1e-4,
        "scheduler": "cosine", "mask_loss": "dice_bce", "image_loss_weight": 0.3, "deep_loss_weight": 0.3,
        "aux_loss_weight": 1.0,
        "curriculum": {"schedule": "linear", "start": 0.4, "end": 1.0, "ramp_epochs": 8},
        # geometric augmentation only as far as the normal banks see it too: left-right flips (`flip`; the banks
        # hold the mirror images, `bank_flip`), no up-down flips or rot90 by default (README: "The evidence UNet's
        # views")
        "augment": {"flip": 0.5, "vflip": 0.0, "rot90": 0.0, "brightness_contrast": 0.3, "noise": 0.2, "blur": 0.1,
                    "shift": 0.2},
        "val_n": 192, "val_seed": 12345, "val_dir": None, "metric": "score", "early_stopping": 0, "ema": 0.0,
        "workers": 0, "seed": 0, "seeds": 1, "jobs": 0, "device": "auto", "amp": True, "out": "runs/part1",
        "synth_dir": None,
        # `seg train` also fits this baseline beside the segmenter and calibrates the two as one hybrid, the run
        # folder's ensemble.json (README: "The default method from one command"); none: the segmenter alone
        "partner": "patchcore",
    },
    "baseline": {
        "backbone": "tf_efficientnet_lite0", "weights": "lite", "n_train": 300, "seed": 0,
        "padim_dims": 100, "coreset_ratio": 0.05, "bank_flip": True, "ae_steps": 600, "ae_batch": 32, "ae_lr": 2e-3,
        "ae_latent": 100, "ae_width": 16,
        "zoom": 1.0,  # patchcore: 2 (coreset_ratio 0.0125) higher on all five parts at n_train 300, 3-6x slower
    },
    "predict": {
        "tta": "flip", "threshold": 0.0, "image_threshold": 0.0, "min_area": 10, "opening": 0,
        "merge": "mean", "vote_k": None, "weights": None, "tile_overlap": 32, "batch_size": 32, "roi": None,
        "window": 0,  # whole-image windows: measured slower than tiles on a 2-core CPU (README)
        "peak_frac": 0.5,  # a flagged mask's components cut at half their height above the threshold (README)
        # ... their height measured from the image's median map value where that lies above the threshold (README)
        "median_base": True,
        # ... then redrawn on the image by a graph cut, each component's core (0.75 of the way to its peak) sure
        # defect (README, "Outlines redrawn on the image"); 0 = off
        "grabcut": 0.75,
    },
    # operating point chosen from OK images only: real normal crops of the held-out OK images fix the image
    # threshold at `target_overkill`; synthetic defects on those images fix the pixel threshold and min_area
    # an ensemble's flagged masks trimmed to where its models agree, each at its own calibrated threshold;
    # spend_budget: only points where the image threshold at the budget decides (README, "Spending the budget")
    "calibrate": {"target_overkill": 0.05, "normal_crops": 256, "synth_n": 256, "seed": 4242,
                  "balance_sizes": False, "shape": True, "spend_budget": True},
}

CHOICES = {
    # the keys of seg.models.ARCHS once `baseline` registered its own (this module loads without torch; a test keeps
    # the two equal)
    "model.arch": ("unet", "unet3plus", "evidence_unet", "simplenet", "realnet", "padim", "patchcore", "ssim_ae"),
    "model.weights": ("lite", "imagenet", "none"),
    "model.in_channels": (1, 3), "train.scheduler": ("cosine", "onecycle"),
    "train.mask_loss": ("dice_bce", "dice_focal"), "train.curriculum.schedule": ("none", "linear", "step"),
    "train.metric": ("score", "dice", "iou", "loss"), "predict.tta": ("none", "flip", "d4"),
    "predict.merge": ("mean", "vote"),
    "synth.sizes": ("uniform", "log"),
    "train.partner": ("none", "padim", "patchcore", "ssim_ae"),
}
PER_MODEL = ("predict.tta",)  # also a comma-separated list of choices, one per model of an ensemble (d4,flip)


def per_model(value) -> list:
    """A PER_MODEL value as its list: `d4, flip` -> ["d4", "flip"]; a non-string value stays one entry."""
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else [value]


# value constraints, checked up front with the key named (before any work or progress bar starts)
POSITIVE = ("train.epochs", "train.seeds", "train.steps_per_epoch", "train.batch_size", "train.lr", "train.val_n",
            "predict.batch_size", "calibrate.normal_crops", "calibrate.synth_n", "model.normal_crops",
            "model.padim_dims", "model.ae_latent", "model.ae_width", "baseline.n_train", "baseline.padim_dims",
            "baseline.ae_steps", "baseline.ae_batch", "baseline.ae_lr", "baseline.ae_latent", "baseline.ae_width")
NON_NEGATIVE = ("train.weight_decay", "train.image_loss_weight", "train.deep_loss_weight", "train.aux_loss_weight",
                "train.jobs", "train.workers", "train.early_stopping", "train.curriculum.ramp_epochs",
                "predict.min_area", "predict.opening", "predict.tile_overlap", "predict.window")
UNIT = ("data.holdout", "train.ema", "calibrate.target_overkill", "predict.peak_frac", "predict.grabcut",
        "model.coreset_ratio",
        "baseline.coreset_ratio", "train.curriculum.start", "train.curriculum.end",
        *(f"train.augment.{k}" for k in DEFAULTS["train"]["augment"]))
EXISTING = ("data.ok_dir", "data.test_dir", "train.val_dir", "train.synth_dir")


def _get(cfg: dict, dotted: str):
    node = cfg
    for p in dotted.split("."):
        node = node[p]
    return node


def check_values(cfg: dict, where: str) -> None:
    """Sizes positive, weights non-negative, probabilities and shares in [0, 1], ranges ordered, given paths
    existing: each failure names its key, before anything runs."""
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise InputError(f"{where}: {key} must be positive, got {_get(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise InputError(f"{where}: {key} must be 0 or more, got {_get(cfg, key)!r}")
    for key in UNIT:
        if not 0 <= _get(cfg, key) <= 1:
            raise InputError(f"{where}: {key} must be between 0 and 1, got {_get(cfg, key)!r}")
    if cfg["calibrate"]["target_overkill"] >= 1:
        raise InputError(f"{where}: calibrate.target_overkill must be below 1 (a false-alarm budget)")
    if cfg["data"]["holdout"] >= 1:
        raise InputError(f"{where}: data.holdout must be below 1 (some OK images must remain to train on)")
    if cfg["model"]["coreset_ratio"] <= 0 or cfg["baseline"]["coreset_ratio"] <= 0:
        raise InputError(f"{where}: coreset_ratio must be above 0")
    for key in ("model.zoom", "baseline.zoom"):  # a crop made smaller: maps too small to smooth, never measured
        if not _get(cfg, key) >= 1:
            raise InputError(f"{where}: {key} must be at least 1, got {_get(cfg, key)!r}")
    if cfg["model"]["zoom"] != 1 and cfg["model"]["arch"] != "patchcore":
        raise InputError(f"{where}: model.zoom is PatchCore's alone (model.arch is {cfg['model']['arch']}); "
                         "baseline.zoom sets it for `baseline fit --method patchcore`")
    cur = cfg["train"]["curriculum"]
    if cur["start"] > cur["end"]:
        raise InputError(f"{where}: train.curriculum.start ({cur['start']}) must not exceed end ({cur['end']})")
    k = cfg["predict"]["vote_k"]
    if k is not None and (not isinstance(k, int) or k < 1):
        raise InputError(f"{where}: predict.vote_k must be a positive integer or null, got {k!r}")
    box = cfg["data"]["ok_crop"]
    if box is not None and not (isinstance(box, (list, tuple)) and len(box) == 4
                                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in box)
                                and box[0] < box[2] and box[1] < box[3]):
        raise InputError(f"{where}: data.ok_crop must be a box x0, y0, x1, y1: a list of 4 whole pixels with "
                         f"x0 < x1 and y0 < y1, got {box!r}")
    for key in EXISTING:
        value = _get(cfg, key)
        if value is not None and not Path(value).exists():
            raise InputError(f"{where}: {key}: {value} does not exist")


# keys of older versions that mean nothing now: accepted and dropped, so a config that sets them still loads
RETIRED = {"baseline.n_val": "the training loop standardises a baseline on its own held-out crops (toolkit 0.5)"}


def _check(value, default, key: str, where: str):
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise InputError(f"{where}: {key} must be a mapping, got {value!r}")
        out = copy.deepcopy(default)
        for k, v in value.items():
            sub = f"{key}.{k}" if key else k
            if sub in RETIRED:
                continue
            if k not in default and key not in ("synth.params",):
                hint = difflib.get_close_matches(k, default.keys(), 1)
                raise InputError(f"{where}: unknown key {sub!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
            out[k] = _check(v, default.get(k), sub, where)
        return out
    given = per_model(value) if key in PER_MODEL else [value]
    if key in CHOICES and any(v not in CHOICES[key] for v in given):
        raise InputError(f"{where}: {key} must be one of {', '.join(map(str, CHOICES[key]))}, got {value!r}")
    if default is None or value is None:
        return value
    if isinstance(default, bool) != isinstance(value, bool):
        raise InputError(f"{where}: {key} must be true or false, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if not isinstance(value, (int, float)) or (isinstance(default, int) and not isinstance(value, int)
                                                    and not float(value).is_integer()):
            raise InputError(f"{where}: {key} must be a {type(default).__name__}, got {value!r}")
        return type(default)(value)
    if isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
        raise InputError(f"{where}: {key} must be a list, got {value!r}")
    if isinstance(default, str) and not isinstance(value, str):
        raise InputError(f"{where}: {key} must be a string, got {value!r}")
    return value


def dotted_keys(cfg: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a nested config's leaves (`train.augment.vflip`), as `-s` names them."""
    out = []
    for k, v in cfg.items():
        out += dotted_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def set_key(cfg: dict, dotted: str, value) -> None:
    node = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise InputError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def apply_overrides(cfg: dict, overrides: list[str]) -> None:
    """Set each `key=value` (dotted key, value parsed as YAML) in `cfg`, unvalidated."""
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r}: expected key=value, e.g. train.epochs=3")
        k, v = item.split("=", 1)
        set_key(cfg, k.strip(), yaml.safe_load(v))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, part: int | None = None) -> dict:
    """Defaults <- YAML file <- `key=value` overrides (values parsed as YAML), validated; errors name the key."""
    raw: dict = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise InputError(f"{path}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise InputError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path}: a config must be a mapping of sections")
    if overrides:
        apply_overrides(raw, overrides)
        where = f"{where} + overrides"
    if part is not None:
        raw["part"] = part
    cfg = _check(raw, DEFAULTS, "", where)
    try:
        cfg["synth"] = SynthConfig.from_dict(cfg["synth"]).to_dict()
    except (ValueError, TypeError) as e:
        raise InputError(f"{where}: synth: {e}") from None
    check_values(cfg, where)
    return cfg


def ok_images_dir(cfg: dict) -> Path:
    """The OK images a config trains on: `data.ok_dir` when set, else `data.root` in the competition layout."""
    if cfg["data"]["ok_dir"]:
        return Path(cfg["data"]["ok_dir"])
    return competition_dir(cfg["data"]["root"], cfg["part"], "OK_Images")


def ok_pools(cfg: dict, warn=None):
    """(training pool, held-out pool or None) of a config's OK images, split by `data.holdout`."""
    from synth.engine import SourcePool

    s, d = cfg["synth"], cfg["data"]
    pool = SourcePool(ok_images_dir(cfg), s["channels"], s["size"], warn=warn, crop=d.get("ok_crop"))
    return pool.split(d["holdout"], d["holdout_seed"])


def config_for_part(part: int) -> Path | None:
    p = Path(__file__).resolve().parent.parent / "configs" / f"part{part}.yaml"
    return p if p.exists() else None
