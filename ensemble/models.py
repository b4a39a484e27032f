"""Model files in, merged anomaly maps out: test-time augmentation (ttach), multi-model merging (mean or k-of-n
voting, optional weights) and overlapping tiles for images larger than the model's crop.

Maps stay on a float scale, never squashed through a sigmoid: each model's logits are averaged over the TTA passes,
then standardised by the model's normaliser (fitted on held-out normal crops by `ensemble.calibrate`: 0 at the
normal maps' 99.9th percentile, unit = their spread), so the maps of a segmenter and a baseline are comparable
before they are merged. A model without a normaliser gives its raw logits (0 = probability 0.5).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import ttach as tta

from core.device import fold_batchnorm, place, resolve_device
from core.modelfile import RUN_ENSEMBLE, load_model_file, model_paths, run_ensemble, run_seeds, spec_checkpoints
import baseline  # noqa: F401  (registers padim, patchcore and ssim_ae in the one registry, for loading)
from seg.config import per_model
from seg.models import model_from_config
from core.io import InputError
from core.postprocess import OUTLINE_RULES, agreement, final_mask

STRIDE = 32  # the deepest encoder stride: whole-image windows are padded to a multiple of it
TTA = {"none": lambda: None,
       "flip": lambda: tta.Compose([tta.HorizontalFlip()]),
       "d4": tta.aliases.d4_transform}


def tta_modes(mode: str, n: int) -> list[str]:
    """`tta` for an ensemble of `n` models -> one mode per model: one of TTA for all, or one per model,
    comma-separated in model order (`d4,flip`: a segmenter trained with rotations, `train.augment.rot90`, beside
    a PatchCore whose bank holds the crops and their left-right mirror images only)."""
    modes = per_model(str(mode))
    if any(m not in TTA for m in modes) or len(modes) not in (1, n):
        raise InputError(f"tta: expected none, flip or d4, or one of them per model, comma-separated ({n} "
                         f"model(s)), got {mode!r}")
    return modes * n if len(modes) == 1 else modes


def tta_mean(model: torch.nn.Module, transforms, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One model over the TTA passes (`transforms`: a ttach Compose, or None): the mean of the de-augmented mask
    logits (B,H,W) and of the image logits (B,) or None. Shared by `Ensemble` and its ONNX export."""
    passes = list(transforms) if transforms is not None else [None]
    m_sum, h_sum = 0, 0
    for t in passes:
        out = model(t.augment_image(x) if t is not None else x)
        m = out["mask"].float()
        m_sum = m_sum + (t.deaugment_mask(m) if t is not None else m)
        if out["image"] is not None:
            h_sum = h_sum + out["image"].float().reshape(-1)
    return (m_sum / len(passes))[:, 0], (h_sum / len(passes) if torch.is_tensor(h_sum) else None)


def load_model(path: str | Path, device) -> tuple[torch.nn.Module, dict, dict | None]:
    """A model file (`seg train`, `baseline fit`: one layout) -> (eval-mode module, the config it was made with,
    its calibration or None)."""
    ckpt = load_model_file(path)
    cfg = ckpt["config"]
    model = model_from_config({**cfg["model"], "weights": "none"}, cfg["synth"]["size"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise InputError(f"{path}: weights do not fit the architecture in its config ({str(e)[:160]})") from None
    return model.to(device).eval(), cfg, ckpt.get("calibration")


def inference_ready(model: torch.nn.Module, channels: int, size: int, device) -> torch.nn.Module:
    """A loaded model with its BatchNorms folded into their convolutions (`core.device.fold_batchnorm`, checked on
    two random crops of the model's size): the same maps to float rounding, fewer passes over the feature maps."""
    example = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return fold_batchnorm(model, example)[0]


class Ensemble:
    """One or more models with TTA; `predict(images)` gives per-image merged map, hits and image score."""

    def __init__(self, models: Sequence[torch.nn.Module], channels: int, tile: int, device: str = "auto",
                 tta_mode: str = "flip", merge: str = "mean", vote_k: int | None = None,
                 weights: Sequence[float] | None = None, threshold: float = 0.0, batch_size: int = 32,
                 tile_overlap: int = 32, paths: Sequence[str] = (), norms: Sequence[dict | None] | None = None,
                 window: int = 0):
        """`models` map (B,C,T,T) images in [0,1] to {"mask": logits, "image": logits or None}. `norms`: one
        normaliser per model, `{"pixel": [center, scale], "image": [center, scale] or None}`, or None (raw).
        `window`: when every model is fully convolutional, an image larger than the crop is predicted whole, in
        windows of up to `window` px a side (0: always tiles of the crop size)."""
        if not models:
            raise InputError("no checkpoint given (--checkpoint PATH, repeatable)")
        self.device = resolve_device(device)
        self.models = [place(m, self.device).eval() for m in models]
        self.channels, self.tile, self.paths = channels, tile, [str(p) for p in paths]
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
        modes = tta_modes(tta_mode, n)
        self.ttas = [TTA[m]() for m in modes]  # one ttach Compose (or None) per model
        self.tta_mode = modes[0] if len(set(modes)) == 1 else ",".join(modes)
        self.batch_size, self.overlap = batch_size, tile_overlap
        self.member_calibrations: list[dict | None] | None = None  # set by `from_checkpoints`
        self.member_configs: list[dict] | None = None  # the config each file was made with (`from_checkpoints`)
        self.whole = window > 0 and all(getattr(m, "fully_convolutional", False) for m in self.models)
        self.window = max(window // STRIDE * STRIDE, tile) if window > 0 else 0
        self.set_norms(norms)

    def set_norms(self, norms: Sequence[dict | None] | None) -> None:
        """Per-model map normalisers (see the class doc); None or a None entry: raw logits."""
        norms = list(norms) if norms is not None else [None] * len(self.models)
        if len(norms) != len(self.models):
            raise InputError(f"normalisers: expected {len(self.models)}, got {len(norms)}")
        self.norms = norms

    def _hwc(self, img: np.ndarray, label: str) -> np.ndarray:
        """A uint8 image as (H, W, C), checked against the models' channel count."""
        arr = img if img.ndim == 3 else img[..., None]
        if arr.shape[2] != self.channels:
            raise InputError(f"{label}: {arr.shape[2]} channels, the models take {self.channels}")
        return arr

    @classmethod
    def from_checkpoints(cls, checkpoints: Sequence[str | Path], device: str = "auto", **kw) -> "Ensemble":
        """Load `seg train` checkpoints; each carries its config, so preprocessing and crop size come along."""
        if not checkpoints:
            raise InputError("no checkpoint given (--checkpoint PATH, repeatable)")
        dev = resolve_device(device)
        loaded = [load_model(p, dev) for p in checkpoints]
        chans = {c["synth"]["channels"] for _, c, _ in loaded}
        if len(chans) > 1:
            raise InputError(f"checkpoints disagree on input channels ({sorted(chans)}); ensemble one kind")
        tile = min(c["synth"]["size"] for _, c, _ in loaded)
        kw.setdefault("norms", [cal["norm"] if cal else None for _, _, cal in loaded])
        models = [inference_ready(m, c["synth"]["channels"], c["synth"]["size"], dev) for m, c, _ in loaded]
        ens = cls(models, chans.pop(), tile, device, paths=checkpoints, **kw)
        ens.member_calibrations = [cal for _, _, cal in loaded]  # each file's own operating point (ens. calibrate)
        ens.member_configs = [c for _, c, _ in loaded]
        return ens

    @torch.no_grad()
    def raw_forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """x (B,C,T,T) in [0,1] -> per model: (mask logits (B,T,T), image logits (B,) or None), each the mean
        over the TTA passes, before normalisation."""
        x = x.to(self.device)
        return [tta_mean(model, t, x) for model, t in zip(self.models, self.ttas)]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B,C,T,T) in [0,1] -> per-model normalised maps (M,B,T,T) and image scores (M,B) or None."""
        return self.normalise(self.raw_forward(x))

    def normalise(self, raw: list[tuple[torch.Tensor, torch.Tensor | None]]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`raw_forward`'s output -> `forward`'s: each model's maps and image scores through its normaliser."""
        maps, heads = [], []
        for (m, h), norm in zip(raw, self.norms):
            if norm is not None:
                c, s = norm["pixel"]
                m = (m - c) / s
                if h is not None and norm.get("image") is not None:
                    c, s = norm["image"]
                    h = (h - c) / s
            maps.append(m)
            heads.append(h)
        image = torch.stack(heads) if all(h is not None for h in heads) else None
        return torch.stack(maps).cpu(), (image.cpu() if image is not None else None)

    @staticmethod
    def _starts(n: int, t: int, overlap: int) -> list[int]:
        """Starts of windows of side t covering [0, n) (n >= t) with at least `overlap` px of overlap."""
        stride = max(1, t - overlap)
        s = list(range(0, n - t + 1, stride))
        return s if s[-1] == n - t else s + [n - t]

    def tiles(self, h: int, w: int) -> list[tuple[int, int]]:
        """Top-left corners of overlapping tiles covering an (h, w) image (h, w >= tile)."""
        t = self.tile
        return [(y, x) for y in self._starts(h, t, self.overlap) for x in self._starts(w, t, self.overlap)]

    def _layout(self, images: list[np.ndarray]) -> tuple[list[tuple[int, int, int]], list[dict]]:
        """Tiles (image index, y, x) and per-image accumulators for a list of uint8 images."""
        t = self.tile
        jobs, canvases = [], []
        for idx, img in enumerate(images):
            arr = self._hwc(img, f"image {idx}")
            h, w = arr.shape[:2]
            ph, pw = max(0, t - h), max(0, t - w)
            if ph or pw:
                arr = np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="reflect")
            H, W = arr.shape[:2]
            tiles = self.tiles(H, W)
            canvases.append({"arr": arr, "size": (h, w), "tiles": len(tiles), "sum": None, "count": None,
                             "head": []})
            jobs += [(idx, y, x) for y, x in tiles]
        return jobs, canvases

    def _batches(self, jobs, canvases):
        """Yield (tile jobs, (B,C,T,T) float tensor in [0,1]) in batches of `batch_size`."""
        t = self.tile
        for k in range(0, len(jobs), self.batch_size):
            chunk = jobs[k:k + self.batch_size]
            batch = np.stack([canvases[i]["arr"][y:y + t, x:x + t] for i, y, x in chunk])
            yield chunk, torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255)

    def warmup(self) -> None:
        """One forward pass on a dummy batch, so one-off kernel set-up is not billed to the first images."""
        self.forward(torch.zeros(min(self.batch_size, 4), self.channels, self.tile, self.tile).to(
            memory_format=torch.channels_last))

    @torch.no_grad()
    def bare_throughput(self, images: list[np.ndarray], repeats: int = 2) -> float:
        """Images/s of the networks' forward passes alone (every model x TTA pass, the same batches and memory
        layout as `predict`), best of `repeats`: the yardstick for what the rest of the pipeline costs."""
        jobs, canvases = self._layout(images)
        batches = [x for _, x in self._batches(jobs, canvases)]
        passes = [list(t) if t is not None else [None] for t in self.ttas]
        best = 0.0
        for _ in range(repeats + 1):  # the first round warms up
            start = time.perf_counter()
            for x in batches:
                x = x.to(self.device)
                for m, transforms in zip(self.models, passes):
                    for tr in transforms:
                        m(tr.augment_image(x) if tr is not None else x)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, len(images) / (time.perf_counter() - start))
        return best

    def predict(self, images: list[np.ndarray]) -> list[dict]:
        """For each uint8 image: {"map": merged (H,W) float32, "hits": binary (H,W) before post-processing,
        "image": float or None, "per_model": (M,H,W), "pixels": the image itself (for the outline's graph cut,
        `core.postprocess.grabcut_outline`)}. Images of the crop size go through in batches; larger ones
        are predicted whole (fully convolutional models, see `window`) or tiled with overlap and averaged."""
        big = [i for i, img in enumerate(images) if self.whole and max(img.shape[:2]) > self.tile]
        out = {i: self._predict_whole(images[i]) for i in big}
        rest = [i for i in range(len(images)) if i not in out]
        if rest:
            out.update(zip(rest, self._predict_tiled([images[i] for i in rest])))
        return [{**out[i], "pixels": images[i]} for i in range(len(images))]

    def _predict_whole(self, img: np.ndarray) -> dict:
        """One large image in windows of up to `window` px (padded by reflection to a multiple of STRIDE),
        overlapping by 2 x tile_overlap and averaged; the image score is the maximum over the windows, as the
        heads' global max pooling gives over one large input."""
        arr = self._hwc(img, "image")
        h, w = arr.shape[:2]
        ph, pw = max(0, self.tile - h), max(0, self.tile - w)  # at least one crop a side, as when tiling
        if ph or pw:
            arr = np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        H, W = arr.shape[:2]
        (win_h, ys), (win_w, xs) = self._windows(H), self._windows(W)
        total = np.zeros((len(self.models), H, W), np.float32)
        count = np.zeros((H, W), np.float32)
        heads = []
        for y in ys:
            for x in xs:
                part = arr[y:y + win_h, x:x + win_w]
                ph, pw = -win_h % STRIDE, -win_w % STRIDE
                if ph or pw:
                    part = np.pad(part, ((0, ph), (0, pw), (0, 0)), mode="reflect")
                t = torch.from_numpy(np.ascontiguousarray(part)).permute(2, 0, 1)[None].float().div_(255)
                maps, head = self.forward(t)
                total[:, y:y + win_h, x:x + win_w] += maps[:, 0, :win_h, :win_w].numpy()
                count[y:y + win_h, x:x + win_w] += 1
                if head is not None:
                    heads.append(head[:, 0].numpy())
        return self._merge({"sum": total / count, "count": 1.0, "tiles": 1, "size": (h, w), "head": heads})

    def _windows(self, n: int) -> tuple[int, list[int]]:
        """(size, starts) of the fewest equal windows of at most `window` px covering [0, n) with at least
        2 x tile_overlap px of overlap, spread evenly (so little is computed twice)."""
        if n <= self.window:
            return n, [0]
        o = min(2 * self.overlap, self.window // 2)
        k = math.ceil((n - o) / (self.window - o))
        size = min(n, math.ceil((n + (k - 1) * o) / k / STRIDE) * STRIDE)
        return size, sorted({int(round(v)) for v in np.linspace(0, n - size, k)})

    def crop_results(self, raw: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[dict]:
        """`raw_forward`'s output on a batch of crops of the tile size -> their `predict` results, normalised with
        today's normalisers: a pass already made (e.g. to fit the normalisers) need not be made again."""
        maps, heads = self.normalise(raw)
        size = tuple(maps.shape[2:])
        return [self._merge({"sum": maps[:, j].numpy(), "count": 1.0, "tiles": 1, "size": size,
                             "head": [heads[:, j].numpy()] if heads is not None else []})
                for j in range(maps.shape[1])]

    def _predict_tiled(self, images: list[np.ndarray]) -> list[dict]:
        t = self.tile
        jobs, canvases = self._layout(images)
        for chunk, x_t in self._batches(jobs, canvases):
            probs, heads = self.forward(x_t)
            for j, (i, y, x) in enumerate(chunk):
                c = canvases[i]
                if c["tiles"] == 1:  # the usual case, a crop of the model's size: no accumulation needed
                    c["sum"], c["count"] = probs[:, j].numpy(), 1.0
                else:
                    if c["sum"] is None:
                        H, W = c["arr"].shape[:2]
                        c["sum"] = np.zeros((len(self.models), H, W), np.float32)
                        c["count"] = np.zeros((H, W), np.float32)
                    c["sum"][:, y:y + t, x:x + t] += probs[:, j].numpy()
                    c["count"][y:y + t, x:x + t] += 1
                if heads is not None:
                    c["head"].append(heads[:, j].numpy())
        return [self._merge(c) for c in canvases]

    def _merge(self, c: dict) -> dict:
        h, w = c["size"]
        per_model = (c["sum"] if c["tiles"] == 1 else c["sum"] / c["count"])[:, :h, :w]
        amap = per_model[0] if len(self.models) == 1 else \
            np.tensordot(self.weights, per_model, axes=1).astype(np.float32)
        image = None
        if c["head"]:
            image = float(np.dot(self.weights, np.max(np.stack(c["head"]), axis=0)))
        result = {"map": amap, "image": image, "per_model": per_model}
        result["hits"] = self.rehit(result, self.threshold)
        return result

    def rehit(self, result: dict, threshold: float) -> np.ndarray:
        """The binary hits of a `predict` result at another pixel threshold (mean or vote merge)."""
        if self.merge == "vote":
            votes = np.tensordot(self.weights * len(self.models), result["per_model"] >= threshold, axes=1)
            return (votes >= self.vote_k - 1e-9).astype(np.uint8)
        return (result["map"] >= threshold).astype(np.uint8)

    def judge(self, result: dict, params: dict, roi: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(final mask, agreement gate) of a `predict` result at the operating point `params`: what `ensemble
        predict` writes (an empty mask: judged normal)."""
        hits = result["hits"] if params["threshold"] == self.threshold else self.rehit(result, params["threshold"])
        gate = agreement(result["per_model"], params.get("shape"))  # an ensemble's trim (calibrated)
        return final_mask(result["map"], result["image"], params, roi, hits, gate, result.get("pixels")), gate


def run_default(checkpoint, ensemble_file, warn=None):
    """(checkpoint, ensemble_file) with a `seg train` run folder given alone (`-m FOLDER`) standing for its
    default model: its ensemble.json (the segmenter and its partner baseline, calibrated as one) when it has one.
    A run's own best.pt given alone stays itself, with a note (`warn`) that its run has that ensemble."""
    if ensemble_file or not checkpoint or len(checkpoint) != 1:
        return checkpoint, ensemble_file
    found = run_ensemble(checkpoint[0])
    if found is not None:
        return None, found
    f = Path(checkpoint[0])
    if f.name != "best.pt" or not warn:
        return checkpoint, ensemble_file
    for folder in (f.parent, f.parent.parent):  # a run's best.pt, or one seed's of a run of several
        if run_ensemble(folder) is not None and (folder == f.parent or run_seeds(folder) is not None):
            warn(f"{f}: this model alone; its run's default is {folder / RUN_ENSEMBLE} (the segmenter and its "
                 f"partner, calibrated as one): -m {folder}")
            break
    return checkpoint, ensemble_file


def build_ensemble(checkpoint, ensemble_file, tta, merge, vote_k, weights, overrides: dict, device="auto",
                   calibrating: bool = False, warn=None):
    """(Ensemble, params): settings from the first checkpoint's config <- its calibration (one model file) or
    ensemble.json <- command-line flags. `calibrating`: the caller fits new thresholds, no warnings about old ones."""
    from core.io import read_json_file

    warn = warn or (lambda m: None)
    if not calibrating:
        checkpoint, ensemble_file = run_default(checkpoint, ensemble_file, warn)
    spec = read_json_file(ensemble_file) if ensemble_file else {}
    if spec and "norms" not in spec:
        raise InputError(f"{ensemble_file}: written by an older version (thresholds on a probability scale); "
                         "re-run `ensemble calibrate` to make it")
    seeded = [c for c in checkpoint or [] if run_seeds(c) is not None]
    if seeded and not spec and not calibrating:
        raise InputError(f"{seeded[0]}: a run of several seeds, one ensemble: calibrate it as one first "
                         f"(ensemble calibrate -m {seeded[0]} -o ensemble.json), then predict with -e ensemble.json")
    listed = spec_checkpoints(spec, ensemble_file) if spec else []
    paths = model_paths(checkpoint) if checkpoint else listed
    if not paths:
        raise InputError("no model: give --checkpoint PATH (repeatable) or --ensemble ensemble.json")
    if spec and checkpoint and [Path(x).resolve() for x in paths] != [Path(x).resolve() for x in listed]:
        raise InputError(f"{ensemble_file} was calibrated for {listed}; give no --checkpoint with it, "
                         "or calibrate the new set with `ensemble calibrate`")
    first = load_model_file(paths[0])
    p = dict(first["config"]["predict"])
    cal = first.get("calibration")
    calibrated_tta = spec.get("tta") if spec else (cal["tta"] if cal and len(paths) == 1 else None)
    if cal and not spec and len(paths) == 1:  # a calibrated model file: its operating point and its TTA
        p.update(cal["params"], tta=cal["tta"])
    elif not spec and len(paths) > 1 and not calibrating:
        warn(f"{len(paths)} models without an ensemble.json: each map is standardised by its own file's "
             "calibration, thresholds are the config's defaults; `ensemble calibrate` chooses them for the ensemble")
    p.update(spec.get("params", {}))
    source = spec.get("params") if spec else (cal["params"] if cal and len(paths) == 1 else None)
    for key, before in OUTLINE_RULES.items():  # calibrated before the rule: predict as then
        if source is not None and key not in source:
            p[key] = before
    for key in ("tta", "merge", "vote_k", "weights"):
        if key in spec:
            p[key] = spec[key]
    for key, value in {"tta": tta, "merge": merge, "vote_k": vote_k, "weights": weights, **overrides}.items():
        if value is not None:
            p[key] = value
    modes = per_model(str(p["tta"]))
    if checkpoint and len(modes) == len(checkpoint) != len(paths):  # one mode per -m: a run folder of seeds
        p["tta"] = ",".join(m for m, c in zip(modes, checkpoint) for _ in model_paths([c]))  # gives it to each
    kw = {"norms": spec["norms"]} if spec else {}
    ens = Ensemble.from_checkpoints(paths, device, tta_mode=p["tta"], merge=p["merge"], vote_k=p["vote_k"],
                                    weights=p["weights"], threshold=p["threshold"], batch_size=p["batch_size"],
                                    tile_overlap=p["tile_overlap"], window=p.get("window", 0), **kw)
    if calibrated_tta is not None and ens.tta_mode != calibrated_tta and not calibrating:
        warn(f"--tta {ens.tta_mode}: the thresholds were calibrated with tta {calibrated_tta}; re-calibrate for "
             "the best operating point")
    return ens, p
