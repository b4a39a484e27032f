"""Checkpoints in, merged probability maps out: test-time augmentation (ttach), multi-model merging (mean
probability or k-of-n voting, optional weights) and overlapping tiles for images larger than the model's crop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import ttach as tta

from seg.models import model_from_config
from seg.train import load_checkpoint, resolve_device
from synth.io import InputError

TTA = {"none": lambda: None,
       "flip": lambda: tta.Compose([tta.HorizontalFlip()]),
       "d4": tta.aliases.d4_transform}


def load_model(path: str | Path, device) -> tuple[torch.nn.Module, dict]:
    ckpt = load_checkpoint(path)
    model = model_from_config({**ckpt["config"]["model"], "weights": "none"})
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["config"]


class Ensemble:
    """One or more segmenters with TTA; `predict(images)` gives per-image probability, hits and image score."""

    def __init__(self, checkpoints: Sequence[str | Path], device: str = "auto", tta_mode: str = "flip",
                 merge: str = "mean", vote_k: int | None = None, weights: Sequence[float] | None = None,
                 threshold: float = 0.5, batch_size: int = 32, tile_overlap: int = 32):
        if not checkpoints:
            raise InputError("no checkpoint given (--checkpoint PATH, repeatable)")
        if tta_mode not in TTA:
            raise InputError(f"tta: expected none, flip or d4, got {tta_mode!r}")
        self.device = resolve_device(device)
        loaded = [load_model(p, self.device) for p in checkpoints]
        self.models = [m for m, _ in loaded]
        self.configs = [c for _, c in loaded]
        sizes = {c["synth"]["size"] for c in self.configs}
        chans = {c["synth"]["channels"] for c in self.configs}
        if len(chans) > 1:
            raise InputError(f"checkpoints disagree on input channels ({sorted(chans)}); ensemble one kind")
        self.tile, self.channels = min(sizes), chans.pop()
        self.paths = [str(p) for p in checkpoints]
        n = len(self.models)
        self.weights = np.asarray(weights if weights is not None else [1.0] * n, np.float64)
        if len(self.weights) != n or (self.weights < 0).any() or self.weights.sum() <= 0:
            raise InputError(f"weights: expected {n} non-negative numbers, got {list(self.weights)}")
        self.weights = self.weights / self.weights.sum()
        if merge not in ("mean", "vote"):
            raise InputError(f"merge: expected mean or vote, got {merge!r}")
        self.merge, self.threshold = merge, threshold
        self.vote_k = vote_k if vote_k is not None else n // 2 + 1
        if merge == "vote" and not 1 <= self.vote_k <= n:
            raise InputError(f"vote_k: expected 1..{n}, got {self.vote_k}")
        self.tta = TTA[tta_mode]()
        self.tta_mode = tta_mode
        self.batch_size, self.overlap = batch_size, tile_overlap

    @property
    def passes(self) -> int:
        """Forward passes per tile: models x TTA transforms."""
        return len(self.models) * (len(self.tta) if self.tta is not None else 1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B,C,T,T) in [0,1] -> per-model probabilities (M,B,T,T) and image probabilities (M,B) or None."""
        x = x.to(self.device)
        probs, heads = [], []
        for model in self.models:
            p_sum, h_sum, k = 0, 0, 0
            for t in (self.tta if self.tta is not None else [None]):
                out = model(t.augment_image(x) if t is not None else x)
                p = torch.sigmoid(out["mask"].float())
                p_sum = p_sum + (t.deaugment_mask(p) if t is not None else p)
                if out["image"] is not None:
                    h_sum = h_sum + torch.sigmoid(out["image"].float()).view(-1)
                k += 1
            probs.append((p_sum / k)[:, 0])
            heads.append(h_sum / k if torch.is_tensor(h_sum) else None)
        image = torch.stack(heads) if all(h is not None for h in heads) else None
        return torch.stack(probs).cpu(), (image.cpu() if image is not None else None)

    def tiles(self, h: int, w: int) -> list[tuple[int, int]]:
        """Top-left corners of overlapping tiles covering an (h, w) image (h, w >= tile)."""
        t, stride = self.tile, max(1, self.tile - self.overlap)

        def starts(n):
            s = list(range(0, n - t + 1, stride))
            return s if s[-1] == n - t else s + [n - t]

        return [(y, x) for y in starts(h) for x in starts(w)]

    def predict(self, images: list[np.ndarray]) -> list[dict]:
        """For each uint8 image: {"prob": merged (H,W) float32, "hits": binary (H,W) before post-processing,
        "image_prob": float or None}. Images larger than the crop are tiled with overlap and averaged."""
        t = self.tile
        jobs, canvases = [], []
        for idx, img in enumerate(images):
            arr = img if img.ndim == 3 else img[..., None]
            if arr.shape[2] != self.channels:
                raise InputError(f"image {idx}: {arr.shape[2]} channels, the models take {self.channels}")
            h, w = arr.shape[:2]
            ph, pw = max(0, t - h), max(0, t - w)
            if ph or pw:
                arr = np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="reflect")
            H, W = arr.shape[:2]
            canvases.append({"arr": arr, "size": (h, w), "sum": np.zeros((len(self.models), H, W), np.float32),
                             "count": np.zeros((H, W), np.float32), "head": []})
            jobs += [(idx, y, x) for y, x in self.tiles(H, W)]
        for k in range(0, len(jobs), self.batch_size):
            chunk = jobs[k:k + self.batch_size]
            batch = np.stack([canvases[i]["arr"][y:y + t, x:x + t] for i, y, x in chunk])
            x_t = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255)
            probs, heads = self.forward(x_t)
            for j, (i, y, x) in enumerate(chunk):
                c = canvases[i]
                c["sum"][:, y:y + t, x:x + t] += probs[:, j].numpy()
                c["count"][y:y + t, x:x + t] += 1
                if heads is not None:
                    c["head"].append(heads[:, j].numpy())
        return [self._merge(c) for c in canvases]

    def _merge(self, c: dict) -> dict:
        h, w = c["size"]
        per_model = (c["sum"] / c["count"])[:, :h, :w]
        prob = np.tensordot(self.weights, per_model, axes=1).astype(np.float32)
        image_prob = None
        if c["head"]:
            image_prob = float(np.dot(self.weights, np.max(np.stack(c["head"]), axis=0)))
        result = {"prob": prob, "image_prob": image_prob, "per_model": per_model}
        result["hits"] = self.rehit(result, self.threshold)
        return result

    def rehit(self, result: dict, threshold: float) -> np.ndarray:
        """The binary hits of a `predict` result at another pixel threshold (mean or vote merge)."""
        if self.merge == "vote":
            votes = np.tensordot(self.weights * len(self.models), result["per_model"] >= threshold, axes=1)
            return (votes >= self.vote_k - 1e-9).astype(np.uint8)
        return (result["prob"] >= threshold).astype(np.uint8)
