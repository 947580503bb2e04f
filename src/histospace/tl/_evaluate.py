"""Cross-validation of mclSTExp (and baselines) over slides or patients: per-gene Pearson, top-gene PCC, MSE, MAE."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg
from tqdm.auto import tqdm

from histospace._constants import FEATURES_KEY, LIBRARY_KEY, SPATIAL_KEY
from histospace._utils import check_random_state, check_unique_obs_names, doc_params, get_matrix
from histospace._utils._data import as_dense, check_genes, library_labels, normalize_expression, smooth_over_neighbors
from histospace.metrics import pearson_per_gene

_BASELINES = ("bleep", "ridge", "knn")


def _pearson_columns(obs: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r and two-sided p-value per gene (NaN where either column is constant), without the warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = pearson_per_gene(obs, pred, return_pvalue=True)
    return res["r"].to_numpy(), res["pvalue"].to_numpy()


@doc_params()
def mclstexp_cross_validate(
    adata: AnnData,
    *,
    groupby: str = "library_id",
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    n_top: int = 50,
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
    predict_kwargs: dict | None = None,
    baselines: Sequence[str] = (),
    knn_k: int = 50,
    ridge_alphas: Sequence[float] = tuple(np.logspace(-2, 6, 17)),
    groups: Sequence[str] | None = None,
    random_state: int | None = 0,
    progress_bar: bool = False,
) -> dict:
    """Leave-one-group-out evaluation of mclSTExp (and baselines): hold out each slide or patient in turn.

    For each group of `adata.obs[groupby]` (a slide with `groupby='library_id'`: leave-one-slide-out; a patient with
    `groupby='patient'`: leave-one-patient-out), a model is trained on the other groups and predicts the held-out
    spots from their image features. The gene panel (when `genes=None`) and the normalisation are fixed from the
    training part only; the held-out expression is normalised per spot the same way (`model_kwargs['normalize']`).

    Parameters
    ----------
    adata
        {adata}
        Slides with counts, image features and positions (see :class:`~histospace.models.MclSTExp`).
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
        Also evaluate, on the same folds, genes and targets: `'bleep'` (the same model without spot Transformer and
        positions, trained with the same `train_kwargs`, a seed ensemble's `n_models` included), `'ridge'`
        (:class:`~sklearn.linear_model.RidgeCV` over `ridge_alphas`) and `'knn'`
        (:class:`~sklearn.neighbors.KNeighborsRegressor`, `knn_k` neighbours) on the image features standardised
        with the training mean and standard deviation. With `smooth_neighbors > 0` in `predict_kwargs` the ridge and
        kNN inputs are smoothed over the same spatial neighbours.
    knn_k, ridge_alphas
        Baseline settings.
    groups
        Groups to hold out (default: all).
    random_state
        Seed of every model (`train_kwargs['random_state']` wins when given).
    progress_bar
        Show one bar over the folds.

    Returns
    -------
    A :class:`dict` (nothing is written to `adata`):

    `'summary'` : :class:`pandas.DataFrame`
        One row per method and fold: `method`, `fold`, `n_train`, `n_test`, `pcc_all` (mean per-gene Pearson over the
        panel, constant genes left out), `pcc_top` (mean over the `n_top` genes with the highest mean expression in
        the held-out group), `mse`, `mae` (over all held-out spots and panel genes), `train_time_s`,
        `predict_time_s`.
    `'overall'` : :class:`pandas.DataFrame`
        Mean of the summary columns over folds, one row per method.
    `'pearson'`, `'pvalue'` : :class:`dict` of :class:`pandas.DataFrame`
        Per method, genes x folds: Pearson r and its two-sided p-value (NaN for a constant gene).
    `'top_genes'` : :class:`dict`
        Per fold, the `n_top` genes by mean observed expression.
    `'params'` : :class:`dict`
        `groupby`, `n_top`, methods and the keyword arguments used.
    """
    from histospace.models import MclSTExp

    random_state = check_random_state(random_state)
    check_unique_obs_names(adata)
    if groupby not in adata.obs:
        msg = (
            f"`adata.obs[{groupby!r}]` not found; pass `groupby=` naming the column with slides ('library_id') "
            "or patients ('patient')."
        )
        raise KeyError(msg)
    bad = [b for b in baselines if b not in _BASELINES]
    if bad:
        msg = f"Unknown baselines {bad}; choose from {_BASELINES}."
        raise ValueError(msg)
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
    if features_key not in adata.obsm:
        msg = f"`adata.obsm[{features_key!r}]` not found. Compute image features first with `hs.pp.image_features`."
        raise KeyError(msg)
    feats_all = as_dense(adata.obsm[features_key]).astype(np.float32)
    methods = ["mclstexp", *baselines]

    start = logg.info(f"cross-validating mclSTExp over {len(groups)} groups of `obs[{groupby!r}]`")
    rows, pearson, pvalue, top_genes = [], {m: {} for m in methods}, {m: {} for m in methods}, {}
    for g in tqdm(groups, desc="folds", disable=not progress_bar):
        test_m = labels == g
        train = adata[~test_m]
        test = adata[test_m]
        # main model: genes chosen from the training part when not given
        t0 = time.perf_counter()
        model = MclSTExp(train, layer=layer, genes=genes, **model_kwargs)
        model.train(**train_kwargs)
        t_train = time.perf_counter() - t0
        panel = model.genes
        gidx = adata.var_names.get_indexer(panel)
        y_test = normalize_expression(counts[test_m][:, gidx], normalize)
        y_train = model.reference_expression
        order = np.argsort(-y_test.mean(axis=0), kind="stable")[:n_top]
        top_genes[g] = [panel[i] for i in order]
        pk = {**predict_kwargs}
        pk["n_neighbors"] = min(int(pk.get("n_neighbors", 200)), y_train.shape[0])
        smooth = int(pk.get("smooth_neighbors", 0))

        preds: dict[str, tuple[np.ndarray, float, float]] = {}
        t0 = time.perf_counter()
        preds["mclstexp"] = (model.predict(test, **pk), t_train, time.perf_counter() - t0)
        if "bleep" in baselines:
            t0 = time.perf_counter()
            bk = {**model_kwargs, "spot_encoder": "none", "use_positions": False}
            bleep = MclSTExp(train, layer=layer, genes=panel, **bk).train(**train_kwargs)
            tt = time.perf_counter() - t0
            t0 = time.perf_counter()
            preds["bleep"] = (bleep.predict(test, **pk), tt, time.perf_counter() - t0)
        for b in ("ridge", "knn"):
            if b not in baselines:
                continue
            t0 = time.perf_counter()
            xtr, xte = feats_all[~test_m], feats_all[test_m]
            mu, sd = xtr.mean(axis=0), np.maximum(xtr.std(axis=0), 1e-6)
            xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
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
            from sklearn.linear_model import RidgeCV
            from sklearn.neighbors import KNeighborsRegressor

            reg = (
                RidgeCV(alphas=np.asarray(ridge_alphas, dtype=float))
                if b == "ridge"
                else KNeighborsRegressor(n_neighbors=min(knn_k, xtr.shape[0]))
            )
            reg.fit(xtr, y_train)
            tt = time.perf_counter() - t0
            t0 = time.perf_counter()
            p = np.asarray(reg.predict(xte), dtype=np.float32)
            preds[b] = (p, tt, time.perf_counter() - t0)

        for meth, (p, tt, tp) in preds.items():
            r, pv = _pearson_columns(y_test, p)
            pearson[meth][g] = r
            pvalue[meth][g] = pv
            rows.append(
                {
                    "method": meth,
                    "fold": g,
                    "n_train": int((~test_m).sum()),
                    "n_test": int(test_m.sum()),
                    "pcc_all": float(np.nanmean(r)) if np.isfinite(r).any() else np.nan,
                    "pcc_top": float(np.nanmean(r[order])) if np.isfinite(r[order]).any() else np.nan,
                    "mse": float(np.mean((p - y_test) ** 2)),
                    "mae": float(np.mean(np.abs(p - y_test))),
                    "train_time_s": float(tt),
                    "predict_time_s": float(tp),
                }
            )
        panel_index = pd.Index(panel, name="gene")
        for meth in methods:  # genes may differ between folds when chosen per fold: align on the union later
            pearson[meth][g] = pd.Series(pearson[meth][g], index=panel_index)
            pvalue[meth][g] = pd.Series(pvalue[meth][g], index=panel_index)

    summary = pd.DataFrame(rows)
    overall = summary.drop(columns=["fold"]).groupby("method", sort=False).mean(numeric_only=True)
    out = {
        "summary": summary,
        "overall": overall,
        "pearson": {m: pd.DataFrame(pearson[m]) for m in methods},
        "pvalue": {m: pd.DataFrame(pvalue[m]) for m in methods},
        "top_genes": top_genes,
        "params": {
            "groupby": groupby,
            "n_top": int(n_top),
            "methods": methods,
            "model_kwargs": {k: v for k, v in model_kwargs.items() if isinstance(v, str | int | float | bool)},
            "train_kwargs": {k: v for k, v in train_kwargs.items() if isinstance(v, str | int | float | bool)},
            "predict_kwargs": predict_kwargs,
        },
    }
    logg.info("    finished", time=start)
    return out
