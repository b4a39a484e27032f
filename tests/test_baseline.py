"""Unsupervised baselines: anomaly maps peak on a pasted defect, the coreset covers its bank, files reload, and
they are entries of the one registry, fitted by the one training loop."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from conftest import textured

import baseline  # noqa: F401  (registers padim, patchcore, ssim_ae)
from baseline.common import ok_crops
from baseline.fit import baseline_config, fit_baseline
from baseline.patchcore import greedy_coreset, nearest
from core.io import InputError
from core.modelfile import load_model_file, save_model_file
from core.progress import progress_to
from ensemble.models import Ensemble, load_model
from core.postprocess import postprocess
from seg.config import load_config
from seg.models import create_model, model_from_config
from synth.dataset import to_tensors
from synth.engine import SourcePool

CENTER = (80, 60)  # (x, y) of the pasted defect
SETTINGS = {"padim": dict(padim_dims=64), "patchcore": dict(coreset_ratio=0.1), "ssim_ae": dict(ae_width=16)}


def defect_crop() -> tuple[np.ndarray, np.ndarray]:
    img = textured(11)[:128, 40:168].copy()
    mask = np.zeros((128, 128), np.uint8)
    cv2.circle(mask, CENTER, 9, 1, -1)
    img[mask > 0] = 20  # a dark pit
    return img, mask


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The three from the registry: PaDiM and PatchCore through `fit_normal`, the autoencoder by gradient on its own
    term (`aux`), which the training loop adds, on OK crops given as the clean originals."""
    d = tmp_path_factory.mktemp("ok")
    for i in range(6):
        cv2.imwrite(str(d / f"ok_{i}.png"), textured(i))
    pool = SourcePool(d)
    crops, held_out = ok_crops(pool, 48, seed=0), ok_crops(pool, 16, seed=1)
    torch.manual_seed(0)
    models = {m: create_model(m, "tu-tf_efficientnet_lite0", "lite", 1, **SETTINGS[m]) for m in SETTINGS}
    for m in ("padim", "patchcore"):
        assert models[m].needs_normal and not models[m].trainable
        models[m].fit_normal(crops, held_out)
    ae = models["ssim_ae"]
    assert ae.trainable and ae.wants_clean and not ae.needs_normal
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    ae.train()
    for step in range(120):
        x = ok_crops(pool, 16, 100 + step)
        out = ae(torch.rand_like(x), x)  # the image's content is not what it learns: the clean original is
        assert out["mask"].grad_fn is None
        opt.zero_grad()
        out["aux"].backward()
        opt.step()
    for m in models.values():
        m.eval()
    return models, d


@pytest.mark.parametrize("method", ["padim", "patchcore", "ssim_ae"])
def test_anomaly_map_peaks_inside_the_defect(fitted, method):
    img, mask = defect_crop()
    x = to_tensors(img, mask)[0][None]
    amap = fitted[0][method].net.anomaly_map(x)[0, 0].numpy()
    y, xx = np.unravel_index(np.argmax(amap), amap.shape)
    assert np.hypot(xx - CENTER[0], y - CENTER[1]) <= 9 + 6, (method, (xx, y))
    inside, outside = amap[mask > 0].mean(), amap[cv2.dilate(mask, np.ones((25, 25))) == 0].mean()
    assert inside > 2 * outside


def test_coreset_covers_the_bank_within_its_radius():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(3000, 24, generator=g)
    radii = []
    for n in (30, 150, 600):
        idx, radius = greedy_coreset(bank, n)
        assert len(set(idx.tolist())) == n
        covered = torch.cdist(bank, bank[idx]).min(1).values.max()
        assert float(covered) <= radius + 1e-4 and float(covered) >= radius - 1e-3
        radii.append(radius)
    assert radii[0] > radii[1] > radii[2]
    d, i = nearest(bank[:10], bank, k=2, chunk=3)
    assert torch.all(i[:, 0] == torch.arange(10)) and torch.allclose(d[:, 0], torch.zeros(10), atol=5e-3)


def test_coreset_picks_the_farthest_row_each_time_and_nearest_finds_the_true_nearest_rows():
    """The fast paths (direct float64 differences in the coreset, argmin over |b|^2 - 2 q.b in `nearest`) return
    what the definitions say, checked by brute force on rows far from the origin (where cancellation would bite)."""
    g = torch.Generator().manual_seed(1)
    bank = 50 + torch.randn(400, 16, generator=g)
    idx, radius = greedy_coreset(bank, 40, seed=3)
    b = bank.double()
    for k in range(1, 40):
        to_chosen = torch.cdist(b, b[idx[:k]]).min(1).values
        assert to_chosen[idx[k]] == to_chosen.max()  # the row farthest from those already chosen
    assert abs(radius - float(torch.cdist(b, b[idx]).min(1).values.max())) < 1e-9
    query = 50 + torch.randn(37, 16, generator=g)
    full = torch.cdist(query.double(), b)
    want = full.topk(3, dim=1, largest=False).values
    for k, chunk in ((3, 8), (1, 5)):
        d, i = nearest(query, bank, k=k, chunk=chunk)
        assert d.shape == i.shape == (37, k)
        # the rows found are the k nearest, to float32 rounding of near-ties; the distances are theirs
        assert torch.allclose(full.gather(1, i), want[:, :k], atol=2e-3)
        assert torch.allclose(d.double(), full.gather(1, i), atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # AMP (CUDA training) must not rank in half precision
            da, ia = nearest(query, bank, k=k, chunk=chunk)
        assert torch.equal(ia, i) and da.dtype == torch.float32


class RecordingBar:
    """A progress-bar factory, as cli.Bar, that records (description, total, steps shown)."""
    seen: list = []
    shows_side_tasks = True

    def __init__(self, description: str, total: int):
        self.row = [description, total, 0]
        self.seen.append(self.row)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __call__(self, k: int = 1, **fields) -> None:
        self.row[2] += k


def test_the_coreset_shows_its_progress_on_the_callers_bar(fitted, tmp_path):
    """The greedy coreset (PatchCore's, the evidence UNet's) reports every selection to the bar the caller set up,
    none without one (same selection), and `baseline fit` shows it; a parent's bar that counts training steps
    (`shows_side_tasks` false, as core.workers.ReportBar) is not given it."""
    bank = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    RecordingBar.seen = []
    with progress_to(RecordingBar):
        idx, _ = greedy_coreset(bank, 250)
    assert RecordingBar.seen == [["coreset", 249, 249]]
    assert torch.equal(greedy_coreset(bank, 250)[0], idx)
    cfg = load_config(None, [f"data.ok_dir={fitted[1]}", "baseline.n_train=8", "baseline.coreset_ratio=0.1",
                             "train.val_n=8", "calibrate.normal_crops=8", "calibrate.synth_n=8"])
    RecordingBar.seen = []
    fit_baseline(cfg, "patchcore", tmp_path / "pc.pt", progress=RecordingBar, log=lambda m: None)
    assert [r[0] for r in RecordingBar.seen] == ["coreset"] and RecordingBar.seen[0][1] == RecordingBar.seen[0][2] > 0

    class StepsOnly(RecordingBar):
        shows_side_tasks = False

    RecordingBar.seen = []
    fit_baseline(cfg, "patchcore", tmp_path / "pc2.pt", progress=StepsOnly, log=lambda m: None)
    assert RecordingBar.seen == []


def test_patchcore_bank_flip_holds_the_mirror_images():
    """`baseline.bank_flip` reaches the PatchCore that `baseline fit` builds, and its bank then holds the OK crops'
    mirror images: a mirrored OK crop (the view flip TTA shows) is as normal as the crop itself. Without it the
    mirror image of an asymmetric texture (a gradient, a dark left band) is far from every patch of the bank."""
    img = textured(3)
    crops = torch.from_numpy(np.stack([img[:96, :96], img[60:156, 100:196]])).float()[:, None] / 255
    peak = {}
    for flip in (False, True):
        cfg = baseline_config(load_config(None, [f"baseline.bank_flip={str(flip).lower()}",
                                                 "baseline.coreset_ratio=1.0"]), "patchcore")
        pc = model_from_config(cfg["model"]).net
        assert pc.bank_flip is flip
        pc.fit(crops)
        assert len(pc.bank) == (2 if flip else 1) * 2 * 12 * 12  # every patch (ratio 1) of the 96-px crops, stride 8
        peak[flip] = [float(pc.anomaly_map(x).amax()) for x in (crops, crops.flip(-1))]
    far = peak[False][1]  # the mirror image without bank_flip; every other case is a patch of the bank itself
    assert far > 0 and max(peak[True] + peak[False][:1]) <= 1e-3 * far


def test_patchcore_zoom_outlines_a_thin_line_more_tightly_and_reloads(tmp_path):
    """`baseline.zoom` reaches the PatchCore that `baseline fit` builds and its model file: the crop resized by 2
    before the backbone gives patches of a quarter of the area (a 4x bank at ratio 1) and a map at the crop's size
    in which a 2-px dark line stands out more and its half-height region is tighter than at zoom 1."""
    imgs = [textured(i) for i in range(2)]
    crops = torch.from_numpy(np.stack([im[r:r + 96, c:c + 96] for im in imgs for r, c in ((0, 40), (60, 110))]))
    crops = crops.float()[:, None] / 255
    test = textured(9)[40:136, 60:156].copy()
    line = np.zeros_like(test)
    cv2.line(line, (20, 30), (75, 70), 1, 2)
    test[line > 0] = (test[line > 0] * 0.55).astype(np.uint8)
    x = torch.from_numpy(test).float()[None, None] / 255
    on = line > 0
    seen = {}
    for zoom in (1, 2):
        cfg = baseline_config(load_config(None, [f"baseline.zoom={zoom}", "baseline.coreset_ratio=1.0"]), "patchcore")
        seg = model_from_config(cfg["model"])
        pc = seg.net
        assert pc.zoom == zoom
        pc.fit(crops)
        assert len(pc.bank) == 2 * 4 * (12 * zoom) ** 2  # every patch of the 4 crops and their mirror images
        m = pc.anomaly_map(x)[0, 0].numpy()
        assert m.shape == (96, 96)
        half = m >= (m.max() + np.median(m)) / 2
        seen[zoom] = ((half & on).sum() / (half | on).sum(), m[on].mean() / m[~on].mean())
        if zoom == 2:
            save_model_file(tmp_path / "pc.pt", {"model": seg.state_dict(), "config": cfg})
            again, _, _ = load_model(tmp_path / "pc.pt", torch.device("cpu"))
            assert again.net.zoom == 2 and torch.equal(again.net.anomaly_map(x), pc.anomaly_map(x))
    (iou1, contrast1), (iou2, contrast2) = seen[1], seen[2]
    assert iou2 > 1.2 * iou1 and contrast2 > contrast1
    old = load_config(None, ["model.arch=patchcore"])
    del old["model"]["zoom"]  # a file fitted before the key: no zoom
    assert model_from_config(old["model"]).net.zoom == 1
    assert baseline_config(load_config(None, ["baseline.zoom=2"]), "padim")["model"]["zoom"] == 1  # PatchCore's
    with pytest.raises(InputError, match="model.zoom is PatchCore's alone"):
        load_config(None, ["model.zoom=2"])  # the evidence UNet's bank has no zoom: said, not ignored
    for bad in ("0", "0.5"):  # below 1: backbone inputs and maps too small for the smoothing, and never measured
        with pytest.raises(InputError, match="baseline.zoom must be at least 1"):
            load_config(None, [f"baseline.zoom={bad}"])
    with pytest.raises(InputError, match="model.zoom: expected at least 1"):  # the Python API says it too
        create_model("patchcore", "tu-tf_efficientnet_lite0", "none", 1, zoom=0.5)


@pytest.mark.parametrize("method", ["padim", "patchcore", "ssim_ae"])
def test_saved_model_reloads_to_identical_scores(fitted, method, tmp_path):
    model = fitted[0][method]
    sets = [f"model.{k}={v}" for k, v in SETTINGS[method].items()]
    cfg = load_config(None, [f"model.arch={method}", *sets])
    save_model_file(tmp_path / "m.pt", {"model": model.state_dict(), "config": cfg})
    again, config, _ = load_model(tmp_path / "m.pt", torch.device("cpu"))
    img, mask = defect_crop()
    x = to_tensors(img, mask)[0][None]
    with torch.no_grad():
        a, b = model(x), again(x)
    assert torch.equal(a["mask"], b["mask"]) and a["mask"].std() > 0
    assert (a["image"] is None) == (b["image"] is None) and (a["image"] is None or torch.equal(a["image"], b["image"]))
    assert config["synth"]["size"] == 128


def test_baselines_go_through_the_shared_pipeline(fitted):
    img, mask = defect_crop()
    ens = Ensemble([fitted[0]["patchcore"]], 1, 128, "cpu", "none")
    r = ens.predict([img])[0]
    found = postprocess(r["map"], 0.5, 10)
    assert found[mask > 0].mean() > 0.5 and r["image"] is not None
    normal = ens.predict([textured(12)[:128, 40:168]])[0]  # no defect: no false alarm at the same threshold
    assert not postprocess(normal["map"], 0.5, 10).any()


def test_fit_baseline_is_seg_train_with_the_baseline_settings_and_writes_one_file(fitted, tmp_path):
    cfg = load_config(None, [f"data.ok_dir={fitted[1]}", "baseline.n_train=8", "baseline.padim_dims=32",
                             "model.arch=unet"])
    said = []
    s = fit_baseline(cfg, "padim", tmp_path / "padim.pt", log=said.append)
    assert s["fit_seconds"] > 0 and s["peak_rss_mb"] > 0
    # nothing learnt by gradient: its epoch line has no train loss to show, and no "nan" in its place
    epoch = [m for m in said if m.startswith("epoch 0:")]
    assert len(epoch) == 1 and "val_score=" in epoch[0] and "train_loss" not in epoch[0] and "nan" not in epoch[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["padim.pt"]  # the run's folder is gone
    ckpt = load_model_file(tmp_path / "padim.pt")
    m = ckpt["config"]["model"]
    assert m["arch"] == "padim" and m["padim_dims"] == 32 and m["normal_crops"] == 8
    assert ckpt["config"]["predict"]["tta"] == "none" and ckpt["rows"][0]["epoch"] == 0 and len(ckpt["rows"]) == 1
    assert ckpt["model"]["net.idx"].shape == (32,)
    with pytest.raises(InputError, match="--method"):
        fit_baseline(cfg, "knn", tmp_path / "x.pt")
    for sets, key in ((["baseline.backbone=resnet18"], "weights"),
                      (["baseline.backbone=no_such_net", "baseline.weights=none"], "backbone")):
        bad = load_config(None, [f"data.ok_dir={fitted[1]}", "baseline.n_train=8", *sets])
        with pytest.raises(InputError, match=rf"^baseline\.{key}: "):  # the key the user set, not model.*
            fit_baseline(bad, "patchcore", tmp_path / "x.pt", log=lambda m: None)
    assert not (tmp_path / "x.pt").exists() and not list(tmp_path.glob(".x.pt.fit"))


def test_the_autoencoder_learns_in_the_training_loop_from_clean_originals(fitted, tmp_path):
    """`baseline fit --method ssim_ae` trains by gradient in seg train's loop: its own term on OK crops falls
    against the same model untrained (both with batch statistics: an untrained model's running ones are the
    identity), and its logit mapping moved from the identity."""
    cfg = load_config(None, [f"data.ok_dir={fitted[1]}", "baseline.ae_steps=30", "baseline.ae_batch=8",
                             "baseline.ae_width=8", "train.val_n=8", "train.amp=false"])
    fit_baseline(cfg, "ssim_ae", tmp_path / "ae.pt", log=lambda m: None)
    trained, _, _ = load_model(tmp_path / "ae.pt", torch.device("cpu"))
    fresh = create_model("ssim_ae", "tu-tf_efficientnet_lite0", "lite", 1, ae_width=8).eval()
    ok = ok_crops(SourcePool(fitted[1]), 32, seed=5)
    with torch.no_grad():
        before, after = (float(m.train().net.loss(ok, m.net.reconstruct(ok))) for m in (fresh, trained))
    assert after < 0.8 * before, (before, after)
    assert load_model_file(tmp_path / "ae.pt")["config"]["train"]["augment"]["noise"] == 0  # flips alone


def test_an_interrupted_autoencoder_fit_resumes_to_the_same_model(fitted, tmp_path):
    cfg = load_config(None, [f"data.ok_dir={fitted[1]}", "synth.size=64", "baseline.ae_steps=200",
                             "baseline.ae_batch=2", "baseline.ae_width=8", "train.val_n=4", "train.amp=false"])
    fit_baseline(cfg, "ssim_ae", tmp_path / "full.pt", log=lambda m: None)

    def stop_after_the_first_epoch(message: str) -> None:
        if message.startswith("epoch 0:") and "train_loss" in message:  # its summary: last.pt is written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_baseline(cfg, "ssim_ae", tmp_path / "ae.pt", log=stop_after_the_first_epoch)
    assert not (tmp_path / "ae.pt").exists() and (tmp_path / ".ae.pt.fit" / "last.pt").is_file()  # kept to resume
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError):  # resumed with the wrong OK folder: an error, and the run stays resumable
        fit_baseline({**cfg, "data": {**cfg["data"], "ok_dir": str(empty)}}, "ssim_ae", tmp_path / "ae.pt",
                     log=lambda m: None, resume=True)
    empty.rmdir()
    assert (tmp_path / ".ae.pt.fit" / "last.pt").is_file()
    said: list[str] = []
    fit_baseline(cfg, "ssim_ae", tmp_path / "ae.pt", log=said.append, resume=True)
    assert any(m.startswith("resumed from") for m in said) and not any(m.startswith("epoch 0:") for m in said)
    a, b = (load_model_file(tmp_path / f)["model"] for f in ("full.pt", "ae.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the exact continuation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae.pt", "full.pt"]  # the run's folder is gone


def test_the_autoencoder_keeps_float32_under_mixed_precision_and_a_bad_batch_never_poisons_its_mapping():
    torch.manual_seed(0)
    ae = create_model("ssim_ae", "tu-tf_efficientnet_lite0", "none", 1, ae_width=8).train()
    x = torch.rand(4, 1, 128, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ae(x, x)
    assert out["aux"].dtype == torch.float32 and torch.isfinite(out["aux"])
    center = float(ae.net.center)
    assert center != 0.0
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    ae(bad, bad)
    assert float(ae.net.center) == center  # the NaN batch left the running mapping as it was
    colour = create_model("ssim_ae", "tu-tf_efficientnet_lite0", "none", 3, ae_width=8).train()
    x3 = torch.rand(2, 3, 128, 128)
    assert torch.isfinite(colour(x3, x3)["aux"])  # SSIM per channel: a 3-channel part trains too


def test_seg_train_fits_a_baseline_from_the_command_line(ok_dir, tmp_path):
    """`model.arch: padim` in `seg train` (the `import baseline` in the CLI registers it): a run folder whose best.pt
    predicts, calibrated at the end like any model; a baseline gets no partner (`train.partner`, on by default)."""
    from typer.testing import CliRunner

    import cli

    sets = [f"data.ok_dir={ok_dir}", "model.arch=padim", "model.padim_dims=16", "model.normal_crops=16",
            "train.val_n=8", "calibrate.normal_crops=8", "calibrate.synth_n=8"]
    args = ["seg", "train", "-o", str(tmp_path / "run"), *(x for s in sets for x in ("-s", s))]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    assert "nothing to learn by gradient" in r.output
    ckpt = load_model_file(tmp_path / "run" / "best.pt")
    assert ckpt["config"]["model"]["arch"] == "padim" and "calibration" in ckpt and len(ckpt["rows"]) == 1
    assert ckpt["config"]["train"]["partner"] == "patchcore"  # the default, and still:
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == ["best.pt", "last.pt"]
    assert not (tmp_path / "run" / "ensemble.json").exists()
