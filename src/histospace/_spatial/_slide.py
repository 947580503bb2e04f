"""The slide record: per library its spots, their centres in the image's pixel frame, the spot size, the image and µm.

An AnnData gives one :class:`Slide` per library (`obs[library_key]`, else the libraries of `uns['spatial']`): the
centres are `obsm[spatial_key]` (full-resolution pixels, the Visium layout), the image is found by
:func:`histospace._spatial._images.library_image` and the spot size and µm per pixel come from the library's
scale factors and metadata. A SpatialData gives one :class:`Slide` for the table's annotated shapes: the centres are
the shapes' centroids mapped into the pixels of the image with spatialdata's transformations
(:func:`spatialdata.transformations.get_transformation` through :func:`histospace._image._sdata.coordinate_system_to_pixels`),
the µm per pixel comes from :func:`histospace.io.microns_per_unit` of the coordinate system. Either way the centres
are resolved here, once, so that every function sees the same spots at the same place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from anndata import AnnData

from histospace._constants import SPATIAL_KEY
from histospace._image._sources import ImageSource
from histospace._spatial._affine import affine_scale, apply_affine
from histospace._spatial._images import library_image, sdata_image_key
from histospace._spatial._platform import technology
from histospace._spatial._uns import metadata, scalefactors


@dataclass
class Slide:
    """One slide (a library of an AnnData, or the annotated region of a SpatialData table).

    Attributes
    ----------
    library_id
        The library (AnnData) or the shapes element (SpatialData).
    rows
        Rows of the table that are spots of this slide.
    spot_ids
        `obs_names` of these rows.
    centres
        Spot centres `(len(rows), 2)` (x, y) in the pixels of the image's full-resolution level (AnnData: the units
        of `obsm['spatial']`, full-resolution pixels by the Visium convention).
    spot_diameter
        Spot diameter (circle) or bin side (square) in the same pixels, or `None` when unknown.
    kind
        `'circle'`, `'square'`, `'polygon'` or `None` (unknown, AnnData).
    image
        The image (`None` when the slide has none).
    multiscale
        The image's pyramid (SpatialData), else `None`.
    mpp
        µm per full-resolution pixel, or `None` when unknown.
    technology
        The platform (:func:`histospace._spatial._platform.technology`), or `None`.
    extra
        SpatialData: `table_key`, `image_key`, `shapes_key`, `coordinate_system`, and with an image `level`,
        `to_pixels` (the `(3, 3)` map shapes -> image pixels) and `shape_size` (median spot size in shape units).
    """

    library_id: str | None
    rows: np.ndarray
    spot_ids: np.ndarray
    centres: np.ndarray
    spot_diameter: float | None = None
    kind: str | None = None
    image: ImageSource | None = None
    multiscale: object | None = None
    mpp: float | None = None
    technology: str | None = None
    extra: dict = field(default_factory=dict)


def anndata_mpp(adata: AnnData, library_id: str | None) -> float | None:
    """µm per full-resolution pixel of a library: `metadata['microns_per_pixel']`, else
    `metadata['spot_diameter_um'] / scalefactors['spot_diameter_fullres']`, else `None`.
    """  # noqa: D205
    meta, sf = metadata(adata, library_id), scalefactors(adata, library_id)
    if meta.get("microns_per_pixel"):
        return float(meta["microns_per_pixel"])
    if sf.get("spot_diameter_fullres") and meta.get("spot_diameter_um"):
        return float(meta["spot_diameter_um"]) / float(sf["spot_diameter_fullres"])
    return None


def anndata_slide(
    adata: AnnData, library_id: str | None, rows: np.ndarray, *, spatial_key: str = SPATIAL_KEY, img=None
) -> Slide:
    """The :class:`Slide` of library `library_id` of an AnnData (spots `rows`; `img` as in `pp.image_features`)."""
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[rows, :2] if spatial_key in adata.obsm else None
    sf = scalefactors(adata, library_id)
    d = sf.get("spot_diameter_fullres")
    return Slide(
        library_id=library_id,
        rows=rows,
        spot_ids=adata.obs_names.to_numpy()[rows],
        centres=xy,
        spot_diameter=float(d) if d is not None else None,
        image=library_image(adata, library_id, img=img),
        mpp=anndata_mpp(adata, library_id),
        technology=technology(metadata(adata, library_id)),
    )


def sdata_slide(
    ctx,
    *,
    image_key: str | None,
    shapes_key: str | None,
    coordinate_system: str | None,
    image: bool = True,
    level: int | None = 0,
    max_side: int | None = None,
    one_region: str | None = None,
) -> Slide:
    """The :class:`Slide` of a SpatialData table (`ctx`: :class:`histospace._utils._sdata.TableContext`).

    `image_key` is checked or the only image (:func:`~histospace._spatial._images.sdata_image_key`); with
    `image=False` no image is used and the centres are in `coordinate_system`. The centres are in the pixels of
    pyramid level `level`, or of the coarsest level whose longest side is at least `max_side` pixels when `max_side`
    is given (`extra['level']`). `one_region`, when given, is the message raised when the table annotates several
    regions. `mpp` is that of level 0 (:func:`histospace.io.microns_per_unit` of the coordinate system).
    """
    from histospace._image import coordinate_system_to_pixels, open_multiscale
    from histospace.io._units import microns_per_unit

    sdata = ctx.sdata
    image_key = sdata_image_key(sdata, image_key) if image else None
    shapes_key = ctx.shapes_key(shapes_key)
    elements = [shapes_key] if image_key is None else [shapes_key, image_key]
    cs = ctx.coordinate_system(coordinate_system, elements)
    rows = ctx.rows_of(shapes_key)
    if one_region is not None and rows.size != ctx.table.n_obs:
        raise ValueError(one_region)
    xy, sizes, kind = ctx.geometry(shapes_key, rows)
    um_per_unit = microns_per_unit(sdata, cs, table_key=ctx.table_key)
    extra = {"image_key": image_key, "shapes_key": shapes_key, "coordinate_system": cs, "table_key": ctx.table_key}
    size = float(np.median(sizes)) if sizes.size else None  # median spot size in the shapes' own units
    to_cs = ctx.to_coordinate_system(shapes_key, cs)
    common = {"library_id": shapes_key, "rows": rows, "spot_ids": ctx.table.obs_names.to_numpy()[rows], "kind": kind}
    if image_key is None:
        m = to_cs
        diam = None if size is None else size * affine_scale(m)
        return Slide(centres=apply_affine(m, xy), spot_diameter=diam, mpp=um_per_unit, extra=extra, **common)
    to_image = coordinate_system_to_pixels(sdata, image_key=image_key, coordinate_system=cs, level=0)
    um_per_px = None if um_per_unit is None else um_per_unit * (1.0 / affine_scale(to_image))
    ms = open_multiscale(sdata.images[image_key], mpp=um_per_px, name=f"sdata.images[{image_key!r}]")
    if max_side is not None:
        level = ms.level_for(downsample=max(1.0, max(ms.shape) / max_side))
    if level:
        to_image = coordinate_system_to_pixels(sdata, image_key=image_key, coordinate_system=cs, level=level)
    m = to_image @ to_cs  # shapes -> image pixels of `level`
    extra["level"] = int(level or 0)
    diam = None if size is None else size * affine_scale(m)
    return Slide(
        centres=apply_affine(m, xy),
        spot_diameter=diam,
        image=ms.source(level or 0),
        multiscale=ms,
        mpp=um_per_px,
        extra={**extra, "to_pixels": m, "shape_size": size},
        **common,
    )


def table_centres(ctx) -> np.ndarray | None:
    """Centres `(n_obs, 2)` of every row of a SpatialData table (`ctx`), in its default coordinate system.

    The centres of the shapes the table annotates, as `pp` and `pl` read them (:func:`sdata_slide` without an image);
    `None` when they cannot be resolved that way (no annotated shapes, several regions, no shared coordinate system),
    so that the caller falls back to the table's own `obsm`.
    """
    try:
        slide = sdata_slide(ctx, image_key=None, shapes_key=None, coordinate_system=None, image=False)
    except (KeyError, ValueError, TypeError):
        return None
    rows = np.asarray(slide.rows)
    if rows.size != ctx.table.n_obs:
        return None
    out = np.empty((ctx.table.n_obs, 2), dtype=np.float64)
    out[rows] = np.asarray(slide.centres, dtype=np.float64)[:, :2]
    return out
