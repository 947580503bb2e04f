"""SpatialData image elements as multiscale images, and the affine maps from coordinate systems to their pixels."""

from __future__ import annotations

import re

import numpy as np

from histospace._image._levels import DaskLevel
from histospace._image._sources import ImageSource
from histospace._spatial._affine import apply_affine as transform_xy
from histospace._spatial._affine import check_coordinate_system as _check_cs
from histospace._spatial._affine import xy_matrix as _xy_matrix

__all__ = ["coordinate_system_to_pixels", "element_to_pixels", "is_xarray_image", "transform_xy"]


def is_xarray_image(obj) -> bool:
    """Whether `obj` is an xarray `DataArray` or `DataTree` (a SpatialData image element), without importing xarray."""
    t = type(obj)
    return t.__name__ in ("DataArray", "DataTree") and t.__module__.split(".")[0] in ("xarray", "datatree")


def _dataarray_source(da, name: str) -> ImageSource:
    dims = [str(d) for d in da.dims]
    if "z" in dims:
        msg = f"{name} is a 3-D image (dims {tuple(dims)}); select a z-plane first, e.g. `image.isel(z=0)`."
        raise ValueError(msg)
    axes = "".join({"c": "C", "y": "Y", "x": "X"}.get(d, "Q") for d in dims)
    data = da.data
    arr = DaskLevel(data) if hasattr(data, "dask") else data
    return ImageSource(arr, axes, name=name)


def _tree_levels(tree) -> list:
    """The DataArrays of a multiscale DataTree, `scale0` first."""
    keys = sorted((k for k in tree.children if re.fullmatch(r"scale\d+", str(k))), key=lambda k: int(str(k)[5:]))
    if not keys:
        msg = f"The DataTree has no `scale0`, `scale1`, ... levels (children: {list(tree.children)})."
        raise ValueError(msg)
    out = []
    for k in keys:
        node = tree[k]
        variables = list(node.data_vars.values()) if hasattr(node, "data_vars") else list(node.values())
        if len(variables) != 1:
            msg = f"DataTree level {k!r} holds {len(variables)} arrays; expected one image."
            raise ValueError(msg)
        out.append(variables[0])
    return out


def _element(sdata, key: str, what: str):
    kinds = ("images", "labels", "shapes", "points") if what == "element" else ("images",)
    for kind in kinds:
        container = getattr(sdata, kind, {})
        if key in container:
            return container[key]
    avail = {k: list(getattr(sdata, k, {}).keys()) for k in kinds}
    msg = f"`sdata` has no {what} {key!r}; it holds {avail}."
    raise KeyError(msg)


def _level_dataarray(image, level: int, image_key: str):
    if type(image).__name__ == "DataTree":
        levels = _tree_levels(image)
    else:
        levels = [image]
    if not isinstance(level, int | np.integer) or not 0 <= level < len(levels):
        msg = f"Image {image_key!r} has levels 0..{len(levels) - 1}; got `level={level!r}`."
        raise IndexError(msg)
    return levels[int(level)]


def coordinate_system_to_pixels(sdata, *, image_key: str, coordinate_system: str = "global", level: int = 0):
    """The affine map from `coordinate_system` to pixels of one level of `sdata.images[image_key]`.

    Parameters
    ----------
    sdata
        The SpatialData object.
    image_key
        The image element.
    coordinate_system
        The coordinate system the image belongs to.
    level
        Pyramid level (`scale{level}` of a multiscale image; 0 for a single-scale image).

    Returns
    -------
    A float64 `(3, 3)` matrix acting on `(x, y, 1)`: the inverse of spatialdata's transformation of that level to
    `coordinate_system` (`get_transformation`, which for `scale{k}` already holds the level's `Scale`).
    """
    image = _element(sdata, image_key, "image")
    da = _level_dataarray(image, level, image_key)
    t = _check_cs(sdata, coordinate_system, {image_key: da})[image_key]
    return _xy_matrix(_inverse(t, image_key, coordinate_system))


def _inverse(t, image_key: str, coordinate_system: str):
    """The inverse of `t`, the transformation of image `image_key` to `coordinate_system` (`ValueError` if singular)."""
    try:
        return t.inverse()
    except np.linalg.LinAlgError as e:
        msg = f"The transformation of {image_key!r} to {coordinate_system!r} cannot be inverted: {t}."
        raise ValueError(msg) from e


def element_to_pixels(
    sdata, *, image_key: str, element_key: str, coordinate_system: str = "global", level: int = 0
) -> np.ndarray:
    """The affine map from the intrinsic coordinates of an element (e.g. the spot circles) to pixels of an image level.

    Composed with spatialdata's API through `coordinate_system`: `Sequence([element -> coordinate_system,
    (image level -> coordinate_system)^-1])`, so both must belong to that coordinate system.

    Parameters
    ----------
    sdata, image_key, level
        The SpatialData object, the image element and its pyramid level, as in :func:`coordinate_system_to_pixels`.
    element_key
        The element whose coordinates are mapped (shapes, points or labels).
    coordinate_system
        The coordinate system holding both elements.

    Returns
    -------
    A float64 `(3, 3)` matrix acting on `(x, y, 1)`; apply it with :func:`transform_xy`.
    """
    from spatialdata.transformations import Sequence as TSequence

    image = _element(sdata, image_key, "image")
    el = _element(sdata, element_key, "element")
    da = _level_dataarray(image, level, image_key)
    ts = _check_cs(sdata, coordinate_system, {element_key: el, image_key: da})
    return _xy_matrix(TSequence([ts[element_key], _inverse(ts[image_key], image_key, coordinate_system)]))
