"""What the baselines share: OK-crop sampling, score standardisation, anomaly-map smoothing, save and load."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synth.dataset import crops_tensor
from synth.engine import SourcePool
from core.modelfile import save_model_file
from core.io import InputError


def ok_crops(pool: SourcePool, n: int, seed: int) -> torch.Tensor:
    """n random crops of the pool's size from the OK images, (n, C, S, S) in [0, 1]."""
    return crops_tensor(pool.random_crops(n, seed))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps (anomaly-map smoothing, as PaDiM/PatchCore do)."""
    if sigma <= 0:
        return x
    r = int(4 * sigma + 0.5)
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


class AnomalyModel(nn.Module):
    """Base: subclasses implement `anomaly_map(x) -> (B,1,H,W)`; forward standardises it into logits."""

    method = ""
    fully_convolutional = False  # per-position statistics (PaDiM) or a dense bottleneck (SSIM-AE): fixed input

    def __init__(self):
        super().__init__()
        self.register_buffer("center", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def standardise(self, normal: torch.Tensor, batch_size: int = 32) -> None:
        """Fit the logit mapping on held-out OK crops: 0 at their 99.9th pixel percentile, unit = their std."""
        maps = torch.cat([self.anomaly_map(normal[k:k + batch_size]) for k in range(0, len(normal), batch_size)])
        flat = maps.flatten()
        sample = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:1_000_000]]
        self.center.fill_(float(torch.quantile(sample, 0.999)))
        self.scale.fill_(float(sample.std()) or 1.0)

    def forward(self, x: torch.Tensor) -> dict:
        return {"mask": (self.anomaly_map(x) - self.center) / self.scale, "image": None}


def save_model(path: str | Path, model: AnomalyModel, config: dict, extra: dict | None = None) -> None:
    """One file: method, constructor arguments, tensors and the config it was fitted with."""
    save_model_file(path, {"method": model.method, "init": model.init_args, "state": model.state_dict(),
                           "config": config, **(extra or {})})


def build(method: str, init: dict) -> AnomalyModel:
    from .padim import Padim
    from .patchcore import PatchCore
    from .ssim_ae import SSIMAutoencoder

    classes = {"padim": Padim, "patchcore": PatchCore, "ssim_ae": SSIMAutoencoder}
    if method not in classes:
        raise InputError(f"unknown baseline method {method!r} (known: {', '.join(classes)})")
    return classes[method](**init)


def load_model(ckpt: dict) -> AnomalyModel:
    """Rebuild a saved baseline from its checkpoint dict (see `save_model`)."""
    init = dict(ckpt["init"])
    if "weights" in init:  # the extractor's weights are in the state: never fetch them again
        init["weights"] = "none"
    model = build(ckpt["method"], init)
    model.load_state_dict(ckpt["state"])
    return model.eval()
