"""Several seeds of one segmenter in one hybrid: is the gain the ensemble's, or one lucky seed's?

    python benchmarks/run.py --methods evidence,patchcore,hybrid_evidence -s train.seed=1 --out runs/bench_s1
    python benchmarks/seeds.py --bench runs/bench runs/bench_s1 runs/bench_s2 --out runs/seeds

Every `--bench` folder is a `benchmarks/run.py` output trained with another seed (same config and parts). Per part,
for every subset of the seeds (each alone, each pair, ..., all), the subset's segmenters and the first folder's
PatchCore are calibrated as one hybrid from the part's held-out OK images (`ensemble calibrate --tta flip`: the
test crops choose nothing), predicted and scored on the part's TC_Images, exactly as the default hybrid of
`run.py`. Writes `seeds.json` (every subset, every part) and `seeds.md`: per subset size, the mean over the subsets
of that size of the five-part mean score, pixel AP and pixel AUROC, with the spread (min - max) across subsets.
`--sizes 1` builds only the single-seed hybrids (`--sizes 1,3`: singles and the three-seed one); `--reuse` keeps the
predictions already in --out.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.run import DEV_SETS, parse_sets, run  # noqa: E402
from core.io import atomic_write_bytes, competition_dir, write_json  # noqa: E402
from core.modelfile import model_paths  # noqa: E402
from ensemble.evaluate import load_ground_truth, score_folder  # noqa: E402

SEGMENTER = "evidence_s0"  # run.py's evidence UNet run folder (whatever train.seed it was given): its model files
KEYS = ("score", "pixel_ap", "pixel_auroc", "calibration_loss")


def hybrid(members: list[Path], patchcore: Path, out: Path, images: Path, truth, reuse: bool, log) -> dict:
    """Calibrate members + PatchCore as one hybrid, predict `images`, score: the metrics dict."""
    pred = out / "pred"
    if not (reuse and (pred / "predict.json").exists()):
        ck = [x for m in [*members, patchcore] for x in ("-m", str(m))]
        run(["ensemble", "calibrate", *ck, "--tta", "flip", "-o", str(out / "hybrid.json")], log)
        run(["ensemble", "predict", "-e", str(out / "hybrid.json"), "--images", str(images), "-o", str(pred)], log)
    return score_folder(pred, images, truth=truth).metrics


def summary(results: dict, names: list[str], sizes: list[int]) -> list[str]:
    """Markdown: per subset size, mean (min - max over the subsets) of the five-part means."""
    lines = ["| seeds in the hybrid | subsets | mean score | worst part (mean) | pixel AP | pixel AUROC | "
             "calibration loss |", "|---|---|---|---|---|---|---|"]
    for k in sizes:
        subs = ["+".join(c) for c in itertools.combinations(names, k)]
        per = {key: [float(np.mean([results[p][s][key] for p in results])) for s in subs] for key in KEYS}
        worst = [min(results[p][s]["score"] for p in results) for s in subs]

        def cell(v):
            return f"{np.mean(v):.3f}" + (f" ({min(v):.3f} - {max(v):.3f})" if len(v) > 1 else "")

        lines.append(f"| {k} | {len(subs)} | {cell(per['score'])} | {cell(worst)} | {cell(per['pixel_ap'])} | "
                     f"{cell(per['pixel_auroc'])} | {cell(per['calibration_loss'])} |")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", nargs="+", required=True, help="run.py output folders, one per seed")
    ap.add_argument("--names", default=None, help="comma-separated names of the folders (default s0, s1, ...)")
    ap.add_argument("--sets", default=DEV_SETS)
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data"))
    ap.add_argument("--out", default="runs/seeds")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated subset sizes to build (default every size, 1 to the number of folders)")
    ap.add_argument("--reuse", action="store_true")
    a = ap.parse_args(argv)
    benches = [Path(b) for b in a.bench]
    names = a.names.split(",") if a.names else [f"s{i}" for i in range(len(benches))]
    if len(names) != len(benches):
        raise SystemExit(f"--names: {len(names)} names for {len(benches)} --bench folders")
    try:
        sizes = sorted({int(k) for k in a.sizes.split(",")}) if a.sizes else list(range(1, len(names) + 1))
    except ValueError:
        raise SystemExit(f"--sizes: expected comma-separated integers, got {a.sizes!r}") from None
    if not sizes or any(not 1 <= k <= len(names) for k in sizes):
        raise SystemExit(f"--sizes: every size must lie in 1..{len(names)}, got {a.sizes!r}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict[str, dict] = {}
    for label, data, part in parse_sets(a.sets, None, 1, a.data_root):
        images = competition_dir(data, part, "TC_Images")
        truth = load_ground_truth(images)
        seg = {n: b / label / SEGMENTER for n, b in zip(names, benches)}
        missing = [str(p) for p in [*seg.values(), benches[0] / label / "patchcore.pt"] if not p.exists()]
        if missing:
            raise SystemExit(f"{label}: missing {', '.join(missing)} (run benchmarks/run.py first)")
        several = [str(p) for p in seg.values() if len(model_paths([p])) != 1]
        if several:
            raise SystemExit(f"{several[0]}: a run of several seeds; seeds.py combines run.py outputs of one seed "
                             "each (run.py -s train.seeds=1 -s train.seed=S)")
        results[label] = {}
        for k in sizes:
            for combo in itertools.combinations(names, k):
                key = "+".join(combo)
                m = hybrid([seg[n] for n in combo], benches[0] / label / "patchcore.pt", out / label / key, images,
                           truth, a.reuse, log)
                results[label][key] = {x: m[x] for x in (*KEYS, "escape", "overkill", "miou") if x in m}
                log(f"{label} {key} + PatchCore: " + ", ".join(f"{x} {m[x]:.3f}" for x in KEYS))
        write_json(out / "seeds.json", {"bench": [str(b) for b in benches], "names": names, "results": results})
    lines = summary(results, names, sizes)
    atomic_write_bytes(out / "seeds.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
