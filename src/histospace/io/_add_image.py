"""`io.add_image`: attach an H&E image to bins that have none, registered into the bins' coordinate system."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scanpy import logging as logg

from histospace._utils import check_number
from histospace._utils._choice import only_one
from histospace._utils._deprecate import renamed_argument

from ._units import check_attrs, microns_per_unit, set_microns_per_unit

__all__ = ["add_image"]

_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".qptiff", ".ndpi", ".scn")
#: the smallest pyramid level made by default is below this many pixels on its longer side
MIN_LEVEL_SIZE = 1024


def _read_path(path: Path, chunk: int):
    """Levels of an image file as dask arrays `(y, x[, c])` (TIFF pyramids lazily through zarr) and its µm/px.

    A TIFF is read as `open_slide` reads it (:func:`~histospace._image._tiff.read_tiff_header`): its largest
    series, the µm per pixel by the one rule of :mod:`histospace._image._mpp`, and a `ValueError` naming the file
    when it is damaged or truncated.
    """
    import dask.array as da

    from histospace._image import read_tiff_header
    from histospace._image._readers import _is_tiff

    name = path.name.lower()
    if name.endswith(_TIFF_SUFFIXES) or name.endswith((".ome.tif", ".ome.tiff")) or _is_tiff(path):
        import tifffile
        import zarr

        header = read_tiff_header(path)
        axes = header.axes
        mpp = None if header.mpp is None else float(np.mean(header.mpp))
        z = zarr.open(tifffile.imread(path, aszarr=True, series=header.series), mode="r")
        arrays = [z[str(i)] for i in range(len(header.levels))] if hasattr(z, "keys") else [z]
        levels = []
        for arr in arrays:
            d = da.from_zarr(arr)
            keep = [i for i, a in enumerate(axes) if a in "YXSC"]
            index = tuple(slice(None) if i in keep else 0 for i in range(len(axes)))
            d = d[index]
            kept = "".join(a for a in axes if a in "YXSC")
            order = [kept.index("Y"), kept.index("X")] + [i for i, a in enumerate(kept) if a in "SC"]
            d = d.transpose(order)
            levels.append(d.rechunk({0: chunk, 1: chunk}))
        return levels, mpp
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB") if im.mode not in ("RGB", "L", "RGBA") else im)
    return [da.from_array(arr, chunks={0: chunk, 1: chunk})], None


def _to_cyx(data, dims: Sequence[str] | None):
    """A dask array `(c, y, x)` from `(y, x)`, `(y, x, c)`, `(c, y, x)` (numpy, dask, zarr) or an xarray DataArray."""
    import dask.array as da

    if hasattr(data, "dims") and hasattr(data, "data") and dims is None:
        dims = tuple(str(d) for d in data.dims)
        data = data.data
    arr = data if isinstance(data, da.Array) else da.from_array(data) if hasattr(data, "shape") else None
    if arr is None:
        msg = f"`image` must be a path, an array (numpy, dask, zarr) or a DataArray, got {type(data).__name__}."
        raise TypeError(msg)
    if dims is None:
        if arr.ndim == 2:
            dims = ("y", "x")
        elif arr.ndim == 3 and arr.shape[-1] <= 4:
            dims = ("y", "x", "c")
        elif arr.ndim == 3 and arr.shape[0] <= 4:
            dims = ("c", "y", "x")
        else:
            msg = f"`image` has shape {tuple(arr.shape)}; expected (y, x), (y, x, c) or (c, y, x) with c <= 4."
            raise ValueError(msg)
    dims = tuple(dims)
    if len(dims) != arr.ndim or set(dims) - {"c", "y", "x"} or not {"y", "x"} <= set(dims):
        msg = f"`dims` {dims} do not fit an image of shape {tuple(arr.shape)}; use 'y', 'x' and optionally 'c'."
        raise ValueError(msg)
    if "c" not in dims:
        arr, dims = arr[None], ("c", *dims)
    return arr.transpose([dims.index(d) for d in ("c", "y", "x")])


def _auto_scale_factors(shape_yx: tuple[int, int]) -> list[int]:
    n = max(shape_yx)
    out = []
    while n > MIN_LEVEL_SIZE:
        out.append(2)
        n = math.ceil(n / 2)
    return out


def _multiscale(levels: list, transformations: dict, chunk: int):
    """A spatialdata multiscale image (DataTree `scale0..N`) from existing levels `(c, y, x)`."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import set_transformation
    from xarray import DataArray, Dataset, DataTree

    c_coords = ["r", "g", "b"] if levels[0].shape[0] == 3 else None
    full = levels[0].shape[1:]
    nodes = {}
    for i, lvl in enumerate(levels):
        # pixel centres in full-resolution pixels on every level, the coordinates Image2DModel.parse sets
        coords = {
            ax: np.linspace(0, m, n + 1)[:-1] + m / n / 2 for ax, n, m in zip("yx", lvl.shape[1:], full, strict=True)
        }
        coords |= {"c": c_coords} if c_coords else {}
        arr = DataArray(lvl.rechunk((lvl.shape[0], chunk, chunk)), dims=("c", "y", "x"), coords=coords, name="image")
        nodes[f"scale{i}"] = Dataset({"image": arr})
    tree = DataTree.from_dict(nodes)
    set_transformation(tree, transformations, set_all=True)
    Image2DModel().validate(tree)
    return tree


def _pixel_transformation(
    *, transformation, scale, offset, affine, microns_per_pixel, file_mpp, cs_mpu, coordinate_system
):
    from spatialdata.transformations import Affine, BaseTransformation, Identity, Scale, Sequence, Translation

    given = [x is not None for x in (transformation, scale, affine)]
    if sum(given) > 1:
        msg = "Pass at most one of `transformation`, `scale` and `affine`."
        raise ValueError(msg)
    if transformation is not None:
        if not isinstance(transformation, BaseTransformation):
            msg = f"`transformation` must be a spatialdata transformation, got {type(transformation).__name__}."
            raise TypeError(msg)
        if offset is not None:
            msg = "`offset` goes with `scale` (or `mpp`); put the translation into `transformation`."
            raise ValueError(msg)
        return transformation, "transformation"
    if affine is not None:
        m = np.asarray(affine, dtype=np.float64)
        if m.shape == (2, 3):
            m = np.vstack([m, [0, 0, 1]])
        if m.shape != (3, 3) or not np.allclose(m[2], [0, 0, 1]):
            msg = (
                f"`affine` must be a 2 x 3 or 3 x 3 matrix mapping pixel (x, y, 1) to coordinates, got shape {m.shape}."
            )
            raise ValueError(msg)
        if offset is not None:
            msg = "`offset` goes with `scale`; put the translation into `affine`."
            raise ValueError(msg)
        return Affine(m, input_axes=("x", "y"), output_axes=("x", "y")), "affine"
    how = "scale"
    if scale is None:
        mpp = microns_per_pixel if microns_per_pixel is not None else file_mpp
        if mpp is None or cs_mpu is None:
            missing = "the image's µm per pixel" if mpp is None else f"the µm per unit of {coordinate_system!r}"
            msg = (
                f"Cannot place the image: {missing} is unknown. Pass `scale=` (coordinate units per pixel) and "
                "`offset=`, `affine=` or `transformation=`"
                + ("" if mpp is not None else ", or `mpp=` (µm per pixel)")
                + "."
            )
            raise ValueError(msg)
        scale = float(mpp) / cs_mpu
        how = f"µm per pixel {float(mpp):g} / µm per unit {cs_mpu:g}"
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64), (2,))
    if not np.isfinite(s).all() or (s <= 0).any():
        msg = f"`scale` must be positive (coordinate units per pixel), got {scale!r}."
        raise ValueError(msg)
    o = np.zeros(2) if offset is None else np.asarray(offset, dtype=np.float64).reshape(-1)
    if o.shape != (2,) or not np.isfinite(o).all():
        msg = f"`offset` must be (x, y), got {offset!r}."
        raise ValueError(msg)
    parts = []
    if not np.allclose(s, 1.0):
        parts.append(Scale(s, axes=("x", "y")))
    if o.any():
        parts.append(Translation(o, axes=("x", "y")))
    if not parts:
        return Identity(), how
    return (parts[0] if len(parts) == 1 else Sequence(parts)), how


def add_image(
    sdata,
    image,
    *,
    image_key: str = "he",
    coordinate_system: str | None = None,
    transformation=None,
    scale: float | Sequence[float] | None = None,
    offset: Sequence[float] | None = None,
    affine=None,
    mpp: float | None = None,
    microns_per_pixel: float | None = None,
    scale_factors: Sequence[int] | None = None,
    dims: Sequence[str] | None = None,
    chunks: int = 4096,
) -> None:
    """Attach an H&E image to `sdata`, registered into the bins' coordinate system, read lazily.

    The image becomes a (multiscale) image element whose transformation maps its pixels into `coordinate_system`.
    Give that mapping as one of:

    - `transformation`: any spatialdata transformation from pixels to the coordinate system;
    - `affine`: a 2 x 3 or 3 x 3 matrix from pixel `(x, y, 1)` to coordinates;
    - `scale` (coordinate units per pixel, one value or `(sx, sy)`) and `offset` (the coordinates of pixel
      `(0, 0)`'s corner), i.e. `coords = scale * pixel + offset`;
    - nothing: the scale is µm per pixel (`mpp`, else read from the file by the rule every histospace reader uses:
      OME `PhysicalSizeX/Y`, Aperio `MPP`, else the TIFF resolution tags, ignoring inch resolutions of 1200 dpi or
      less, which are software defaults, not a pixel size) over the coordinate system's µm per unit (:func:`histospace.io.microns_per_unit`),
      plus `offset`.

    A Stereo-seq image registered to the chip (SAW's `*_regist.tif`) has one pixel per DNB: `scale=1`.

    Arguments are checked, and a file's header read (a damaged or truncated TIFF raises `ValueError` naming it),
    before anything is written: on an error `sdata` is left as it was.

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData` (e.g. from :func:`histospace.io.read_gem`).
    image
        A path (TIFF, pyramidal/OME-TIFF, SVS, BigTIFF: read lazily level by level through tifffile and zarr;
        PNG/JPEG: decoded once), or an array `(y, x)`, `(y, x, c)` or `(c, y, x)` (numpy, dask, zarr; a DataArray
        keeps its dims).
    image_key
        Name of the new image element.
    coordinate_system
        Coordinate system of the bins. Default: the only one in `sdata`; `"global"` when `sdata` is empty. In a
        coordinate system that nothing maps to yet (an H&E-only slide, e.g. for `hs.pp.tile_image`) and without a
        placement, one unit is one full-resolution pixel and the image's µm per pixel is recorded as the system's µm
        per unit.
    transformation, scale, offset, affine, mpp
        The placement, see above; `mpp` is the image's µm per full-resolution pixel (the name
        :func:`histospace.pp.tile_image` uses too). `mpp` must be positive; it wins over the file's metadata.
    microns_per_pixel
        Deprecated alias of `mpp` (a `FutureWarning`).
    scale_factors
        Downscaling factors between pyramid levels (each relative to the previous level) for
        :meth:`spatialdata.models.Image2DModel.parse`. Default: the file's own pyramid levels when it has some, else
        factors of 2 until the smallest level is under 1024 px. `[]` keeps one level.
    dims
        Axis names of an array `image` (`'c'`, `'y'`, `'x'`), when the shape is ambiguous.
    chunks
        Chunk side in pixels of the dask arrays.

    Returns
    -------
    Returns `None`. Sets `sdata.images[image_key]`: a :class:`xarray.DataTree` (multiscale, `scale0` the full
    resolution) or :class:`xarray.DataArray` (one level), dims `(c, y, x)`, with the transformation to
    `coordinate_system` (levels are scaled accordingly). In pixel units (see `coordinate_system`) also
    `sdata.attrs['histospace']['microns_per_unit'][coordinate_system]` when the image's µm per pixel is known.
    """
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    if not isinstance(sdata, SpatialData):
        msg = f"`sdata` must be a spatialdata.SpatialData, got {type(sdata).__name__}."
        raise TypeError(msg)
    if not isinstance(image_key, str) or not image_key:
        msg = f"`image_key` must be a non-empty string, got {image_key!r}."
        raise TypeError(msg)
    if image_key in sdata.images or image_key in sdata.labels or image_key in sdata.shapes or image_key in sdata.points:
        msg = f"An element {image_key!r} exists already in `sdata`; pass another `image_key=`."
        raise ValueError(msg)
    systems = list(sdata.coordinate_systems)
    if coordinate_system is None and not systems:  # an empty SpatialData (an H&E-only slide): spatialdata's default
        coordinate_system = "global"
    elif coordinate_system is None:
        msg = f"`sdata` has the coordinate systems {systems}; pass `coordinate_system=`."
        coordinate_system = only_one(systems, msg)
    elif coordinate_system not in systems:
        warnings.warn(
            f"No element of `sdata` maps to {coordinate_system!r} yet (it has {systems}).", UserWarning, stacklevel=2
        )
    mpp_name = "mpp" if microns_per_pixel is None else "microns_per_pixel"
    mpp = renamed_argument(mpp, microns_per_pixel, new_name="mpp", old_name="microns_per_pixel", func="hs.io.add_image")
    chunks = check_number(chunks, "chunks", integer=True, low=64)
    # checked by the name the user gave before anything is read (a zero would otherwise surface as a bad `scale`)
    mpp = check_number(mpp, mpp_name, low=0, low_inclusive=False, allow_none=True)

    file_mpp = None
    levels = None
    if isinstance(image, str | os.PathLike):
        path = Path(image).expanduser()
        if not path.is_file():
            msg = f"Image file {str(path)!r} not found."
            raise FileNotFoundError(msg)
        try:
            raw_levels, file_mpp = _read_path(path, chunks)
        except (OSError, ValueError, KeyError, IndexError) as e:
            if isinstance(e, ValueError) and str(path) in str(e):
                raise  # a damaged or truncated TIFF, already named
            msg = (
                f"Could not read the image file {str(path)!r} ({type(e).__name__}: {e}); check that it is a complete "
                "TIFF, PNG or JPEG file, or pass the image as an array."
            )
            raise ValueError(msg) from e
        levels = [_to_cyx(lvl, ("y", "x", "c") if lvl.ndim == 3 else ("y", "x")) for lvl in raw_levels]
        source = str(path)
    else:
        levels = [_to_cyx(image, dims)]
        source = type(image).__name__
    if levels[0].shape[0] > 4:
        msg = f"The image has {levels[0].shape[0]} channels; expected greyscale, RGB or RGBA."
        raise ValueError(msg)
    cs_mpu = microns_per_unit(sdata, coordinate_system)
    placed = transformation is not None or scale is not None or affine is not None
    pixel_units = cs_mpu is None and coordinate_system not in systems and not placed
    if pixel_units:  # nothing to register to (e.g. an H&E-only slide): units are the image's full-resolution pixels
        scale = 1.0
    tf, how = _pixel_transformation(
        transformation=transformation,
        scale=scale,
        offset=offset,
        affine=affine,
        microns_per_pixel=mpp,
        file_mpp=file_mpp,
        cs_mpu=cs_mpu,
        coordinate_system=coordinate_system,
    )
    transformations = {coordinate_system: tf}
    start = logg.info(f"adding image {image_key!r} ({levels[0].shape[2]} x {levels[0].shape[1]} px) from {source}")
    if scale_factors is None and len(levels) > 1:
        element = _multiscale(levels, transformations, chunks)
    else:
        factors = _auto_scale_factors(levels[0].shape[1:]) if scale_factors is None else list(scale_factors)
        c_coords = ["r", "g", "b"] if levels[0].shape[0] == 3 else None
        element = Image2DModel.parse(
            levels[0],
            dims=("c", "y", "x"),
            c_coords=c_coords,
            transformations=transformations,
            scale_factors=factors or None,
            chunks=(levels[0].shape[0], chunks, chunks),
        )
    mpp = mpp if mpp is not None else file_mpp
    record = pixel_units and mpp is not None
    if record:
        check_attrs(sdata)  # before anything is written: nothing is added when the record would fail
    sdata.images[image_key] = element
    if record:
        set_microns_per_unit(sdata, float(mpp), coordinate_system=coordinate_system)
    logg.info(
        f"    finished (placement: {how})",
        time=start,
        deep=f"added\n    {image_key!r}, H&E image mapped to {coordinate_system!r} (sdata.images)",
    )
