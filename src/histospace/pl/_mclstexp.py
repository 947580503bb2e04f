"""Plots for mclSTExp: predicted vs observed expression over the H&E image, per-gene correlations, top genes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib import pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from histospace._constants import LIBRARY_KEY, MCLSTEXP_KEY, SPATIAL_KEY
from histospace._spatial._uns import images as uns_images
from histospace._spatial._uns import scalefactors
from histospace._utils import get_matrix
from histospace._utils._data import library_labels, normalize_expression
from histospace.pl._render import draw_values, element_geometry
from histospace.pl._utils import finish as _finish

if TYPE_CHECKING:
    from spatialdata import SpatialData
from histospace.pl._utils import plot_library, sdata_plot_slide

_UNITS = {"log1p_cp10k": "ln(1 + CP10k)", "log10_cp10k": "log10(1 + CP10k)", "none": "expression"}


def predicted_vs_observed(
    adata: AnnData | SpatialData,
    *,
    genes: Sequence[str],
    table_key: str | None = None,
    image_key: str | None = None,
    key: str = MCLSTEXP_KEY,
    layer: str | None = None,
    library_id: str | None = None,
    library_key: str = LIBRARY_KEY,
    spatial_key: str = SPATIAL_KEY,
    img_res: str = "hires",
    cmap: str = "viridis",
    alpha: float = 0.9,
    shared_scale: bool = True,
    vmin: float | None = None,
    vmax: float | None = None,
    spot_scale: float = 1.0,
    panel_size: float = 3.6,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
) -> Figure | None:
    """Observed and predicted expression of chosen genes side by side over the H&E image.

    Rows are genes; the left column is the observed expression (normalised per spot as the model's targets), the
    right column the prediction in `adata.obsm[key]` (written by :func:`~histospace.tl.mclstexp_predict`). When
    `adata` has no observed expression of the model's panel (an H&E-only slide) only the prediction is drawn. The
    title of each prediction gives the Pearson correlation with the observation over the spots shown. Observed and
    predicted share one colour scale per gene by default: separate scales would make any two maps look alike.

    Parameters
    ----------
    adata
        AnnData with predictions from :func:`~histospace.tl.mclstexp_predict`.
    genes
        Genes to show (of the model's panel).
    table_key
        With a SpatialData: the table with the predictions (`None`: the only table).
    image_key
        With a SpatialData: the H&E element drawn under the spots (read at a ~2,000-px pyramid level).
    key
        `obsm` (and `uns`) entry with the predictions.
    layer
        Layer with the observed counts; `None` uses `adata.X`. They are normalised as the model's targets
        (`adata.uns[key]['params']['normalize']`) over the panel genes.
    library_id
        Slide to show (key of `adata.uns['spatial']`); default: the only slide with an image.
    library_key
        `adata.obs` column with slides; only its spots of `library_id` are drawn.
    spatial_key
        `adata.obsm` key with full-resolution pixel coordinates.
    img_res
        Image of `adata.uns['spatial'][library_id]['images']` drawn under the spots (`'hires'` or `'lowres'`).
    cmap, alpha
        Colour map and spot opacity.
    shared_scale
        One colour scale for the observed and the predicted map of a gene (from the range of both); `False` gives
        each map its own.
    vmin, vmax
        Fixed ends of the colour scale (override `shared_scale`).
    spot_scale
        Factor on the spot diameter (`spot_diameter_fullres`).
    panel_size
        Size in inches of each panel (new figure only).
    ax
        Axes to draw into instead of a new figure: one per panel, row by row (for each gene its observed, then its
        predicted panel; only the predicted one when there is no observed expression).
    show
        Show the figure; `None` follows `scanpy.settings.autoshow`. With `show=False` the figure is returned.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` if `show=False`, else `None`.
    """
    genes = [genes] if isinstance(genes, str) else list(genes)
    slide = None
    if not isinstance(adata, AnnData):  # a SpatialData: its table at the adapter's centres over a ~2,000-px level
        table, slide, sdata_image = sdata_plot_slide(adata, table_key=table_key, image_key=image_key)
        adata = table
    elif spatial_key not in adata.obsm:
        msg = f"`adata.obsm[{spatial_key!r}]` not found; spot coordinates are needed to draw the tissue."
        raise KeyError(msg)
    pred_df = adata.obsm.get(key)
    if not isinstance(pred_df, pd.DataFrame):
        msg = f"`adata.obsm[{key!r}]` not found (or not a DataFrame); run `hs.tl.mclstexp_predict(adata, model=...)` first."
        raise KeyError(msg)
    missing = [g for g in genes if g not in pred_df.columns]
    if missing:
        msg = f"Genes {missing} are not predicted in `adata.obsm[{key!r}]` (the model's panel)."
        raise KeyError(msg)
    uns = adata.uns.get(key)
    params = uns.get("params", {}) if isinstance(uns, dict) else {}
    panel = list(pred_df.columns)
    pred_all = pred_df.to_numpy(dtype=np.float32)
    obs_all = None
    if adata.n_vars and all(g in adata.var_names for g in panel):  # observed expression of the whole panel
        x = get_matrix(adata, layer)[:, adata.var_names.get_indexer(panel)]
        obs_all = normalize_expression(x, params.get("normalize", "log1p_cp10k"))

    image, scale, diameter = None, 1.0, None
    if slide is not None:
        lib, mask, xy = slide.library_id, slide.rows, slide.centres  # image pixels of the drawn level
        image, diameter = sdata_image, slide.spot_diameter
    else:
        lib = plot_library(adata, library_id, library_key)
        labels = library_labels(adata, library_key)
        mask = labels == lib if lib is not None and (labels == lib).any() else np.ones(adata.n_obs, dtype=bool)
        if lib is not None:
            sf, lib_images = scalefactors(adata, lib), uns_images(adata, lib)
            if img_res in lib_images:
                image = lib_images[img_res]
                scale = float(sf.get(f"tissue_{img_res}_scalef", 1.0))
            if "spot_diameter_fullres" in sf:
                diameter = float(sf["spot_diameter_fullres"])
        xy = np.asarray(adata.obsm[spatial_key], dtype=float)[mask]  # full-resolution pixels
        if image is not None:  # drawn in the image's pixels, as squidpy (and `pl.domains`) draw a Visium AnnData
            xy, diameter, scale = xy * scale, None if diameter is None else diameter * scale, 1.0
    unit = "image pixels" if image is not None else ("full-resolution pixels" if slide is None else "coordinate units")
    shape, size = element_geometry(adata[mask], xy, diameter=diameter)
    size *= spot_scale

    ncol = 1 if obs_all is None else 2
    if ax is None:
        fig, axes = plt.subplots(
            len(genes), ncol, figsize=(panel_size * ncol * 1.15, panel_size * len(genes)), squeeze=False
        )
    else:
        flat = [ax] if isinstance(ax, Axes) else list(np.ravel(np.asarray(ax, dtype=object)))
        if len(flat) != len(genes) * ncol:
            msg = f"`ax` must hold {len(genes) * ncol} Axes ({len(genes)} gene(s) x {ncol} panel(s)), got {len(flat)}."
            raise ValueError(msg)
        axes = np.asarray(flat, dtype=object).reshape(len(genes), ncol)
        fig = axes[0, 0].figure
    for i, g in enumerate(genes):
        j = panel.index(g)
        pred = pred_all[mask, j]
        panels = [("predicted", pred)] if obs_all is None else [("observed", obs_all[mask, j]), ("predicted", pred)]
        lo, hi = vmin, vmax
        if shared_scale:
            both = np.concatenate([v for _, v in panels])
            lo = float(np.nanmin(both)) if lo is None and both.size else lo
            hi = float(np.nanmax(both)) if hi is None and both.size else hi
        for c, (what, vals) in enumerate(panels):
            ax_ = axes[i, c]
            coll = draw_values(
                ax_, xy, vals, size=size, shape=shape, image=image, image_scale=scale, cmap=cmap, alpha=alpha,
                vmin=lo, vmax=hi,
            )  # fmt: skip
            ax_.xaxis.set_major_locator(MaxNLocator(3))
            ax_.yaxis.set_major_locator(MaxNLocator(3))
            ax_.tick_params(labelsize=7)
            ax_.set_xlabel(f"x ({unit})", fontsize=8)
            ax_.set_ylabel(f"y ({unit})", fontsize=8)
            cb = ax_.figure.colorbar(coll, ax=ax_, fraction=0.046, pad=0.02)
            cb.set_label(_UNITS.get(params.get("normalize", ""), "expression"), fontsize=8)
            cb.ax.tick_params(labelsize=7)
            title = f"{g} {what}"
            if what == "predicted" and obs_all is not None:
                o = obs_all[mask, j]
                r = np.corrcoef(o, pred)[0, 1] if np.std(o) > 0 and np.std(pred) > 0 else np.nan
                title += f" (r = {r:.2f})"
            ax_.set_title(title, fontsize=10)
    if ax is None:
        if lib is not None:
            fig.suptitle(f"{lib}", fontsize=11)
        fig.tight_layout()
    return _finish(fig, show)


_CORRELATION_INPUT = (
    "`results` must be the dict returned by `hs.tl.mclstexp_cross_validate`, per-gene correlations as a pandas "
    "Series, a genes x folds DataFrame or a 1-d/2-d numeric array"
)


def _pearson_table(results, method: str) -> pd.DataFrame:
    """The genes x folds correlations of `method` in `results`, checked to be numbers (`TypeError` otherwise)."""
    if isinstance(results, dict) and "pearson" in results:
        if method not in results["pearson"]:
            msg = f"Method {method!r} not in the results; available: {list(results['pearson'])}."
            raise KeyError(msg)
        table, where = results["pearson"][method], f"results['pearson'][{method!r}]"
    elif isinstance(results, dict):
        msg = f"{_CORRELATION_INPUT}; got a dict with keys {list(results)[:10]} (no 'pearson')."
        raise TypeError(msg)
    else:
        table, where = results, "results"
    if isinstance(table, pd.Series):
        table = table.to_frame()
    if isinstance(table, pd.DataFrame):
        bad = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
        if bad:
            msg = f"{_CORRELATION_INPUT}; `{where}` has columns that are not numbers: {bad[:5]}."
            raise TypeError(msg)
        return table
    try:
        arr = np.asarray(table)
    except ValueError:  # ragged nested sequences
        arr = np.asarray(None, dtype=object)
    if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_):
        msg = f"{_CORRELATION_INPUT}; `{where}` is a {type(table).__name__}."
        raise TypeError(msg)
    return pd.DataFrame(arr.astype(float).reshape(len(arr), -1))


def gene_correlation(
    results,
    *,
    methods: Sequence[str] | None = None,
    bins: int = 30,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """Distribution of the per-gene Pearson correlation (mean over held-out folds).

    Parameters
    ----------
    results
        The output of :func:`~histospace.tl.mclstexp_cross_validate` (one histogram per method), or per-gene
        correlations as a :class:`~pandas.Series`, a genes x folds :class:`~pandas.DataFrame` or an array.
    methods
        Methods of `results` to draw (default: all).
    bins
        Histogram bins.
    ax
        Axes to draw into; a new figure by default.
    show
        Show the figure; `None` follows `scanpy.settings.autoshow`. With `show=False` the axes are returned.

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` if `show=False`, else `None`.
    """
    if isinstance(results, dict) and "pearson" in results:
        methods = list(results["pearson"]) if methods is None else list(methods)
        tables = {m: _pearson_table(results, m) for m in methods}
    else:
        tables = {"genes": _pearson_table(results, "")}
    all_r = np.concatenate([t.mean(axis=1).dropna().to_numpy() for t in tables.values()])
    if all_r.size == 0:
        msg = (
            "Every per-gene correlation is NaN (genes constant in the observed or the predicted values of every "
            "held-out section): nothing to draw. Check the gene panel and the predictions."
        )
        raise ValueError(msg)
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    edges = np.linspace(min(-0.1, np.nanmin(all_r)), max(0.5, np.nanmax(all_r)), bins + 1)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, t) in enumerate(tables.items()):
        r = t.mean(axis=1).dropna().to_numpy()
        c = colours[i % len(colours)]
        label = f"{name} (mean {r.mean():.3f}, n={r.size})" if name != "genes" else f"mean {r.mean():.3f}, n={r.size}"
        ax.hist(r, bins=edges, histtype="stepfilled" if len(tables) == 1 else "step", color=c, lw=1.5, label=label)
        ax.axvline(r.mean(), color=c, ls="--", lw=1)
    ax.set_xlabel("Pearson r per gene (mean over held-out sections)")
    ax.set_ylabel("number of genes")
    ax.legend(fontsize=8, frameon=False)
    return _finish(ax, show)


def top_genes(
    results,
    *,
    n: int = 10,
    method: str = "mclstexp",
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """Best-predicted genes ranked by their mean -log10 p-value across held-out sections (as mclSTExp's Fig. 5).

    Parameters
    ----------
    results
        The output of :func:`~histospace.tl.mclstexp_cross_validate`.
    n
        Number of genes.
    method
        Method of `results`.
    ax
        Axes to draw into; a new figure by default.
    show
        Show the figure; `None` follows `scanpy.settings.autoshow`. With `show=False` the axes are returned.

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` if `show=False`, else `None`.
    """
    if not (isinstance(results, dict) and "pvalue" in results and "pearson" in results):
        msg = "`results` must be the dict returned by `hs.tl.mclstexp_cross_validate`."
        raise TypeError(msg)
    if method not in results["pvalue"]:
        msg = f"Method {method!r} not in the results; available: {list(results['pvalue'])}."
        raise KeyError(msg)
    p = results["pvalue"][method]
    r = results["pearson"][method]
    score = (-np.log10(p.clip(lower=1e-300))).where(r > 0, 0.0).mean(axis=1).dropna()
    best = score.sort_values(ascending=False).iloc[:n][::-1]
    if ax is None:
        _, ax = plt.subplots(figsize=(5.0, 0.35 * len(best) + 1.2))
    ax.barh(best.index, best.to_numpy(), color="#4C72B0")
    mean_r = r.loc[best.index].mean(axis=1)
    for y, (s, rr) in enumerate(zip(best.to_numpy(), mean_r.to_numpy(), strict=True)):
        ax.text(s, y, f"  r={rr:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, best.max() * 1.25 if len(best) else 1)
    ax.set_xlabel(f"mean -log10 p across {p.shape[1]} held-out sections")
    ax.set_ylabel("gene")
    ax.set_title(f"top {len(best)} genes ({method})", fontsize=10)
    return _finish(ax, show)
