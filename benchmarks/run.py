"""Every method side by side on real defects, over several data sets and parts, in one command.

    python benchmarks/run.py [--sets magnetic-tile:1,aitex:1,aitex:2,aitex:3,aitex:4] [--quick] [--out runs/bench]
    python benchmarks/run.py --data /path/to/competition/layout --part 2       (one set, any dataset)
    python cli.py bench ...            (the same)

Per part: trains the default segmenter (configs/default.yaml, the same for every set), fits PaDiM, PatchCore and
the SSIM autoencoder, and builds the hybrids (UNet or evidence UNet + PatchCore, mean of their standardised maps;
SimpleNet or RealNet + PatchCore, the evidence UNet + PaDiM, or the three, or both segmenters + PatchCore, on
request: `--methods realnet,hybrid_realnet`, `--methods hybrid_evidence_padim,hybrid_evidence3`, `--methods
hybrid_both`; UNet 3+ and PatchCore on crops zoomed by 2, on request too: `--methods unet3plus`, `--methods
patchcore,patchcore_zoom`). Every model is
calibrated from the part's held-out OK images only (`ensemble.calibrate`: the test crops choose nothing); single
models use the calibration stored in their model file by `seg train` / `baseline fit` (the README path:
`ensemble predict -m FILE`), ensembles `ensemble calibrate`. Each method is predicted and evaluated on the part's
TC_Images; the oracle score (thresholds chosen on the test crops themselves, reporting only) gives the calibration
loss. Writes results.md (a table per part and a summary: mean and worst part per method), results.json,
pr_curves_<part>.png and masks_grid_<part>.png. Each step runs as its own process, so wall time and peak memory
(os.wait4) are per step; `--reuse` keeps every model already in --out that was made by the same command line
and resumes a training or fit that was interrupted under it (`--resume`; its time is then not reported), so an
interrupted benchmark goes on where it stopped (steps.json records each step's command; a changed config file,
code or data is not seen).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.metrics import precision_recall  # noqa: E402
from core.modelfile import model_paths  # noqa: E402
from ensemble.evaluate import COLUMNS, load_ground_truth, score_folder  # noqa: E402
from core.io import InputError, atomic_write_bytes, competition_dir, read_image, read_json_file, write_json  # noqa: E402
from ensemble.models import tta_modes  # noqa: E402

# the quick budget trains one seed; the full one trains what the config says (epochs None: the config's)
QUICK = {"epochs": 4, "seeds": 1, "steps": 15, "val_n": 48, "n_train": 100, "ae_steps": 60}
FULL = {"epochs": None, "seeds": None, "steps": 40, "val_n": 192, "n_train": 300, "ae_steps": 600}
DEV_SETS = "magnetic-tile:1,aitex:1,aitex:2,aitex:3,aitex:4"
ROWS = {"UNet": ("unet", ["unet"]), "UNet 3+": ("unet3plus", ["unet3plus"]),  # table row: (method, its models)
        "Evidence UNet": ("evidence", ["evidence"]),
        "SimpleNet": ("simplenet", ["simplenet"]), "RealNet": ("realnet", ["realnet"]),
        "PaDiM": ("padim", ["padim"]),
        "PatchCore": ("patchcore", ["patchcore"]), "PatchCore, zoom 2": ("patchcore_zoom", ["patchcore_zoom"]),
        "SSIM-AE": ("ssim_ae", ["ssim_ae"]),
        "Hybrid UNet + PatchCore": ("hybrid", ["unet", "patchcore"]),
        "Hybrid Evidence UNet + PatchCore": ("hybrid_evidence", ["evidence", "patchcore"]),
        "Hybrid SimpleNet + PatchCore": ("hybrid_simplenet", ["simplenet", "patchcore"]),
        "Hybrid RealNet + PatchCore": ("hybrid_realnet", ["realnet", "patchcore"]),
        "Hybrid Evidence UNet + PaDiM": ("hybrid_evidence_padim", ["evidence", "padim"]),
        "Hybrid Evidence UNet + PaDiM + PatchCore": ("hybrid_evidence3", ["evidence", "padim", "patchcore"]),
        "Hybrid Evidence UNet + UNet + PatchCore": ("hybrid_both", ["evidence", "unet", "patchcore"])}
METHODS = tuple(method for method, _ in ROWS.values())
# only with --methods: UNet 3+ (a training more), PatchCore with SimpleNet or RealNet, the evidence UNet with PaDiM
# (and PatchCore), both segmenters with PatchCore (two trainings) and PatchCore on crops zoomed by 2 (about 3 times
# the fit time and 6 times the predict time of PatchCore's row)
ON_REQUEST = ("unet3plus", "hybrid_simplenet", "hybrid_realnet", "hybrid_evidence_padim", "hybrid_evidence3",
              "hybrid_both", "patchcore_zoom")
DEFAULT_METHODS = tuple(m for m in METHODS if m not in ON_REQUEST)
# --quick: the default method (configs/default.yaml: evidence UNet + PatchCore), its two members alone, and so
# PatchCore, the training-free reference: the five development parts in under 20 minutes on 2 cores
QUICK_METHODS = ("evidence", "patchcore", "hybrid_evidence")
# the segmenters train without `seg train`'s partner: the bench fits the baselines and builds the hybrids itself. Left
# out of a step's recorded args, which stay those of the runs made before the key existed (they are the same runs)
NO_PARTNER = "train.partner=none"
SEGMENTERS = (("unet", "unet", "unet_s0"), ("unet3plus", "unet3plus", "unet3plus_s0"),
              ("evidence_unet", "evidence", "evidence_s0"),
              ("simplenet", "simplenet", "simplenet_s0"),
              ("realnet", "realnet", "realnet_s0"))  # (arch, method, folder): trained by `seg train`
# method: (`baseline fit --method`, its settings), fitted by `baseline fit`; zoom 2 with a quarter of the coreset
# ratio: a bank of the size of PatchCore's at zoom 1 (README, "PatchCore on crops zoomed by 2")
BASELINES = {"padim": ("padim", []), "patchcore": ("patchcore", []),
             "patchcore_zoom": ("patchcore", ["baseline.zoom=2", "baseline.coreset_ratio=0.0125"]),
             "ssim_ae": ("ssim_ae", [])}
CONFIG = str(ROOT / "configs" / "default.yaml")


def run(cmd: list[str], log) -> dict:
    """Run one step as a child process: wall seconds and its own peak RSS (MiB); fail loudly with its output. The log
    gets the time it starts and how long it took (what a person watching a long benchmark wants to see)."""
    log(f"{time.strftime('%H:%M:%S')} $ {' '.join(cmd)}")
    start = time.perf_counter()
    p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"step failed ({p.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    r = {"seconds": time.perf_counter() - start, "peak_mb": usage.ru_maxrss / 1024, "output": out}
    log(f"{time.strftime('%H:%M:%S')}   {cmd[0]} {cmd[1]}: {r['seconds']:.0f} s, peak {r['peak_mb']:.0f} MiB")
    return r


def pr_plot(path: Path, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, (pix, img) in curves.items():
        ax[0].plot(pix[1], pix[0], label=name, lw=1.2)
        ax[1].plot(img[1], img[0], label=name, lw=1.2)
    for a, title in zip(ax, ("pixel level", "image level")):
        a.set_xlabel("recall")
        a.set_ylabel("precision")
        a.set_title(f"precision-recall, {title}")
        a.set_xlim(0, 1)
        a.set_ylim(0, 1.02)
        a.grid(alpha=0.3)
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def masks_grid(path: Path, image_paths, stems, gt, preds: dict, n: int = 8) -> None:
    """Rows: the same test crops (defective first, then normal); columns: ground truth, then each method."""
    from synth.preview import caption, grid, outline

    defective = [i for i, g in enumerate(gt) if g.any()]
    normal = [i for i, g in enumerate(gt) if not g.any()]
    pick = defective[:: max(1, len(defective) // (n - 2))][: n - 2] + normal[:2]
    tiles = []
    for i in pick:
        img = read_image(image_paths[i], 3)
        tiles.append(caption(outline(img, gt[i], (0, 200, 0)), "ground truth"))
        for name, masks in preds.items():
            tiles.append(caption(outline(img, masks[i]), name[:20]))
    from core.io import write_png

    write_png(path, grid(tiles, 1 + len(preds)))


def parse_sets(sets: str | None, data: str | None, part: int, data_root: str) -> list[tuple[str, str, int]]:
    """[(label, dataset root, part)]: `name:part` entries resolved under `data_root`, or one `--data` set."""
    if sets is None:
        if data is None:
            sets = DEV_SETS
        else:
            return [(f"{Path(data).name}-p{part}", data, part)]
    out = []
    for item in sets.split(","):
        name, _, p = item.strip().rpartition(":")
        if not name or not p.isdigit():
            raise SystemExit(f"--sets: expected name:part entries, e.g. aitex:2, got {item!r}")
        root = name if os.path.sep in name else str(Path(data_root) / name)
        out.append((f"{Path(name).name}-p{p}", root, int(p)))
    return out


def interrupted_steps(part: Path) -> list[str]:
    """The steps of a part folder that a run left half done (recorded as started in its steps.json, never ended)."""
    f = Path(part) / "steps.json"
    return [k for k, v in read_json_file(f).items() if v.get("started")] if f.is_file() else []


def methods_run(bench_out: Path) -> tuple[str, ...] | None:
    """The methods a finished benchmark output holds rows of (its results.json), in ROWS order; None: no record."""
    f = Path(bench_out) / "results.json"
    if not f.is_file():
        return None
    names = {n for rows in read_json_file(f)["results"].values() for n in rows}
    return tuple(method for name, (method, _) in ROWS.items() if name in names)


def run_set(label: str, data: str, part: int, out: Path, b: dict, methods: tuple, reuse: bool | str, log,
            hybrid_tta: str = "flip", overrides: tuple[str, ...] = ()) -> dict:
    """Train/fit, calibrate, predict and evaluate every method on one part; returns {method: metrics}. `reuse`:
    keep the models made by the same command (True), or every model there, however made ("any").
    `overrides` (key=value) go to every model: each segmenter's training and each baseline's fit, e.g.
    synth.families={...} or data.holdout=0.3 (a hybrid's models then share one held-out split)."""
    out.mkdir(parents=True, exist_ok=True)
    test_images = competition_dir(data, part, "TC_Images")
    common = ["-c", CONFIG, "--part", str(part), "--data", data]
    steps_file = out / "steps.json"
    steps: dict[str, dict] = read_json_file(steps_file) if (reuse and steps_file.exists()) else {}

    def step(key: str, cmd: list[str], product: Path) -> None:
        """Run `cmd` (seg train or baseline fit), which makes `product`. With `reuse`, a product made by the same
        command is kept, and a step interrupted with the same command is resumed (--resume)."""
        # what the step was run with, the folder left out (a copied run folder is still reused)
        args = [x.replace(str(out), "<out>") for x in cmd]
        args = [x for i, x in enumerate(args) if x != NO_PARTNER and args[i + 1:i + 2] != [NO_PARTNER]]
        done = steps.get(key, {})
        if reuse and product.exists() and done and not done.get("started"):
            if reuse == "any" or done.get("args", args) == args:  # "any": recalibrate.py; no record: trusted
                log(f"reusing {product}")
                return
            log(f"not reusing {product}: made with other settings ({' '.join(done['args'])})")
        resume = bool(reuse and done.get("started") and done.get("args") == args)
        steps[key] = {"started": True, "args": args}  # until it ends: what a half-made product was made with
        write_json(steps_file, steps)
        r = None
        if resume:
            log(f"resuming the interrupted step {key}")
            try:
                r = run([*cmd, "--resume"], log)
            except SystemExit as e:  # e.g. the config or the code changed since: that run cannot go on
                log(f"{key} cannot resume, starting it afresh: {str(e).strip().splitlines()[-1][:300]}")
        resumed = r is not None
        if not resumed:
            # afresh: nothing of another run left for a later --resume to continue (a segmenter's last.pt)
            if product.is_dir():
                shutil.rmtree(product)
            else:
                product.unlink(missing_ok=True)
            r = run(cmd, log)
        steps[key] = {"seconds": r["seconds"], "peak_mb": r["peak_mb"], "args": args, "resumed": resumed}
        write_json(steps_file, steps)

    files = {}
    wanted = {m for method, parts in ROWS.values() if method in methods for m in parts}  # models the rows need
    sets = [x for o in overrides for x in ("-s", o)]  # last: they win over the budget's settings
    budget = [*(["--epochs", str(b["epochs"])] if b["epochs"] else []),
              *(["--seeds", str(b["seeds"])] if b["seeds"] else [])]
    for arch, method, folder in SEGMENTERS:
        if method in wanted:
            files[method] = out / folder  # the run folder: its best.pt, or every seed's (core.modelfile.model_paths)
            step(f"train_{method}", ["seg", "train", *common, "-o", str(out / folder), *budget,
                                     "-s", f"model.arch={arch}", "-s", f"train.steps_per_epoch={b['steps']}",
                                     "-s", "train.seed=0", "-s", f"train.val_n={b['val_n']}",
                                     "-s", NO_PARTNER,  # the bench fits and merges the baselines itself
                                     *sets], files[method])
    for method, (kind, settings) in BASELINES.items():
        if method in wanted:
            files[method] = out / f"{method}.pt"
            step(f"fit_{method}", ["baseline", "fit", "--method", kind, *common, "-o", str(files[method]),
                                   "-s", f"baseline.n_train={b['n_train']}",
                                   "-s", f"baseline.ae_steps={b['ae_steps']}",
                                   *(x for s in settings for x in ("-s", s)), *sets],
                 files[method])
    truth = load_ground_truth(test_images)
    image_paths, stems, gt = truth
    results, curves, grids = {}, {}, {}
    for name, (method, parts) in ROWS.items():
        if method not in methods:
            continue
        slug = method
        ck = [x for m in parts for x in ("-m", str(files[m]))]
        if len(model_paths([files[m] for m in parts])) > 1:  # an ensemble (a hybrid, or a segmenter's seeds):
            # calibrated as a whole (its own normalisers and operating point)
            tta = ["--tta", hybrid_tta] if len(parts) > 1 else []  # a segmenter's seeds: its config's TTA
            run(["ensemble", "calibrate", *ck, *tta, "-o", str(out / f"{slug}.json")], log)
            source = ["-e", str(out / f"{slug}.json")]
        else:  # a single model file: the operating point it stores (the README path)
            source = ck
        pred = run(["ensemble", "predict", *source, "--images", str(test_images), "-o", str(out / "pred" / slug)],
                   log)
        e = score_folder(out / "pred" / slug, test_images, truth=truth)
        m, masks, probs, scores = e.metrics, e.masks, e.maps, e.scores
        summary = read_json_file(out / "pred" / slug / "predict.json")
        keys = [f"train_{x}" if x in {m for _, m, _ in SEGMENTERS} else f"fit_{x}" for x in parts]
        fit = [steps[k] for k in keys if k in steps]
        timed = fit and not any(x.get("resumed") for x in fit)  # a resumed step timed only part of its work
        m.update(fit_seconds=sum(x["seconds"] for x in fit) if timed else float("nan"),
                 predict_images_per_s=summary["images_per_s"],
                 peak_mb=max([pred["peak_mb"]] + [x["peak_mb"] for x in fit]), params=summary["params"])
        results[name] = m
        flat_p = np.concatenate([p.ravel() for p in probs])
        flat_g = np.concatenate([g.ravel() > 0 for g in gt])
        curves[name] = (precision_recall(flat_p[::4], flat_g[::4]),
                        precision_recall(np.asarray(scores), np.array([g.any() for g in gt])))
        grids[name] = masks
        log(f"{label} {name}: score {m['score']:.3f} (oracle {_f(m.get('oracle_score'))}), "
            f"pixel AP {m['pixel_ap']:.3f}")
    pr_plot(out / "pr_curves.png", curves)
    masks_grid(out / "masks_grid.png", image_paths, stems, gt, grids)
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=None, help=f"name:part list under --data-root (default {DEV_SETS})")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data"))
    ap.add_argument("--data", default=None, help="one dataset in the competition layout (with --part)")
    ap.add_argument("--part", type=int, default=1)
    ap.add_argument("--methods", default=None, help=f"subset of {','.join(METHODS)} (default: "
                    f"{','.join(DEFAULT_METHODS)}; with --quick {','.join(QUICK_METHODS)})")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--quick", action="store_true", help="small training budget and the default method's rows "
                    "only (the five development parts in under 20 minutes on 2 cores)")
    ap.add_argument("--reuse", action="store_true", help="keep the models already in --out made by the same "
                    "command, resume the trainings and fits it interrupted; re-run the evaluation")
    ap.add_argument("--reuse-any", action="store_true", help="keep every model already in --out, whatever made it "
                    "(benchmarks/recalibrate.py, whose copies carry other settings than the command's)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="the segmenters' epochs (default: the config's; 4 with --quick)")
    ap.add_argument("--set", "-s", action="append", default=[], dest="overrides",
                    help="config override for every model (segmenters' training, baselines' fit), e.g. -s "
                         "data.holdout=0.3 (repeatable)")
    ap.add_argument("--lofo", action="store_true",
                    help="the leave-one-family-out check instead (benchmarks/lofo.py): lofo.md in --out")
    ap.add_argument("--hybrid-tta", default="flip",
                    help="TTA of the hybrid ensembles, one mode or one per model (d4,flip: the segmenter d4, "
                         "PatchCore flip; d4 only for a segmenter trained with train.augment.vflip and rot90, "
                         "whose views d4 shows); single model files use the TTA they store")
    a = ap.parse_args(argv)
    asked = a.methods is not None
    methods = tuple(m.strip() for m in a.methods.split(",")) if asked else \
        QUICK_METHODS if a.quick else DEFAULT_METHODS
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad[0]!r} (known: {', '.join(METHODS)})")
    for method, parts in ROWS.values():  # one mode, or one per model of each hybrid asked for (d4,flip)
        if method in methods and len(parts) > 1:
            try:
                tta_modes(a.hybrid_tta, len(parts))
            except InputError as e:
                raise SystemExit(f"--hybrid-tta for {method} ({len(parts)} models): {e}") from None
    b = dict(QUICK if a.quick else FULL)
    if a.epochs is not None:
        b["epochs"] = a.epochs
    out = Path(a.out).resolve()

    def log(m):
        print(m, flush=True)

    start = time.perf_counter()
    sets = parse_sets(a.sets, a.data, a.part, a.data_root)
    for _, data, part in sets:  # every set's folders before the first training: a typo fails now, not an hour in
        for kind in ("OK_Images", "TC_Images"):
            competition_dir(data, part, kind)

    def run_meta(done: dict) -> dict:
        machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}")
        return {"date": datetime.date.today().isoformat(), "machine": machine, "mode": "quick" if a.quick else "full",
                "epochs": b["epochs"], "seeds": b["seeds"],
                "hybrid_tta": a.hybrid_tta, "overrides": a.overrides,
                "sets": list(done), "minutes": (time.perf_counter() - start) / 60}

    if a.lofo:
        from benchmarks import lofo

        if a.overrides or asked:
            raise SystemExit("--lofo: trains its own variants of the UNet and the evidence UNet; "
                             "--set and --methods do not apply")

        results = lofo.run_lofo(sets, out, b, a.reuse, log, CONFIG)
        print(lofo.write_report(out, run_meta(results), results))
        return results
    per_set = {}
    for label, data, part in sets:
        reuse = "any" if a.reuse_any else a.reuse
        per_set[label] = run_set(label, data, part, out / label, b, methods, reuse, log, a.hybrid_tta,
                                 tuple(a.overrides))
    meta = run_meta(per_set)
    write_json(out / "results.json", {"meta": meta, "results": per_set})
    md = results_markdown(meta, per_set)
    atomic_write_bytes(out / "results.md", md.encode())
    print(md)
    return per_set


def _f(v, nd=3):
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{nd}f}"


def results_markdown(meta: dict, per_set: dict) -> str:
    cols = COLUMNS[:7] + [("oracle_score", "oracle score"), ("calibration_loss", "calib. loss")]
    mode = meta["mode"] + (f", {meta['epochs']} epochs" if meta.get("epochs") else "")
    lines = [f"Benchmark ({mode}), {meta['date']}, {meta['machine']}; {meta['minutes']:.0f} minutes. "
             "Thresholds calibrated on held-out OK images only; the oracle chooses them on the test crops "
             "(reporting only)." + (f" Config overrides: {' '.join(meta['overrides'])}."
                                    if meta.get("overrides") else ""), ""]
    for label, results in per_set.items():
        lines += [f"**{label}**", "", "| method | " + " | ".join(c for _, c in cols) +
                  " | train/fit s | predict img/s | peak MiB |", "|" + "---|" * (len(cols) + 4)]
        for name, m in results.items():
            lines.append(f"| {name} | " + " | ".join(_f(m.get(k)) for k, _ in cols) +
                         f" | {_f(m['fit_seconds'], 0)} | {_f(m['predict_images_per_s'], 1)} | "
                         f"{_f(m['peak_mb'], 0)} |")
        lines.append("")
    names = list(dict.fromkeys(n for r in per_set.values() for n in r))
    keys = [("score", "score"), ("pixel_ap", "pixel AP"), ("pixel_auroc", "pixel AUROC"),
            ("calibration_loss", "calib. loss")]
    lines += [f"**Summary over {len(per_set)} parts** (mean / worst part)", "",
              "| method | " + " | ".join(c for _, c in keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name in names:
        cells = []
        for k, _ in keys:
            v = np.array([r[name].get(k, np.nan) for r in per_set.values() if name in r], float)
            worst = v.max() if k == "calibration_loss" else v.min()
            cells.append(f"{_f(float(v.mean()))} / {_f(float(worst))}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
