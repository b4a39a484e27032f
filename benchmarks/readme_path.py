"""The README path against `ensemble calibrate`: a model file's own calibration (stored by `seg train` at the end
of training, used by `ensemble predict -m best.pt`) and a fresh `ensemble calibrate -m best.pt` of the same file,
scored on the same test crops.

    python benchmarks/readme_path.py [--from runs/bench_tex] [--model evidence_s0/best.pt] [--out runs/readme_path]

For every part folder of a `benchmarks/run.py` output (`--from`), it runs `ensemble calibrate` on the model file,
predicts the part's test crops with the calibrated ensemble, and compares the competition score with the file's
own calibration (the same model predicted with `-m`, rescored here from the benchmark's prediction folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fit_weights import subset_metrics  # noqa: E402
from benchmarks.run import DEV_SETS, parse_sets, run  # noqa: E402
from core.io import atomic_write_bytes, competition_dir, read_json_file  # noqa: E402
from core.modelfile import load_model_file  # noqa: E402

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=DEV_SETS)
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parent.parent.parent / "shared/data"))
    ap.add_argument("--from", dest="source", default="runs/bench_tex")
    ap.add_argument("--model", default="evidence_s0/best.pt", help="the model file, relative to each part folder")
    ap.add_argument("--pred", default="evidence", help="its `ensemble predict -m` folder under pred/")
    ap.add_argument("--out", default="runs/readme_path")
    a = ap.parse_args(argv)
    source, out = Path(a.source).resolve(), Path(a.out).resolve()
    rows = {}
    for label, data, part in parse_sets(a.sets, None, 1, a.data_root):
        images = competition_dir(data, part, "TC_Images")
        model = source / label / a.model
        spec = out / f"{label}.json"
        run(["ensemble", "calibrate", "-m", str(model), "-o", str(spec)], print)
        run(["ensemble", "predict", "-e", str(spec), "--images", str(images), "-o", str(out / label)], print)
        own = load_model_file(model).get("calibration", {}).get("params", {})
        rows[label] = {"readme": subset_metrics(source / label / "pred" / a.pred, images),
                       "calibrate": subset_metrics(out / label, images), "threshold_file": own.get("threshold"),
                       "threshold_calibrate": read_json_file(spec)["params"]["threshold"]}
        r = rows[label]
        print(f"{label}: README path {r['readme']['score']:.4f}, ensemble calibrate {r['calibrate']['score']:.4f}",
              flush=True)
    lines = [f"README path (`ensemble predict -m {a.model}`) against `ensemble calibrate -m` of the same file, "
             f"{datetime.date.today().isoformat()}", "",
             "| part | score, README path | score, ensemble calibrate | difference |", "|---|---|---|---|"]
    for label, r in rows.items():
        d = r["calibrate"]["score"] - r["readme"]["score"]
        lines.append(f"| {label} | {r['readme']['score']:.4f} | {r['calibrate']['score']:.4f} | {d:+.4f} |")
    md = "\n".join(lines) + "\n"
    atomic_write_bytes(out / "readme_path.json", json.dumps(rows, indent=1).encode())
    atomic_write_bytes(out / "readme_path.md", md.encode())
    print(md)
    return rows


if __name__ == "__main__":
    main()
