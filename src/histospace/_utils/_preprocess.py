"""Feature preprocessing of StereoMM's inputs: normalise, select genes (scanpy's HVG), z-score, PCA (scanpy's PCA).

Everything fitted is kept in arrays (:class:`Preprocessor`), so a saved model transforms its AnnData again exactly.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from histospace._utils._data import log_normalize
from histospace._utils._device import keep_torch_threads


def _looks_like_counts(x) -> bool:
    data = x.data if sp.issparse(x) else np.asarray(x)
    if data.size == 0:
        return False
    sample = np.asarray(data.ravel()[:1_000_000])
    return bool(np.all(np.mod(sample, 1) == 0))


#: dense inputs with more entries than this are reduced in row chunks with float64 accumulators (column mean and
#: variance, PCA by the eigendecomposition of the covariance) instead of through float64 copies of the whole matrix:
#: 3.8 x 10^5 bins x 1280 image features are 3.9 GB per float64 copy, and ARPACK's PCA held three of them. Below it
#: (e.g. 4,000 Visium spots), the one-copy path and scanpy's ARPACK PCA are kept, so results there do not change.
CHUNKED_ENTRIES = 2**27


def _row_chunks(x):
    step = max(1, 2**24 // max(x.shape[1], 1))  # 128 MB of float64 per chunk
    for i in range(0, x.shape[0], step):
        yield np.asarray(x[i : i + step], dtype=np.float64)


def _chunked(x) -> bool:
    return not sp.issparse(x) and x.shape[0] * x.shape[1] > CHUNKED_ENTRIES


def _col_mean_var(x) -> tuple[np.ndarray, np.ndarray]:
    if sp.issparse(x):
        mean = np.asarray(x.mean(axis=0), dtype=np.float64).ravel()
        sq = np.asarray(x.multiply(x).mean(axis=0), dtype=np.float64).ravel()
        var = np.maximum(sq - mean**2, 0)
    elif _chunked(x):  # two passes (mean, then centred squares), as numpy's var
        n = x.shape[0]
        mean = sum(c.sum(axis=0) for c in _row_chunks(x)) / n
        var = sum(((c - mean) ** 2).sum(axis=0) for c in _row_chunks(x)) / n
    else:
        x = np.asarray(x, dtype=np.float64)
        mean, var = x.mean(0), x.var(0)
    return mean, var


def _covariance_components(x, mean: np.ndarray, scale: np.ndarray, n_comps: int) -> np.ndarray:
    """Top principal axes `(d, n_comps)` of `(x - mean) / scale` from its covariance, accumulated in row chunks."""
    d = x.shape[1]
    cov = np.zeros((d, d))
    centre = mean / scale
    for c in _row_chunks(x):
        c = c / scale  # a new array: a float64 chunk of `x` is a view of the caller's data
        c -= centre
        cov += c.T @ c
    cov /= max(x.shape[0] - 1, 1)
    _, v = np.linalg.eigh(cov)  # ascending eigenvalues
    return v[:, ::-1][:, :n_comps]


def _fixed_signs(v: np.ndarray) -> np.ndarray:
    """Principal axes (columns) with deterministic signs: the largest absolute loading of each positive."""
    signs = np.sign(v[np.abs(v).argmax(0), np.arange(v.shape[1])])
    signs[signs == 0] = 1
    return v * signs


def covariance_pca(x, n_comps: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean `(d,)` and top principal axes `(d, n_comps)` (float64, signs fixed) of the rows of a dense `x`.

    The float64 covariance is accumulated in row chunks (no float64 copy of `x`) and eigendecomposed.
    """
    mean = sum(c.sum(axis=0) for c in _row_chunks(x)) / max(x.shape[0], 1)
    return mean, _fixed_signs(_covariance_components(x, mean, np.ones_like(mean), n_comps))


def highly_variable_genes(
    x_log, var_names, n_top: int, *, batch: np.ndarray | None = None, min_spots: int = 3, min_fraction: float = 0.01
) -> np.ndarray:
    """Indices of the `n_top` highly variable genes (scanpy's Seurat flavour) of log-normalised `x_log`.

    Genes detected in fewer than `max(min_spots, min_fraction * n_obs)` spots are left out first; with `batch`
    (one label per spot, several values) the genes are ranked per batch as scanpy does. The one gene selection of both
    models. Returns an empty array when too few spots or genes are left to bin the dispersions.
    """
    import pandas as pd
    import scanpy as sc

    x_log = sp.csr_matrix(x_log) if sp.issparse(x_log) else np.asarray(x_log)
    detected = np.asarray((x_log > 0).sum(axis=0)).ravel()
    keep = np.flatnonzero(detected >= max(min_spots, int(min_fraction * x_log.shape[0])))
    if keep.size == 0 or x_log.shape[0] < 3:
        return np.zeros(0, dtype=np.int64)
    tmp = AnnData(X=x_log[:, keep], var=pd.DataFrame(index=pd.Index(np.asarray(var_names)[keep].astype(str))))
    batch_key = None
    if batch is not None and len(pd.unique(batch)) > 1:
        tmp.obs["_batch"] = np.asarray(batch).astype(str)
        batch_key = "_batch"
    try:
        with warnings.catch_warnings(), keep_torch_threads():
            warnings.simplefilter("ignore")
            sc.pp.highly_variable_genes(
                tmp, n_top_genes=min(n_top, tmp.n_vars), flavor="seurat", batch_key=batch_key, inplace=True
            )
    except (ValueError, IndexError):  # too few spots or genes to bin the dispersions
        return np.zeros(0, dtype=np.int64)
    return keep[np.flatnonzero(tmp.var["highly_variable"].to_numpy())]


def _pca_components(x, mean: np.ndarray, scale: np.ndarray, n_comps: int) -> np.ndarray:
    """Top principal axes `(d, n_comps)` of `(x - mean) / scale` by scanpy's PCA (sparse stays sparse).

    ARPACK with a fixed start (`random_state=0`), so it is deterministic; the exact covariance eigendecomposition
    when every component is asked for (ARPACK needs fewer than `min(n, d)`) and, in row chunks, for dense inputs
    above :data:`CHUNKED_ENTRIES` entries.
    """
    import scanpy as sc

    n, d = x.shape
    if _chunked(x):
        v = _covariance_components(x, mean, scale, n_comps)
    else:
        if sp.issparse(x):
            xs = sp.csr_matrix(x @ sp.diags(1.0 / scale)).astype(np.float64, copy=False)
        else:
            xs = np.array(x, dtype=np.float64)  # one copy, divided in place
            xs /= scale
        solver = "arpack" if n_comps < min(n, d) else "covariance_eigh"
        tmp = AnnData(X=xs)
        with warnings.catch_warnings(), keep_torch_threads():
            warnings.simplefilter("ignore")
            sc.pp.pca(tmp, n_comps=n_comps, zero_center=True, svd_solver=solver, random_state=0, dtype="float64")
        v = np.asarray(tmp.varm["PCs"], dtype=np.float64)
    return _fixed_signs(v).astype(np.float32)


def _project(x, mean: np.ndarray, scale: np.ndarray, comps: np.ndarray | None) -> np.ndarray:
    """``((x - mean) / scale) @ comps`` (or the z-score alone), in row chunks, float32."""
    out_dim = x.shape[1] if comps is None else comps.shape[1]
    out = np.empty((x.shape[0], out_dim), dtype=np.float32)
    mean32, scale32 = mean.astype(np.float32), scale.astype(np.float32)
    for i in range(0, x.shape[0], 65536):
        c = x[i : i + 65536]
        c = c.toarray() if sp.issparse(c) else np.asarray(c)
        c = (c.astype(np.float32) - mean32) / scale32
        out[i : i + 65536] = c if comps is None else c @ comps
    return out


class Preprocessor:
    """Fitted feature preprocessing; everything needed to transform the same AnnData again is kept in arrays."""

    def __init__(self, **arrays):
        self.arrays = arrays

    @classmethod
    def fit(cls, x_expr, x_img, *, gene_selection, n_top_genes, normalize, n_pcs, var_names) -> Preprocessor:
        arrays: dict[str, np.ndarray] = {}
        do_norm = normalize == "log1p" or (normalize == "auto" and _looks_like_counts(x_expr))
        arrays["normalize"] = np.array(bool(do_norm))
        x = log_normalize(x_expr) if do_norm else x_expr
        n_genes = x.shape[1]
        k = min(n_top_genes or n_genes, n_genes)
        if gene_selection == "all" or k >= n_genes:
            genes = np.arange(n_genes)
        elif gene_selection == "top_variance":
            genes = np.sort(np.argsort(-_col_mean_var(x)[1], kind="stable")[:k])
        else:  # hvg
            genes = highly_variable_genes(x, var_names, k)
            if genes.size == 0:
                msg = (
                    f"No gene is detected in enough of the {x.shape[0]} spots to select highly variable genes; pass "
                    "`gene_selection='all'` or more spots."
                )
                raise ValueError(msg)
        arrays["genes"] = np.asarray(var_names)[genes].astype(str)
        xg = x[:, genes]
        mean, var = _col_mean_var(xg)
        std = np.sqrt(var)
        std[std == 0] = 1.0
        arrays["expr_mean"], arrays["expr_std"] = mean, std
        d_t = len(genes) if n_pcs is None else min(n_pcs, len(genes), max(x.shape[0] - 1, 1))
        if x_img is not None:
            d_m = x_img.shape[1]
            d_t = min(d_t, d_m) if n_pcs is None else min(d_t, d_m, max(x.shape[0] - 1, 1))
        if n_pcs is not None or d_t < len(genes):
            arrays["expr_pcs"] = _pca_components(xg, mean, std, d_t)
        if x_img is not None:
            imean, ivar = _col_mean_var(x_img)
            istd = np.sqrt(ivar)
            istd[istd == 0] = 1.0
            arrays["img_mean"], arrays["img_std"] = imean, istd
            if n_pcs is not None or x_img.shape[1] != d_t:
                arrays["img_pcs"] = _pca_components(x_img, imean, istd, d_t)
        pre = cls(**arrays)
        # block scale: mean per-dimension variance 1 on each side (PCs keep their relative variances)
        xt, xm = pre.transform(x_expr, x_img, scaled=False, gene_index=genes)
        pre.arrays["expr_block_scale"] = np.array(float(np.sqrt(np.mean(xt.var(0))) or 1.0))
        if xm is not None:
            pre.arrays["img_block_scale"] = np.array(float(np.sqrt(np.mean(xm.var(0))) or 1.0))
        return pre

    @property
    def genes(self) -> np.ndarray:
        return self.arrays["genes"]

    def transform(self, x_expr, x_img, *, gene_index, scaled: bool = True):
        """Expression and image blocks of the spots; `gene_index`: columns of the model's genes in `x_expr`."""
        a = self.arrays
        x = log_normalize(x_expr) if bool(a["normalize"]) else x_expr
        x = x[:, gene_index]
        xt = _project(x, a["expr_mean"], a["expr_std"], a.get("expr_pcs"))
        xm = None
        if x_img is not None:
            xm = _project(x_img, a["img_mean"], a["img_std"], a.get("img_pcs"))
        if scaled:
            xt /= np.float32(a["expr_block_scale"])
            if xm is not None:
                xm /= np.float32(a["img_block_scale"])
        return xt, xm
