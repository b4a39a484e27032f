"""Command line of the toolkit: `python cli.py synth|seg|ensemble ...` (one Typer app)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synth.io import InputError, competition_dir  # noqa: E402

app = typer.Typer(help="Defect detection from OK images: synthesis, segmentation, ensembles.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
synth_app = typer.Typer(help="Synthetic defects from OK images.", no_args_is_help=True)
seg_app = typer.Typer(help="Train segmenters on synthetic defects.", no_args_is_help=True)
ensemble_app = typer.Typer(help="Predict, calibrate and evaluate (TTA, multi-model voting, submissions).",
                           no_args_is_help=True)
app.add_typer(synth_app, name="synth")
app.add_typer(seg_app, name="seg")
app.add_typer(ensemble_app, name="ensemble")

console = Console(stderr=True, soft_wrap=True)


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {msg}", highlight=False)


@contextmanager
def user_errors():
    """Turn bad input into one clear line and exit code 2, instead of a traceback."""
    try:
        yield
    except (InputError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished outputs are kept; rerun the same command to resume")
        raise typer.Exit(130)


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)


class Bar:
    """A rich progress bar with rate and ETA; `update(k)` advances it, `set(**fields)` shows live figures."""

    def __init__(self, description: str, total: int):
        self.progress = progress_bar()
        self.total = total
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


def load(config: Optional[Path], overrides: Optional[List[str]], part: Optional[int]) -> dict:
    from seg.config import config_for_part, load_config

    if config is None and part is not None:
        config = config_for_part(part)
    return load_config(config, overrides, part)


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (default: configs/partN.yaml).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config key, e.g. -s train.epochs=3 (repeatable).")
PartOpt = typer.Option(None, "--part", "-p", help="Competition part number (selects configs/partN.yaml).")
DataOpt = typer.Option(None, "--data", "-d", help="Dataset root in the competition layout (overrides data.root).")


def ok_dir(cfg: dict, data: Optional[Path]) -> Path:
    if cfg["data"]["ok_dir"] and data is None:
        return Path(cfg["data"]["ok_dir"])
    return competition_dir(data or cfg["data"]["root"], cfg["part"], "OK_Images")


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

    from synth.engine import SynthConfig
    from synth.generate import generate

    with user_errors():
        cfg = load(config, set_, part)
        sc = dict(cfg["synth"])
        if difficulty is not None:
            sc["difficulty"] = list(difficulty)
        if roi is not None:
            sc["roi"] = roi
        synth_cfg = SynthConfig.from_dict(sc)
        src = source or ok_dir(cfg, data)
        if overwrite and out.exists():
            shutil.rmtree(out)
        with Bar("synth", n) as bar:
            summary = generate(src, out, n, synth_cfg, seed=seed, workers=workers, warn=warn, progress=bar)
        console.print(f"wrote {summary['written']} samples to {out} ({summary['rate']:.0f}/s), "
                      f"{summary['skipped']} already there, {summary['bad_files']} unreadable or odd files skipped")


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
