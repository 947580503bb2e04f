"""Tests of `hs.pp.image_features` (tiny synthetic data, random-init MobileNetV2 at 32 px) and the encoder factory."""

from __future__ import annotations

import urllib.error

import anndata as ad
import numpy as np
import pytest
import torch
from torch import nn

import histospace as hs
from histospace._image import build_encoder

with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)
    # a tiny CNN keeps the many small runs fast; MobileNetV2 (random init) is tested where the architecture matters
    TINY = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
FAST = {"encoder": TINY, "weights": None, "input_size": 32, "progress_bar": False, "device": "cpu"}
MOBILENET = {**FAST, "encoder": "mobilenet_v2"}


def _lib(adata):
    return next(iter(adata.uns["spatial"]))


def _hires(adata):
    return adata.uns["spatial"][_lib(adata)]["images"]["hires"]


def _snapshot(adata):
    return (
        set(adata.obsm),
        set(adata.uns),
        {k: v.copy() for k, v in adata.obsm.items()},
        adata.obs.copy(),
    )


def _assert_unchanged(adata, snap):
    keys_obsm, keys_uns, obsm, obs = snap
    assert set(adata.obsm) == keys_obsm
    assert set(adata.uns) == keys_uns
    for k, v in obsm.items():
        np.testing.assert_array_equal(adata.obsm[k], v)
    assert adata.obs.equals(obs)


def _feats(adata, **kw):
    out = hs.pp.image_features(adata, copy=True, **{**FAST, **kw})
    return out.obsm[kw.get("key_added", "img_features")]


def _close(a, b):
    """Equal up to float rounding, relative to the size of the features."""
    scale = max(np.abs(b).max(), 1e-30)
    np.testing.assert_allclose(a / scale, b / scale, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# slots, copy, determinism, round trip
# --------------------------------------------------------------------------------------------------------------------


def test_writes_documented_slots(adata):
    assert hs.pp.image_features(adata, **MOBILENET) is None
    x = adata.obsm["img_features"]
    assert x.shape == (adata.n_obs, 1280)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    assert x.std(axis=0).max() > 0
    uns = adata.uns["img_features"]
    p = uns["params"]
    assert isinstance(uns["version"], str)
    assert p["encoder"] == "mobilenet_v2"
    assert p["weights"] == "random"
    assert p["image"] == "hires"
    assert p["scale"] == pytest.approx(0.5)
    assert p["patch_size_px"] == pytest.approx(165.0)  # default: three spot diameters
    assert "patch_size_um" not in p  # spot_diameter_um unknown in the fixture
    assert p["input_size"] == 32
    assert "white" in p["padding"]
    np.testing.assert_allclose(p["mean"], [0.485, 0.456, 0.406])
    np.testing.assert_allclose(p["std"], [0.229, 0.224, 0.225])
    assert p["library_ids"] == ["lib"]
    assert p["libraries"]["lib"]["image"] == "hires"
    for v in p.values():  # nothing that h5ad cannot store
        assert v is not None


def test_key_added_and_copy(adata):
    snap = _snapshot(adata)
    out = hs.pp.image_features(adata, key_added="he", copy=True, **FAST)
    _assert_unchanged(adata, snap)
    assert isinstance(out, ad.AnnData)
    assert out.obsm["he"].shape == (adata.n_obs, 16)
    assert "he" in out.uns and "img_features" not in out.uns


def test_same_random_state_same_output(adata):
    adata = adata[:16].copy()
    a = _feats(adata, **MOBILENET)
    b = _feats(adata, **MOBILENET)
    np.testing.assert_array_equal(a, b)
    c = _feats(adata, **{**MOBILENET, "random_state": 1})
    scale = np.abs(a).max()  # random-init MobileNetV2 features are tiny (~1e-10): compare relative to their size
    assert scale > 0
    assert not np.allclose(a / scale, c / scale, atol=1e-3)


def test_batch_size_does_not_change_features(adata):
    a = _feats(adata, batch_size=64)
    b = _feats(adata, batch_size=7)
    _close(a, b)


def test_memory_does_not_grow_with_spots():
    """Patches are streamed: the peak numpy allocation is the same for 100 and 1600 spots (beyond the output)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(2000, 2000, 3), dtype=np.uint8)

    def peak(n):
        a = ad.AnnData(X=np.zeros((n, 0), np.float32))
        a.obsm["spatial"] = rng.uniform(100, 1900, size=(n, 2))
        tracemalloc.start()
        hs.pp.image_features(a, img=img, patch_size=120, batch_size=16, **{**FAST, "input_size": 16})
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p - a.obsm["img_features"].nbytes

    small, large = peak(100), peak(1600)
    one_batch = 16 * 120 * 120 * 3
    assert large < small + 4 * one_batch  # all 1600 patches would be 100 x one_batch


def test_num_workers(adata):
    a = _feats(adata, batch_size=16)
    b = _feats(adata, batch_size=16, num_workers=1)
    _close(a, b)


def test_h5ad_round_trip(adata, tmp_path):
    hs.pp.image_features(adata, **MOBILENET)
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.obsm["img_features"], adata.obsm["img_features"])
    p, q = adata.uns["img_features"]["params"], back.uns["img_features"]["params"]
    for k in ("encoder", "weights", "image", "padding", "input_size", "random_state"):
        assert q[k] == p[k]
    assert q["scale"] == pytest.approx(p["scale"])
    np.testing.assert_allclose(q["mean"], p["mean"])
    assert q["libraries"]["lib"]["patch_size_px"] == pytest.approx(165.0)


# --------------------------------------------------------------------------------------------------------------------
# image sources and conversions
# --------------------------------------------------------------------------------------------------------------------


def test_img_array_with_scale_matches_uns_image(adata):
    ref = _feats(adata)
    out = hs.pp.image_features(adata, img=_hires(adata), img_scale=0.5, copy=True, **FAST)
    _close(out.obsm["img_features"], ref)
    assert out.uns["img_features"]["params"]["image"] == "img"


def _full_res(adata):
    return np.repeat(np.repeat(_hires(adata), 2, axis=0), 2, axis=1)  # 900 x 900 "full resolution"


@pytest.mark.parametrize("kind", ["rgba", "uint16", "float01", "float255", "grey2d", "grey1"])
def test_image_conversions(adata, kind):
    full = _full_res(adata)
    if kind.startswith("grey"):
        grey = full.mean(axis=2).round().astype(np.uint8)
        ref = _feats(adata, img=np.repeat(grey[:, :, None], 3, axis=2))
        img = grey if kind == "grey2d" else grey[:, :, None]
    else:
        ref = _feats(adata, img=full)
        img = {
            "rgba": lambda: np.concatenate([full, np.full(full.shape[:2] + (1,), 7, np.uint8)], axis=2),
            "uint16": lambda: full.astype(np.uint16) * 257,  # 16-bit images are scaled by 255 / 65535
            "float01": lambda: full.astype(np.float32) / 255.0,
            "float255": lambda: full.astype(np.float64),
        }[kind]()
    _close(_feats(adata, img=img), ref)


def test_patch_over_border_is_padded_white(adata):
    full = _full_res(adata)
    coords = adata.obsm["spatial"].copy()
    coords[0] = [3.0, 4.0]  # patch runs over the top-left corner
    adata.obsm["spatial"] = coords
    a = _feats(adata, img=full)
    pad = 100
    padded = np.pad(full, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    shifted = adata.copy()
    shifted.obsm["spatial"] = coords + pad
    b = _feats(shifted, img=padded)
    _close(a, b)
    assert np.isfinite(a).all()


def test_explicit_patch_size_and_um(adata):
    out = hs.pp.image_features(adata, patch_size=80, copy=True, **FAST)
    assert out.uns["img_features"]["params"]["patch_size_px"] == pytest.approx(80.0)
    with pytest.raises(KeyError, match="spot_diameter_um"):
        hs.pp.image_features(adata, patch_size_um=50, **FAST)
    adata.uns["spatial"]["lib"]["metadata"]["spot_diameter_um"] = 55.0  # 1 px per µm
    out = hs.pp.image_features(adata, patch_size_um=80, copy=True, **FAST)
    p = out.uns["img_features"]["params"]
    assert p["patch_size_px"] == pytest.approx(80.0)
    assert p["patch_size_um"] == pytest.approx(80.0)
    np.testing.assert_allclose(
        out.obsm["img_features"], hs.pp.image_features(adata, patch_size=80, copy=True, **FAST).obsm["img_features"]
    )


def test_source_image_path_files(adata, tmp_path):
    """Full-resolution files in metadata['source_image_path'] (PNG, TIFF memmap, tiled TIFF via zarr) are used."""
    import tifffile
    from PIL import Image

    full = _full_res(adata)
    ref = _feats(adata, img=full)
    png = tmp_path / "he.png"
    Image.fromarray(full).save(png)
    tif = tmp_path / "he.tif"
    tifffile.imwrite(tif, full)
    tiled = tmp_path / "he_tiled.tif"
    tifffile.imwrite(tiled, full, tile=(128, 128), compression="zlib")
    jpg = tmp_path / "he.jpg"
    Image.fromarray(full).save(jpg, quality=95)
    for path in (png, tif, tiled, jpg):
        adata.uns["spatial"]["lib"]["metadata"]["source_image_path"] = str(path)
        out = hs.pp.image_features(adata, copy=True, **FAST)
        p = out.uns["img_features"]["params"]
        assert p["image"] == "fullres"
        assert p["scale"] == 1.0
        assert p["libraries"]["lib"]["image_path"] == str(path)
        if path is jpg:  # lossy: close, not equal
            assert np.corrcoef(out.obsm["img_features"].ravel(), ref.ravel())[0, 1] > 0.9
        else:
            _close(out.obsm["img_features"], ref)
        # the path can also be given as img=
        _close(_feats(adata, img=str(path)), out.obsm["img_features"])


def test_missing_source_file_falls_back_to_hires(adata, tmp_path):
    ref = _feats(adata)
    adata.uns["spatial"]["lib"]["metadata"]["source_image_path"] = str(tmp_path / "gone.jpg")
    with pytest.warns(UserWarning, match="source_image_path"):
        out = hs.pp.image_features(adata, copy=True, **FAST)
    assert out.uns["img_features"]["params"]["image"] == "hires"
    np.testing.assert_array_equal(out.obsm["img_features"], ref)


def test_lowres_image(adata):
    lib = adata.uns["spatial"]["lib"]
    lib["images"] = {"lowres": lib["images"]["hires"][::2, ::2].copy()}
    lib["scalefactors"]["tissue_lowres_scalef"] = 0.25
    out = hs.pp.image_features(adata, copy=True, **FAST)
    p = out.uns["img_features"]["params"]
    assert p["image"] == "lowres" and p["scale"] == pytest.approx(0.25)
    assert np.isfinite(out.obsm["img_features"]).all()


def test_image_container_input(adata):
    sq = pytest.importorskip("squidpy")
    full = _full_res(adata)
    ref = _feats(adata, img=full)
    ic = sq.im.ImageContainer(full, layer="image")
    _close(_feats(adata, img=ic), ref)


def test_two_slides_with_library_key(adata_two_slides):
    a = adata_two_slides
    out = hs.pp.image_features(a, library_key="library_id", copy=True, **FAST)
    x = out.obsm["img_features"]
    assert x.shape == (a.n_obs, 16)
    p = out.uns["img_features"]["params"]
    assert p["library_ids"] == ["s1", "s2"] and p["library_key"] == "library_id"
    for lib in ("s1", "s2"):
        mask = (a.obs["library_id"] == lib).to_numpy()
        one = hs.pp.image_features(a[mask].copy(), library_id=lib, copy=True, **FAST).obsm["img_features"]
        _close(x[mask], one)


def test_two_slides_errors(adata_two_slides):
    a = adata_two_slides
    snap = _snapshot(a)
    with pytest.raises(ValueError, match="library_key"):
        hs.pp.image_features(a, **FAST)
    with pytest.raises(ValueError, match=r"obs\['library_id'\].*'s2'.*library_key='library_id'"):
        hs.pp.image_features(a, library_id="s1", **FAST)
    with pytest.raises(KeyError, match=r"obs\['sample'\]"):
        hs.pp.image_features(a, library_key="sample", **FAST)
    del a.uns["spatial"]["s2"]["images"]
    with pytest.raises(KeyError, match=r"s2"):
        hs.pp.image_features(a, library_key="library_id", **FAST)
    _assert_unchanged(a, snap)


# --------------------------------------------------------------------------------------------------------------------
# encoders and weights
# --------------------------------------------------------------------------------------------------------------------


def test_local_weights_file(adata, tmp_path):
    import torchvision

    torch.manual_seed(3)
    sd = torchvision.models.mobilenet_v2(weights=None).state_dict()
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("classifier")}, "epoch": 3}, wrapped)
    out = hs.pp.image_features(adata, copy=True, **{**MOBILENET, "weights": path}, mean=0.5, std=0.5)
    p = out.uns["img_features"]["params"]
    assert p["weights"] == str(path.resolve())
    np.testing.assert_allclose(p["mean"], [0.5] * 3)
    rand = _feats(adata, **MOBILENET, mean=0.5, std=0.5)
    assert not np.allclose(out.obsm["img_features"] / np.abs(rand).max(), rand / np.abs(rand).max(), atol=1e-3)
    np.testing.assert_array_equal(
        _feats(adata, **{**MOBILENET, "weights": wrapped}, mean=0.5, std=0.5), out.obsm["img_features"]
    )


def test_custom_module_encoder(adata):
    out = hs.pp.image_features(adata, copy=True, **FAST)
    assert out.obsm["img_features"].shape == (adata.n_obs, 16)
    p = out.uns["img_features"]["params"]
    assert p["encoder"] == "Sequential" and p["weights"] == "module"


@pytest.mark.parametrize(("name", "dim"), [("mobilenet_v2", 1280), ("densenet121", 1024), ("resnet50", 2048)])
def test_build_encoder_dims(name, dim):
    enc, d, info = build_encoder(name, None, random_state=0)
    assert d == dim and enc.out_dim == dim
    assert info == {"encoder": name, "weights": "random", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    with torch.inference_mode():
        y = enc(torch.rand(2, 3, 32, 32))
    assert y.shape == (2, dim)
    assert not enc.training


def test_build_encoder_is_trainable_and_tf_padding():
    enc, d, _ = build_encoder("mobilenet_v2", None, 0.5, 0.5, tf_padding=True)
    enc.train()
    x = torch.rand(2, 3, 32, 32)
    loss = enc(x).pow(2).mean()
    loss.backward()
    assert any(p.grad is not None for p in enc.parameters())
    enc2, _, _ = build_encoder("mobilenet_v2", None, 0.5, 0.5)
    assert enc.normalization == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    with torch.inference_mode():
        assert enc.eval()(x).shape == enc2(x).shape == (2, d)


def test_tf_padding(adata):
    adata = adata[:16].copy()
    out = hs.pp.image_features(adata, copy=True, **MOBILENET, tf_padding=True)
    assert out.uns["img_features"]["params"]["tf_padding"] is True
    enc, _, _ = build_encoder("mobilenet_v2", None, tf_padding=True)  # same seed, unfused, as a user module
    ref = _feats(adata, **{**MOBILENET, "encoder": enc.backbone})
    _close(out.obsm["img_features"], ref)
    plain = _feats(adata, **MOBILENET)
    assert not np.allclose(plain / np.abs(ref).max(), ref / np.abs(ref).max(), atol=1e-3)
    with pytest.raises(ValueError, match="tf_padding"):
        hs.pp.image_features(adata, **FAST, tf_padding=True)
    with pytest.raises(ValueError, match="tf_padding"):  # the shared builder refuses too (it would re-pad the module)
        build_encoder(TINY, None, tf_padding=True)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50", "densenet121"])
def test_build_encoder_stages(name):
    from histospace._image import STAGES

    x = torch.rand(2, 3, 64, 64)
    enc, d, info = build_encoder(name, None, random_state=0, layers="stages")
    last, d_last, _ = build_encoder(name, None, random_state=0)
    assert d == STAGES[name][1] and info["layers"] == "stages"
    with torch.inference_mode():
        y, y_last = enc(x), last(x)
    assert y.shape == (2, d)
    if name == "mobilenet_v2":  # the 320-channel stage is the input of the final 1x1 expansion to 1280
        with torch.inference_mode():
            ref = last.backbone[:18]((x - last.mean) / last.std).mean(dim=(2, 3))
        _close(y[:, -320:].numpy(), ref.numpy())
    else:  # the last stage is the trunk's output (DenseNet: after its final ReLU, as the 'last' features)
        _close(y[:, -d_last:].numpy(), y_last.numpy())
    with pytest.raises(ValueError, match="layers"):
        build_encoder(name, None, layers="all")
    with pytest.raises(ValueError, match="named encoder"):
        build_encoder(TINY, None, layers="stages")


def test_layers_stages_and_dihedral(adata):
    from histospace._image import dihedral_mean as _dihedral_mean

    adata = adata[:12].copy()
    out = hs.pp.image_features(adata, copy=True, **MOBILENET, layers="stages", dihedral=True)
    p = out.uns["img_features"]["params"]
    assert out.obsm["img_features"].shape == (12, 696)
    assert p["layers"] == "stages" and p["dihedral"] is True
    plain = hs.pp.image_features(adata, copy=True, **MOBILENET)
    assert "layers" not in plain.uns["img_features"]["params"]
    assert "dihedral" not in plain.uns["img_features"]["params"]
    # the dihedral mean is the mean over the 8 views and does not change when the patch is rotated or flipped
    enc, _, _ = build_encoder("mobilenet_v2", None, random_state=0)
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        views = [
            enc(torch.rot90(x, k, dims=(2, 3)).flip(-1) if f else torch.rot90(x, k, dims=(2, 3)))
            for k in range(4)
            for f in (0, 1)
        ]
        mean = _dihedral_mean(enc, x)
        _close(mean.numpy(), torch.stack(views).mean(0).numpy())
        _close(_dihedral_mean(enc, torch.rot90(x, 1, dims=(2, 3))).numpy(), mean.numpy())
        _close(_dihedral_mean(enc, x.flip(-2)).numpy(), mean.numpy())
    snap = _snapshot(adata)
    _raises(adata, ValueError, "layers", **MOBILENET, layers="all")
    _raises(adata, ValueError, "named encoder", **FAST, layers="stages")
    _assert_unchanged(adata, snap)


# --------------------------------------------------------------------------------------------------------------------
# bad input: type, message naming slot/file and fix, AnnData unchanged
# --------------------------------------------------------------------------------------------------------------------


def _raises(adata, exc, match, **kw):
    snap = _snapshot(adata)
    with pytest.raises(exc, match=match):
        hs.pp.image_features(adata, **{**MOBILENET, **kw})
    _assert_unchanged(adata, snap)


def test_missing_spatial(adata):
    del adata.obsm["spatial"]
    _raises(adata, KeyError, r"obsm\['spatial'\].*sc.read_visium")


def test_no_image_anywhere(adata):
    del adata.uns["spatial"]
    _raises(adata, KeyError, r"No image found.*img=")


def test_library_without_image(adata):
    del adata.uns["spatial"]["lib"]["images"]
    _raises(adata, KeyError, r"No image for 64 spots.*'lib'.*img=")


def test_unknown_library_id(adata):
    _raises(adata, KeyError, r"library_id='nope' not found in `adata.uns\['spatial'\]`.*'lib'", library_id="nope")


def test_nan_coordinates(adata):
    adata.obsm["spatial"][5, 0] = np.nan
    _raises(adata, ValueError, r"obsm\['spatial'\].*NaN.*lib_spot5.*remove")


def test_spots_outside_image(adata):
    adata.obsm["spatial"][[3, 4]] = [5000.0, 10.0]
    _raises(adata, ValueError, r"2 spots lie outside.*lib_spot3.*full-resolution")


def test_missing_weights_file(adata, tmp_path):
    _raises(
        adata,
        FileNotFoundError,
        r"Weights file .*nothere\.pt.* not found.*weights=None",
        weights=tmp_path / "nothere.pt",
    )


def test_corrupt_weights_file(adata, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a torch file")
    _raises(adata, ValueError, r"bad\.pt.*corrupt", weights=bad)
    wrong = tmp_path / "wrong.pt"
    torch.save(nn.Linear(3, 2).state_dict(), wrong)
    _raises(adata, ValueError, r"wrong\.pt.*missing keys.*encoder", weights=wrong)


def test_unknown_encoder(adata):
    _raises(adata, ValueError, r"Unknown encoder 'vgg99'.*mobilenet_v2", encoder="vgg99")


def test_imagenet_offline_error(adata, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    _raises(adata, ConnectionError, r"Could not download.*local state_dict file.*weights=None", weights="imagenet")


def test_bad_arguments(adata):
    _raises(adata, ValueError, "patch_size", patch_size=-3)
    _raises(adata, ValueError, "input_size", input_size=0)
    _raises(adata, TypeError, "img", img=object())
    _raises(adata, FileNotFoundError, r"missing\.jpg", img="missing.jpg")


# --------------------------------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.data
def test_her2st_c2_real_signal(data_dir, mobilenet_weights):
    """her2st C2, 224-px full-resolution patches, ImageNet MobileNetV2: neighbouring spots look alike."""
    adata = hs.datasets.her2st("C2", data_dir=data_dir)
    hs.pp.image_features(
        adata, encoder="mobilenet_v2", weights=mobilenet_weights, mean=0.5, std=0.5, patch_size=224, progress_bar=False
    )
    x = adata.obsm["img_features"]
    assert x.shape == (187, 1280)
    assert x.dtype == np.float32 and np.isfinite(x).all()
    p = adata.uns["img_features"]["params"]
    assert p["image"] == "fullres" and p["patch_size_px"] == 224.0
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    cos = z @ z.T
    xy = adata.obsm["spatial"]
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    nn6 = np.argsort(d, axis=1)[:, 1:7]
    near = np.mean([cos[i, nn6[i]].mean() for i in range(len(x))])
    iu = np.triu_indices(len(x), 1)
    assert near > cos[iu].mean() + 0.03
    # distance correlation between feature and spatial distances (Mantel statistic) is positive
    fd = np.linalg.norm(z[:, None] - z[None], axis=-1)
    assert np.corrcoef(fd[iu], d[iu])[0, 1] > 0.05


def test_cropped_image_container_gives_the_features_of_the_uncropped_image(adata):
    # a squidpy ImageContainer cropped from the full image keeps its offset: same patches, same features
    import squidpy as sq

    lib = next(iter(adata.uns["spatial"]))
    full = adata.uns["spatial"][lib]["images"]["hires"]
    kw = {"encoder": "mobilenet_v2", "weights": None, "patch_size": 60, "input_size": 32, "progress_bar": False}
    ref = hs.pp.image_features(adata, img=full, img_scale=0.5, copy=True, **kw).obsm["img_features"]
    ic = sq.im.ImageContainer(full, layer="image", scale=0.5)
    crop = ic.crop_corner(20, 10, size=(full.shape[0] - 20, full.shape[1] - 10))
    out = hs.pp.image_features(adata, img=crop, copy=True, **kw).obsm["img_features"]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # several z-planes: refused with the fix named
    stack = sq.im.ImageContainer(np.stack([full, full], axis=2), layer="image", dims=("y", "x", "z", "channels"))
    before = set(adata.obsm)
    with pytest.raises(ValueError, match="z-planes.*library_id"):
        hs.pp.image_features(adata, img=stack, **kw)
    assert set(adata.obsm) == before


def test_known_weights_files(mobilenet_weights, tmp_path):
    from histospace._image.encoders._torchvision import known_normalization, trained_with_tf_padding

    # the shared TF-converted MobileNetV2: inputs x / 127.5 - 1 and TF 'SAME' padding, recognised by its checksum
    assert known_normalization(mobilenet_weights) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert trained_with_tf_padding(mobilenet_weights)
    other = tmp_path / "other.pt"
    other.write_bytes(b"not the same file")
    assert known_normalization(other) is None and not trained_with_tf_padding(other)
    assert known_normalization("imagenet") is None and not trained_with_tf_padding(None)


# --------------------------------------------------------------------------------------------------------------------
# the dense method through the public function, and the width reduced on the fly
# --------------------------------------------------------------------------------------------------------------------
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)  # the dense method needs padded convolutions (maps of input_size / stride cells)
    TINY_PADDED = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
    )
DENSE = {**FAST, "encoder": TINY_PADDED, "method": "dense", "tile_size": 64}


def test_dense_method_slots_copy_and_determinism(adata):
    snap = _snapshot(adata)
    out = hs.pp.image_features(adata, copy=True, **DENSE)
    _assert_unchanged(adata, snap)
    x = out.obsm["img_features"]
    assert x.shape == (adata.n_obs, 16) and x.dtype == np.float32 and np.isfinite(x).all()
    p = out.uns["img_features"]["params"]
    assert p["method"] == "dense" and p["n_tiles"] >= 1 and p["halo"] >= 0 and "n_components" not in p
    assert "pca" not in out.uns["img_features"]
    assert _feats(adata, **DENSE).tobytes() == x.tobytes()


@pytest.mark.parametrize("method", ["patch", "dense"])
def test_n_components_is_the_pca_of_the_full_features(adata, method, tmp_path):
    from histospace._utils._preprocess import covariance_pca

    kw = DENSE if method == "dense" else FAST
    full = _feats(adata, **kw).astype(np.float64)
    out = hs.pp.image_features(adata, n_components=5, copy=True, **kw)
    mu, comp = covariance_pca(full, 5)  # fitted on every spot: fewer than the PCA's sample
    np.testing.assert_array_equal(out.obsm["img_features"], ((full - mu) @ comp).astype(np.float32))
    u = out.uns["img_features"]
    assert u["params"]["n_components"] == 5 and u["params"]["method"] == method and u["pca"]["n_fit"] == adata.n_obs
    np.testing.assert_array_equal(u["pca"]["mean"], mu)
    np.testing.assert_array_equal(u["pca"]["components"], comp)
    # h5ad round trip of the PCA; projecting with it again gives the same features (the dense method projects the
    # maps before their window means: the same up to float rounding)
    out.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad").uns["img_features"]["pca"]
    np.testing.assert_array_equal(back["components"], comp)
    again = hs.pp.image_features(adata, pca=back, copy=True, **kw)
    if method == "patch":
        np.testing.assert_array_equal(again.obsm["img_features"], out.obsm["img_features"])
    else:
        _close(again.obsm["img_features"], out.obsm["img_features"])
    assert again.uns["img_features"]["pca"]["n_fit"] == 0


def test_n_components_over_slides_with_a_projected_second_pass(adata_two_slides, monkeypatch):
    # a PCA sample smaller than the slides: fitted on the strips of both, then every map projected in a second pass
    from histospace._image.features import _compute

    monkeypatch.setattr(_compute, "PCA_N_SPOTS", 16)
    a = adata_two_slides
    kw = {**DENSE, "library_key": "library_id"}
    full = _feats(a, **kw).astype(np.float64)
    out = hs.pp.image_features(a, n_components=4, copy=True, **kw)
    pca = out.uns["img_features"]["pca"]
    assert 16 <= pca["n_fit"] < a.n_obs
    want = (full - pca["mean"]) @ pca["components"]
    _close(out.obsm["img_features"], want)
    # the same PCA projects a slide computed on its own
    s2 = a[(a.obs["library_id"] == "s2").to_numpy()].copy()
    one = hs.pp.image_features(s2, library_id="s2", pca=pca, copy=True, **DENSE).obsm["img_features"]
    _close(one, want[(a.obs["library_id"] == "s2").to_numpy()])


def test_n_components_and_pca_errors(adata):
    snap = _snapshot(adata)
    good = hs.pp.image_features(adata, n_components=3, copy=True, **FAST).uns["img_features"]["pca"]
    with pytest.raises(ValueError, match="n_components"):
        hs.pp.image_features(adata, n_components=0, **FAST)
    with pytest.raises(ValueError, match=r"n_components=65 is more than the 16 features or the 64 spots"):
        hs.pp.image_features(adata, n_components=65, **FAST)
    with pytest.raises(TypeError, match=r"`pca` must be a mapping.*uns\['img_features'\]\['pca'\]"):
        hs.pp.image_features(adata, pca=np.zeros(3), **FAST)
    with pytest.raises(ValueError, match="`pca` has no 'components'"):
        hs.pp.image_features(adata, pca={"mean": good["mean"]}, **FAST)
    with pytest.raises(ValueError, match="fitted on features of width 16, these have width 32"):
        hs.pp.image_features(adata, pca=good, context=2, **FAST)
    with pytest.raises(ValueError, match="n_components=4 but `pca` has 3 components"):
        hs.pp.image_features(adata, pca=good, n_components=4, **FAST)
    with pytest.raises(ValueError, match="NaN"):
        hs.pp.image_features(adata, pca={**good, "mean": np.full(16, np.nan)}, **FAST)
    _assert_unchanged(adata, snap)
