"""Unsupervised baselines: anomaly maps peak on a pasted defect, the coreset covers its bank, files reload."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from conftest import textured

from baseline.common import build, ok_crops, save_model
from baseline.fit import fit_baseline, train_autoencoder
from baseline.patchcore import greedy_coreset, nearest
from ensemble.models import Ensemble, load_model
from core.postprocess import postprocess
from seg.config import load_config
from synth.dataset import to_tensors
from synth.engine import SourcePool

CENTER = (80, 60)  # (x, y) of the pasted defect


def defect_crop() -> tuple[np.ndarray, np.ndarray]:
    img = textured(11)[:128, 40:168].copy()
    mask = np.zeros((128, 128), np.uint8)
    cv2.circle(mask, CENTER, 9, 1, -1)
    img[mask > 0] = 20  # a dark pit
    return img, mask


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("ok")
    for i in range(6):
        cv2.imwrite(str(d / f"ok_{i}.png"), textured(i))
    pool = SourcePool(d)
    crops = ok_crops(pool, 48, seed=0)
    torch.manual_seed(0)
    models = {"padim": build("padim", dict(dims=64)), "patchcore": build("patchcore", dict(coreset_ratio=0.1))}
    for m in models.values():
        m.fit(crops)
    ae = build("ssim_ae", dict(width=16))
    train_autoencoder(ae, pool, steps=120, batch_size=16, lr=3e-3, seed=0)
    models["ssim_ae"] = ae
    held_out = ok_crops(pool, 16, seed=1)
    for m in models.values():
        m.standardise(held_out)
    return models, d


@pytest.mark.parametrize("method", ["padim", "patchcore", "ssim_ae"])
def test_anomaly_map_peaks_inside_the_defect(fitted, method):
    img, mask = defect_crop()
    x = to_tensors(img, mask)[0][None]
    amap = fitted[0][method].anomaly_map(x)[0, 0].numpy()
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


@pytest.mark.parametrize("method", ["padim", "patchcore", "ssim_ae"])
def test_saved_model_reloads_to_identical_scores(fitted, method, tmp_path):
    model = fitted[0][method]
    cfg = load_config(None)
    save_model(tmp_path / "m.pt", model, cfg)
    again, config, _ = load_model(tmp_path / "m.pt", torch.device("cpu"))
    img, mask = defect_crop()
    x = to_tensors(img, mask)[0][None]
    with torch.no_grad():
        a, b = model.eval()(x), again(x)
    assert torch.equal(a["mask"], b["mask"])
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


def test_fit_baseline_writes_one_file(fitted, tmp_path):
    cfg = load_config(None, [f"data.ok_dir={fitted[1]}", "baseline.n_train=8", "baseline.n_val=4"])
    s = fit_baseline(cfg, "padim", tmp_path / "padim.pt", log=lambda m: None)
    assert (tmp_path / "padim.pt").stat().st_size > 0 and s["fit_seconds"] > 0 and s["peak_rss_mb"] > 0
    with pytest.raises(ValueError, match="--method"):
        fit_baseline(cfg, "knn", tmp_path / "x.pt")
