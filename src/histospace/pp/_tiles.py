"""`pp.tile_image`: an AnnData of tiles over the tissue of an H&E image (for slides without expression)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scanpy import logging as logg

from histospace._constants import COL_KEY, LIBRARY_KEY, ROW_KEY, SPATIAL_KEY
from histospace._image import open_multiscale
from histospace._image._sources import ImageSource, _is_image_container
from histospace._spatial._images import sdata_image_key
from histospace._spatial._platform import HE_TILES
from histospace._spatial._uns import drop_uns, set_uns
from histospace._utils import check_number, version_string
from histospace._utils._sdata import is_spatialdata

__all__ = ["tile_image"]

#: saturation below which a pixel is never tissue (white glass and JPEG noise on it stay out)
MIN_SATURATION = 0.05


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation `(max - min) / max` in `[0, 1]` of an RGB uint8 image."""
    x = rgb.astype(np.float32)
    mx = x.max(axis=2)
    mn = x.min(axis=2)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in `[0, 1]` (between-class variance maximised over a 256-bin histogram)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    if hist.sum() == 0:
        return 1.0
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(rgb: np.ndarray, *, threshold: float | None = None, smooth: float = 2.0) -> tuple[np.ndarray, float]:
    """Tissue mask of a (downsampled) RGB H&E image and the saturation threshold used.

    The HSV saturation is smoothed (Gaussian, `smooth` pixels); pixels above `threshold` (default: Otsu's threshold
    of the smoothed saturation, at least 0.05) are tissue. A binary closing (3 x 3, twice), hole filling and an
    opening (3 x 3) close gaps in pale stroma and drop isolated pixels.
    """
    from scipy import ndimage

    s = ndimage.gaussian_filter(_saturation(rgb), sigma=smooth) if smooth > 0 else _saturation(rgb)
    t = max(_otsu(s.ravel()), MIN_SATURATION) if threshold is None else float(threshold)
    mask = s > t
    st = np.ones((3, 3), dtype=bool)
    mask = ndimage.binary_closing(mask, structure=st, iterations=2, border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    mask = ndimage.binary_opening(mask, structure=st, iterations=1)
    return mask, t


def tile_image(
    img,
    *,
    image_key: str | None = None,
    key_added: str = "tiles",
    tile_size: int = 224,
    stride: int | None = None,
    tissue_only: bool = True,
    tissue_threshold: float | None = None,
    tissue_fraction: float = 0.5,
    library_id: str = "he",
    mpp: float | None = None,
    hires_max_size: int = 2000,
) -> ad.AnnData | None:
    """Cut an H&E image into a grid of square tiles over the tissue, as an AnnData of spots without expression.

    Use it for slides that were never sequenced: :func:`histospace.pp.image_features` on the result gives one feature
    vector per tile, and `hs.tl.mclstexp_predict` predicts expression for each.

    Tissue is found on a downsampled copy of the image (the `hires` image written to `uns`, at most `hires_max_size`
    px on its long side): a pixel is tissue when its HSV saturation is above `tissue_threshold` (default: Otsu's
    threshold of the saturation smoothed with a Gaussian of 2 px, at least 0.05; white glass has no saturation, eosin
    and haematoxylin do), followed by a binary closing (3 x 3, twice), hole filling and an opening (3 x 3). A tile is kept when at least `tissue_fraction` of its area is tissue.
    Only whole tiles are made: the grid starts at pixel (0, 0), and a last partial row/column is left out.

    Parameters
    ----------
    img
        The H&E image: a path (JPEG, PNG, TIFF or a whole-slide file; read lazily, the thumbnail from a coarse pyramid
        level), a numpy array `H x W` or `H x W x C` in full-resolution pixels, or a squidpy `ImageContainer`. Or a
        SpatialData: its image `image_key` is tiled and the tiles are added to it as square shapes and a table
        annotating them (both named `key_added`), in the image's coordinate systems, so that
        `hs.pp.image_features(sdata, table_key=key_added)` and `hs.tl.mclstexp_predict(sdata, table_key=key_added)`
        work on them.
    image_key
        With a SpatialData: the H&E element of `sdata.images` (`None`: the only image).
    key_added
        With a SpatialData: the name of the new table (its shapes are `key_added + '_squares'`).
    tile_size
        Side of a tile in full-resolution pixels (224 matches mclSTExp's patches on her2st).
    stride
        Step between tiles in pixels; `None` means `tile_size` (tiles touch, no overlap).
    tissue_only
        Keep only tiles over tissue; `False` keeps every tile of the grid.
    tissue_threshold
        Saturation threshold in `[0, 1]`; `None` picks Otsu's threshold (at least 0.05).
    tissue_fraction
        Fraction of a tile that must be tissue for it to be kept.
    library_id
        Name of the slide in `uns['spatial']` and `obs['library_id']`.
    mpp
        Microns per full-resolution pixel; it gives `metadata['spot_diameter_um']` so that
        `image_features(..., patch_size_um=...)` works. `None`: read from the file (OME `PhysicalSizeX/Y`, Aperio
        `MPP`, else TIFF resolution tags other than the <= 1200 dpi software defaults; the rule of
        :func:`histospace.io.add_image`) or, with a SpatialData, from the coordinate system's µm per unit; unknown
        otherwise. A given value wins over the file's metadata (with a warning when they differ by more than 1%).
    hires_max_size
        Longest side of the downsampled image kept in `uns['spatial'][library_id]['images']['hires']`.

    Returns
    -------
    For a SpatialData: `None`; `sdata.shapes[key_added + '_squares']` (the tiles' squares, in level-0 pixels of the
    image, with the image's transformations) and `sdata.tables[key_added]` (as the AnnData below, annotating them,
    without `uns['spatial']`) are added. Otherwise an AnnData with one observation per tile and these fields:

    `adata.X` : :class:`numpy.ndarray` (dtype `float32`)
        Empty matrix of shape `(n_tiles, 0)` (no expression).
    `adata.obsm['spatial']` : :class:`numpy.ndarray`
        Tile centres `(x, y)` in full-resolution pixels, float64.
    `adata.obs['array_row']`, `adata.obs['array_col']` : int
        Grid indices of each tile.
    `adata.obs['tissue_fraction']` : float
        Fraction of the tile covered by tissue.
    `adata.obs['library_id']` : categorical
        `library_id`.
    `adata.uns['spatial'][library_id]`
        `images['hires']` (uint8, downsampled), `scalefactors` (`tissue_hires_scalef`, `spot_diameter_fullres` =
        `tile_size`) and `metadata` (`source_image_path` when `img` is a path, `technology='he_tiles'`,
        `spot_diameter_um` and `microns_per_pixel` when the µm per pixel is known). For an array or `ImageContainer` no
        full-resolution image is stored: pass the same `img=` to :func:`histospace.pp.image_features`.
    `adata.uns['tile_image']` : :class:`dict`
        Parameters (incl. the saturation threshold used and the image size) and package version.

    Examples
    --------
    >>> import histospace as hs
    >>> tiles = hs.pp.tile_image("slide.jpg", tile_size=224)
    >>> hs.pp.image_features(tiles, encoder="mobilenet_v2", weights="mobilenet_v2.pt", mean=0.5, std=0.5)
    """
    tile_size = check_number(tile_size, "tile_size", integer=True, low=1)
    hires_max_size = check_number(hires_max_size, "hires_max_size", integer=True, low=1)
    stride = tile_size if stride is None else check_number(stride, "stride", integer=True, low=1)
    if not 0.0 <= float(tissue_fraction) <= 1.0:
        msg = f"`tissue_fraction` must be in [0, 1], got {tissue_fraction!r}."
        raise ValueError(msg)
    if tissue_threshold is not None and not 0.0 <= float(tissue_threshold) < 1.0:
        msg = f"`tissue_threshold` must be in [0, 1) or None, got {tissue_threshold!r}."
        raise ValueError(msg)
    mpp = check_number(mpp, "mpp", low=0, low_inclusive=False, allow_none=True)
    if not isinstance(library_id, str) or not library_id:
        msg = f"`library_id` must be a non-empty string, got {library_id!r}."
        raise TypeError(msg)
    sdata = None
    if is_spatialdata(img):
        sdata, img, image_key, mpp = _sdata_image(img, image_key, key_added, mpp)
    # the file's µm per pixel (OME `PhysicalSizeX/Y`, Aperio `MPP`, TIFF resolution: the rule every reader uses) when
    # `mpp` is not given; a given `mpp` wins (with a warning when the file's metadata disagree)
    ms = open_multiscale(img, mpp=mpp)
    mpp = ms.mpp
    src: ImageSource = ms.source(0)
    if _is_image_container(img) and (src.scale != 1.0 or np.any(src.offset != 0)):
        msg = (
            "`img` is an ImageContainer with scale != 1 or cropped from a larger image (offset "
            f"{tuple(float(v) for v in src.offset)}); tile_image tiles a full-resolution image in its own pixels. Pass "
            "the uncropped full-resolution container (or its array)."
        )
        raise ValueError(msg)
    h, w = src.shape
    if tile_size > h or tile_size > w:
        msg = f"`tile_size`={tile_size} is larger than the image ({w} x {h} px); pass a smaller `tile_size`."
        raise ValueError(msg)

    start = logg.info(f"tiling a {w} x {h} px image into {tile_size}-px tiles")
    factor = max(1, math.ceil(max(h, w) / hires_max_size))
    hires = ms.downsample(factor)  # from a coarse pyramid level when there is one
    scalef = 1.0 / factor
    mask, thr = tissue_mask(hires, threshold=tissue_threshold)

    # tile grid in full-resolution pixels; tissue fraction per tile from a summed-area table of the mask
    n_rows = (h - tile_size) // stride + 1
    n_cols = (w - tile_size) // stride + 1
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    y0 = rows * stride
    x0 = cols * stride
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)

    def _hi(v, n):
        return np.clip(np.rint(v * scalef).astype(np.int64), 0, n)

    ya, yb = _hi(y0, mask.shape[0]), _hi(y0 + tile_size, mask.shape[0])
    xa, xb = _hi(x0, mask.shape[1]), _hi(x0 + tile_size, mask.shape[1])
    yb = np.maximum(yb, ya + 1).clip(max=mask.shape[0])
    xb = np.maximum(xb, xa + 1).clip(max=mask.shape[1])
    area = np.maximum((yb - ya) * (xb - xa), 1)
    tissue = (sat[yb, xb] - sat[ya, xb] - sat[yb, xa] + sat[ya, xa]) / area
    keep = tissue >= tissue_fraction if tissue_only else np.ones(rows.size, dtype=bool)
    if not keep.any():
        msg = (
            f"No tile has at least {tissue_fraction:g} tissue (saturation threshold {thr:.3f}, {mask.mean():.1%} of the "
            "image is tissue). Lower `tissue_fraction` or `tissue_threshold`, or pass `tissue_only=False`."
        )
        raise ValueError(msg)
    rows, cols, x0, y0, tissue = rows[keep], cols[keep], x0[keep], y0[keep], tissue[keep]

    names = [f"{library_id}_tile_{r}_{c}" for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]
    obs = pd.DataFrame(
        {
            ROW_KEY: rows.astype(np.int64),
            COL_KEY: cols.astype(np.int64),
            "tissue_fraction": tissue.astype(np.float32),
            LIBRARY_KEY: pd.Categorical([library_id] * rows.size),
        },
        index=pd.Index(names),
    )
    tiles = ad.AnnData(X=np.zeros((rows.size, 0), dtype=np.float32), obs=obs)
    tiles.obsm[SPATIAL_KEY] = np.column_stack([x0 + tile_size / 2.0, y0 + tile_size / 2.0]).astype(np.float64)

    metadata = {"technology": HE_TILES}
    if isinstance(img, str | os.PathLike):
        metadata["source_image_path"] = str(Path(img).expanduser().resolve())
    if mpp is not None:
        metadata["microns_per_pixel"] = float(mpp)
        metadata["spot_diameter_um"] = float(tile_size * mpp)
    set_uns(
        tiles,
        {
            library_id: {
                "images": {"hires": hires},
                "scalefactors": {"tissue_hires_scalef": scalef, "spot_diameter_fullres": float(tile_size)},
                "metadata": metadata,
            }
        },
    )
    params = {
        "tile_size": int(tile_size),
        "stride": int(stride),
        "tissue_only": bool(tissue_only),
        "tissue_threshold": float(thr),
        "tissue_fraction": float(tissue_fraction),
        LIBRARY_KEY: library_id,
        "hires_max_size": int(hires_max_size),
        "image_shape": np.asarray([h, w], dtype=np.int64),
        "tissue_detection": (
            "HSV saturation (Gaussian 2 px) > threshold (Otsu, >= 0.05 by default), 3x3 closing x2, fill holes, 3x3 opening"
        ),
    }
    if mpp is not None:
        params["mpp"] = float(mpp)
    tiles.uns["tile_image"] = {"params": params, "version": version_string()}
    if sdata is not None:
        _add_tiles(sdata, tiles, image_key=image_key, key_added=key_added, tile_size=tile_size)
        logg.info("    finished", time=start, deep=f"added {tiles.n_obs} tiles as sdata.shapes/tables[{key_added!r}]")
        return None
    logg.info(
        "    finished",
        time=start,
        deep=f"{tiles.n_obs} tiles of {n_rows * n_cols} over tissue (threshold {thr:.3f})",
    )
    return tiles


def _sdata_image(sdata, image_key: str | None, key_added: str, mpp: float | None):
    """`(sdata, image element, image_key, µm per level-0 pixel)` of the image to tile."""
    from spatialdata.transformations import get_transformation

    from histospace._image import coordinate_system_to_pixels
    from histospace._spatial._affine import affine_scale
    from histospace.io import microns_per_unit

    image_key = sdata_image_key(sdata, image_key)
    if not isinstance(key_added, str) or not key_added:
        msg = f"`key_added` must be a non-empty str, got {key_added!r}."
        raise TypeError(msg)
    taken = [k for k in (key_added, f"{key_added}_squares") if k in set(sdata.images) | set(sdata.labels)
             | set(sdata.points) | set(sdata.shapes) | set(sdata.tables)]  # fmt: skip
    if taken:
        msg = f"`sdata` already holds an element {taken[0]!r}; pass another `key_added=` or delete it first."
        raise ValueError(msg)
    if mpp is None:
        for cs in get_transformation(sdata.images[image_key], get_all=True):
            um = microns_per_unit(sdata, cs)
            if um is not None:
                m = coordinate_system_to_pixels(sdata, image_key=image_key, coordinate_system=cs)
                mpp = um / affine_scale(m)
                break
    return sdata, sdata.images[image_key], image_key, mpp


def _add_tiles(sdata, tiles: ad.AnnData, *, image_key: str, key_added: str, tile_size: int) -> None:
    """Add the tiles to `sdata`: their squares (level-0 pixels, the image's transformations) and a table over them."""
    from spatialdata.models import TableModel
    from spatialdata.transformations import get_transformation

    from histospace.io._bins import squares

    transformations = get_transformation(sdata.images[image_key], get_all=True)
    shapes = squares(tiles.obsm[SPATIAL_KEY], float(tile_size), transformations=transformations)
    table = tiles.copy()
    drop_uns(table)
    region = f"{key_added}_squares"
    table.obs["region"] = pd.Categorical([region] * table.n_obs)
    table.obs["instance_id"] = np.arange(table.n_obs)
    table.uns["tile_image"]["params"]["image_key"] = image_key
    table = TableModel.parse(table, region=region, region_key="region", instance_key="instance_id")
    shapes.index = table.obs["instance_id"].to_numpy()
    sdata.shapes[region] = shapes
    sdata.tables[key_added] = table
