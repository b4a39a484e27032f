"""Leave one family out: how much a segmenter learned "our synthetic look" rather than "not normal".

    python benchmarks/run.py --lofo [--quick] [--sets ...] [--out runs/lofo]      (or: python cli.py bench --lofo)

Per part and per segmenter (today's UNet and the evidence UNet), one model is trained with every synthetic family
and one with each group of families withheld (GROUPS), the same config, seed and budget otherwise. Every model is
scored, at the thresholds its own calibration chose (the README path), on:
- synthetic defects of the withheld group, drawn on the part's held-out OK images (never trained on), with a
  quarter normal crops: the drop in pixel AP against the model that saw the group is what the method owes to
  having seen that look;
- the part's real test crops (TC_Images): what withholding the group costs, or gains, on real defects.
A method that learned "not normal" finds a withheld group almost as well as a seen one. Writes lofo.md and
lofo.json in --out; every model and prediction stays in --out/<part>/<variant>/ (`--reuse` keeps them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import run as bench
from core.io import write_json, write_png, atomic_write_bytes
from ensemble.evaluate import score_folder
from seg.config import load_config, ok_pools
from synth.engine import DefectSynthesizer, SynthConfig
from synth.streams import BENCH, stream

# every family drawn by default, in four groups of a kind
GROUPS = {"blobs": ("bezier_blob", "gaussian", "perlin"), "strokes": ("bezier_stroke", "line"),
          "surface": ("stain", "blur", "sharpen"), "structural": ("cut_paste", "displacement", "edge")}
SEGMENTERS = (("UNet", "unet", "unet_s0"), ("Evidence UNet", "evidence", "evidence_s0"))  # (row, method, folder)
N_SYNTH = 64


def withheld(group: str) -> list[str]:
    """Config overrides that withhold a group (its families' weights set to 0)."""
    return [f"synth.families.{f}=0.0" for f in GROUPS[group]]


def synthetic_set(config: str, data: str, part: int, group: str, out: Path, n: int = N_SYNTH, seed: int = 0) -> Path:
    """n crops of the part's held-out OK images (the split `seg train` keeps out), a quarter normal, the rest with
    defects of `group` only; images/ and masks/ under `out`. Returns the images folder."""
    images = out / "images"
    if images.exists() and len(list(images.glob("*.png"))) == n:
        return images
    others = [f"synth.families.{f}=0.0" for g, fs in GROUPS.items() if g != group for f in fs]
    cfg = load_config(config, [f"data.root={data}", "synth.normal_ratio=0.25", *others], part=part)
    pool, held = ok_pools(cfg)
    if held is None:
        raise SystemExit(f"{data} part {part}: no held-out OK images (data.holdout) to draw the synthetic test set on")
    engine = DefectSynthesizer(SynthConfig.from_dict(cfg["synth"]))
    for k in range(n):
        image, mask, _ = engine.draw(stream(BENCH, seed, k), held)
        write_png(out / "masks" / f"{k:04d}.png", mask * 255)
        write_png(images / f"{k:04d}.png", image)
    return images


def score_on(run, model: Path, images: Path, pred: Path, log) -> dict:
    """Predict `images` with a model file's own calibration and score against the masks beside them."""
    run(["ensemble", "predict", "-m", str(model), "--images", str(images), "-o", str(pred)], log)
    return score_folder(pred, images, with_oracle=False).metrics


def run_lofo(sets, out: Path, b: dict, reuse: bool, log, config: str) -> dict:
    """{part: {segmenter: {variant: {"real": metrics, "synthetic": {group: metrics}}}}}; variant "all" or a group."""
    methods = tuple(m for _, m, _ in SEGMENTERS)
    b = {**b, "seeds": 1}  # one model per variant: what withholding a family does to it, not to an ensemble
    results: dict = {}
    for label, data, part in sets:
        base = out / label
        synth = {g: synthetic_set(config, data, part, g, base / f"synth_{g}") for g in GROUPS}
        per = results[label] = {name: {} for name, _, _ in SEGMENTERS}
        for variant in ("all", *GROUPS):
            real = bench.run_set(label, data, part, base / variant, b, methods, reuse, log,
                                 overrides=tuple(withheld(variant)) if variant != "all" else ())
            for name, method, folder in SEGMENTERS:
                model = base / variant / folder  # its best.pt, or every seed's (-m FOLDER)
                groups = GROUPS if variant == "all" else (variant,)
                per[name][variant] = {"real": real[name], "synthetic": {
                    g: score_on(bench.run, model, synth[g], base / variant / "pred_synth" / f"{method}_{g}", log)
                    for g in groups}}
                log(f"{label} {name} {'with every family' if variant == 'all' else 'without ' + variant}: " + ", ".join(
                    f"{g} AP {m['pixel_ap']:.3f}" for g, m in per[name][variant]["synthetic"].items()))
        write_json(out / "lofo.json", {"meta": {"partial": True}, "results": results})  # what is done so far
    return results


def lofo_markdown(meta: dict, results: dict) -> str:
    """One table: per segmenter and withheld group, the mean over parts of the withheld group's synthetic pixel AP
    (seen / withheld / drop) and of the real crops' score and pixel AP (all families / without the group)."""
    lines = [f"Leave one family out ({meta['mode']}), {meta['date']}, {meta['machine']}; {meta['minutes']:.0f} "
             f"minutes; mean over {len(results)} parts ({', '.join(results)}). Synthetic: {N_SYNTH} crops of the "
             "withheld group on held-out OK images (about a quarter of them normal); real: the parts' test crops. "
             "Thresholds: each model's own calibration. One seed per model.", "",
             "| segmenter | withheld | synth. AP seen | synth. AP withheld | drop | synth. score seen | "
             "synth. score withheld | real score all / without | real pixel AP all / without |",
             "|" + "---|" * 9]
    names = [n for n, _, _ in SEGMENTERS]
    for name in names:
        for g in GROUPS:
            def mean(variant, key, where):
                vals = [r[name][variant]["real"][key] if where == "real" else r[name][variant]["synthetic"][g][key]
                        for r in results.values()]
                return float(np.mean(vals))
            seen, held = mean("all", "pixel_ap", "synth"), mean(g, "pixel_ap", "synth")
            lines.append(f"| {name} | {g} | {seen:.3f} | {held:.3f} | {seen - held:+.3f} | "
                         f"{mean('all', 'score', 'synth'):.3f} | {mean(g, 'score', 'synth'):.3f} | "
                         f"{mean('all', 'score', 'real'):.3f} / {mean(g, 'score', 'real'):.3f} | "
                         f"{mean('all', 'pixel_ap', 'real'):.3f} / {mean(g, 'pixel_ap', 'real'):.3f} |")
    lines.append("")
    for name in names:
        synth = np.mean([r[name]["all"]["synthetic"][g]["pixel_ap"] - r[name][g]["synthetic"][g]["pixel_ap"]
                         for r in results.values() for g in GROUPS])
        real = {k: np.mean([r[name]["all"]["real"][k] - r[name][g]["real"][k] for r in results.values()
                            for g in GROUPS]) for k in ("score", "pixel_ap")}
        worst = max(r[name]["all"]["real"]["score"] - r[name][g]["real"]["score"] for r in results.values()
                    for g in GROUPS)
        lines.append(f"- {name}, mean drop when a group is withheld: synthetic pixel AP of that group "
                     f"{synth:+.3f}; real score {real['score']:+.3f} (worst part and group {worst:+.3f}), "
                     f"real pixel AP {real['pixel_ap']:+.3f}.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, meta: dict, results: dict) -> str:
    write_json(out / "lofo.json", {"meta": meta, "results": results})
    md = lofo_markdown(meta, results)
    atomic_write_bytes(out / "lofo.md", md.encode())
    return md
