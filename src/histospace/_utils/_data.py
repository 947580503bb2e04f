"""Small data jobs shared by the models, tools and plots: one helper each (slides, normalisation, graphs, genes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from histospace._constants import LIBRARY_KEY
from histospace._spatial._uns import uns_libraries


def as_dense(x) -> np.ndarray:
    """`x` as a numpy array (sparse matrices densified, DataFrames converted)."""
    if sp.issparse(x):
        return x.toarray()
    if hasattr(x, "to_numpy"):
        return x.to_numpy()
    return np.asarray(x)


def named_layers(adata: AnnData) -> dict:
    """`adata.layers` without `adata.X`: anndata >= 0.13 lists `X` among the layers under the key `None`."""
    return {k: v for k, v in adata.layers.items() if k is not None}


def library_labels(adata: AnnData, library_key: str | None = LIBRARY_KEY, *, required: bool = False) -> np.ndarray:
    """The slide of every spot, as strings (one rule for every function).

    - `library_key` names a column of `adata.obs`: its values (no missing value allowed).
    - `library_key` is `None`, or the default `'library_id'` and the column is absent (and not `required`): one slide,
      named after the only library of `adata.uns['spatial']` when there is exactly one, else `'0'`.
    - another `library_key` (or any, when `required`) that is not a column of `adata.obs`: `KeyError`.
    """
    if library_key is not None and library_key in adata.obs:
        col = adata.obs[library_key]
        if col.isna().any():
            msg = f"`adata.obs[{library_key!r}]` has {int(col.isna().sum())} missing values; every spot needs a slide."
            raise ValueError(msg)
        return col.astype(str).to_numpy(dtype=object)
    if library_key is not None and (required or library_key != LIBRARY_KEY):
        msg = (
            f"`adata.obs[{library_key!r}]` not found; pass `library_key=` naming the obs column that tells the slides "
            f"apart (obs columns: {list(adata.obs.columns)[:10]}), or `library_key=None` for a single slide."
        )
        raise KeyError(msg)
    libs = uns_libraries(adata)
    name = str(libs[0]) if len(libs) == 1 else "0"
    return np.full(adata.n_obs, name, dtype=object)


def log_normalize(x, *, target_sum: float = 1e4, log: str = "log1p") -> np.ndarray | sp.csr_matrix:
    """Per-spot normalisation to `target_sum` then a log: `'log1p'` = `ln(1 + x)`, `'log10'` = `log10(1 + x)`.

    Sparse input stays sparse (CSR); the arithmetic is in float64 and the result float32. Spots with no counts stay 0.
    """
    if log not in ("log1p", "log10"):
        msg = f"`log` must be 'log1p' or 'log10', got {log!r}."
        raise ValueError(msg)
    f = np.log1p if log == "log1p" else (lambda v: np.log10(1.0 + v))
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float64)
        tot = np.asarray(x.sum(axis=1)).ravel()
        scale = np.divide(target_sum, tot, out=np.zeros_like(tot), where=tot > 0)
        x = sp.csr_matrix(sp.diags(scale) @ x)
        x.data = f(x.data)
        return x.astype(np.float32)
    x = np.asarray(x, dtype=np.float64)
    tot = x.sum(axis=1, keepdims=True)
    x = np.divide(target_sum * x, tot, out=np.zeros_like(x), where=tot > 0)
    return f(x).astype(np.float32)


def binary_adjacency(adj, *, self_loops: bool = False) -> sp.csr_matrix:
    """Symmetrised, binarised adjacency (float32 CSR): `A_ij = 1` when `i -> j` or `j -> i`; diagonal as asked."""
    a = sp.csr_matrix(adj)
    a = ((a + a.T) != 0).astype(np.float32)
    a.setdiag(0.0)
    a.eliminate_zeros()
    if self_loops:
        a = sp.csr_matrix(a + sp.eye(a.shape[0], dtype=np.float32, format="csr"))
    a.sort_indices()
    return a


def check_genes(genes: Sequence[str], var_names, *, where: str, fix: str, error: type[Exception] = KeyError) -> None:
    """Raise `error` naming up to five of `genes` that are not in `var_names` (`where` names the object)."""
    present = pd.Index(var_names)
    missing = [g for g in genes if g not in present]
    if missing:
        msg = f"{len(missing)} gene(s) not in `{where}`, e.g. {missing[:5]}. {fix}"
        raise error(msg)


def check_key_added(key_added, *, name: str = "key_added") -> str:
    """Return `key_added` after checking it is a non-empty str (an int would only fail when the file is written)."""
    if not isinstance(key_added, str) or not key_added:
        msg = f"`{name}` must be a non-empty str, got {key_added!r}."
        raise TypeError(msg)
    return key_added


def uns_safe(d: Mapping) -> dict:
    """A copy of `d` that survives `write_h5ad`/zarr: tuples and lists become arrays (lists of str stay), nested dicts."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out[k] = uns_safe(v)
        elif isinstance(v, list | tuple):
            out[k] = [str(s) for s in v] if v and all(isinstance(s, str) for s in v) else np.asarray(v)
        else:
            out[k] = v
    return out


def smooth_over_neighbors(x: np.ndarray, xy: np.ndarray, libs: np.ndarray | None, *, n_neighbors: int) -> np.ndarray:
    """Average the rows of `x` over each spot and its `n_neighbors` nearest spatial neighbours within its slide."""
    from scipy.spatial import cKDTree

    libs = np.zeros(x.shape[0], dtype=int) if libs is None else libs
    out = np.empty_like(x)
    for lib in pd.unique(libs):
        m = np.flatnonzero(libs == lib)
        k = min(n_neighbors + 1, m.size)
        _, nn = cKDTree(xy[m]).query(xy[m], k=k)
        nn = nn.reshape(m.size, k)
        out[m] = x[m][nn].mean(axis=1)
    return out


#: per-spot normalisations of a gene panel (mclSTExp targets): name -> `log` of :func:`log_normalize`, or None
PANEL_NORMALIZATIONS = {"log1p_cp10k": "log1p", "log10_cp10k": "log10", "none": None}


def normalize_expression(x, method: str) -> np.ndarray:
    """Dense float32 panel expression normalised per spot: `'log1p_cp10k'` = `ln(1 + 1e4 x / s)`, `'log10_cp10k'` =
    `log10(1 + 1e4 x / s)` (the mclSTExp code), `'none'` = as given; `s` is the spot's total over the panel.
    """  # noqa: D205
    if method not in PANEL_NORMALIZATIONS:
        msg = f"`normalize` must be one of {tuple(PANEL_NORMALIZATIONS)}, got {method!r}."
        raise ValueError(msg)
    x = as_dense(x)
    log = PANEL_NORMALIZATIONS[method]
    return np.asarray(x, dtype=np.float32) if log is None else log_normalize(x, log=log)
