"""How the false-alarm budget (`calibrate.target_overkill`) and the size balance of the synthetic escape
(`calibrate.balance_sizes`) move the calibrated score, on every part at once.

    python benchmarks/target_sweep.py --bench runs/bench [--targets 0.01,0.02,0.05,0.1,0.2]

For each part and model of a finished `bench` run, the calibration data (held-out normal crops and synthetic defects,
exactly as `ensemble calibrate` draws them) and the test crops are predicted once; the operating point is then chosen
from OK images for each target and scored on the test crops. One default for every part is chosen from the mean
(the test crops choose one number for the whole toolkit, never a per-part setting). Writes target_sweep.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from core.metrics import competition_score  # noqa: E402
from core.modelfile import load_model_file, model_paths  # noqa: E402
from core.postprocess import OUTLINE_RULES, agreement, final_mask  # noqa: E402
from core.io import atomic_write_bytes, competition_dir, read_image  # noqa: E402
from benchmarks.run import interrupted_steps  # noqa: E402
from ensemble.calibrate import calibration_pools, fit_norms, member_thresholds, normal_crops, operating_point, \
    synthetic_defects  # noqa: E402
from ensemble.evaluate import load_ground_truth  # noqa: E402
from ensemble.models import Ensemble  # noqa: E402

MODELS = {"UNet": ["unet_s0"], "Evidence UNet": ["evidence_s0"], "PatchCore": ["patchcore.pt"],  # run folders: their
          "Hybrid UNet + PatchCore": ["unet_s0", "patchcore.pt"],                         # best.pt or every seed's
          "Hybrid Evidence UNet + PatchCore": ["evidence_s0", "patchcore.pt"]}


def sweep(part_dir: Path, files: list[str], targets: list[float], hybrid_tta: str = "flip",
          balances: tuple = (False, True)) -> dict[bool, list[float]]:
    paths = model_paths([part_dir / f for f in files])
    first = load_model_file(paths[0])
    cfg, own = first["config"], first.get("calibration") or {}
    tta = own.get("tta", "none") if len(files) == 1 else hybrid_tta  # one model, or one segmenter's seeds: its own
    ens = Ensemble.from_checkpoints(paths, "auto", tta_mode=tta, norms=[None] * len(paths))
    c = cfg["calibrate"]
    pool, _ = calibration_pools(cfg)
    normal = normal_crops(pool, c["normal_crops"], c["seed"])
    syn = synthetic_defects(cfg, pool, c["synth_n"], c["seed"])
    norms = fit_norms(ens, normal)
    ens.set_norms(norms)
    shape = member_thresholds(ens, norms) if c.get("shape", True) else None  # a hybrid trims as it predicts
    res_n, res_s = ens.predict(normal), ens.predict(syn[0])
    test = competition_dir(cfg["data"]["root"], cfg["part"], "TC_Images")
    paths_t, _, gt = load_ground_truth(test)
    res_t = ens.predict([read_image(p, ens.channels) for p in paths_t])
    gates_s = None if shape is None else [agreement(r["per_model"], shape) for r in res_s]  # fixed: once
    gates_t = [agreement(r["per_model"], shape) for r in res_t]
    out = {b: [] for b in balances}
    for balance in out:
        for t in targets:
            best = operating_point(res_n, res_s, syn[1], ens.rehit, 0, t, None, balance, gates_s,
                                   c.get("spend_budget", False))  # as the model's own calibration searched
            p = {"threshold": best["threshold"], "image_threshold": best["image_threshold"],
                 "min_area": best["min_area"], "opening": 0,
                 **{k: cfg["predict"].get(k, off) for k, off in OUTLINE_RULES.items()}}
            pred = [final_mask(r["map"], r["image"], p, hits=ens.rehit(r, p["threshold"]), gate=g, pixels=r["pixels"])
                    for r, g in zip(res_t, gates_t)]
            out[balance].append(competition_score(pred, gt)["score"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="runs/bench")
    ap.add_argument("--targets", default="0.01,0.02,0.05,0.1,0.2")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--parts", default=None, help="comma-separated part folders of --bench (default: all)")
    ap.add_argument("--hybrid-tta", default="flip", help="as benchmarks/run.py")
    ap.add_argument("--no-balance", action="store_true", help="skip the size-balanced escape variant (faster)")
    a = ap.parse_args(argv)
    targets = [float(t) for t in a.targets.split(",")]
    balances = (False,) if a.no_balance else (False, True)
    bench = Path(a.bench)
    parts = []
    for p in sorted(p for p in bench.iterdir() if (p / "steps.json").exists()):
        if half := interrupted_steps(p):
            print(f"{p}: skipped, {', '.join(half)} left half done (finish it: benchmarks/run.py --reuse)")
        else:
            parts.append(p)
    if a.parts:
        parts = [p for p in parts if p.name in a.parts.split(",")]
    lines = ["| method | escape over sizes | part | " + " | ".join(f"{t:g}" for t in targets) + " |",
             "|" + "---|" * (len(targets) + 3)]
    for name in a.models.split(","):
        per_part = {part.name: sweep(part, MODELS[name], targets, a.hybrid_tta, balances) for part in parts
                    if all((part / f).exists() for f in MODELS[name])}
        for balance in balances:
            label = "balanced" if balance else "pooled"
            for part, scores in per_part.items():
                lines.append(f"| {name} | {label} | {part} | " + " | ".join(f"{s:.3f}" for s in scores[balance]) + " |")
            if per_part:
                mean = np.mean([scores[balance] for scores in per_part.values()], 0)
                lines.append(f"| {name} | {label} | **mean** | " + " | ".join(f"{s:.3f}" for s in mean) + " |")
        print("\n".join(lines[-len(balances) * (len(per_part) + 1):]), flush=True)
    atomic_write_bytes(bench / "target_sweep.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
