"""Square bins: their integer grid indices, how they are recognised, and the grid's geometry (shared by pp and pl).

Square bins (Visium HD from :func:`spatialdata_io.visium_hd`, Stereo-seq bins from :func:`histospace.io.read_gem`,
:func:`histospace.io.read_stereopy`, :func:`histospace.io.rebin`) tile the tissue: each carries its integer row and
column index on a square grid in `obs['array_row']`, `obs['array_col']`, and its centre in `obsm['spatial']`.
Spot arrays also have such indices (Visium: hexagonal, legacy ST: square with gaps between spots), so the indices
alone do not tell bins apart; :func:`bins_evidence` names what does.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real

import numpy as np
from anndata import AnnData

from histospace._constants import POSITION_KEYS
from histospace._spatial._platform import BIN_TECHNOLOGIES, is_visium_hd_barcode
from histospace._spatial._uns import metadata, scalefactors, uns_libraries

ROW_KEY, COL_KEY = POSITION_KEYS

__all__ = ["BIN_TECHNOLOGIES", "MAX_SPOT_ARRAY", "bins_evidence", "grid_indices", "lattice_fit", "lattice_pitch"]

#: more grid positions than any spot array has (Visium 6.5 mm: 4,992 spots; legacy ST: 1,007), so these are bins
MAX_SPOT_ARRAY = 5000


def grid_indices(adata: AnnData) -> tuple[np.ndarray, np.ndarray] | None:
    """Integer `(row, col)` of every spot on a square grid, or `None`.

    `None` when `obs['array_row']`/`obs['array_col']` are absent, not whole numbers, not finite, or hexagonal
    (Visium spots: `row + col` always even, or always odd in a crop). Each axis is divided by the greatest common step of its values, so
    grids numbered in steps of the bin size (e.g. DNB corners of Stereo-seq bins) become unit steps. Indices are
    shifted to start at 0 and returned as `int64`.
    """
    if ROW_KEY not in adata.obs or COL_KEY not in adata.obs or adata.n_obs == 0:
        return None
    try:
        r = np.asarray(adata.obs[ROW_KEY], dtype=np.float64)
        c = np.asarray(adata.obs[COL_KEY], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(r).all() and np.isfinite(c).all()):
        return None
    if not (np.array_equal(r, np.round(r)) and np.array_equal(c, np.round(c))):
        return None
    out = []
    for v in (r.astype(np.int64), c.astype(np.int64)):
        v = v - v.min()
        u = np.unique(v)
        step = int(np.gcd.reduce(np.diff(u))) if u.size > 1 else 1
        out.append(v // step if step > 1 else v)
    r, c = out
    parity = (r + c) % 2
    if np.unique(r).size > 1 and bool(np.all(parity == parity[0])):  # hexagonal (Visium) array: one parity
        return None
    return r, c


def _technologies(adata: AnnData) -> set[str]:
    techs = set()
    for lib in uns_libraries(adata):
        tech = metadata(adata, lib).get("technology")
        if isinstance(tech, str) and tech:
            techs.add(tech.lower())
    return techs


def lattice_fit(rows: np.ndarray, cols: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares affine map from `(col, row)` to the centres `xy`: the `(3, 2)` matrix and the RMS residual."""
    design = np.column_stack([cols.astype(np.float64), rows.astype(np.float64), np.ones(rows.size)])
    coef, *_ = np.linalg.lstsq(design, np.asarray(xy, dtype=np.float64)[:, :2], rcond=None)
    resid = np.asarray(xy, dtype=np.float64)[:, :2] - design @ coef
    return coef, float(np.sqrt(np.mean(np.sum(resid**2, axis=1))))


def lattice_pitch(rows: np.ndarray, cols: np.ndarray, xy: np.ndarray) -> float | None:
    """Centre-to-centre distance of neighbouring bins in the units of `xy` (`sqrt |det|` of the fitted map).

    `None` when the indices do not span two dimensions or do not describe the centres (RMS residual above a quarter
    of the pitch).
    """
    if rows.size < 3 or np.unique(rows).size < 2 or np.unique(cols).size < 2:
        return None
    coef, rms = lattice_fit(rows, cols, xy)
    det = abs(float(np.linalg.det(coef[:2])))
    if not np.isfinite(det) or det <= 0:
        return None
    pitch = float(np.sqrt(det))
    return pitch if rms <= 0.25 * pitch else None


def bins_evidence(
    adata: AnnData,
    idx: tuple[np.ndarray, np.ndarray] | None = None,
    xy: np.ndarray | None = None,
    *,
    diameter: float | None = None,
):
    """Why the spots of `adata` are square bins (a short phrase), or `None` when they are not.

    Square grid indices (:func:`grid_indices`) plus one of: a bin technology in
    `uns['spatial'][library]['metadata']['technology']` (Visium HD, Stereo-seq); the `uns` entries of the histospace
    bin readers (`'gem'`, `'rebin'`, stereopy's `'bin_type' == 'bins'`); Space Ranger's Visium HD barcodes; a spot
    diameter (`scalefactors['spot_diameter_fullres']`) equal to the grid pitch (squares that tile the tissue); or
    more than 5,000 grid positions (more than any spot array).

    `diameter`: the spot diameter in the units of `xy` when it is known there (a SpatialData's shapes, whose
    coordinate system need not be in full-resolution pixels); it replaces `spot_diameter_fullres` in the comparison.
    """
    if idx is None:
        idx = grid_indices(adata)
    if idx is None:
        return None
    techs = _technologies(adata) & BIN_TECHNOLOGIES
    if techs:
        return f"technology {sorted(techs)[0]!r}"
    for key, what in (("gem", "hs.io.read_gem"), ("rebin", "hs.io.rebin")):
        if isinstance(adata.uns.get(key), Mapping):
            return f"`uns[{key!r}]` of {what}"
    if str(adata.uns.get("bin_type", "")) == "bins":
        return "stereopy's `uns['bin_type'] == 'bins'`"
    if adata.n_obs and is_visium_hd_barcode(adata.obs_names[0]):
        return "Visium HD barcodes"
    if adata.n_obs > MAX_SPOT_ARRAY:
        return f"{adata.n_obs} grid positions (more than any spot array)"
    diam = [float(diameter)] if diameter is not None and np.isfinite(diameter) and diameter > 0 else []
    for lib in uns_libraries(adata) if not diam else ():
        d = scalefactors(adata, lib).get("spot_diameter_fullres")
        if isinstance(d, Real) and not isinstance(d, bool) and d > 0:
            diam.append(float(d))
    if diam and xy is not None:
        pitch = lattice_pitch(idx[0], idx[1], xy)
        if pitch is not None and all(abs(d / pitch - 1) < 0.1 for d in diam):
            return "spot diameter equal to the grid pitch (squares that tile)"
    return None
