"""Inference, submission format, score, TTA, voting, tiling, atomic outputs, calibration, evaluation."""

from __future__ import annotations

import json
import math
import shutil

import cv2
import numpy as np
import pytest
import torch
from conftest import SAMPLE, SHARED, textured
from torch import nn

from ensemble.calibrate import best_on_labelled, calibrate, fit_norms, predict_normal, threshold_at_rate
from ensemble.evaluate import compute_metrics, evaluate, load_ground_truth
from core.metrics import average_precision, competition_score, roc_auc
from ensemble.models import Ensemble
from core.postprocess import final_mask
from ensemble.predict import run_predict
from ensemble.submission import mask_to_record, read_submission, record_to_mask
from core.io import InputError, read_image

PARAMS = {"threshold": 0.0, "image_threshold": 0.0, "min_area": 0, "opening": 0}  # logit 0 = probability 0.5


class Pointwise(nn.Module):
    """mask logit = a * pixel + b: a per-pixel model, so tiling must reproduce the whole image exactly."""

    def __init__(self, a=8.0, b=-4.0, head=None):
        super().__init__()
        self.a, self.b, self.head = a, b, head

    def forward(self, x):
        image = None if self.head is None else torch.full((x.shape[0], 1), self.head)
        return {"mask": self.a * x[:, :1] + self.b, "image": image}


class Isotropic(nn.Module):
    """A convolution with a kernel symmetric under the dihedral group D4: equivariant to flips and rot90."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        k = torch.rand(5, 5)
        k = sum(torch.rot90(kk, r) for kk in (k, k.T) for r in range(4))
        self.conv = nn.Conv2d(1, 1, 5, padding=2, bias=False)
        self.conv.weight.data = (k / k.sum() * 8)[None, None]

    def forward(self, x):
        return {"mask": self.conv(x) - 3.5, "image": None}


def test_submission_json_round_trips_masks_in_row_col_order():
    mask = np.zeros((128, 128), np.uint8)
    mask[3, 7] = 1
    rec = mask_to_record(mask, "a.bmp")
    assert rec["regions"] == [{"points": ["3, 7"]}] and rec["Height"] == 128 and rec["name"] == "a.bmp"
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = (cv2.GaussianBlur(rng.random((128, 96)), (0, 0), 3) > 0.55).astype(np.uint8)
        rec = mask_to_record(m, "x.bmp")
        n_components = cv2.connectedComponents(m, connectivity=8)[0] - 1
        assert len(rec["regions"]) == n_components > 1
        assert np.array_equal(record_to_mask(rec), m)


def test_score_of_ground_truth_is_one_and_of_nothing_is_point_three():
    _, _, gt = load_ground_truth(SAMPLE / "round_test/part1/TC_Images")
    assert competition_score(gt, gt)["score"] == pytest.approx(1.0)
    empty = [np.zeros_like(g) for g in gt]
    assert competition_score(empty, gt)["score"] == pytest.approx(0.3)


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/magnetic-tile is not beside this checkout")
def test_shared_labels_in_json_and_png_agree():
    paths, stems, masks = load_ground_truth(SHARED / "round_test/part1/TC_Images")
    labels = read_submission(SHARED / "round_test/part1/TC_Labels", [p.stem for p in paths])
    assert all(np.array_equal(a, b) for a, b in zip(masks, labels))
    assert competition_score(labels, masks)["score"] == pytest.approx(1.0)


def test_metrics_match_known_values():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.8333333)
    gt = [np.ones((4, 4), np.uint8), np.zeros((4, 4), np.uint8)]
    half = np.zeros((4, 4), np.uint8)
    half[:2] = 1
    m = competition_score([half, half], gt)  # defective found with IoU 0.5, normal flagged
    assert m["escape"] == 0 and m["overkill"] == 1 and m["miou"] == pytest.approx(0.5)
    assert m["score"] == pytest.approx(0.5 + 0 + 0.1)


def test_d4_tta_on_an_equivariant_model_changes_nothing():
    img = textured(4)[:128, :128]
    plain = Ensemble([Isotropic()], 1, 128, "cpu", tta_mode="none").predict([img])[0]
    d4 = Ensemble([Isotropic()], 1, 128, "cpu", tta_mode="d4").predict([img])[0]
    assert np.allclose(plain["map"], d4["map"], atol=1e-5)
    assert np.array_equal(plain["hits"], d4["hits"]) and 0 < plain["hits"].mean() < 1


def test_each_model_of_an_ensemble_gets_its_own_tta():
    """`d4,flip`: the first model over the eight dihedral passes, the second over the flip, each as it would be
    alone; one mode for all stays one name, and a list of the wrong length or an unknown mode is refused."""
    from seg.config import load_config

    def directional(seed):
        torch.manual_seed(seed)
        conv = nn.Conv2d(1, 1, 5, padding=2, bias=False)  # a random kernel: no symmetry, TTA changes its map
        return lambda x: {"mask": conv(x), "image": None}

    class Wrap(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f = f

        def forward(self, x):
            return self.f(x)

    a, b = Wrap(directional(1)), Wrap(directional(2))
    img = textured(5)[:128, :128]
    both = Ensemble([a, b], 1, 128, "cpu", tta_mode="d4,flip").predict([img])[0]["per_model"]
    alone = [Ensemble([m], 1, 128, "cpu", tta_mode=t).predict([img])[0]["map"] for m, t in ((a, "d4"), (b, "flip"))]
    other = Ensemble([a], 1, 128, "cpu", tta_mode="flip").predict([img])[0]["map"]
    assert np.allclose(both[0], alone[0], atol=1e-5) and np.allclose(both[1], alone[1], atol=1e-5)
    assert np.abs(alone[0] - other).max() > 1e-2  # d4 and flip differ on this model
    from ensemble.export import ExportGraph  # the graph that goes to ONNX takes the same passes

    ens = Ensemble([a, b], 1, 128, "cpu", tta_mode="d4,flip")
    x = torch.from_numpy(img).float().div(255)[None, None]
    with torch.no_grad():
        assert torch.allclose(ExportGraph(ens)(x), ens.forward(x)[0], atol=1e-5)
    assert Ensemble([a, b], 1, 128, "cpu", tta_mode="d4,d4").tta_mode == "d4"
    assert Ensemble([a, b], 1, 128, "cpu", tta_mode="d4, flip").tta_mode == "d4,flip"
    for bad in ("d4,flip,none", "d4,spin"):
        with pytest.raises(InputError, match="one of them per model"):
            Ensemble([a, b], 1, 128, "cpu", tta_mode=bad)
    assert load_config(None, ["predict.tta=d4,flip"])["predict"]["tta"] == "d4,flip"
    with pytest.raises(InputError, match="predict.tta"):
        load_config(None, ["predict.tta=d4,spin"])


def test_models_run_channels_last_and_give_the_maps_of_the_default_layout():
    """`place` (training and Ensemble) puts convolution weights in the channels-last layout, the fast one on CPU;
    the maps stay those of the default layout, and a state dict saved from it loads into a plain model."""
    from seg.models import create_model

    torch.manual_seed(0)
    plain = create_model("unet", "resnet18", weights="none", in_channels=1).eval()
    placed = create_model("unet", "resnet18", weights="none", in_channels=1).eval()
    placed.load_state_dict(plain.state_dict())
    ens = Ensemble([placed], 1, 128, "cpu", tta_mode="none")
    conv = next(m for m in placed.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    x = torch.from_numpy(textured(1)[:128, :128]).float().div(255)[None, None]
    with torch.no_grad():
        ref = plain(x)["mask"][:, 0]
    got, _ = ens.raw_forward(x)[0]
    assert torch.allclose(got, ref, atol=1e-4) and ref.std() > 0
    again = create_model("unet", "resnet18", weights="none", in_channels=1).eval()
    again.load_state_dict(placed.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x)["mask"], plain(x)["mask"])


def test_k_of_n_voting():
    img = np.zeros((128, 128), np.uint8)
    img[:, :64] = 255  # models see 1.0 on the left half and 0.0 on the right
    models = [Pointwise(8, -4), Pointwise(8, -4), Pointwise(0, -1)]  # two say "left half", one says "nothing"
    hits = {k: Ensemble(models, 1, 128, "cpu", "none", "vote", vote_k=k).predict([img])[0]["hits"]
            for k in (1, 2, 3)}
    assert hits[1][:, :64].all() and hits[2][:, :64].all() and not hits[3].any()
    assert not hits[1][:, 64:].any()
    weighted = Ensemble(models, 1, 128, "cpu", "none", "vote", vote_k=2, weights=[0.2, 0.2, 2.6]).predict([img])[0]
    assert not weighted["hits"].any()  # the heavy "nothing" model outvotes the two others
    mean = Ensemble(models, 1, 128, "cpu", "none", "mean").predict([img])[0]
    assert mean["map"][0, 0] == pytest.approx((4 + 4 - 1) / 3, abs=1e-6)  # mean of logits, never saturated
    assert mean["map"][0, 100] == pytest.approx((-4 - 4 - 1) / 3, abs=1e-6)


def test_tiling_reproduces_the_whole_image_prediction():
    big = textured(7, h=300, w=260)
    ens = Ensemble([Pointwise()], 1, 128, "cpu", "none", tile_overlap=40, batch_size=5)
    whole = Pointwise()(torch.from_numpy(big)[None, None].float() / 255)["mask"][0, 0].numpy()
    out = ens.predict([big, big[:100, :90]])
    assert out[0]["map"].shape == (300, 260) and np.allclose(out[0]["map"], whole, atol=1e-5)
    assert out[1]["map"].shape == (100, 90) and np.allclose(out[1]["map"], whole[:100, :90], atol=1e-5)
    assert all(y + 128 <= 300 and x + 128 <= 260 for y, x in ens.tiles(300, 260))


def test_tiling_a_convolutional_model_matches_the_whole_image_away_from_tile_borders():
    big = textured(8, h=300, w=260)
    ens = Ensemble([Isotropic()], 1, 128, "cpu", "none", tile_overlap=40, batch_size=4)
    whole = Isotropic()(torch.from_numpy(big)[None, None].float() / 255)["mask"][0, 0].detach().numpy()
    tiled = ens.predict([big])[0]["map"]
    # a pixel within 3 px (the kernel's reach) of the edge of any tile covering it sees that tile's zero padding
    covered_badly = np.zeros(big.shape, bool)
    for y, x in ens.tiles(300, 260):
        tile = np.zeros(big.shape, bool)
        tile[y:y + 128, x:x + 128] = True
        t_inner = np.zeros(big.shape, bool)
        t_inner[y + 3:y + 125, x + 3:x + 125] = True
        covered_badly |= tile & ~t_inner
    ok = ~covered_badly
    ok[:3], ok[-3:], ok[:, :3], ok[:, -3:] = False, False, False, False
    assert ok.mean() > 0.5 and np.allclose(tiled[ok], whole[ok], atol=1e-5)
    assert not np.allclose(tiled[covered_badly], whole[covered_badly], atol=1e-5)  # seams exist where expected


class Convolutional(Isotropic):
    fully_convolutional = True

    def forward(self, x):
        out = super().forward(x)
        return {"mask": out["mask"], "image": out["mask"].amax(dim=(1, 2, 3))[:, None]}


def test_a_large_image_is_predicted_whole_and_matches_the_tiles_away_from_their_borders():
    big = textured(9, h=700, w=900)
    whole = Ensemble([Convolutional()], 1, 128, "cpu", "none", tile_overlap=32, window=320)
    tiled = Ensemble([Convolutional()], 1, 128, "cpu", "none", tile_overlap=32, window=0)
    assert whole.whole and not tiled.whole and not Ensemble([Isotropic()], 1, 128, "cpu", "none").whole
    a, b = whole.predict([big])[0], tiled.predict([big])[0]
    direct = Convolutional()(torch.from_numpy(big)[None, None].float() / 255)["mask"][0, 0].detach().numpy()
    inner = np.zeros(big.shape, bool)
    inner[3:-3, 3:-3] = True
    (wh, ys), (ww, xs) = whole._windows(700), whole._windows(900)
    assert wh <= 320 and ww <= 320 and len(ys) == 3 and len(xs) == 4  # the fewest windows, spread evenly
    for y in ys:  # the windows' own borders (3 px, the kernel's reach) see padding
        inner[max(0, y - 3):y + 3] = inner[y + wh - 3:y + wh + 3] = False
    for x in xs:
        inner[:, max(0, x - 3):x + 3] = inner[:, x + ww - 3:x + ww + 3] = False
    assert np.allclose(a["map"][inner], direct[inner], atol=1e-5)
    far = np.zeros(big.shape, bool)  # away from every tile border of the tiled path too
    for y, x in tiled.tiles(700, 900):
        far[y + 3:y + 125, x + 3:x + 125] = True
    for y, x in tiled.tiles(700, 900):
        t = np.zeros(big.shape, bool)
        t[y:y + 128, x:x + 128] = True
        t[y + 3:y + 125, x + 3:x + 125] = False
        far &= ~t
    assert (far & inner).mean() > 0.3 and np.allclose(a["map"][far & inner], b["map"][far & inner], atol=1e-5)
    # the image score is the max over the windows, as the heads' global max pooling gives over one input
    assert direct[inner].max() - 1e-5 <= a["image"] <= direct.max() + 0.1
    small = whole.predict([big[:100, :90]])[0]  # smaller than a crop: padded like a tile, cut back
    assert small["map"].shape == (100, 90)


def test_predict_writes_submission_and_an_interrupted_run_leaves_no_partial_output(tmp_path):
    images = tmp_path / "TC_Images"
    images.mkdir()
    for i in range(6):
        img = textured(i)[:128, :128].copy()
        if i % 2:
            cv2.circle(img, (64, 64), 6, 250, -1)  # bright spot: "defective" for the pointwise model
        cv2.imwrite(str(images / f"c{i}.bmp"), img)
    ens = Ensemble([Pointwise(40, -36)], 1, 128, "cpu", "flip", batch_size=2)
    out = tmp_path / "pred"
    said = []
    s = run_predict(ens, images, out, PARAMS, warn=said.append)
    jsons = sorted(p.stem for p in (out / "submission").glob("*.json"))
    assert jsons == ["c1", "c3", "c5"] and s["defective"] == 3
    assert s["median_above_threshold"] == 0 and not said
    drifted = run_predict(Ensemble([Pointwise(0, 5)], 1, 128, "cpu", "none"), images, tmp_path / "drift", PARAMS,
                          warn=said.append)  # every map at 5, above the threshold 0: told, in one line
    assert drifted["median_above_threshold"] == 6 and len(said) == 1 and "6 of 6 images" in said[0]
    m = record_to_mask(__import__("json").loads((out / "submission" / "c1.json").read_text()))
    assert m[64, 64] and m.sum() == pytest.approx(np.pi * 6.5**2, rel=0.2)  # the drawn disc of radius 6
    import zipfile

    with zipfile.ZipFile(out / "submission.zip") as z:  # the upload holds exactly the JSONs, byte for byte
        assert sorted(z.namelist()) == [f"data/TC_Images/{s}.json" for s in jsons]
        assert all(z.read(f"data/TC_Images/{s}.json") == (out / "submission" / f"{s}.json").read_bytes()
                   for s in jsons)
    assert (out / "scores.csv").read_text().count("\n") == 7
    before = {p.name: p.read_bytes() for p in (out / "submission").iterdir()}

    def boom(k):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_predict(Ensemble([Pointwise(0, 5)], 1, 128, "cpu", "none", batch_size=2), images, out, PARAMS,
                    progress=boom)
    after = {p.name: p.read_bytes() for p in (out / "submission").iterdir()}
    assert after == before  # the previous submission is intact, not half overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TC_Images", "drift", "pred"]  # no partial folder left
    with pytest.raises(KeyboardInterrupt):
        run_predict(ens, images, tmp_path / "fresh", PARAMS, progress=boom)
    assert not (tmp_path / "fresh").exists()


class Noisy(nn.Module):
    """A fixed random response per input (seeded by the image content), times `gain`, plus an optional bright
    response on pixels above 0.85: a stand-in for a model on normal variation with real detections on top."""

    def __init__(self, gain=1.0, offset=0.0, head=False, bright=12.0):
        super().__init__()
        self.gain, self.offset, self.head, self.bright = gain, offset, head, bright

    def forward(self, x):
        g = torch.Generator().manual_seed(int(x.sum() * 1000) % (2**31))
        noise = torch.nn.functional.avg_pool2d(torch.randn(x[:, :1].shape, generator=g), 5, 1, 2) * 3
        m = self.gain * (noise + self.bright * (x[:, :1] > 0.85).float()) + self.offset
        return {"mask": m, "image": m.amax((1, 2, 3))[:, None] if self.head else None}


def spotted(seed: int, defect: bool, level: int = 235, radius: int = 7):
    """A `textured` crop, with a round spot of grey `level` when `defect`, and its mask."""
    img = textured(seed, h=128, w=128).copy()
    m = np.zeros((128, 128), np.uint8)
    if defect:
        rng = np.random.default_rng(seed)
        cv2.circle(m, (int(rng.integers(20, 108)), int(rng.integers(20, 108))), radius, 1, -1)
        img[m > 0] = level
    return img, m


def test_target_false_alarm_rate_is_met_on_unseen_normal_crops():
    fit_on = [spotted(i, False)[0] for i in range(100)]
    unseen = [spotted(1000 + i, False)[0] for i in range(200)]
    syn = [spotted(2000 + i, True) for i in range(20)]
    syn = ([s[0] for s in syn], [s[1] for s in syn])
    for head in (False, True):
        # a model blind to the defects: the best it can do is flag as many images as the false-alarm budget allows
        blind = Ensemble([Noisy(head=head, bright=0.0)], 1, 128, "cpu", "none")
        rep = calibrate(blind, fit_on, syn, PARAMS, target_overkill=0.1)
        fit_rate = rep["report"]["normal_overkill"]
        assert 0.03 <= fit_rate <= 0.1
        flagged = [final_mask(r["map"], r["image"], rep["params"]).any() for r in blind.predict(unseen)]
        assert abs(np.mean(flagged) - fit_rate) <= 0.06, (head, np.mean(flagged))  # the same rate on new crops
        # a model that sees them: the budget is an upper bound, the defects are found
        ens = Ensemble([Noisy(head=head)], 1, 128, "cpu", "none")
        rep = calibrate(ens, fit_on, syn, PARAMS, target_overkill=0.1)
        flagged = [final_mask(r["map"], r["image"], rep["params"]).any() for r in ens.predict(unseen)]
        found = [final_mask(r["map"], r["image"], rep["params"]).any() for r in ens.predict(syn[0])]
        assert np.mean(flagged) <= 0.17 and np.mean(found) >= 0.9


class Graded(nn.Module):
    """Smooth noise plus a response that grows with how far a pixel is above the bright end of the texture: a
    faint defect gets a weak response, a strong one a strong response."""

    def forward(self, x):
        g = torch.Generator().manual_seed(int(x.sum() * 1000) % (2**31))
        noise = torch.nn.functional.avg_pool2d(torch.randn(x[:, :1].shape, generator=g), 5, 1, 2) * 3
        return {"mask": noise + 25 * torch.relu(x[:, :1] - 0.7), "image": None}


def test_spending_the_false_alarm_budget_finds_defects_fainter_than_the_synthetic_ones():
    normal = [spotted(i, False)[0] for i in range(100)]
    syn = [spotted(2000 + i, True) for i in range(30)]  # strong and large: caught at any sensible threshold
    syn = ([s[0] for s in syn], [s[1] for s in syn])
    unseen = [spotted(1000 + i, False)[0] for i in range(200)]
    faint = [spotted(3000 + i, True, 200, 2)[0] for i in range(60)]  # small and faint: the "real" defects
    out = {}
    for spend in (False, True):
        ens = Ensemble([Graded()], 1, 128, "cpu", "none")
        rep = calibrate(ens, normal, syn, PARAMS, target_overkill=0.05, spend_budget=spend)
        judged = [[final_mask(r["map"], r["image"], rep["params"]).any() for r in ens.predict(crops)]
                  for crops in (unseen, faint, syn[0])]
        out[spend] = (rep["report"]["normal_overkill"],) + tuple(float(np.mean(j)) for j in judged)
    (kept, kept_fa, kept_found, kept_syn), (spent, spent_fa, spent_found, spent_syn) = out[False], out[True]
    assert kept == kept_fa == kept_found == 0  # the budget left unspent: no false alarm, and every faint defect escapes
    assert 0 < spent <= 0.05 and spent_fa <= 0.1  # spent on the held-out crops, and about as much on unseen ones
    assert spent_found >= 0.3 and kept_syn == spent_syn == 1.0


def test_spending_the_budget_falls_back_to_the_whole_grid_when_no_point_spends_it():
    from ensemble.calibrate import operating_point

    ens = Ensemble([Graded()], 1, 128, "cpu", "none")
    normal = ens.predict([spotted(i, False)[0] for i in range(20)])
    images, masks = zip(*[spotted(2000 + i, True) for i in range(8)])
    synthetic = ens.predict(list(images))
    blind = ([np.zeros((128, 128), np.uint8)] * 20, None)  # an ROI that leaves every normal crop empty
    args = (normal, synthetic, list(masks), ens.rehit, 0, 0.05, blind)
    assert operating_point(*args, spend_budget=True) == operating_point(*args) is not None


def test_threshold_at_rate_flags_at_most_the_rate():
    ev = np.array([5.0, 4.0, 4.0, 3.0, -np.inf, 1.0, 0.5, 0.2, 0.1, 0.0])
    nonempty = np.isfinite(ev)
    for rate, flagged in ((0.0, 0), (0.1, 1), (0.2, 1), (0.4, 4), (0.9, 9), (1.0, 9)):
        tau = threshold_at_rate(ev, nonempty, rate)
        assert int(np.sum(nonempty & (ev >= tau))) == flagged, rate


def test_a_map_far_outside_a_probability_grid_gets_calibrated():
    normal = [spotted(i, False)[0] for i in range(40)]
    syn = [spotted(3000 + i, True) for i in range(20)]
    test = [spotted(4000 + i, i % 2 == 1) for i in range(20)]
    for gain, offset in ((1000.0, -30000.0), (1e-3, 50.0)):  # every pixel "probability" 0 or 1 on a 0.2-0.9 grid
        ens = Ensemble([Noisy(gain, offset)], 1, 128, "cpu", "none")
        rep = calibrate(ens, normal, ([s[0] for s in syn], [s[1] for s in syn]), PARAMS, target_overkill=0.05)
        pred = [final_mask(r["map"], r["image"], rep["params"]) for r in ens.predict([t[0] for t in test])]
        assert competition_score(pred, [t[1] for t in test])["score"] > 0.9, gain


def test_models_of_very_different_scales_get_comparable_maps():
    normal = [spotted(i, False)[0] for i in range(40)]
    ens = Ensemble([Noisy(1000.0, 300.0), Noisy(0.01, -2.0)], 1, 128, "cpu", "none")
    norms = fit_norms(ens, normal)
    ens.set_norms(norms)
    per_model = np.stack([r["per_model"] for r in ens.predict(normal)], 1)  # (M, N, H, W)
    q999 = [np.quantile(p, 0.999) for p in per_model]
    spread = [np.quantile(p, 0.999) - np.quantile(p, 0.5) for p in per_model]
    assert np.allclose(q999, 0, atol=0.05) and np.allclose(spread, 1, atol=0.05)
    img, m = spotted(7, True)
    r = ens.predict([img])[0]
    both = r["per_model"][:, m > 0].mean(1)
    assert both[0] == pytest.approx(both[1], rel=0.05)  # the same defect, the same standardised evidence


class Conv(nn.Module):
    """A seeded random conv net, per crop (no batch statistics), with an image head or none."""

    def __init__(self, seed: int, head: bool):
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.head = nn.Conv2d(1, 1, 5, padding=2), head

    def forward(self, x):
        m = self.conv(x)
        return {"mask": m, "image": m.amax((1, 2, 3))[:, None] if self.head else None}


def test_normal_crops_are_predicted_once_and_give_what_predict_gives():
    normal = [spotted(i, i % 3 == 0)[0] for i in range(10)]
    for heads in ((True, False), (True, True)):
        ens = Ensemble([Conv(0, heads[0]), Conv(1, heads[1])], 1, 128, "cpu", "flip,none", batch_size=4)
        norms, results = predict_normal(ens, normal)
        assert ens.norms == norms and norms[0]["image"] is not None and (norms[1]["image"] is None) != heads[1]
        assert norms == fit_norms(Ensemble([Conv(0, heads[0]), Conv(1, heads[1])], 1, 128, "cpu", "flip,none",
                                           batch_size=4), normal)
        again = ens.predict(normal)  # a second pass, with the normalisers set
        for r, a in zip(results, again):
            for k in ("map", "per_model", "hits"):
                np.testing.assert_allclose(r[k], a[k], atol=1e-5)
            assert (r["image"] is None) == (a["image"] is None) == (not all(heads))
            assert r["image"] is None or r["image"] == pytest.approx(a["image"], abs=1e-5)
        assert np.std([r["map"].max() for r in results]) > 0.005  # the maps differ from crop to crop
    ens = Ensemble([Conv(0, True)], 1, 96, "cpu", "none", batch_size=4)  # crops larger than the tile: tiled
    _, results = predict_normal(ens, normal)
    for r, a in zip(results, ens.predict(normal), strict=True):
        np.testing.assert_allclose(r["map"], a["map"], atol=1e-5)


def test_labelled_calibration_beats_the_defaults_and_is_the_oracle():
    images, gt = zip(*[spotted(i, i % 2 == 1) for i in range(16)])
    ens = Ensemble([Noisy(1.0, 4.0)], 1, 128, "cpu", "none")  # noisy: normal texture fires at logit 0
    rep = calibrate(ens, images[::2], None, PARAMS, 0.05, labelled=(list(images), list(gt)))
    default_masks = [final_mask(r["map"], r["image"], PARAMS) for r in ens.predict(list(images))]
    assert rep["mode"] == "labelled" and rep["report"]["score"] > competition_score(default_masks, list(gt))["score"]
    best = best_on_labelled(ens.predict(list(images)), list(gt), ens.rehit, 0)
    chosen = [final_mask(r["map"], r["image"], rep["params"]) for r in ens.predict(list(images))]
    assert competition_score(chosen, list(gt))["score"] == pytest.approx(best["score"]) and best["score"] > 0.95
    # fitted on one half, scored on the other: the thresholds carry over to crops they never saw
    half = calibrate(ens, images[:8:2], None, PARAMS, 0.05, labelled=(list(images[:8]), list(gt[:8])))
    unseen = [final_mask(r["map"], r["image"], half["params"]) for r in ens.predict(list(images[8:]))]
    default_unseen = [final_mask(r["map"], r["image"], PARAMS) for r in ens.predict(list(images[8:]))]
    assert competition_score(unseen, list(gt[8:]))["score"] > competition_score(default_unseen, list(gt[8:]))["score"]
    assert competition_score(unseen, list(gt[8:]))["score"] > 0.9


def spotted_folder(tmp_path, n: int):
    """n `spotted` crops (every other one defective) in TC_Images/, their masks in TC_Masks/ beside."""
    images, masks = tmp_path / "TC_Images", tmp_path / "TC_Masks"
    images.mkdir()
    masks.mkdir()
    for i in range(n):
        img, m = spotted(i, i % 2 == 1)
        cv2.imwrite(str(images / f"c{i}.bmp"), img)
        cv2.imwrite(str(masks / f"c{i}.png"), m * 255)
    return images


def test_auroc_from_stored_maps_equals_auroc_in_memory(tmp_path):
    images = spotted_folder(tmp_path, 8)
    ens = Ensemble([Noisy(1e4, -3e4)], 1, 128, "cpu", "none")  # huge logits: 8-bit probabilities would all tie
    run_predict(ens, images, tmp_path / "pred", PARAMS)
    _, _, gt = load_ground_truth(images)
    in_memory = [r["map"] for r in ens.predict([read_image(images / f"c{i}.bmp") for i in range(8)])]
    m = evaluate(tmp_path / "pred", images, tmp_path / "rep")
    flat_g = np.concatenate([g.ravel() > 0 for g in gt])
    assert m["pixel_auroc"] == roc_auc(np.concatenate([x.ravel() for x in in_memory]), flat_g)
    assert m["pixel_ap"] == average_precision(np.concatenate([x.ravel() for x in in_memory]), flat_g)
    # the oracle (best thresholds on these crops) is never below the calibrated score, and reaches 1 here
    assert m["oracle_score"] == pytest.approx(1.0) and m["calibration_loss"] >= 0


def test_evaluate_writes_json_markdown_and_html(tmp_path):
    src = SAMPLE / "round_test/part1"
    pred = tmp_path / "pred" / "submission"
    pred.mkdir(parents=True)
    for j in (src / "TC_Labels").glob("*.json"):
        shutil.copy(j, pred / j.name)
    m = evaluate(tmp_path / "pred", src / "TC_Images", tmp_path / "report")
    assert m["score"] == pytest.approx(1.0) and m["overkill"] == 0 and m["escape"] == 0
    assert "| model | 1.000 |" in (tmp_path / "report" / "eval.md").read_text()
    assert (tmp_path / "report" / "eval.html").read_text().count("<img") >= 12
    # a prediction that misses everything: each defective crop escapes
    (tmp_path / "none").mkdir()
    assert evaluate(tmp_path / "none", src / "TC_Images", tmp_path / "r2")["score"] == pytest.approx(0.3)


def test_pixel_and_image_metrics_rank_a_perfect_probability_map_first():
    _, _, gt = load_ground_truth(SAMPLE / "round_test/part1/TC_Images")
    probs = [g.astype(np.float32) * 0.9 + 0.05 for g in gt]
    m = compute_metrics(gt, gt, probs, [float(g.any()) for g in gt])
    assert m["pixel_auroc"] == pytest.approx(1.0) and m["pixel_ap"] == pytest.approx(1.0)
    assert m["image_auroc"] == pytest.approx(1.0)
    img = read_image(SAMPLE / "round_test/part1/TC_Images" / "0FwKHTAgOaO3gLMsJD5URzAO77Ybr8.bmp")
    assert img.shape == (128, 128)


def test_predict_roi_auto_keeps_masks_inside_each_images_bright_part(tmp_path):
    images = tmp_path / "TC_Images"
    images.mkdir()
    img = np.full((128, 128), 200, np.uint8)
    img[:, :40] = 20  # dark background at the left edge: outside the part
    cv2.circle(img, (90, 64), 6, 30, -1)  # a dark pit on the part
    cv2.imwrite(str(images / "a.bmp"), img)
    ens = Ensemble([Pointwise(-40, 8)], 1, 128, "cpu", "none")  # fires on every dark pixel
    run_predict(ens, images, tmp_path / "plain", PARAMS)
    run_predict(ens, images, tmp_path / "roi", PARAMS, roi="auto")
    plain = cv2.imread(str(tmp_path / "plain" / "masks" / "a.png"), 0) > 0
    roi = cv2.imread(str(tmp_path / "roi" / "masks" / "a.png"), 0) > 0
    assert plain[:, :40].all() and not roi[:, :40].any()
    assert roi[64, 90] and roi.sum() == pytest.approx(np.pi * 36, rel=0.35)


def test_non_utf8_names_reach_the_zip_and_evaluation_as_text(tmp_path):
    import os
    import zipfile

    from ensemble.evaluate import load_predictions
    from ensemble.submission import text_name, write_zip

    sub = tmp_path / "pred" / "submission"
    sub.mkdir(parents=True)
    raw = os.fsdecode(b"odd_\xff")  # what the OS gives for a name that is not UTF-8
    mask = np.zeros((4, 4), np.uint8)
    mask[1, 2] = 1
    (sub / f"{raw}.json").write_text(__import__("json").dumps(mask_to_record(mask, text_name(raw))))
    write_zip(sub, tmp_path / "pred" / "submission.zip", "data/TC")
    assert zipfile.ZipFile(tmp_path / "pred" / "submission.zip").namelist() == ["data/TC/odd_\\xff.json"]
    (tmp_path / "pred" / "scores.csv").write_text(f"stem,image_score\n{text_name(raw)},2.5\n")
    masks, _, scores = load_predictions(tmp_path / "pred", [raw], [(4, 4)])
    assert scores == {raw: 2.5} and np.array_equal(masks[0], mask)


def test_predict_leaves_the_folders_of_a_live_run_alone(tmp_path):
    import os
    import subprocess
    import sys

    from ensemble.predict import recover

    out = tmp_path / "pred"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mine = tmp_path / f".pred.partial-{live.pid}"
        dead = tmp_path / ".pred.partial-999999999"
        old = tmp_path / ".pred.old-999999998"
        for d in (mine, dead, old):
            d.mkdir()
        recover(out)
        assert mine.exists() and not dead.exists() and not old.exists() and out.exists()  # the old one put back
    finally:
        live.kill()
        live.wait()
    assert os.path.isdir(out)


def test_whole_image_windows_with_a_large_overlap_do_not_crash():
    ens = Ensemble([Convolutional()], 1, 128, "cpu", "none", tile_overlap=96, window=128)
    assert ens.predict([textured(3, h=300, w=400)])[0]["map"].shape == (300, 400)


def test_calibration_synthesis_leaves_transplanted_defects_out(ok_dir, tmp_path):
    """A model trained with `synth.transplant` calibrates on another machine, where that folder is not."""
    from ensemble.calibrate import synthetic_defects
    from synth.engine import SourcePool, SynthConfig

    synth = SynthConfig().to_dict()
    synth.update(transplant=str(tmp_path / "gone"), families={**synth["families"], "transplant": 1.5})
    images, masks = synthetic_defects({"synth": synth}, SourcePool(ok_dir), 6, seed=0)
    assert len(images) == 6 and all(m.any() for m in masks)


def _blob_and_outline(segmenter_sees: bool):
    """Two standardised maps: a broad blob (a feature-distance model) and, when `segmenter_sees`, a sharp 6x6
    outline of the defect inside it (the segmenter)."""
    per_model = np.full((2, 64, 64), -2.0, np.float32)
    per_model[1, 10:30, 10:30] = 3.0
    if segmenter_sees:
        per_model[0, 16:22, 16:22] = 3.0
    return per_model


def test_a_flagged_mask_is_trimmed_to_where_the_models_agree_and_kept_where_only_one_sees():
    from core.postprocess import agreement

    p = {"threshold": 0.0, "image_threshold": -1e30, "min_area": 3, "opening": 0}
    for sees, area in ((True, 36), (False, 400)):
        per_model = _blob_and_outline(sees)
        amap = per_model.mean(0)  # the merged map: the blob stands above 0 everywhere
        merged = final_mask(amap, None, p)
        trimmed = final_mask(amap, None, p, gate=agreement(per_model, [1.0, 1.0]))
        assert merged.sum() == 400 and trimmed.sum() == area and not (trimmed & ~merged.astype(bool)).any()
    # the decision is the merged map's: a crop judged normal stays empty, trimmed or not
    per_model = _blob_and_outline(True)
    strict = {**p, "image_threshold": 10.0}
    assert not final_mask(per_model.mean(0), None, strict, gate=agreement(per_model, [1.0, 1.0])).any()
    assert agreement(per_model, None) is None
    with pytest.raises(InputError, match="2 models"):
        agreement(per_model, [1.0])


def test_the_search_scores_trimmed_masks_exactly_as_final_mask_makes_them():
    """`best_on_labelled` and the calibration search take IoUs from connected components (`_Components`): with an
    agreement mask and with the cut towards each component's peak (`peak_frac`, measured from the threshold or from
    the map's median, `median_base`), alone and together, they must equal the IoU of what `final_mask` writes, at
    every threshold and min_area."""
    from core.metrics import iou
    from core.postprocess import agreement, outline_level
    from ensemble.calibrate import FLAG_ALL, MIN_AREAS, _Components

    rng = np.random.default_rng(0)
    checked, cut_moved, median_moved = 0, 0, 0
    for i, median in zip(range(6), (False, True) * 3):
        per_model = np.stack([cv2.GaussianBlur(rng.normal(size=(64, 64)).astype(np.float32), (0, 0), 3) * 8
                              for _ in range(2)])
        gt = np.zeros((64, 64), np.uint8)
        cv2.circle(gt, (int(rng.integers(16, 48)), int(rng.integers(16, 48))), 8, 1, -1)
        amap = per_model.mean(0)
        for gate in (agreement(per_model, [0.2, 0.5]), None):
            for frac in (0.0, 0.5):
                for thr in (-0.5, 0.0, 0.5, 1.0):
                    level = outline_level(amap, {"median_base": median})
                    comps = _Components({"map": amap, "image": None}, (amap >= thr).astype(np.uint8), 0, None, gt,
                                        gate, thr, frac, level)
                    for area in MIN_AREAS:
                        nonempty, _, fast = comps.select(area)
                        p = {"threshold": thr, "image_threshold": FLAG_ALL, "min_area": area, "opening": 0,
                             "peak_frac": frac, "median_base": median}
                        slow = final_mask(amap, None, p, gate=gate)
                        assert nonempty == slow.any()
                        if nonempty:
                            assert fast == pytest.approx(iou(slow, gt)), (i, thr, area, frac, gate is None)
                            checked += 1
                            uncut = final_mask(amap, None, {**p, "peak_frac": 0.0}, gate=gate)
                            cut_moved += int(frac > 0 and slow.sum() < uncut.sum())
                            from_thr = final_mask(amap, None, {**p, "median_base": False}, gate=gate)
                            median_moved += int(median and not np.array_equal(slow, from_thr))
    assert checked > 200 and cut_moved > 50 and median_moved > 10


def test_the_cut_towards_the_peak_takes_a_strong_defects_halo_off_its_mask():
    """Two blurred squares of 16 x 16 px, one faint, one four times stronger, and a threshold at the faint one's half
    height: the strong one's mask swells with its halo; cut at half its height above the threshold, it comes back
    near its true outline, and the faint one keeps most of itself."""
    from core.metrics import iou
    from core.postprocess import to_peak

    truth = np.zeros((96, 96), np.float32)
    truth[20:36, 20:36] = 1.0
    truth[60:76, 60:76] = 4.0
    amap = cv2.GaussianBlur(truth, (0, 0), 3) - 0.5  # background -0.5; threshold 0: the faint one's half height
    mask = (amap >= 0).astype(np.uint8)
    cut = to_peak(mask, amap, 0.0, 0.5)
    faint, strong = (slice(0, 48), slice(0, 48)), (slice(48, 96), slice(48, 96))
    gt = (truth > 0).astype(np.uint8)
    assert iou(mask[strong], gt[strong]) < 0.6 and iou(cut[strong], gt[strong]) > 0.7  # 0.57 -> 0.78
    assert cut[faint].sum() > 0.5 * mask[faint].sum()
    assert not (cut & ~mask.astype(bool)).any()  # a cut only removes pixels
    assert np.array_equal(to_peak(mask, amap, 0.0, 0.0), mask)
    for region in (faint, strong):  # each component keeps its peak pixel
        sub = amap[region]
        y, x = np.unravel_index(np.argmax(sub), sub.shape)
        assert cut[region][y, x] == 1


def test_the_cut_keeps_every_component_of_a_vote_and_ignores_nan():
    """A k-of-n vote's hits can lie far below the pixel threshold on the mean map: the cut then measures the height
    from the component's lowest value, so it keeps a part of the component around its peak, not one pixel; NaN
    pixels are dropped without taking their component's peak with them."""
    from core.postprocess import to_peak

    yy, xx = np.mgrid[:32, :32]
    amap = (-4.0 + 3.0 * np.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / 60.0)).astype(np.float32)  # peaks at -1
    hits = np.zeros((32, 32), np.uint8)
    hits[8:25, 8:25] = 1  # a vote's component, every pixel under the threshold 0 of the mean map
    cut = to_peak(hits, amap, 0.0, 0.5)
    assert cut[16, 16] == 1 and 20 < cut.sum() < hits.sum()
    amap[16, 17] = np.nan  # inside the component
    cut = to_peak(hits, amap, 0.0, 0.5)
    assert cut[16, 16] == 1 and cut[16, 17] == 0 and cut.sum() > 20
    assert to_peak(hits, amap, -np.inf, 0.5).sum() >= 1  # a threshold of -inf: no NaN floor, the mask is kept


def test_a_level_above_the_threshold_measures_the_components_that_reach_it_and_leaves_the_others():
    """`to_peak`'s `outline` (the image's median, `outline_level`): a component whose peak reaches that level is
    cut exactly as the mask found at that level would be; one below it keeps its cut from the threshold; a level
    at or below the threshold, or None, changes nothing."""
    from core.postprocess import to_peak

    truth = np.zeros((96, 96), np.float32)
    truth[20:36, 20:36] = 0.3  # faint: its peak (about -0.2) lies between the two thresholds
    truth[60:76, 60:76] = 4.0
    amap = cv2.GaussianBlur(truth, (0, 0), 3) - 0.5
    lo, hi = -0.4, 0.0
    low, high = (amap >= lo).astype(np.uint8), (amap >= hi).astype(np.uint8)
    faint, strong = (slice(0, 48), slice(0, 48)), (slice(48, 96), slice(48, 96))
    assert low[faint].any() and not high[faint].any()
    for frac in (0.0, 0.5):
        cut = to_peak(low, amap, lo, frac, hi)
        assert np.array_equal(cut[strong], to_peak(high, amap, hi, frac)[strong])
        assert np.array_equal(cut[faint], to_peak(low, amap, lo, frac)[faint])
        assert cut[strong].sum() < to_peak(low, amap, lo, frac)[strong].sum()
        for same in (None, lo, lo - 1.0):
            assert np.array_equal(to_peak(low, amap, lo, frac, same), to_peak(low, amap, lo, frac))


def test_an_image_whose_map_lies_above_the_threshold_is_outlined_from_its_own_median():
    """A test image whose whole map has drifted above the calibrated pixel threshold (its background unlike the
    held-out normal crops'): measured from the threshold, the defect's component spreads over the background and
    its cut at half height keeps the background's texture; measured from the image's median (`median_base`), the
    cut comes back near the defect. Where the median lies below the threshold (the usual image), nothing changes."""
    from core.metrics import iou
    from ensemble.calibrate import FLAG_ALL

    truth = np.zeros((96, 96), np.float32)
    truth[40:56, 40:56] = 1.0
    gt = (truth > 0).astype(np.uint8)
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.normal(size=(96, 96)).astype(np.float32), (0, 0), 2)
    texture *= 0.3 / texture.std()
    p = {"threshold": 0.0, "image_threshold": FLAG_ALL, "min_area": 0, "opening": 0, "peak_frac": 0.5}
    drifted = cv2.GaussianBlur(truth, (0, 0), 2) + texture + 0.8  # the background at 0.8, above the threshold 0
    plain, from_median = (final_mask(drifted, None, {**p, "median_base": m}) for m in (False, True))
    assert plain.mean() > 0.1 and iou(plain, gt) < 0.3  # the texture of the drifted background: 0.20
    assert iou(from_median, gt) > 0.6 and not (from_median & ~plain.astype(bool)).any()  # 0.69
    usual = cv2.GaussianBlur(truth, (0, 0), 2) + texture - 0.8  # the background below the threshold
    assert np.array_equal(final_mask(usual, None, {**p, "median_base": True}), final_mask(usual, None, p))


def _dark_disc_under_a_broad_map(n: int = 128, centre=(64, 60), seed: int = 0):
    """A gray image of noise around 128 with a disc of radius 8 darker by 50, and a map that sees it as a broad
    blob (sigma 14 px, as a feature distance spreads a defect over a backbone's receptive field): (image, truth,
    map); the threshold 0 lies at a third of the blob's height."""
    rng = np.random.default_rng(seed)
    img = 128 + rng.normal(0, 8, (n, n))
    gt = np.zeros((n, n), np.uint8)
    cv2.circle(gt, centre, 8, 1, -1)
    img[gt > 0] -= 50
    yy, xx = np.mgrid[:n, :n]
    amap = 3 * np.exp(-((yy - centre[1]) ** 2 + (xx - centre[0]) ** 2) / (2 * 14.0 ** 2)) - 1
    return np.clip(img, 0, 255).astype(np.uint8), gt, amap.astype(np.float32)


def test_a_flagged_outline_is_redrawn_on_the_image_by_a_graph_cut():
    """A strong defect under a broad map: cut at half height, its mask is still the blob's (IoU 0.40); redrawn on
    the image (`predict.grabcut`: each component's pixels 0.75 of the way to its peak sure defect), it comes back
    to the disc (0.89). The core always stays, nothing grows beyond the band around the mask, gray and BGR images
    give the same outline, it is the same every time, and without the image or with grabcut 0 nothing changes."""
    from core.metrics import iou
    from core.postprocess import GRABCUT_RING, postprocess, to_peak
    from ensemble.calibrate import FLAG_ALL

    img, gt, amap = _dark_disc_under_a_broad_map()
    p = {"threshold": 0.0, "image_threshold": FLAG_ALL, "min_area": 0, "opening": 0, "peak_frac": 0.5,
         "median_base": True, "grabcut": 0.75}
    cut = final_mask(amap, None, {**p, "grabcut": 0.0}, pixels=img)
    drawn = final_mask(amap, None, p, pixels=img)
    assert iou(cut, gt) < 0.45 and iou(drawn, gt) > 0.8  # 0.40 and 0.89
    def band(outline):
        return cv2.dilate(outline, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)), iterations=GRABCUT_RING)

    core = to_peak(postprocess(amap, 0.0), amap, 0.0, 0.75).astype(bool)
    assert core.any() and drawn[core].all() and not (drawn.astype(bool) & (band(cut) == 0)).any()
    # a drifted map, above the threshold over the whole image (measured from its median): the band follows the
    # outline, not the whole-image mask, so the cut still has normal pixels to learn from and does not spread
    drifted_cut = final_mask(amap + 1.5, None, {**p, "grabcut": 0.0}, pixels=img)
    drifted = final_mask(amap + 1.5, None, p, pixels=img)
    assert postprocess(amap + 1.5, 0.0).all() and not (drifted.astype(bool) & (band(drifted_cut) == 0)).any()
    assert iou(drifted, gt) > iou(drifted_cut, gt)
    roi = np.zeros_like(gt)
    roi[:, :64] = 1  # the left half: the disc's right half lies outside, and so stays
    assert not final_mask(amap, None, p, roi=roi, pixels=img)[:, 64:].any()
    assert np.array_equal(drawn, final_mask(amap, None, p, pixels=cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)))
    assert np.array_equal(drawn, final_mask(amap, None, p, pixels=img))
    assert np.array_equal(final_mask(amap, None, p), cut)  # no image: the cut as before
    # a large image with the same defect far from its corner: cut on its own window, the same outline
    big_img, big_gt, big_map = _dark_disc_under_a_broad_map(1000, (700, 650))
    big = final_mask(big_map, None, p, pixels=big_img)
    assert iou(big, big_gt) > 0.8 and not big[:500].any()
    # two models' maps of the same image judged as one (`best_on_labelled`, the oracle's and `--val-dir`'s search):
    # the point is chosen before the graph cut, its score is that of the masks prediction writes with it
    normal_img, normal_gt, normal_map = _dark_disc_under_a_broad_map(seed=1)
    results = [{"map": amap, "image": None, "pixels": img}, {"map": normal_map - 1.5, "image": None,
                                                                "pixels": normal_img}]
    truth = [gt, np.zeros_like(gt)]
    rehit = lambda r, t: (r["map"] >= t).astype(np.uint8)  # noqa: E731
    plain = best_on_labelled(results, truth, rehit, 0, peak_frac=0.5, median_base=True)
    drawn_best = best_on_labelled(results, truth, rehit, 0, peak_frac=0.5, median_base=True, grabcut=0.75)
    point = {k: drawn_best[k] for k in ("threshold", "min_area", "image_threshold")}
    assert point == {k: plain[k] for k in point} and drawn_best["escape"] == plain["escape"] == 0
    written = [final_mask(r["map"], None, {**p, **point}, pixels=r["pixels"]) for r in results]
    assert drawn_best["miou"] == pytest.approx(competition_score(written, truth)["miou"])
    assert not np.array_equal(written[0], final_mask(amap, None, {**p, **point, "grabcut": 0.0}))  # rescored


def test_the_oracle_redraws_outlines_on_each_crops_own_image_read_as_prediction_read_it(tmp_path):
    """The oracle's graph cut sees what prediction's saw: each stem's own image (not the n-th of the folder) in the
    model's channels (`predict.json`'s "channels"). Crop `a` has a disc that differs from its surroundings in colour
    only (the same grey level): on the colour image the cut finds it, on the gray one it cannot."""
    from core.metrics import iou
    from ensemble.evaluate import oracle

    gray, gt, amap = _dark_disc_under_a_broad_map()
    colour = cv2.cvtColor(np.full_like(gray, 128), cv2.COLOR_GRAY2BGR)
    colour[gt > 0] = (200, 77, 200)  # BGR of grey level 128: invisible in gray
    assert abs(int(cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)[gt > 0].mean()) - 128) <= 1
    images, pred = tmp_path / "images", tmp_path / "pred"
    (pred / "maps").mkdir(parents=True)
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), colour)
    cv2.imwrite(str(images / "b.png"), gray)
    for stem in ("a", "b"):
        np.save(pred / "maps" / f"{stem}.npy", amap)
    (pred / "scores.csv").write_text("stem,image_head\na,\nb,\n")
    params = {"threshold": 0.0, "image_threshold": 0.0, "min_area": 0, "opening": 0, "peak_frac": 0.5,
              "median_base": True, "grabcut": 0.75}
    rehit = lambda r, t: (r["map"] >= t).astype(np.uint8)  # noqa: E731

    def read_as(channels, stems):
        (pred / "predict.json").write_text(json.dumps({"params": params, "channels": channels, "merge": "mean"}))
        return oracle(pred, images, stems, [gt] * len(stems))["miou"]

    def best(pixels, key="miou"):
        found = best_on_labelled([{"map": amap, "image": None, "pixels": pixels}], [gt], rehit, 0, None, [0.0],
                                 peak_frac=0.5, median_base=True, grabcut=0.75,
                                 also={k: params[k] for k in ("threshold", "min_area", "image_threshold")})
        return found[key] if key else found

    on_colour, on_gray = best(read_image(images / "a.png", 3)), best(read_image(images / "a.png", 1))
    assert on_colour > 0.95 and on_colour > on_gray + 0.1  # 1.0 and 0.86
    found = best(read_image(images / "a.png", 3), None)
    point = {k: found[k] for k in ("threshold", "min_area", "image_threshold")}
    drawn = final_mask(amap, None, {**params, **point}, pixels=read_image(images / "a.png", 3))
    assert iou(drawn, gt) == pytest.approx(on_colour)  # what prediction writes at that point
    assert read_as(3, ["a", "b"]) > read_as(1, ["a", "b"])
    assert read_as(3, ["a"]) == pytest.approx(on_colour) and read_as(1, ["a"]) == pytest.approx(on_gray)
    # only crop b scored: its own image, the dark disc, not the folder's first (a)
    on_b = best(read_image(images / "b.png", 1))
    assert read_as(1, ["b"]) == pytest.approx(on_b) and abs(on_b - on_gray) > 0.05


def test_the_calibration_sheet_draws_the_normal_crops_as_prediction_would(monkeypatch):
    """The held-out normal crops come from one pass of the networks (`predict_normal`), without their images; the
    sheet still draws each flagged one with the outline prediction would write (the graph cut on the crop)."""
    import ensemble.calibrate as calibrate_module

    img, gt, amap = _dark_disc_under_a_broad_map()
    p = {"threshold": 0.0, "image_threshold": 0.0, "min_area": 0, "opening": 0, "peak_frac": 0.5,
         "median_base": True, "grabcut": 0.75}
    drawn = []
    monkeypatch.setattr(calibrate_module, "outline", lambda image, mask, *a: drawn.append(mask) or
                        cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    shown = calibrate_module.calibration_sheet(
        None, lambda r, t: (r["map"] >= t).astype(np.uint8), p, ([img], [{"map": amap, "image": None}], None, None),
        ([], [], None, []), 1)
    assert shown[0]["flagged"] and np.array_equal(drawn[0], final_mask(amap, None, p, pixels=img))
    assert not np.array_equal(drawn[0], final_mask(amap, None, p))  # not the outline before the graph cut


def test_member_thresholds_move_each_models_own_threshold_to_the_ensembles_scale():
    from ensemble.calibrate import FLAG_ALL, member_thresholds

    ens = Ensemble([Pointwise(), Pointwise(16.0, -8.0)], 1, 128, "cpu", "none")
    norms = [{"pixel": [1.0, 2.0], "image": None}, {"pixel": [-1.0, 4.0], "image": None}]
    assert member_thresholds(ens, norms) is None  # files without their own calibration: no trimming
    ens.member_calibrations = [{"norm": {"pixel": [0.0, 1.0]}, "params": {"threshold": 3.0}},
                               {"norm": {"pixel": [2.0, 0.5]}, "params": {"threshold": -2.0}}]
    # raw thresholds 3.0 and 1.0, on the ensemble's scale (3 - 1) / 2 and (1 + 1) / 4
    assert member_thresholds(ens, norms) == pytest.approx([1.0, 0.5])
    muted = Ensemble([Pointwise(), Pointwise(16.0, -8.0)], 1, 128, "cpu", "none", weights=[1.0, 0.0])
    muted.member_calibrations = ens.member_calibrations
    assert member_thresholds(muted, norms) == pytest.approx([1.0, FLAG_ALL])  # weight 0: it trims nothing
    single = Ensemble([Pointwise()], 1, 128, "cpu", "none")
    single.member_calibrations = ens.member_calibrations[:1]
    assert member_thresholds(single, norms[:1]) is None


def test_a_trimming_ensemble_stores_its_agreement_and_the_oracle_needs_it(tmp_path):
    images = spotted_folder(tmp_path, 6)
    ens = Ensemble([Pointwise(), Pointwise(16.0, -8.0)], 1, 128, "cpu", "none")
    params = {**PARAMS, "shape": [0.5, 0.5]}
    run_predict(ens, images, tmp_path / "pred", params)
    gates = sorted((tmp_path / "pred" / "gates").iterdir())
    assert len(gates) == 6 and all(read_image(g).max() in (0, 255) for g in gates)
    m = evaluate(tmp_path / "pred", images, tmp_path / "rep")
    assert m["oracle_score"] >= m["score"] - 1e-9
    shutil.rmtree(tmp_path / "pred" / "gates")  # a folder copied without them: the oracle cannot say
    assert "oracle_score" not in evaluate(tmp_path / "pred", images, tmp_path / "rep2")


def test_calibration_draws_its_defects_with_the_sizes_the_model_trained_on(ok_dir):
    """`synth.sizes` reaches calibration: with `log` (every scale in the synthesis' ranges as likely) its
    synthetic defects are smaller than with the default uniform draw, from the same seed."""
    from ensemble.calibrate import synthetic_defects
    from seg.config import load_config
    from synth.engine import SourcePool

    area = {}
    for sizes in ("log", "uniform"):
        cfg = load_config(None, [f"data.ok_dir={ok_dir}", f"synth.sizes={sizes}"])
        _, masks = synthetic_defects(cfg, SourcePool(ok_dir), 64, 0)
        area[sizes] = np.exp(np.mean(np.log([m.sum() for m in masks])))  # the geometric mean area
    assert area["log"] < 0.85 * area["uniform"], area  # measured: 0.70 at this seed


# ------------------------------------------------------------------------------------------------ probe
class DarkDetector(nn.Module):
    """Flags pixels more than 15 grey levels darker than their 21x21 neighbourhood: a detector with a known limit."""

    def forward(self, x):
        g = x[:, :1] * 255
        m = torch.nn.functional.avg_pool2d(g, 21, 1, 10, count_include_pad=False) - g - 15
        return {"mask": m, "image": None}


class Corner(nn.Module):
    """Fires on a 4x4 corner of every image, whatever it shows."""

    def forward(self, x):
        m = torch.full_like(x[:, :1], -5.0)
        m[..., :4, :4] = 5.0
        return {"mask": m, "image": None}


def test_probe_lines_follow_the_texture_of_each_crop():
    """On the tile-like test images (vertical streaks), the probe's lines along the texture are vertical and the ones
    across it horizontal."""
    from ensemble.probe import run_probe

    ens = Ensemble([Corner()], 1, 128, "cpu", "none")
    crops = [textured(i)[:128, 40:168].copy() for i in range(3)]
    p = {"threshold": 0.0, "image_threshold": -1e30, "min_area": 5, "opening": 0}
    res = run_probe(ens, p, crops, sizes={"spot": (6,), "line": (2,)}, contrasts=(30,))
    for kind, steep in (("line along", True), ("line across", False)):
        ys, xs = np.nonzero(res["examples"][kind, 2.0, 30.0][2] >= 0.5)
        assert (np.ptp(ys) > 4 * np.ptp(xs)) if steep else (np.ptp(xs) > 4 * np.ptp(ys)), kind


def test_probe_shapes_are_the_sizes_asked_and_lie_inside_the_crop():
    from ensemble.probe import probe_profile

    rng = np.random.default_rng(0)
    for d in (3, 6, 12):
        p = probe_profile(128, "spot", d, rng, 0.0)
        assert abs((p >= 0.5).sum() - math.pi * d * d / 4) <= 0.35 * math.pi * d * d / 4 + 2
    for w in (1, 2, 4):
        for kind, want in (("line along", 90.0), ("line across", 0.0)):
            p = probe_profile(128, kind, w, rng, math.pi / 2)  # the texture runs vertically (image y)
            m = (p >= 0.5).astype(np.uint8)
            (_, _), (a, b), ang = cv2.minAreaRect(cv2.findNonZero(m))
            assert abs(max(a, b) - 64) <= 3 and abs(min(a, b) - w) <= 1.5, (kind, w, a, b)
            ys, xs = np.nonzero(m)
            steep = math.degrees(math.atan2(np.ptp(ys), np.ptp(xs)))
            assert abs(steep - want) < 10, (kind, steep)
            assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())


def test_probe_finds_a_detector_s_limit_and_its_polarity(tmp_path):
    """A detector that flags pixels 15 grey levels darker than their 21x21 mean: it catches every dark probe of 30
    grey levels and none of 10, nor any bright probe; bare crops raise no alarm."""
    from ensemble.probe import report_markdown, run_probe, write_report

    ens = Ensemble([DarkDetector()], 1, 128, "cpu", "none")
    crops = [np.clip(np.random.default_rng(i).normal(120, 2, (128, 128)), 0, 255).astype(np.uint8) for i in range(6)]
    p = {"threshold": 0.0, "image_threshold": -1e30, "min_area": 5, "opening": 0}
    sizes = {"spot": (6,), "line": (2,)}
    dark = run_probe(ens, p, crops, polarity="dark", sizes=sizes, contrasts=(10, 30))
    assert dark["false_alarm"] == 0.0
    caught = {(r["kind"], r["contrast"]): r["caught"] for r in dark["cells"]}
    for kind in ("spot", "line along", "line across"):
        assert caught[kind, 10.0] == 0.0 and caught[kind, 30.0] == 1.0, caught
    bright = run_probe(ens, p, crops, polarity="bright", sizes=sizes, contrasts=(40,))
    assert all(r["caught"] == 0.0 for r in bright["cells"])
    again = run_probe(ens, p, crops, polarity="dark", sizes=sizes, contrasts=(30,))
    for kind, size in (("spot", 6.0), ("line along", 2.0), ("line across", 2.0)):  # seeded: the same places, and
        same = again["examples"][kind, size, 30.0][2]  # the same at every contrast of a (kind, size)
        assert np.array_equal(same, dark["examples"][kind, size, 30.0][2])
        assert np.array_equal(same, dark["examples"][kind, size, 10.0][2])
    assert "| 30 | 100 % |" in report_markdown(dark, "test")
    corner = Ensemble([Corner()], 1, 128, "cpu", "none")  # flags every crop, never where the probe is
    elsewhere = run_probe(corner, p, crops, sizes=sizes, contrasts=(30,))
    assert elsewhere["false_alarm"] == 1.0 and all(r["flagged"] == 1 and r["caught"] == 0 for r in elsewhere["cells"])
    paths = write_report(dark, tmp_path / "probe", "test")
    assert paths["picture"].read_bytes()[:4] == b"\x89PNG" and "caught" in paths["json"].read_text()


def test_cli_probe_reports_a_fitted_model_and_refuses_bad_contrasts_in_one_line(tmp_path):
    import cli
    from typer.testing import CliRunner
    from conftest import tiny_patchcore_args, write_ok_images
    from core.modelfile import load_model_file, save_model_file

    run = CliRunner()
    ok = write_ok_images(tmp_path / "ok", 5)
    r = run.invoke(cli.app, [*tiny_patchcore_args(ok), "-o", str(tmp_path / "pc.pt")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "probe"
    r = run.invoke(cli.app, ["ensemble", "probe", "-m", str(tmp_path / "pc.pt"), "--n", "8", "--contrasts", "60",
                             "-o", str(out)])
    assert r.exit_code == 0, r.output
    md = (out / "probe.md").read_text()
    assert all(f"## {k}" in md for k in ("spot", "line along", "line across")) and "| 60 |" in md
    assert len(json.loads((out / "probe.json").read_text())["cells"]) == 9
    bare = load_model_file(tmp_path / "pc.pt")
    del bare["calibration"]
    save_model_file(tmp_path / "bare.pt", bare)
    for model, bad in (("pc.pt", ["--contrasts", "10,abc"]), ("pc.pt", ["--contrasts", "300"]),
                       ("pc.pt", ["--polarity", "grey"]), ("bare.pt", [])):
        r = run.invoke(cli.app, ["ensemble", "probe", "-m", str(tmp_path / model), *bad, "-o", str(out)])
        assert r.exit_code == 2 and r.output.count("\n") == 1 and "error:" in r.output, r.output
    assert "carries no calibration" in r.output
