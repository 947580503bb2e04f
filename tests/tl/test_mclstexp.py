"""Tests of hs.tl.mclstexp_train, hs.tl.mclstexp_predict and hs.tl.mclstexp_cross_validate."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import histospace as hs

TINY = {"model_kwargs": {"n_heads": 2, "dim_head": 8, "projection_dim": 16}}
FIT = {"max_epochs": 2, "batch_size": 32, "n_models": 1, "device": "cpu", "progress_bar": False}


@pytest.fixture(scope="module")
def model(adata_module):
    # one trained model for the tests of this file (the `adata` fixture is rebuilt identically for every test)
    return hs.tl.mclstexp_train(adata_module, genes=list(adata_module.var_names), **TINY, **FIT)


def test_train_returns_model(adata):
    before = adata.copy()
    m = hs.tl.mclstexp_train(adata, n_top_genes=15, **TINY, **FIT)
    assert isinstance(m, hs.models.MclSTExp) and m.is_trained and len(m.genes) == 15
    assert set(adata.uns) == set(before.uns) and set(adata.obsm) == set(before.obsm)  # nothing written


def test_train_and_predict_seed_ensemble(adata):
    genes = list(adata.var_names)
    ens = hs.tl.mclstexp_train(adata, genes=genes, random_state=1, **TINY, **{**FIT, "n_models": 2})
    assert ens.n_models_ == 2
    q = adata.copy()
    hs.tl.mclstexp_predict(q, model=ens, n_neighbors=10)
    assert q.uns["mclstexp"]["params"]["n_models"] == 2
    single = [hs.tl.mclstexp_train(adata, genes=genes, random_state=s, **TINY, **FIT) for s in (1, 2)]
    mean = np.mean([m.predict(adata, n_neighbors=10) for m in single], axis=0)
    col = [genes.index(g) for g in q.var_names]
    np.testing.assert_allclose(q.layers["mclstexp"], mean[:, col], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.obsm["mclstexp"].to_numpy(), mean, rtol=1e-5, atol=1e-6)


def test_predict_writes_layer(adata, model):
    q = adata[:, ::-1].copy()  # same genes, other order
    assert hs.tl.mclstexp_predict(q, model=model, n_neighbors=10) is None
    pred = q.layers["mclstexp"]
    assert pred.shape == q.shape and pred.dtype == np.float32
    # columns follow q's gene order
    direct = model.predict(q, n_neighbors=10)
    col = [model.genes.index(g) for g in q.var_names]
    np.testing.assert_array_equal(pred, direct[:, col])
    # the same predictions in obsm, in the model's gene order, whatever the query's genes
    df = q.obsm["mclstexp"]
    assert isinstance(df, pd.DataFrame) and list(df.columns) == model.genes and df.dtypes.eq(np.float32).all()
    assert list(df.index) == list(q.obs_names)
    np.testing.assert_array_equal(df.to_numpy(), direct)
    p = q.uns["mclstexp"]["params"]
    assert p["n_neighbors"] == 10 and p["weighting"] == "softmax"  # the validated default
    assert "version" in q.uns["mclstexp"]


def test_predict_copy_and_key(adata, model):
    before = adata.copy()
    out = hs.tl.mclstexp_predict(adata, model=model, n_neighbors=5, key_added="pred", copy=True)
    assert "pred" in out.layers and "pred" in out.obsm and "pred" in out.uns
    assert "pred" not in adata.layers and "pred" not in adata.obsm and "pred" not in adata.uns
    np.testing.assert_array_equal(adata.X.toarray(), before.X.toarray())


@pytest.mark.parametrize("weighting", ["inverse_square", "uniform", "softmax"])
def test_predict_weightings(adata, model, weighting):
    out = hs.tl.mclstexp_predict(adata, model=model, n_neighbors=8, weighting=weighting, copy=True)
    x = out.layers["mclstexp"]
    assert np.isfinite(x).all()
    ref = model.reference_expression
    assert x.min() >= ref.min() - 1e-5 and x.max() <= ref.max() + 1e-5  # convex combinations of reference spots


def test_predict_smoothing(adata, model):
    a = hs.tl.mclstexp_predict(adata, model=model, n_neighbors=8, copy=True).layers["mclstexp"]
    b = hs.tl.mclstexp_predict(adata, model=model, n_neighbors=8, smooth_neighbors=4, copy=True)
    assert b.uns["mclstexp"]["params"]["smooth_neighbors"] == 4
    assert not np.array_equal(a, b.layers["mclstexp"])


def test_predict_determinism(adata):
    preds = []
    for _ in range(2):
        m = hs.tl.mclstexp_train(adata, genes=list(adata.var_names), random_state=7, **TINY, **FIT)
        preds.append(hs.tl.mclstexp_predict(adata, model=m, n_neighbors=10, copy=True).layers["mclstexp"])
    np.testing.assert_array_equal(*preds)


def test_predict_he_only_and_other_genes(adata, model):
    # one output contract whatever genes the query holds: predictions in obsm (a DataFrame of the panel genes)
    q = ad.AnnData(obs=adata.obs[["array_row", "array_col"]].copy())  # H&E only: no genes
    q.obsm["spatial"] = adata.obsm["spatial"].copy()
    q.obsm["img_features"] = adata.obsm["img_features"].copy()
    q.uns["spatial"] = adata.uns["spatial"]
    assert hs.tl.mclstexp_predict(q, model=model, n_neighbors=10) is None  # copy=False never returns a new object
    df = q.obsm["mclstexp"]
    assert list(df.columns) == model.genes and df.shape == (q.n_obs, 30)
    np.testing.assert_array_equal(df.to_numpy(), model.predict(q, n_neighbors=10))
    assert q.n_vars == 0 and not q.layers and "mclstexp" in q.uns
    # other genes: obsm only (no layer of another width)
    other = adata[:, :10].copy()
    out = hs.tl.mclstexp_predict(other, model=model, n_neighbors=10, copy=True)
    assert out.obsm["mclstexp"].shape == (other.n_obs, 30) and "mclstexp" not in out.layers
    assert "mclstexp" not in other.obsm and "mclstexp" not in other.uns


def test_predict_h5ad_round_trip(adata, model, tmp_path):
    hs.tl.mclstexp_predict(adata, model=model, n_neighbors=10)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(back.layers["mclstexp"], adata.layers["mclstexp"])
    assert back.uns["mclstexp"]["params"]["n_neighbors"] == 10
    pd.testing.assert_frame_equal(back.obsm["mclstexp"], adata.obsm["mclstexp"])
    q = ad.AnnData(obs=adata.obs[[]].copy())
    q.obsm["img_features"] = adata.obsm["img_features"]
    hs.tl.mclstexp_predict(q, model=model, n_neighbors=10)
    q.write_h5ad(tmp_path / "b.h5ad")
    pd.testing.assert_frame_equal(ad.read_h5ad(tmp_path / "b.h5ad").obsm["mclstexp"], q.obsm["mclstexp"])
    q.write_zarr(tmp_path / "b.zarr")
    pd.testing.assert_frame_equal(ad.read_zarr(tmp_path / "b.zarr").obsm["mclstexp"], q.obsm["mclstexp"])


def test_predict_after_save_load(adata, model, tmp_path):
    model.save(tmp_path / "m")
    loaded = hs.models.MclSTExp.load(tmp_path / "m")
    a = hs.tl.mclstexp_predict(adata, model=model, n_neighbors=10, copy=True).layers["mclstexp"]
    b = hs.tl.mclstexp_predict(adata, model=loaded, n_neighbors=10, copy=True).layers["mclstexp"]
    np.testing.assert_array_equal(a, b)


def test_predict_bad_input(adata, model):
    before = adata.copy()
    q = adata.copy()
    del q.obsm["img_features"]
    with pytest.raises(KeyError, match=r"obsm\['img_features'\].*hs.pp.image_features"):
        hs.tl.mclstexp_predict(q, model=model, n_neighbors=5)
    q = adata.copy()
    q.obsm["img_features"] = np.zeros((q.n_obs, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"obsm\['img_features'\].*16-d"):
        hs.tl.mclstexp_predict(q, model=model, n_neighbors=5)
    q = adata.copy()
    q.obsm["img_features"][3, 2] = np.nan
    with pytest.raises(ValueError, match=r"obsm\['img_features'\].*NaN"):
        hs.tl.mclstexp_predict(q, model=model, n_neighbors=5)
    with pytest.raises(ValueError, match="n_neighbors"):
        hs.tl.mclstexp_predict(adata, model=model, n_neighbors=adata.n_obs + 1)
    with pytest.raises(ValueError, match="weighting"):
        hs.tl.mclstexp_predict(adata, model=model, n_neighbors=5, weighting="gauss")
    with pytest.raises(TypeError, match="model"):
        hs.tl.mclstexp_predict(adata, model="model")
    # features from another encoder than the reference's
    ref = adata.copy()
    ref.uns["img_features"] = {"params": {"encoder": "mobilenet_v2", "patch_size_px": 224}}
    m = hs.tl.mclstexp_train(ref, genes=list(ref.var_names), **TINY, **FIT)
    q = adata.copy()
    q.uns["img_features"] = {"params": {"encoder": "resnet50", "patch_size_px": 224}}
    with pytest.raises(ValueError, match=r"uns\['img_features'\]\['params'\]\['encoder'\]"):
        hs.tl.mclstexp_predict(q, model=m, n_neighbors=5)
    assert "mclstexp" not in q.layers and "mclstexp" not in q.obsm and "mclstexp" not in q.uns
    assert "mclstexp" not in adata.layers and set(adata.uns) == set(before.uns) and set(adata.obsm) == set(before.obsm)


def test_cross_validate_two_slides(adata_two_slides):
    before = adata_two_slides.copy()
    res = hs.tl.mclstexp_cross_validate(
        adata_two_slides,
        groupby="library_id",
        n_top=10,
        model_kwargs={**TINY["model_kwargs"], "n_top_genes": 20},
        train_kwargs={"max_epochs": 2, "batch_size": 32, "n_models": 1, "device": "cpu"},
        predict_kwargs={"n_neighbors": 20},
        baselines=("bleep", "ridge", "knn"),
        knn_k=5,
    )
    s = res["summary"]
    assert set(s["method"]) == {"mclstexp", "bleep", "ridge", "knn"} and set(s["fold"]) == {"s1", "s2"}
    for col in ("pcc_all", "pcc_top", "mse", "mae", "train_time_s", "predict_time_s"):
        assert np.isfinite(s[col]).all()
    assert list(res["overall"].index) == ["mclstexp", "bleep", "ridge", "knn"]
    r = res["pearson"]["mclstexp"]
    assert isinstance(r, pd.DataFrame) and list(r.columns) == ["s1", "s2"] and r.shape[0] >= 20
    assert ((r.abs() <= 1) | r.isna()).all().all()
    assert len(res["top_genes"]["s1"]) == 10
    assert res["pvalue"]["ridge"].shape == res["pearson"]["ridge"].shape
    assert set(adata_two_slides.uns) == set(before.uns) and set(adata_two_slides.layers) == set(before.layers)
    # determinism
    res2 = hs.tl.mclstexp_cross_validate(
        adata_two_slides,
        n_top=10,
        model_kwargs={**TINY["model_kwargs"], "n_top_genes": 20},
        train_kwargs={"max_epochs": 2, "batch_size": 32, "n_models": 1, "device": "cpu"},
        predict_kwargs={"n_neighbors": 20},
    )
    pd.testing.assert_frame_equal(res2["pearson"]["mclstexp"], r)


def test_cross_validate_bad_input(adata_two_slides, adata):
    with pytest.raises(KeyError, match="patient"):
        hs.tl.mclstexp_cross_validate(adata_two_slides, groupby="patient")
    with pytest.raises(ValueError, match="single group"):
        hs.tl.mclstexp_cross_validate(adata, groupby="library_id")
    with pytest.raises(ValueError, match="baselines"):
        hs.tl.mclstexp_cross_validate(adata_two_slides, baselines=("svm",))
