"""Physical scale from a trained model to every query: recorded feature settings, features at the model's µm."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from scipy import ndimage

import histospace as hs

N_SIDE, PITCH = 6, 60.0  # 36 spots, 60 px apart on a 420 x 420 px image
#: µm per full-resolution pixel of the synthetic reference (spot of 40 px = 40 µm)
MPP = 1.0
#: the model's patch: 64 µm, resized to 32 px (the half-resolution query's patch is 32 px: no resampling there)
FEATURES = {"encoder": "mobilenet_v2", "weights": None, "input_size": 32, "patch_size_um": 64.0, "method": "patch"}
RUN = {"device": "cpu", "progress_bar": False}
TINY = {"n_heads": 2, "dim_head": 8, "projection_dim": 16}
FIT = {"max_epochs": 2, "n_models": 1, "batch_size": 32, "device": "cpu", "progress_bar": False}


def _tissue(seed: int = 0) -> np.ndarray:
    """A 420 x 420 RGB 'H&E' with nuclei-like blobs whose density changes across three column bands."""
    rng = np.random.default_rng(seed)
    h = w = int((N_SIDE + 1) * PITCH)
    noise = ndimage.gaussian_filter(rng.normal(size=(h, w)), 3)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    band = np.clip(np.arange(w)[None, :] * 3 // w, 0, 2)
    img = np.full((h, w, 3), 235.0)
    img[noise > np.array([0.55, 0.5, 0.45])[band]] = [90, 60, 150]
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def _slide(img: np.ndarray, factor: float = 1.0, *, known: bool = True, seed: int = 0) -> ad.AnnData:
    """36 spots over `img` (downsampled `factor` times: coordinates and spot size scaled, µm unchanged)."""
    rng = np.random.default_rng(seed)
    rows, cols = (v.ravel() for v in np.meshgrid(np.arange(N_SIDE), np.arange(N_SIDE), indexing="ij"))
    band = np.clip(cols * 3 // N_SIDE, 0, 2)
    base = rng.gamma(2.0, 2.0, size=(3, 20))
    base[np.arange(3), np.arange(3)] *= 8
    a = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(base[band]).astype(np.float32) + 1),
        obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=[f"s{i}" for i in range(rows.size)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(20)]),
    )
    a.obsm["spatial"] = np.column_stack([PITCH * (cols + 1), PITCH * (rows + 1)]).astype(np.float64) / factor
    meta = {"spot_diameter_um": 40.0 * MPP} if known else {}
    a.uns["spatial"] = {
        "lib": {
            "images": {"hires": img},
            "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 40.0 / factor},
            "metadata": meta,
        }
    }
    return a


def _half(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    return img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def img() -> np.ndarray:
    return _tissue()


@pytest.fixture(scope="module")
def ref(img) -> ad.AnnData:
    a = _slide(img)
    hs.pp.image_features(a, **FEATURES, **RUN)
    return a


@pytest.fixture(scope="module")
def model(ref):
    return hs.tl.mclstexp_train(ref, model_kwargs=TINY, **FIT)


def _snapshot(a: ad.AnnData) -> tuple:
    return set(a.obsm), set(a.uns), set(a.layers), a.obs.shape, a.var.shape


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over features of the Pearson r across spots (features constant in either set skipped)."""
    keep = (a.std(0) > 0) & (b.std(0) > 0)
    return float(np.mean([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in np.flatnonzero(keep)]))


def test_settings_recorded_and_saved(model, ref, tmp_path):
    s = model.feature_settings
    assert s["encoder"] == "mobilenet_v2" and s["weights"] == "random" and s["random_state"] == 0
    assert s["input_size"] == 32 and s["method"] == "patch" and s["layers"] == "last"
    assert s["tf_padding"] is False and s["dihedral"] is False and "context" not in s
    assert s["patch_size_um"] == pytest.approx(64.0) and s["patch_size_px"] == pytest.approx(64.0)
    assert s["mpp"] == pytest.approx(MPP)
    np.testing.assert_allclose(s["mean"], ref.uns["img_features"]["params"]["mean"])
    kw = model.image_features_kwargs
    assert kw["patch_size_um"] == pytest.approx(64.0) and kw["weights"] is None and kw["random_state"] == 0
    assert "patch_size" not in kw and "pca" not in kw
    model.save(tmp_path / "m")
    back = hs.models.MclSTExp.load(tmp_path / "m")
    assert back.feature_settings == s
    assert back.image_features_kwargs.keys() == kw.keys()
    q = _slide(ref.uns["spatial"]["lib"]["images"]["hires"])
    # the loaded model (no reference AnnData) makes the query's features itself, as the trained one does
    np.testing.assert_allclose(back.predict(q, n_neighbors=5), model.predict(q, n_neighbors=5), rtol=1e-5, atol=1e-6)


def test_query_without_features_gets_the_models(model, ref):
    q = _slide(ref.uns["spatial"]["lib"]["images"]["hires"])
    out = hs.tl.mclstexp_predict(q, model=model, n_neighbors=5, progress_bar=False, copy=True)
    assert "img_features" not in q.obsm and "mclstexp" not in q.uns  # copy=True: the input is unchanged
    np.testing.assert_allclose(out.obsm["img_features"], ref.obsm["img_features"], rtol=1e-4, atol=1e-5)
    assert out.obsm["img_features"].dtype == np.float32
    assert out.uns["img_features"]["params"]["patch_size_um"] == pytest.approx(64.0)
    assert out.uns["mclstexp"]["params"]["features_computed"] is True
    given = ref.copy()
    hs.tl.mclstexp_predict(given, model=model, n_neighbors=5)
    assert given.uns["mclstexp"]["params"]["features_computed"] is False
    np.testing.assert_allclose(out.obsm["mclstexp"].to_numpy(), given.obsm["mclstexp"].to_numpy(), atol=1e-5)


def test_other_magnification_same_physical_patch(model, ref, img, monkeypatch):
    warned = []
    monkeypatch.setattr(sc.logging, "warning", lambda msg, *a, **k: warned.append(msg))
    q = _slide(_half(img), factor=2.0)
    hs.tl.mclstexp_predict(q, model=model, n_neighbors=5, progress_bar=False)
    assert len(warned) == 1 and "0.5 µm/px" not in warned[0] and "2 µm/px" in warned[0] and "resampled" in warned[0]
    p = q.uns["img_features"]["params"]
    assert p["patch_size_px"] == pytest.approx(32.0) and p["patch_size_um"] == pytest.approx(64.0)
    after = q.obsm["img_features"]
    # today's pixel patch (64 px at half resolution: twice the tissue) for comparison
    before = hs.pp.image_features(
        _slide(_half(img), factor=2.0), **(FEATURES | {"patch_size_um": None, "patch_size": 64}), **RUN, copy=True
    ).obsm["img_features"]
    f0 = ref.obsm["img_features"]
    rel_after = np.linalg.norm(after - f0) / np.linalg.norm(f0)
    rel_before = np.linalg.norm(before - f0) / np.linalg.norm(f0)
    assert _corr(f0, after) > 0.7 > 0.3 > _corr(f0, before)
    assert rel_after < 0.25 < rel_before


def test_unknown_resolution_raises_before_any_work(model, img):
    q = _slide(_half(img), factor=2.0, known=False)
    before = _snapshot(q)
    with pytest.raises(ValueError, match=r"resolution is unknown.*`mpp=` of `hs.tl.mclstexp_predict`"):
        hs.tl.mclstexp_predict(q, model=model, n_neighbors=5, progress_bar=False)
    assert _snapshot(q) == before
    with pytest.raises(ValueError, match=r"resolution is unknown.*mpp="):
        model.predict(q, n_neighbors=5)
    with pytest.raises(ValueError, match="mpp"):  # a bad value is named too, and nothing is written
        hs.tl.mclstexp_predict(q, model=model, n_neighbors=5, mpp=-1.0, progress_bar=False)
    assert _snapshot(q) == before
    hs.tl.mclstexp_predict(q, model=model, n_neighbors=5, mpp=2 * MPP, progress_bar=False)
    known = _slide(_half(img), factor=2.0)
    hs.tl.mclstexp_predict(known, model=model, n_neighbors=5, progress_bar=False)
    np.testing.assert_allclose(q.obsm["img_features"], known.obsm["img_features"], rtol=1e-5, atol=1e-6)
    assert q.uns["mclstexp"]["params"]["mpp"] == 2 * MPP


def test_features_made_otherwise_raise(model, img):
    q = _slide(_half(img), factor=2.0)
    hs.pp.image_features(q, **(FEATURES | {"input_size": 48}), **RUN)
    before = _snapshot(q)
    with pytest.raises(
        ValueError, match=r"\['input_size'\]` is 48 .*input_size=32.*Delete `adata.obsm\['img_features'\]`"
    ):
        hs.tl.mclstexp_predict(q, model=model, n_neighbors=5)
    assert _snapshot(q) == before
    # the patch in pixels on a slide whose µm per pixel is unknown: a guess, refused
    q = _slide(_half(img), factor=2.0, known=False)
    hs.pp.image_features(q, **(FEATURES | {"patch_size_um": None, "patch_size": 64}), **RUN)
    before = _snapshot(q)
    with pytest.raises(ValueError, match=r"unknown scale.*64 µm.*mpp="):
        hs.tl.mclstexp_predict(q, model=model, n_neighbors=5)
    assert _snapshot(q) == before
    # the same µm at another magnification is accepted
    q = _slide(_half(img), factor=2.0)
    hs.pp.image_features(q, **model.image_features_kwargs, **RUN)
    hs.tl.mclstexp_predict(q, model=model, n_neighbors=5)
    assert q.uns["mclstexp"]["params"]["features_computed"] is False


def test_reference_pca_is_recorded_and_reused(img, tmp_path):
    ref = _slide(img)
    hs.pp.image_features(ref, **FEATURES, n_components=8, **RUN)
    m = hs.tl.mclstexp_train(ref, model_kwargs=TINY, **FIT)
    assert m.feature_settings["n_components"] == 8 and "pca" in m.image_features_kwargs
    m.save(tmp_path / "m")
    back = hs.models.MclSTExp.load(tmp_path / "m")
    np.testing.assert_array_equal(
        back.image_features_kwargs["pca"]["components"], ref.uns["img_features"]["pca"]["components"]
    )
    q = _slide(img)
    hs.tl.mclstexp_predict(q, model=back, n_neighbors=5, progress_bar=False)
    np.testing.assert_allclose(q.obsm["img_features"], ref.obsm["img_features"], rtol=1e-4, atol=1e-4)


def test_reference_slides_at_two_resolutions(img):
    a, b = _slide(img), _slide(_half(img), factor=2.0)  # the same tissue, half the pixels
    a.obs_names, b.obs_names = "A_" + a.obs_names, "B_" + b.obs_names
    ref = ad.concat([a, b], label="library_id", keys=["A", "B"])
    ref.uns["spatial"] = {"A": a.uns["spatial"]["lib"], "B": b.uns["spatial"]["lib"]}
    hs.pp.image_features(ref, library_key="library_id", **FEATURES, **RUN)  # 64 µm: 64 and 32 px
    s = hs.tl.mclstexp_train(ref, model_kwargs=TINY, **FIT).feature_settings
    assert s["patch_size_um"] == pytest.approx(64.0) and "patch_size_px" not in s and "mpp" not in s
    # one pixel patch on slides 2x apart: no µm is recorded, and the model refuses to guess one for a query
    pixels = FEATURES | {"patch_size_um": None, "patch_size": 64}
    hs.pp.image_features(ref, library_key="library_id", **pixels, **RUN)
    m = hs.tl.mclstexp_train(ref, model_kwargs=TINY, **FIT)
    assert "patch_size_um" not in m.feature_settings and m.feature_settings["patch_size_px"] == 64.0
    q = _slide(img)
    with pytest.raises(ValueError, match=r"reference had no µm scale.*image_features_kwargs"):
        hs.tl.mclstexp_predict(q, model=m, n_neighbors=5)
    assert "mclstexp" not in q.uns and "img_features" not in q.obsm


def test_no_recorded_settings_keeps_the_old_error(ref):
    a = ref.copy()
    del a.uns["img_features"]
    m = hs.tl.mclstexp_train(a, model_kwargs=TINY, **FIT)
    assert m.feature_settings == {}
    q = _slide(ref.uns["spatial"]["lib"]["images"]["hires"])
    with pytest.raises(KeyError, match=r"obsm\['img_features'\]` not found.*hs.pp.image_features"):
        hs.tl.mclstexp_predict(q, model=m, n_neighbors=5)
    assert "mclstexp" not in q.uns


def test_spatialdata_tiles_at_the_models_scale(model, img):
    spatialdata = pytest.importorskip("spatialdata")
    for mpp in (None, 2 * MPP):
        s = spatialdata.SpatialData()
        hs.io.add_image(s, _half(img), mpp=mpp)
        hs.pp.tile_image(s, tile_size=32, tissue_only=False)
        if mpp is None:
            keys = set(s.tables["tiles"].obsm)
            with pytest.raises(ValueError, match=r"resolution is unknown.*coordinate system 'global'.*mpp="):
                hs.tl.mclstexp_predict(s, table_key="tiles", model=model, n_neighbors=5, progress_bar=False)
            assert set(s.tables["tiles"].obsm) == keys and "mclstexp" not in s.tables["tiles"].uns
            continue
        hs.tl.mclstexp_predict(s, table_key="tiles", model=model, n_neighbors=5, progress_bar=False)
        t = s.tables["tiles"]
        assert t.obsm["mclstexp"].shape == (t.n_obs, len(model.genes))
        assert t.uns["img_features"]["params"]["patch_size_um"] == pytest.approx(64.0)
        assert t.uns["img_features"]["params"]["patch_size_px"] == pytest.approx(32.0)


def test_add_image_mpp_and_its_deprecated_alias(img):
    spatialdata = pytest.importorskip("spatialdata")
    a, b = spatialdata.SpatialData(), spatialdata.SpatialData()
    hs.io.add_image(a, img, mpp=0.5)
    with pytest.warns(FutureWarning, match=r"`microns_per_pixel=`.*deprecated.*`mpp=`"):
        hs.io.add_image(b, img, microns_per_pixel=0.5)
    assert hs.io.microns_per_unit(a, "global") == hs.io.microns_per_unit(b, "global") == 0.5
    with pytest.raises(ValueError, match=r"Pass `mpp=` only"):
        hs.io.add_image(spatialdata.SpatialData(), img, mpp=0.5, microns_per_pixel=0.5)


# ---- real data: a tiny her2st model predicting the two SVS slides (add_image -> tile_image -> features -> predict) --
WSI = {"cmu": "CMU-1-Small-Region.svs", "tcga": "TCGA-CR-7395-01A-01-TS1.svs"}


@pytest.fixture(scope="module")
def her2st_model(data_dir):
    a = hs.datasets.her2st("C2", data_dir=data_dir, image=False)[:48].copy()
    hs.pp.image_features(a, **(FEATURES | {"patch_size_um": 100.0}), **RUN)  # about 130 px on her2st
    model = hs.tl.mclstexp_train(a, n_top_genes=30, model_kwargs=TINY, **FIT)
    model.test_px_per_um = a.uns["spatial"]["C2"]["metadata"]["pixels_per_um"]  # what the loader measured
    return model


def _wsi_tiles(data_dir, name: str, mpp: float | None):
    spatialdata = pytest.importorskip("spatialdata")
    path = data_dir / "wsi" / WSI[name]
    if not path.exists():
        pytest.skip(f"{path} not found")
    s = spatialdata.SpatialData()
    hs.io.add_image(s, path, mpp=mpp)
    hs.pp.tile_image(s, tile_size=512)
    return s


@pytest.mark.data
def test_her2st_model_records_um(her2st_model):
    s = her2st_model.feature_settings
    assert s["patch_size_um"] == pytest.approx(100.0)
    assert s["mpp"] == pytest.approx(1 / her2st_model.test_px_per_um, rel=1e-6)
    assert s["patch_size_px"] == pytest.approx(100.0 * her2st_model.test_px_per_um, rel=1e-6)


@pytest.mark.data
def test_cmu_svs_through_the_chain(data_dir, her2st_model):
    s = _wsi_tiles(data_dir, "cmu", None)  # Aperio MPP 0.499 read from the file
    t = s.tables["tiles"]
    hs.pp.image_features(s, table_key="tiles", **her2st_model.image_features_kwargs, **RUN)
    assert t.uns["img_features"]["params"]["patch_size_px"] == pytest.approx(100.0 / 0.499, rel=1e-3)
    hs.tl.mclstexp_predict(s, table_key="tiles", model=her2st_model, n_neighbors=10)
    pred = t.obsm["mclstexp"]
    assert pred.shape == (t.n_obs, 30) and np.isfinite(pred.to_numpy()).all()
    assert t.uns["mclstexp"]["params"]["features_computed"] is False
    # the same without the features step: predict makes them, equal
    s2 = _wsi_tiles(data_dir, "cmu", None)
    hs.tl.mclstexp_predict(s2, table_key="tiles", model=her2st_model, n_neighbors=10, progress_bar=False)
    np.testing.assert_allclose(s2.tables["tiles"].obsm["img_features"], t.obsm["img_features"], rtol=1e-4, atol=1e-5)


@pytest.mark.data
def test_tcga_svs_without_resolution_needs_mpp(data_dir, her2st_model):
    s = _wsi_tiles(data_dir, "tcga", None)  # no µm-per-pixel metadata in the file
    t = s.tables["tiles"]
    keys = (set(t.obsm), set(t.uns))
    with pytest.raises(ValueError, match=r"resolution is unknown.*mpp="):
        hs.tl.mclstexp_predict(s, table_key="tiles", model=her2st_model, n_neighbors=10, progress_bar=False)
    assert (set(t.obsm), set(t.uns)) == keys
    # features asked in µm: the same clear error, before any work
    with pytest.raises(ValueError, match=r"no µm scale.*`mpp=`.*hs\.io\.add_image"):
        hs.pp.image_features(s, table_key="tiles", **her2st_model.image_features_kwargs, **RUN)
    assert (set(t.obsm), set(t.uns)) == keys
    # features made with the tile in pixels (all that can be done without µm) are refused as well
    hs.pp.image_features(s, table_key="tiles", **(her2st_model.image_features_kwargs | {"patch_size_um": None}), **RUN)
    keys = (set(t.obsm), set(t.uns))
    with pytest.raises(ValueError, match=r"unknown scale.*mpp="):
        hs.tl.mclstexp_predict(s, table_key="tiles", model=her2st_model, n_neighbors=10)
    assert (set(t.obsm), set(t.uns)) == keys
    # with the resolution given (at hs.io.add_image, or to mclstexp_predict) it works
    s = _wsi_tiles(data_dir, "tcga", 0.5)
    hs.tl.mclstexp_predict(s, table_key="tiles", model=her2st_model, n_neighbors=10, progress_bar=False)
    t = s.tables["tiles"]
    assert t.obsm["mclstexp"].shape == (t.n_obs, 30)
    assert t.uns["img_features"]["params"]["patch_size_px"] == pytest.approx(200.0)
    s = _wsi_tiles(data_dir, "tcga", None)
    hs.tl.mclstexp_predict(s, table_key="tiles", model=her2st_model, n_neighbors=10, mpp=0.5, progress_bar=False)
    np.testing.assert_allclose(s.tables["tiles"].obsm["img_features"], t.obsm["img_features"], rtol=1e-4, atol=1e-5)
