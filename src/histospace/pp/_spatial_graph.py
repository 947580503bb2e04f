"""Spatial neighbour graph: squidpy's builders for spot arrays, sparse index arithmetic for square bins.

On top of squidpy: a radius in µm, one graph per slide, checks, and square bins (Visium HD, Stereo-seq) at 10^6
bins: their 4- or 8-neighbour grid comes from the integer bin indices (hashing, shifts and `searchsorted`) and their
radius graph from a k-d tree, with no dense matrix and no Python loop over bins.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from numbers import Real
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

if TYPE_CHECKING:
    from spatialdata import SpatialData
from scanpy import logging as logg

from histospace._utils import check_number, check_obsm, doc_params, version_string
from histospace._utils._data import check_key_added, library_labels
from histospace._utils._lattice import bins_evidence, grid_indices
from histospace._utils._sdata import TableContext, apply_affine, as_table, table_output

# Spot diameter (µm) and first-ring grid neighbours per technology (centre-to-centre: Visium 100 µm, legacy ST 200 µm).
_SPOT_DIAMETER_UM = {"visium": 55.0, "st": 100.0}
_GRID_NEIGHS = {"visium": 6, "st": 4}
_DEFAULT_SPOT_DIAMETER_UM = 55.0  # Visium, when nothing says otherwise
_BIN_NEIGHS = (4, 8)
_DEFAULT_BIN_NEIGHS = 8  # queen's moves: nearly isotropic, degree close to Visium's 6, few bins cut off by holes


def _grid_offsets(n_neighs: int, n_rings: int) -> np.ndarray:
    """Half of the `(d_row, d_col)` shifts to the neighbours of a bin (the other half is their negation).

    Ring `k` holds the bins at lattice distance `k`: Manhattan distance for 4 neighbours (a diamond), Chebyshev
    distance for 8 (a square). Counted on the lattice, so a missing bin does not cut the rings behind it.
    """
    k = int(n_rings)
    dr, dc = np.meshgrid(np.arange(-k, k + 1), np.arange(-k, k + 1), indexing="ij")
    dr, dc = dr.ravel(), dc.ravel()
    ring = np.abs(dr) + np.abs(dc) if n_neighs == 4 else np.maximum(np.abs(dr), np.abs(dc))
    half = (dr > 0) | ((dr == 0) & (dc > 0))
    keep = half & (ring >= 1) & (ring <= k)
    return np.column_stack([dr[keep], dc[keep]])


def _lattice_keys(rows: np.ndarray, cols: np.ndarray, lib_codes: np.ndarray) -> tuple[np.ndarray, int, int]:
    """One int64 key per bin from (slide, row, col), and the grid's height and width."""
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    n_libs = int(lib_codes.max()) + 1
    if float(n_libs) * h * w >= 2.0**62:
        msg = f"The bin grid is too large to index ({n_libs} slide(s) of {h} x {w} bins)."
        raise ValueError(msg)
    return (lib_codes.astype(np.int64) * h + rows) * w + cols, h, w


def _symmetric(i: np.ndarray, j: np.ndarray, xy: np.ndarray, n: int, set_diag: bool) -> tuple[sp.csr_matrix, ...]:
    """Connectivities and Euclidean distances (float32 CSR, sorted indices) from each undirected edge `i < j` once."""
    d = np.hypot(xy[i, 0] - xy[j, 0], xy[i, 1] - xy[j, 1]).astype(np.float32)
    rows, cols = np.concatenate([i, j]), np.concatenate([j, i])
    dist = sp.csr_matrix((np.concatenate([d, d]), (rows, cols)), shape=(n, n), dtype=np.float32)
    del rows, cols, d
    dist.sum_duplicates()
    dist.sort_indices()
    conn = sp.csr_matrix((np.ones(dist.nnz, dtype=np.float32), dist.indices, dist.indptr), shape=(n, n))
    if set_diag:
        conn = sp.csr_matrix(conn + sp.eye(n, dtype=np.float32, format="csr"))
        conn.sort_indices()
    return conn, dist


def _bin_grid_graph(
    rows: np.ndarray,
    cols: np.ndarray,
    lib_codes: np.ndarray,
    xy: np.ndarray,
    *,
    order: np.ndarray,
    sorted_keys: np.ndarray,
    shape: tuple[int, int],
    n_neighs: int,
    n_rings: int,
    set_diag: bool,
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """The 4- or 8-neighbour graph of square bins from their indices (bins of different slides never meet).

    `sorted_keys` are the unique keys of :func:`_lattice_keys` in increasing order, `order` the bins they belong to,
    and `shape` the grid's height and width. Each neighbour direction is one shift of the indices and one
    `searchsorted` of the shifted keys.
    """
    n = rows.size
    h, w = shape
    idx_dtype = np.int32 if n < 2**31 else np.int64
    src_all, dst_all = [], []
    for dr, dc in _grid_offsets(n_neighs, n_rings):
        r2, c2 = rows + dr, cols + dc
        src = np.flatnonzero((r2 >= 0) & (r2 < h) & (c2 >= 0) & (c2 < w))
        k2 = (lib_codes[src].astype(np.int64) * h + r2[src]) * w + c2[src]
        del r2, c2
        pos = np.minimum(np.searchsorted(sorted_keys, k2), n - 1)
        hit = sorted_keys[pos] == k2
        src_all.append(src[hit].astype(idx_dtype))
        dst_all.append(order[pos[hit]].astype(idx_dtype))
    i, j = np.concatenate(src_all), np.concatenate(dst_all)
    del src_all, dst_all
    return _symmetric(i, j, xy, n, set_diag)


def _radius_graph(
    xy: np.ndarray, lib_codes: np.ndarray, radius: np.ndarray, *, set_diag: bool
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Every pair of spots of one slide within `radius[slide]` (inclusive), found with a k-d tree per slide."""
    from scipy.spatial import cKDTree

    n = xy.shape[0]
    idx_dtype = np.int32 if n < 2**31 else np.int64
    src_all, dst_all = [], []
    for code in np.unique(lib_codes):
        members = np.flatnonzero(lib_codes == code)
        pairs = cKDTree(xy[members]).query_pairs(float(radius[code]), output_type="ndarray")
        src_all.append(members[pairs[:, 0]].astype(idx_dtype))
        dst_all.append(members[pairs[:, 1]].astype(idx_dtype))
        del pairs
    i, j = np.concatenate(src_all), np.concatenate(dst_all)
    del src_all, dst_all
    return _symmetric(i, j, xy, n, set_diag)


def _library_ids(adata: AnnData, lib_of_spot: np.ndarray | None) -> list[str]:
    """Slides present in the data: the slide labels of the spots, else the libraries of `uns['spatial']` in use."""
    if lib_of_spot is not None:
        return [str(x) for x in pd.unique(lib_of_spot)]
    spatial = adata.uns.get("spatial")
    keys = [str(k) for k in spatial] if isinstance(spatial, Mapping) else []
    if len(keys) > 1 and "library_id" in adata.obs:  # e.g. one slide subset from a multi-slide AnnData
        present = [str(x) for x in pd.unique(library_labels(adata, "library_id"))]
        if len(present) == 1 and present[0] in keys:
            return present
    return keys


def _lib_uns(adata: AnnData, lib: str) -> Mapping:
    spatial = adata.uns.get("spatial")
    if isinstance(spatial, Mapping) and isinstance(spatial.get(lib), Mapping):
        return spatial[lib]
    return {}


def _technology(adata: AnnData, lib: str) -> str | None:
    """Technology of a slide from its metadata (`'visium'`, `'st'`, another string, or `None` when unknown)."""
    meta = _lib_uns(adata, lib).get("metadata", {}) or {}
    tech = meta.get("technology")
    if isinstance(tech, str) and tech:
        return tech.lower()
    if "chemistry_description" in meta:  # written by scanpy.read_visium / squidpy.read.visium
        return "visium"
    um = meta.get("spot_diameter_um")
    if isinstance(um, Real) and not isinstance(um, bool):
        for name, d in _SPOT_DIAMETER_UM.items():
            if np.isclose(float(um), d):
                return name
    return None


def _is_hex_grid(adata: AnnData) -> bool:
    """Visium array coordinates: integer `array_row`/`array_col` whose sum is always even (hexagonal packing)."""
    if "array_row" not in adata.obs or "array_col" not in adata.obs:
        return False
    try:
        r = np.asarray(adata.obs["array_row"], dtype=np.float64)
        c = np.asarray(adata.obs["array_col"], dtype=np.float64)
    except (TypeError, ValueError):
        return False
    if not (np.isfinite(r).all() and np.isfinite(c).all()) or r.size == 0:
        return False
    if not (np.all(r == np.round(r)) and np.all(c == np.round(c))):
        return False
    return bool(np.all((r + c) % 2 == 0)) and np.unique(r).size > 1


def _spot_diameter_um(adata: AnnData, lib: str, spot_diameter_um: float | None, inferred: str | None = None) -> float:
    """µm per spot diameter: argument, else metadata, else the technology, else Visium (with a log warning)."""
    meta = _lib_uns(adata, lib).get("metadata", {}) or {}
    from_meta = meta.get("spot_diameter_um")
    if from_meta is not None:
        from_meta = float(from_meta)
    if spot_diameter_um is not None:
        if from_meta is not None and not np.isclose(from_meta, spot_diameter_um):
            msg = (
                f"`spot_diameter_um={spot_diameter_um}` differs from "
                f"`adata.uns['spatial'][{lib!r}]['metadata']['spot_diameter_um']` = {from_meta}; using the argument."
            )
            warnings.warn(msg, UserWarning, stacklevel=3)
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
        f"library {lib!r}: no technology or `spot_diameter_um` in `adata.uns['spatial'][{lib!r}]['metadata']`; "
        f"assuming Visium spots of {_DEFAULT_SPOT_DIAMETER_UM:g} µm. Pass `spot_diameter_um=` otherwise.",
        UserWarning,
        stacklevel=3,
    )
    return _DEFAULT_SPOT_DIAMETER_UM


def _px_per_um(
    adata: AnnData, lib: str, spot_diameter_um: float | None, inferred: str | None = None
) -> tuple[float, float | None]:
    """Return (pixels per µm, spot diameter in µm or `None`) of slide `lib`.

    Space Ranger's `scalefactors['microns_per_pixel']` (Visium HD) is used when present and no `spot_diameter_um`
    is given; else the spot diameter in pixels and in µm.
    """
    sf = _lib_uns(adata, lib).get("scalefactors", {}) or {}
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
            f"`adata.uns['spatial'][{lib!r}]['scalefactors']['spot_diameter_fullres']` not found, so `radius_um` cannot "
            "be converted to pixels. Add the scale factors (as `scanpy.read_visium` does), pass `microns_per_unit=` "
            "or pass `radius=` in full-resolution pixels."
        )
        raise KeyError(msg)
    d_px = float(d_px)
    if not np.isfinite(d_px) or d_px <= 0:
        msg = f"`adata.uns['spatial'][{lib!r}]['scalefactors']['spot_diameter_fullres']` is {d_px}; expected > 0."
        raise ValueError(msg)
    d_um = _spot_diameter_um(adata, lib, spot_diameter_um, inferred)
    return d_px / d_um, d_um


@contextmanager
def _quiet_squidpy():
    """Silence squidpy's own log lines (they name the temporary AnnData); ours say what was written."""
    import logging

    import scanpy as sc

    sd_logger = logging.getLogger("spatialdata._logging")
    level = sd_logger.level
    sd_logger.setLevel(logging.WARNING)
    try:
        with sc.settings.verbosity.override("warning"):
            yield
    finally:
        sd_logger.setLevel(level)


@doc_params()
def spatial_graph(
    adata: AnnData | SpatialData,
    *,
    table_key: str | None = None,
    shapes_key: str | None = None,
    coordinate_system: str | None = None,
    spatial_key: str = "spatial",
    library_key: str | None = None,
    coord_type: Literal["grid", "generic"] | None = None,
    n_neighs: int | None = None,
    radius_um: float | None = None,
    radius: float | None = None,
    spot_diameter_um: float | None = None,
    microns_per_unit: float | Mapping[str, float] | None = None,
    bins: bool | None = None,
    n_rings: int = 1,
    delaunay: bool = False,
    set_diag: bool = False,
    key_added: str = "spatial",
    copy: bool = False,
) -> AnnData | SpatialData | None:
    """Build the spatial neighbour graph of spots or square bins, one graph per slide, with a radius in µm.

    Spot arrays (Visium, legacy ST, any point cloud) go to squidpy's own builders
    (:func:`squidpy.gr.spatial_neighbors_grid`, :func:`~squidpy.gr.spatial_neighbors_knn`,
    :func:`~squidpy.gr.spatial_neighbors_radius`, :func:`~squidpy.gr.spatial_neighbors_delaunay`, the modes of
    :func:`squidpy.gr.spatial_neighbors`). Square bins (Visium HD, Stereo-seq; see `bins`) get a grid graph built from
    their integer indices `obs['array_row']`/`obs['array_col']` by sparse index arithmetic (one hash per bin, one
    shift and `searchsorted` per neighbour direction), or a radius graph from a k-d tree: no dense matrix and no loop
    over bins, so 10^6 bins take seconds. Both are written in squidpy's layout, so a graph made by squidpy directly
    works everywhere this one does. On top of squidpy it

    - converts a radius in µm to coordinate units through `microns_per_unit`, else through
      `uns['spatial'][library_id]['scalefactors']` (`microns_per_pixel`, or `spot_diameter_fullres` and the spot
      diameter of the technology);
    - builds one graph per slide (no edge between slides) when `library_key` is given, or when
      `adata.obs['library_id']` holds several slides;
    - picks the grid of the technology by default: Visium hexagonal grid (`coord_type='grid'`, `n_neighs=6`),
      legacy ST square grid (`n_neighs=4`), square bins (`n_neighs=8`), squidpy's generic 6-nearest-neighbour graph
      otherwise;
    - checks the result (sparse CSR, mean degree logged, a warning naming the spots without neighbours).

    The default for bins is the 8-neighbour grid: on squares that tile the tissue the 8 bins around a bin all touch
    it, the graph is close to isotropic (the 4-neighbour graph measures Manhattan distance and spreads along the
    axes), its degree is near the 6 of the Visium grid that the downstream methods were tuned on, and a bin next to a
    hole or a diagonal gap keeps more neighbours. Pass `n_neighs=4` for the sparser graph.

    Parameters
    ----------
    adata
        {adata}
        With a SpatialData, the centres are those of the shapes the table annotates, in `coordinate_system`; squares
        are taken as bins and the µm per coordinate unit is :func:`histospace.io.microns_per_unit`.
    table_key
        {table_key}
    shapes_key
        With a SpatialData: the shapes element whose centres are used (`None`: the one the table annotates).
    coordinate_system
        With a SpatialData: the coordinate system of the centres (`None`: the shapes' only one, or `'global'`).
    spatial_key
        Key in `adata.obsm` with the spot or bin centres (full-resolution image pixels, or the coordinate units of
        the bins' shapes: e.g. DNB for Stereo-seq).
    library_key
        Column of `adata.obs` telling the slides apart; each slide gets its own graph. `None` uses
        `'library_id'` when that column holds more than one slide, else treats all spots as one slide.
    coord_type
        `'grid'` (array of spots: Visium, legacy ST; square bins) or `'generic'` (k nearest neighbours, radius or
        Delaunay). `None` picks `'generic'` when `radius_um`, `radius` or `delaunay` is given, else `'grid'` for
        square bins, Visium (known from `uns['spatial'][library_id]['metadata']['technology']`, scanpy's Visium
        metadata or hexagonal `obs['array_row']`/`obs['array_col']`) and legacy ST, else `'generic'`.
    n_neighs
        Grid: neighbouring spots of the first ring (`None`: 6 for Visium, 4 for legacy ST, 8 for square bins, which
        take 4 or 8). Generic: number of nearest neighbours (`None`: 6). Not used with a radius or with
        `delaunay=True` in generic mode.
    radius_um
        Connect spots closer than this many µm (generic mode). Converted to coordinate units per slide with
        `microns_per_unit`, else with the scale factors (see `spot_diameter_um`).
    radius
        Connect spots closer than this many coordinate units (full-resolution pixels for Visium) (generic mode). Give
        `radius_um` or `radius`.
    spot_diameter_um
        Spot diameter in µm, used to convert `radius_um` with `scalefactors['spot_diameter_fullres']`. `None` reads
        `uns['spatial'][library_id]['scalefactors']['microns_per_pixel']` (Visium HD), else
        `uns['spatial'][library_id]['metadata']['spot_diameter_um']`, else takes the technology's (Visium 55 µm,
        legacy ST 100 µm), else assumes Visium.
    microns_per_unit
        Micrometres per unit of `obsm[spatial_key]` (e.g. `hs.io.microns_per_unit(sdata, coordinate_system)`: 0.5
        for Stereo-seq DNB, about 0.27 for Visium HD full-resolution pixels): one number for all slides, or a
        mapping from each slide of `library_key` to its own. Used to convert `radius_um` (instead of
        `spot_diameter_um` and the scale factors) and recorded in the parameters.
    bins
        Whether the spots are square bins that tile the tissue. `None` detects them: integer grid indices in
        `obs['array_row']`/`obs['array_col']` on a square lattice (any common step) plus one of a bin technology in
        `uns['spatial'][library_id]['metadata']['technology']` (`'visium_hd'`, `'stereo-seq'`, `'bins'`), the `uns`
        entries of `hs.io.read_gem`/`hs.io.rebin`/stereopy bins, Space Ranger's Visium HD barcodes, a
        `spot_diameter_fullres` equal to the grid pitch, or more than 5,000 grid positions. `True` requires the
        square grid indices.
    n_rings
        Grid only: number of rings of neighbours (squidpy's `n_rings`). For bins, ring `k` holds the bins at lattice
        distance `k` (Manhattan with 4 neighbours, Chebyshev with 8), counted on the lattice so holes do not cut it.
    delaunay
        Generic: Delaunay triangulation graph (a µm/pixel radius then prunes longer edges). Grid: derive the first
        ring from a Delaunay triangulation (squidpy's grid `delaunay`; not for bins).
    set_diag
        Put 1 on the diagonal of the connectivities (each spot its own neighbour).
    key_added
        Prefix of the keys written: `obsp[key_added + '_connectivities']`, `obsp[key_added + '_distances']`,
        `uns[key_added + '_neighbors']` (squidpy's naming).
    copy
        {copy}

    Returns
    -------
    Returns `None` if `copy=False`, else returns an `AnnData` object. Sets the following fields:

    `adata.obsp['spatial_connectivities' | key_added + '_connectivities']` : :class:`scipy.sparse.csr_matrix` (dtype `float32`)
        Binary adjacency of shape `(n_obs, n_obs)`, no edges between slides. Symmetric for grid, radius and
        Delaunay graphs; the k-nearest-neighbour graph is directed, as in squidpy (row `i` holds the `n_neighs`
        neighbours of spot `i`).
    `adata.obsp['spatial_distances' | key_added + '_distances']` : :class:`scipy.sparse.csr_matrix` (dtype `float32`)
        Euclidean distance in the units of `obsm[spatial_key]` (generic graphs and every graph of bins) or ring
        number (squidpy's grid of spots) of each edge.
    `adata.uns['spatial_neighbors' | key_added + '_neighbors']` : :class:`dict`
        `connectivities_key`, `distances_key` and `params` (squidpy's parameters plus `spatial_key`,
        `library_key`, `radius` in coordinate units, `radius_um`, `spot_diameter_um`, `microns_per_unit`,
        `technology`, `bins`, `set_diag`, `mean_degree`, `n_isolated` and the histospace `version`).

    Examples
    --------
    >>> import histospace as hs
    >>> adata = hs.datasets.dlpfc("151673")
    >>> hs.pp.spatial_graph(adata)  # Visium: hexagonal grid, 6 neighbours
    >>> hs.pp.spatial_graph(adata, radius_um=150, key_added="r150")  # every spot within 150 µm
    >>> bins = sdata.tables["square_008um"]  # Visium HD 8 µm bins (spatialdata-io)
    >>> hs.pp.spatial_graph(bins)  # 8-neighbour grid of the bins
    >>> hs.pp.spatial_graph(bins, radius_um=20, microns_per_unit=hs.io.microns_per_unit(sdata, "global"))
    """
    # ---- check everything before any work; nothing is written to `adata` until the end ----
    check_key_added(key_added)
    adata, ctx = as_table(adata, table_key)
    if ctx is None:
        coords = check_obsm(
            adata,
            spatial_key,
            hint="Store the spot centres (full-resolution pixels, x then y) there, e.g. with `scanpy.read_visium`.",
        ).astype(np.float64)
    else:  # the centres of the annotated shapes in the coordinate system; µm and bins from the elements
        coords, cs_units, square = _sdata_centres(ctx, shapes_key, coordinate_system)
        spatial_key = f"{ctx.table_key}: centres of the annotated shapes in {cs_units[0]!r}"
        if microns_per_unit is None:
            microns_per_unit = cs_units[1]
        if bins is None and square:
            bins = True
    if coords.shape[1] < 2:
        msg = f"`adata.obsm[{spatial_key!r}]` has {coords.shape[1]} column(s); expected (x, y) coordinates."
        raise ValueError(msg)
    if adata.n_obs < 2:
        msg = f"`adata` has {adata.n_obs} spot(s); a spatial graph needs at least 2."
        raise ValueError(msg)
    if coord_type is not None and coord_type not in ("grid", "generic"):
        msg = f"`coord_type` must be 'grid', 'generic' or None, got {coord_type!r}."
        raise ValueError(msg)
    if bins is not None and not isinstance(bins, bool | np.bool_):
        msg = f"`bins` must be True, False or None, got {type(bins).__name__} {bins!r}."
        raise TypeError(msg)
    bins = None if bins is None else bool(bins)
    n_neighs = check_number(n_neighs, "n_neighs", integer=True, low=1, allow_none=True)
    n_rings = check_number(n_rings, "n_rings", integer=True, low=1)
    radius_um = check_number(radius_um, "radius_um", low=0, low_inclusive=False, allow_none=True)
    radius = check_number(radius, "radius", low=0, low_inclusive=False, allow_none=True)
    spot_diameter_um = check_number(spot_diameter_um, "spot_diameter_um", low=0, low_inclusive=False, allow_none=True)
    if isinstance(microns_per_unit, Mapping):
        microns_per_unit = {
            str(k): check_number(v, f"microns_per_unit[{k!r}]", low=0, low_inclusive=False)
            for k, v in microns_per_unit.items()
        }
    else:
        microns_per_unit = check_number(
            microns_per_unit, "microns_per_unit", low=0, low_inclusive=False, allow_none=True
        )
    if microns_per_unit is not None and spot_diameter_um is not None:
        msg = (
            "Give either `microns_per_unit` (µm per coordinate unit) or `spot_diameter_um` (with the scale factors' "
            "spot diameter in pixels) to convert `radius_um`, not both."
        )
        raise ValueError(msg)
    if radius is not None and radius_um is not None:
        msg = "Give either `radius_um` (µm) or `radius` (full-resolution pixels), not both."
        raise ValueError(msg)
    has_radius = radius is not None or radius_um is not None
    if coord_type == "grid" and has_radius:
        msg = (
            "`radius`/`radius_um` apply to `coord_type='generic'` only; a grid graph is defined by `n_neighs` and "
            "`n_rings`. Pass `coord_type='generic'` (or leave it None) to connect spots within a radius."
        )
        raise ValueError(msg)
    if has_radius and n_neighs is not None:
        msg = "`n_neighs` is not used with a radius: give either `n_neighs` or `radius_um`/`radius`."
        raise ValueError(msg)
    if int(n_rings) != 1 and (coord_type == "generic" or has_radius):
        msg = "`n_rings` applies to `coord_type='grid'` only."
        raise ValueError(msg)

    if library_key is None and "library_id" in adata.obs and adata.obs["library_id"].nunique(dropna=False) > 1:
        library_key = "library_id"
        logg.info("    building one graph per slide of `adata.obs['library_id']`")
    lib_of_spot = library_labels(adata, library_key, required=True) if library_key is not None else None
    libs = _library_ids(adata, lib_of_spot)
    if library_key is None and len(libs) > 1:
        warnings.warn(
            f"`adata.uns['spatial']` holds {len(libs)} libraries but no `library_key` was given: all spots are treated "
            "as one slide, so edges may join spots of different slides. Pass `library_key=` (the obs column naming "
            "each spot's slide).",
            UserWarning,
            stacklevel=2,
        )

    # square bins: integer indices on a square lattice (and evidence that they tile the tissue)
    idx = grid_indices(adata) if bins is not False else None
    if bins and idx is None:
        msg = (
            "`bins=True` needs the bins' integer grid indices in `adata.obs['array_row']` and `adata.obs['array_col']` "
            "(whole numbers on a square lattice, as spatialdata-io's Visium HD and `hs.io` tables have)."
        )
        raise KeyError(msg) if ("array_row" not in adata.obs or "array_col" not in adata.obs) else ValueError(msg)
    bins_why = ("`bins=True`" if bins else bins_evidence(adata, idx, coords)) if idx is not None else None
    is_bins = bins_why is not None

    # technology and default grid
    techs = {lib: _technology(adata, lib) for lib in libs}
    tech_set = set(techs.values())
    if tech_set <= {None} and not is_bins and _is_hex_grid(adata):
        tech_set = {"visium"}
    technology = tech_set.pop() if len(tech_set) == 1 else None
    if len(set(techs.values())) > 1 and coord_type is None and not has_radius and not delaunay:
        msg = (
            f"The slides come from different technologies ({techs}); pass `coord_type=` and `n_neighs=` explicitly "
            "(or build the graph per technology)."
        )
        raise ValueError(msg)
    if coord_type is None:
        is_grid = (is_bins or technology in _GRID_NEIGHS) and not has_radius and not delaunay
        coord_type = "grid" if is_grid else "generic"
    if coord_type == "grid" and is_bins:
        if delaunay:
            msg = (
                "`delaunay=True` does not apply to the grid of square bins (their indices define the grid); use "
                "`coord_type='generic', delaunay=True` for a Delaunay graph of the bin centres."
            )
            raise ValueError(msg)
        if n_neighs is None:
            n_neighs = _DEFAULT_BIN_NEIGHS
        elif int(n_neighs) not in _BIN_NEIGHS:
            msg = f"Square bins have 4 or 8 neighbours per ring; got `n_neighs={n_neighs}` (detected: {bins_why})."
            raise ValueError(msg)
    if coord_type == "grid" and n_neighs is None:
        n_neighs = _GRID_NEIGHS.get(technology, 6)
    if coord_type == "generic" and int(n_rings) != 1:
        msg = "`n_rings` applies to `coord_type='grid'` only."
        raise ValueError(msg)

    # µm per coordinate unit (for `radius_um`), per slide
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
                    "`adata.uns['spatial']` not found, so `radius_um` cannot be converted to pixels. Pass "
                    "`microns_per_unit=` (µm per coordinate unit), add "
                    "`uns['spatial'][library_id]['scalefactors']['spot_diameter_fullres']` or pass `radius=` in "
                    "coordinate units."
                )
                raise KeyError(msg)
            missing = [lib for lib in libs if not _lib_uns(adata, lib)]
            if missing:
                msg = (
                    f"`adata.uns['spatial']` has no entry for slide(s) {missing} of `adata.obs[{library_key!r}]`, so "
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
                f"The libraries of `adata.uns['spatial']` have different pixel sizes ({px_per_um} px/µm) and no "
                "`library_key` says which spot belongs to which; pass `library_key=`."
            )
            raise ValueError(msg)
        else:
            # different pixel sizes per slide: build in µm, then convert the distances back to each slide's pixels
            scale_rows = np.array([px_per_um[lib] for lib in lib_of_spot])

    if coord_type == "generic" and not (has_radius or delaunay):
        n_neighs = 6 if n_neighs is None else n_neighs
        smallest = int(pd.Series(lib_of_spot).value_counts().min()) if lib_of_spot is not None else adata.n_obs
        if int(n_neighs) >= smallest:
            msg = f"`n_neighs={n_neighs}` must be smaller than the number of spots of every slide ({smallest})."
            raise ValueError(msg)

    n = adata.n_obs
    own_builder = is_bins and (coord_type == "grid" or (has_radius and not delaunay))
    if own_builder:
        if lib_of_spot is not None:
            lib_codes, lib_names = pd.factorize(lib_of_spot)
            lib_codes, lib_names = lib_codes.astype(np.int64), np.asarray(lib_names, dtype=object)
        else:
            lib_codes, lib_names = np.zeros(n, dtype=np.int64), np.array([""], dtype=object)
    if own_builder and coord_type == "grid":
        keys, grid_h, grid_w = _lattice_keys(idx[0], idx[1], lib_codes)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        del keys
        same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if same.size:
            dup = np.unique(np.concatenate([order[same], order[same + 1]]))
            example = ", ".join(repr(str(x)) for x in adata.obs_names[dup[:4]])
            fix = (
                "pass `library_key=` (the obs column naming each bin's slide)"
                if library_key is None
                else "remove the duplicated bins"
            )
            msg = (
                f"{dup.size} bins share their grid position (`obs['array_row']`, `obs['array_col']`) with another bin "
                f"of the same slide (e.g. {example}); {fix}."
            )
            raise ValueError(msg)

    # ---- build ----
    sq_params: dict = {}
    if own_builder:
        if coord_type == "grid":
            start = logg.info(f"building the {n_neighs}-neighbour grid graph of {n} square bins ({bins_why})")
            conn, dist = _bin_grid_graph(
                idx[0],
                idx[1],
                lib_codes,
                coords,
                order=order,
                sorted_keys=sorted_keys,
                shape=(grid_h, grid_w),
                n_neighs=int(n_neighs),
                n_rings=int(n_rings),
                set_diag=bool(set_diag),
            )
            del order, sorted_keys
            sq_params = {"n_neighbors": int(n_neighs), "n_rings": int(n_rings), "delaunay": False}
        else:
            if scale_rows is not None:
                r_lib = np.array([radius_um * px_per_um[str(lib)] for lib in lib_names])
            else:
                r_lib = np.full(lib_names.size, float(radius_px))
            start = logg.info(f"building the radius graph of {n} square bins ({bins_why})")
            conn, dist = _radius_graph(coords, lib_codes, r_lib, set_diag=bool(set_diag))
    else:
        # squidpy on a light AnnData holding only what the builder reads
        from histospace._utils._deps import quiet_import

        sq = quiet_import("squidpy")

        obs = pd.DataFrame(index=pd.RangeIndex(n).astype(str))
        if lib_of_spot is not None:
            obs["_library"] = pd.Categorical(lib_of_spot)
        tmp = AnnData(obs=obs)
        tmp.obsm["spatial"] = coords / scale_rows[:, None] if scale_rows is not None else coords
        common = {"spatial_key": "spatial", "library_key": "_library" if library_key is not None else None}
        common["set_diag"] = bool(set_diag)
        start = logg.info(f"building the spatial graph ({coord_type}) with squidpy")
        with _quiet_squidpy():
            if coord_type == "grid":
                sq.gr.spatial_neighbors_grid(
                    tmp, n_neighs=int(n_neighs), n_rings=int(n_rings), delaunay=bool(delaunay), **common
                )
            elif delaunay:
                r = radius_um if scale_rows is not None else radius_px
                sq.gr.spatial_neighbors_delaunay(tmp, radius=r, **common)
            elif has_radius:
                r = radius_um if scale_rows is not None else radius_px
                sq.gr.spatial_neighbors_radius(tmp, radius=float(r), **common)
            else:
                sq.gr.spatial_neighbors_knn(tmp, n_neighs=int(n_neighs), **common)

        conn = sp.csr_matrix(tmp.obsp["spatial_connectivities"], dtype=np.float32)
        dist = sp.csr_matrix(tmp.obsp["spatial_distances"], dtype=np.float32)
        if scale_rows is not None and coord_type == "generic":
            dist = sp.csr_matrix(sp.diags(scale_rows.astype(np.float32)) @ dist, dtype=np.float32)
        conn.sort_indices()
        dist.sort_indices()
        sq_params = {k: v for k, v in tmp.uns["spatial_neighbors"]["params"].items() if v is not None}
        del tmp

    # ---- checks on the result ----
    if not (sp.issparse(conn) and conn.format == "csr" and conn.shape == (n, n)):  # pragma: no cover - squidpy contract
        msg = "squidpy returned a graph that is not a sparse (n_obs, n_obs) CSR matrix."
        raise RuntimeError(msg)
    if own_builder:  # no explicit zeros; the diagonal is there only with `set_diag`
        degree = np.diff(conn.indptr) - int(bool(set_diag))
    else:
        off_diag = conn.copy()
        off_diag.setdiag(0)
        off_diag.eliminate_zeros()
        degree = np.diff(off_diag.indptr)
        del off_diag
    mean_degree = float(degree.mean())
    n_edges = int(degree.sum())
    isolated = np.flatnonzero(degree == 0)
    logg.info(f"    mean degree {mean_degree:.2f}, {isolated.size} isolated spot(s), {n_edges} edges")
    if isolated.size:
        example = ", ".join(repr(str(x)) for x in adata.obs_names[isolated[:5]])
        what = "bins" if is_bins else "spots"
        if coord_type == "grid" and is_bins:
            fix = "use `n_neighs=8` or `n_rings=2` to bridge small gaps, or a radius (`radius_um=`)"
        elif coord_type == "grid":
            fix = "check `coord_type`/`n_neighs` for this technology, or use `coord_type='generic'` with `radius_um=`"
        elif has_radius or delaunay:
            fix = "use a bigger `radius_um`/`radius`"
        else:
            fix = "use a bigger `n_neighs`"
        msg = (
            f"{isolated.size} of {n} {what} ({100 * isolated.size / n:.2g}%) have no spatial neighbour (e.g. {example}); "
            f"{fix}, or remove off-tissue {what}."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)

    params = dict(sq_params)
    params.update(
        {
            "coord_type": coord_type,
            "spatial_key": spatial_key,
            "bins": bool(is_bins),
            "set_diag": bool(set_diag),
            "mean_degree": mean_degree,
            "n_isolated": int(isolated.size),
        }
    )
    if coord_type == "grid" or not (has_radius or delaunay):
        params["n_neighbors"] = int(n_neighs)
    if library_key is not None:
        params["library_key"] = library_key
    if technology is not None:
        params["technology"] = technology
    if delaunay:
        params["delaunay"] = True
    params.pop("radius", None)
    if radius_um is not None:
        params["radius_um"] = float(radius_um)
        if d_um:
            d_vals = list(d_um.values())
            params["spot_diameter_um"] = float(d_vals[0]) if np.allclose(d_vals, d_vals[0]) else dict(d_um)
        if scale_rows is None:
            params["radius"] = float(radius_px)
        else:
            params["radius"] = {lib: float(radius_um * f) for lib, f in px_per_um.items()}
        mpu = {lib: 1.0 / f for lib, f in px_per_um.items()}
        mpu_vals = list(mpu.values())
        params["microns_per_unit"] = float(mpu_vals[0]) if np.allclose(mpu_vals, mpu_vals[0], rtol=1e-9) else mpu
    elif radius_px is not None:
        params["radius"] = float(radius_px)
    if radius_um is None and microns_per_unit is not None:
        params["microns_per_unit"] = microns_per_unit if isinstance(microns_per_unit, float) else dict(microns_per_unit)
    params["version"] = version_string()

    if ctx is not None:
        params["table_key"] = ctx.table_key
    conns_key, dists_key, uns_key = f"{key_added}_connectivities", f"{key_added}_distances", f"{key_added}_neighbors"
    out = adata.copy() if copy else adata
    out.obsp[conns_key] = conn
    out.obsp[dists_key] = dist
    out.uns[uns_key] = {"connectivities_key": conns_key, "distances_key": dists_key, "params": params}
    logg.info(
        "    finished",
        time=start,
        deep=(
            f"added\n    {conns_key!r} and {dists_key!r}, spatial graph (adata.obsp)\n"
            f"    {uns_key!r}, parameters (adata.uns)"
        ),
    )
    return table_output(ctx, out, copy)


def _sdata_centres(ctx: TableContext, shapes_key: str | None, coordinate_system: str | None):
    """Centres of the shapes the table annotates, in a coordinate system; `((cs, µm per unit), square shapes)`."""
    from histospace.io import microns_per_unit

    shapes_key = ctx.shapes_key(shapes_key)
    cs = ctx.coordinate_system(coordinate_system, [shapes_key])
    rows = ctx.rows_of(shapes_key)
    if rows.size != ctx.table.n_obs:
        msg = f"The table {ctx.table_key!r} annotates several regions; build one graph per region (subset the table)."
        raise ValueError(msg)
    xy, _, kind = ctx.geometry(shapes_key, rows)
    centres = apply_affine(ctx.to_coordinate_system(shapes_key, cs), xy)
    return centres, (cs, microns_per_unit(ctx.sdata, cs, table_key=ctx.table_key)), kind == "square"
