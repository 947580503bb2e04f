"""The one µm-per-pixel rule: slide metadata (OpenSlide / tiffslide properties, OME `PhysicalSizeX/Y`, Aperio `MPP`,
TIFF resolution tags) to µm per pixel.

Every reader of the wing asks this module: :func:`properties_mpp` for OpenSlide and tiffslide, :func:`_tiff_mpp` for
tifffile (also behind :func:`~histospace._image._tiff.read_tiff_header`, which `io.add_image` uses). Resolution
tags in inches at 1200 dpi or less are screen/print defaults written by image software, not a microscope's pixel
size, and are ignored.
"""  # noqa: D205

from __future__ import annotations

import math
import re

import numpy as np
from scanpy import logging as logg

# µm per unit of length, for OME `PhysicalSize*Unit` and TIFF `ResolutionUnit`
_UNIT_UM = {
    "pm": 1e-6,
    "å": 1e-4,
    "angstrom": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "micrometer": 1.0,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "in": 25400.0,
    "inch": 25400.0,
}
_MAX_DEFAULT_DPI = 1200.0


def _valid_mpp(mpp) -> tuple[float, float] | None:
    if mpp is None:
        return None
    try:
        x, y = float(mpp[0]), float(mpp[1])
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0):
        return None
    return x, y


def _unit_um(unit) -> float | None:
    """µm per unit: OME unit strings, TIFF `ResolutionUnit` names or codes (2 inch, 3 cm, 4 mm, 5 µm)."""
    if unit is None:
        return 1.0
    if isinstance(unit, int | np.integer) or (isinstance(unit, str) and unit.strip().isdigit()):
        return {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}.get(int(unit))
    name = getattr(unit, "name", str(unit)).strip().lower()
    name = name.replace("resunit.", "")
    return _UNIT_UM.get(name)


def _resolution_mpp(xres, yres, unit) -> tuple[float, float] | None:
    """µm per pixel from TIFF `XResolution`/`YResolution` (pixels per unit); `None` without a length unit."""
    if xres is None or unit is None:
        return None
    f = _unit_um(unit)
    if f is None:  # RESUNIT.NONE (1) or an unknown unit: no physical size
        return None
    try:
        xr = float(xres)
        yr = float(yres) if yres is not None else xr
    except (TypeError, ValueError):
        return None
    if not (xr > 0 and yr > 0):
        return None
    mpp = (f / xr, f / yr)
    return None if _is_default_dpi(unit, xr, mpp) else mpp


def _is_default_dpi(unit, xres, mpp) -> bool:
    """Resolution tags in inches at <= 1200 dpi: image software's default, not a microscope's pixel size."""
    if unit is None or xres is None or mpp is None:
        return False
    if _unit_um(unit) != 25400.0:
        return False
    try:
        dpi = float(xres)
    except (TypeError, ValueError):
        return False
    if dpi <= _MAX_DEFAULT_DPI and math.isclose(mpp[0], 25400.0 / dpi, rel_tol=1e-6):
        logg.debug(f"ignoring the TIFF resolution {dpi:g} dpi (a software default, not a pixel size)")
        return True
    return False


def _ome_mpp(xml: str, index: int) -> tuple[float, float] | None:
    """`PhysicalSizeX/Y` of OME image `index` (first image when absent), converted to µm with their units."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    images = root.findall("{*}Image") or root.findall("Image")
    if not images:
        return None
    image = images[index] if index < len(images) else images[0]
    pixels = image.find("{*}Pixels")
    if pixels is None:
        pixels = image.find("Pixels")
    if pixels is None:
        return None
    out = []
    for ax in ("X", "Y"):
        v = pixels.get(f"PhysicalSize{ax}")
        if v is None:
            return None
        f = _unit_um(pixels.get(f"PhysicalSize{ax}Unit", "µm"))
        if f is None:
            return None
        out.append(float(v) * f)
    return out[0], out[1]


def _tiff_mpp(tf, series, index: int) -> tuple[float, float] | None:
    """µm per pixel of a tifffile series: OME metadata, Aperio `MPP`, then the resolution tags of its first page."""
    if tf.is_ome and tf.ome_metadata:
        mpp = _valid_mpp(_ome_mpp(tf.ome_metadata, index))
        if mpp is not None:
            return mpp
    page = series.pages[0] if series.pages else tf.pages[0]
    desc = getattr(tf.pages[0], "description", "") or ""
    if desc.startswith("Aperio"):
        m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", desc)
        if m:
            return _valid_mpp((float(m.group(1)), float(m.group(1))))
    try:
        tags = page.keyframe.tags if hasattr(page, "keyframe") else page.tags
        xr, yr = tags.get("XResolution"), tags.get("YResolution")
        unit = tags.get("ResolutionUnit")
        if xr is None or unit is None:
            return None
        xv, yv = xr.value, (yr.value if yr is not None else xr.value)
        xres = xv[0] / xv[1] if isinstance(xv, tuple) else float(xv)
        yres = yv[0] / yv[1] if isinstance(yv, tuple) else float(yv)
        return _resolution_mpp(xres, yres, int(unit.value))
    except (ZeroDivisionError, TypeError, ValueError, AttributeError):
        return None


def properties_mpp(props, reader: str) -> tuple[float, float] | None:
    """µm per pixel from the property map of an OpenSlide or tiffslide handle (`reader`: `'openslide'`/`'tiffslide'`).

    `{reader}.mpp-x/y`; with OpenSlide, else the `tiff.*Resolution` tags (OpenSlide leaves `mpp` unset for generic
    TIFFs); inch resolutions of 1200 dpi or less are ignored, as are non-positive or non-finite values.
    """
    mpp = None
    if reader == "openslide":
        try:
            mpp = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]))
        except (KeyError, ValueError):
            mpp = _resolution_mpp(
                props.get("tiff.XResolution"), props.get("tiff.YResolution"), props.get("tiff.ResolutionUnit")
            )
    elif props.get(f"{reader}.mpp-x") is not None and props.get(f"{reader}.mpp-y") is not None:
        mpp = (float(props[f"{reader}.mpp-x"]), float(props[f"{reader}.mpp-y"]))
    if mpp is not None and _is_default_dpi(props.get("tiff.ResolutionUnit"), props.get("tiff.XResolution"), mpp):
        mpp = None
    return _valid_mpp(mpp)
