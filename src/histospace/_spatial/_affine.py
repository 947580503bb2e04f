"""Affine maps of `(x, y)` points, and the one coordinate-system checker of a SpatialData.

Transformations come from spatialdata (:func:`spatialdata.transformations.get_transformation`); they are turned
into `(3, 3)` matrices acting on `(x, y, 1)` by spatialdata's own `to_affine_matrix` (:func:`xy_matrix`), never
combined from hand-read scale factors.
"""

from __future__ import annotations

import numpy as np


def apply_affine(m: np.ndarray, xy) -> np.ndarray:
    """Apply a `(3, 3)` affine matrix to `(x, y)` points `(..., 2)`; returns float64 of the same shape."""
    xy = np.asarray(xy, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    return xy @ m[:2, :2].T + m[:2, 2]


def affine_scale(m: np.ndarray) -> float:
    """The mean linear scale of an affine map (`sqrt(|det|)` of its linear part)."""
    return float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))


def xy_matrix(transformation) -> np.ndarray:
    """The `(3, 3)` float64 matrix of a spatialdata transformation on the `(x, y)` axes."""
    return np.asarray(transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def check_coordinate_system(sdata, coordinate_system: str, elements: dict) -> dict:
    """The transformations of `elements` (`{name: element}`) to `coordinate_system`, with clear errors.

    Raises `KeyError` when `sdata` has no such coordinate system, `ValueError` naming the elements that are not in it
    and the coordinate systems that hold all of them.
    """
    from spatialdata.transformations import get_transformation

    if coordinate_system not in sdata.coordinate_systems:
        msg = (
            f"Coordinate system {coordinate_system!r} not found; `sdata` has {list(sdata.coordinate_systems)}. "
            "Pass `coordinate_system=` naming one of them."
        )
        raise KeyError(msg)
    all_t = {k: get_transformation(e, get_all=True) for k, e in elements.items()}
    missing = [k for k, t in all_t.items() if coordinate_system not in t]
    if missing:
        common = sorted(set.intersection(*(set(t) for t in all_t.values())))
        where = "; ".join(f"{k!r} is in {sorted(t)}" for k, t in all_t.items())
        msg = (
            f"{' and '.join(repr(k) for k in missing)} not in coordinate system {coordinate_system!r} ({where}). "
            f"Pass a coordinate system holding all of them: {common}"
            + (
                "."
                if common
                else " (none; add a transformation with `spatialdata.transformations.set_transformation`)."
            )
        )
        raise ValueError(msg)
    return {k: t[coordinate_system] for k, t in all_t.items()}


def shared_coordinate_system(sdata, coordinate_system: str | None, elements: list[str]) -> str:
    """The coordinate system all `elements` (names of `sdata`'s elements) belong to.

    `coordinate_system` when given (checked by :func:`check_coordinate_system`); else the only shared one,
    `'global'` among several, or the one the first element lives in as it is (identity map; the first by name).
    """
    from spatialdata.transformations import get_transformation

    if coordinate_system is not None:
        check_coordinate_system(sdata, coordinate_system, {name: sdata[name] for name in elements})
        return coordinate_system
    systems = [set(get_transformation(sdata[name], get_all=True)) for name in elements]
    shared = set.intersection(*systems) if systems else set()
    if not shared:
        msg = (
            f"No coordinate system connects {elements}; add transformations to a common coordinate system "
            "(`spatialdata.transformations.set_transformation`)."
        )
        raise ValueError(msg)
    if len(shared) > 1:
        if "global" in shared:
            return "global"
        # the one the first element (the shapes) lives in as it is, e.g. a Visium HD dataset's full-resolution one
        own = [c for c in sorted(shared) if np.allclose(element_to(sdata, elements[0], c), np.eye(3))]
        if own:  # equivalent for these elements (the same coordinates): the first by name
            return own[0]
        msg = f"{elements} share several coordinate systems {sorted(shared)}; pass `coordinate_system=`."
        raise ValueError(msg)
    return next(iter(shared))


def element_to(sdata, element: str, coordinate_system: str) -> np.ndarray:
    """The `(3, 3)` affine map from `element`'s intrinsic `(x, y)` to `coordinate_system`."""
    from spatialdata.transformations import get_transformation

    return xy_matrix(get_transformation(sdata[element], to_coordinate_system=coordinate_system))
