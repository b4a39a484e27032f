"""Training and validation data: augmentations (albumentations), pre-generated synth folders, labelled folders."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from synth.dataset import to_tensors
from core.io import InputError, find_images, find_mask_dir, mask_path_for, read_image, read_jsonl, read_mask


def build_augment(cfg: dict) -> A.Compose | None:
    """Left-right flip (`flip`, what flip TTA undoes), up-down flip (`vflip`), rot90, brightness/contrast, Gaussian
    noise, blur and small shifts; each value is a probability."""
    t = []
    if cfg.get("flip"):
        t.append(A.HorizontalFlip(p=cfg["flip"]))
    if cfg.get("vflip"):
        t.append(A.VerticalFlip(p=cfg["vflip"]))
    if cfg.get("rot90"):
        t.append(A.RandomRotate90(p=cfg["rot90"]))
    if cfg.get("brightness_contrast"):
        t.append(A.RandomBrightnessContrast(0.15, 0.15, p=cfg["brightness_contrast"]))
    if cfg.get("noise"):
        t.append(A.GaussNoise(std_range=(0.01, 0.04), p=cfg["noise"]))
    if cfg.get("blur"):
        t.append(A.GaussianBlur(blur_limit=(3, 3), p=cfg["blur"]))
    if cfg.get("shift"):
        t.append(A.Affine(translate_percent=(-0.06, 0.06), border_mode=4, p=cfg["shift"]))
    # `clean`: the defect-free original of a synthetic sample, transformed exactly as its image
    return A.Compose(t, seed=None, additional_targets={"clean": "image"}) if t else None


class SeededAugment:
    """Apply an albumentations pipeline with a per-sample seed (reproducible whatever the worker)."""

    def __init__(self, compose: A.Compose | None):
        self.compose = compose

    def __call__(self, image, mask, seed: int, clean=None):
        """(image, mask, clean): the clean original, when given, transformed exactly as the image; else None."""
        if self.compose is None:
            return image, mask, clean
        self.compose.set_random_seed(seed)
        out = self.compose(image=image, mask=mask, **({} if clean is None else {"clean": clean}))
        return out["image"], out["mask"], (out["clean"] if clean is not None else None)


def adopt_synth_folder(cfg: dict, folder: str | Path, warn=None) -> tuple[dict, list[str] | None]:
    """(config, held-out names or None) to train from a `synth generate` folder: its OK images, held-out split and
    synthesis settings replace `data.*` and `synth.*` (so `-s synth.*` settings are the folder's, not the command
    line's), and validation and calibration draw on the folder's own held-out images (never on images its samples
    came from; `check_split` verifies the split still holds once the pools are built). A folder whose channels
    differ from the model's, or with no `run.json`, is refused."""
    import copy

    from core.io import read_json_file

    run_file = Path(folder) / "run.json"
    if not run_file.exists():
        raise InputError(f"{run_file}: missing (train.synth_dir must be a folder written by `synth generate`)")
    run = read_json_file(run_file)
    missing = [k for k in ("source", "config") if k not in run]
    if missing:
        raise InputError(f"{run_file}: not a `synth generate` run file (no {', '.join(missing)})")
    if run["config"].get("channels", 1) != cfg["model"]["in_channels"]:
        raise InputError(f"{run_file}: the folder's images have {run['config'].get('channels', 1)} channel(s), "
                         f"the model takes {cfg['model']['in_channels']} (set model.in_channels to match)")
    out = copy.deepcopy(cfg)
    out["synth"] = run["config"]
    out["data"].update(ok_dir=run["source"], holdout=run.get("holdout", 0.0),
                       holdout_seed=run.get("holdout_seed", 0), ok_crop=run.get("ok_crop"))
    if "held_out" not in run:
        if warn:
            warn(f"{run_file}: written without a held-out split, so validation and calibration draw on the images "
                 "its samples came from (regenerate with a current `synth generate`)")
        return out, None
    return out, run["held_out"]


def check_split(folder: str | Path, held, expected: list[str]) -> None:
    """Refuse a `synth generate` folder whose source images changed since: the held-out pool built now (`held`, a
    SourcePool or None) must be the one recorded in its run.json."""
    if (held.paths if held else []) != expected:
        run_file = Path(folder) / "run.json"
        raise InputError(f"{run_file}: the OK images of its source changed since the folder was generated, "
                         "so its held-out split no longer holds; regenerate the folder")


class SynthFolderDataset(Dataset):
    """A `synth generate` folder; `max_difficulty` hides defective samples above the ceiling (curriculum)."""

    def __init__(self, folder: str | Path, channels: int = 1, augment=None, seed: int = 0):
        self.folder = Path(folder)
        self.rows = read_jsonl(self.folder / "manifest.jsonl")
        if not self.rows:
            raise InputError(f"{self.folder}: no manifest.jsonl with samples (run `synth generate` first)")
        self.channels, self.augment, self.seed = channels, SeededAugment(augment), seed
        self.active = list(range(len(self.rows)))
        self.epoch = 0

    def set_epoch(self, epoch: int, max_difficulty: float | None = None) -> None:
        self.epoch = epoch
        cap = 1.0 if max_difficulty is None else max_difficulty
        self.active = [i for i, r in enumerate(self.rows) if r["normal"] or r["difficulty"] <= cap + 1e-9]

    def __len__(self) -> int:
        return len(self.active)

    def __getitem__(self, k: int) -> dict:
        r = self.rows[self.active[k]]
        image = read_image(self.folder / "images" / f"{r['id']}.png", self.channels)
        mask = read_mask(self.folder / "masks" / f"{r['id']}.png", image.shape[:2])
        image, mask, _ = self.augment(image, mask, seed=hash((self.seed, self.epoch, k)) & 0x7FFFFFFF)
        img, m = to_tensors(image, mask)
        return {"image": img, "mask": m, "label": torch.tensor([float(m.any())]),
                "difficulty": torch.tensor(-1.0 if r["difficulty"] is None else r["difficulty"])}


class LabelledFolder(Dataset):
    """Real labelled images: `image_dir` plus masks (PNG, same stem) in `mask_dir`; a missing mask means normal."""

    def __init__(self, image_dir: str | Path, mask_dir: str | Path | None = None, channels: int = 1):
        self.image_dir = Path(image_dir)
        self.mask_dir = Path(mask_dir) if mask_dir else find_mask_dir(self.image_dir)
        if self.mask_dir is None:
            raise InputError(f"{self.image_dir}: no masks folder beside it (TC_Masks or masks)")
        self.paths = find_images(self.image_dir)
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        image = read_image(self.paths[i], self.channels)
        mp = mask_path_for(self.paths[i], self.image_dir, self.mask_dir)
        mask = read_mask(mp, image.shape[:2]) if mp else np.zeros(image.shape[:2], np.uint8)
        img, m = to_tensors(image, mask)
        return {"image": img, "mask": m, "label": torch.tensor([float(m.any())]), "difficulty": torch.tensor(-1.0)}
