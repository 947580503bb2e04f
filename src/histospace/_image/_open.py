"""Open anything histospace reads: one entry for a single level (:func:`open_image`) and one for the pyramid.

:func:`open_image` gives an :class:`~histospace._image._sources.ImageSource` (the full-resolution level) of a path, a
numpy-like array, a squidpy `ImageContainer` or a SpatialData image; :func:`open_multiscale` gives the whole
:class:`~histospace._image._multiscale.MultiscaleImage` (levels, downsamples, µm per pixel by the one rule of
:mod:`histospace._image._mpp`). Slides and TIFFs go through :func:`~histospace._image._readers.open_slide`, SpatialData
elements through :mod:`histospace._image._sdata`. The two entries call each other, so they live in this one module,
above the sources, readers and pyramids (which import nothing from here).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from histospace._image._levels import DaskLevel
from histospace._image._multiscale import MultiscaleImage, level_zero
from histospace._image._readers import is_slide_path, open_slide
from histospace._image._sdata import _dataarray_source, _tree_levels, is_xarray_image
from histospace._image._sources import _TIFF_SUFFIXES, ImageSource, _is_image_container, _PILFileSource

__all__ = ["open_image", "open_multiscale"]


def open_image(
    obj,
    *,
    kind: str = "img",
    scale: float | None = None,
    name: str | None = None,
    library_id: str | None = None,
) -> ImageSource:
    """Open an image lazily from a path, a numpy-like array, a squidpy `ImageContainer` or a SpatialData image.

    Only the header of a file is read here; :meth:`ImageSource.load` decodes JPEG/PNG once. TIFFs and whole-slide
    files (`.svs`, `.ndpi`, `.mrxs`, OME-TIFF, ...) are opened with :func:`~histospace._image._readers.open_slide` and read
    region by region from their full-resolution level, so memory stays bounded; a multiscale image
    (:class:`~histospace._image._multiscale.MultiscaleImage`, a SpatialData `DataTree`) gives its level 0. Use
    :func:`open_multiscale` for the whole pyramid.

    A cropped `ImageContainer` (`crop_corner`/`crop_center`) keeps its position in the full image as
    :attr:`ImageSource.offset`; map coordinates with :meth:`ImageSource.to_pixels`. A container with several z-planes
    needs `library_id=` (the plane to read).
    """
    if isinstance(obj, ImageSource):
        return obj
    if isinstance(obj, MultiscaleImage) or is_xarray_image(obj):
        return level_zero(open_multiscale(obj, name=name), kind=kind, scale=scale)
    if isinstance(obj, str | os.PathLike):
        path = Path(obj).expanduser()
        if not path.is_file():
            msg = f"Image file {str(path)!r} not found; pass an existing JPEG/PNG/TIFF path or an array as `img=`."
            raise FileNotFoundError(msg)
        suffix = "".join(path.suffixes[-2:]).lower() if len(path.suffixes) > 1 else path.suffix.lower()
        s = 1.0 if scale is None else scale
        if suffix in _TIFF_SUFFIXES or path.suffix.lower() in _TIFF_SUFFIXES or is_slide_path(path):
            return level_zero(open_slide(path), kind=kind, scale=s)
        try:
            return _PILFileSource(path, kind=kind, scale=s)
        except OSError as e:
            msg = f"Could not read the image file {str(path)!r} ({e}); expected a JPEG, PNG or TIFF file."
            raise ValueError(msg) from e
    if _is_image_container(obj):
        return _container_source(obj, kind=kind, scale=scale, name=name, library_id=library_id)
    if type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):  # a torch.Tensor (torch not imported)
        obj = obj.detach().cpu().numpy()
    if not hasattr(obj, "shape") or not hasattr(obj, "dtype"):
        msg = (
            f"`img` must be a path, a numpy array (H x W or H x W x C), a squidpy ImageContainer or a SpatialData "
            f"image, got {type(obj).__name__}."
        )
        raise TypeError(msg)
    arr = obj if isinstance(obj, np.ndarray) or hasattr(obj, "chunks") else np.asarray(obj)
    if arr.ndim == 2:
        axes = "YX"
    elif arr.ndim == 3:
        axes = "YXS"
    else:
        msg = f"{name or '`img`'} has shape {tuple(arr.shape)}; expected H x W or H x W x C (C = 1, 3 or 4)."
        raise ValueError(msg)
    return ImageSource(arr, axes, kind=kind, scale=1.0 if scale is None else scale, name=name or "`img`")


def _container_source(obj, *, kind: str, scale: float | None, name: str | None, library_id: str | None) -> ImageSource:
    """The first layer of a squidpy `ImageContainer`, with its crop offset and scale, at one z-plane."""
    layer = next(iter(obj.data.data_vars))
    da = obj[layer]
    label = name or f"ImageContainer[{layer!r}]"
    planes = [str(z) for z in np.asarray(obj.data.coords["z"].values)] if "z" in obj.data.coords else []
    if "z" in da.dims and da.sizes["z"] > 1:
        if library_id is None:
            msg = (
                f"{label} has {da.sizes['z']} z-planes {planes}; pass `library_id=` naming the plane to read, or "
                f"select it with squidpy first, e.g. `img = img.crop_corner(0, 0, library_id={planes[0]!r})`."
            )
            raise ValueError(msg)
        if str(library_id) not in planes:
            msg = f"{label}: z-plane `library_id={library_id!r}` not found; the container holds {planes}."
            raise KeyError(msg)
        da = da.isel(z=planes.index(str(library_id)))
        label = f"{label}[z={library_id!r}]"
    dims = [str(d) for d in da.dims]
    axes = "".join("Y" if d == "y" else "X" if d == "x" else "S" if d.startswith("channels") else "Q" for d in dims)
    attrs = obj.data.attrs
    c_scale = float(attrs.get("scale", 1.0) or 1.0)
    offset = np.zeros(2)
    coords = attrs.get("coords")
    if coords is not None and tuple(coords.to_tuple() if hasattr(coords, "to_tuple") else coords) != (0, 0, 0, 0):
        x0, y0 = (float(coords.x0), float(coords.y0)) if hasattr(coords, "x0") else map(float, tuple(coords)[:2])
        pad = attrs.get("padding")
        px, py = (float(pad.x_pre), float(pad.y_pre)) if pad is not None and hasattr(pad, "x_pre") else (0.0, 0.0)
        # squidpy keeps the crop box in pixels of the scaled image; its pixel 0 sits at (x0 - x_pre, y0 - y_pre)
        offset = np.array([x0 - px, y0 - py]) / c_scale
    s = c_scale if scale is None else scale
    data = da.data
    if hasattr(data, "dask"):  # a lazy container: read each region with dask's synchronous scheduler
        data = DaskLevel(data)
    return ImageSource(data, axes, kind=kind, scale=s, name=label, offset=offset)


def open_multiscale(
    obj,
    *,
    mpp: float | Sequence[float] | None = None,
    reader: Literal["auto", "openslide", "tiffslide", "tifffile"] = "auto",
    library_id: str | None = None,
    name: str | None = None,
) -> MultiscaleImage:
    """Open anything histospace reads as a :class:`MultiscaleImage`.

    Parameters
    ----------
    obj
        A path (:func:`open_slide` for slides and TIFFs, one level for JPEG/PNG), a SpatialData image element (an
        `xarray.DataArray` `(c, y, x)`, or a multiscale `xarray.DataTree` with `scale0`, `scale1`, ...; read lazily
        through their dask arrays, downsamples from the level shapes), a squidpy `ImageContainer` (one level, with its
        crop offset and scale), a numpy-like array, an :class:`~histospace._image._sources.ImageSource` or a
        `MultiscaleImage`.
    mpp
        µm per level-0 pixel; for files it wins over the metadata (see :func:`open_slide`).
    reader
        Reader for files (see :func:`open_slide`).
    library_id
        z-plane of an `ImageContainer` with several planes.
    name
        Description used in messages.

    Returns
    -------
    The image as levels with downsamples and µm per pixel (`None` when unknown).
    """
    if isinstance(obj, MultiscaleImage):
        if mpp is None:
            return obj
        return MultiscaleImage(
            obj.levels,
            mpp=mpp,
            name=obj.name,
            path=obj.path,
            reader=obj.reader,
            vendor=obj.vendor,
            level_downsamples=obj.level_downsamples,
        )
    if isinstance(obj, str | os.PathLike):
        path = Path(obj).expanduser()
        if is_slide_path(path) or not path.is_file():
            return open_slide(path, mpp=mpp, reader=reader)
        src = open_image(path, name=name)
        return MultiscaleImage([src], mpp=mpp, name=str(path), path=path, reader="pil")
    if is_xarray_image(obj):
        label = name or ("SpatialData image" + (f" {obj.name!r}" if getattr(obj, "name", None) else ""))
        if type(obj).__name__ == "DataTree":
            levels = [_dataarray_source(da, f"{label}[scale{i}]") for i, da in enumerate(_tree_levels(obj))]
        else:
            levels = [_dataarray_source(obj, label)]
        return MultiscaleImage(levels, mpp=mpp, name=label, reader="spatialdata")
    src = open_image(obj, name=name, library_id=library_id)
    reader_name = "squidpy" if type(obj).__name__ == "ImageContainer" else "array"
    return MultiscaleImage([src], mpp=mpp, name=src.name, reader=reader_name)
