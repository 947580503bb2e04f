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
    assert q.uns["mclstexp"]["params"]["expression_rank"] == 16  # the default, recorded beside the predictions
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


# ---- baselines, per-gene trust, ensemble spread and embedding (issue #16, items 3-5) ---------------------------------

CV_KW = {
    "n_top": 10,
    "model_kwargs": {**TINY["model_kwargs"], "n_top_genes": 20},
    "train_kwargs": {"max_epochs": 2, "batch_size": 32, "n_models": 2, "device": "cpu"},
    "predict_kwargs": {"n_neighbors": 20},
    "knn_k": 5,
}


@pytest.fixture(scope="module")
def two_slides_module(adata_module):
    # two slides like `adata_two_slides`, built once for the module: the second a noisy replicate of the first
    import scipy.sparse as sp

    rng = np.random.default_rng(1)
    parts = []
    for lib in ("s1", "s2"):
        a = adata_module.copy()
        if lib == "s2":
            a.X = sp.csr_matrix(rng.poisson(a.X.toarray()).astype(np.float32))
            a.obsm["img_features"] = a.obsm["img_features"] + rng.normal(0, 0.3, a.obsm["img_features"].shape)
            a.obsm["img_features"] = a.obsm["img_features"].astype(np.float32)
        a.obs_names = [f"{lib}_{n}" for n in a.obs_names]
        a.obs["library_id"] = lib
        a.uns["spatial"] = {lib: adata_module.uns["spatial"]["lib"]}
        parts.append(a)
    out = ad.concat(parts, uns_merge="unique")
    out.obs["library_id"] = pd.Categorical(out.obs["library_id"])
    return out


@pytest.fixture(scope="module")
def cv(two_slides_module):
    kw = {**CV_KW, "model_kwargs": {**CV_KW["model_kwargs"], "smooth_predictions": 0.5}}  # baselines smoothed too
    return hs.tl.mclstexp_cross_validate(
        two_slides_module, baselines=("bleep", "ridge", "ridge_pca256", "knn"), return_predictions=True, **kw
    )


def _bh(p):
    """Benjamini-Hochberg by hand: p_(i) m / i, made monotone from the largest down, NaN ignored."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    order = idx[np.argsort(p[idx])]
    adj = p[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    out[order] = np.minimum(adj, 1)
    return out


def test_cross_validate_default_baselines(adata_two_slides):
    res = hs.tl.mclstexp_cross_validate(adata_two_slides, groups=["s1"], **{**CV_KW, "train_kwargs": FIT})
    assert list(res["overall"].index) == ["mclstexp", "ridge_pca256", "knn"]  # the cheap baselines by default
    assert "predictions" not in res and "prediction_std" not in res
    assert set(res["summary"]["fold"]) == {"s1"}


def test_cross_validate_fdr_and_gene_scores(cv):
    methods = ["mclstexp", "bleep", "ridge", "ridge_pca256", "knn"]
    assert list(cv["overall"].index) == methods
    s = cv["summary"]
    assert "n_genes_fdr05" in s and (s["n_genes_fdr05"] >= 0).all()
    n_test = s.drop_duplicates("fold").set_index("fold")["n_test"]
    for m in methods:
        r, p, q = cv["pearson"][m], cv["pvalue"][m], cv["fdr"][m]
        assert q.shape == p.shape == r.shape and list(q.columns) == ["s1", "s2"]
        for fold in q.columns:
            # BH within a fold over the genes of that fold's panel
            np.testing.assert_allclose(q[fold].to_numpy(), _bh(p[fold].to_numpy()), rtol=1e-10, equal_nan=True)
            row = s[(s["method"] == m) & (s["fold"] == fold)].iloc[0]
            assert row["n_genes_fdr05"] == int(((q[fold] < 0.05) & (r[fold] > 0)).sum())
        gs = cv["gene_scores"][m]
        assert list(gs.columns) == [
            "pcc",
            "pcc_median",
            "pcc_sd",
            "n_folds",
            "n_spots",
            "n_eff",
            "pvalue",
            "fdr",
            "frac_folds_fdr05",
            "mean_expression",
        ]
        assert gs.index.equals(r.index)
        np.testing.assert_allclose(gs["pcc"], r.mean(axis=1), equal_nan=True)
        np.testing.assert_array_equal(gs["n_folds"], r.notna().sum(axis=1))
        # Stouffer's combination of Fisher z by hand, weights sqrt(n_eff - 3)
        from scipy.stats import norm

        ne = cv["n_eff"][m]
        assert ((ne <= n_test[ne.columns].to_numpy()) & (ne >= 3) | ne.isna()).all().all()
        assert ne.isna().equals(r.isna())
        w = (ne.to_numpy() - 3.0) * r.notna().to_numpy()
        w = np.nan_to_num(w)
        z = np.arctanh(r.fillna(0).to_numpy())
        big_z = (w * z).sum(axis=1) / np.sqrt(w.sum(axis=1))
        ok = gs["n_folds"].to_numpy() > 0
        np.testing.assert_allclose(gs["pvalue"].to_numpy()[ok], norm.sf(big_z[ok]), rtol=1e-8)
        np.testing.assert_allclose(gs["fdr"], _bh(gs["pvalue"]), rtol=1e-10, equal_nan=True)
        sig = ((q < 0.05) & (r > 0)).sum(axis=1) / gs["n_folds"].clip(lower=1)
        np.testing.assert_allclose(gs["frac_folds_fdr05"].to_numpy()[ok], sig.to_numpy()[ok])
    # the planted signal: domain genes are predictable from domain-driven image features (ridge: 2 epochs of the tiny
    # mclSTExp are too few to say)
    assert (cv["gene_scores"]["ridge"]["fdr"] < 0.05).mean() > 0.8


def test_cross_validate_predictions_and_std(cv, two_slides_module):
    a = two_slides_module
    for fold in ("s1", "s2"):
        obs = cv["observed"][fold]
        assert list(obs.index) == list(a.obs_names[a.obs["library_id"] == fold])
        for m in ("mclstexp", "bleep", "ridge", "ridge_pca256", "knn"):
            p = cv["predictions"][m][fold]
            assert p.shape == obs.shape and p.dtypes.eq(np.float32).all() and p.columns.equals(obs.columns)
            r = hs.metrics.pearson_per_gene(obs, p)
            np.testing.assert_allclose(r.to_numpy(), cv["pearson"][m][fold].loc[obs.columns].to_numpy(), atol=1e-6)
        # a seed ensemble (n_models=2) gives a spread; the regression baselines have none
        assert set(cv["prediction_std"]) == {"mclstexp", "bleep"}
        sd = cv["prediction_std"]["mclstexp"][fold]
        assert sd.shape == obs.shape and (sd.to_numpy() >= 0).all() and (sd.to_numpy() > 0).any()


def test_ridge_pca256_and_knn_match_sklearn(cv, two_slides_module):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.neighbors import KNeighborsRegressor

    a = two_slides_module
    test = (a.obs["library_id"] == "s1").to_numpy()
    x = a.obsm["img_features"].astype(np.float32)
    xtr, xte = x[~test], x[test]
    mu, sd = xtr.mean(0), np.maximum(xtr.std(0), 1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    panel = cv["observed"]["s1"].columns
    counts = a[~test, panel].X.toarray().astype(np.float64)
    ytr = np.log1p(1e4 * counts / counts.sum(1, keepdims=True))
    k = min(256, xtr.shape[0] - 1, xtr.shape[1])  # 16 features here: all components
    pca = PCA(n_components=k).fit(xtr)
    ridge = RidgeCV(alphas=np.logspace(-2, 6, 17)).fit(pca.transform(xtr), ytr)
    # the model's smoothing of the predictions (0.5 here) over ring 1 of the held-out slide's graph, by hand
    q = a[test].copy()
    hs.pp.spatial_graph(q)
    g = q.obsp["spatial_connectivities"].toarray() > 0
    g = g | g.T
    np.fill_diagonal(g, False)

    # before it, the model's principal axes of the training expression (16 by default), by hand: an SVD
    ym = ytr.mean(0)
    v = np.linalg.svd(ytr - ym, full_matrices=False)[2][:16]

    def smooth(p):
        p = np.clip((p - ym) @ v.T @ v + ym, ytr.min(0), ytr.max(0))
        return 0.5 * p + 0.5 * (g @ p) / g.sum(axis=1, keepdims=True)

    got = cv["predictions"]["ridge_pca256"]["s1"]
    np.testing.assert_allclose(got, smooth(ridge.predict(pca.transform(xte))), atol=1e-4)
    knn = KNeighborsRegressor(n_neighbors=5).fit(xtr, ytr)
    np.testing.assert_allclose(cv["predictions"]["knn"]["s1"], smooth(knn.predict(xte)), atol=1e-4)


def test_cross_validate_trust_bad_input(adata_two_slides):
    with pytest.raises(ValueError, match="ridge_pca"):
        hs.tl.mclstexp_cross_validate(adata_two_slides, baselines=("ridge_pca",))
    q = adata_two_slides.copy()
    del q.obsm["spatial"]
    with pytest.raises(KeyError, match=r"obsm\['spatial'\].*smooth_neighbors"):
        hs.tl.mclstexp_cross_validate(q, predict_kwargs={"smooth_neighbors": 2}, pvalues="independent")


@pytest.fixture(scope="module")
def ensemble(adata_module):
    return hs.tl.mclstexp_train(
        adata_module, genes=list(adata_module.var_names), random_state=1, **TINY, **{**FIT, "n_models": 2}
    )


def test_predict_ensemble_std_and_embedding(adata, ensemble):
    genes = list(adata.var_names)
    q = adata[:, ::-1].copy()
    hs.tl.mclstexp_predict(q, model=ensemble, n_neighbors=10)
    single = [hs.tl.mclstexp_train(adata, genes=genes, random_state=s, **TINY, **FIT) for s in (1, 2)]
    members = np.stack([m.predict(adata, n_neighbors=10) for m in single])
    sd = q.obsm["mclstexp_std"]
    assert isinstance(sd, pd.DataFrame) and list(sd.columns) == genes and sd.dtypes.eq(np.float32).all()
    np.testing.assert_allclose(sd.to_numpy(), members.std(axis=0, ddof=1), rtol=1e-4, atol=1e-5)
    col = [genes.index(g) for g in q.var_names]
    np.testing.assert_array_equal(q.layers["mclstexp_std"], sd.to_numpy()[:, col])
    # the model's predict returns the same pair
    mean, std = ensemble.predict(q, n_neighbors=10, return_std=True)
    np.testing.assert_array_equal(std, sd.to_numpy())
    np.testing.assert_array_equal(mean, q.obsm["mclstexp"].to_numpy())
    # embedding: the first member's image embedding, L2-normalised, float32
    emb = q.obsm["X_mclstexp"]
    assert emb.dtype == np.float32 and emb.shape == (q.n_obs, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=1e-5)
    first = single[0].get_image_embedding(adata)
    np.testing.assert_allclose(emb, first / np.linalg.norm(first, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert q.uns["mclstexp"]["params"]["embedding_key"] == "X_mclstexp"


def test_predict_single_model_no_std(adata, model):
    mean, std = model.predict(adata, n_neighbors=10, return_std=True)
    assert std is None
    q = adata.copy()
    hs.tl.mclstexp_predict(q, model=model, n_neighbors=10, key_added="pred")
    assert "pred_std" not in q.obsm and "pred_std" not in q.layers
    assert q.obsm["X_pred"].shape == (q.n_obs, 16) and q.obsm["X_pred"].dtype == np.float32
    np.testing.assert_array_equal(q.obsm["pred"].to_numpy(), mean)


def test_predict_stale_outputs_removed(adata, ensemble, model):
    scores = pd.DataFrame({"pcc": np.linspace(0, 0.5, 30), "fdr": 0.01}, index=list(adata.var_names))
    hs.tl.mclstexp_predict(adata, model=ensemble, n_neighbors=10, gene_scores=scores)
    assert "mclstexp_std" in adata.obsm and "mclstexp_pcc" in adata.var
    hs.tl.mclstexp_predict(adata, model=model, n_neighbors=10)  # one model, no scores: nothing of the first left
    assert "mclstexp_std" not in adata.obsm and "mclstexp_std" not in adata.layers
    assert "mclstexp_pcc" not in adata.var and "gene_scores" not in adata.uns["mclstexp"]


def test_predict_gene_scores(adata, model, cv):
    genes = list(adata.var_names)
    rng = np.random.default_rng(0)
    scores = pd.DataFrame(
        {"pcc": rng.uniform(-0.1, 0.6, 30), "fdr": rng.uniform(0, 0.2, 30), "note": "x"}, index=genes[::-1]
    )
    q = adata.copy()
    hs.tl.mclstexp_predict(q, model=model, n_neighbors=10, gene_scores=scores)
    gs = q.uns["mclstexp"]["gene_scores"]
    assert gs["gene"] == model.genes and set(gs) == {"gene", "pcc", "fdr"}  # numeric columns only
    np.testing.assert_array_equal(gs["pcc"], scores["pcc"].loc[model.genes].to_numpy())
    np.testing.assert_array_equal(q.var["mclstexp_pcc"].to_numpy(), scores["pcc"].loc[q.var_names].to_numpy())
    np.testing.assert_array_equal(q.var["mclstexp_fdr"].to_numpy(), scores["fdr"].loc[q.var_names].to_numpy())
    # a query holding only some panel genes (plus others): NaN for the others
    other = adata[:, :5].copy()
    other.var_names = [*other.var_names[:3], "foo", "bar"]
    hs.tl.mclstexp_predict(other, model=model, n_neighbors=10, gene_scores=scores)
    assert other.var["mclstexp_pcc"].isna().tolist() == [False, False, False, True, True]
    # an H&E-only query: the scores in uns only
    he = ad.AnnData(obs=adata.obs[[]].copy())
    he.obsm["img_features"] = adata.obsm["img_features"].copy()
    hs.tl.mclstexp_predict(he, model=model, n_neighbors=10, gene_scores=scores)
    assert he.n_vars == 0 and len(he.uns["mclstexp"]["gene_scores"]["pcc"]) == 30
    # a cross-validation result: its mclSTExp table; genes it lacks get NaN with a warning
    with pytest.warns(UserWarning, match="no score for"):
        hs.tl.mclstexp_predict(he, model=model, n_neighbors=10, gene_scores=cv)
    got = pd.Series(he.uns["mclstexp"]["gene_scores"]["pcc"], index=model.genes)
    table = cv["gene_scores"]["mclstexp"]["pcc"]
    common = [g for g in model.genes if g in table.index]
    np.testing.assert_array_equal(got[common].to_numpy(), table[common].to_numpy())
    assert got.drop(common).isna().all()
    assert "mean_expression" in he.uns["mclstexp"]["gene_scores"]


def test_predict_gene_scores_bad_input(adata, model):
    before = adata.copy()
    with pytest.raises(ValueError, match="none of the model's 30 genes"):
        hs.tl.mclstexp_predict(adata, model=model, gene_scores=pd.DataFrame({"pcc": [0.1]}, index=["nope"]))
    with pytest.raises(KeyError, match="'pcc'"):
        hs.tl.mclstexp_predict(adata, model=model, gene_scores=pd.DataFrame({"r": [0.1]}, index=["gene0"]))
    with pytest.raises(TypeError, match="gene_scores"):
        hs.tl.mclstexp_predict(adata, model=model, gene_scores=[0.1, 0.2])
    with pytest.raises(KeyError, match="bleep"):
        hs.tl.mclstexp_predict(adata, model=model, gene_scores={"gene_scores": {"bleep": None}})
    assert set(adata.obsm) == set(before.obsm) and set(adata.uns) == set(before.uns)
    assert list(adata.var.columns) == list(before.var.columns)


def test_predict_trust_round_trip_and_copy(adata, ensemble, tmp_path):
    scores = pd.DataFrame({"pcc": np.linspace(0, 0.5, 30), "fdr": np.linspace(0.001, 0.3, 30)}, index=adata.var_names)
    before = adata.copy()
    q = hs.tl.mclstexp_predict(adata, model=ensemble, n_neighbors=10, gene_scores=scores, copy=True)
    assert set(adata.obsm) == set(before.obsm) and list(adata.var.columns) == list(before.var.columns)
    assert "mclstexp" not in adata.uns
    for how in ("h5ad", "zarr"):
        path = tmp_path / f"q.{how}"
        getattr(q, f"write_{how}")(path)
        back = getattr(ad, f"read_{how}")(path)
        pd.testing.assert_frame_equal(back.obsm["mclstexp_std"], q.obsm["mclstexp_std"])
        np.testing.assert_array_equal(back.layers["mclstexp_std"], q.layers["mclstexp_std"])
        np.testing.assert_array_equal(back.obsm["X_mclstexp"], q.obsm["X_mclstexp"])
        assert back.obsm["X_mclstexp"].dtype == np.float32
        pd.testing.assert_series_equal(back.var["mclstexp_fdr"], q.var["mclstexp_fdr"])
        gs = back.uns["mclstexp"]["gene_scores"]
        assert list(gs["gene"]) == ensemble.genes
        np.testing.assert_array_equal(gs["pcc"], q.uns["mclstexp"]["gene_scores"]["pcc"])
        # the plot reads the scores back from the file too (no mean expression in these scores)
        with pytest.raises(KeyError, match="mean_expression"):
            hs.pl.gene_predictability(back, show=False)


def test_predict_determinism_embedding(adata, model):
    a = hs.tl.mclstexp_predict(adata, model=model, n_neighbors=10, copy=True)
    b = hs.tl.mclstexp_predict(adata, model=model, n_neighbors=10, copy=True)
    np.testing.assert_array_equal(a.obsm["X_mclstexp"], b.obsm["X_mclstexp"])


def test_domains_from_embedding(adata, model):
    # (`sc.pp.neighbors(he, use_rep="X_mclstexp")` works as well; left out here: its numba compilation takes ~15 s)
    he = ad.AnnData(obs=adata.obs[["domain"]].copy())  # H&E only
    he.obsm["img_features"] = adata.obsm["img_features"].copy()
    he.obsm["spatial"] = adata.obsm["spatial"].copy()
    hs.tl.mclstexp_predict(he, model=model, n_neighbors=10)
    hs.tl.domains(he, use_rep="X_mclstexp", n_clusters=3, refine=False)
    assert he.obs["mclstexp_domain"].nunique() == 3
    # the image features carry the planted domains, and so does the embedding
    assert hs.metrics.ari(he.obs["domain"], he.obs["mclstexp_domain"]) > 0.5


def _n_eff_by_hand(xy, obs, pred, n_classes=13):
    """Dutilleul's effective sample size with explicit loops over the pairs (one slide, all spots)."""
    n = len(xy)
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    iu = np.triu_indices(n, 1)
    edges = np.linspace(0, d[iu].max(), n_classes + 1)
    out = []
    for j in range(obs.shape[1]):
        zx, zy = obs[:, j] - obs[:, j].mean(), pred[:, j] - pred[:, j].mean()
        vx, vy = (zx**2).mean(), (zy**2).mean()
        total = float(n)  # the diagonal: rho = 1 for both
        for c in range(n_classes):
            lo, hi = edges[c], edges[c + 1]
            pairs = [
                (a, b)
                for a in range(n)
                for b in range(n)
                if a != b and (lo < d[a, b] <= hi or (c == 0 and d[a, b] == 0))
            ]
            if not pairs:
                continue
            rx = np.mean([zx[a] * zx[b] for a, b in pairs]) / vx
            ry = np.mean([zy[a] * zy[b] for a, b in pairs]) / vy
            total += len(pairs) * rx * ry
        var = total / n**2
        out.append(np.clip(1 + 1 / var, 3, n))
    return np.asarray(out)


def test_cross_validate_spatial_pvalues(cv, two_slides_module):
    from scipy.stats import t as student_t

    a = two_slides_module
    fold = "s2"
    obs = cv["observed"][fold].to_numpy(np.float64)
    pred = cv["predictions"]["ridge"][fold].to_numpy(np.float64)
    xy = a[a.obs["library_id"] == fold].obsm["spatial"]
    cols = [0, 5, 12, 19]
    expected = _n_eff_by_hand(xy, obs[:, cols], pred[:, cols])
    ne = cv["n_eff"]["ridge"][fold].loc[cv["observed"][fold].columns].to_numpy()
    np.testing.assert_allclose(ne[cols], expected, rtol=1e-8)
    # domain-level genes on a banded slide: far fewer effective spots than spots
    assert np.nanmedian(ne) < 0.5 * len(xy)
    r = cv["pearson"]["ridge"][fold].loc[cv["observed"][fold].columns].to_numpy()
    df = ne - 2
    p = 2 * student_t.sf(np.abs(r) * np.sqrt(df / (1 - r**2)), df)
    np.testing.assert_allclose(cv["pvalue"]["ridge"][fold].loc[cv["observed"][fold].columns], p, rtol=1e-8)


def test_cross_validate_independent_pvalues(adata_two_slides):
    kw = {**CV_KW, "train_kwargs": FIT, "baselines": ("ridge",)}
    res = hs.tl.mclstexp_cross_validate(adata_two_slides, pvalues="independent", return_predictions=True, **kw)
    fold = "s1"
    obs, pred = res["observed"][fold], res["predictions"]["ridge"][fold]
    ref = hs.metrics.pearson_per_gene(obs, pred, return_pvalue=True)
    np.testing.assert_allclose(res["pvalue"]["ridge"][fold].loc[obs.columns], ref["pvalue"], rtol=1e-10)
    assert (res["n_eff"]["ridge"][fold].dropna() == 64).all()
    assert res["params"]["pvalues"] == "independent"
    # spatially random data: the effective sample size stays near the number of spots
    rng = np.random.default_rng(0)
    b = adata_two_slides.copy()
    b.obsm["spatial"] = rng.permutation(b.obsm["spatial"])  # the maps lose their spatial structure
    res = hs.tl.mclstexp_cross_validate(b, groups=[fold], **kw)
    assert res["n_eff"]["ridge"][fold].median() > 40
    with pytest.raises(ValueError, match="pvalues"):
        hs.tl.mclstexp_cross_validate(b, pvalues="moran")
    del b.obsm["spatial"]
    with pytest.raises(KeyError, match="pvalues='independent'"):
        hs.tl.mclstexp_cross_validate(b)
