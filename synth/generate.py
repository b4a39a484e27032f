"""`synth generate`: write N synthetic samples (images/, masks/, manifest.jsonl) reproducibly and resumably.

Sample i is drawn from `np.random.default_rng([seed, i])`, so the bytes do not depend on the number of workers.
Each image and mask is written atomically before its manifest line; a rerun skips the ids already in the
manifest, so an interrupted run resumes where it stopped and never leaves half a sample listed.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .engine import DefectSynthesizer, SourcePool, SynthConfig
from core.io import InputError, append_jsonl, read_jsonl, read_json_file, write_json, write_png

_WORKER: dict = {}


def sample_id(i: int) -> str:
    return f"{i:06d}"


def _init_worker(root: str, paths: list[str], config: dict, seed: int, out: str) -> None:
    cv2.setNumThreads(1)
    cfg = SynthConfig.from_dict(config)
    _WORKER.update(engine=DefectSynthesizer(cfg), seed=seed, out=Path(out),
                   pool=SourcePool(root, cfg.channels, cfg.size, paths=paths))


def _make(i: int) -> dict:
    w = _WORKER
    image, mask, record = w["engine"].draw(np.random.default_rng([w["seed"], i]), w["pool"])
    sid = sample_id(i)
    write_png(w["out"] / "images" / f"{sid}.png", image)
    write_png(w["out"] / "masks" / f"{sid}.png", mask * 255)
    return {"id": sid, "index": i, "seed": w["seed"], **record}


def generate(source: str | Path, out: str | Path, n: int, config: SynthConfig, seed: int = 0, workers: int = 1,
             warn: Callable[[str], None] | None = None, progress=None) -> dict:
    """Generate samples 0..n-1 into `out`; returns a summary dict (written, skipped, bad files, seconds)."""
    out = Path(out)
    pool = SourcePool(source, config.channels, config.size, warn=warn)
    settings = {"source": str(Path(source).resolve()), "seed": seed, "config": config.to_dict(),
                "sources": len(pool)}
    run_file = out / "run.json"
    if run_file.exists():
        previous = read_json_file(run_file)
        if {k: previous.get(k) for k in settings} != settings:
            raise InputError(f"{run_file}: this folder holds a run with other settings (source, seed or config); "
                             "use a new output folder or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    write_json(run_file, settings)
    manifest = out / "manifest.jsonl"
    done = {row["index"] for row in read_jsonl(manifest, repair=True)}
    todo = [i for i in range(n) if i not in done]
    start = time.perf_counter()
    args = (str(pool.root), pool.paths, config.to_dict(), seed, str(out))
    with open(manifest, "a") as f:
        if workers <= 1:
            _init_worker(*args)
            results = map(_make, todo)
            _consume(results, f, progress)
        else:
            with mp.get_context().Pool(workers, initializer=_init_worker, initargs=args) as p:
                _consume(p.imap(_make, todo, chunksize=16), f, progress)
    seconds = time.perf_counter() - start
    return {"written": len(todo), "skipped": len(done & set(range(n))), "bad_files": len(pool.bad),
            "seconds": seconds, "rate": len(todo) / seconds if todo and seconds > 0 else 0.0}


def _consume(results, f, progress) -> None:
    batch = []
    for row in results:
        batch.append(row)
        if progress:
            progress(1)
        if len(batch) >= 64:
            append_jsonl(f, batch)
            batch = []
    append_jsonl(f, batch)
