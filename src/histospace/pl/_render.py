"""Shared drawing of spots (discs) and square bins over the H&E image, rasterised when there are many.

Up to :data:`RASTER_THRESHOLD` elements are drawn as a vector collection (one disc or square per spot, at its true
size). Above it they are painted into one image in coordinate space (each element covers the pixels whose centres
fall inside its disc or square) and drawn with a single `imshow`, so a plot of 10^6 Visium HD or Stereo-seq bins is
one artist of a few million pixels instead of 10^6 patches: it draws and saves in seconds and stays readable.

Coordinates follow scanpy's convention: `obsm['spatial']` in full-resolution pixels (or the coordinate units of the
bins' shapes); an image at `scale` pixels per coordinate unit (`tissue_hires_scalef`) has its pixel `i` centred on
coordinate `i / scale`. The y axis points down, as in the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, to_rgba_array

from histospace._constants import SPATIAL_KEY
from histospace._utils._lattice import bins_evidence, grid_indices, lattice_pitch

#: above this many spots or bins, draw one raster image instead of one patch per element
RASTER_THRESHOLD = 5000
#: pixels of the raster at most (about 2000 x 2000: finer than a saved figure)
MAX_RASTER_PIXELS = 4_000_000
#: pixels per element side at most (enough for round discs)
_MAX_PIXELS_PER_ELEMENT = 8

__all__ = [
    "MAX_RASTER_PIXELS",
    "RASTER_THRESHOLD",
    "draw_categories",
    "draw_image",
    "draw_values",
    "element_geometry",
    "raster_index",
]


def draw_image(ax: Axes, image: np.ndarray, *, scale: float = 1.0, alpha: float = 1.0, zorder: float = 0):
    """Draw `image` (`(h, w)` or `(h, w, 3|4)`) under the spots; it has `scale` pixels per coordinate unit."""
    img = np.asarray(image)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        msg = f"The image must be (height, width) or (height, width, 3|4), got shape {img.shape}."
        raise ValueError(msg)
    if not np.isfinite(scale) or scale <= 0:
        msg = f"The image scale must be a positive number of pixels per coordinate unit, got {scale!r}."
        raise ValueError(msg)
    h, w = img.shape[:2]
    extent = (-0.5 / scale, (w - 0.5) / scale, (h - 0.5) / scale, -0.5 / scale)
    return ax.imshow(img, extent=extent, alpha=alpha, zorder=zorder, cmap="gray" if img.ndim == 2 else None)


def element_geometry(
    adata: AnnData, xy: np.ndarray | None = None, *, diameter: float | None = None
) -> tuple[str, float]:
    """Shape (`'square'` for square bins, `'circle'` for spots) and size (side or diameter) in coordinate units.

    Bins are recognised as in :func:`histospace.pp.spatial_graph` (square grid indices plus evidence that they tile
    the tissue); their side is the grid pitch fitted from `obs['array_row']`/`obs['array_col']` to `xy`. Spots take
    `diameter` (e.g. `scalefactors['spot_diameter_fullres']`), else 0.8 times the median nearest-neighbour distance.

    Parameters
    ----------
    adata
        The spots or bins to draw (a view of one slide is fine).
    xy
        Their centres, `(n_obs, 2)`; default `adata.obsm['spatial']`.
    diameter
        Spot diameter in coordinate units (spots only).
    """
    xy = np.asarray(adata.obsm[SPATIAL_KEY] if xy is None else xy, dtype=np.float64)[:, :2]
    idx = grid_indices(adata)
    is_bins = idx is not None and bins_evidence(adata, idx, xy, diameter=diameter) is not None
    if is_bins:
        pitch = lattice_pitch(idx[0], idx[1], xy)
        if pitch is not None:
            return "square", pitch
    shape = "square" if is_bins else "circle"
    if diameter is not None and np.isfinite(diameter) and diameter > 0:
        return shape, float(diameter)
    if xy.shape[0] < 2:
        return shape, 1.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    nn = float(np.median(d[:, 1]))
    if nn <= 0:
        return shape, 1.0
    return shape, nn if is_bins else 0.8 * nn


def raster_index(
    xy: np.ndarray, *, shape: str, size: float, max_pixels: int = MAX_RASTER_PIXELS
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Paint the elements into a raster of element indices (`-1` where there is none).

    Each element covers the pixels whose centres fall inside its square (side `size`, axis-aligned) or disc
    (diameter `size`), and at least the pixel holding its centre; where elements overlap the later one wins. The
    pixel size is `size / k` with `k` the largest whole number of pixels per element side that keeps the raster
    within `max_pixels` (at most 8), so bins on an axis-aligned grid map onto whole pixels exactly; with too many
    elements for that (`k < 1`), each element is one pixel of a coarser raster.

    Returns
    -------
    The `(height, width)` `int32` raster and its `extent` for :meth:`~matplotlib.axes.Axes.imshow`
    (`(left, right, bottom, top)` with the y axis pointing down, for `origin='upper'`).
    """
    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    n = xy.shape[0]
    half = float(size) / 2.0
    x0, y0 = xy.min(axis=0) - half
    x1, y1 = xy.max(axis=0) + half
    area_elems = max((x1 - x0) * (y1 - y0) / float(size) ** 2, 1.0)
    k = min(np.sqrt(max_pixels / area_elems), _MAX_PIXELS_PER_ELEMENT)
    if k >= 1:
        k = float(np.floor(k))
    p = float(size) / k
    width = max(int(np.ceil((x1 - x0) / p - 1e-9)), 1)
    height = max(int(np.ceil((y1 - y0) / p - 1e-9)), 1)
    raster = np.full((height, width), -1, dtype=np.int32)
    fx, fy = (xy[:, 0] - x0) / p, (xy[:, 1] - y0) / p  # centres in pixel units (pixel i spans [i, i + 1))
    ids = np.arange(n, dtype=np.int32)
    # the pixel holding each centre, so that no element vanishes
    cx = np.clip(np.floor(fx).astype(np.int64), 0, width - 1)
    cy = np.clip(np.floor(fy).astype(np.int64), 0, height - 1)
    raster[cy, cx] = ids
    hk = k / 2.0
    if k >= 1:
        lo_x, hi_x = np.ceil(fx - hk - 0.5).astype(np.int64), np.ceil(fx + hk - 0.5).astype(np.int64)
        lo_y, hi_y = np.ceil(fy - hk - 0.5).astype(np.int64), np.ceil(fy + hk - 0.5).astype(np.int64)
        m = int(max((hi_x - lo_x).max(), (hi_y - lo_y).max(), 0))
        for dy in range(m):
            iy = lo_y + dy
            ok_y = (iy < hi_y) & (iy >= 0) & (iy < height)
            for dx in range(m):
                ix = lo_x + dx
                ok = ok_y & (ix < hi_x) & (ix >= 0) & (ix < width)
                if shape == "circle":
                    ok &= (ix + 0.5 - fx) ** 2 + (iy + 0.5 - fy) ** 2 <= hk**2
                raster[iy[ok], ix[ok]] = ids[ok]
    extent = (float(x0), float(x0 + width * p), float(y0 + height * p), float(y0))
    return raster, extent


def _frame(ax: Axes, xy: np.ndarray, size: float, image_extent=None) -> None:
    """Limits (y down), equal aspect: the whole image when one is drawn (as squidpy's `spatial_scatter` frames it),
    else the elements plus one element size.
    """  # noqa: D205
    if image_extent is not None:
        x0, x1, y0, y1 = image_extent
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    else:
        pad = size
        ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
        ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
    ax.set_aspect("equal")


def _use_raster(n: int, rasterize: bool | None) -> bool:
    return n > RASTER_THRESHOLD if rasterize is None else bool(rasterize)


def _collection(xy: np.ndarray, *, shape: str, size: float, ax: Axes, **kwargs):
    if shape == "circle":
        from matplotlib.collections import EllipseCollection

        return EllipseCollection(
            widths=size,
            heights=size,
            angles=0,
            units="xy",
            offsets=xy,
            offset_transform=ax.transData,
            linewidths=0,
            **kwargs,
        )
    from matplotlib.collections import PolyCollection

    h = size / 2.0
    corners = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    return PolyCollection(xy[:, None, :] + corners[None], linewidths=0, antialiaseds=False, **kwargs)


def _check_shape(xy, n_values: int, shape: str, size: float) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or xy.shape[0] != n_values:
        msg = f"`xy` must be ({n_values}, 2) centres, one per value; got shape {xy.shape}."
        raise ValueError(msg)
    if shape not in ("circle", "square"):
        msg = f"`shape` must be 'circle' or 'square', got {shape!r}."
        raise ValueError(msg)
    if not np.isfinite(size) or size <= 0:
        msg = f"`size` must be a positive number of coordinate units, got {size!r}."
        raise ValueError(msg)
    return xy[:, :2]


def draw_values(
    ax: Axes,
    xy: np.ndarray,
    values: np.ndarray,
    *,
    size: float,
    shape: str = "circle",
    image: np.ndarray | None = None,
    image_scale: float = 1.0,
    cmap="viridis",
    alpha: float = 1.0,
    vmin: float | None = None,
    vmax: float | None = None,
    rasterize: bool | None = None,
):
    """Draw one value per spot or bin with a continuous colour map, over the image, at the elements' true size.

    For the expression maps of mclSTExp (observed vs predicted share `vmin`/`vmax`) and any per-spot value. Missing
    values (NaN) are not drawn. Sets the limits to the whole image when one is drawn (else around the elements), equal aspect and the y axis pointing down.

    Parameters
    ----------
    ax
        Axes to draw into.
    xy
        Centres `(n, 2)` (x, y) in coordinate units (full-resolution pixels).
    values
        One number per element.
    size
        Disc diameter or square side in coordinate units (see :func:`element_geometry`).
    shape
        `'circle'` (spots) or `'square'` (bins).
    image
        H&E image drawn underneath, at `image_scale` pixels per coordinate unit.
    image_scale
        Image pixels per coordinate unit (e.g. `tissue_hires_scalef`).
    cmap, alpha
        Colour map and opacity of the elements.
    vmin, vmax
        Ends of the colour scale; `None` takes the range of the finite values.
    rasterize
        Paint one image instead of one patch per element; `None`: above :data:`RASTER_THRESHOLD` elements.

    Returns
    -------
    The :class:`~matplotlib.cm.ScalarMappable` drawn (a collection, or an `AxesImage` when rasterised), for
    `figure.colorbar`.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    xy = _check_shape(xy, values.size, shape, size)
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if vmin is None and finite.size else vmin
    hi = float(finite.max()) if vmax is None and finite.size else vmax
    norm = Normalize(vmin=lo, vmax=hi)
    image_extent = None if image is None else draw_image(ax, image, scale=image_scale).get_extent()
    if _use_raster(values.size, rasterize):
        raster, extent = raster_index(xy, shape=shape, size=size)
        data = np.full(raster.shape, np.nan, dtype=np.float32)
        hit = raster >= 0
        data[hit] = values[raster[hit]]
        art = ax.imshow(
            np.ma.masked_invalid(data), extent=extent, cmap=cmap, norm=norm, alpha=alpha, origin="upper", zorder=1
        )
    else:
        ok = np.isfinite(values)
        art = _collection(xy[ok], shape=shape, size=size, ax=ax, cmap=cmap, norm=norm, alpha=alpha, zorder=1)
        art.set_array(values[ok])
        ax.add_collection(art)
    _frame(ax, xy, size, image_extent)
    return art


def category_colors(categories: Sequence[str], palette=None, *, stored: Sequence | None = None) -> list[str]:
    """One colour per category: `palette` (list, dict or colormap name), else `stored` colours, else scanpy's.

    scanpy's default (what scanpy and squidpy store in `uns[f'{key}_colors']`): matplotlib's colour cycle
    (`rcParams['axes.prop_cycle']`, tab10 unless changed) when it has enough colours, else `default_20`, `default_28`,
    `default_102`.
    """
    import matplotlib as mpl
    from matplotlib.colors import to_hex, to_rgba

    def hexa(c) -> str:
        return to_hex(c, keep_alpha=to_rgba(c)[3] < 1)

    n = len(categories)
    if palette is None and stored is not None and len(stored) >= n:
        return [hexa(c) for c in list(stored)[:n]]
    if palette is None:
        from scanpy.plotting import palettes

        cycle = mpl.rcParams["axes.prop_cycle"].by_key().get("color", [])
        if 0 < n <= len(cycle):
            return [to_hex(c) for c in cycle[:n]]
        base = palettes.default_20 if n <= 20 else (palettes.default_28 if n <= 28 else palettes.default_102)
        if n > len(base):
            base = [to_hex(c) for c in mpl.colormaps["turbo"](np.linspace(0, 1, n))]
        return [to_hex(c) for c in base[:n]]
    if isinstance(palette, Mapping):
        missing = [c for c in categories if c not in palette]
        if missing:
            msg = f"`palette` has no colour for categories {missing[:5]}."
            raise KeyError(msg)
        return [hexa(palette[c]) for c in categories]
    if isinstance(palette, str):
        cmap = mpl.colormaps[palette]
        cols = getattr(cmap, "colors", None)
        if cols is not None and len(cols) >= n:
            return [to_hex(c) for c in list(cols)[:n]]
        return [to_hex(c) for c in cmap(np.linspace(0, 1, max(n, 1)))]
    cols = list(palette)
    if len(cols) < n:
        msg = f"`palette` has {len(cols)} colours for {n} categories."
        raise ValueError(msg)
    return [hexa(c) for c in cols[:n]]


def draw_categories(
    ax: Axes,
    xy: np.ndarray,
    codes: np.ndarray,
    colors: Sequence,
    *,
    size: float,
    shape: str = "circle",
    image: np.ndarray | None = None,
    image_scale: float = 1.0,
    alpha: float = 1.0,
    na_color="lightgray",
    rasterize: bool | None = None,
):
    """Draw one category per spot or bin (`codes` into `colors`, `-1` = missing, drawn in `na_color`).

    Same geometry, image and rasterisation as :func:`draw_values`; returns the collection or `AxesImage` drawn.
    """
    codes = np.asarray(codes).ravel().astype(np.int64)
    xy = _check_shape(xy, codes.size, shape, size)
    lut = np.vstack([to_rgba_array(list(colors)) if len(colors) else np.zeros((0, 4)), to_rgba_array([na_color])])
    if codes.size and (codes.max() >= len(colors) or codes.min() < -1):
        msg = f"Category codes must lie in [-1, {len(colors) - 1}], got [{codes.min()}, {codes.max()}]."
        raise ValueError(msg)
    rgba = lut[np.where(codes < 0, len(colors), codes)]
    rgba[:, 3] *= alpha
    image_extent = None if image is None else draw_image(ax, image, scale=image_scale).get_extent()
    if _use_raster(codes.size, rasterize):
        raster, extent = raster_index(xy, shape=shape, size=size)
        img = np.zeros((*raster.shape, 4), dtype=np.uint8)
        hit = raster >= 0
        img[hit] = np.round(rgba[raster[hit]] * 255).astype(np.uint8)
        art = ax.imshow(img, extent=extent, origin="upper", interpolation_stage="rgba", zorder=1)
    else:
        art = _collection(xy, shape=shape, size=size, ax=ax, facecolors=rgba, zorder=1)
        ax.add_collection(art)
    _frame(ax, xy, size, image_extent)
    return art
