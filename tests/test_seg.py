"""Segmenters and training: shapes, UNet 3+ heads, curriculum, checkpoints, exact resume, config errors, DDP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import baseline  # noqa: F401  (registers padim, patchcore and ssim_ae: every test over ARCHS covers them too)
from seg.config import load_config
from seg.curriculum import CurriculumSchedule
from seg.losses import SegmentationLoss
from seg.models import ARCHS, create_model
from seg.models.encoders import lite_state_dict
from core.postprocess import final_mask
from seg.train import load_checkpoint, train
from core.io import InputError
from core.modelfile import save_model_file

SMALL = dict(decoder_channels=(32, 16, 16, 8, 8))


def test_the_config_accepts_every_registered_arch_and_no_other():
    """seg.config keeps its own list (it must load without torch); it must name exactly the registry's entries."""
    from seg.config import CHOICES

    assert CHOICES["model.arch"] == tuple(ARCHS)
    from baseline.fit import METHODS

    assert CHOICES["train.partner"] == ("none", *METHODS)  # `seg train`'s partner: any baseline, or none
    with pytest.raises(InputError, match="train.partner"):
        load_config(None, ["train.partner=unet"])
    with pytest.raises(InputError, match="model.arch"):
        load_config(None, ["model.arch=segformer"])


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("encoder,channels,size", [("tu-tf_efficientnet_lite0", 1, 64), ("resnet18", 3, 96)])
def test_every_arch_gives_masks_of_the_input_size(arch, encoder, channels, size):
    torch.manual_seed(0)
    m = create_model(arch, encoder, "none", channels, size=size, **SMALL).eval()
    with torch.no_grad():
        out = m(torch.rand(2, channels, size, size))
    assert out["mask"].shape == (2, 1, size, size)
    if arch not in ("padim", "ssim_ae"):  # the two baselines without an image-level score
        assert out["image"].shape == (2, 1)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_round_trips_through_its_model_file(arch, ok_dir, tmp_path):
    """save_model_file -> load_model (the inference path) gives bit-identical outputs, for every segmenter."""
    from core.modelfile import save_model_file
    from ensemble.models import load_model
    from synth.dataset import crops_tensor
    from synth.engine import SourcePool

    torch.manual_seed(0)
    cfg = load_config(None, [f"model.arch={arch}", "model.weights=none", "model.decoder_channels=[32,16,16,8,8]"])
    m = create_model(arch, "tu-tf_efficientnet_lite0", "none", 1, **SMALL)
    if m.needs_normal:
        pool = SourcePool(ok_dir)
        m.fit_normal(crops_tensor(pool.random_crops(8, 0)), crops_tensor(pool.random_crops(4, 1)))
    m.eval()
    save_model_file(tmp_path / "m.pt", {"model": m.state_dict(), "config": cfg})
    back, config, _ = load_model(tmp_path / "m.pt", torch.device("cpu"))
    x = torch.rand(3, 1, 128, 128)
    with torch.no_grad():
        a, b = m(x), back(x)
    assert config["model"]["arch"] == arch
    assert torch.equal(a["mask"], b["mask"])
    assert (a["image"] is None) == (b["image"] is None) and (a["image"] is None or torch.equal(a["image"], b["image"]))


def test_lite_weights_are_the_packaged_imagenet_weights():
    m = create_model("unet", "tu-tf_efficientnet_lite0", "lite", in_channels=1, **SMALL)
    ref = lite_state_dict(0)
    enc = m.net.encoder.model.state_dict()
    assert torch.equal(enc["blocks.3.0.conv_pw.weight"], ref["blocks.3.0.conv_pw.weight"])
    # grey input: the stem's three colour filters are summed into one
    assert torch.allclose(enc["conv_stem.weight"], ref["conv_stem.weight"].sum(1, keepdim=True))
    assert float(m.mean) == 0.5 and float(m.std) == 0.5


def test_unet3plus_deep_supervision_only_in_training():
    torch.manual_seed(0)
    m = create_model("unet3plus", "tu-tf_efficientnet_lite0", "none", 1, **SMALL)
    x = torch.rand(2, 1, 64, 64)
    deep = m.train()(x)["deep"]
    assert len(deep) == 4 and all(d.shape == (2, 1, 64, 64) for d in deep)
    assert m.eval()(x)["deep"] is None
    plain = create_model("unet3plus", "tu-tf_efficientnet_lite0", "none", 1, deep_supervision=False, **SMALL)
    assert plain.train()(x)["deep"] is None


def test_cgm_decides_in_decide_not_inside_the_model():
    torch.manual_seed(0)
    m = create_model("unet3plus", "tu-tf_efficientnet_lite0", "none", 1, **SMALL).eval()
    x = torch.rand(2, 1, 64, 64)
    head = next(mod for mod in m.net.classification_head.modules() if isinstance(mod, torch.nn.Linear))
    with torch.no_grad():
        head.bias.fill_(-50.0)  # the head judges both images normal
        low = m(x)
        head.bias.fill_(50.0)
        high = m(x)
    assert torch.equal(low["mask"], high["mask"])  # the model never blanks its own mask
    params = {"threshold": float(low["mask"].min()), "image_threshold": 0.0, "min_area": 0, "opening": 0}
    amap = low["mask"][0, 0].numpy()
    assert not final_mask(amap, float(low["image"][0]), params).any()  # decide() drops it below the threshold
    assert final_mask(amap, float(high["image"][0]), params).all()
    assert final_mask(amap, float(low["image"][0]), {**params, "image_threshold": -100.0}).all()


def test_curriculum_ceiling_follows_its_schedule():
    lin = CurriculumSchedule("linear", 0.2, 1.0, 4)
    assert [lin.ceiling(e) for e in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    step = CurriculumSchedule("step", 0.2, 1.0, 8)
    assert [step.ceiling(e) for e in (0, 1, 2, 3, 4, 8)] == pytest.approx([0.2, 0.2, 0.4, 0.4, 0.6, 1.0])
    assert CurriculumSchedule("none").ceiling(0) == 1.0
    with pytest.raises(ValueError, match="start <= end"):
        CurriculumSchedule("linear", 0.9, 0.1)


def tiny_config(ok_dir, out, **train):
    cfg = load_config(None, [
        f"data.ok_dir={ok_dir}", "synth.size=64", "model.arch=unet", "model.weights=none",
        "model.decoder_channels=[16,16,8,8,8]",
        "train.steps_per_epoch=2", "train.batch_size=4", "train.val_n=8", "train.epochs=2", f"train.out={out}",
        "train.augment.noise=0.5", "predict.min_area=2"])
    cfg["train"].update(train)
    return cfg


def test_training_writes_checkpoints_metrics_and_plot(ok_dir, tmp_path):
    cfg = tiny_config(ok_dir, tmp_path / "run")
    logs = []
    summary = train(cfg, log=logs.append)
    out = tmp_path / "run"
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "config.json"):
        assert (out / name).stat().st_size > 0
    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 3 and "val_score" in lines[0] and "ceiling" in lines[0]
    ckpt = load_checkpoint(out / "best.pt")
    scores = [float(line.split(",")[lines[0].split(",").index("val_score")]) for line in lines[1:]]
    best = int(max(range(len(scores)), key=lambda e: (scores[e], -e)))  # the first epoch with the top score
    assert ckpt["config"]["synth"]["size"] == 64 and ckpt["epoch"] == best == summary["best_epoch"]
    assert ckpt["best"] == pytest.approx(scores[best], abs=1e-5)
    # best.pt holds what prediction needs; the optimiser and RNG state for --resume stay in last.pt
    last = load_checkpoint(out / "last.pt")
    assert "optimizer" not in ckpt and "rng" not in ckpt and "optimizer" in last and "rng" in last
    assert (out / "best.pt").stat().st_size < 0.6 * (out / "last.pt").stat().st_size
    from core import __version__

    assert ckpt["toolkit_version"] == __version__
    assert any("difficulty ceiling 0.40" in m for m in logs) and any("difficulty ceiling 0.47" in m for m in logs)
    # the real checkpoint through the inference path: same logits as the trained module, for crops and tiles
    import numpy as np

    from ensemble.models import Ensemble, load_model

    ens = Ensemble.from_checkpoints([out / "best.pt"], "cpu", tta_mode="none")
    img = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    module, _, _ = load_model(out / "best.pt", torch.device("cpu"))
    with torch.no_grad():
        direct = module(torch.from_numpy(img)[None, None].float() / 255)["mask"][0, 0].numpy()
    r = ens.predict([img, np.tile(img, (2, 3))])
    assert ens.tile == 64 and np.allclose(r[0]["map"], direct, atol=1e-5) and r[1]["map"].shape == (128, 192)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ens.models[0].modules())  # folded for prediction


def test_training_from_a_generated_folder_respects_the_curriculum(ok_dir, tmp_path):
    from seg.data import SynthFolderDataset
    from synth.engine import SynthConfig
    from synth.generate import generate

    generate(ok_dir, tmp_path / "gen", 24, SynthConfig(size=64), seed=0)
    ds = SynthFolderDataset(tmp_path / "gen")
    ds.set_epoch(0, 0.3)
    kept = [ds.rows[i] for i in ds.active]
    assert 0 < len(kept) < 24 and all(r["normal"] or r["difficulty"] <= 0.3 for r in kept)
    cfg = tiny_config(ok_dir, tmp_path / "run", synth_dir=str(tmp_path / "gen"), epochs=1)
    summary = train(cfg, log=lambda m: None)
    assert summary["epochs"] == 1 and (tmp_path / "run" / "best.pt").exists()


def test_a_generated_folder_validates_on_its_own_held_out_sources(ok_dir, tmp_path):
    import shutil

    from seg.train import Trainer
    from synth.engine import SynthConfig
    from synth.generate import generate

    gen = tmp_path / "gen"
    generate(ok_dir, gen, 16, SynthConfig(size=64, normal_ratio=0.5), seed=0, holdout=0.4, holdout_seed=1)
    held = __import__("json").loads((gen / "run.json").read_text())["held_out"]
    other = tmp_path / "other"  # the config names other OK images (data.root, data.ok_dir): the folder wins
    other.mkdir()
    shutil.copy(ok_dir / "ok_0.png", other / "x.png")
    cfg = tiny_config(other, tmp_path / "run", synth_dir=str(gen))
    warnings = []
    trainer = Trainer(cfg, log=lambda m: None, warn=warnings.append)
    assert trainer.pool.root == ok_dir.resolve() and trainer.held_out.paths == held
    assert trainer.cfg["data"]["ok_dir"] == str(ok_dir.resolve()) and trainer.cfg["synth"]["normal_ratio"] == 0.5
    assert not warnings and not set(trainer.pool.paths) & set(held)
    colour = tmp_path / "colour"  # a folder of 3-channel samples for a 1-channel model: one line, not a traceback
    generate(ok_dir, colour, 4, SynthConfig(size=64, channels=3), seed=0, holdout=0.4, holdout_seed=1)
    with pytest.raises(InputError, match="3 channel\\(s\\), the model takes 1"):
        Trainer(tiny_config(ok_dir, tmp_path / "run3", synth_dir=str(colour)), log=lambda m: None)
    (ok_dir / "ok_9.png").write_bytes((ok_dir / "ok_0.png").read_bytes())  # the source changed: split moved
    with pytest.raises(InputError, match="changed since the folder was generated"):
        Trainer(cfg, log=lambda m: None)


@pytest.mark.parametrize("ema", [0.0, 0.999])
def test_resume_continues_exactly(ok_dir, tmp_path, ema):
    straight = tiny_config(ok_dir, tmp_path / "a", ema=ema)
    train(straight, log=lambda m: None)
    half = tiny_config(ok_dir, tmp_path / "b", ema=ema)

    class Interrupt:  # a progress bar that stops the run in the middle of epoch 1, like Ctrl-C would
        def __init__(self, *a):
            self.steps = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __call__(self, k=1, **fields):
            self.steps += k
            if self.steps == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(half, log=lambda m: None, progress=Interrupt)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 0
    logs = []
    train(half, resume=True, log=logs.append)
    assert any("resumed" in m and "after epoch 0" in m for m in logs)
    assert not any("has no settings" in m for m in logs)  # the same toolkit: nothing to warn of
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert [r["epoch"] for r in b["rows"]] == [0, 1]
    assert ("train_model" in a) == ("train_model" in b) == bool(ema)  # with train.ema: the weights trained on
    for key in ("model", "train_model") if ema else ("model",):  # bit for bit: weights (averaged ones too),
        for k, v in a[key].items():  # optimiser and scheduler state, history
            assert torch.equal(v, b[key][k]), (key, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["scheduler"] == b["scheduler"]
    assert a["rows"][1]["train_loss"] == b["rows"][1]["train_loss"]


def test_ema_weights_are_what_validation_scores_and_best_pt_holds(ok_dir, tmp_path):
    plain, averaged = tmp_path / "plain", tmp_path / "ema"
    train(tiny_config(ok_dir, plain, epochs=1, steps_per_epoch=3), log=lambda m: None)
    train(tiny_config(ok_dir, averaged, epochs=1, steps_per_epoch=3, ema=0.999), log=lambda m: None)
    p, e = load_checkpoint(plain / "last.pt"), load_checkpoint(averaged / "last.pt")
    assert "train_model" not in p
    moved = 0
    for k, w in e["train_model"].items():  # the same training path: the average does not steer the training
        assert torch.equal(w, p["model"][k]), k
        moved += bool(w.is_floating_point() and not torch.equal(w, e["model"][k]))
    assert moved > 10  # the averaged weights are other weights
    best = load_checkpoint(averaged / "best.pt")
    assert all(torch.equal(v, e["model"][k]) for k, v in best["model"].items())  # one epoch: best is the last
    # validation scored the averaged weights: its loss on the val set is theirs, not the training weights'
    cfg = tiny_config(ok_dir, tmp_path / "x", epochs=1, steps_per_epoch=3, ema=0.999)
    from seg.train import Trainer, evaluate_set
    t = Trainer(cfg, log=lambda m: None)
    t.model.load_state_dict(e["train_model"])
    t.ema.module.load_state_dict(e["model"])
    row = evaluate_set(t.scored, *t.val, cfg["predict"], t.device, t.loss_fn)
    raw = evaluate_set(t.model, *t.val, cfg["predict"], t.device, t.loss_fn)
    assert row["loss"] == pytest.approx(e["rows"][0]["val_loss"], abs=1e-6) and raw["loss"] != row["loss"]


def test_resume_across_a_change_of_train_ema_keeps_the_work(ok_dir, tmp_path):
    train(tiny_config(ok_dir, tmp_path, epochs=1), log=lambda m: None)
    before = load_checkpoint(tmp_path / "last.pt")["model"]
    logs = []
    train(tiny_config(ok_dir, tmp_path, epochs=2, ema=0.999), resume=True, log=logs.append)
    assert any("trained without train.ema: the average starts from its weights" in m for m in logs)
    after = load_checkpoint(tmp_path / "last.pt")
    assert [r["epoch"] for r in after["rows"]] == [0, 1] and "train_model" in after
    assert any(not torch.equal(v, after["train_model"][k]) for k, v in before.items())  # it trained on from there


def test_resume_of_a_run_made_before_a_key_existed_says_so(ok_dir, tmp_path):
    """A last.pt whose stored config lacks keys of today's (an older toolkit made it, e.g. before train.augment.vflip
    split the flips) resumes, with one line that names them: its remaining epochs follow today's values."""
    train(tiny_config(ok_dir, tmp_path, epochs=1), log=lambda m: None)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    del ckpt["config"]["train"]["augment"]["vflip"]
    save_model_file(tmp_path / "last.pt", ckpt)
    logs = []
    train(tiny_config(ok_dir, tmp_path, epochs=2), resume=True, log=logs.append)
    said = [m for m in logs if "has no settings" in m]
    assert len(said) == 1 and "settings train.augment.vflip (an older version" in said[0] and "last.pt" in said[0]
    assert [r["epoch"] for r in load_checkpoint(tmp_path / "last.pt")["rows"]] == [0, 1]


def test_resume_of_another_model_is_one_line_and_keeps_the_run(ok_dir, tmp_path):
    train(tiny_config(ok_dir, tmp_path, epochs=1), log=lambda m: None)
    last = (tmp_path / "last.pt").read_bytes()
    other = tiny_config(ok_dir, tmp_path, epochs=2)
    other["model"]["decoder_channels"] = [32, 16, 8, 8, 8]
    with pytest.raises(InputError, match=r"last.pt: another model than this command's \(model.decoder_channels "
                                          r"\[16, 16, 8, 8, 8\] there, \[32, 16, 8, 8, 8\] here\)"):
        train(other, resume=True, log=lambda m: None)
    assert (tmp_path / "last.pt").read_bytes() == last  # nothing lost
    ckpt = load_checkpoint(tmp_path / "last.pt")  # the same settings, weights another version of the code named
    ckpt["model"].pop(next(iter(ckpt["model"])))
    save_model_file(tmp_path / "last.pt", ckpt)
    renamed = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(InputError, match=r"last.pt: another model than this command's \(RuntimeError: Error"):
        train(tiny_config(ok_dir, tmp_path, epochs=2), resume=True, log=lambda m: None)
    assert (tmp_path / "last.pt").read_bytes() == renamed


def test_bad_config_key_fails_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(InputError, match=r"bad.yaml: unknown key 'train.epoch' \(did you mean 'epochs'\?\)"):
        load_config(bad)
    with pytest.raises(InputError, match="model.arch must be one of unet, unet3plus"):
        load_config(None, ["model.arch=segformer"])
    with pytest.raises(InputError, match="train.lr must be a float"):
        load_config(None, ["train.lr=fast"])
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "seg", "train", "-s", "train.epoch=3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown key 'train.epoch'" in r.stderr and "Traceback" not in r.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    run = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return subprocess.run([run, "--nproc_per_node", "2", "--master_port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


TINY = ["synth.size=64", "model.arch=unet", "model.weights=none", "model.decoder_channels=[16,16,8,8,8]",
        "train.steps_per_epoch=2", "train.batch_size=2", "train.val_n=4", "train.partner=none",
        "train.epochs=2"]


@pytest.mark.parametrize("source", ["on-the-fly", "folder"])
def test_ddp_ranks_draw_their_own_samples_and_end_with_equal_weights(ok_dir, tmp_path, source):
    import json

    sets = [f"data.ok_dir={ok_dir}", *TINY]
    if source == "folder":  # from a `synth generate` folder, with a head that gets no loss (unused parameters)
        from synth.engine import SynthConfig
        from synth.generate import generate

        generate(ok_dir, tmp_path / "gen", 24, SynthConfig(size=64), seed=0, holdout=0.2)
        sets += [f"train.synth_dir={tmp_path / 'gen'}", "train.image_loss_weight=0"]
    out = tmp_path / "ddp"
    r = torchrun([str(ROOT / "tests" / "helpers" / "ddp_probe.py"), str(out), *sets])
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1))
    for e0, e1 in zip(r0["drawn"], r1["drawn"]):  # each epoch, each rank its own samples
        assert len(e0) == len(e1) == 2 * 2 and not set(e0) & set(e1)
    assert len(r0["drawn"]) == 2
    assert r0["weights"] == r1["weights"]  # gradients averaged: one model
    assert len((out / "metrics.csv").read_text().splitlines()) == 3


def test_ddp_through_the_cli(ok_dir, tmp_path):
    out = tmp_path / "ddp"
    sets = [a for kv in [f"data.ok_dir={ok_dir}", *TINY[:-1], "train.epochs=1"] for a in ("-s", kv)]
    r = torchrun([str(ROOT / "cli.py"), "seg", "train", *sets, "-o", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "last.pt").exists() and len((out / "metrics.csv").read_text().splitlines()) == 2


def test_evidence_unet_sees_a_planted_defect_in_its_evidence_channel(ok_dir):
    import cv2
    import numpy as np

    from synth.dataset import crops_tensor
    from synth.engine import SourcePool

    torch.manual_seed(0)
    pool = SourcePool(ok_dir)
    m = create_model("evidence_unet", "tu-tf_efficientnet_lite0", "lite", 1, **SMALL)
    assert m.needs_normal and not create_model("unet", "tu-tf_efficientnet_lite0", "none", 1, **SMALL).needs_normal
    m.fit_normal(crops_tensor(pool.random_crops(24, 0)), crops_tensor(pool.random_crops(8, 1)))
    crop = pool.random_crops(1, 5)[0].copy()
    mask = np.zeros((128, 128), np.uint8)
    cv2.circle(mask, (80, 60), 8, 1, -1)
    crop[mask > 0] = 15  # a dark pit on the textured surface
    with torch.no_grad():
        ev = m.net.evidence(crops_tensor([crop]))[0, 0].numpy()
        out = m.eval()(crops_tensor([crop]))
    ring = cv2.dilate(mask, np.ones((41, 41))) == 0
    assert ev[mask > 0].mean() > 2.0 > ev[ring].mean()  # above the normal 99.9th percentile inside, not outside
    assert out["mask"].shape == (1, 1, 128, 128) and out["image"].shape == (1, 1)
    again = create_model("evidence_unet", "tu-tf_efficientnet_lite0", "none", 1, **SMALL).eval()
    again.load_state_dict(m.state_dict())  # the bank's fitted size comes back with the file
    with torch.no_grad():
        assert torch.equal(again(crops_tensor([crop]))["mask"], out["mask"])


def test_evidence_smoothing_is_the_box_mean_of_the_raw_distances():
    """The evidence map is the nearest-patch distance map smoothed by a (2k+1)^2 box mean, k = 4 sigma (reflect
    padding), computed as two 1-D passes: equal to the 2-D box to float rounding, and really smoothed."""
    import torch.nn.functional as F

    from seg.models.evidence import NormalEvidence

    g = torch.Generator().manual_seed(0)
    ev = NormalEvidence("none", coreset_ratio=0.5)
    ev.fit(torch.rand(4, 1, 64, 64, generator=g), torch.rand(2, 1, 64, 64, generator=g))
    x = torch.rand(2, 1, 64, 64, generator=g)
    smoothed = ev.raw(x)
    ev.sigma = 0.0
    sharp = ev.raw(x)
    box = F.avg_pool2d(F.pad(sharp, (8, 8, 8, 8), mode="reflect"), 17, 1)
    assert smoothed.shape == sharp.shape == (2, 1, 64, 64)
    assert torch.allclose(smoothed, box, rtol=0, atol=1e-5 * float(sharp.abs().max()))
    assert float(smoothed.std()) < 0.95 * float(sharp.std())  # and really smoother


def test_evidence_bank_holds_the_mirror_images_and_training_flips_only_as_the_bank_does():
    """`model.bank_flip` reaches the evidence UNet's normal bank, which then holds the OK crops' mirror images too: a
    mirrored OK crop (the training `flip`, flip TTA) is as normal to it as the crop itself, where without them the
    mirror image of an asymmetric texture is far from every normal patch. The default augmentation's geometric part
    shows the model only views the bank holds: each crop as it is or mirrored left-right, never flipped up-down or
    turned by 90 degrees (views the evidence would call abnormal everywhere)."""
    import numpy as np

    from conftest import textured
    from seg.data import SeededAugment, build_augment
    from seg.models import model_from_config

    img = textured(3)
    crops = torch.from_numpy(np.stack([img[:96, :96], img[60:156, 100:196]])).float()[:, None] / 255
    peak = {}
    for flip in (False, True):
        cfg = load_config(None, [f"model.bank_flip={str(flip).lower()}", "model.coreset_ratio=1.0",
                                 "model.weights=none", "model.decoder_channels=[32,16,16,8,8]"])
        ev = model_from_config(cfg["model"]).net.evidence
        assert ev.bank_flip is flip
        ev.fit(crops, crops[:1, :, :64, :64])
        assert len(ev.bank) == (2 if flip else 1) * 2 * 12 * 12  # every patch (ratio 1) of the 96-px crops, stride 8
        peak[flip] = [float(ev.raw(x).amax()) for x in (crops, crops.flip(-1))]
    far = peak[False][1]  # the mirror image without the mirrored bank; every other case is a patch of the bank
    assert far > 0 and max(peak[True] + peak[False][:1]) <= 1e-3 * far

    geometric = {k: (v if k in ("flip", "vflip", "rot90") else 0.0)
                 for k, v in load_config(None, [])["train"]["augment"].items()}
    aug = SeededAugment(build_augment(geometric))
    mask = np.zeros_like(img)
    seen = set()
    for seed in range(32):
        out = aug(img, mask, seed=seed)[0]
        views = [np.array_equal(out, v) for v in (img, img[:, ::-1])]
        assert any(views), f"seed {seed}: a view other than the crop and its mirror image"
        seen.add(views.index(True))
    assert seen == {0, 1}


def test_evidence_unet_trains_in_the_same_loop_and_reloads(ok_dir, tmp_path):
    from ensemble.models import load_model

    cfg = tiny_config(ok_dir, tmp_path / "ev", epochs=1)
    cfg["model"].update(arch="evidence_unet", normal_crops=16)
    summary = train(cfg, log=lambda m: None)
    assert summary["epochs"] == 1
    model, config, _ = load_model(tmp_path / "ev" / "best.pt", torch.device("cpu"))
    bank = load_checkpoint(tmp_path / "ev" / "best.pt")["model"]["net.evidence.bank"]
    assert bank.shape[0] > 1 and torch.equal(model.net.evidence.bank, bank)
    assert config["model"]["arch"] == "evidence_unet"


def trained_to_flag_a_planted_pit(ok_dir, out, arch: str, **model_cfg):
    """Train `arch` (Lite weights) by `seg train` on small synthetic batches, load its best.pt and check that its
    map on a planted dark pit stands more than one logit above the surface around it. Returns (model, the config it
    was trained with, the crop)."""
    import cv2
    import numpy as np

    from ensemble.models import load_model
    from synth.dataset import crops_tensor
    from synth.engine import SourcePool

    torch.manual_seed(0)
    cfg = tiny_config(ok_dir, out, epochs=2, steps_per_epoch=30, batch_size=8)
    cfg["synth"]["size"] = 128
    cfg["model"].update(arch=arch, weights="lite", **model_cfg)
    train(cfg, log=lambda m: None)
    model, config, _ = load_model(out / "best.pt", torch.device("cpu"))
    assert config["model"]["arch"] == arch
    crop = SourcePool(ok_dir).random_crops(1, 7)[0].copy()
    mask = np.zeros((128, 128), np.uint8)
    cv2.circle(mask, (70, 64), 9, 1, -1)
    crop[mask > 0] = 15
    with torch.no_grad():
        out_map = model(crops_tensor([crop]))["mask"][0, 0].numpy()
    ring = cv2.dilate(mask, np.ones((41, 41))) == 0
    assert out_map[mask > 0].mean() > out_map[ring].mean() + 1.0, (out_map[mask > 0].mean(), out_map[ring].mean())
    return model, cfg, crop


def test_simplenet_learns_in_the_same_loop_to_flag_a_planted_pit(ok_dir, tmp_path):
    """Trained by `seg train` on synthetic defects (its feature-noise term added by the loss), SimpleNet's map is
    higher on a planted dark pit than on the surface around it; the noise term alone reaches the adaptor and the
    discriminator, and is gone in eval mode or without noise."""
    from synth.dataset import crops_tensor

    model, config, crop = trained_to_flag_a_planted_pit(ok_dir, tmp_path / "sn", "simplenet")
    assert not torch.equal(model.net.adaptor.weight.flatten(1), torch.eye(model.net.adaptor.weight.shape[0]))
    model.train()
    parts = SegmentationLoss()(model(crops_tensor([crop] * 2)), torch.zeros(2, 1, 128, 128), torch.zeros(2, 1))
    parts["aux"].backward()  # the feature-space term alone trains the adaptor and the discriminator
    assert model.net.adaptor.weight.grad.abs().sum() > 0 and model.net.discriminator[0].weight.grad.abs().sum() > 0
    model.net.noise = 0.0
    assert "aux" not in model(crops_tensor([crop] * 2)) and "aux" not in model.eval()(crops_tensor([crop]))


def test_simplenet_names_the_model_key_of_a_bad_encoder():
    with pytest.raises(InputError, match="^model.encoder: cannot build 'efficientnet-b9x'"):
        create_model("simplenet", "efficientnet-b9x", "none", 1, **SMALL)


def test_afs_keeps_the_channels_whose_residual_matches_the_defect_mask():
    """RealNet's anomaly-aware feature selection: of ten residual maps, the two that light up on the planted
    defects are kept, not the one with the strongest residual elsewhere; crops without a defect change nothing."""
    from seg.models.realnet import select_channels

    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(6, 1, 16, 16)
    for i in range(6):
        mask[i, 0, 2 + i:7 + i, 3:9] = 1
    res = torch.rand(6, 10, 16, 16, generator=g)
    res[:, 3] += 2 * mask[:, 0]
    res[:, 7] += 1 * mask[:, 0]
    res[:, 5] += 3 * torch.roll(mask[:, 0], 6, -1)  # strong, but beside the defect
    assert select_channels(res, mask, 2).tolist() == [3, 7]
    more = torch.cat([res, 5 * torch.rand(4, 10, 16, 16, generator=g)])
    assert select_channels(more, torch.cat([mask, torch.zeros(4, 1, 16, 16)]), 2).tolist() == [3, 7]


def test_realnet_learns_in_the_same_loop_to_restore_and_flag_a_planted_pit(ok_dir, tmp_path):
    """Trained by `seg train` (AFS on synthetic pairs before training, its reconstruction term added by the loss),
    RealNet's map is higher on a planted dark pit than on the surface around it; the reconstruction term alone
    reaches the reconstruction networks, and needs the clean originals (which a synth folder does not keep)."""
    from synth.dataset import crops_tensor
    from synth.engine import SourcePool

    model, cfg, crop = trained_to_flag_a_planted_pit(ok_dir, tmp_path / "rn", "realnet", normal_crops=32)
    kept = [model.net.select0, model.net.select1, model.net.select2]
    assert [len(k) for k in kept] == model.net.kept and any(not torch.equal(k, torch.arange(len(k))) for k in kept)
    model.train()
    x = crops_tensor([crop] * 2)
    clean = crops_tensor(SourcePool(ok_dir).random_crops(2, 7))
    parts = SegmentationLoss()(model(x, clean), torch.zeros(2, 1, 128, 128), torch.zeros(2, 1))
    parts["aux"].backward()  # the reconstruction term alone trains the reconstruction networks
    assert all(r.out[-1].weight.grad.abs().sum() > 0 for r in model.net.recon)
    assert model.net.discriminator[0].weight.grad is None
    with pytest.raises(InputError, match="^model.arch: realnet .* train.synth_dir"):
        model(x)
    assert "aux" not in model.eval()(x) and not model.fully_convolutional  # RRS pools over the whole crop
    from synth.engine import SynthConfig
    from synth.generate import generate

    generate(ok_dir, tmp_path / "folder", 4, SynthConfig(size=128))
    cfg["train"].update(synth_dir=str(tmp_path / "folder"), out=str(tmp_path / "rn2"))
    with pytest.raises(InputError, match="^model.arch: realnet .* train.synth_dir"):  # before any work
        train(cfg, log=lambda m: None)
