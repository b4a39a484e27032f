"""A few real defects put to use, judged on defects they were not taken from: family weights fitted to them
(`synth fit-weights`) and five of them transplanted (the `transplant` family).

    python benchmarks/fit_weights.py [--sets magnetic-tile:1,...] [--variants fitted,transplant] [--from runs/bench_tex]

Per part, the defective test crops are split into two fixed halves (`seg.gap.half_of`: `fit` and `score`):

1. a pool of every family (`synth generate`, every family weight 1, one defect per sample);
2. the weights: `seg.gap.fit_family_weights` on the pool and the `fit` half only;
3. the realism gap against the `score` half: the default mix, the fitted mix, and the default mix with the first
   5 defective crops of the `fit` half transplanted (weight 1.5 next to the default weights' 6.1: about 20 % of the
   synthetic defects) (KID, ratio to normal patches);
4. the competition score on the scoring crops (every normal test crop and the `score` half of the defective ones):
   the default segmenter as trained and predicted by `benchmarks/run.py` (its prediction folders in --from,
   rescored on the scoring crops) against the same segmenter trained with each variant, alone and in the default
   hybrid with the same PatchCore. Everything else (config, seeds, budget, calibration on held-out OK images) is
   the same.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import DEV_SETS, FULL, QUICK, parse_sets, run_set  # noqa: E402
from core.io import atomic_write_bytes, competition_dir, find_images, find_mask_dir, mask_path_for  # noqa: E402
from ensemble.evaluate import score_folder  # noqa: E402
from core.io import half_of, labelled_defects  # noqa: E402
from seg.gap import families_override, fit_family_weights, gap_report  # noqa: E402
from synth.engine import FAMILIES, SynthConfig  # noqa: E402
from synth.generate import generate  # noqa: E402

METHODS = ("evidence", "hybrid_evidence")
NAMES = {"Evidence UNet": "evidence", "Hybrid Evidence UNet + PatchCore": "hybrid"}
KEYS = ("score", "pixel_ap", "pixel_auroc", "escape", "overkill", "miou")


def subset_metrics(pred_dir: Path, scoring_images: Path) -> dict:
    """The metrics of an existing prediction folder (all test crops) on the scoring crops only."""
    m = score_folder(pred_dir, scoring_images, with_oracle=False).metrics
    return {k: m[k] for k in KEYS}


def scoring_layout(data: str, part: int, root: Path) -> Path:
    """A competition-layout copy holding the part's OK images (linked) and the scoring crops with their masks."""
    tc = competition_dir(data, part, "TC_Images")
    fit = {p.name for p, _ in half_of(labelled_defects(tc), "fit")}
    train = root / f"round_train/part{part}"
    test = root / f"round_test/part{part}"
    if root.exists():
        shutil.rmtree(root)
    train.mkdir(parents=True)
    (train / "OK_Images").symlink_to(competition_dir(data, part, "OK_Images").resolve())
    for sub in ("TC_Images", "TC_Masks"):
        (test / sub).mkdir(parents=True)
    masks = find_mask_dir(tc)
    for p in find_images(tc):
        if p.name not in fit:
            shutil.copy2(p, test / "TC_Images" / p.name)
            m = mask_path_for(p, tc, masks)
            if m is not None:  # a crop without a mask is normal
                shutil.copy2(m, test / "TC_Masks" / f"{p.stem}.png")
    return root


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=DEV_SETS)
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parent.parent.parent / "shared/data"))
    ap.add_argument("--from", dest="source", default="runs/bench_tex",
                    help="a benchmarks/run.py output holding the default models (evidence_s0, patchcore.pt)")
    ap.add_argument("--out", default="runs/fitw")
    ap.add_argument("--keep", type=float, default=0.3)
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", default="fitted,transplant", help="trained variants: fitted, transplant")
    ap.add_argument("--transplant-n", type=int, default=5)
    a = ap.parse_args(argv)
    out, source = Path(a.out).resolve(), Path(a.source).resolve()
    defaults = SynthConfig().families
    every = {"families": {f: 1.0 for f in FAMILIES if f != "transplant"}, "max_defects": 1}
    rows = json.loads((out / "fit_weights.json").read_text()) if (out / "fit_weights.json").exists() else {}

    def log(m):
        print(m, flush=True)

    for label, data, part in parse_sets(a.sets, None, 1, a.data_root):
        ok, tc = competition_dir(data, part, "OK_Images"), competition_dir(data, part, "TC_Images")
        base = out / label
        for scratch in ("pool", "gap_default", "gap_fitted", "gap_transplant"):
            shutil.rmtree(base / scratch, ignore_errors=True)  # always today's code
        generate(ok, base / "pool", 1200, SynthConfig.from_dict(every), workers=2, holdout=0.2)
        fitted = fit_family_weights(base / "pool", tc, defaults, keep=a.keep, half="fit")
        weights = fitted["weights"]  # every family, zeros included: a config override merges into the defaults
        transplant = {"transplant": str(tc), "transplant_half": "fit", "transplant_limit": a.transplant_n}
        synth = {"default": {}, "fitted": {"families": weights},
                 "transplant": {**transplant, "families": {**defaults, "transplant": 1.5}}}
        row = rows.get(label, {})
        row.update(weights=weights, fit_patches=fitted["real_patches"])
        for variant, cfg in synth.items():
            folder = base / f"gap_{variant}"
            generate(ok, folder, a.n, SynthConfig(**cfg), workers=2, holdout=0.2)
            r = gap_report(folder, tc, half="score")
            row[f"gap_{variant}"] = r.get("relative_to_normal")
            row["score_patches"] = r["real_patches"]
        log(f"{label}: gap (scoring half) " + ", ".join(f"{v} {row[f'gap_{v}']:.2f}" for v in synth) +
            f"; fitted weights {weights}")
        root = scoring_layout(data, part, base / "data")
        flow = {"fitted": (families_override(weights),),
                "transplant": (f"synth.transplant={tc}", "synth.transplant_half=fit",
                               f"synth.transplant_limit={a.transplant_n}", "synth.families.transplant=1.5")}
        scoring = root / f"round_test/part{part}/TC_Images"
        for slug, short in (("evidence", "evidence"), ("hybrid_evidence", "hybrid")):  # --from's maps, rescored
            row[f"{short}_default"] = subset_metrics(source / label / "pred" / slug, scoring)
        for variant in a.variants.split(","):
            run_dir = base / variant
            run_dir.mkdir(parents=True, exist_ok=True)
            steps = json.loads((source / label / "steps.json").read_text())
            (run_dir / "steps.json").write_text(json.dumps({"fit_patchcore": steps["fit_patchcore"]}))
            if not (run_dir / "patchcore.pt").exists():
                (run_dir / "patchcore.pt").symlink_to(source / label / "patchcore.pt")
            res = run_set(label, str(root), part, run_dir, QUICK if a.quick else FULL, METHODS, True, log,
                          overrides=flow[variant])
            for name, short in NAMES.items():
                row[f"{short}_{variant}"] = {k: res[name][k] for k in KEYS}
        rows[label] = row
        atomic_write_bytes(out / "fit_weights.json", json.dumps(rows, indent=1).encode())
    lines = [f"A few real defects, {datetime.date.today().isoformat()}: family weights fitted on half the real "
             "defects, or 5 of that half transplanted; gap and scores on the other half and every normal crop", "",
             "| part | gap default / fitted / transplant | Evidence UNet score (default / fitted / transplant) | "
             "pixel AP | Hybrid score | pixel AP |", "|---|---|---|---|---|---|"]

    def cells(r, key, metric):
        return " / ".join(f"{r[f'{key}_{v}'][metric]:.3f}" if f"{key}_{v}" in r else "-"
                          for v in ("default", "fitted", "transplant"))

    for label, r in rows.items():
        gaps = " / ".join(f"{r.get(f'gap_{v}', float('nan')):.2f}" for v in ("default", "fitted", "transplant"))
        lines.append(f"| {label} | {gaps} | {cells(r, 'evidence', 'score')} | {cells(r, 'evidence', 'pixel_ap')} | "
                     f"{cells(r, 'hybrid', 'score')} | {cells(r, 'hybrid', 'pixel_ap')} |")
    md = "\n".join(lines) + "\n"
    atomic_write_bytes(out / "fit_weights.md", md.encode())
    print(md)
    return rows


if __name__ == "__main__":
    main()
