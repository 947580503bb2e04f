import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import histospace as hs


@pytest.fixture
def expr():
    rng = np.random.default_rng(0)
    y_true = rng.poisson(3.0, size=(80, 25)).astype(np.float32)
    y_pred = 0.6 * y_true + rng.normal(0, 1.5, size=y_true.shape)
    return y_true, y_pred


def _scipy_r_p(y_true, y_pred):
    res = [stats.pearsonr(y_true[:, j], y_pred[:, j]) for j in range(y_true.shape[1])]
    return np.array([r.statistic for r in res]), np.array([r.pvalue for r in res])


def test_pearson_matches_scipy(expr):
    y_true, y_pred = expr
    r = hs.metrics.pearson_per_gene(y_true, y_pred)
    assert isinstance(r, np.ndarray) and r.shape == (25,)
    ref_r, ref_p = _scipy_r_p(y_true, y_pred)
    np.testing.assert_allclose(r, ref_r, rtol=1e-10, atol=1e-12)

    df = hs.metrics.pearson_per_gene(y_true, y_pred, return_pvalue=True)
    assert list(df.columns) == ["r", "pvalue"]
    np.testing.assert_allclose(df["r"], ref_r, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(df["pvalue"], ref_p, rtol=1e-8, atol=1e-300)


def test_pearson_pvalue_extremes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    y = np.column_stack([x[:, 0], -x[:, 1], rng.normal(size=40)])  # r = 1, r = -1, r ~ 0
    df = hs.metrics.pearson_per_gene(x, y, return_pvalue=True)
    np.testing.assert_allclose(df["r"].to_numpy()[:2], [1.0, -1.0], atol=1e-12)
    ref_p = [stats.pearsonr(x[:, j], y[:, j]).pvalue for j in range(3)]
    np.testing.assert_allclose(df["pvalue"], ref_p, rtol=1e-8, atol=1e-300)
    assert ((df["pvalue"] >= 0) & (df["pvalue"] <= 1)).all()


def test_pearson_names_sparse_and_dataframe(expr):
    y_true, y_pred = expr
    names = [f"gene{i}" for i in range(25)]
    r = hs.metrics.pearson_per_gene(sp.csr_matrix(y_true), y_pred, var_names=names)
    assert isinstance(r, pd.Series) and list(r.index) == names and r.name == "pearson_r"
    np.testing.assert_allclose(r.to_numpy(), _scipy_r_p(y_true, y_pred)[0], rtol=1e-10, atol=1e-12)
    # both sparse, and DataFrame column names taken when var_names is not given
    r2 = hs.metrics.pearson_per_gene(sp.csc_matrix(y_true), sp.csr_matrix(y_pred))
    np.testing.assert_allclose(r2, r.to_numpy(), rtol=1e-12)
    r3 = hs.metrics.pearson_per_gene(pd.DataFrame(y_true, columns=names), y_pred)
    assert list(r3.index) == names
    df = hs.metrics.pearson_per_gene(y_true, y_pred, var_names=names, return_pvalue=True)
    assert list(df.index) == names


def test_pearson_one_gene_1d():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=30), rng.normal(size=30)
    r = hs.metrics.pearson_per_gene(x, y)
    assert r.shape == (1,)
    assert r[0] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_pearson_blocks(expr, monkeypatch):
    # the computation runs over column blocks; force tiny blocks and compare
    import importlib

    mod = importlib.import_module(hs.metrics.pearson_per_gene.__module__)
    y_true, y_pred = expr
    full = hs.metrics.pearson_per_gene(y_true, y_pred)
    monkeypatch.setattr(mod, "_MAX_BLOCK_ELEMENTS", 3 * y_true.shape[0])
    np.testing.assert_allclose(hs.metrics.pearson_per_gene(sp.csr_matrix(y_true), y_pred), full, rtol=1e-12)


def test_pearson_constant_genes_nan_and_warning(expr):
    y_true, y_pred = expr
    y_true = y_true.copy()
    y_pred = y_pred.copy()
    y_true[:, 2] = 0.0  # constant observed
    y_pred[:, 7] = 0.1  # constant predicted (float round-off must not matter)
    names = [f"gene{i}" for i in range(25)]
    with pytest.warns(UserWarning, match=r"2 of 25 gene\(s\) are constant.*gene2, gene7"):
        r = hs.metrics.pearson_per_gene(y_true, y_pred, var_names=names)
    assert np.isnan(r["gene2"]) and np.isnan(r["gene7"])
    assert r.drop(["gene2", "gene7"]).notna().all()
    with pytest.warns(UserWarning, match=r"2 of 25 gene column\(s\).*\(2, 7\)"):
        df = hs.metrics.pearson_per_gene(y_true, y_pred, return_pvalue=True)
    assert np.isnan(df.loc[[2, 7]].to_numpy()).all()


@pytest.mark.parametrize(
    ("a", "b", "exc", "match"),
    [
        (np.zeros((10, 3)), np.zeros((10, 4)), ValueError, "shape"),
        (np.zeros((10, 3)), np.zeros((9, 3)), ValueError, "shape"),
        (np.ones((1, 3)), np.ones((1, 3)), ValueError, "at least 2 spots"),
        (np.full((5, 2), np.nan), np.ones((5, 2)), ValueError, "y_true.*NaN"),
        (np.ones((5, 2)), np.array([["a", "b"]] * 5), TypeError, "y_pred"),
        (np.ones((5, 2, 2)), np.ones((5, 2, 2)), ValueError, "2-D"),
    ],
)
def test_pearson_bad_input(a, b, exc, match):
    with pytest.raises(exc, match=match):
        hs.metrics.pearson_per_gene(a, b)


def test_pearson_var_names_length():
    with pytest.raises(ValueError, match="var_names"):
        hs.metrics.pearson_per_gene(np.eye(4), np.eye(4), var_names=["a", "b"])


def test_mse_mae_per_gene(expr):
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    y_true, y_pred = expr
    names = [f"gene{i}" for i in range(25)]
    mse = hs.metrics.mse_per_gene(sp.csr_matrix(y_true), y_pred, var_names=names)
    mae = hs.metrics.mae_per_gene(y_true, y_pred, var_names=names)
    assert list(mse.index) == names and mse.name == "mse" and mae.name == "mae"
    np.testing.assert_allclose(mse, mean_squared_error(y_true, y_pred, multioutput="raw_values"), rtol=1e-10)
    np.testing.assert_allclose(mae, mean_absolute_error(y_true, y_pred, multioutput="raw_values"), rtol=1e-10)
    assert isinstance(hs.metrics.mse_per_gene(y_true, y_pred), np.ndarray)
    with pytest.raises(ValueError, match="shape"):
        hs.metrics.mae_per_gene(y_true, y_pred[:, :3])


@pytest.fixture
def labels():
    rng = np.random.default_rng(0)
    n = 200
    true = rng.integers(0, 5, size=n)
    pred = np.where(rng.random(n) < 0.7, true, rng.integers(0, 6, size=n))
    return np.array([f"L{t}" for t in true], dtype=object), pred


@pytest.mark.parametrize("fn", ["ari", "nmi"])
def test_ari_nmi_match_sklearn(labels, fn):
    true, pred = labels
    ref = {"ari": adjusted_rand_score, "nmi": normalized_mutual_info_score}[fn]
    f = getattr(hs.metrics, fn)
    assert f(true, pred) == pytest.approx(ref(true, pred), abs=1e-12)
    # categoricals, Series, lists give the same
    assert f(pd.Categorical(true), pd.Series(pred)) == pytest.approx(ref(true, pred), abs=1e-12)
    assert f(list(true), list(pred)) == pytest.approx(ref(true, pred), abs=1e-12)
    assert isinstance(f(true, pred), float)


@pytest.mark.parametrize("fn", ["ari", "nmi"])
def test_unlabelled_spots_ignored(labels, fn):
    true, pred = labels
    ref = {"ari": adjusted_rand_score, "nmi": normalized_mutual_info_score}[fn]
    f = getattr(hs.metrics, fn)
    t = true.copy()
    t[0], t[1], t[2], t[3], t[4] = None, np.nan, pd.NA, "", "unknown"
    keep = np.ones(len(t), dtype=bool)
    keep[:5] = False
    expected = ref(true[keep], pred[keep])
    assert f(t, pred, unlabelled="unknown") == pytest.approx(expected, abs=1e-12)
    assert f(t, pred, unlabelled=["unknown", "other"]) == pytest.approx(expected, abs=1e-12)
    # without `unlabelled`, "unknown" is a label of its own
    keep4 = keep.copy()
    keep4[4] = True
    assert f(t, pred) == pytest.approx(ref(t[keep4].astype(str), pred[keep4]), abs=1e-12)
    # pandas categorical with NaN (as in adata.obs) and a categorical with "" as a category
    cat = pd.Series(pd.Categorical(np.where(keep, true, None)))
    assert f(cat, pred) == pytest.approx(ref(true[keep], pred[keep]), abs=1e-12)
    cat2 = pd.Categorical(np.where(keep, true, ""))
    assert f(cat2, pred) == pytest.approx(ref(true[keep], pred[keep]), abs=1e-12)


def test_series_aligned_by_index(labels):
    true, pred = labels
    idx = [f"spot{i}" for i in range(len(true))]
    t = pd.Series(true, index=idx)
    p = pd.Series(pred, index=idx).iloc[::-1]  # same spots, reversed order
    assert hs.metrics.ari(t, p) == pytest.approx(adjusted_rand_score(true, pred), abs=1e-12)


def test_nmi_average_method(labels):
    true, pred = labels
    assert hs.metrics.nmi(true, pred, average_method="max") == pytest.approx(
        normalized_mutual_info_score(true, pred, average_method="max"), abs=1e-12
    )


@pytest.mark.parametrize("fn", ["ari", "nmi"])
def test_label_errors(fn):
    f = getattr(hs.metrics, fn)
    with pytest.raises(ValueError, match="labels_true.*3.*labels_pred.*2"):
        f(["a", "b", "c"], [1, 2])
    with pytest.raises(ValueError, match="no labelled spot"):
        f([None, np.nan, ""], [1, 2, 3])
    with pytest.raises(ValueError, match="labels_pred.*missing"):
        f(["a", "b", "c"], [1, None, 3])
    with pytest.raises(ValueError, match="1-D"):
        f(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(TypeError, match="labels_true"):
        f(5, [1])
    # a missing prediction on an unlabelled spot is fine
    assert np.isfinite(f(["a", None, "b", "a"], [1, None, 2, 1]))
