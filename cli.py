"""Command line of the toolkit: `python cli.py synth|seg|ensemble ...` (one Typer app)."""

from __future__ import annotations

import copy
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core.io import InputError, competition_dir  # noqa: E402

app = typer.Typer(help="Defect detection from OK images: synthesis, segmentation, ensembles.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
synth_app = typer.Typer(help="Synthetic defects from OK images.", no_args_is_help=True)
seg_app = typer.Typer(help="Train segmenters on synthetic defects.", no_args_is_help=True)
ensemble_app = typer.Typer(help="Predict, calibrate and evaluate (TTA, multi-model voting, submissions).",
                           no_args_is_help=True)
baseline_app = typer.Typer(help="Unsupervised baselines: PaDiM, PatchCore, SSIM autoencoder.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")
app.add_typer(seg_app, name="seg")
app.add_typer(ensemble_app, name="ensemble")
app.add_typer(baseline_app, name="baseline")

console = Console(stderr=True, soft_wrap=True)


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {msg}", highlight=False)


@contextmanager
def user_errors(resume_hint: str = "rerun the same command to resume"):
    """Turn bad input into one clear line and exit code 2, instead of a traceback; Ctrl-C into one line that says
    how to go on (`resume_hint`)."""
    try:
        yield
    except (InputError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]: finished outputs are kept; {resume_hint}")
        raise typer.Exit(130)


RESUME_EPOCH = "rerun the same command with --resume to continue from the last finished epoch"


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)


class Bar:
    """A rich progress bar with rate and ETA; `bar(k, loss=...)` advances it by k and shows live figures."""

    def __init__(self, description: str, total: int):
        self.progress = progress_bar()
        self.task = self.progress.add_task(description, total=total, rate="")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, k: int = 1, **fields) -> None:
        t = self.progress.tasks[0]
        speed = t.speed
        rate = f"{speed:7.1f}/s" if speed else ""
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        self.progress.update(self.task, advance=k, rate=f"{rate} {extra}".strip())


def load(config: Optional[Path], overrides: Optional[List[str]], part: Optional[int],
         data: Optional[Path] = None) -> dict:
    """The resolved config; `--data ROOT` replaces data.root (and any data.ok_dir)."""
    from seg.config import config_for_part, load_config

    if config is None and part is not None:
        config = config_for_part(part)
    cfg = load_config(config, overrides, part)
    if data is not None:
        cfg["data"]["root"], cfg["data"]["ok_dir"] = str(data), None
    return cfg


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (default: configs/partN.yaml).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config key, e.g. -s train.epochs=3 (repeatable).")
PartOpt = typer.Option(None, "--part", "-p", help="Competition part number (selects configs/partN.yaml).")
HalfOpt = typer.Option("all", help="Which labelled defects of --real: all, or the fixed half 'fit' or 'score' (fit "
                       "weights on one, judge them on the other).")
DataOpt = typer.Option(None, "--data", "-d", help="Dataset root in the competition layout (overrides data.root).")


# ------------------------------------------------------------------------------------------------ synth
@synth_app.command("generate")
def synth_generate(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (images/, masks/, manifest.jsonl)."),
    n: int = typer.Option(1000, "--n", "-n", min=1, help="Number of samples."),
    source: Optional[Path] = typer.Option(None, "--source", help="Folder of OK images (instead of --data/--part)."),
    part: Optional[int] = PartOpt, data: Optional[Path] = DataOpt, config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    seed: int = typer.Option(0, help="Seed; same seed, same bytes (whatever --workers)."),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="Worker processes."),
    difficulty: Optional[tuple[float, float]] = typer.Option(None, help="Difficulty bounds, e.g. 0 0.5."),
    roi: Optional[str] = typer.Option(None, help="Region of interest: 'auto' or a mask image."),
    overwrite: bool = typer.Option(False, help="Delete the output folder first."),
):
    """Turn OK images into labelled defective images (rerun to resume an interrupted run)."""
    import shutil

    from seg.config import ok_images_dir
    from synth.engine import SynthConfig
    from synth.generate import generate

    with user_errors():
        cfg = load(config, set_, part, data)
        sc = dict(cfg["synth"])
        if difficulty is not None:
            sc["difficulty"] = list(difficulty)
        if roi is not None:
            sc["roi"] = roi
        synth_cfg = SynthConfig.from_dict(sc)
        src = source or ok_images_dir(cfg)
        if overwrite and out.exists():
            shutil.rmtree(out)
        with Bar("synth", n) as bar:
            summary = generate(src, out, n, synth_cfg, seed=seed, workers=workers, warn=warn, progress=bar,
                               holdout=cfg["data"]["holdout"], holdout_seed=cfg["data"]["holdout_seed"],
                               crop=cfg["data"]["ok_crop"])
        console.print(f"wrote {summary['written']} samples to {out} ({summary['rate']:.0f}/s), "
                      f"{summary['skipped']} already there, {summary['bad_files']} unreadable or odd files skipped; "
                      f"{summary['held_out']} OK images held out (data.holdout) for validation and calibration")


@synth_app.command("gap")
def synth_gap(
    folder: Path = typer.Argument(..., help="A folder written by `synth generate`."),
    real: Path = typer.Option(..., "--real", help="Real labelled crops: an images folder with masks beside it "
                              "(TC_Masks or masks), e.g. a development set's TC_Images."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (default: FOLDER)."),
    patch: int = typer.Option(48, min=16, help="Side of the defect-centred patches, px."),
    half: str = HalfOpt,
):
    """How far the synthetic defects are from real ones (KID on frozen Lite0 features of defect-centred patches),
    per family, with the real-vs-real floor; gap.md, gap.json and gap.png (real beside nearest synthetic)."""
    from seg.gap import gap_report, write_report

    with user_errors():
        with console.status("measuring the realism gap"):
            report = gap_report(folder, real, patch, half=half)
        md = write_report(report, out or folder)
        console.print(md.read_text(), highlight=False)
        console.print(f"lower is more realistic; report and picture in {md.parent}")


@synth_app.command("fit-weights")
def synth_fit_weights(
    folder: Path = typer.Argument(..., help="A `synth generate` folder with samples of every family, e.g. "
                                  "generated with -s 'synth.families={...: 1.0}' for all families, max_defects=1."),
    real: Path = typer.Option(..., "--real", help="A few real labelled crops: images with masks beside them."),
    keep: float = typer.Option(0.3, min=0.0, max=1.0, help="Share of the default family mix kept, so that no "
                               "family drops out (the real defects at hand are not all the kinds there are)."),
    half: str = HalfOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the report as JSON here."),
):
    """The synthetic family mix closest to real defects (minimum KID-kernel MMD over the family weights); prints
    the override to train with it: -s 'synth.families={...}'. Measured on five parts, training with the fitted mix
    lowered the score (it concentrates on the kinds the few real defects show); transplanting the same defects
    (-s synth.transplant=DIR) raised it. Use the weights to see which families look like your defects."""
    from core.io import write_json
    from seg.gap import families_override, fit_family_weights
    from synth.engine import SynthConfig

    with user_errors():
        with console.status("fitting family weights to the real defects"):
            r = fit_family_weights(folder, real, SynthConfig().families, keep=keep, half=half)
        if out:
            write_json(out, r)
        console.print(f"{r['real_patches']} real defect patches; estimated MMD^2 to them: default mix "
                      f"{r['mmd_default']:.4g}, fitted mix {r['mmd_fitted']:.4g}")
        typer.echo(f"-s '{families_override(r['weights'])}'")  # on stdout: the product, for scripts


@synth_app.command("preview")
def synth_preview(
    folder: Path = typer.Argument(..., help="A folder written by `synth generate`."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG path (default: FOLDER/preview.png)."),
    n: int = typer.Option(24, "--n", "-n", min=1), cols: int = typer.Option(4, min=1),
    defective_only: bool = typer.Option(False, help="Show defective samples only."),
):
    """One PNG grid of samples, each bare and with its mask outlined."""
    from synth.preview import preview

    with user_errors():
        output = output or folder / "preview.png"
        k = preview(folder, output, n=n, cols=cols, defective_only=defective_only)
        console.print(f"wrote {output} ({k} samples)")


# -------------------------------------------------------------------------------------------------- seg
@seg_app.command("train")
def seg_train(
    part: Optional[int] = PartOpt, config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
    data: Optional[Path] = DataOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (overrides train.out)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Overrides train.epochs."),
    val_dir: Optional[Path] = typer.Option(None, help="Real labelled folder (images + masks beside) for validation."),
    synth_dir: Optional[Path] = typer.Option(None, help="Train on a `synth generate` folder instead of on the fly."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last.pt."),
    calibrate: bool = typer.Option(True, help="Calibrate best.pt on held-out OK images at the end (and, with "
                                   "train.partner, fit that baseline and calibrate the two as one: ensemble.json)."),
    seeds: Optional[int] = typer.Option(None, min=1, help="Overrides train.seeds: train this many models, with "
                                        "seeds train.seed, +1, ..., each in <out>/seed<S>/ (one ensemble); on a CPU "
                                        "side by side (train.jobs)."),
):
    """Train a segmenter on synthetic defects (curriculum, checkpoints best/last, metrics.csv, curves.png), then
    calibrate best.pt's thresholds on the held-out OK images. With `train.partner` (PatchCore by default) it also
    fits that baseline and calibrates the two as one hybrid, the run folder's ensemble.json: the default method,
    which `ensemble predict -m RUN_FOLDER` uses."""
    import baseline  # noqa: F401  (registers padim, patchcore and ssim_ae: seg train fits every model)
    from baseline.fit import METHODS
    from core.io import write_json
    from core.modelfile import RUN_ENSEMBLE, SEEDS_FILE, run_seeds
    from seg.train import seed_plan, train

    with user_errors(RESUME_EPOCH):
        cfg = load(config, set_, part, data)
        for key, value in (("out", out), ("epochs", epochs), ("val_dir", val_dir), ("synth_dir", synth_dir),
                           ("seeds", seeds)):
            if value is not None:
                cfg["train"][key] = str(value) if isinstance(value, Path) else value
        base, first, seeds = Path(cfg["train"]["out"]), cfg["train"]["seed"], cfg["train"]["seeds"]
        found = run_seeds(base)  # the run already in --out, if it is one of several seeds
        planned = list(range(first, first + seeds))
        if resume and found is not None:  # the run in --out decides its seeds, not today's config
            order = found
        elif resume and (base / "last.pt").exists():
            order = [first]
        else:
            order = planned
        runs = [cfg]
        if len(order) > 1:  # one model a seed, each a run folder of its own; seeds.json lists them
            runs = [copy.deepcopy(cfg) for _ in order]
            for s, c in zip(order, runs):
                c["train"].update(seed=s, seeds=1, out=str(base / f"seed{s}"))
            if found != order:
                write_json(base / SEEDS_FILE, {"seeds": order})
        elif found is not None:  # a run of one model replaces the folder's run of several seeds
            (base / SEEDS_FILE).unlink(missing_ok=True)
        if resume and order != planned:
            console.print(f"resuming the run in {base}: " + (f"seeds {order}" if len(order) > 1 else "one model"),
                          highlight=False)
        # the folder's ensemble describes the files as they end: made again below (resumed: best.pt may still move)
        (base / RUN_ENSEMBLE).unlink(missing_ok=True)
        jobs, threads = seed_plan(cfg, len(runs))
        if jobs > 1:  # side by side, each seed in a process of its own (core.workers.run_each)
            _train_side_by_side(runs, resume, calibrate, jobs, threads)
        else:
            for c in runs:
                if len(runs) > 1:
                    console.print(f"seed {c['train']['seed']} -> {c['train']['out']}")
                summary = train(c, resume=resume, log=lambda m: console.print(m, highlight=False),
                                progress=Bar, warn=warn)
                console.print(_trained(c, summary))
                if calibrate and int(os.environ.get("RANK", "0")) == 0:  # under torchrun: rank 0 alone
                    calibrate_file(Path(summary["out"]) / "best.pt")
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 alone goes on
            return
        partner = cfg["train"]["partner"] if cfg["model"]["arch"] not in METHODS else "none"  # a baseline: none
        if partner == "none":
            pass
        elif not calibrate:
            warn(f"no {partner} partner: --no-calibrate (a hybrid is calibrated as one)")
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            warn(f"no {partner} partner: a baseline fits in one process; `seg train --resume -o {base}` without "
                 "torchrun adds it")
        elif _with_partner(cfg, base, partner, resume, len(runs)):
            return
        if len(runs) > 1:
            console.print(f"{len(runs)} models in {base}; as one hybrid with PatchCore: ensemble calibrate -m {base} "
                          "-m PATCHCORE.pt --tta flip -o hybrid.json")


def _with_partner(cfg: dict, base: Path, partner: str, resume: bool, n_seeds: int) -> bool:
    """The default method from `seg train` alone: `partner` (a baseline) fitted on the same OK images and split as
    `baseline fit` would (`<base>/<partner>.pt`, calibrated), then the run's segmenter(s) and it calibrated as one
    ensemble from the held-out OK images, `<base>/ensemble.json`, which `-m <base>` then stands for. A resumed run
    keeps a calibrated partner file already there (and resumes an interrupted fit of one). A failure only warns:
    the segmenter stays, as without a partner. Returns whether the ensemble was made."""
    from baseline.fit import fit_baseline
    from core.modelfile import RUN_ENSEMBLE, load_model_file
    from core.progress import progress_to
    from ensemble.calibrate import calibrate_ensemble_file

    pfile = base / f"{partner}.pt"
    try:
        kept = resume and pfile.is_file()
        if not kept:
            fit_cfg = copy.deepcopy(cfg)
            fit_cfg["train"]["val_dir"] = None  # fitted as `baseline fit` fits it
            s = fit_baseline(fit_cfg, partner, pfile, progress=Bar, warn=warn, resume=resume,
                             log=lambda m: console.print(m, highlight=False))
            console.print(f"partner {partner}: fitted in {s['fit_seconds']:.1f}s -> {pfile}", highlight=False)
        if not kept or load_model_file(pfile).get("calibration") is None:
            calibrate_file(pfile)
        ens, p = build_ensemble([base, pfile], None, None, None, None, None, {}, cfg["train"]["device"],
                                calibrating=True)
        with progress_to(Bar):
            report = calibrate_ensemble_file(ens, ens.member_configs[0], p, base / RUN_ENSEMBLE, warn=warn)
    except Exception as e:  # noqa: BLE001 (the segmenter trained fine: a failure of its partner only warns)
        alone = f"-m {base}" if n_seeds == 1 else f"ensemble calibrate -m {base} -o ensemble.json"
        warn(f"{base}: no hybrid with {partner} ({type(e).__name__}: {str(e)[:200]}); the segmenter alone: {alone}")
        return False
    console.print(f"the segmenter and {partner} calibrated as one (tta {ens.tta_mode}): {report['params']} -> "
                  f"{base / RUN_ENSEMBLE}; predict with it: ensemble predict -m {base} ...", highlight=False)
    return True


def _trained(c: dict, summary: dict) -> str:
    return (f"best {c['train']['metric']} {summary['best']:.4f} at epoch {summary['best_epoch']}; "
            f"{summary['epochs']} epochs in {summary['seconds']:.0f}s; checkpoints in {summary['out']}")


def _done_epochs(out: Path) -> int:
    """Epochs a run folder has finished (rows of its metrics.csv), for a resumed run's progress bar."""
    try:
        return max(0, len((out / "metrics.csv").read_text().splitlines()) - 1)
    except OSError:
        return 0


def _train_seed(c: dict, resume: bool, calibrate: bool) -> list[tuple[str, str]]:
    """One seed of `seg train --seeds N` in a process of its own: its log goes to <out>/train.log, its progress to
    the parent's bar; returns what the parent prints, as (kind, text), kind "info" or "warn"."""
    import baseline  # noqa: F401  (registers the baselines, in this process too)
    from core.workers import ReportBar
    from seg.train import train

    out = Path(c["train"]["out"])
    out.mkdir(parents=True, exist_ok=True)
    notes: list[tuple[str, str]] = []
    with open(out / "train.log", "a", encoding="utf-8") as f:
        def log(m: str) -> None:
            print(m, file=f, flush=True)

        def note(kind: str, m: str) -> None:
            log(m if kind == "info" else f"warning: {m}")
            notes.append((kind, m))

        summary = train(c, resume=resume, log=log, progress=ReportBar, warn=lambda m: note("warn", m))
        note("info", _trained(c, summary))
        if calibrate:
            calibrate_file(out / "best.pt", note, bars=False)  # a child process: the parent's bar counts steps
    return notes


SEED_STALL_SECONDS = 1800


def _train_side_by_side(runs: list[dict], resume: bool, calibrate: bool, jobs: int, threads: int) -> None:
    """`seg train --seeds N` on a CPU: `jobs` seeds at a time, `threads` threads each (seg.train.seed_plan)."""
    from core.workers import run_each

    t = runs[0]["train"]
    left = [max(0, t["epochs"] - (_done_epochs(Path(c["train"]["out"])) if resume else 0)) for c in runs]
    total = sum(left) * t["steps_per_epoch"]
    console.print(f"{len(runs)} seeds, {jobs} at a time with {threads} CPU thread{'s' * (threads > 1)} each "
                  f"(train.jobs); each seed's log in {Path(t['out']).parent}/seed<S>/train.log", highlight=False)
    with Bar(f"train {len(runs)} seeds", total) as bar:
        def finished(i: int, notes: list) -> None:  # as each seed ends: a later failure loses none of it
            for kind, text in notes:
                _say(kind, f"seed {runs[i]['train']['seed']}: {text}")

        # validation, the normal model's fit and calibration report no steps: a stall is only declared after
        # SEED_STALL_SECONDS without one
        run_each(_train_seed, [(c, resume, calibrate) for c in runs], jobs, threads, progress=bar,
                 describe=lambda call: f"seed {call[0]['train']['seed']} ({call[0]['train']['out']})",
                 stall_seconds=SEED_STALL_SECONDS, done=finished)


def _say(kind: str, text: str) -> None:
    """A line for the console: a warning (kind "warn") or plain information."""
    if kind == "warn":
        warn(text)
    else:
        console.print(text, highlight=False)


def calibrate_file(path: Path, say=_say, bars: bool = True) -> None:
    """Calibrate a freshly written model file from its own config's held-out OK images (a failure only warns:
    the model stays, `ensemble calibrate` can do it later). `say(kind, text)`: where the lines go (kind "info"
    or "warn"; by default this console); `bars`: its progress on this console's bars."""
    from core.progress import progress_to
    from ensemble.calibrate import calibrate_model_file, sheet_path

    try:
        with progress_to(Bar if bars else None):
            r = calibrate_model_file(path, warn=lambda m: say("warn", m))
    except (InputError, ValueError) as e:
        say("warn", f"{path}: not calibrated ({e}); run `ensemble calibrate` on it")
        return
    p, rep = r["params"], r["report"]
    say("info", f"calibrated on {r['normal_crops']} held-out normal crops + synthetic defects: pixel threshold "
                f"{p['threshold']:.3g}, image threshold {p['image_threshold']:.3g}, min_area {p['min_area']} "
                f"(target overkill {r['target_overkill']:.0%}, synthetic escape {rep['synthetic_escape']:.2f}) "
                f"-> stored in {path} (what set it: {sheet_path(path)})")


@seg_app.command("convert")
def seg_convert(
    model: Path = typer.Argument(..., help="A model file of an older version, from a source you trust."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write it (default: in place)."),
):
    """Rewrite an older model file in today's safe format (tensors and plain data only). Unpickles the file
    once: only for files you trust."""
    from core.modelfile import convert_trusted

    with user_errors():
        console.print(f"wrote {convert_trusted(model, out)}")


# --------------------------------------------------------------------------------------------- ensemble
CkptOpt = typer.Option(None, "--checkpoint", "-m", help="A model file, or a `seg train` run folder: its best.pt, or "
                       "every seed's; given alone to predict, probe or export, its ensemble.json (the segmenter "
                       "with its partner) when it has one. Repeatable: an ensemble.")
EnsOpt = typer.Option(None, "--ensemble", "-e", help="ensemble.json written by `ensemble calibrate` (or by `seg "
                       "train` in its run folder).")


def build_ensemble(checkpoint, ensemble_file, tta, merge, vote_k, weights, overrides: dict, device="auto",
                   calibrating: bool = False):
    """`ensemble.models.build_ensemble` with the CLI's warnings."""
    from ensemble.models import build_ensemble as build

    return build(checkpoint, ensemble_file, tta, merge, vote_k, weights, overrides, device, calibrating, warn=warn)


def onnx_ensemble(checkpoint, ensemble_file, tta, merge, vote_k, weights, overrides: dict):
    """An exported ONNX file as the ensemble: its metadata holds the thresholds; TTA and models are fixed inside."""
    from ensemble.export import OnnxEnsemble

    if ensemble_file or not checkpoint or len(checkpoint) != 1 or Path(checkpoint[0]).is_dir():
        raise InputError("--backend onnx: give the one exported file with -m FILE.onnx (`seg export` writes it)")
    fixed = {"--tta": tta, "--merge": merge, "--vote-k": vote_k, "--weight": weights}
    given = [k for k, v in fixed.items() if v]
    if given:
        raise InputError(f"--backend onnx: {', '.join(given)} are fixed in the exported file; export again instead")
    if overrides.get("window"):
        raise InputError("--window: not with --backend onnx (the exported graph takes crops of its tile size)")
    ens = OnnxEnsemble(checkpoint[0])
    p = ens.params()
    p.update({k: v for k, v in overrides.items() if v is not None and k != "window"})
    return ens, p


def test_dir(images: Optional[Path], part: Optional[int], data: Optional[Path]) -> Path:
    if images is not None:
        return images
    if data is None:
        raise InputError("no test images: give --images DIR, or --data ROOT with --part N")
    return competition_dir(data, part, "TC_Images")


ImagesOpt = typer.Option(None, "--images", "-i", help="Folder of test images (or --data ROOT --part N).")
TtaOpt = typer.Option(None, "--tta", help="none | flip | d4, or one per model in order (d4,flip)")
MergeOpt = typer.Option(None, "--merge", help="mean (probabilities) | vote (k-of-n binarised masks)")
VoteOpt = typer.Option(None, "--vote-k", help="Votes needed with --merge vote (default: majority).")
WeightsOpt = typer.Option(None, "--weight", help="Per-model weight, in checkpoint order (repeatable).")


@seg_app.command("export")
def seg_export(
    out: Path = typer.Option(..., "--out", "-o", help="The ONNX file to write."),
    checkpoint: Optional[List[Path]] = CkptOpt, ensemble_file: Optional[Path] = EnsOpt,
    tta: Optional[str] = TtaOpt,
):
    """Export a model file (segmenter or baseline) or a calibrated ensemble, with its TTA and normalisers, to
    ONNX; the thresholds go into its metadata. `ensemble predict --backend onnx -m FILE.onnx` runs it."""
    from ensemble.export import export_onnx

    with user_errors():
        ens, p = build_ensemble(checkpoint, ensemble_file, tta, None, None, None, {}, "cpu")
        with console.status(f"exporting {len(ens.models)} model(s) x tta {ens.tta_mode} to ONNX"):
            meta = export_onnx(ens, p, out)
        console.print(f"wrote {out}: {meta['models']} model(s), tta {meta['tta']}, merge {meta['merge']}, "
                      f"{meta['tile']} px crops, thresholds {meta['params']}")


@ensemble_app.command("predict")
def ensemble_predict(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (replaced atomically)."),
    checkpoint: Optional[List[Path]] = CkptOpt, ensemble_file: Optional[Path] = EnsOpt,
    images: Optional[Path] = ImagesOpt, part: Optional[int] = PartOpt, data: Optional[Path] = DataOpt,
    tta: Optional[str] = TtaOpt, merge: Optional[str] = MergeOpt, vote_k: Optional[int] = VoteOpt,
    weight: Optional[List[float]] = WeightsOpt,
    threshold: Optional[float] = typer.Option(None, help="Pixel threshold, on the map's scale (calibrated units)."),
    image_threshold: Optional[float] = typer.Option(None, help="Image-level threshold."),
    min_area: Optional[int] = typer.Option(None, help="Drop components under this many pixels."),
    opening: Optional[int] = typer.Option(None, help="Morphological opening kernel (px), 0 = off."),
    peak_frac: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="A flagged mask's components cut to "
                                              "the pixels this share of the way from the pixel threshold to their "
                                              "peak; 0 = off (default: the model's, predict.peak_frac, 0.5)."),
    median_base: Optional[bool] = typer.Option(None, "--median-base/--no-median-base", help="Measure that height "
                                               "from the image's median map value where it lies above the pixel "
                                               "threshold (default: the model's, predict.median_base, on)."),
    grabcut: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Redraw a flagged mask's outline on the "
                                            "image by a graph cut, each component's pixels this share of the way "
                                            "to its peak sure defect; 0 = off (default: the model's, "
                                            "predict.grabcut, 0.75)."),
    roi: Optional[str] = typer.Option(None, help="Region of interest: a mask image applied to every image, or "
                                      "'auto' (each image's bright part). Default: predict.roi of the config."),
    zip_prefix: Optional[str] = typer.Option(None, help="Folder inside submission.zip (default data/<images>)."),
    overlays: str = typer.Option("defective", help="Overlay PNGs for: all | defective (judged so) | none."),
    window: Optional[int] = typer.Option(None, min=0, help="Large images: predicted whole in windows of up to this "
                                         "many px when every model is fully convolutional; 0 = tiles of the crop "
                                         "size (default: predict.window, 0; e.g. 1024)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    backend: str = typer.Option("torch", help="torch | onnx (-m FILE.onnx written by `seg export`, run by "
                                "onnxruntime: CUDA when its provider is installed, else CPU; --device is for torch)."),
):
    """Masks, overlays, per-image scores and the competition's submission files (JSONs + zip)."""
    from ensemble.predict import run_predict
    from core.io import find_images

    with user_errors():
        overrides = {"threshold": threshold, "image_threshold": image_threshold, "min_area": min_area,
                     "opening": opening, "window": window, "peak_frac": peak_frac, "median_base": median_base,
                     "grabcut": grabcut}
        if backend == "onnx":
            ens, p = onnx_ensemble(checkpoint, ensemble_file, tta, merge, vote_k, weight, overrides)
        elif backend == "torch":
            ens, p = build_ensemble(checkpoint, ensemble_file, tta, merge, vote_k, weight, overrides, device)
        else:
            raise InputError(f"--backend: expected torch or onnx, got {backend!r}")
        src = test_dir(images, part, data)
        n = len(find_images(src))
        with Bar("predict", n) as bar:
            s = run_predict(ens, src, out, p, roi=roi or p.get("roi"), zip_prefix=zip_prefix, overlays=overlays,
                            progress=bar, warn=warn)
        console.print(f"{s['images']} images, {s['defective']} judged defective; {s['images_per_s']:.1f} images/s "
                      f"({len(ens.models)} model(s) x tta {ens.tta_mode}); outputs in {out}")


@ensemble_app.command("calibrate")
def ensemble_calibrate(
    out: Path = typer.Option(Path("ensemble.json"), "--out", "-o", help="Where to save the calibrated ensemble."),
    checkpoint: Optional[List[Path]] = CkptOpt, ensemble_file: Optional[Path] = EnsOpt,
    tta: Optional[str] = TtaOpt, merge: Optional[str] = MergeOpt, vote_k: Optional[int] = VoteOpt,
    weight: Optional[List[float]] = WeightsOpt,
    val_dir: Optional[Path] = typer.Option(None, "--val-dir", help="Labelled real crops (masks or labels beside): "
                                           "when given, the score on them chooses the thresholds."),
    target_overkill: Optional[float] = typer.Option(None, help="Allowed false-alarm rate on held-out normal crops "
                                                    "(default: calibrate.target_overkill of the first model)."),
    shape: Optional[bool] = typer.Option(None, "--shape/--no-shape", help="Trim each flagged mask to where every "
                                         "model agrees, each at its own calibrated threshold (default: "
                                         "calibrate.shape of the first model, on)."),
    peak_frac: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Cut each flagged mask's components "
                                              "at this share of their height above the pixel threshold, 0 = off "
                                              "(default: predict.peak_frac of the first model, 0.5)."),
    median_base: Optional[bool] = typer.Option(None, "--median-base/--no-median-base", help="Measure that height "
                                               "from the image's median map value where it lies above the pixel "
                                               "threshold (default: predict.median_base of the first model, on)."),
    grabcut: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Redraw each flagged mask's outline on "
                                            "the image by a graph cut from this share of each component's height, "
                                            "0 = off (default: predict.grabcut of the first model, 0.75)."),
    spend_budget: Optional[bool] = typer.Option(None, "--spend-budget/--no-spend-budget", help="Search only "
                                                "operating points where the image threshold at the false-alarm "
                                                "budget decides (default: calibrate.spend_budget of the first "
                                                "model; on for files made since it exists)."),
    data: Optional[Path] = DataOpt,
    device: str = typer.Option("auto"),
):
    """Choose the operating point from OK images: map scales and the image threshold from held-out normal crops,
    pixel threshold and min_area from synthetic defects on them (or everything from labelled real crops). The crops
    that set it are drawn in <out>_calibration.png. An ensemble of calibrated model files decides with the merged
    map and outlines where its models agree (--no-shape: the merged map's own outline)."""
    from core.progress import progress_to
    from ensemble.calibrate import calibrate_ensemble_file
    from ensemble.evaluate import has_ground_truth, load_ground_truth
    from core.io import read_image

    with user_errors():
        ens, p = build_ensemble(checkpoint, ensemble_file, tta, merge, vote_k, weight,
                                {"peak_frac": peak_frac, "median_base": median_base, "grabcut": grabcut}, device,
                                calibrating=True)
        cfg = copy.deepcopy(ens.member_configs[0])  # the first model's, as it was made (set below, not in place)
        if data is not None:
            cfg["data"]["root"], cfg["data"]["ok_dir"] = str(data), None
        if shape is not None:
            cfg["calibrate"]["shape"] = shape
        if spend_budget is not None:
            cfg["calibrate"]["spend_budget"] = spend_budget
        labelled = None
        if val_dir is not None:
            if not has_ground_truth(val_dir):
                raise InputError(f"{val_dir}: no masks or labels beside it; normal images are taken from the "
                                 "held-out OK images, give --val-dir only for labelled crops")
            paths, _, gt = load_ground_truth(val_dir)
            labelled = ([read_image(x, ens.channels) for x in paths], gt)
        with progress_to(Bar):
            report = calibrate_ensemble_file(ens, cfg, p, out, target_overkill, labelled, warn=warn)
        console.print(f"calibrated ({report['mode']}): {report['params']} -> {out}"
                      + (f" (what set it: {report['sheet']})" if report["sheet"] else ""), highlight=False)


@ensemble_app.command("probe")
def ensemble_probe(
    out: Path = typer.Option(Path("probe"), "--out", "-o", help="Folder for probe.md, probe.json and probe.png."),
    checkpoint: Optional[List[Path]] = CkptOpt, ensemble_file: Optional[Path] = EnsOpt,
    tta: Optional[str] = TtaOpt,
    n: int = typer.Option(64, min=8, help="Held-out OK crops; every probe cell uses the same ones."),
    polarity: str = typer.Option("dark", help="dark or bright probes."),
    contrasts: str = typer.Option("10,20,40", help="Probe contrasts in grey levels, comma-separated."),
    seed: int = typer.Option(0, help="Which crops and which probe places."),
    data: Optional[Path] = DataOpt,
    device: str = typer.Option("auto"),
):
    """What a calibrated model catches, from OK images alone: plain spots and lines (along the texture and across
    it) of several sizes and contrasts drawn on held-out OK crops, each judged as `ensemble predict` would. The
    share caught per cell, against the false alarms on the same crops bare, in probe.md and probe.png."""
    from ensemble.calibrate import calibration_pools
    from ensemble.models import run_default
    from ensemble.probe import SIZES, cells, run_probe, write_report
    from synth.streams import PROBE

    with user_errors():
        try:
            levels = [float(c) for c in contrasts.split(",") if c.strip()]
        except ValueError:
            raise InputError(f"--contrasts: expected numbers separated by commas, got {contrasts!r}") from None
        if not levels or not all(0 < c <= 255 for c in levels):
            raise InputError(f"--contrasts: expected grey levels in (0, 255], got {contrasts!r}")
        if polarity not in ("dark", "bright"):
            raise InputError(f"--polarity: expected dark or bright, got {polarity!r}")
        levels = sorted(set(levels))
        checkpoint, ensemble_file = run_default(checkpoint, ensemble_file)  # a run folder: its ensemble, if any
        ens, p = build_ensemble(checkpoint, ensemble_file, tta, None, None, None, {}, device)
        if ensemble_file is None and (len(ens.paths) > 1 or ens.member_calibrations[0] is None):
            what = f"{len(ens.paths)} models without an ensemble.json" if len(ens.paths) > 1 else \
                f"{ens.paths[0]} carries no calibration"
            raise InputError(f"{what}: the probe measures a calibrated operating point; run `ensemble calibrate` "
                             "and give its file with -e")
        cfg = copy.deepcopy(ens.member_configs[0])
        if data is not None:
            cfg["data"]["root"], cfg["data"]["ok_dir"] = str(data), None
        pool, held_out = calibration_pools(cfg, warn)
        crops = pool.random_crops(n, [PROBE, seed, 0])
        with Bar("probing", len(cells(SIZES, levels))) as bar:
            res = run_probe(ens, p, crops, seed, polarity, SIZES, levels, progress=bar)
        source = f"{pool.root} ({len(pool)} {'held-out' if held_out else 'training (none held out)'} images)"
        paths = write_report(res, out, source)
        console.print(f"false alarms on the bare crops: {100 * res['false_alarm']:.0f} %; caught per cell in "
                      f"{paths['markdown']}, {paths['picture']}", highlight=False)


@ensemble_app.command("evaluate")
def ensemble_evaluate(
    pred: Path = typer.Option(..., "--pred", help="Output of `ensemble predict`, or a folder of submission JSONs."),
    images: Optional[Path] = ImagesOpt, part: Optional[int] = PartOpt, data: Optional[Path] = DataOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (default: --pred)."),
    name: str = typer.Option("model", help="Row name in the markdown table."),
):
    """Competition score (escape, overkill, mIoU), pixel AUROC/AP, Dice/IoU, image AUROC; JSON, markdown, HTML."""
    from ensemble.evaluate import evaluate, markdown_table

    with user_errors():
        m = evaluate(pred, test_dir(images, part, data), out, name)
        console.print(markdown_table({name: m}), highlight=False)


# --------------------------------------------------------------------------------------------- baseline
@baseline_app.command("fit")
def baseline_fit(
    method: str = typer.Option(..., "--method", help="padim | patchcore | ssim_ae"),
    part: Optional[int] = PartOpt, config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
    data: Optional[Path] = DataOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Model file (default runs/baselines/METHOD.pt)."),
    resume: bool = typer.Option(False, help="Continue an interrupted fit of --out from its last finished epoch "
                                "(the autoencoder's; without it an interrupted fit starts afresh)."),
):
    """Fit a baseline on the part's OK images: `seg train` with the config's `baseline` settings; the model is one
    file, which `baseline predict` and `ensemble predict` load."""
    from baseline.fit import fit_baseline

    with user_errors(RESUME_EPOCH):
        cfg = load(config, set_, part, data)
        out = out or Path("runs/baselines") / f"{method}.pt"
        s = fit_baseline(cfg, method, out, progress=Bar, warn=warn, log=lambda m: console.print(m, highlight=False),
                         resume=resume)
        console.print(f"{method}: fitted in {s['fit_seconds']:.1f}s, peak memory {s['peak_rss_mb']:.0f} MiB -> {out}")
        calibrate_file(out)


@baseline_app.command("predict")
def baseline_predict(
    model: List[Path] = typer.Option(..., "--model", "-m", help="A `baseline fit` file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (replaced atomically)."),
    images: Optional[Path] = ImagesOpt, part: Optional[int] = PartOpt, data: Optional[Path] = DataOpt,
    ensemble_file: Optional[Path] = EnsOpt,
    threshold: Optional[float] = typer.Option(None), image_threshold: Optional[float] = typer.Option(None),
    min_area: Optional[int] = typer.Option(None), device: str = typer.Option("auto"),
):
    """Same outputs as `ensemble predict` (the same code path), from a baseline's anomaly maps."""
    ensemble_predict(out=out, checkpoint=model, ensemble_file=ensemble_file, images=images, part=part, data=data,
                     tta="none", merge=None, vote_k=None, weight=None, threshold=threshold,
                     image_threshold=image_threshold, min_area=min_area, opening=None, peak_frac=None,
                     median_base=None, grabcut=None, roi=None, zip_prefix=None, overlays="defective", window=None,
                     device=device, backend="torch")


# ------------------------------------------------------------------------------------------------ bench
@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context):
    """Every method side by side on a competition-layout dataset (see benchmarks/run.py --help)."""
    from benchmarks import run as bench_run

    with user_errors("rerun the same command with --reuse to go on from there (an interrupted training or fit "
                     "resumes)"):
        bench_run.main(ctx.args)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
