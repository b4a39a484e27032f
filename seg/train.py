"""`seg train`: train a segmenter on synthetic defects (on-the-fly or a `synth generate` folder).

Every epoch draws new defects from the tagged stream `[TRAIN, seed, epoch, rank, i]` (synth.streams) under the
curriculum's difficulty ceiling; validation uses a fixed-seed synthetic set (and an optional real labelled folder).
Checkpoints `best.pt` and `last.pt` are written atomically and carry the resolved config, so a checkpoint alone is
enough to predict; `resume` restores model, optimiser, scheduler, scaler, RNG and history, and continues exactly.
With `train.ema` (a decay cap; 0 = off), a moving average of the weights (timm's ModelEmaV3, warm-up on) is what
validation scores and what `best.pt` holds; `last.pt` keeps the training weights beside it for `--resume`.
Runs under `torchrun` as DistributedDataParallel (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from core.device import place, resolve_device
from core.metrics import competition_score, dice_iou
from core.progress import progress_to
from core.modelfile import load_model_file, save_model_file
from core.workers import STALL_SECONDS, WorkerError, limit_threads
from core.workers import context as worker_context
from core.postprocess import OUTLINE_RULES, final_mask
from synth.dataset import SynthDataset, crops_tensor, to_tensors
from synth.engine import DefectSynthesizer, SourcePool, SynthConfig
from synth.streams import NORMAL, VALIDATION, stream
from core.io import InputError, atomic_write_bytes, write_json

from .config import dotted_keys, ok_pools
from .curriculum import CurriculumSchedule
from .data import LabelledFolder, SeededAugment, SynthFolderDataset, adopt_synth_folder, build_augment, \
    check_split
from .losses import SegmentationLoss
from .models import model_from_config

METRIC_MODE = {"score": max, "dice": max, "iou": max, "loss": min}


save_checkpoint = save_model_file


def _limit_worker_threads(_worker_id: int) -> None:
    limit_threads(1)


def _watched(loader: DataLoader, epoch: int):
    """The loader's batches; a DataLoader worker that died or stalled becomes one clear error."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            text = str(e)
            if "exited unexpectedly" in text or "killed by signal" in text or "timed out" in text:
                raise WorkerError(f"epoch {epoch}: a data worker died or stalled ({text.splitlines()[0]}); "
                                  "rerun with --resume to continue from the last finished epoch") from None
            raise
        yield batch
load_checkpoint = load_model_file
EMA_WARMUP_POWER = 0.75  # timm's advice for short trainings: the average spans about the last 100 of 500 steps


@torch.no_grad()
def predict_batches(model, images: torch.Tensor, device, batch_size: int = 32):
    """Mask logits (N,1,H,W) and image-level logits (N,) or None, model in eval mode."""
    model.eval()
    logits, heads = [], []
    for k in range(0, len(images), batch_size):
        out = model(images[k:k + batch_size].to(device))
        logits.append(out["mask"].float().cpu())
        if out["image"] is not None:
            heads.append(out["image"].float().view(-1).cpu())
    return torch.cat(logits), (torch.cat(heads) if heads else None)


def evaluate_set(model, images, masks, predict_cfg: dict, device, loss_fn=None) -> dict:
    """Val metrics: loss, pixel dice/iou, image accuracy and the competition score (after post-processing at the
    config's thresholds, on the logit scale)."""
    logits, heads = predict_batches(model, images, device, predict_cfg["batch_size"])
    # the outline rules (the cut towards each component's peak, its base, the graph cut on the image) are for real
    # defects' broad maps: synthetic ones, which this set holds, cannot judge them (README, "A flagged mask cut at
    # half its height"), so they play no part in choosing the model
    predict_cfg = {**predict_cfg, **OUTLINE_RULES}
    pred, gt = [], []
    for i in range(len(images)):
        head = None if heads is None else float(heads[i])
        pred.append(final_mask(logits[i, 0].numpy(), head, predict_cfg))
        gt.append(masks[i, 0].numpy().astype(np.uint8))
    dice, iou = dice_iou(pred, gt)
    acc = float(np.mean([p.any() == g.any() for p, g in zip(pred, gt)]))
    row = {"dice": dice, "iou": iou, "image_acc": acc, **competition_score(pred, gt)}
    if loss_fn is not None:
        row["loss"] = float(loss_fn.mask_term(logits, masks.float()))
    return row


def synthetic_val_set(engine: DefectSynthesizer, pool: SourcePool, n: int, seed: int):
    imgs, masks = [], []
    for i in range(n):
        image, mask, _ = engine.draw(stream(VALIDATION, seed, i), pool)
        a, b = to_tensors(image, mask)
        imgs.append(a)
        masks.append(b)
    return torch.stack(imgs), torch.stack(masks)


def synthetic_pairs(engine: DefectSynthesizer, pool: SourcePool, n: int, seed: int):
    """(defective crops, their clean originals, masks) of up to n synthetic defects, for a model that selects its
    features on them before training (`realnet`'s AFS); normal draws are skipped."""
    rows = [engine.draw_pair(stream(NORMAL, seed, 2, i), pool) for i in range(n)]
    rows = [(*to_tensors(a, m), to_tensors(c, m)[0]) for a, c, m, _ in rows if m.any()]
    if not rows:
        return None
    images, masks, cleans = (torch.stack(x) for x in zip(*rows))
    return images, cleans, masks


def write_metrics(out: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0].keys())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())
    plot_curves(out / "curves.png", rows)


def plot_curves(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(ep, [r["train_loss"] for r in rows], "o-", label="train loss")
    ax[0].plot(ep, [r["val_loss"] for r in rows], "o-", label="val loss (mask)")
    ax[0].set_title("loss")
    for k in ("val_score", "val_dice", "val_image_acc", "real_score", "real_dice"):
        if k in rows[0]:
            ax[1].plot(ep, [r[k] for r in rows], "o-", label=k)
    ax[1].set_title("validation")
    ax[2].plot(ep, [r["ceiling"] for r in rows], "o-", label="difficulty ceiling")
    ax[2].set_title("curriculum")
    for a in ax:
        a.set_xlabel("epoch")
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


class Trainer:
    """Holds everything one training run needs; `fit()` runs it."""

    def __init__(self, cfg: dict, log: Callable[[str], None] = print, progress=None, warn=None):
        self.cfg, self.log, self.progress = cfg, log, progress
        t = cfg["train"]
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = resolve_device(t["device"])
        if self.distributed:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(self.device)
        else:
            self.rank, self.world = 0, 1
        self.main = self.rank == 0
        self.out = Path(t["out"])
        expected_held = None
        if t["synth_dir"]:  # the folder's own sources, split and synthesis settings (validation, calibration)
            cfg, expected_held = adopt_synth_folder(cfg, t["synth_dir"], warn if self.main else None)
            self.cfg = cfg
        torch.manual_seed(t["seed"])
        self.synth_cfg = SynthConfig.from_dict(cfg["synth"])
        self.engine = DefectSynthesizer(self.synth_cfg)
        self.pool, self.held_out = ok_pools(cfg, warn=warn if self.main else None)
        if expected_held is not None:
            check_split(t["synth_dir"], self.held_out, expected_held)
        aug = SeededAugment(build_augment(t["augment"]))
        per_rank = t["steps_per_epoch"] * t["batch_size"]
        self.model = model_from_config(cfg["model"], cfg["synth"]["size"], t["seed"])
        if t["synth_dir"]:
            if self.model.wants_clean:
                raise InputError(f"model.arch: {cfg['model']['arch']} learns to restore each synthetic defect's "
                                 "clean original, which a train.synth_dir folder does not keep: train it on the fly "
                                 "(no train.synth_dir)")
            self.dataset = SynthFolderDataset(t["synth_dir"], self.synth_cfg.channels, aug.compose, t["seed"])
        else:
            self.dataset = SynthDataset(self.engine, self.pool, per_rank, t["seed"], aug, rank=self.rank,
                                        with_clean=self.model.wants_clean)
        self.curriculum = CurriculumSchedule(**t["curriculum"])
        if self.model.needs_normal:  # e.g. evidence_unet: its normal model is fitted on OK crops first
            n = cfg["model"]["normal_crops"]
            if self.main:
                log(f"{cfg['model']['arch']}: fitting its normal model on {n} OK crops of {cfg['synth']['size']} px")
            normal = crops_tensor(self.pool.random_crops(n, [NORMAL, t["seed"], 0]))
            other = self.held_out or self.pool
            held = crops_tensor(other.random_crops(max(16, n // 4), [NORMAL, t["seed"], 1]))
            pairs = synthetic_pairs(self.engine, self.pool, n, t["seed"]) if self.model.wants_pairs else None
            if self.model.wants_pairs and pairs is None and warn and self.main:
                warn(f"{self.pool.root}: no synthetic defect could be drawn for the model's feature selection; "
                     "it keeps its default features")
            # long work inside the fit (a coreset) gets a bar of its own; not on a parent's bar that counts
            # training steps only (core.workers.ReportBar)
            side = self.progress if self.main and getattr(self.progress, "shows_side_tasks", True) else None
            with progress_to(side):
                self.model.fit_normal(normal, held, pairs)
        self.model = place(self.model, self.device)
        # a model whose normal model is all its training (padim, patchcore) takes no gradient step: one epoch of
        # validation, then its files, as for any model
        self.learns = self.model.trainable
        self.epochs = t["epochs"] if self.learns else 1
        self.ema = None
        if t.get("ema") and self.learns:  # files older than the key: off
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=t["ema"], use_warmup=True, warmup_power=EMA_WARMUP_POWER)
        # a head whose loss weight is 0 gets no gradient: DDP must be told, or it waits for it forever
        unused = t["image_loss_weight"] == 0 or t["deep_loss_weight"] == 0
        self.net = (torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=unused)
                    if self.distributed and self.learns else self.model)
        self.loss_fn = SegmentationLoss(t["mask_loss"], t["image_loss_weight"], t["deep_loss_weight"],
                                        t.get("aux_loss_weight", 1.0))  # files older than the key
        params = [p for p in self.model.parameters() if p.requires_grad] or [torch.zeros(1, requires_grad=True)]
        self.opt = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
        total = self.epochs * t["steps_per_epoch"]
        if t["scheduler"] == "onecycle":
            self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, t["lr"], total_steps=total)
        else:
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total, eta_min=t["lr"] * 0.01)
        self.amp = bool(t["amp"]) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        # validation defects are drawn on the held-out OK images (never trained on), when there are any
        self.val = synthetic_val_set(self.engine, self.held_out or self.pool, t["val_n"], t["val_seed"])
        self.real = None
        if t["val_dir"]:
            ds = LabelledFolder(t["val_dir"], channels=self.synth_cfg.channels)
            items = [ds[i] for i in range(len(ds))]
            self.real = (torch.stack([x["image"] for x in items]), torch.stack([x["mask"] for x in items]))
        self.rows: list[dict] = []
        self.start_epoch, self.best, self.best_epoch, self.stale = 0, None, -1, 0

    # ------------------------------------------------------------------------------------------- state
    @property
    def scored(self) -> torch.nn.Module:
        """The weights that validation scores and prediction uses: the moving average when `train.ema` is on."""
        return self.ema.module if self.ema is not None else self.model

    def inference_state(self, epoch: int) -> dict:
        """What prediction needs (best.pt): weights, config, the run's history; no optimiser, scheduler or RNG
        state (those live in last.pt, which `--resume` uses)."""
        return {"model": self.scored.state_dict(), "epoch": epoch, "best": self.best, "best_epoch": self.best_epoch,
                "metric": self.cfg["train"]["metric"], "rows": self.rows, "config": self.cfg}

    def state(self, epoch: int) -> dict:
        """Everything `--resume` needs (last.pt): the inference state plus optimiser, scheduler, scaler and RNG."""
        raw = {"train_model": self.model.state_dict()} if self.ema is not None else {}
        return {**self.inference_state(epoch), **raw, "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "stale": self.stale,
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def resume(self) -> None:
        path = self.out / "last.pt"
        ckpt = load_checkpoint(path)
        stored = ckpt.get("config", {})
        theirs, ours = stored.get("model", {}), self.cfg["model"]
        differ = [k for k in ours if k in theirs and theirs[k] != ours[k]]  # keys both know: another model

        def another(what: str) -> InputError:
            return InputError(f"{path}: another model than this command's ({what}); rerun --resume with the "
                              "settings it was made with, or without --resume to start afresh")

        if differ:
            raise another(", ".join(f"model.{k} {theirs[k]!r} there, {ours[k]!r} here" for k in differ))
        try:
            self.model.load_state_dict(ckpt.get("train_model", ckpt["model"]))
            if self.ema is not None:  # a run trained without the average starts it from the weights it resumes
                self.ema.module.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # same settings, other code: shapes or keys differ
            raise another(f"{type(e).__name__}: {(str(e).splitlines() or ['no detail'])[0][:160]}") from None
        if (self.ema is not None) != ("train_model" in ckpt):
            self.log(f"{self.out / 'last.pt'} was trained with{'out' if self.ema is not None else ''} train.ema: "
                     f"{'the average starts from its weights' if self.ema is not None else 'its average is dropped'}"
                     " (not the exact continuation)")
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("cuda_rng") and torch.cuda.is_available():  # exact on CUDA too (dropout, augment on GPU)
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.rows, self.best, self.best_epoch, self.stale = ckpt["rows"], ckpt["best"], ckpt["best_epoch"], \
            ckpt["stale"]
        self.start_epoch = ckpt["epoch"] + 1
        newer = sorted(set(dotted_keys(self.cfg)) - set(dotted_keys(stored)))
        if newer:  # an older toolkit made it: those settings did not exist then, today's defaults fill them in
            self.log(f"{path} has no settings {', '.join(newer[:6])}{' ...' if len(newer) > 6 else ''} (an older "
                     "version made it): the remaining epochs use today's values for them")
        self.log(f"resumed from {self.out / 'last.pt'} after epoch {ckpt['epoch']}")

    # ------------------------------------------------------------------------------------------- loop
    def loader(self, epoch: int) -> DataLoader:
        """This rank's batches of an epoch. On the fly, each rank draws its own stream; from a folder, a
        DistributedSampler gives each rank its own share of a shuffled order. Worker processes start from a fresh
        interpreter (core.workers) and a stalled one ends the run (DataLoader timeout)."""
        t = self.cfg["train"]
        sampler, shuffle = None, False
        if t["synth_dir"]:
            if self.distributed:
                sampler = DistributedSampler(self.dataset, self.world, self.rank, shuffle=True, seed=t["seed"],
                                             drop_last=True)
                sampler.set_epoch(epoch)
            else:
                shuffle = True
        extra = {}
        if t["workers"] > 0:
            extra = {"multiprocessing_context": worker_context(), "timeout": STALL_SECONDS,
                     "worker_init_fn": _limit_worker_threads}
        return DataLoader(self.dataset, batch_size=t["batch_size"], shuffle=shuffle, sampler=sampler,
                          num_workers=t["workers"], drop_last=True,
                          generator=torch.Generator().manual_seed(t["seed"] * 1000 + epoch), **extra)

    def train_epoch(self, epoch: int, bar) -> float:
        t = self.cfg["train"]
        self.net.train()
        losses = []
        for step, batch in enumerate(_watched(self.loader(epoch), epoch)):
            if step >= t["steps_per_epoch"]:
                break
            x, y, label = (batch[k].to(self.device) for k in ("image", "mask", "label"))
            clean = batch["clean"].to(self.device) if "clean" in batch else None  # on-the-fly synthesis keeps it
            ctx = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
            with ctx:
                out = self.net(x, clean)
            parts = self.loss_fn(out, y, label)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(parts["total"]).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            if self.ema is not None:
                self.ema.update(self.model, step=epoch * t["steps_per_epoch"] + step)
            losses.append(float(parts["total"].detach()))
            if bar is not None:
                bar(1, epoch=epoch, loss=f"{np.mean(losses[-20:]):.3f}")
        return float(np.mean(losses)) if losses else float("nan")

    def fit(self, resume: bool = False) -> dict:
        t = self.cfg["train"]
        if resume and (self.out / "last.pt").exists():
            self.resume()
        elif resume and self.main:  # killed before its first epoch ended: nothing to resume, start afresh
            self.log(f"no {self.out / 'last.pt'} yet: starting from the first epoch")
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "config.json", self.cfg)
        remaining = max(0, self.epochs - self.start_epoch) * t["steps_per_epoch"] if self.learns else 0
        bar_cm = self.progress("train", remaining) if (self.progress and self.main and remaining) else nullcontext()
        start = time.perf_counter()
        if self.main and not self.learns:
            self.log(f"{self.cfg['model']['arch']}: fitted on OK crops, nothing to learn by gradient")
        with bar_cm as bar:
            for epoch in range(self.start_epoch, self.epochs):
                ceiling = self.curriculum.ceiling(epoch)
                self.dataset.set_epoch(epoch, ceiling)
                if self.main and self.learns:
                    self.log(f"epoch {epoch}: curriculum {self.curriculum.schedule}, difficulty ceiling {ceiling:.2f}")
                e0 = time.perf_counter()
                train_loss = self.train_epoch(epoch, bar) if self.learns else float("nan")
                row = {"epoch": epoch, "ceiling": ceiling, "lr": self.opt.param_groups[0]["lr"],
                       "train_loss": train_loss, "seconds": time.perf_counter() - e0}
                val = evaluate_set(self.scored, *self.val, self.cfg["predict"], self.device, self.loss_fn)
                row.update({f"val_{k}": v for k, v in val.items() if k not in ("defective", "normal")})
                if self.real is not None:
                    real = evaluate_set(self.scored, *self.real, self.cfg["predict"], self.device, self.loss_fn)
                    row.update({f"real_{k}": v for k, v in real.items() if k not in ("defective", "normal")})
                self.rows.append(row)
                if self.step_best(row, epoch) and self.main:
                    save_checkpoint(self.out / "best.pt", self.inference_state(epoch))
                if self.main:
                    save_checkpoint(self.out / "last.pt", self.state(epoch))
                    write_metrics(self.out, self.rows)
                    self.log(self.summary(row))
                if t["early_stopping"] and self.stale >= t["early_stopping"]:
                    if self.main:
                        self.log(f"early stopping: no better {t['metric']} for {self.stale} epochs")
                    break
        if self.distributed:
            dist.barrier()
        return {"best": self.best, "best_epoch": self.best_epoch, "epochs": len(self.rows),
                "seconds": time.perf_counter() - start, "out": str(self.out)}

    def step_best(self, row: dict, epoch: int) -> bool:
        key = "real_" + self.cfg["train"]["metric"] if self.real is not None else "val_" + self.cfg["train"]["metric"]
        value = row[key]
        better = METRIC_MODE[self.cfg["train"]["metric"]]
        if self.best is None or (not math.isnan(value) and better(value, self.best) != self.best):
            self.best, self.best_epoch, self.stale = value, epoch, 0
            return True
        self.stale += 1
        return False

    def summary(self, row: dict) -> str:
        keys = ("train_loss", "val_loss", "val_score", "val_dice", "val_image_acc", "real_score", "real_dice")
        # a model with nothing to learn by gradient has no train loss (NaN in metrics.csv): not printed as "nan"
        parts = [f"{k}={row[k]:.4f}" for k in keys if k in row and not math.isnan(row[k])]
        return f"epoch {row['epoch']}: " + " ".join(parts) + f" ({row['seconds']:.0f}s)"


def train(cfg: dict, resume: bool = False, log=print, progress=None, warn=None) -> dict:
    return Trainer(cfg, log, progress, warn).fit(resume)


def seed_plan(cfg: dict, n: int) -> tuple[int, int]:
    """(models trained at a time, CPU threads each) for `n` seeds (`seg train --seeds N`): `train.jobs`, or with 0
    (auto) on a CPU as many as this process has threads, one thread each at least (on 2 cores, two seeds side by
    side took 1.30 times less time than one after the other: README), on CUDA or under torchrun one at a time with
    every thread."""
    threads = torch.get_num_threads()
    jobs = cfg["train"]["jobs"]
    if n <= 1 or "RANK" in os.environ:
        return 1, threads
    if jobs == 0:
        jobs = threads if resolve_device(cfg["train"]["device"]).type == "cpu" else 1
    jobs = max(1, min(jobs, n))
    return jobs, max(1, threads // jobs)
