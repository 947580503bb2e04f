"""Where the spots of `pp.image_features` are and which image holds them: slides, images, patch sizes.

For an AnnData the slides come from `obs[library_key]` / the Visium layout in `uns` (read through the spatial adapter,
:mod:`histospace._spatial`); for a SpatialData from the adapter's slide record (the shapes the table annotates and an
image element, joined by spatialdata's transformations). Either way the result
is the centres (full-resolution units) and one :class:`_Library` per slide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from anndata import AnnData

from histospace._constants import LIBRARY_KEY
from histospace._image._sources import ImageSource
from histospace._spatial._images import library_image
from histospace._spatial._images import sdata_image_key as _sdata_image_key
from histospace._spatial._platform import HE_TILES
from histospace._spatial._slide import sdata_slide
from histospace._spatial._uns import metadata, scalefactors, uns_libraries, uns_path
from histospace._utils._data import library_labels
from histospace._utils._sdata import TableContext, affine_scale

#: default patch side, in spot diameters (validated on DLPFC by the domain benchmark: 3 diameters = 165 µm on Visium)
DEFAULT_PATCH_DIAMETERS = 3.0
#: default patch side for square bins, in µm (the Visium default's physical size)
DEFAULT_PATCH_UM = 165.0
#: parameters of the SpatialData path recorded in `uns[key]['params']`
_SDATA_KEYS = ("table_key", "image_key", "shapes_key", "coordinate_system", "level", "context_level")


@dataclass
class _Library:
    """One slide: its spots (row indices), image and patch size in full-resolution units (the units of the centres).

    `multiscale` is the image's pyramid when it has one: patches are then read from the level that fits the patch.
    """

    library_id: str
    rows: np.ndarray
    source: ImageSource
    patch_size_px: float
    patch_size_um: float | None
    multiscale: object | None = None
    extra: dict = field(default_factory=dict)

    def source_for(self, size_px: float, input_size: int) -> tuple[int, ImageSource]:
        """`(level, image)` to read patches of `size_px` full-resolution pixels from (the coarsest level on which the
        patch still spans `input_size` pixels).
        """  # noqa: D205
        ms = self.multiscale
        if ms is None or ms.n_levels < 2:
            return 0, self.source
        level = ms.level_for(downsample=max(1.0, size_px / input_size))
        return level, ms.source(level)


def _patch_size_of_library(
    adata: AnnData, library_id: str | None, patch_size: float | None, patch_size_um: float | None
) -> tuple[float, float | None]:
    """Patch size in full-resolution pixels (and in µm when known) for one library."""
    sf, meta = scalefactors(adata, library_id), metadata(adata, library_id)
    diam_px = sf.get("spot_diameter_fullres")
    diam_um = meta.get("spot_diameter_um")
    px_per_um = float(diam_px) / float(diam_um) if diam_px is not None and diam_um else None
    where = uns_path(library_id)
    if patch_size is not None:
        return float(patch_size), (float(patch_size) / px_per_um if px_per_um else None)
    if patch_size_um is not None:
        if px_per_um is None:
            msg = (
                f"`patch_size_um` needs `{where}['scalefactors']['spot_diameter_fullres']` and "
                f"`{where}['metadata']['spot_diameter_um']` to convert µm to pixels; pass `patch_size=` in "
                "full-resolution pixels instead."
            )
            raise KeyError(msg)
        return float(patch_size_um) * px_per_um, float(patch_size_um)
    if diam_px is None:
        msg = (
            f"`{where}['scalefactors']['spot_diameter_fullres']` not found, so the default patch size (three spot "
            "diameters) is unknown; pass `patch_size=` in full-resolution pixels."
        )
        raise KeyError(msg)
    # spots: three diameters; tiles of `pp.tile_image`: the tile itself
    factor = 1.0 if meta.get("technology") == HE_TILES else DEFAULT_PATCH_DIAMETERS
    px = factor * float(diam_px)
    return px, (px / px_per_um if px_per_um else None)


def _resolve_libraries(
    adata: AnnData,
    *,
    img,
    img_scale: float | None,
    library_id: str | None,
    library_key: str | None,
    patch_size: float | None,
    patch_size_um: float | None,
) -> list[_Library]:
    libs_uns = uns_libraries(adata)
    n = adata.n_obs

    if library_key is not None:
        col = library_labels(adata, library_key, required=True)
        ids = list(dict.fromkeys(col))  # order of appearance
        if library_id is not None:
            msg = "Pass either `library_id=` (one slide) or `library_key=` (several slides), not both."
            raise ValueError(msg)
        if img is not None and len(ids) > 1:
            msg = (
                f"`img=` gives one image but `adata.obs[{library_key!r}]` holds {len(ids)} libraries; "
                f"subset `adata` to one library or drop `img=` to use the images in `{uns_path()}`."
            )
            raise ValueError(msg)
        groups = [(lib, np.flatnonzero(col == lib)) for lib in ids]
    else:
        if library_id is not None:
            if library_id not in libs_uns:
                msg = (
                    f"library_id={library_id!r} not found in `{uns_path()}` (available: {libs_uns}); pass one of these."
                )
                raise KeyError(msg)
            lib = library_id
            if LIBRARY_KEY in adata.obs:
                others = set(adata.obs[LIBRARY_KEY].astype(str)) - {str(library_id)}
                if others and str(library_id) in set(adata.obs[LIBRARY_KEY].astype(str)):
                    msg = (
                        f"`adata.obs['library_id']` also holds spots of {sorted(others)[:5]}, which would be cut from "
                        f"the image of {library_id!r}. Pass `library_key='library_id'` to use each slide's image, or "
                        f"subset first: `adata[adata.obs['library_id'] == {library_id!r}].copy()`."
                    )
                    raise ValueError(msg)
        elif len(libs_uns) == 1:
            lib = libs_uns[0]
        elif len(libs_uns) > 1:
            if img is not None:
                lib = None
            else:
                msg = (
                    f"`{uns_path()}` holds {len(libs_uns)} libraries {libs_uns}; pass `library_id=` for one "
                    "slide or `library_key='library_id'` (the obs column naming each spot's slide) for all."
                )
                raise ValueError(msg)
        else:
            lib = None
        groups = [(lib, np.arange(n))]

    out = []
    missing = []
    for lib, rows in groups:
        if img is None and (lib is None or lib not in libs_uns):
            missing.append((lib, rows))
            continue
        src = library_image(adata, lib, img=img, img_scale=img_scale)
        if src is None:
            missing.append((lib, rows))
            continue
        if img is not None and patch_size is None and patch_size_um is None and lib is None:
            msg = (
                f"`patch_size` is needed with `img=` when `{uns_path()}` has no library with "
                "`scalefactors['spot_diameter_fullres']`; pass `patch_size=` in full-resolution pixels."
            )
            raise KeyError(msg)
        ps_px, ps_um = _patch_size_of_library(adata, lib, patch_size, patch_size_um)
        out.append(_Library(str(lib) if lib is not None else "img", rows, src, ps_px, ps_um))
    if missing:
        n_spots = sum(len(r) for _, r in missing)
        names = [m[0] for m in missing]
        if not libs_uns:
            msg = (
                f"No image found: `{uns_path()}` is missing or empty and no `img=` was given. Pass the H&E "
                f"image as `img=` (path, array or squidpy ImageContainer) or add it to `{uns_path()}[library_id]`"
                " (`images['hires']` + `scalefactors`, or `metadata['source_image_path']`)."
            )
        else:
            msg = (
                f"No image for {n_spots} spots of libraries {names}: `{uns_path()}[library_id]` has no "
                "`metadata['source_image_path']` and no `images['hires'|'lowres']` for them (libraries with data: "
                f"{libs_uns}). Add the image, pass `img=` for one slide, or subset `adata` to slides with images."
            )
        raise KeyError(msg)
    return out


def sdata_image_key(sdata, image_key: str | None) -> str:
    """The H&E element of `sdata.images`: `image_key`, checked, or the only image when it is `None`."""
    return _sdata_image_key(sdata, image_key)


def _sdata_libraries(
    ctx: TableContext,
    *,
    image_key: str | None,
    shapes_key: str | None,
    coordinate_system: str | None,
    patch_size: float | None,
    patch_size_um: float | None,
) -> tuple[np.ndarray, list[_Library]]:
    """Centres in pixels of the image's full-resolution level and the patch size, from the elements of a SpatialData.

    The regions' centres are mapped shapes -> `coordinate_system` -> image level 0 with spatialdata's
    transformations; µm come from :func:`histospace.io.microns_per_unit` of the coordinate system.
    """
    slide = sdata_slide(
        ctx,
        image_key=image_key,
        shapes_key=shapes_key,
        coordinate_system=coordinate_system,
        one_region=(
            f"The table {ctx.table_key!r} annotates several regions; image features of one image are computed for one "
            "region at a time: subset the table to the rows of one region."
        ),
    )
    centres, rows, m, um_per_px, cs = (
        slide.centres,
        slide.rows,
        slide.extra["to_pixels"],
        slide.mpp,
        slide.extra["coordinate_system"],
    )
    where = (
        f"the coordinate system {cs!r} has no µm scale: give the image's resolution with `mpp=` of "
        f"`hs.io.add_image(sdata, path, mpp=...)` (or `hs.io.set_microns_per_unit(sdata, value, "
        f"coordinate_system={cs!r})`)"
    )
    if patch_size is not None:
        px = float(patch_size)
    elif patch_size_um is not None:
        if um_per_px is None:
            msg = (
                f"`patch_size_um` needs µm, but {where}; or pass `patch_size=` in pixels of the full-resolution image."
            )
            raise ValueError(msg)
        px = float(patch_size_um) / um_per_px
    elif "tile_image" in ctx.table.uns:  # tiles of `pp.tile_image`: the tile itself
        px = slide.extra["shape_size"] * affine_scale(m)
    elif slide.kind == "square":
        if um_per_px is None:
            msg = f"The default patch of square bins is {DEFAULT_PATCH_UM:g} µm, but {where}; or pass `patch_size=`."
            raise ValueError(msg)
        px = DEFAULT_PATCH_UM / um_per_px
    else:  # spots: three diameters
        px = DEFAULT_PATCH_DIAMETERS * slide.extra["shape_size"] * affine_scale(m)
    extra = {k: slide.extra[k] for k in ("image_key", "shapes_key", "coordinate_system", "table_key")}
    um = None if um_per_px is None else px * um_per_px
    return centres, [_Library(slide.library_id, rows, slide.image, px, um, multiscale=slide.multiscale, extra=extra)]


def _anndata_coords(adata: AnnData, spatial_key: str) -> np.ndarray:
    """`obsm[spatial_key]` as float64 `(n_obs, 2)` pixel coordinates, checked."""
    if spatial_key not in adata.obsm:
        msg = (
            f"`adata.obsm[{spatial_key!r}]` not found; it must hold the spot centres in full-resolution pixels (x, y). "
            "Load the data with a Visium reader (`sc.read_visium`, `squidpy.read.visium`) or set it, or pass "
            "`spatial_key=`."
        )
        raise KeyError(msg)
    coords = np.asarray(adata.obsm[spatial_key])
    if coords.ndim != 2 or coords.shape[0] != adata.n_obs or coords.shape[1] < 2:
        msg = f"`adata.obsm[{spatial_key!r}]` has shape {coords.shape}; expected ({adata.n_obs}, 2) pixel (x, y)."
        raise ValueError(msg)
    coords = coords[:, :2].astype(np.float64)
    if not np.isfinite(coords).all():
        bad = np.flatnonzero(~np.isfinite(coords).all(axis=1))
        msg = (
            f"`adata.obsm[{spatial_key!r}]` has NaN or infinite coordinates for {bad.size} spots, e.g. "
            f"{adata.obs_names[bad[0]]!r}; remove these spots (`adata = adata[np.isfinite(adata.obsm[{spatial_key!r}])"
            ".all(1)].copy()`) first."
        )
        raise ValueError(msg)
    return coords


def _check_inside(adata: AnnData, libs: list[_Library], coords: np.ndarray, *, max_factor: float = 1.0) -> None:
    """Raise when spot centres lie outside their image, or a patch is larger than its whole image."""
    bad = []
    for lib in libs:
        size = lib.patch_size_px * max_factor * lib.source.scale
        if size > max(lib.source.shape):
            h, w = lib.source.shape
            msg = (
                f"The patch of library {lib.library_id!r} is {size:.0f} px wide in {lib.source.name} ({w} x {h} px): "
                "larger than the whole image. Patches are bounded by the image; pass a smaller `patch_size` (in "
                "full-resolution pixels) or `patch_size_um`."
            )
            raise ValueError(msg)
        c = lib.source.to_pixels(coords[lib.rows])
        h, w = lib.source.shape
        out = (c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] >= w) | (c[:, 1] >= h)
        if out.any():
            bad.append((lib, lib.rows[out]))
    if bad:
        n_bad = sum(len(r) for _, r in bad)
        lib, rows = bad[0]
        i = rows[0]
        x, y = coords[i]
        h, w = lib.source.shape
        msg = (
            f"{n_bad} spots lie outside their image, e.g. {adata.obs_names[i]!r} at full-resolution (x, y) = "
            f"({x:.1f}, {y:.1f}), scaled by {lib.source.scale:g} outside {lib.source.name} of {w} x {h} px. Check "
            "that `obsm['spatial']` holds full-resolution pixel (x, y) coordinates and that the image and scale "
            "factors belong to this slide."
        )
        raise ValueError(msg)
