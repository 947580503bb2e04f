"""What the spatial graph reads from the slides' metadata: slides, technology, spot size and µm per coordinate unit."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from numbers import Real

import numpy as np
import pandas as pd
from anndata import AnnData

from histospace._constants import COL_KEY, LIBRARY_KEY, ROW_KEY
from histospace._spatial._platform import DEFAULT_SPOT_DIAMETER_UM as _DEFAULT_SPOT_DIAMETER_UM
from histospace._spatial._platform import SPOT_DIAMETER_UM as _SPOT_DIAMETER_UM
from histospace._spatial._platform import technology as _platform_technology
from histospace._spatial._uns import library_entry, metadata, scalefactors, uns_libraries, uns_path
from histospace._utils._data import library_labels


def _library_ids(adata: AnnData, lib_of_spot: np.ndarray | None) -> list[str]:
    """Slides present in the data: the slide labels of the spots, else the libraries of `uns['spatial']` in use."""
    if lib_of_spot is not None:
        return [str(x) for x in pd.unique(lib_of_spot)]
    keys = uns_libraries(adata)
    if len(keys) > 1 and LIBRARY_KEY in adata.obs:  # e.g. one slide subset from a multi-slide AnnData
        present = [str(x) for x in pd.unique(library_labels(adata, LIBRARY_KEY))]
        if len(present) == 1 and present[0] in keys:
            return present
    return keys


def _technology(adata: AnnData, lib: str) -> str | None:
    """Technology of a slide from its metadata (`'visium'`, `'st'`, another string, or `None` when unknown)."""
    return _platform_technology(metadata(adata, lib))


def _is_hex_grid(adata: AnnData) -> bool:
    """Visium array coordinates: integer `array_row`/`array_col` whose sum is always even (hexagonal packing)."""
    if ROW_KEY not in adata.obs or COL_KEY not in adata.obs:
        return False
    try:
        r = np.asarray(adata.obs[ROW_KEY], dtype=np.float64)
        c = np.asarray(adata.obs[COL_KEY], dtype=np.float64)
    except (TypeError, ValueError):
        return False
    if not (np.isfinite(r).all() and np.isfinite(c).all()) or r.size == 0:
        return False
    if not (np.all(r == np.round(r)) and np.all(c == np.round(c))):
        return False
    return bool(np.all((r + c) % 2 == 0)) and np.unique(r).size > 1


def _spot_diameter_um(adata: AnnData, lib: str, spot_diameter_um: float | None, inferred: str | None = None) -> float:
    """µm per spot diameter: argument, else metadata, else the technology, else Visium (with a log warning)."""
    meta = metadata(adata, lib)
    from_meta = meta.get("spot_diameter_um")
    if from_meta is not None:
        from_meta = float(from_meta)
    if spot_diameter_um is not None:
        if from_meta is not None and not np.isclose(from_meta, spot_diameter_um):
            msg = (
                f"`spot_diameter_um={spot_diameter_um}` differs from "
                f"`{uns_path(lib, 'metadata', 'spot_diameter_um')}` = {from_meta}; using the argument."
            )
            warnings.warn(msg, UserWarning, stacklevel=4)
        return float(spot_diameter_um)
    if from_meta is not None:
        return from_meta
    tech = _technology(adata, lib) or inferred
    if tech in _SPOT_DIAMETER_UM:
        return _SPOT_DIAMETER_UM[tech]
    if tech is not None:
        msg = (
            f"The spot size of technology {tech!r} (library {lib!r}) is not known, so `radius_um` cannot be converted "
            "to pixels. Pass `spot_diameter_um=` (the spot diameter in µm), `microns_per_unit=` (µm per coordinate "
            "unit) or `radius=` in full-resolution pixels."
        )
        raise ValueError(msg)
    warnings.warn(
        f"library {lib!r}: no technology or `spot_diameter_um` in `{uns_path(lib, 'metadata')}`; "
        f"assuming Visium spots of {_DEFAULT_SPOT_DIAMETER_UM:g} µm. Pass `spot_diameter_um=` otherwise.",
        UserWarning,
        stacklevel=4,
    )
    return _DEFAULT_SPOT_DIAMETER_UM


def _px_per_um(
    adata: AnnData, lib: str, spot_diameter_um: float | None, inferred: str | None = None
) -> tuple[float, float | None]:
    """Return (pixels per µm, spot diameter in µm or `None`) of slide `lib`.

    Space Ranger's `scalefactors['microns_per_pixel']` (Visium HD) is used when present and no `spot_diameter_um`
    is given; else the spot diameter in pixels and in µm.
    """
    sf = scalefactors(adata, lib)
    mpp = sf.get("microns_per_pixel")
    if (
        spot_diameter_um is None
        and isinstance(mpp, Real)
        and not isinstance(mpp, bool)
        and np.isfinite(mpp)
        and mpp > 0
    ):
        return 1.0 / float(mpp), None
    d_px = sf.get("spot_diameter_fullres")
    if d_px is None:
        msg = (
            f"`{uns_path(lib, 'scalefactors', 'spot_diameter_fullres')}` not found, so `radius_um` cannot "
            "be converted to pixels. Add the scale factors (as `scanpy.read_visium` does), pass `microns_per_unit=` "
            "or pass `radius=` in full-resolution pixels."
        )
        raise KeyError(msg)
    d_px = float(d_px)
    if not np.isfinite(d_px) or d_px <= 0:
        msg = f"`{uns_path(lib, 'scalefactors', 'spot_diameter_fullres')}` is {d_px}; expected > 0."
        raise ValueError(msg)
    d_um = _spot_diameter_um(adata, lib, spot_diameter_um, inferred)
    return d_px / d_um, d_um


def _radius_units(
    adata: AnnData,
    libs: list[str],
    lib_of_spot: np.ndarray | None,
    *,
    library_key: str | None,
    radius_um: float | None,
    radius: float | None,
    microns_per_unit: float | Mapping[str, float] | None,
    spot_diameter_um: float | None,
    technology: str | None,
) -> tuple[dict[str, float], dict[str, float], np.ndarray | None, float | None]:
    """Coordinate units per µm of each slide, for `radius_um`: from `microns_per_unit`, else the scale factors.

    Returns `(units per µm per slide, spot diameter in µm per slide where it was used, per-spot units per µm when the
    slides differ (else `None`), radius in coordinate units when it is one for all slides)`; all empty or `None`
    without `radius_um` (the radius is then `radius`).
    """
    px_per_um: dict[str, float] = {}
    d_um: dict[str, float] = {}
    scale_rows = None
    radius_px: float | None = float(radius) if radius is not None else None
    if radius_um is not None:
        if isinstance(microns_per_unit, Mapping):
            if lib_of_spot is None:
                msg = (
                    "`microns_per_unit` is a mapping of slides, but there is no slide column: pass `library_key=` "
                    "(the obs column whose values are its keys) or one number."
                )
                raise ValueError(msg)
            missing = [lib for lib in libs if lib not in microns_per_unit]
            if missing:
                msg = f"`microns_per_unit` has no value for slide(s) {missing} of `adata.obs[{library_key!r}]`."
                raise KeyError(msg)
            px_per_um = {lib: 1.0 / microns_per_unit[lib] for lib in libs}
        elif microns_per_unit is not None:
            px_per_um = {lib: 1.0 / microns_per_unit for lib in libs} or {"": 1.0 / microns_per_unit}
        else:
            if not libs:
                msg = (
                    f"`{uns_path()}` not found, so `radius_um` cannot be converted to pixels. Pass "
                    "`microns_per_unit=` (µm per coordinate unit), add "
                    f"`{uns_path(obj='')}[library_id]['scalefactors']['spot_diameter_fullres']` or pass `radius=` in "
                    "coordinate units."
                )
                raise KeyError(msg)
            missing = [lib for lib in libs if not library_entry(adata, lib)]
            if missing:
                msg = (
                    f"`{uns_path()}` has no entry for slide(s) {missing} of `adata.obs[{library_key!r}]`, so "
                    "`radius_um` cannot be converted to pixels. Add their scale factors, pass `microns_per_unit=` or "
                    "pass `radius=` in pixels."
                )
                raise KeyError(msg)
            conv = {lib: _px_per_um(adata, lib, spot_diameter_um, technology) for lib in libs}
            px_per_um = {lib: c[0] for lib, c in conv.items()}
            d_um = {lib: c[1] for lib, c in conv.items() if c[1] is not None}
        factors = np.array(list(px_per_um.values()))
        if np.allclose(factors, factors[0], rtol=1e-9, atol=0):
            radius_px = float(radius_um * factors[0])
        elif library_key is None:
            msg = (
                f"The libraries of `{uns_path()}` have different pixel sizes ({px_per_um} px/µm) and no "
                "`library_key` says which spot belongs to which; pass `library_key=`."
            )
            raise ValueError(msg)
        else:
            # different pixel sizes per slide: build in µm, then convert the distances back to each slide's pixels
            scale_rows = np.array([px_per_um[lib] for lib in lib_of_spot])
    return px_per_um, d_um, scale_rows, radius_px
