"""Spatial neighbour graph built with squidpy, plus what squidpy leaves to the user (µm radius, slides, checks)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from numbers import Real
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scanpy import logging as logg

from histospace._utils import check_number, check_obsm, doc_params, version_string
from histospace._utils._data import check_key_added, library_labels

# Spot diameter (µm) and first-ring grid neighbours per technology (centre-to-centre: Visium 100 µm, legacy ST 200 µm).
_SPOT_DIAMETER_UM = {"visium": 55.0, "st": 100.0}
_GRID_NEIGHS = {"visium": 6, "st": 4}
_DEFAULT_SPOT_DIAMETER_UM = 55.0  # Visium, when nothing says otherwise


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
            "to pixels. Pass `spot_diameter_um=` (the spot diameter in µm) or `radius=` in full-resolution pixels."
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
) -> tuple[float, float]:
    """Return (pixels per µm, spot diameter in µm) of slide `lib`."""
    sf = _lib_uns(adata, lib).get("scalefactors", {}) or {}
    d_px = sf.get("spot_diameter_fullres")
    if d_px is None:
        msg = (
            f"`adata.uns['spatial'][{lib!r}]['scalefactors']['spot_diameter_fullres']` not found, so `radius_um` cannot "
            "be converted to pixels. Add the scale factors (as `scanpy.read_visium` does) or pass `radius=` in "
            "full-resolution pixels."
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
    adata: AnnData,
    *,
    spatial_key: str = "spatial",
    library_key: str | None = None,
    coord_type: Literal["grid", "generic"] | None = None,
    n_neighs: int | None = None,
    radius_um: float | None = None,
    radius: float | None = None,
    spot_diameter_um: float | None = None,
    n_rings: int = 1,
    delaunay: bool = False,
    set_diag: bool = False,
    key_added: str = "spatial",
    copy: bool = False,
) -> AnnData | None:
    """Build the spatial neighbour graph with squidpy, one graph per slide, with a radius in µm.

    The graph is built by squidpy's own builders (:func:`squidpy.gr.spatial_neighbors_grid`,
    :func:`~squidpy.gr.spatial_neighbors_knn`, :func:`~squidpy.gr.spatial_neighbors_radius`,
    :func:`~squidpy.gr.spatial_neighbors_delaunay`, the modes of :func:`squidpy.gr.spatial_neighbors`) and is written
    in squidpy's layout, so a graph made by squidpy directly works everywhere this one does. On top of squidpy it

    - converts a radius in µm to full-resolution pixels through
      `uns['spatial'][library_id]['scalefactors']['spot_diameter_fullres']` and the spot diameter of the technology;
    - builds one graph per slide (no edge between slides) when `library_key` is given, or when
      `adata.obs['library_id']` holds several slides;
    - picks the grid of the technology by default: Visium hexagonal grid (`coord_type='grid'`, `n_neighs=6`),
      legacy ST square grid (`n_neighs=4`), squidpy's generic 6-nearest-neighbour graph otherwise;
    - checks the result (sparse CSR, mean degree logged, a warning naming the spots without neighbours).

    Parameters
    ----------
    adata
        {adata}
    spatial_key
        {spatial_key}
    library_key
        Column of `adata.obs` telling the slides apart; each slide gets its own graph. `None` uses
        `'library_id'` when that column holds more than one slide, else treats all spots as one slide.
    coord_type
        `'grid'` (array of spots: Visium, legacy ST) or `'generic'` (k nearest neighbours, radius or Delaunay).
        `None` picks `'generic'` when `radius_um`, `radius` or `delaunay` is given, else `'grid'` for Visium (known
        from `uns['spatial'][library_id]['metadata']['technology']`, scanpy's Visium metadata or hexagonal
        `obs['array_row']`/`obs['array_col']`) and legacy ST, else `'generic'`.
    n_neighs
        Grid: neighbouring spots of the first ring (`None`: 6 for Visium, 4 for legacy ST). Generic: number of nearest
        neighbours (`None`: 6). Not used with a radius or with `delaunay=True` in generic mode.
    radius_um
        Connect spots closer than this many µm (generic mode). Converted to pixels per slide with
        `spot_diameter_fullres / spot_diameter_um`.
    radius
        Connect spots closer than this many full-resolution pixels (generic mode). Give `radius_um` or `radius`.
    spot_diameter_um
        Spot diameter in µm, used to convert `radius_um`. `None` reads
        `uns['spatial'][library_id]['metadata']['spot_diameter_um']`, else takes the technology's (Visium 55 µm,
        legacy ST 100 µm), else assumes Visium.
    n_rings
        Grid only: number of rings of neighbours (squidpy's `n_rings`).
    delaunay
        Generic: Delaunay triangulation graph (a µm/pixel radius then prunes longer edges). Grid: derive the first
        ring from a Delaunay triangulation (squidpy's grid `delaunay`).
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
        Euclidean distance in full-resolution pixels (generic) or ring number (grid) of each edge.
    `adata.uns['spatial_neighbors' | key_added + '_neighbors']` : :class:`dict`
        `connectivities_key`, `distances_key` and `params` (squidpy's parameters plus `spatial_key`,
        `library_key`, `radius` in pixels, `radius_um`, `spot_diameter_um`, `technology`, `set_diag`,
        `mean_degree`, `n_isolated` and the histospace `version`).

    Examples
    --------
    >>> import histospace as hs
    >>> adata = hs.datasets.dlpfc("151673")
    >>> hs.pp.spatial_graph(adata)  # Visium: hexagonal grid, 6 neighbours
    >>> hs.pp.spatial_graph(adata, radius_um=150, key_added="r150")  # every spot within 150 µm
    """
    # ---- check everything before any work; nothing is written to `adata` until the end ----
    if not isinstance(adata, AnnData):
        msg = f"`adata` must be an AnnData, got {type(adata).__name__}."
        raise TypeError(msg)
    check_key_added(key_added)
    coords = check_obsm(
        adata,
        spatial_key,
        hint="Store the spot centres (full-resolution pixels, x then y) there, e.g. with `scanpy.read_visium`.",
    ).astype(np.float64)
    if coords.shape[1] < 2:
        msg = f"`adata.obsm[{spatial_key!r}]` has {coords.shape[1]} column(s); expected (x, y) coordinates."
        raise ValueError(msg)
    if adata.n_obs < 2:
        msg = f"`adata` has {adata.n_obs} spot(s); a spatial graph needs at least 2."
        raise ValueError(msg)
    if coord_type is not None and coord_type not in ("grid", "generic"):
        msg = f"`coord_type` must be 'grid', 'generic' or None, got {coord_type!r}."
        raise ValueError(msg)
    n_neighs = check_number(n_neighs, "n_neighs", integer=True, low=1, allow_none=True)
    n_rings = check_number(n_rings, "n_rings", integer=True, low=1)
    radius_um = check_number(radius_um, "radius_um", low=0, low_inclusive=False, allow_none=True)
    radius = check_number(radius, "radius", low=0, low_inclusive=False, allow_none=True)
    spot_diameter_um = check_number(spot_diameter_um, "spot_diameter_um", low=0, low_inclusive=False, allow_none=True)
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

    # technology and default grid
    techs = {lib: _technology(adata, lib) for lib in libs}
    tech_set = set(techs.values())
    if tech_set <= {None} and _is_hex_grid(adata):
        tech_set = {"visium"}
    technology = tech_set.pop() if len(tech_set) == 1 else None
    if len(set(techs.values())) > 1 and coord_type is None and not has_radius and not delaunay:
        msg = (
            f"The slides come from different technologies ({techs}); pass `coord_type=` and `n_neighs=` explicitly "
            "(or build the graph per technology)."
        )
        raise ValueError(msg)
    if coord_type is None:
        coord_type = "grid" if (technology in _GRID_NEIGHS and not has_radius and not delaunay) else "generic"
    if coord_type == "grid" and n_neighs is None:
        n_neighs = _GRID_NEIGHS.get(technology, 6)
    if coord_type == "generic" and int(n_rings) != 1:
        msg = "`n_rings` applies to `coord_type='grid'` only."
        raise ValueError(msg)

    # radius in pixels, per slide
    px_per_um: dict[str, float] = {}
    d_um: dict[str, float] = {}
    scale_rows = None
    radius_px: float | None = float(radius) if radius is not None else None
    if radius_um is not None:
        if not libs:
            msg = (
                "`adata.uns['spatial']` not found, so `radius_um` cannot be converted to pixels. Add "
                "`uns['spatial'][library_id]['scalefactors']['spot_diameter_fullres']` or pass `radius=` in pixels."
            )
            raise KeyError(msg)
        missing = [lib for lib in libs if not _lib_uns(adata, lib)]
        if missing:
            msg = (
                f"`adata.uns['spatial']` has no entry for slide(s) {missing} of `adata.obs[{library_key!r}]`, so "
                "`radius_um` cannot be converted to pixels. Add their scale factors or pass `radius=` in pixels."
            )
            raise KeyError(msg)
        conv = {lib: _px_per_um(adata, lib, spot_diameter_um, technology) for lib in libs}
        px_per_um = {lib: c[0] for lib, c in conv.items()}
        d_um = {lib: c[1] for lib, c in conv.items()}
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

    # ---- build with squidpy on a light AnnData holding only what the builder reads ----
    from histospace._utils._deps import quiet_import

    sq = quiet_import("squidpy")

    n = adata.n_obs
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
    off_diag = conn.copy()
    off_diag.setdiag(0)
    off_diag.eliminate_zeros()
    degree = np.diff(off_diag.indptr)
    mean_degree = float(degree.mean())
    isolated = np.flatnonzero(degree == 0)
    logg.info(f"    mean degree {mean_degree:.2f}, {isolated.size} isolated spot(s), {off_diag.nnz} edges")
    if isolated.size:
        example = ", ".join(repr(str(x)) for x in adata.obs_names[isolated[:5]])
        if coord_type == "grid":
            fix = "check `coord_type`/`n_neighs` for this technology, or use `coord_type='generic'` with `radius_um=`"
        elif has_radius or delaunay:
            fix = "use a bigger `radius_um`/`radius`"
        else:
            fix = "use a bigger `n_neighs`"
        msg = (
            f"{isolated.size} of {n} spots ({100 * isolated.size / n:.2g}%) have no spatial neighbour (e.g. {example}); "
            f"{fix}, or remove off-tissue spots."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)

    params = dict(sq_params)
    params.update(
        {
            "coord_type": coord_type,
            "spatial_key": spatial_key,
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
        d_vals = list(d_um.values())
        params["spot_diameter_um"] = float(d_vals[0]) if np.allclose(d_vals, d_vals[0]) else dict(d_um)
        if scale_rows is None:
            params["radius"] = float(radius_px)
        else:
            params["radius"] = {lib: float(radius_um * f) for lib, f in px_per_um.items()}
    elif radius_px is not None:
        params["radius"] = float(radius_px)
    params["version"] = version_string()

    conns_key, dists_key, uns_key = f"{key_added}_connectivities", f"{key_added}_distances", f"{key_added}_neighbors"
    if copy:
        adata = adata.copy()
    adata.obsp[conns_key] = conn
    adata.obsp[dists_key] = dist
    adata.uns[uns_key] = {"connectivities_key": conns_key, "distances_key": dists_key, "params": params}
    logg.info(
        "    finished",
        time=start,
        deep=(
            f"added\n    {conns_key!r} and {dists_key!r}, spatial graph (adata.obsp)\n"
            f"    {uns_key!r}, parameters (adata.uns)"
        ),
    )
    return adata if copy else None
