"""`pl.domains`: spatial domains over the H&E image (squidpy's `spatial_scatter` for spots, a raster for bins)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData

if TYPE_CHECKING:
    from spatialdata import SpatialData
from matplotlib.axes import Axes
from matplotlib.patches import Patch

from histospace._constants import DOMAIN_KEY, LIBRARY_KEY, SPATIAL_KEY
from histospace._spatial._uns import images as uns_images
from histospace._spatial._uns import scalefactors, uns_path
from histospace._utils import check_number
from histospace._utils._data import library_labels
from histospace.pl._render import RASTER_THRESHOLD, category_colors, draw_categories, element_geometry
from histospace.pl._utils import finish, plot_library, sdata_plot_slide

#: keyword arguments the histospace renderer understands (squidpy's `spatial_scatter` takes the others, for spots)
_RENDER_KWARGS = ("palette", "alpha", "na_color")


def domains(
    adata: AnnData | SpatialData,
    *,
    table_key: str | None = None,
    image_key: str | None = None,
    shapes_key: str | None = None,
    coordinate_system: str | None = None,
    key: str = DOMAIN_KEY,
    groundtruth_key: str | None = None,
    library_id: str | None = None,
    library_key: str = LIBRARY_KEY,
    img: bool | np.ndarray = True,
    img_res_key: str | None = None,
    scale_factor: float | None = None,
    size: float | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    **kwargs,
) -> Axes | None:
    """Plot spatial domains over the H&E image.

    Spots (Visium, legacy ST) are drawn by :func:`squidpy.pl.spatial_scatter` at their true size over
    `uns['spatial'][library_id]['images']`. Square bins (Visium HD, Stereo-seq; recognised as in
    :func:`histospace.pp.spatial_graph`) are drawn as squares of the grid pitch, and any data with more than 5,000
    spots or bins is painted into one raster image (a 10^6-bin plot is one image, drawn and saved in seconds). With
    `groundtruth_key`, the adjusted Rand index between the domains and that column (spots with a missing label
    excluded) is added to the title.

    Parameters
    ----------
    adata
        Annotated data matrix with `obs[key]` (from `hs.tl.domains`), `obsm['spatial']` and, for the image,
        `uns['spatial']`. Or a SpatialData: the table `table_key`, its annotated shapes and the image `image_key`
        (read at a pyramid level of about 2,000 px), joined by spatialdata's transformations in `coordinate_system`.
    table_key
        With a SpatialData: the table with `obs[key]` (`None`: the only table).
    image_key
        With a SpatialData: the H&E element of `sdata.images` (`None`: the only image; no image, none drawn).
    shapes_key
        With a SpatialData: the shapes the table annotates (`None`: the only ones).
    coordinate_system
        With a SpatialData: the coordinate system joining the shapes and the image.
    key
        Column of `adata.obs` with the domains.
    groundtruth_key
        Column of `adata.obs` with reference labels; the ARI goes into the title.
    library_id
        Library (slide) to draw; `None` takes the only one. With several slides in one AnnData only the spots of
        that library (`obs[library_key]`) are drawn.
    library_key
        Column of `adata.obs` that tells the slides apart.
    img
        Draw the H&E image under the spots: `True` takes it from `uns['spatial'][library_id]['images']`; an array
        `(height, width[, 3|4])` is drawn as given, at `scale_factor` pixels per coordinate unit.
    img_res_key
        Image to use (`'hires'` or `'lowres'`); `None` takes `'hires'` when present, else `'lowres'`.
    scale_factor
        Pixels of an array `img` per unit of `obsm['spatial']` (`None`: 1, a full-resolution image).
    size
        Spot size scale (1 = the spot diameter, or the bin side).
    title
        Title; `None` uses `key` (and the ARI).
    ax
        Axes to draw into; a new figure otherwise.
    show
        Show the figure; `None` follows `scanpy.settings.autoshow`. With `show=False` the `Axes` is returned.
    **kwargs
        Passed to :func:`squidpy.pl.spatial_scatter` for spots (e.g. `palette`, `alpha`, `crop_coord`). Bins and
        rasterised plots take `palette` (list, dict of category to colour, or colormap name), `alpha` and
        `na_color` (colour of spots without a domain).

    Returns
    -------
    The `Axes` when `show=False`, else `None`. Like scanpy, sets `adata.uns[key + '_colors']` when absent.
    """
    if not isinstance(adata, AnnData):
        return _domains_sdata(
            adata, table_key=table_key, image_key=image_key, shapes_key=shapes_key,
            coordinate_system=coordinate_system, key=key, groundtruth_key=groundtruth_key, img=img, size=size,
            title=title, ax=ax, show=show, **kwargs,
        )  # fmt: skip
    if key not in adata.obs:
        msg = f"`adata.obs[{key!r}]` not found; run `hs.tl.domains(adata)` first."
        raise KeyError(msg)
    if groundtruth_key is not None and groundtruth_key not in adata.obs:
        msg = f"`adata.obs[{groundtruth_key!r}]` not found."
        raise KeyError(msg)
    if SPATIAL_KEY not in adata.obsm:
        msg = "`adata.obsm['spatial']` not found; spot coordinates are needed."
        raise KeyError(msg)
    img_array = None
    if not isinstance(img, bool | np.bool_):
        img_array = np.asarray(img)
        if img_array.ndim not in (2, 3) or (img_array.ndim == 3 and img_array.shape[2] not in (3, 4)):
            msg = f"`img` must be True/False or an image of shape (height, width[, 3|4]), got shape {img_array.shape}."
            raise ValueError(msg)
    if scale_factor is not None:
        scale_factor = check_number(scale_factor, "scale_factor", low=0, low_inclusive=False)
    if size is not None:
        size = check_number(size, "size", low=0, low_inclusive=False)
    lib = plot_library(adata, library_id, library_key) if img_array is None else library_id
    labels = library_labels(adata, library_key)
    if img_array is not None and lib is None and len(set(labels)) > 1:
        msg = f"`adata.obs[{library_key!r}]` holds several slides; pass `library_id=` naming the slide of `img`."
        raise ValueError(msg)
    mask = labels == lib if lib is not None and len(set(labels)) > 1 else None
    sub = adata[mask] if mask is not None else adata
    use_img = img_array is not None or (bool(img) and lib is not None)
    if use_img and img_array is None:
        lib_images = uns_images(adata, lib)
        if img_res_key is None:
            img_res_key = "hires" if "hires" in lib_images else ("lowres" if "lowres" in lib_images else None)
        if img_res_key is None or img_res_key not in lib_images:
            msg = f"no image {img_res_key!r} in `{uns_path(lib, 'images')}` (has {list(lib_images)})."
            raise KeyError(msg)
    title = _title(sub.obs, key, groundtruth_key, title)

    xy = np.asarray(sub.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    own = img_array is not None or sub.n_obs > RASTER_THRESHOLD
    geometry = None
    if not own:
        geometry = element_geometry(sub, xy, diameter=_spot_diameter(adata, lib))
        own = geometry[0] == "square"
    if own:
        _check_render_kwargs(kwargs)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 6), layout="constrained") if own else plt.subplots(figsize=(6, 6))
    if own:
        if geometry is None:
            geometry = element_geometry(sub, xy, diameter=_spot_diameter(adata, lib))
        image, scale = None, 1.0
        if img_array is not None:
            image, scale = img_array, (1.0 if scale_factor is None else scale_factor)
        elif use_img:
            image = uns_images(adata, lib)[img_res_key]
            sf = scalefactors(adata, lib)
            scale = float(sf.get(f"tissue_{img_res_key}_scalef", 1.0)) if scale_factor is None else scale_factor
        _draw_domains(adata, key, mask, xy, geometry, ax=ax, size=size, image=image, scale=scale, **kwargs)
        ax.set_title(title)
        unit = " (pixels)" if use_img else ""
        ax.set_xlabel(f"x{unit}")
        ax.set_ylabel(f"y{unit}")
        return finish(ax, show)

    from histospace._utils._deps import quiet_import

    sq = quiet_import("squidpy")

    sq_kwargs = {"img": use_img, "library_id": lib, "ax": ax, "title": title, "return_ax": True, **kwargs}
    if use_img:
        sq_kwargs["img_res_key"] = img_res_key
    else:
        sq_kwargs["shape"] = None
    if size is not None:
        sq_kwargs["size"] = size
    if lib is None:
        sq_kwargs.pop("library_id")
    sub = sub.copy() if sub is not adata else adata
    ax = sq.pl.spatial_scatter(sub, color=key, **sq_kwargs)
    if isinstance(ax, list | np.ndarray):
        ax = np.ravel(ax)[0]
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    return finish(ax, show)


def _spot_diameter(adata: AnnData, lib: str | None) -> float | None:
    d = scalefactors(adata, lib).get("spot_diameter_fullres")
    return float(d) if d is not None else None


def _check_render_kwargs(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - set(_RENDER_KWARGS))
    if unknown:
        msg = (
            f"{unknown} are squidpy options; square bins and plots of more than {RASTER_THRESHOLD} spots are drawn "
            f"by histospace, which takes {list(_RENDER_KWARGS)}."
        )
        raise TypeError(msg)


def _title(obs: pd.DataFrame, key: str, groundtruth_key: str | None, title: str | None) -> str:
    """`title`, else `key` (with the ARI against `groundtruth_key`, spots without a label excluded)."""
    if title is not None:
        return title
    if groundtruth_key is None:
        return key
    from sklearn.metrics import adjusted_rand_score

    gt = obs[groundtruth_key]
    ok = gt.notna().to_numpy()
    ari = adjusted_rand_score(gt[ok].astype(str), obs[key][ok].astype(str))
    return f"{key} (ARI {ari:.3f} vs {groundtruth_key})"


def _draw_domains(
    adata: AnnData,
    key: str,
    mask: np.ndarray | None,
    xy: np.ndarray,
    geometry: tuple[str, float],
    *,
    ax: Axes,
    size: float | None,
    image: np.ndarray | None,
    scale: float,
    palette=None,
    alpha: float = 1.0,
    na_color="lightgray",
) -> None:
    """Domains of the spots in `mask` as discs or squares (rasterised above the threshold), with a legend.

    Colours come from `palette`, else scanpy's `adata.uns[key + '_colors']`, which is written when absent.
    """
    col = adata.obs[key]
    cat = col if isinstance(col.dtype, pd.CategoricalDtype) else col.astype("category")
    categories = [str(c) for c in cat.cat.categories]
    stored = adata.uns.get(f"{key}_colors")
    colors = category_colors(categories, palette, stored=stored)
    if palette is None and (stored is None or len(stored) < len(categories)):
        adata.uns[f"{key}_colors"] = list(colors)
    codes = cat.cat.codes.to_numpy()
    if mask is not None:
        codes = codes[mask]
    shape, side = geometry
    side = side * (1.0 if size is None else size)
    draw_categories(
        ax,
        xy,
        codes,
        colors,
        size=side,
        shape=shape,
        image=image,
        image_scale=scale,
        alpha=alpha,
        na_color=na_color,
    )
    present = set(np.unique(codes).tolist())
    handles = [Patch(facecolor=colors[c], edgecolor="none", label=categories[c]) for c in sorted(present) if c >= 0]
    if handles:
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title=key)


def _domains_sdata(
    sdata,
    *,
    table_key,
    image_key,
    shapes_key,
    coordinate_system,
    key,
    groundtruth_key,
    img,
    size,
    title,
    ax,
    show,
    **kwargs,
):
    """`pl.domains` of a SpatialData: the table's domains at the centres of the adapter's slide record, drawn by the
    histospace renderer over an image level of about 2,000 px (no AnnData built).
    """  # noqa: D205
    from histospace._utils._sdata import as_table

    table, ctx = as_table(sdata, table_key)
    if key not in table.obs:
        msg = f"`sdata.tables[{ctx.table_key!r}].obs[{key!r}]` not found; run `hs.tl.domains(sdata)` first."
        raise KeyError(msg)
    if groundtruth_key is not None and groundtruth_key not in table.obs:
        msg = f"`sdata.tables[{ctx.table_key!r}].obs[{groundtruth_key!r}]` not found."
        raise KeyError(msg)
    if size is not None:
        size = check_number(size, "size", low=0, low_inclusive=False)
    _check_render_kwargs(kwargs)
    table, slide, image = sdata_plot_slide(
        sdata,
        table_key=ctx.table_key,
        image_key=image_key,
        shapes_key=shapes_key,
        coordinate_system=coordinate_system,
        img=img,
    )
    rows = slide.rows
    mask = None if rows.size == table.n_obs else rows
    sub = table if mask is None else table[rows]
    title = _title(sub.obs, key, groundtruth_key, title)
    if slide.kind in ("circle", "square") and slide.spot_diameter:
        geometry = (slide.kind, float(slide.spot_diameter))
    else:
        geometry = element_geometry(sub, slide.centres)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 6), layout="constrained")
    _draw_domains(table, key, mask, slide.centres, geometry, ax=ax, size=size, image=image, scale=1.0, **kwargs)
    ax.set_title(title)
    unit = " (pixels)" if image is not None else ""
    ax.set_xlabel(f"x{unit}")
    ax.set_ylabel(f"y{unit}")
    return finish(ax, show)
