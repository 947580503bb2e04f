"""Per-gene trust of expression predictions: spatially corrected p-values, BH-FDR, Stouffer over folds, tables.

Used by :func:`histospace.tl.mclstexp_cross_validate` (which computes the tables), by
:func:`histospace.tl.mclstexp_predict` (which records them next to the predictions, `gene_scores=`) and by
:func:`histospace.pl.gene_predictability`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

#: FDR level of `frac_folds_fdr05` and `n_genes_fdr05`
FDR_LEVEL = 0.05
#: columns of a gene-score table, in order (`pcc` is the only one required from a user's table)
SCORE_COLUMNS = (
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
)


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values of the finite entries of `p` (NaN stays NaN, and is not counted)."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    m = np.isfinite(p)
    if m.any():
        out[m] = false_discovery_control(np.clip(p[m], 0.0, 1.0), method="bh")
    return out


def stouffer_pearson(r: np.ndarray, n: np.ndarray) -> np.ndarray:
    """One-sided (r > 0) p-value per row, combining the columns' Pearson r over `n` spots by weighted Stouffer.

    Each fold's r becomes `z_i = atanh(r_i) sqrt(n_i - 3)` (Fisher's transform: standard normal when the true
    correlation is 0), and `Z = sum_i sqrt(n_i - 3) z_i / sqrt(sum_i (n_i - 3))` (weights `sqrt(n_i - 3)`: a fold
    counts by its size). NaN entries (gene not evaluated, or constant) are left out; rows with none give NaN.
    """
    from scipy.stats import norm

    r = np.asarray(r, dtype=np.float64)
    w = np.broadcast_to(np.maximum(np.asarray(n, dtype=np.float64) - 3.0, 0.0), r.shape)
    ok = np.isfinite(r) & (w > 0)
    z = np.where(ok, np.arctanh(np.clip(np.where(ok, r, 0.0), -1 + 1e-12, 1 - 1e-12)), 0.0)
    wsum = np.where(ok, w, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        big_z = (np.where(ok, w, 0.0) * z).sum(axis=1) / np.sqrt(wsum)
    p = norm.sf(big_z)
    p[wsum == 0] = np.nan
    return p


def gene_score_table(
    pearson: pd.DataFrame,
    fdr: pd.DataFrame,
    n_eff: pd.DataFrame,
    n_test: Mapping[str, int],
    expr_sum: pd.DataFrame,
) -> pd.DataFrame:
    """The per-gene summary of one method over folds (see :func:`~histospace.tl.mclstexp_cross_validate`).

    `pearson`, `fdr`, `n_eff`: genes x folds (r, its fold FDR, the effective number of spots behind it); `n_test`:
    held-out spots per fold; `expr_sum`: genes x folds sums of the observed (normalised) expression over the held-out
    spots (NaN where the gene was not in that fold's panel).
    """
    folds = list(pearson.columns)
    r = pearson.to_numpy(dtype=np.float64)
    n = np.asarray([n_test[f] for f in folds], dtype=np.float64)[None, :]
    neff = n_eff.reindex(index=pearson.index, columns=folds).to_numpy(dtype=np.float64)
    finite = np.isfinite(r)
    n_folds = finite.sum(axis=1)
    sig = (np.nan_to_num(fdr.to_numpy(dtype=np.float64), nan=1.0) < FDR_LEVEL) & finite & (np.nan_to_num(r) > 0)
    esum = expr_sum.reindex(index=pearson.index, columns=folds).to_numpy(dtype=np.float64)
    evaluated = np.isfinite(esum)
    spots = np.where(evaluated, n, 0.0).sum(axis=1)
    pvalue = stouffer_pearson(r, np.where(finite, neff, 0.0))
    mean = _nanmean(r)
    dev = np.where(finite, r - mean[:, None], 0.0)
    pcc_sd = np.where(n_folds > 1, np.sqrt((dev**2).sum(axis=1) / np.maximum(n_folds - 1, 1)), np.nan)
    return pd.DataFrame(
        {
            "pcc": mean,
            "pcc_median": _nanmedian(r),
            "pcc_sd": pcc_sd,
            "n_folds": n_folds.astype(np.int64),
            "n_spots": np.where(finite, n, 0.0).sum(axis=1).astype(np.int64),
            "n_eff": np.where(finite, neff, 0.0).sum(axis=1),
            "pvalue": pvalue,
            "fdr": bh_fdr(pvalue),
            "frac_folds_fdr05": np.where(n_folds > 0, sig.sum(axis=1) / np.maximum(n_folds, 1), np.nan),
            "mean_expression": np.where(
                spots > 0, np.where(evaluated, esum, 0.0).sum(axis=1) / np.maximum(spots, 1), np.nan
            ),
        },
        index=pearson.index.copy(),
    )


def _nanmean(r: np.ndarray) -> np.ndarray:
    finite = np.isfinite(r)
    k = finite.sum(axis=1)
    s = np.where(finite, r, 0.0).sum(axis=1)
    return np.where(k > 0, s / np.maximum(k, 1), np.nan)


def _nanmedian(r: np.ndarray) -> np.ndarray:
    out = np.full(r.shape[0], np.nan)
    for i, row in enumerate(r):
        row = row[np.isfinite(row)]
        if row.size:
            out[i] = np.median(row)
    return out


def scores_from(gene_scores, *, method: str = "mclstexp", where: str = "gene_scores") -> pd.DataFrame:
    """A gene-score table (genes x columns, `pcc` required) from a cross-validation result, a DataFrame or a dict.

    Accepts the dict returned by :func:`~histospace.tl.mclstexp_cross_validate` (its `['gene_scores'][method]`), a
    :class:`~pandas.DataFrame` indexed by gene, or the dict stored in `uns[key]['gene_scores']` (a `'gene'` list and
    one array per column).
    """
    if isinstance(gene_scores, Mapping) and "gene_scores" in gene_scores:
        tables = gene_scores["gene_scores"]
        if method not in tables:
            msg = f"Method {method!r} not in the cross-validation result; available: {list(tables)}."
            raise KeyError(msg)
        df = tables[method]
    elif isinstance(gene_scores, pd.DataFrame):
        df = gene_scores
    elif isinstance(gene_scores, Mapping) and "gene" in gene_scores:
        genes = [str(g) for g in np.asarray(gene_scores["gene"]).tolist()]
        cols = {k: np.asarray(v) for k, v in gene_scores.items() if k != "gene"}
        bad = [k for k, v in cols.items() if v.shape != (len(genes),)]
        if bad:
            msg = f"`{where}` columns {bad} do not have one value per gene ({len(genes)})."
            raise ValueError(msg)
        df = pd.DataFrame(cols, index=pd.Index(genes))
    else:
        msg = (
            f"`{where}` must be the dict returned by `hs.tl.mclstexp_cross_validate`, a DataFrame indexed by gene with "
            f"a 'pcc' column, or `adata.uns[key]['gene_scores']`; got {type(gene_scores).__name__}."
        )
        raise TypeError(msg)
    if "pcc" not in df.columns:
        msg = f"`{where}` has no 'pcc' column (columns: {list(df.columns)})."
        raise KeyError(msg)
    if not df.index.is_unique:
        msg = f"`{where}` has duplicated genes in its index; keep one row per gene."
        raise ValueError(msg)
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    out = df[numeric].copy()
    out.index = out.index.astype(str)
    return out


#: distance classes of the modified t-test (Dutilleul 1993; the default of R's SpatialPack::modified.ttest)
N_DISTANCE_CLASSES = 13
#: spots used to estimate the spatial autocorrelation of one held-out group: all of them (every pair) up to this
#: many, a seeded random subset of this many beyond. Exact up to 2,000 spots (about 2 s per 1,000 genes), because the
#: subset's estimate moves the FDR counts of a fold: on the mouse olfactory bulb's MOB3 (1,933 spots, the same
#: ridge-PCA256 predictions) a 1,000-spot subset at seeds 0-3 gave 683 / 753 / 373 / 630 genes at FDR < 0.05, all
#: spots 802 at any seed (docs/benchmarks.md).
MAX_SPOTS_AUTOCORRELATION = 2000


class SpatialPairs:
    """Distance classes of the pairs of (a subset of) held-out spots, for :func:`effective_n`.

    Pairs are binned into `n_classes` equal-width classes of their Euclidean distance, `(e_{k-1}, e_k]` up to the
    largest distance within a slide (distance 0 in the first). Pairs of spots of different slides (`libs`) are in no
    class: their correlation counts as 0. Beyond `max_spots` spots, a seeded random subset of `max_spots` estimates
    the class autocorrelations and the share of pairs in each class.
    """

    def __init__(
        self,
        xy: np.ndarray,
        libs: np.ndarray | None = None,
        *,
        n_classes: int = N_DISTANCE_CLASSES,
        max_spots: int = MAX_SPOTS_AUTOCORRELATION,
        random_state: int | None = 0,
    ):
        import scipy.sparse as sp
        from scipy.spatial.distance import pdist

        xy = np.asarray(xy, dtype=np.float64)
        self.n = n = xy.shape[0]
        if n > max_spots:
            self.subset = np.sort(np.random.default_rng(random_state).choice(n, max_spots, replace=False))
        else:
            self.subset = np.arange(n)
        m = self.subset.size
        self.matrices, self.frac = [], []
        if m < 2:
            return
        d = pdist(xy[self.subset])
        i, j = np.triu_indices(m, 1)
        if libs is not None:
            lab = np.asarray(libs)[self.subset]
            same = lab[i] == lab[j]
            d, i, j = d[same], i[same], j[same]
        if d.size == 0:
            self.frac = np.zeros(0)
            return
        edges = np.linspace(0.0, d.max(), n_classes + 1)
        k = np.clip(np.searchsorted(edges, d, side="left") - 1, 0, n_classes - 1)
        for c in range(n_classes):
            sel = k == c
            if not sel.any():
                continue
            w = sp.coo_matrix((np.ones(sel.sum()), (i[sel], j[sel])), shape=(m, m)).tocsr()
            self.matrices.append((w + w.T).tocsr())
            self.frac.append(2.0 * sel.sum() / (m * (m - 1)))  # share of the ordered pairs i != j
        self.frac = np.asarray(self.frac)

    def autocorrelation(self, x: np.ndarray) -> np.ndarray:
        """`(n_classes, n_genes)` Moran-type autocorrelation of each column of `x` (rows: all held-out spots).

        `rho_k = mean over pairs of class k of z_i z_j / mean of z^2`, `z` the centred column; NaN for a constant
        column.
        """
        z = np.asarray(x, dtype=np.float64)[self.subset]
        z = z - z.mean(axis=0)
        var = (z**2).mean(axis=0)
        out = np.empty((len(self.matrices), z.shape[1]))
        for c, w in enumerate(self.matrices):
            out[c] = (z * (w @ z)).sum(axis=0) / w.nnz
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(var > 0, out / np.where(var > 0, var, 1.0), np.nan)


def effective_n(pairs: SpatialPairs, rho_x: np.ndarray, rho_y: np.ndarray) -> np.ndarray:
    """Effective sample size of the correlation of two spatially autocorrelated variables, per column.

    Clifford, Richardson & Hemon (1989) and Dutilleul (1993): under independence of the two variables,
    `var(r) = sum_ij rho_x(ij) rho_y(ij) / n^2`, estimated by class: `(n + n (n - 1) sum_k f_k rho_x(k) rho_y(k)) / n^2`
    with `f_k` the share of pairs in class `k`; `n_eff = 1 + 1 / var(r)`, kept within `[3, n]` (never more
    information than the spots themselves). `n` for a constant column, or with fewer than 2 spots.
    """
    n = pairs.n
    if not len(pairs.matrices):
        return np.full(rho_x.shape[1], float(n))
    s = np.nansum(pairs.frac[:, None] * rho_x * rho_y, axis=0)
    var = (n + n * (n - 1.0) * s) / n**2
    with np.errstate(divide="ignore"):
        n_eff = np.where(var > 0, 1.0 + 1.0 / np.where(var > 0, var, 1.0), n)
    n_eff = np.clip(n_eff, min(3.0, n), n)
    return np.where(np.isfinite(rho_x).all(axis=0) & np.isfinite(rho_y).all(axis=0), n_eff, float(n))


def pearson_pvalue(r: np.ndarray, n_eff: np.ndarray) -> np.ndarray:
    """Two-sided p-value of Pearson's r with `n_eff - 2` degrees of freedom (the modified t-test); NaN for NaN r."""
    from scipy.stats import t as student_t

    r = np.asarray(r, dtype=np.float64)
    df = np.maximum(np.asarray(n_eff, dtype=np.float64) - 2.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.abs(r) * np.sqrt(df / np.maximum(1.0 - r**2, 0.0))
    p = 2.0 * student_t.sf(t, df)
    return np.where(np.isfinite(r), np.clip(p, 0.0, 1.0), np.nan)
