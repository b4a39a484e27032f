"""The model-file format shared by segmenters and baselines: one `torch.save`d dict of tensors and plain data
(numbers, strings, lists, dicts), read back with `weights_only=True`, so loading a file never runs code in it.

Keys: `config` (the resolved config; `config["model"]` names the registry entry), `model` (the state dict), for every
model alike (`seg train`, `baseline fit`), and optionally `calibration` (the operating point and the map normaliser
chosen by `ensemble.calibrate`, see there).
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from core import __version__
from core.io import InputError, atomic_write_bytes, read_json_file


def plain(obj):
    """`obj` with numpy scalars and arrays turned into Python numbers and tensors, so the file loads with
    `weights_only=True`."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_model_file(path: str | Path, state: dict) -> None:
    """Write `state` (made plain, see `plain`) atomically: a reader never sees half a file."""
    buf = io.BytesIO()
    torch.save(plain({**state, "toolkit_version": __version__}), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_model_file(path: str | Path, map_location="cpu") -> dict:
    """A model file's dict. Never executes code from the file: anything but tensors and plain data is refused
    with one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        if not found:
            raise InputError(f"{path}: not a readable model file ({str(e).splitlines()[-1][:160]})") from None
        raise InputError(f"{path}: refused to load: it refers to {found.group(1)}, not only tensors and plain "
                         "data, and loading it could run code; only files written by `seg train` or `baseline fit` "
                         "load; a file of an older version that you trust converts with "
                         "`python cli.py seg convert FILE`") from None
    except Exception as e:  # truncated, not a torch file at all, ...
        raise InputError(f"{path}: not a readable model file ({type(e).__name__}: {str(e)[:160]})") from None
    _check_layout(path, ckpt)
    c = ckpt["config"]
    if not (isinstance(c, dict) and isinstance(c.get("model"), dict) and isinstance(c.get("synth"), dict)
            and "arch" in c["model"] and "size" in c["synth"] and "channels" in c["synth"]):
        raise InputError(f"{path}: incomplete model file (no config.model.arch, config.synth.size or "
                         "config.synth.channels)")
    return ckpt


def _check_layout(path: Path, ckpt) -> None:
    """One line naming the file when `ckpt` is not a model file's dict of today's layout."""
    if isinstance(ckpt, dict) and "method" in ckpt and "state" in ckpt:  # before baselines joined the registry
        raise InputError(f"{path}: a `baseline fit` file of an older layout (toolkit {ckpt.get('toolkit_version', '?')}"
                         f"); re-fit it: baseline fit --method {ckpt['method']}")
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise InputError(f"{path}: not a model file written by `seg train` or `baseline fit` (no model/config)")


SEEDS_FILE = "seeds.json"  # in a `seg train` run folder of several seeds: {"seeds": [0, 1]}, each in seed<S>/


def run_seeds(folder: str | Path) -> list[int] | None:
    """The seeds of the run of several seeds in `folder` (its seeds.json, written when the training started), or
    None where the folder's run is one model (its best.pt and last.pt sit in the folder itself)."""
    f = Path(folder) / SEEDS_FILE
    if not f.is_file():
        return None
    data = read_json_file(f)
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not (isinstance(seeds, list) and seeds and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise InputError(f'{f}: not a seeds file of `seg train` (expected {{"seeds": [0, 1]}})')
    return seeds


def model_paths(paths) -> list[str]:
    """Model files from the command line: a file stays itself; a `seg train` run folder stands for its best.pt,
    or, for a run of several seeds (seeds.json), for every seed's `seed<S>/best.pt`, in the order trained."""
    out: list[str] = []
    for p in paths:
        p = Path(p)
        if not p.is_dir():
            out.append(str(p))
            continue
        seeds = run_seeds(p)
        if seeds is None:
            if not (p / "best.pt").is_file():
                raise InputError(f"{p}: a folder with no best.pt and no {SEEDS_FILE} in it; give a model file or a "
                                 "`seg train` run folder")
            out.append(str(p / "best.pt"))
            continue
        files = [p / f"seed{x}" / "best.pt" for x in seeds]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{missing[0]}: not there yet, the run of seeds {seeds} in {p} is unfinished; "
                             f"`seg train --resume -o {p}` completes it")
        out.extend(str(f) for f in files)
    return out


RUN_ENSEMBLE = "ensemble.json"  # in a `seg train` run folder: its segmenter(s) and partner, calibrated as one


def run_ensemble(path: str | Path) -> Path | None:
    """The calibrated ensemble that a `seg train` run folder stands for when it has one (its ensemble.json: the
    segmenter and its partner baseline, `train.partner`), else None (a file, or a folder without one)."""
    f = Path(path) / RUN_ENSEMBLE
    return f if Path(path).is_dir() and f.is_file() else None


def spec_checkpoints(spec: dict, spec_path: str | Path) -> list[str]:
    """The model files an ensemble.json lists. Written today relative to the ensemble.json's own folder
    (`"relative": true`), so a run folder moved or copied elsewhere still loads; files of older versions list
    them as given on their command line."""
    listed = [str(c) for c in spec.get("checkpoints") or []]
    if spec.get("relative"):
        return [str(Path(spec_path).parent / c) for c in listed]
    return listed


def relative_checkpoints(paths, spec_path: str | Path) -> list[str]:
    """`paths` relative to the folder of the ensemble.json `spec_path` (what `spec_checkpoints` reads back)."""
    base = Path(spec_path).resolve().parent
    return [os.path.relpath(Path(p).resolve(), base) for p in paths]


def set_calibration(path: str | Path, calibration: dict) -> None:
    """Store (or replace) the calibration inside an existing model file, atomically."""
    ckpt = load_model_file(path)
    ckpt["calibration"] = calibration
    save_model_file(path, ckpt)


def convert_trusted(path: str | Path, out: str | Path | None = None) -> Path:
    """Rewrite a model file of an older version (which may hold numpy scalars) in today's plain format. This one
    call unpickles the file fully: run it only on files you trust."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise InputError(f"{path}: not a readable model file ({type(e).__name__}: {str(e)[:160]})") from None
    _check_layout(path, ckpt)
    out = Path(out or path)
    save_model_file(out, ckpt)
    load_model_file(out)
    return out
