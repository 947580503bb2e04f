"""Cross-validation of mclSTExp and baselines over slides or patients: per-gene Pearson, p-values, FDR, trust.

Also top-gene PCC, MSE and MAE per fold, and a per-gene table of the held-out scores over folds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from histospace._constants import FEATURES_KEY, LIBRARY_KEY, SPATIAL_KEY
from histospace._image.features._slot import read_features
from histospace._utils import check_random_state, check_unique_obs_names, doc_params, get_matrix
from histospace._utils._data import check_genes, library_labels, normalize_expression, smooth_over_neighbors
from histospace._utils._progress import progress
from histospace._utils._sdata import as_table
from histospace.metrics import pearson_per_gene
from histospace.models._context import smooth_rows
from histospace.tl._gene_scores import (
    FDR_LEVEL,
    SpatialPairs,
    bh_fdr,
    effective_n,
    gene_score_table,
    pearson_pvalue,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

_BASELINES = ("bleep", "ridge", "ridge_pca256", "knn")
#: components of the `'ridge_pca256'` baseline (HEST-Benchmark's PCA-256 of standardised features)
_PCA_COMPONENTS = 256


def _pearson_columns(obs: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r and two-sided p-value per gene (NaN where either column is constant), without the warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = pearson_per_gene(obs, pred, return_pvalue=True)
    return res["r"].to_numpy(), res["pvalue"].to_numpy()


def _regression_baseline(
    name: str,
    xtr: np.ndarray,
    ytr: np.ndarray,
    xte: np.ndarray,
    *,
    ridge_alphas: Sequence[float],
    knn_k: int,
    random_state: int | None,
) -> tuple[np.ndarray, float, float]:
    """Fit `name` on standardised training features, predict the test ones: `(pred, train s, predict s)`.

    `'ridge_pca256'` projects on the first `min(256, n_train - 1, d)` principal components of the training features
    (exact PCA: covariance eigendecomposition when `n_train >= d`, else a full SVD) before the same `RidgeCV`.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.neighbors import KNeighborsRegressor

    t0 = time.perf_counter()
    if name == "knn":
        reg = KNeighborsRegressor(n_neighbors=min(knn_k, xtr.shape[0]))
    else:
        reg = RidgeCV(alphas=np.asarray(ridge_alphas, dtype=float))
    pca = None
    if name == "ridge_pca256":
        from sklearn.decomposition import PCA

        n, d = xtr.shape
        k = max(1, min(_PCA_COMPONENTS, n - 1, d))
        pca = PCA(n_components=k, svd_solver="covariance_eigh" if n >= d else "full", random_state=random_state)
        xtr = pca.fit_transform(xtr)
    reg.fit(xtr, ytr)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    if pca is not None:
        xte = pca.transform(xte)
    pred = np.asarray(reg.predict(xte), dtype=np.float32)
    return pred, t_train, time.perf_counter() - t0


@doc_params()
def mclstexp_cross_validate(
    adata: AnnData | SpatialData,
    *,
    table_key: str | None = None,
    groupby: str = LIBRARY_KEY,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    n_top: int = 50,
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
    predict_kwargs: dict | None = None,
    baselines: Sequence[str] = ("ridge_pca256", "knn"),
    knn_k: int = 50,
    ridge_alphas: Sequence[float] = tuple(np.logspace(-2, 6, 17)),
    groups: Sequence[str] | None = None,
    pvalues: Literal["spatial", "independent"] = "spatial",
    return_predictions: bool = False,
    random_state: int | None = 0,
    progress_bar: bool = False,
) -> dict:
    """Leave-one-group-out evaluation of mclSTExp and baselines: hold out each slide or patient in turn.

    For each group of `adata.obs[groupby]` (a slide with `groupby='library_id'`: leave-one-slide-out; a patient with
    `groupby='patient'`: leave-one-patient-out), a model is trained on the other groups and predicts the held-out
    spots from their image features. The gene panel (when `genes=None`) and the normalisation are fixed from the
    training part only; the held-out expression is normalised per spot the same way (`model_kwargs['normalize']`).
    The baselines are fitted on the same folds, genes, targets and image features, so one table tells whether
    mclSTExp earns its training time on these data. Every gene gets a held-out Pearson r per fold with a p-value and
    a Benjamini-Hochberg FDR, and a summary over folds (`'gene_scores'`) that :func:`~histospace.tl.mclstexp_predict`
    can record next to the predictions of a model trained with the same settings (`gene_scores=`).

    Parameters
    ----------
    adata
        {adata}
        Slides with counts, image features and positions (see :class:`~histospace.models.MclSTExp`).
    table_key
        {table_key}
    groupby
        `adata.obs` column whose groups are held out in turn.
    layer
        Layer with the counts; `None` uses `adata.X`.
    genes
        Gene panel; `None` chooses highly variable genes from each fold's training part.
    n_top
        Size of the "top genes" set: the genes with the highest mean observed expression in the held-out group.
    model_kwargs, train_kwargs, predict_kwargs
        Keyword arguments of :class:`~histospace.models.MclSTExp`, :meth:`~histospace.models.MclSTExp.train` and
        :func:`~histospace.tl.mclstexp_predict` (`n_neighbors`, `weighting`, `smooth_neighbors`). `n_neighbors` is
        capped at the number of training spots.
    baselines
        Also evaluate, on the same folds, genes and targets (default: `('ridge_pca256', 'knn')`, a second or so per
        fold): `'bleep'` (the same model without spot Transformer and positions, trained with the same
        `train_kwargs`, a seed ensemble's `n_models` included), `'ridge'` (:class:`~sklearn.linear_model.RidgeCV`
        over `ridge_alphas`), `'ridge_pca256'` (the HEST-Benchmark protocol: the same ridge on the first
        `min(256, n_train - 1, n_features)` principal components, fitted on the training spots) and `'knn'`
        (:class:`~sklearn.neighbors.KNeighborsRegressor`, `knn_k` neighbours, uniform weights). The regression
        baselines use the image features standardised with the training mean and standard deviation; with
        `smooth_neighbors > 0` in `predict_kwargs` they are smoothed over the same spatial neighbours; their
        predictions are put on the model's principal axes of the training expression (`expression_rank`, 16 by
        default) and, with the model's `smooth_predictions > 0`, smoothed as the model's are, so that neither step
        is credited to the model. `()`: none.
    knn_k, ridge_alphas
        Baseline settings.
    groups
        Groups to hold out (default: all).
    pvalues
        `'spatial'`: p-values of the held-out correlations by Dutilleul's modified t-test, which replaces the number
        of spots by an effective sample size that accounts for the spatial autocorrelation of both the observed and
        the predicted expression (needs `adata.obsm[spatial_key]`; see Notes). `'independent'`: the plain test of
        :func:`scipy.stats.pearsonr`, as if the spots were independent.
    return_predictions
        Also return the held-out predictions, the observed targets and, for seed ensembles, the per-spot standard
        deviation over the members (`'predictions'`, `'observed'`, `'prediction_std'`).
    random_state
        Seed of every model (`train_kwargs['random_state']` wins when given) and of the PCA.
    progress_bar
        Show one bar over the folds.

    Returns
    -------
    A :class:`dict` (nothing is written to `adata`):

    `'summary'` : :class:`pandas.DataFrame`
        One row per method and fold: `method`, `fold`, `n_train`, `n_test`, `pcc_all` (mean per-gene Pearson over the
        panel, constant genes left out), `pcc_top` (mean over the `n_top` genes with the highest mean expression in
        the held-out group), `mse`, `mae` (over all held-out spots and panel genes), `n_genes_fdr05` (genes with a
        positive r at FDR < 0.05 in that fold), `train_time_s`, `predict_time_s`.
    `'overall'` : :class:`pandas.DataFrame`
        Mean of the summary columns over folds, one row per method.
    `'pearson'`, `'pvalue'`, `'fdr'`, `'n_eff'` : :class:`dict` of :class:`pandas.DataFrame`
        Per method, genes x folds: Pearson r, its two-sided p-value (see `pvalues`), the Benjamini-Hochberg adjusted
        p-value (:func:`scipy.stats.false_discovery_control`) over the panel genes of that fold, and the effective
        number of spots behind the test (the held-out spots with `pvalues='independent'`). NaN for a constant gene,
        or a gene outside that fold's panel.
    `'gene_scores'` : :class:`dict` of :class:`pandas.DataFrame`
        Per method, one row per gene: `pcc` (mean r over the folds where it is defined), `pcc_median`, `pcc_sd`
        (across folds), `n_folds`, `n_spots` (held-out spots of those folds), `n_eff` (their effective number, summed
        over the folds), `pvalue` (one-sided, r > 0, folds
        combined by Stouffer's method, see Notes), `fdr` (Benjamini-Hochberg over the genes), `frac_folds_fdr05`
        (fraction of the folds with a positive r at fold FDR < 0.05) and `mean_expression` (mean observed normalised
        expression over the held-out spots).
    `'top_genes'` : :class:`dict`
        Per fold, the `n_top` genes by mean observed expression.
    `'predictions'`, `'observed'`, `'prediction_std'` : :class:`dict`
        Only with `return_predictions=True`. `predictions[method][fold]` and `observed[fold]`: held-out spots x panel
        genes :class:`pandas.DataFrame` (float32, indexed by `obs_names`); `prediction_std[method][fold]`: the same
        shape, the sample standard deviation over the members of a seed ensemble (mclSTExp and BLEEP-style with
        `n_models > 1` only).
    `'params'` : :class:`dict`
        `groupby`, `n_top`, methods and the keyword arguments used.

    Notes
    -----
    Spatial p-values: neighbouring spots are alike (tissue domains), and so are their predictions, so two unrelated
    but smooth maps correlate by chance far more often than independent spots would allow; the plain test then calls
    most genes significant. The modified t-test (Clifford, Richardson & Hemon 1989; Dutilleul 1993, as R's
    `SpatialPack::modified.ttest`) estimates, per gene, `var(r) = sum_ij rho_obs(ij) rho_pred(ij) / n^2` from the
    spatial autocorrelation of the observed and the predicted map in 13 equal-width distance classes (pairs within
    one slide; every pair up to 2,000 held-out spots, a seeded subset of 2,000 spots in larger groups), and tests r with
    `n_eff - 2 = 1 / var(r) - 1` degrees of freedom (`n_eff` kept within `[3, n]`).

    Combining folds: each fold gives `z_i = atanh(r_i) sqrt(n_i - 3)` with `n_i` its effective spots, standard
    normal when the gene's true correlation is 0 (Fisher's transform), and
    `Z = sum_i sqrt(n_i - 3) z_i / sqrt(sum_i (n_i - 3))` (Stouffer's method weighted by the folds' information;
    the same as testing the pooled Fisher-z mean). It keeps the sign: a gene predicted well in one section and
    anti-correlated in another does not look significant, while Fisher's combination of the two-sided p-values
    would call it so. The one-sided p-value asks the question a user has: is the prediction positively correlated
    with the truth on unseen sections? `frac_folds_fdr05` and `pcc_sd` show how stable a gene is across sections.
    With one patient the sections share the patient, so every score is optimistic for a new patient.
    """
    from histospace.models import MclSTExp

    random_state = check_random_state(random_state)
    adata, _ = as_table(adata, table_key)
    check_unique_obs_names(adata)
    if groupby not in adata.obs:
        msg = (
            f"`adata.obs[{groupby!r}]` not found; pass `groupby=` naming the column with slides ('library_id') "
            "or patients ('patient')."
        )
        raise KeyError(msg)
    if isinstance(baselines, str):
        baselines = (baselines,)
    bad = [b for b in baselines if b not in _BASELINES]
    if bad:
        msg = f"Unknown baselines {bad}; choose from {_BASELINES}."
        raise ValueError(msg)
    baselines = list(dict.fromkeys(baselines))
    labels = adata.obs[groupby].astype(str).to_numpy()
    all_groups = list(pd.unique(labels))
    if len(all_groups) < 2:
        msg = (
            f"`adata.obs[{groupby!r}]` has a single group ({all_groups}); leave-one-group-out needs at least 2 groups "
            "(e.g. all slides come from one patient)."
        )
        raise ValueError(msg)
    groups = all_groups if groups is None else [str(g) for g in groups]
    missing = [g for g in groups if g not in all_groups]
    if missing:
        msg = f"`groups` {missing} not in `adata.obs[{groupby!r}]` ({all_groups})."
        raise ValueError(msg)
    model_kwargs = dict(model_kwargs or {})
    train_kwargs = {"random_state": random_state, "progress_bar": False, **(train_kwargs or {})}
    predict_kwargs = dict(predict_kwargs or {})
    normalize = model_kwargs.get("normalize", "log1p_cp10k")
    features_key = model_kwargs.get("features_key", FEATURES_KEY)
    spatial_key = model_kwargs.get("spatial_key", SPATIAL_KEY)
    library_key = model_kwargs.get("library_key", LIBRARY_KEY)
    counts = get_matrix(adata, layer, counts=normalize != "none")
    if genes is not None:
        check_genes(genes, adata.var_names, where="adata.var_names", fix="Fix `genes=`.")
    feats_all = read_features(adata, features_key, "Compute image features first with `hs.pp.image_features`.")
    if pvalues not in ("spatial", "independent"):
        msg = f"`pvalues` must be 'spatial' or 'independent', got {pvalues!r}."
        raise ValueError(msg)
    if pvalues == "spatial" and spatial_key not in adata.obsm:
        msg = (
            f"`adata.obsm[{spatial_key!r}]` not found; spatially corrected p-values need spot coordinates. Pass "
            "`pvalues='independent'` to treat the spots as independent."
        )
        raise KeyError(msg)
    regressions = [b for b in baselines if b in ("ridge", "ridge_pca256", "knn")]
    if regressions and int(predict_kwargs.get("smooth_neighbors", 0)) > 0 and spatial_key not in adata.obsm:
        msg = f"`adata.obsm[{spatial_key!r}]` not found; `smooth_neighbors > 0` needs spot coordinates."
        raise KeyError(msg)
    methods = ["mclstexp", *baselines]

    start = logg.info(f"cross-validating mclSTExp over {len(groups)} groups of `obs[{groupby!r}]`")
    rows, top_genes, n_test, expr_sum = [], {}, {}, {}
    pearson, pvalue, fdr, n_eff = ({m: {} for m in methods} for _ in range(4))
    predictions, prediction_std, observed = {m: {} for m in methods}, {}, {}
    for g in progress(groups, desc="folds", disable=not progress_bar):
        test_m = labels == g
        train = adata[~test_m]
        test = adata[test_m]
        # main model: genes chosen from the training part when not given
        t0 = time.perf_counter()
        model = MclSTExp(train, layer=layer, genes=genes, **model_kwargs)
        model.train(**train_kwargs)
        t_train = time.perf_counter() - t0
        panel = model.genes
        panel_index = pd.Index(panel, name="gene")
        gidx = adata.var_names.get_indexer(panel)
        y_test = normalize_expression(counts[test_m][:, gidx], normalize)
        y_train = model.reference_expression
        order = np.argsort(-y_test.mean(axis=0), kind="stable")[:n_top]
        top_genes[g] = [panel[i] for i in order]
        n_test[g] = int(test_m.sum())
        expr_sum[g] = pd.Series(y_test.sum(axis=0, dtype=np.float64), index=panel_index)
        pk = {**predict_kwargs}
        pk["n_neighbors"] = min(int(pk.get("n_neighbors", 200)), y_train.shape[0])
        smooth = int(pk.get("smooth_neighbors", 0))

        # method -> (prediction, train s, predict s, ensemble sd or None)
        preds: dict[str, tuple[np.ndarray, float, float, np.ndarray | None]] = {}
        t0 = time.perf_counter()
        mean, sd = model.predict(test, **pk, return_std=True)
        preds["mclstexp"] = (mean, t_train, time.perf_counter() - t0, sd)
        if "bleep" in baselines:
            t0 = time.perf_counter()
            bk = {**model_kwargs, "spot_encoder": "none", "use_positions": False}
            bleep = MclSTExp(train, layer=layer, genes=panel, **bk).train(**train_kwargs)
            tt = time.perf_counter() - t0
            t0 = time.perf_counter()
            mean, sd = bleep.predict(test, **pk, return_std=True)
            preds["bleep"] = (mean, tt, time.perf_counter() - t0, sd)
        if regressions:
            t0 = time.perf_counter()
            xtr, xte = feats_all[~test_m], feats_all[test_m]
            mu, scale = xtr.mean(axis=0), np.maximum(xtr.std(axis=0), 1e-6)
            xtr, xte = (xtr - mu) / scale, (xte - mu) / scale
            if smooth > 0:
                xtr, xte = (
                    smooth_over_neighbors(
                        x,
                        np.asarray(part.obsm[spatial_key], dtype=np.float64)[:, :2],
                        library_labels(part, library_key),
                        n_neighbors=smooth,
                    )
                    for x, part in ((xtr, train), (xte, test))
                )
            t_prep = time.perf_counter() - t0
            ring1 = model._context_ops(test, prediction=True)[0] if model._smooths(test) else None
            for b in regressions:
                p, tt, tp = _regression_baseline(
                    b, xtr, y_train, xte, ridge_alphas=ridge_alphas, knn_k=knn_k, random_state=random_state
                )
                # the model's principal axes of the expression and its smoothing, so that they are not credited to it
                p = model.reference.on_axes(p, model.expression_rank)
                if ring1 is not None:
                    p = smooth_rows(p, ring1, model.smooth_predictions)
                preds[b] = (p, tt + t_prep, tp, None)

        pairs = rho_obs = None
        if pvalues == "spatial":
            xy = np.asarray(test.obsm[spatial_key], dtype=np.float64)[:, :2]
            pairs = SpatialPairs(xy, library_labels(test, library_key), random_state=random_state)
            rho_obs = pairs.autocorrelation(y_test)
        for meth in methods:
            p, tt, tp, sd = preds[meth]
            r, pv = _pearson_columns(y_test, p)
            ne = np.full(r.shape, float(n_test[g]))
            if pairs is not None:
                ne = effective_n(pairs, rho_obs, pairs.autocorrelation(p))
                pv = pearson_pvalue(r, ne)
            ne = np.where(np.isfinite(r), ne, np.nan)
            q = bh_fdr(pv)
            n_eff[meth][g] = pd.Series(ne, index=panel_index)
            pearson[meth][g] = pd.Series(r, index=panel_index)
            pvalue[meth][g] = pd.Series(pv, index=panel_index)
            fdr[meth][g] = pd.Series(q, index=panel_index)
            rows.append(
                {
                    "method": meth,
                    "fold": g,
                    "n_train": int((~test_m).sum()),
                    "n_test": n_test[g],
                    "pcc_all": float(np.nanmean(r)) if np.isfinite(r).any() else np.nan,
                    "pcc_top": float(np.nanmean(r[order])) if np.isfinite(r[order]).any() else np.nan,
                    "mse": float(np.mean((p - y_test) ** 2)),
                    "mae": float(np.mean(np.abs(p - y_test))),
                    "n_genes_fdr05": int(((np.nan_to_num(q, nan=1.0) < FDR_LEVEL) & (np.nan_to_num(r) > 0)).sum()),
                    "train_time_s": float(tt),
                    "predict_time_s": float(tp),
                }
            )
            if return_predictions:
                predictions[meth][g] = pd.DataFrame(p, index=test.obs_names.copy(), columns=panel_index.copy())
                if sd is not None:
                    prediction_std.setdefault(meth, {})[g] = pd.DataFrame(
                        sd, index=test.obs_names.copy(), columns=panel_index.copy()
                    )
        if return_predictions:
            observed[g] = pd.DataFrame(y_test, index=test.obs_names.copy(), columns=panel_index.copy())

    summary = pd.DataFrame(rows)
    overall = summary.drop(columns=["fold"]).groupby("method", sort=False).mean(numeric_only=True)
    # genes may differ between folds when chosen per fold: the tables align them on the union (NaN elsewhere)
    tables = {
        name: {m: pd.DataFrame(d[m]) for m in methods}
        for name, d in (("r", pearson), ("p", pvalue), ("q", fdr), ("n", n_eff))
    }
    expr = pd.DataFrame(expr_sum)
    out = {
        "summary": summary,
        "overall": overall,
        "pearson": tables["r"],
        "pvalue": tables["p"],
        "fdr": tables["q"],
        "n_eff": tables["n"],
        "gene_scores": {
            m: gene_score_table(tables["r"][m], tables["q"][m], tables["n"][m], n_test, expr) for m in methods
        },
        "top_genes": top_genes,
        "params": {
            "groupby": groupby,
            "n_top": int(n_top),
            "methods": methods,
            "model_kwargs": {k: v for k, v in model_kwargs.items() if isinstance(v, str | int | float | bool)},
            "train_kwargs": {k: v for k, v in train_kwargs.items() if isinstance(v, str | int | float | bool)},
            "predict_kwargs": predict_kwargs,
            "knn_k": int(knn_k),
            "pvalues": pvalues,
        },
    }
    if return_predictions:
        out["predictions"] = predictions
        out["observed"] = observed
        out["prediction_std"] = prediction_std
    logg.info("    finished", time=start)
    return out
