"""`baseline fit`: `seg train` with the config's `baseline` section in place of the segmenter's model and
training settings, saved as one model file (the run's best.pt)."""

from __future__ import annotations

import copy
import math
import os
import resource
import shutil
import time
from pathlib import Path

from core.io import InputError
from seg.train import train

METHODS = ("padim", "patchcore", "ssim_ae")
AE_EPOCH_STEPS = 100  # the autoencoder's steps between two validations (and two checkpoints)
# the `model` keys that `baseline_config` fills from the `baseline` section: an error names the key the user set
SOURCE_KEYS = {"model.encoder": "baseline.backbone", "model.weights": "baseline.weights"}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def baseline_config(cfg: dict, method: str) -> dict:
    """The config with which `seg train` fits baseline `method`: the model is `method` on `baseline.backbone`
    (`baseline.weights`), fitted on `baseline.n_train` OK crops with seed `baseline.seed`; the autoencoder trains
    `baseline.ae_steps` steps of `baseline.ae_batch` crops at `baseline.ae_lr`. Predicted without TTA by default
    (its maps are already smooth; flips would double the cost)."""
    if method not in METHODS:
        raise InputError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    cfg = copy.deepcopy(cfg)
    b = cfg["baseline"]
    backbone = b["backbone"] if b["backbone"].startswith("tu-") else "tu-" + b["backbone"]
    cfg["model"].update(arch=method, encoder=backbone, weights=b["weights"], coreset_ratio=b["coreset_ratio"],
                        bank_flip=b["bank_flip"], normal_crops=b["n_train"], padim_dims=b["padim_dims"],
                        ae_latent=b["ae_latent"], ae_width=b["ae_width"], in_channels=cfg["synth"]["channels"],
                        zoom=b["zoom"] if method == "patchcore" else 1.0)  # PatchCore's alone
    t = cfg["train"]
    t.update(seed=b["seed"], seeds=1, ema=0.0, synth_dir=None, early_stopping=0, epochs=1, partner="none")
    if method == "ssim_ae":  # its own term is all its loss; its crops flipped at random, nothing else (Bergmann)
        epochs = max(1, b["ae_steps"] // AE_EPOCH_STEPS)
        t.update(epochs=epochs, steps_per_epoch=math.ceil(b["ae_steps"] / epochs), batch_size=b["ae_batch"],
                 lr=b["ae_lr"], weight_decay=1e-5, aux_loss_weight=1.0,
                 augment={k: (0.5 if k in ("flip", "vflip") else 0.0) for k in t["augment"]})
    cfg["predict"]["tta"] = "none"
    return cfg


def fit_baseline(cfg: dict, method: str, out: str | Path, progress=None, warn=None, log=print,
                 resume: bool = False) -> dict:
    """Fit `method` on the part's OK images with `seg train`'s loop (see `baseline_config`); its best.pt becomes
    the file `out`, written atomically, and the run's folder beside it (`.NAME.fit`) is removed. A fit that was
    interrupted leaves that folder: `resume` continues it from its last finished epoch (the autoencoder's 600
    steps take 20 minutes and more on a CPU), else it starts afresh."""
    cfg = baseline_config(cfg, method)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("baseline fit: runs in one process (not under torchrun); the baselines fit in minutes")
    out = Path(out)
    run = out.parent / f".{out.name}.fit"
    if not resume:
        shutil.rmtree(run, ignore_errors=True)
    cfg["train"]["out"] = str(run)
    start = time.perf_counter()
    try:
        train(cfg, resume=resume, log=log, progress=progress, warn=warn)
    except InputError as e:  # settings or data: nothing worth resuming, unless it is the run resumed
        if not resume:
            shutil.rmtree(run, ignore_errors=True)
        key = next((k for k in SOURCE_KEYS if str(e).startswith(k + ":")), None)
        if key is None:
            raise
        raise InputError(SOURCE_KEYS[key] + str(e)[len(key):]) from None
    seconds = time.perf_counter() - start
    os.replace(run / "best.pt", out)
    shutil.rmtree(run, ignore_errors=True)
    return {"method": method, "out": str(out), "fit_seconds": seconds, "peak_rss_mb": peak_rss_mb()}
