"""Per-gene Pearson correlation and errors of predicted expression; ARI and NMI of spatial domains on labelled spots."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import special

# columns processed at once by `pearson_per_gene`: bounds the float64 working copy to ~64 MB per input
_MAX_BLOCK_ELEMENTS = 8_000_000


def _as_2d(x: Any, name: str) -> np.ndarray | sp.csr_matrix | sp.csc_matrix:
    """Return `x` as a 2-D numeric array (sparse stays sparse, as CSC for column blocks)."""
    if isinstance(x, pd.DataFrame):
        x = x.to_numpy()
    elif isinstance(x, pd.Series):
        x = x.to_numpy()
    if sp.issparse(x):
        x = sp.csc_matrix(x)
    else:
        x = np.asarray(x)
        if x.ndim == 1:
            x = x[:, None]
    if x.ndim != 2:
        msg = f"`{name}` must be a 2-D (n_spots, n_genes) matrix, got {x.ndim} dimension(s)."
        raise ValueError(msg)
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        msg = f"`{name}` has dtype {x.dtype}; expected numbers."
        raise TypeError(msg)
    data = x.data if sp.issparse(x) else x
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        msg = f"`{name}` contains {n_bad} NaN or infinite values; remove or impute them first."
        raise ValueError(msg)
    return x


def _dense_block(x, sl: slice) -> np.ndarray:
    block = x[:, sl]
    if sp.issparse(block):
        block = block.toarray()
    return np.asarray(block, dtype=np.float64)


def _paired_matrices(
    y_true: Any, y_pred: Any, var_names: Any, *, min_spots: int, too_few: str
) -> tuple[Any, Any, pd.Index | None]:
    """Check observed and predicted matrices of one shape (at least `min_spots` rows, else `too_few`) and gene names."""
    if var_names is None:
        for x in (y_true, y_pred):
            if isinstance(x, pd.DataFrame):
                var_names = x.columns
                break
    a = _as_2d(y_true, "y_true")
    b = _as_2d(y_pred, "y_pred")
    if a.shape != b.shape:
        msg = f"`y_true` has shape {a.shape} but `y_pred` has shape {b.shape}; they must match (n_spots, n_genes)."
        raise ValueError(msg)
    n, g = a.shape
    if n < min_spots:
        raise ValueError(too_few.format(n=n))
    if var_names is not None:
        var_names = pd.Index(var_names).astype(str)
        if len(var_names) != g:
            msg = f"`var_names` has {len(var_names)} names but the matrices have {g} genes (columns)."
            raise ValueError(msg)
    return a, b, var_names


def pearson_per_gene(
    y_true: Any,
    y_pred: Any,
    *,
    var_names: Sequence[str] | pd.Index | None = None,
    return_pvalue: bool = False,
) -> pd.Series | pd.DataFrame | np.ndarray:
    """Pearson correlation between observed and predicted expression of each gene, across spots.

    The evaluation of mclSTExp and BLEEP :cite:p:`Min2024,Xie2023`: one correlation per gene (column), computed for
    all genes at once (vectorised, in column blocks so dense copies stay small).

    Parameters
    ----------
    y_true
        Observed expression, `(n_spots, n_genes)`: NumPy array, SciPy sparse matrix or :class:`pandas.DataFrame`
        (e.g. `adata.X`). A 1-D array is one gene.
    y_pred
        Predicted expression of the same shape (e.g. `adata.layers['mclstexp']`).
    var_names
        Gene names, one per column. `None` takes the columns of a `DataFrame` input, else returns a plain array.
    return_pvalue
        Also return the two-sided p-value of each correlation (the test of :func:`scipy.stats.pearsonr`).

    Returns
    -------
    The correlation of each gene, as a :class:`pandas.Series` named `'pearson_r'` indexed by gene when names are
    known, else as a :class:`numpy.ndarray` of shape `(n_genes,)`. With `return_pvalue=True`, a
    :class:`pandas.DataFrame` with columns `'r'` and `'pvalue'` (indexed by gene when names are known). Genes constant
    in `y_true` or in `y_pred` get NaN (their correlation is undefined), with a :class:`UserWarning` naming them.

    Examples
    --------
    >>> r = hs.metrics.pearson_per_gene(adata.X, adata.layers["mclstexp"], var_names=adata.var_names)
    >>> r.mean(), r.nlargest(5)
    """
    a, b, var_names = _paired_matrices(
        y_true, y_pred, var_names, min_spots=2, too_few="Pearson correlation needs at least 2 spots, got {n}."
    )
    n, g = a.shape

    r = np.empty(g, dtype=np.float64)
    constant = np.zeros(g, dtype=bool)
    step = max(1, _MAX_BLOCK_ELEMENTS // n)
    for start in range(0, g, step):  # blocks of columns; every gene of a block at once
        sl = slice(start, min(start + step, g))
        xa, xb = _dense_block(a, sl), _dense_block(b, sl)
        const = (xa.max(axis=0) == xa.min(axis=0)) | (xb.max(axis=0) == xb.min(axis=0))
        xa -= xa.mean(axis=0)
        xb -= xb.mean(axis=0)
        # scale each column first (as scipy does) so that products neither overflow nor underflow
        na = np.linalg.norm(xa, axis=0)
        nb = np.linalg.norm(xb, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            rr = np.einsum("ij,ij->j", xa / na, xb / nb)
        rr = np.clip(rr, -1.0, 1.0)
        rr[const] = np.nan
        r[sl] = rr
        constant[sl] = const

    if constant.any():
        idx = np.flatnonzero(constant)
        names = var_names[idx] if var_names is not None else idx
        shown = ", ".join(map(str, names[:10])) + (", ..." if idx.size > 10 else "")
        label = "gene(s)" if var_names is not None else "gene column(s)"
        msg = (
            f"{idx.size} of {g} {label} are constant in `y_true` or `y_pred` ({shown}); their Pearson correlation is "
            "undefined and set to NaN. Use `numpy.nanmean` (or `Series.mean`, which skips NaN) to average."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)

    if not return_pvalue:
        if var_names is None:
            return r
        return pd.Series(r, index=var_names, name="pearson_r")
    # two-sided p-value of scipy.stats.pearsonr: r follows Beta(n/2 - 1, n/2 - 1) on [-1, 1] under H0
    ab = n / 2 - 1
    with np.errstate(invalid="ignore"):
        p = 2 * special.betainc(ab, ab, 0.5 * (1 - np.abs(r))) if ab > 0 else np.where(np.isnan(r), np.nan, 1.0)
    p = np.clip(p, 0.0, 1.0)
    return pd.DataFrame({"r": r, "pvalue": p}, index=var_names)


def _error_per_gene(y_true: Any, y_pred: Any, var_names: Any, kind: Literal["mse", "mae"]) -> pd.Series | np.ndarray:
    a, b, var_names = _paired_matrices(y_true, y_pred, var_names, min_spots=1, too_few="`y_true` has no spots.")
    n, g = a.shape
    out = np.empty(g, dtype=np.float64)
    step = max(1, _MAX_BLOCK_ELEMENTS // n)
    for start in range(0, g, step):
        sl = slice(start, min(start + step, g))
        d = _dense_block(a, sl) - _dense_block(b, sl)
        out[sl] = (d**2).mean(axis=0) if kind == "mse" else np.abs(d).mean(axis=0)
    if var_names is None:
        return out
    return pd.Series(out, index=var_names, name=kind)


_ERROR_SECTIONS = """
    Parameters
    ----------
    y_true
        Observed expression, `(n_spots, n_genes)`: NumPy array, SciPy sparse matrix or :class:`pandas.DataFrame`.
    y_pred
        Predicted expression of the same shape, on the same scale (e.g. both log-normalised).
    var_names
        Gene names, one per column. `None` takes the columns of a `DataFrame` input, else returns a plain array.

    Returns
    -------
    The mean {what} error of each gene, as a :class:`pandas.Series` named `'{kind}'` indexed by gene when names are
    known, else as a :class:`numpy.ndarray` of shape `(n_genes,)`.
    """


def _error_doc(what: str, kind: str):
    """Append the Parameters and Returns sections shared by the per-gene error metrics to a one-line docstring."""

    def decorator(func):
        func.__doc__ = (func.__doc__ or "").rstrip() + "\n" + _ERROR_SECTIONS.format(what=what, kind=kind)
        return func

    return decorator


@_error_doc("squared", "mse")
def mse_per_gene(
    y_true: Any, y_pred: Any, *, var_names: Sequence[str] | pd.Index | None = None
) -> pd.Series | np.ndarray:
    """Mean squared error between observed and predicted expression of each gene, across spots."""
    return _error_per_gene(y_true, y_pred, var_names, "mse")


@_error_doc("absolute", "mae")
def mae_per_gene(
    y_true: Any, y_pred: Any, *, var_names: Sequence[str] | pd.Index | None = None
) -> pd.Series | np.ndarray:
    """Mean absolute error between observed and predicted expression of each gene, across spots."""
    return _error_per_gene(y_true, y_pred, var_names, "mae")


def _as_series(x: Any, name: str) -> pd.Series:
    if isinstance(x, pd.Series):
        return x
    if isinstance(x, pd.Index | pd.Categorical):
        return pd.Series(x)
    if isinstance(x, np.ndarray | list | tuple) or hasattr(x, "__array__"):
        arr = np.asarray(x, dtype=object) if not isinstance(x, np.ndarray) else x
        if arr.ndim != 1:
            msg = f"`{name}` must be one label per spot (1-D), got shape {arr.shape}."
            raise ValueError(msg)
        return pd.Series(arr)
    msg = f"`{name}` must be a sequence of labels (array, list, pandas Series or Categorical), got {type(x).__name__}."
    raise TypeError(msg)


def _labelled(
    labels_true: Any, labels_pred: Any, unlabelled: Any
) -> tuple[np.ndarray, np.ndarray]:  # integer codes of the labelled spots
    t = _as_series(labels_true, "labels_true")
    p = _as_series(labels_pred, "labels_pred")
    if len(t) != len(p):
        msg = f"`labels_true` has {len(t)} labels but `labels_pred` has {len(p)}; give one label per spot in both."
        raise ValueError(msg)
    if (
        isinstance(labels_true, pd.Series)
        and isinstance(labels_pred, pd.Series)
        and not t.index.equals(p.index)
        and t.index.is_unique
        and p.index.is_unique
        and set(t.index) == set(p.index)
    ):
        p = p.reindex(t.index)  # same spots in another order: match them by name
    t = t.reset_index(drop=True)
    p = p.reset_index(drop=True)

    missing = t.isna().to_numpy()
    extra: list[Any] = []
    if unlabelled is not None:
        if isinstance(unlabelled, str) or not isinstance(unlabelled, Iterable):
            extra.append(unlabelled)
        else:
            extra.extend(unlabelled)
    if extra:
        missing |= t.astype(object).isin(extra).to_numpy()
    as_obj = t.astype(object)
    is_str = as_obj.map(lambda x: isinstance(x, str)).to_numpy(dtype=bool)
    if is_str.any():  # empty (or blank) strings mean "no label"
        missing[is_str] |= as_obj[is_str].str.strip().eq("").to_numpy()
    keep = ~missing
    if not keep.any():
        msg = "`labels_true` has no labelled spot (all are NaN, None, empty or in `unlabelled`)."
        raise ValueError(msg)
    p_kept = p[keep]
    if p_kept.isna().any():
        n_na = int(p_kept.isna().sum())
        msg = f"`labels_pred` has {n_na} missing labels on labelled spots; every labelled spot needs a predicted label."
        raise ValueError(msg)
    codes_t, _ = pd.factorize(t[keep].astype(object), sort=False)
    codes_p, _ = pd.factorize(p_kept.astype(object), sort=False)
    return codes_t, codes_p


def ari(labels_true: Any, labels_pred: Any, *, unlabelled: Any = None) -> float:
    """Adjusted Rand index between reference labels and predicted domains, on the labelled spots only.

    Spots whose reference label is missing (NaN, `None`, `pandas.NA`, an empty string, or a value in `unlabelled`)
    are left out, as in the DLPFC benchmarks where some spots have no manual layer.

    Parameters
    ----------
    labels_true
        Reference label of each spot (array, list, :class:`pandas.Series` or :class:`pandas.Categorical`),
        e.g. `adata.obs['layer_guess_reordered']`.
    labels_pred
        Predicted label of each spot, same length (e.g. `adata.obs['stereomm_domain']`). When both are
        :class:`pandas.Series` holding the same index in another order, they are matched by index.
    unlabelled
        Extra value, or list of values, of `labels_true` that mean "no label" (e.g. `"unknown"`).

    Returns
    -------
    The adjusted Rand index over the labelled spots, as computed by
    :func:`sklearn.metrics.adjusted_rand_score` (1 for identical partitions, about 0 for random ones).

    Examples
    --------
    >>> hs.metrics.ari(adata.obs["layer_guess_reordered"], adata.obs["stereomm_domain"])
    """
    from sklearn.metrics import adjusted_rand_score

    t, p = _labelled(labels_true, labels_pred, unlabelled)
    return float(adjusted_rand_score(t, p))


def nmi(
    labels_true: Any,
    labels_pred: Any,
    *,
    unlabelled: Any = None,
    average_method: Literal["min", "geometric", "arithmetic", "max"] = "arithmetic",
) -> float:
    """Normalised mutual information between reference labels and predicted domains, on the labelled spots only.

    Spots whose reference label is missing (NaN, `None`, `pandas.NA`, an empty string, or a value in `unlabelled`)
    are left out.

    Parameters
    ----------
    labels_true
        Reference label of each spot (array, list, :class:`pandas.Series` or :class:`pandas.Categorical`).
    labels_pred
        Predicted label of each spot, same length. When both are :class:`pandas.Series` holding the same index in
        another order, they are matched by index.
    unlabelled
        Extra value, or list of values, of `labels_true` that mean "no label".
    average_method
        Normaliser of the mutual information, as in :func:`sklearn.metrics.normalized_mutual_info_score`.

    Returns
    -------
    The normalised mutual information over the labelled spots, as computed by
    :func:`sklearn.metrics.normalized_mutual_info_score` (between 0 and 1).

    Examples
    --------
    >>> hs.metrics.nmi(adata.obs["layer_guess_reordered"], adata.obs["stereomm_domain"])
    """
    from sklearn.metrics import normalized_mutual_info_score

    t, p = _labelled(labels_true, labels_pred, unlabelled)
    return float(normalized_mutual_info_score(t, p, average_method=average_method))
