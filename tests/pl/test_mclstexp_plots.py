"""Tests of hs.pl.predicted_vs_observed, hs.pl.gene_correlation, hs.pl.top_genes and hs.pl.gene_predictability."""

from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import histospace as hs

TINY = {"model_kwargs": {"n_heads": 2, "dim_head": 8, "projection_dim": 16}}


@pytest.fixture
def predicted(adata):
    a = adata
    model = hs.tl.mclstexp_train(
        a, genes=list(a.var_names), max_epochs=2, batch_size=32, n_models=1, device="cpu", progress_bar=False, **TINY
    )
    hs.tl.mclstexp_predict(a, model=model, n_neighbors=10)
    return a, model


@pytest.fixture
def cv_results():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(40)]
    r = pd.DataFrame(rng.uniform(-0.2, 0.7, (40, 3)), index=genes, columns=["s1", "s2", "s3"])
    p = pd.DataFrame(10 ** -rng.uniform(0, 10, (40, 3)), index=genes, columns=["s1", "s2", "s3"])
    return {"pearson": {"mclstexp": r, "ridge": r - 0.1}, "pvalue": {"mclstexp": p, "ridge": p}}


def test_predicted_vs_observed(predicted):
    a, _ = predicted
    fig = hs.pl.predicted_vs_observed(a, genes=["gene0", "gene25"], show=False)
    assert isinstance(fig, Figure)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 4  # 2 genes x (observed, predicted), each with the H&E under the spots
    assert any("observed" in ax.get_title() for ax in fig.axes)
    assert any("r =" in ax.get_title() for ax in fig.axes)
    assert len(fig.axes) == 8  # plus one colour bar per panel


def test_predicted_vs_observed_he_only(predicted):
    a, model = predicted
    q = ad.AnnData(obs=a.obs[["library_id"]].copy())
    q.obsm["spatial"] = a.obsm["spatial"]
    q.obsm["img_features"] = a.obsm["img_features"]
    q.uns["spatial"] = a.uns["spatial"]
    hs.tl.mclstexp_predict(q, model=model, n_neighbors=10)
    fig = hs.pl.predicted_vs_observed(q, genes="gene3", show=False)
    assert len([ax for ax in fig.axes if ax.images]) == 1


def test_predicted_vs_observed_errors(predicted):
    a, _ = predicted
    with pytest.raises(KeyError, match="nope.*panel"):
        hs.pl.predicted_vs_observed(a, genes=["nope"], show=False)
    with pytest.raises(KeyError, match=r"obsm\['other'\].*mclstexp_predict"):
        hs.pl.predicted_vs_observed(a, genes=["gene0"], key="other", show=False)


def test_gene_correlation(cv_results):
    ax = hs.pl.gene_correlation(cv_results, show=False)
    assert isinstance(ax, Axes) and "Pearson" in ax.get_xlabel()
    assert len(ax.get_legend().get_texts()) == 2
    ax = hs.pl.gene_correlation(cv_results["pearson"]["mclstexp"]["s1"], show=False)
    assert ax.get_ylabel() == "number of genes"


def test_gene_correlation_all_nan(cv_results):
    table = cv_results["pearson"]["mclstexp"]["s1"] * np.nan
    n_figs = len(plt.get_fignums())
    with pytest.raises(ValueError, match="Every per-gene correlation is NaN"):
        hs.pl.gene_correlation(table, show=False)
    assert len(plt.get_fignums()) == n_figs  # no figure left behind


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (["a", "b"], r"`results` is a list"),
        ([[0.1, 0.2], [0.3]], r"`results` is a list"),
        ({"r": [0.1]}, r"got a dict with keys \['r'\] \(no 'pearson'\)"),
        (pd.DataFrame({"s1": ["x", "y"]}), r"columns that are not numbers: \['s1'\]"),
        ("mclstexp", r"`results` is a str"),
    ],
)
def test_gene_correlation_wrong_type(bad, match):
    # issue #24 (6): a wrong input failed inside numpy ("setting an array element with a sequence")
    n_figs = len(plt.get_fignums())
    with pytest.raises(
        TypeError, match=rf"`results` must be the dict returned by `hs.tl.mclstexp_cross_validate`.*{match}"
    ):
        hs.pl.gene_correlation(bad, show=False)
    assert len(plt.get_fignums()) == n_figs


def test_gene_correlation_anndata_is_refused(adata):
    with pytest.raises(TypeError, match=r"Series, a genes x folds DataFrame.*`results` is a AnnData"):
        hs.pl.gene_correlation(adata, show=False)
    ax = hs.pl.gene_correlation(np.array([0.1, 0.3, 0.2]), show=False)  # a plain array still works
    assert "n=3" in ax.get_legend().get_texts()[0].get_text()
    plt.close("all")


def test_top_genes(cv_results):
    ax = hs.pl.top_genes(cv_results, n=7, show=False)
    assert isinstance(ax, Axes) and len(ax.patches) == 7
    assert "-log10 p" in ax.get_xlabel()
    with pytest.raises(KeyError, match="knn"):
        hs.pl.top_genes(cv_results, method="knn", show=False)
    with pytest.raises(TypeError, match="mclstexp_cross_validate"):
        hs.pl.top_genes(pd.Series([0.1]), show=False)


def test_predicted_vs_observed_ax(predicted):
    import matplotlib.pyplot as plt

    a, _ = predicted
    fig, axes = plt.subplots(1, 2)
    assert hs.pl.predicted_vs_observed(a, genes=["gene0"], ax=axes, show=False) is fig
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in axes)
    with pytest.raises(ValueError, match="`ax` must hold 2 Axes"):
        hs.pl.predicted_vs_observed(a, genes=["gene0"], ax=axes[0], show=False)
    plt.close(fig)


@pytest.fixture
def gene_scores():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(60)]
    mean = 10 ** rng.uniform(-2, 1, 60)
    mean[0] = 0.0  # never expressed: not on the log axis
    pcc = rng.uniform(-0.2, 0.7, 60)
    fdr = np.where(pcc > 0.4, 0.001, 0.5)
    return pd.DataFrame({"pcc": pcc, "fdr": fdr, "mean_expression": mean, "n_folds": 3}, index=genes)


def test_gene_predictability(gene_scores):
    ax = hs.pl.gene_predictability(gene_scores, n_labels=4, show=False)
    assert isinstance(ax, Axes) and ax.get_xscale() == "log"
    n_sig = int(((gene_scores["fdr"] < 0.05) & (gene_scores["pcc"] > 0)).sum())
    other, sig = ax.collections[:2]
    assert len(sig.get_offsets()) == n_sig and len(other.get_offsets()) == 59 - n_sig
    labels = [t.get_text() for t in ax.texts]
    best = gene_scores[gene_scores["fdr"] < 0.05]["pcc"].nlargest(4).index.tolist()
    assert labels == best
    assert ax.get_title() == f"{n_sig} of 59 genes predictable"
    assert "Pearson" in ax.get_ylabel() and "log" in ax.get_xlabel()


def test_gene_predictability_sources(gene_scores, predicted):
    cv = {"gene_scores": {"mclstexp": gene_scores, "knn": gene_scores.assign(fdr=1.0)}}
    ax = hs.pl.gene_predictability(cv, method="knn", n_labels=0, show=False)
    assert ax.get_title() == "0 of 59 genes predictable (knn)" and not ax.texts
    # from an AnnData predicted with the scores
    a, model = predicted
    scores = gene_scores.iloc[:30].set_axis(list(a.var_names))
    hs.tl.mclstexp_predict(a, model=model, n_neighbors=10, gene_scores=scores)
    ax = hs.pl.gene_predictability(a, show=False)
    n_sig = int(((scores["fdr"] < 0.05) & (scores["pcc"] > 0)).sum())
    assert ax.get_title() == f"{n_sig} of 29 genes predictable"


def test_gene_predictability_errors(gene_scores, predicted):
    a, _ = predicted
    with pytest.raises(KeyError, match=r"uns\['mclstexp'\]\['gene_scores'\].*gene_scores="):
        hs.pl.gene_predictability(a, show=False)
    with pytest.raises(KeyError, match="mean_expression"):
        hs.pl.gene_predictability(gene_scores.drop(columns="mean_expression"), show=False)
    with pytest.raises(KeyError, match="ridge"):
        hs.pl.gene_predictability({"gene_scores": {"mclstexp": gene_scores}}, method="ridge", show=False)
    with pytest.raises(ValueError, match="fdr"):
        hs.pl.gene_predictability(gene_scores, fdr=5, show=False)
    with pytest.raises(TypeError, match="data"):
        hs.pl.gene_predictability([1, 2], show=False)


def test_gene_predictability_spatialdata(gene_scores, predicted):
    # issue #24 (6): a SpatialData was refused; its table is read as the AnnData is, `table_key=` picks it
    import spatialdata as sd

    a, model = predicted
    scores = gene_scores.iloc[:30].set_axis(list(a.var_names))
    hs.tl.mclstexp_predict(a, model=model, n_neighbors=10, gene_scores=scores)
    sdata = sd.SpatialData(tables={"table": a})
    ax = hs.pl.gene_predictability(sdata, show=False)
    assert ax.get_title() == hs.pl.gene_predictability(a, show=False).get_title()
    sdata = sd.SpatialData(tables={"table": a, "bare": a[:5].copy()})
    del sdata.tables["bare"].uns["mclstexp"]
    assert hs.pl.gene_predictability(sdata, table_key="table", show=False).get_title() == ax.get_title()
    with pytest.raises(ValueError, match="pass `table_key=`"):
        hs.pl.gene_predictability(sdata, show=False)
    with pytest.raises(KeyError, match=r"uns\['mclstexp'\]\['gene_scores'\]` not found"):
        hs.pl.gene_predictability(sdata, table_key="bare", show=False)
    plt.close("all")
