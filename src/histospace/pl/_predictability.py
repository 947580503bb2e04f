"""Per-gene predictability of expression from H&E: held-out Pearson r against mean expression."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib import pyplot as plt
from matplotlib.axes import Axes

from histospace._constants import MCLSTEXP_KEY
from histospace._utils._sdata import as_table, is_spatialdata
from histospace.pl._utils import finish as _finish


def gene_predictability(
    data,
    *,
    method: str = "mclstexp",
    key: str = MCLSTEXP_KEY,
    table_key: str | None = None,
    fdr: float = 0.05,
    n_labels: int = 8,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """Held-out Pearson r of each gene against its mean expression, genes significant at the FDR highlighted.

    Which genes can be trusted: a gene is predictable when its cross-validated correlation is positive and
    significant. Highly expressed genes are measured with less noise, so they tend to get higher correlations; the
    plot shows whether a gene's score stands out from that trend. The `n_labels` genes with the highest r among the
    significant ones are named.

    Parameters
    ----------
    data
        The dict returned by :func:`~histospace.tl.mclstexp_cross_validate`, a gene-score
        :class:`~pandas.DataFrame` (its `['gene_scores'][method]`), or an AnnData predicted with
        `gene_scores=` (:func:`~histospace.tl.mclstexp_predict`, read from `adata.uns[key]['gene_scores']`), or a
        SpatialData whose table was. The scores need the columns `pcc` and `mean_expression`; `fdr` for the
        highlight.
    method
        Method of a cross-validation result (`'mclstexp'`, `'bleep'`, `'ridge_pca256'`, ...).
    key
        `adata.uns` entry of the predictions, for an AnnData or a SpatialData.
    table_key
        SpatialData: the table predicted (default: the only one).
    fdr
        FDR level of the highlight: genes with `fdr < fdr` and a positive r.
    n_labels
        Number of significant genes named (highest r first); `0` names none.
    ax
        Axes to draw into; a new figure by default.
    show
        Show the figure; `None` follows `scanpy.settings.autoshow`. With `show=False` the axes are returned.

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` if `show=False`, else `None`. Genes with a mean expression of 0 (or NaN) or
    no r cannot be placed on the log axis and are left out (the legend counts the genes drawn).
    """
    from histospace.tl._gene_scores import scores_from

    if is_spatialdata(data):
        data = as_table(data, table_key, name="data")[0]
    if isinstance(data, AnnData):
        entry = data.uns.get(key)
        if not isinstance(entry, dict) or "gene_scores" not in entry:
            msg = (
                f"`adata.uns[{key!r}]['gene_scores']` not found; predict with "
                "`hs.tl.mclstexp_predict(adata, model=..., gene_scores=cv)` or pass the cross-validation result."
            )
            raise KeyError(msg)
        scores = scores_from(entry["gene_scores"], where=f"adata.uns[{key!r}]['gene_scores']")
    else:
        scores = scores_from(data, method=method, where="data")
    if "mean_expression" not in scores.columns:
        msg = (
            "The gene scores have no 'mean_expression' column; use the tables of `hs.tl.mclstexp_cross_validate`, "
            "which have it."
        )
        raise KeyError(msg)
    if not (0 < fdr < 1):
        msg = f"`fdr` must be in (0, 1), got {fdr!r}."
        raise ValueError(msg)
    if n_labels < 0:
        msg = f"`n_labels` must be >= 0, got {n_labels!r}."
        raise ValueError(msg)
    x = scores["mean_expression"].to_numpy(dtype=np.float64)
    y = scores["pcc"].to_numpy(dtype=np.float64)
    keep = np.isfinite(x) & (x > 0) & np.isfinite(y)
    q = scores["fdr"].to_numpy(dtype=np.float64) if "fdr" in scores.columns else np.full(len(scores), np.nan)
    sig = keep & (np.nan_to_num(q, nan=1.0) < fdr) & (y > 0)
    rest = keep & ~sig

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.scatter(x[rest], y[rest], s=8, c="#9a9a9a", alpha=0.6, linewidths=0, label=f"other ({rest.sum()})")
    if "fdr" in scores.columns:
        ax.scatter(x[sig], y[sig], s=12, c="#C44E52", alpha=0.9, linewidths=0, label=f"FDR < {fdr:g} ({sig.sum()})")
    ax.axhline(0, color="k", lw=0.6, ls=":")
    ax.set_xscale("log")
    pool = np.flatnonzero(sig if "fdr" in scores.columns else keep)
    best = pool[np.argsort(-y[pool], kind="stable")][:n_labels]
    _label(ax, scores.index.to_numpy()[best], x[best], y[best])
    ax.set_xlabel("mean expression over held-out spots (log scale)")
    ax.set_ylabel("held-out Pearson r (mean over folds)")
    title = f"{sig.sum()} of {keep.sum()} genes predictable" if "fdr" in scores.columns else f"{keep.sum()} genes"
    if not isinstance(data, AnnData | pd.DataFrame) and isinstance(data, dict) and "gene_scores" in data:
        title += f" ({method})"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    return _finish(ax, show)


def _label(ax: Axes, names, x: np.ndarray, y: np.ndarray, fontsize: float = 7) -> None:
    """Name points, moving a label down (in steps of a text line) until it overlaps no label placed before it."""
    if not len(names):
        return
    ax.autoscale_view()
    to_px = ax.transData.transform
    dpi_scale = ax.figure.dpi / 72.0
    line = 1.25 * fontsize * dpi_scale  # pixels per text line
    placed: list[tuple[float, float, float, float]] = []
    for name, xi, yi in sorted(zip(names, x, y, strict=True), key=lambda t: -t[2]):
        px, py = to_px((xi, yi))
        w = 0.62 * fontsize * dpi_scale * len(str(name))
        dy = 0.0
        for _ in range(40):
            box = (px + 3 * dpi_scale, py - dy, px + 3 * dpi_scale + w, py - dy + line)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
            dy += line
        placed.append(box)
        kw = {"arrowprops": {"arrowstyle": "-", "lw": 0.4, "color": "0.4"}} if dy else {}
        ax.annotate(
            str(name), (xi, yi), xytext=(3, 2 - dy / dpi_scale), textcoords="offset points", fontsize=fontsize, **kw
        )
