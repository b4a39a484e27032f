"""ONNX export: every model kind (UNet, UNet 3+, evidence UNet, PatchCore, SimpleNet) in one ensemble with flip TTA
gives the PyTorch maps within 1e-4 and the same submission, and so do PaDiM (1e-4) and the SSIM-AE (1e-3); the CLI path
(`seg export`, `ensemble predict --backend onnx`) writes the same files, up to pixels tied with a threshold; a file
that is not an export is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import textured, tiny_patchcore_args, write_ok_images, write_test_crops
from typer.testing import CliRunner

import cli
import baseline  # noqa: F401  (registers padim, patchcore, ssim_ae)
from core.io import InputError, find_images, read_image, write_json
from core.modelfile import load_model_file
from ensemble.export import OnnxEnsemble, export_onnx
from core.postprocess import final_mask
from ensemble.models import Ensemble, build_ensemble
from ensemble.predict import run_predict
from seg.models import create_model
from synth.dataset import crops_tensor
from synth.engine import SourcePool

SMALL = dict(decoder_channels=(32, 16, 16, 8, 8))
PARAMS = {"threshold": 0.5, "image_threshold": -1.0, "min_area": 3, "opening": 0}


def crops_with_pits(n: int) -> list[np.ndarray]:
    out = []
    for i in range(n):
        img = textured(30 + i)[:128, :128].copy()
        if i % 2:
            cv2.circle(img, (40 + 5 * i, 60), 6, 12, -1)
        out.append(img)
    return out


def test_every_model_kind_exports_with_flip_tta_and_gives_the_same_maps_and_submission(ok_dir, tmp_path):
    torch.manual_seed(0)
    pool = SourcePool(ok_dir)
    normal = crops_tensor(pool.random_crops(16, 0))
    unet = create_model("unet", "tu-tf_efficientnet_lite0", "none", 1, **SMALL)
    u3 = create_model("unet3plus", "tu-tf_efficientnet_lite0", "none", 1, **SMALL)
    ev = create_model("evidence_unet", "tu-tf_efficientnet_lite0", "lite", 1, **SMALL)
    ev.fit_normal(normal, crops_tensor(pool.random_crops(8, 1)))
    sn = create_model("simplenet", "tu-tf_efficientnet_lite0", "lite", 1, **SMALL)
    rn = create_model("realnet", "tu-tf_efficientnet_lite0", "lite", 1, **SMALL)
    pits = crops_tensor(crops_with_pits(4))
    rn.fit_normal(normal, None, (pits, crops_tensor(pool.random_crops(4, 3)), (pits < 0.1).float()))
    pc = create_model("patchcore", "tu-tf_efficientnet_lite0", "lite", 1, coreset_ratio=0.1)
    pc.fit_normal(normal, crops_tensor(pool.random_crops(8, 2)))
    norms = [{"pixel": [0.1 * i, 1.0 + i], "image": [0.2, 2.0]} for i in range(6)]
    ens = Ensemble([unet, u3, ev, pc, sn, rn], 1, 128, "cpu", "flip", norms=norms, threshold=PARAMS["threshold"])
    params = {**PARAMS, "shape": [0.0, 0.0, 0.5, 0.0, 0.0, 0.0]}  # each model's own threshold: masks trimmed
    meta = export_onnx(ens, params, tmp_path / "all.onnx")
    assert meta["exporter"] == "torchscript"  # every kind takes the fast exporter, no fallback (nor its log)
    assert meta["models"] == 6 and meta["tta"] == "flip" and meta["params"] == params and meta["heads"]
    onnx = OnnxEnsemble(tmp_path / "all.onnx")
    x = crops_tensor(crops_with_pits(6))
    (maps, heads), (omaps, oheads) = ens.forward(x), onnx.forward(x)
    assert maps.shape == omaps.shape == (6, 6, 128, 128)
    for k, name in enumerate(("unet", "unet3plus", "evidence_unet", "patchcore", "simplenet", "realnet")):
        assert torch.allclose(maps[k], omaps[k], atol=1e-4), (name, float((maps[k] - omaps[k]).abs().max()))
    assert torch.allclose(heads, oheads, atol=1e-4)
    folder = tmp_path / "TC_Images"
    folder.mkdir()
    for i, img in enumerate(crops_with_pits(6)):
        cv2.imwrite(str(folder / f"c{i}.png"), img)
    a = run_predict(ens, folder, tmp_path / "torch", params)
    b = run_predict(onnx, folder, tmp_path / "onnx", onnx.params())
    assert a["defective"] == b["defective"] > 0
    for sub in ("submission", "masks", "gates"):
        files = sorted(p.name for p in (tmp_path / "torch" / sub).iterdir())
        assert files == sorted(p.name for p in (tmp_path / "onnx" / sub).iterdir())
        assert all((tmp_path / "torch" / sub / f).read_bytes() == (tmp_path / "onnx" / sub / f).read_bytes()
                   for f in files)


@pytest.mark.parametrize("method,atol", [("padim", 1e-4), ("ssim_ae", 1e-3)])
def test_the_fixed_size_baselines_export_too(ok_dir, tmp_path, method, atol):
    """PaDiM (per-position Gaussians) and the SSIM autoencoder (a dense bottleneck) export with flip TTA. The
    SSIM-AE's standardised maps are 1 - SSIM over a small spread, so rounding shows more there."""
    torch.manual_seed(0)
    pool = SourcePool(ok_dir)
    model = create_model(method, "tu-tf_efficientnet_lite0", "lite", 1, padim_dims=20, ae_width=8, ae_latent=16)
    normal, held = crops_tensor(pool.random_crops(16, 0)), crops_tensor(pool.random_crops(8, 1))
    if model.needs_normal:
        model.fit_normal(normal, held)
    else:  # the untrained autoencoder, in eval mode: a logit mapping from its normal maps, for maps of some spread
        model.eval().net.standardise(held)
    ens = Ensemble([model], 1, 128, "cpu", "flip", threshold=PARAMS["threshold"])
    export_onnx(ens, PARAMS, tmp_path / "m.onnx")
    x = crops_tensor(crops_with_pits(4))
    maps, _ = ens.forward(x)
    omaps, oheads = OnnxEnsemble(tmp_path / "m.onnx").forward(x)
    assert oheads is None and omaps.shape == maps.shape == (1, 4, 128, 128)
    assert maps.std() > 0.1  # maps that vary, not a constant both backends agree on
    assert torch.allclose(maps, omaps, atol=atol), float((maps - omaps).abs().max())


def test_patchcore_zoomed_exports_too(ok_dir, tmp_path):
    """PatchCore with `zoom` 2 (the crop resized before the backbone, the map back at the crop's size) exports
    with flip TTA and gives the PyTorch maps, which differ from the unzoomed model's."""
    torch.manual_seed(0)
    pool = SourcePool(ok_dir)
    normal, held = crops_tensor(pool.random_crops(16, 0)), crops_tensor(pool.random_crops(8, 1))
    x = crops_tensor(crops_with_pits(4))
    maps = {}
    for zoom in (1, 2):
        pc = create_model("patchcore", "tu-tf_efficientnet_lite0", "lite", 1, coreset_ratio=0.1 / zoom**2, zoom=zoom)
        pc.fit_normal(normal, held)
        ens = Ensemble([pc], 1, 128, "cpu", "flip", threshold=PARAMS["threshold"])
        maps[zoom], _ = ens.forward(x)
    export_onnx(ens, PARAMS, tmp_path / "z.onnx")
    omaps, _ = OnnxEnsemble(tmp_path / "z.onnx").forward(x)
    assert omaps.shape == maps[2].shape == (1, 4, 128, 128) and maps[2].std() > 0.1
    assert torch.allclose(maps[2], omaps, atol=1e-4), float((maps[2] - omaps).abs().max())
    assert (maps[2] - maps[1]).abs().max() > 0.1


def pixels(mask: np.ndarray) -> set:
    return {f"{r}, {c}" for r, c in zip(*np.nonzero(mask))}


def points(path: Path) -> set:
    """The defect pixels of a submission JSON; none when the file is absent (a crop judged normal)."""
    if not path.exists():
        return set()
    return {p for region in json.loads(path.read_text())["regions"] for p in region["points"]}


def test_cli_export_and_onnx_backend_write_the_same_submission(tmp_path):
    ok = write_ok_images(tmp_path / "ok", 4)
    tc = write_test_crops(tmp_path / "TC_Images", 6)
    run = CliRunner()
    r = run.invoke(cli.app, [*tiny_patchcore_args(ok), "-o", str(tmp_path / "pc.pt")])
    assert r.exit_code == 0, r.output
    r = run.invoke(cli.app, ["seg", "export", "-m", str(tmp_path / "pc.pt"), "-o", str(tmp_path / "pc.onnx")])
    assert r.exit_code == 0 and "wrote" in r.output, r.output
    for backend, model in (("torch", "pc.pt"), ("onnx", "pc.onnx")):
        for out, flags in ((backend, []), (f"{backend}_plain", ["--grabcut", "0"])):  # with the graph cut, without
            r = run.invoke(cli.app, ["ensemble", "predict", "--backend", backend, "-m", str(tmp_path / model),
                                     "--images", str(tc), "-o", str(tmp_path / out), *flags])
            assert r.exit_code == 0, r.output
    r = run.invoke(cli.app, ["baseline", "predict", "-m", str(tmp_path / "pc.pt"), "--images", str(tc),
                             "-o", str(tmp_path / "baseline")])  # the same path, through `baseline predict`
    assert r.exit_code == 0, r.output
    for sub in ("submission", "masks"):  # `baseline predict` is the same code: byte for byte
        a = {p.name: p.read_bytes() for p in (tmp_path / "torch" / sub).iterdir()}
        assert a == {p.name: p.read_bytes() for p in (tmp_path / "baseline" / sub).iterdir()}
    # The backends differ by float rounding (~1e-6): a pixel that close to a threshold may go either way, so each
    # backend's mask without the graph cut must lie between PyTorch's final masks at the thresholds moved by 1e-4
    # up and down (both thresholds and that post-processing are monotone in them). The graph cut is not monotone
    # (a pixel more changes both grey-level models): with it, where no pixel is that close, the masks are equal.
    ens, params = build_ensemble([str(tmp_path / "pc.pt")], None, None, None, None, None, {}, "cpu")
    assert params["peak_frac"] == 0.5 and params["grabcut"] == 0.75  # the defaults, calibrated with, carried
    cal = load_model_file(tmp_path / "pc.pt")["calibration"]
    old = {"checkpoints": [str(tmp_path / "pc.pt")], "tta": cal["tta"], "norms": [cal["norm"]],
           "params": {k: v for k, v in cal["params"].items() if k not in ("peak_frac", "grabcut")}}
    write_json(tmp_path / "old.json", old)  # an ensemble.json calibrated before the rules: predicts as it was
    before = build_ensemble(None, str(tmp_path / "old.json"), None, None, None, None, {}, "cpu")[1]
    assert before["peak_frac"] == 0 and before["grabcut"] == 0
    shifted = [{**params, "grabcut": 0.0, "threshold": params["threshold"] + d,
                "image_threshold": params["image_threshold"] + d} for d in (1e-4, -1e-4)]
    slack, defective, equal = 0, 0, 0
    for f in find_images(tc):
        r = ens.predict([read_image(f, 1)])[0]
        inner, outer = (pixels(final_mask(r["map"], r["image"], p)) for p in shifted)
        slack += len(outer - inner)
        for backend in ("torch_plain", "onnx_plain"):
            got = points(tmp_path / backend / "submission" / f"{f.stem}.json")
            assert inner <= got <= outer, (backend, f.name)
            png = tmp_path / backend / "masks" / f"{f.stem}.png"
            assert pixels(cv2.imread(str(png), cv2.IMREAD_GRAYSCALE) if png.exists() else np.zeros(1)) == got
        drawn = [points(tmp_path / b / "submission" / f"{f.stem}.json") for b in ("torch", "onnx")]
        assert bool(drawn[0]) == bool(drawn[1]) == bool(inner), f.name  # the graph cut decides nothing
        if inner == outer:
            assert drawn[0] == drawn[1], f.name
            equal += 1
        defective += bool(points(tmp_path / "torch" / "submission" / f"{f.stem}.json"))
    assert defective >= 3 and slack < 20 and equal >= 4  # pits found; a handful of tied pixels at most
    r = run.invoke(cli.app, ["ensemble", "predict", "--backend", "onnx", "-m", str(tmp_path / "pc.pt"),
                             "--images", str(tc), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "pc.pt: cannot be loaded as ONNX" in r.output and r.exception is not None
    with pytest.raises(InputError, match="not an ONNX file written by `seg export`"):
        import onnx

        m = onnx.load(str(tmp_path / "pc.onnx"))
        del m.metadata_props[:]
        onnx.save(m, str(tmp_path / "bare.onnx"))
        OnnxEnsemble(tmp_path / "bare.onnx")
