"""ONNX export of a model file or a whole calibrated ensemble, and prediction from the exported file.

The graph holds everything between a crop and the per-model standardised maps: each model's own input
normalisation, the TTA passes (averaged, as `Ensemble.raw_forward`) and each model's normaliser (its calibration).
Input `image`: float32 (B, C, T, T), the pixels / 255. Outputs `maps` (M, B, T, T) and, when every model has an
image head, `heads` (M, B). The merge (weighted mean or vote), the thresholds and the post-processing stay outside,
in the same numpy code as for PyTorch (`OnnxEnsemble` only replaces `Ensemble.forward`), so both backends write the
same submission. Thresholds, TTA, merge, weights, tile size and channels are in the file's metadata
(`defect_synth` key, JSON).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core import __version__
from core.io import InputError, atomic_write_bytes
from core.postprocess import OUTLINE_RULES

from .models import Ensemble, tta_mean

META_KEY = "defect_synth"


class ExportGraph(nn.Module):
    """An Ensemble's models, TTA and normalisers as one module: x in [0,1] -> (maps (M,B,T,T), heads (M,B))."""

    def __init__(self, ens: Ensemble):
        super().__init__()
        self.models = nn.ModuleList(ens.models)
        self.ttas = ens.ttas
        centers, scales, hc, hs = [], [], [], []
        for norm in ens.norms:
            c, s = norm["pixel"] if norm else (0.0, 1.0)
            centers.append(c)
            scales.append(s)
            img = norm.get("image") if norm else None
            hc.append(img[0] if img else 0.0)
            hs.append(img[1] if img else 1.0)
        self.register_buffer("center", torch.tensor(centers, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scales, dtype=torch.float32))
        self.register_buffer("head_center", torch.tensor(hc, dtype=torch.float32))
        self.register_buffer("head_scale", torch.tensor(hs, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        maps, heads = [], []
        for i, (model, t) in enumerate(zip(self.models, self.ttas)):
            m, h = tta_mean(model, t, x)
            maps.append((m - self.center[i]) / self.scale[i])
            if h is not None:
                heads.append((h - self.head_center[i]) / self.head_scale[i])
        if len(heads) != len(maps):
            return torch.stack(maps)
        return torch.stack(maps), torch.stack(heads)


def export_onnx(ens: Ensemble, params: dict, out: str | Path, opset: int = 17) -> dict:
    """Write `ens` (with its TTA and normalisers) as ONNX to `out`; `params` (thresholds, min_area, ...) go into the
    metadata. Returns the metadata."""
    try:
        import onnx
    except ImportError:
        raise InputError("ONNX export needs the onnx, onnxscript and onnxruntime packages: "
                         "pip install '.[onnx]'") from None
    graph = ExportGraph(ens).eval()
    x = torch.rand(2, ens.channels, ens.tile, ens.tile)
    with torch.no_grad():
        heads = isinstance(graph(x), tuple)
    names = ["maps", "heads"] if heads else ["maps"]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:  # the TorchScript-based exporter: here 20x faster than the dynamo one, and as exact
            buf = io.BytesIO()
            axes = {"image": {0: "batch"}, **{n: {1: "batch"} for n in names}}
            torch.onnx.export(graph, (x,), buf, input_names=["image"], output_names=names, opset_version=opset,
                              dynamic_axes=axes, dynamo=False)
            model = onnx.load_from_string(buf.getvalue())
            exporter = "torchscript"
        except Exception:  # a torch without it, or a graph it cannot take: the dynamo exporter (needs onnxscript)
            batch = torch.export.Dim("batch", min=1, max=4096)
            model = torch.onnx.export(graph, (x,), input_names=["image"], output_names=names, opset_version=opset,
                                      dynamic_shapes=({0: batch},), dynamo=True, verbose=False).model_proto
            exporter = "dynamo"
    meta = {"version": __version__, "channels": ens.channels, "tile": ens.tile, "tile_overlap": ens.overlap,
            "tta": ens.tta_mode,
            "merge": ens.merge, "vote_k": ens.vote_k, "weights": [float(w) for w in ens.weights],
            "models": len(ens.models), "heads": heads, "checkpoints": ["/".join(Path(p).parts[-2:]) for p in ens.paths],
            "params": {k: params[k] for k in ("threshold", "image_threshold", "min_area", "opening", "shape",
                                              *OUTLINE_RULES) if k in params},
            "roi": params.get("roi"), "exporter": exporter}
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    atomic_write_bytes(out, model.SerializeToString())
    return meta


class OnnxEnsemble(Ensemble):
    """An exported file run by onnxruntime (CPU, or CUDA when its provider is present), through the same tiling,
    merge and post-processing as `Ensemble`."""

    def __init__(self, path: str | Path, batch_size: int = 32, tile_overlap: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError("--backend onnx needs onnxruntime: pip install onnxruntime") from None
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: ONNX file does not exist")
        try:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in ort.get_available_providers()]
            self.session = ort.InferenceSession(str(path), providers=providers)
            meta = json.loads(self.session.get_modelmeta().custom_metadata_map[META_KEY])
        except KeyError:
            raise InputError(f"{path}: not an ONNX file written by `seg export` (no {META_KEY} metadata)") from None
        except Exception as e:  # onnxruntime raises its own types for damaged files
            raise InputError(f"{path}: cannot be loaded as ONNX ({type(e).__name__}: {str(e)[:160]})") from None
        self.meta = meta
        n = meta["models"]
        super().__init__([nn.Identity()] * n, meta["channels"], meta["tile"], "cpu", "none", merge=meta["merge"],
                         vote_k=meta["vote_k"], weights=meta["weights"], threshold=meta["params"].get("threshold", 0),
                         batch_size=batch_size, paths=[str(path)],
                         tile_overlap=meta.get("tile_overlap", 32) if tile_overlap is None else tile_overlap)
        self.tta_mode = meta["tta"]  # inside the graph

    def params(self) -> dict:
        return {**self.meta["params"], "roi": self.meta.get("roi")}

    def forward(self, x: torch.Tensor):
        out = self.session.run(None, {"image": np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        maps = torch.from_numpy(out[0])
        heads = torch.from_numpy(out[1]) if len(out) > 1 else None
        return maps, heads

    def warmup(self) -> None:
        self.forward(torch.zeros(min(self.batch_size, 4), self.channels, self.tile, self.tile))
