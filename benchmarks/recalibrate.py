"""Calibrate the models of a finished benchmark again under changed settings, without training them again.

    python benchmarks/recalibrate.py --bench runs/bench_cl --out runs/logcal_s0 -s synth.sizes=log \\
        --methods evidence,patchcore,hybrid_evidence

For every part folder of --bench (each has a steps.json), copies its model files (each segmenter's best.pt, its
seeds' too; each baseline's .pt; never last.pt) and steps.json into --out, writes the overrides into each copy's
stored config, calibrates each copy again from its own held-out OK images (`ensemble.calibrate.calibrate_model_file`,
what `seg train` and `baseline fit` do at their end), then runs `benchmarks/run.py --reuse-any` on --out: ensembles
calibrated again, every method predicted and scored. The trained models are the same, so their maps are (pixel AP
and AUROC do not move, unless a TTA changes); only the operating points do: a change of calibration measured on the
same models. Without -s the copies keep the calibration they carry, and only the ensembles are calibrated again
(e.g. `--hybrid-tta d4,flip --methods hybrid_evidence`: the segmenter over d4, PatchCore over flip; d4 suits a
segmenter trained with `train.augment.vflip` and `rot90`, which show it those views).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import run as bench  # noqa: E402
from core.io import InputError  # noqa: E402
from core.modelfile import load_model_file, save_model_file  # noqa: E402
from ensemble.calibrate import calibrate_model_file  # noqa: E402
from seg.config import apply_overrides, load_config  # noqa: E402


def copy_models(src: Path, dst: Path) -> list[Path]:
    """The model files (and steps.json, seeds.json) of one part folder copied to `dst`; returns the copied models."""
    models = []
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if not f.is_file() or rel.parts[0] == "pred":
            continue
        if (f.suffix == ".pt" and f.name != "last.pt") or f.name in ("steps.json", "seeds.json"):
            out = dst / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out)
            if f.suffix == ".pt":
                models.append(out)
    return models


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", required=True, help="a finished `benchmarks/run.py` output folder")
    ap.add_argument("--out", required=True, help="where the copies, their calibration and the new scores go")
    ap.add_argument("--set", "-s", action="append", default=[], dest="overrides",
                    help="config override written into every copied model, e.g. -s calibrate.target_overkill=0.1")
    ap.add_argument("--methods", default=None, help="as benchmarks/run.py (default: the rows --bench has)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data"))
    ap.add_argument("--hybrid-tta", default="flip",
                    help="as benchmarks/run.py (single models: -s predict.tta=...)")
    a = ap.parse_args(argv)
    try:
        load_config(None, a.overrides)  # a misspelt key or a bad value: one line naming it, before any copy
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    src, out = Path(a.bench), Path(a.out)
    parts = sorted(p.parent for p in src.glob("*/steps.json"))
    if not parts:
        raise SystemExit(f"{src}: no part folders (with steps.json) of a benchmark run")
    if out.resolve() == src.resolve():
        raise SystemExit("--out: must not be --bench (its models would be recalibrated in place)")
    for part in parts:
        if half := bench.interrupted_steps(part):
            raise SystemExit(f"{part}: {', '.join(half)} left half done by an interrupted run: finish it first "
                             "(the same benchmarks/run.py command with --reuse)")
    methods = a.methods or ",".join(bench.methods_run(src) or bench.DEFAULT_METHODS)  # none trained here anew
    sets = []
    for part in parts:
        name, _, number = part.name.rpartition("-p")
        sets.append(f"{name}:{number}")
        for f in copy_models(part, out / part.name):
            if not a.overrides:  # nothing changed in the model files: they keep their calibration
                continue
            try:
                ckpt = load_model_file(f)
                apply_overrides(ckpt["config"], a.overrides)
                save_model_file(f, ckpt)
                print(f"{f}: calibrated again: {calibrate_model_file(f)['params']}", flush=True)
            except (InputError, ValueError) as e:  # e.g. a model whose OK images are not on this machine
                raise SystemExit(f"error: {e}" if str(f) in str(e) else f"error: {f}: {e}") from None
    return bench.main(["--reuse-any", "--out", str(out), "--methods", methods, "--sets", ",".join(sets),
                       "--data-root", a.data_root, "--hybrid-tta", a.hybrid_tta])


if __name__ == "__main__":
    main()
