"""`baseline fit`: fit PaDiM, PatchCore or the SSIM autoencoder on OK crops of a part; one file per model."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np
import torch

from synth.engine import SourcePool
from seg.config import ok_pools

from .common import build, ok_crops, save_model

METHODS = ("padim", "patchcore", "ssim_ae")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_autoencoder(model, pool: SourcePool, steps: int, batch_size: int, lr: float, seed: int, progress=None):
    """SSIM + L2 training on fresh random OK crops (flipped at random) every step."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.05)
    model.train()
    losses = []
    for step in range(steps):
        x = ok_crops(pool, batch_size, seed * 100003 + step)
        flip = torch.rand(len(x), generator=torch.Generator().manual_seed(step)) < 0.5
        x[flip] = x[flip].flip(-1)
        loss = model.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(1, loss=f"{np.mean(losses[-20:]):.4f}")
    model.eval()
    return losses


def fit_baseline(cfg: dict, method: str, out: str | Path, progress=None, warn=None, log=print) -> dict:
    """Fit `method` on the part's OK images (`cfg["baseline"]` holds its settings); save it to `out`."""
    if method not in METHODS:
        raise ValueError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    b, s = cfg["baseline"], cfg["synth"]
    # a baseline's own prediction default: no TTA (its map is already smooth; flips would double the cost)
    cfg = {**cfg, "predict": {**cfg["predict"], "tta": "none"}}
    pool, held = ok_pools(cfg, warn=warn)
    torch.manual_seed(b["seed"])
    start = time.perf_counter()
    if method == "ssim_ae":
        model = build(method, dict(in_channels=s["channels"], latent=b["ae_latent"], width=b["ae_width"],
                                   size=s["size"]))
        bar = progress("fit ssim_ae", b["ae_steps"]) if progress else None
        if bar:
            with bar:
                train_autoencoder(model, pool, b["ae_steps"], b["ae_batch"], b["ae_lr"], b["seed"], bar)
        else:
            train_autoencoder(model, pool, b["ae_steps"], b["ae_batch"], b["ae_lr"], b["seed"])
    else:
        common = dict(backbone=b["backbone"], weights=b["weights"], size=s["size"], seed=b["seed"])
        model = build(method, {**common, "dims": b["padim_dims"]} if method == "padim" else
                      {**common, "coreset_ratio": b["coreset_ratio"]})
        crops = ok_crops(pool, b["n_train"], b["seed"])
        log(f"{method}: fitting on {len(crops)} OK crops of {s['size']} px")
        model.fit(crops)
    held_out = ok_crops(held or pool, b["n_val"], b["seed"] + 7919)
    model.standardise(held_out)
    seconds = time.perf_counter() - start
    extra = {"fit_seconds": seconds, "peak_rss_mb": peak_rss_mb()}
    if method == "patchcore":
        extra["coreset_radius"] = model.radius
        extra["bank_size"] = len(model.bank)
    save_model(out, model, cfg, extra)
    return {"method": method, "out": str(out), **extra}
