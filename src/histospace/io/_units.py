"""Physical units of coordinate systems: `sdata.attrs['histospace']['microns_per_unit'][coordinate_system]`.

spatialdata has no units. histospace records the size of one coordinate unit in micrometres per coordinate system in
`sdata.attrs['histospace'] = {'microns_per_unit': {coordinate_system: float}}` (`attrs` survives `write` /
`read_zarr`). When nothing is recorded, :func:`microns_per_unit` infers it from what the readers of spatialdata-io
leave: Visium HD tables named `square_XXXum` annotate squares whose side in coordinate units is known, and the
Stereo-seq reader works in DNB units (0.5 µm).
"""

from __future__ import annotations

import numpy as np

from histospace._spatial._platform import VISIUM_HD_TABLE as _VISIUM_HD_TABLE

__all__ = ["DNB_MICRONS", "microns_per_unit", "set_microns_per_unit"]

#: side of one Stereo-seq DNB in micrometres (centre-to-centre distance of 500 nm on current chips)
DNB_MICRONS = 0.5

_ATTRS_KEY = "histospace"
_MPU_KEY = "microns_per_unit"


def _check_sdata(sdata) -> None:
    from spatialdata import SpatialData

    if not isinstance(sdata, SpatialData):
        msg = f"`sdata` must be a spatialdata.SpatialData, got {type(sdata).__name__}."
        raise TypeError(msg)


def set_microns_per_unit(sdata, value: float, *, coordinate_system: str) -> None:
    """Record the size of one coordinate unit of `coordinate_system`, in micrometres.

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData`.
    value
        Micrometres per coordinate unit (e.g. `0.5` for Stereo-seq DNB coordinates, `0.2737` for a Visium HD image
        in full-resolution pixels).
    coordinate_system
        Name of a coordinate system of `sdata` (one that an element maps to), or a new one that elements will use.

    Returns
    -------
    Returns `None`. Sets `sdata.attrs['histospace']['microns_per_unit'][coordinate_system]` (:class:`float`).
    """
    _check_sdata(sdata)
    if not isinstance(coordinate_system, str) or not coordinate_system:
        msg = f"`coordinate_system` must be a non-empty string, got {coordinate_system!r}."
        raise TypeError(msg)
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        msg = f"`value` must be a positive number of micrometres per unit, got {value!r}."
        raise TypeError(msg) from e
    if not np.isfinite(v) or v <= 0:
        msg = f"`value` must be a positive, finite number of micrometres per unit, got {value!r}."
        raise ValueError(msg)
    check_attrs(sdata)
    sdata.attrs.setdefault(_ATTRS_KEY, {}).setdefault(_MPU_KEY, {})[coordinate_system] = v


def check_attrs(sdata) -> None:
    """Raise `TypeError` when `sdata.attrs` cannot take a record of µm per unit (checked before any write)."""
    attrs = sdata.attrs.get(_ATTRS_KEY, {})
    if not isinstance(attrs, dict):
        msg = f"`sdata.attrs[{_ATTRS_KEY!r}]` is a {type(attrs).__name__}, expected a dict; remove or fix it first."
        raise TypeError(msg)
    mpu = attrs.get(_MPU_KEY, {})
    if not isinstance(mpu, dict):
        msg = (
            f"`sdata.attrs[{_ATTRS_KEY!r}][{_MPU_KEY!r}]` is a {type(mpu).__name__}, expected a dict of coordinate "
            "system -> µm per unit; remove or fix it first."
        )
        raise TypeError(msg)


def _recorded(sdata, coordinate_system: str) -> float | None:
    attrs = sdata.attrs.get(_ATTRS_KEY)
    if isinstance(attrs, dict):
        mpu = attrs.get(_MPU_KEY)
        if isinstance(mpu, dict) and coordinate_system in mpu:
            return float(mpu[coordinate_system])
    return None


def _linear_scale(element, coordinate_system: str) -> float | None:
    """Length of one intrinsic unit of `element` in `coordinate_system` (sqrt of |det| of the affine's linear part)."""
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(element, get_all=True)
    if coordinate_system not in transforms:
        return None
    m = transforms[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    det = abs(float(np.linalg.det(np.asarray(m, dtype=np.float64)[:2, :2])))
    return float(np.sqrt(det)) if det > 0 else None


def square_side(shapes) -> float | None:
    """Side of the (axis-aligned) squares of a shapes element in intrinsic units, or `None` if they are not squares.

    Circles (points with a `radius` column) count as squares of side `2 * radius`, as spatialdata-io draws bins.
    """
    if len(shapes) == 0:
        return None
    geom = shapes.geometry.iloc[0]
    if geom.geom_type == "Point":
        if "radius" not in shapes.columns:
            return None
        return 2.0 * float(shapes["radius"].iloc[0])
    if geom.geom_type != "Polygon":
        return None
    x0, y0, x1, y1 = geom.bounds
    w, h = x1 - x0, y1 - y0
    if w <= 0 or not np.isclose(w, h, rtol=1e-6) or not np.isclose(geom.area, w * h, rtol=1e-6):
        return None
    return float(w)


def _infer_visium_hd(sdata, coordinate_system: str, table_key: str | None) -> float | None:
    keys = [table_key] if table_key is not None else sorted(sdata.tables)
    for key in keys:
        m = _VISIUM_HD_TABLE.match(key)
        if m is None:
            continue
        bin_um = float(m.group(1))
        attrs = sdata.tables[key].uns.get("spatialdata_attrs", {})
        regions = attrs.get("region")
        regions = [regions] if isinstance(regions, str) else list(regions or [])
        for region in regions:
            if region not in sdata.shapes:
                continue
            shapes = sdata.shapes[region]
            side = square_side(shapes)
            scale = _linear_scale(shapes, coordinate_system)
            if side is None or scale is None:
                continue
            return bin_um / (side * scale)
    return None


def _infer_stereoseq(sdata, coordinate_system: str) -> float | None:
    """spatialdata-io's Stereo-seq reader: bins, cells and the registered image are in DNB units ('global')."""
    if sdata.attrs.get("spatialdata_io_reader") != "stereoseq" or coordinate_system != "global":
        return None
    for table in sdata.tables.values():
        cellbin = table.uns.get("cellBin_attrs")
        res = cellbin.get("resolution") if isinstance(cellbin, dict) else None
        if res is not None:
            try:
                res = float(np.asarray(res).ravel()[0])
            except (TypeError, ValueError, IndexError):
                res = None
            if res and res > 0:
                return res / 1000.0
    return DNB_MICRONS


def microns_per_unit(sdata, coordinate_system: str, *, table_key: str | None = None) -> float | None:
    """Micrometres per unit of `coordinate_system`: the recorded value, else inferred, else `None`.

    The recorded value is `sdata.attrs['histospace']['microns_per_unit'][coordinate_system]` (written by
    :func:`set_microns_per_unit` and by every histospace reader and generator). Without one:

    - tables read by :func:`spatialdata_io.visium_hd` (keys `square_XXXum`, annotating squares of `XXX` µm):
      µm per unit = `XXX / side`, with `side` the squares' side mapped into `coordinate_system`;
    - data read by :func:`spatialdata_io.stereoseq` in its `'global'` coordinate system: DNB units (0.5 µm, or the
      cell-bin GEF's `resolution` in nm / 1000).

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData`.
    coordinate_system
        Name of the coordinate system.
    table_key
        Infer from this Visium HD table only (default: any table named `square_XXXum`).

    Returns
    -------
    Micrometres per coordinate unit, or `None` when it is neither recorded nor inferable.
    """
    _check_sdata(sdata)
    if table_key is not None and table_key not in sdata.tables:
        msg = f"Table {table_key!r} not found in `sdata.tables` (available: {sorted(sdata.tables)})."
        raise KeyError(msg)
    rec = _recorded(sdata, coordinate_system)
    if rec is not None:
        return rec
    v = _infer_visium_hd(sdata, coordinate_system, table_key)
    if v is None:
        v = _infer_stereoseq(sdata, coordinate_system)
    return v
