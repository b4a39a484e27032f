"""`synth generate`: write N synthetic samples (images/, masks/, manifest.jsonl) reproducibly and resumably.

Sample i is drawn from the tagged stream `[GENERATE, seed, i]` (synth.streams), so the bytes do not depend on the
number of workers. Each image and mask is written atomically before its manifest line; a rerun skips the ids already
in the manifest, so an interrupted run resumes where it stopped and never leaves half a sample listed. Workers start
from a fresh interpreter (core.workers), never by forking this threaded process, and a worker that dies or stalls
ends the run with an error naming its samples.

With `holdout > 0` the same held-out split as `seg train` (synth.engine.SourcePool.split) is kept out: samples are
drawn only on the training images, and the held-out names are recorded in `run.json`, so a model trained from the
folder validates and calibrates on images it never saw.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from core.io import InputError, append_jsonl, read_json_file, read_jsonl, sweep_temps, write_json, write_png
from core.workers import limit_threads, ordered_map

from .engine import DefectSynthesizer, SourcePool, SynthConfig
from .streams import GENERATE, stream

FORMAT = 2  # 2: tagged sample streams and the held-out split; folders of format 1 cannot be resumed
_WORKER: dict = {}


def sample_id(i: int) -> str:
    return f"{i:06d}"


def _init_worker(root: str, paths: list[str], config: dict, seed: int, out: str, crop=None) -> None:
    limit_threads(1)
    _init(root, paths, config, seed, out, crop)


def _init(root: str, paths: list[str], config: dict, seed: int, out: str, crop=None) -> None:
    cfg = SynthConfig.from_dict(config)
    _WORKER.update(engine=DefectSynthesizer(cfg), seed=seed, out=Path(out),
                   pool=SourcePool(root, cfg.channels, cfg.size, paths=paths, crop=crop))


def _make(i: int) -> dict:
    w = _WORKER
    image, mask, record = w["engine"].draw(stream(GENERATE, w["seed"], i), w["pool"])
    sid = sample_id(i)
    write_png(w["out"] / "images" / f"{sid}.png", image)
    write_png(w["out"] / "masks" / f"{sid}.png", mask * 255)
    return {"id": sid, "index": i, "seed": w["seed"], **record}


def _make_chunk(indices: list[int]) -> list[dict]:
    return [_make(i) for i in indices]


def _describe(indices: list[int]) -> str:
    return f"samples {sample_id(indices[0])}-{sample_id(indices[-1])}"


def generate(source: str | Path, out: str | Path, n: int, config: SynthConfig, seed: int = 0, workers: int = 1,
             warn: Callable[[str], None] | None = None, progress=None, holdout: float = 0.0,
             holdout_seed: int = 0, crop=None) -> dict:
    """Generate samples 0..n-1 into `out`; returns a summary dict (written, skipped, bad files, seconds).
    `crop`: each OK image cut to that box first (`data.ok_crop`)."""
    out = Path(out)
    everything = SourcePool(source, config.channels, config.size, warn=warn, crop=crop)
    pool, held = everything.split(holdout, holdout_seed)
    settings = {"format": FORMAT, "source": str(Path(source).resolve()), "seed": seed, "config": config.to_dict(),
                "sources": len(pool), "holdout": holdout, "holdout_seed": holdout_seed,
                "held_out": held.paths if held else [], "ok_crop": list(pool.crop) if pool.crop else None}
    run_file = out / "run.json"
    if run_file.exists():
        previous = read_json_file(run_file)
        if previous.get("format", 1) != FORMAT:
            raise InputError(f"{run_file}: this folder was written by an older version (sample streams changed); "
                             "use a new output folder or --overwrite")
        if {k: previous.get(k) for k in settings} != settings:
            raise InputError(f"{run_file}: this folder holds a run with other settings (source, seed, split or "
                             "config); use a new output folder or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "masks"):
        sweep_temps(out / sub)  # what a killed run was writing
    write_json(run_file, settings)
    manifest = out / "manifest.jsonl"
    done = {row["index"] for row in read_jsonl(manifest, repair=True)}
    todo = [i for i in range(n) if i not in done]
    start = time.perf_counter()
    args = (str(pool.root), pool.paths, config.to_dict(), seed, str(out), pool.crop)
    with open(manifest, "a") as f:
        if workers <= 1:
            _init(*args)
            _consume(map(_make, todo), f, progress)
        else:
            DefectSynthesizer(config)  # what the workers build: a bad setting (a transplant folder) is one line here
            _consume(ordered_map(_make_chunk, todo, workers, _init_worker, args, describe=_describe), f, progress)
    seconds = time.perf_counter() - start
    return {"written": len(todo), "held_out": len(settings["held_out"]), "skipped": len(done & set(range(n))),
            "bad_files": len(everything.bad),
            "seconds": seconds, "rate": len(todo) / seconds if todo and seconds > 0 else 0.0}


def _consume(results, f, progress) -> None:
    """Append manifest lines in batches; whatever finished is listed even when a worker error or Ctrl-C ends the
    run (its files were written before its result came back)."""
    batch = []
    try:
        for row in results:
            batch.append(row)
            if progress:
                progress(1)
            if len(batch) >= 64:
                append_jsonl(f, batch)
                batch = []
    finally:
        append_jsonl(f, batch)
