"""Spatial neighbour graph: squidpy's builders for spot arrays, sparse index arithmetic for square bins.

On top of squidpy: a radius in µm, one graph per slide, checks, and square bins (Visium HD, Stereo-seq) at 10^6
bins: their 4- or 8-neighbour grid comes from the integer bin indices (hashing, shifts and `searchsorted`) and their
radius graph from a k-d tree, with no dense matrix and no Python loop over bins.

The builders live in `_bin_graph` (square bins) and `_spot_graph` (squidpy), what is read from the slides' metadata
(technology, spot size, µm per coordinate unit) in `_graph_meta`; this module checks the arguments, picks the graph,
checks the result and writes it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

if TYPE_CHECKING:
    from spatialdata import SpatialData
from scanpy import logging as logg

from histospace._constants import COL_KEY, GRAPH_KEY, LIBRARY_KEY, ROW_KEY, SPATIAL_KEY, graph_keys
from histospace._spatial._platform import GRID_NEIGHS as _GRID_NEIGHS
from histospace._spatial._slide import sdata_slide
from histospace._spatial._uns import uns_path
from histospace._utils import check_number, check_obsm, doc_params, version_string
from histospace._utils._data import check_key_added, library_labels
from histospace._utils._lattice import bins_evidence, grid_indices
from histospace._utils._sdata import TableContext, as_table, table_output
from histospace.pp._bin_graph import _BIN_NEIGHS, _DEFAULT_BIN_NEIGHS, bin_graph
from histospace.pp._graph_meta import _is_hex_grid, _library_ids, _radius_units, _technology
from histospace.pp._spot_graph import squidpy_graph


def isolated_already_warned(adata: AnnData, connectivity_key: str, n_isolated: int) -> bool:
    """Whether `spatial_graph` built `adata.obsp[connectivity_key]` and warned then about its `n_isolated` spots.

    A model reading the graph warns about spots without a neighbour only when the builder did not (a graph from
    squidpy or another tool, or another count), so one run of `spatial_graph` then `tl.stereomm` warns once.
    """
    for entry in adata.uns.values():
        if isinstance(entry, Mapping) and entry.get("connectivities_key") == connectivity_key:
            params = entry.get("params")
            if isinstance(params, Mapping) and "n_isolated" in params and "mean_degree" in params:
                return int(params["n_isolated"]) == int(n_isolated)
    return False


@doc_params()
def spatial_graph(
    adata: AnnData | SpatialData,
    *,
    table_key: str | None = None,
    shapes_key: str | None = None,
    coordinate_system: str | None = None,
    spatial_key: str = SPATIAL_KEY,
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
    key_added: str = GRAPH_KEY,
    copy: bool = False,
) -> AnnData | SpatialData | None:
    """Build the spatial neighbour graph of spots or square bins, one graph per slide, with a radius in µm.

    Spot arrays (Visium, legacy ST, any point cloud) go to squidpy's own builders
    (:func:`squidpy.gr.spatial_neighbors_grid`, :func:`~squidpy.gr.spatial_neighbors_knn`,
    :func:`~squidpy.gr.spatial_neighbors_radius`, :func:`~squidpy.gr.spatial_neighbors_delaunay`). Square bins (Visium HD, Stereo-seq; see `bins`) get a grid graph built from
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
        `uns[key_added + '_neighbors']` (squidpy's naming). The readers of the graph (`connectivity_key=` of
        `tl.stereomm`, `tl.domains`, `models.StereoMM`) take this same name: `key_added='x'` is read back with
        `connectivity_key='x'` (or the full `'x_connectivities'`).
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
    shape_diameter = None  # the shapes' diameter in the units of `coords` (SpatialData); else scalefactors
    if ctx is None:
        coords = check_obsm(
            adata,
            spatial_key,
            hint="Store the spot centres (full-resolution pixels, x then y) there, e.g. with `scanpy.read_visium`.",
        ).astype(np.float64)
    else:  # the centres of the annotated shapes in the coordinate system; µm and bins from the elements
        coords, cs_units, square, shape_diameter = _sdata_centres(ctx, shapes_key, coordinate_system)
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

    if library_key is None and LIBRARY_KEY in adata.obs and adata.obs[LIBRARY_KEY].nunique(dropna=False) > 1:
        library_key = LIBRARY_KEY
        logg.info("    building one graph per slide of `adata.obs['library_id']`")
    lib_of_spot = library_labels(adata, library_key, required=True) if library_key is not None else None
    libs = _library_ids(adata, lib_of_spot)
    if library_key is None and len(libs) > 1:
        warnings.warn(
            f"`{uns_path()}` holds {len(libs)} libraries but no `library_key` was given: all spots are treated "
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
        raise KeyError(msg) if (ROW_KEY not in adata.obs or COL_KEY not in adata.obs) else ValueError(msg)
    bins_why = (
        ("`bins=True`" if bins else bins_evidence(adata, idx, coords, diameter=shape_diameter))
        if idx is not None
        else None
    )
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
    px_per_um, d_um, scale_rows, radius_px = _radius_units(
        adata,
        libs,
        lib_of_spot,
        library_key=library_key,
        radius_um=radius_um,
        radius=radius,
        microns_per_unit=microns_per_unit,
        spot_diameter_um=spot_diameter_um,
        technology=technology,
    )

    if coord_type == "generic" and not (has_radius or delaunay):
        n_neighs = 6 if n_neighs is None else n_neighs
        smallest = int(pd.Series(lib_of_spot).value_counts().min()) if lib_of_spot is not None else adata.n_obs
        if int(n_neighs) >= smallest:
            msg = f"`n_neighs={n_neighs}` must be smaller than the number of spots of every slide ({smallest})."
            raise ValueError(msg)

    n = adata.n_obs
    own_builder = is_bins and (coord_type == "grid" or (has_radius and not delaunay))

    # ---- build ----
    if own_builder:
        conn, dist, sq_params, start = bin_graph(
            coords,
            idx,
            lib_of_spot,
            adata.obs_names,
            coord_type=coord_type,
            library_key=library_key,
            n_neighs=n_neighs,
            n_rings=n_rings,
            radius_um=radius_um,
            radius_px=radius_px,
            px_per_um=px_per_um,
            scale_rows=scale_rows,
            set_diag=set_diag,
            bins_why=bins_why,
        )
    else:
        conn, dist, sq_params, start = squidpy_graph(
            coords,
            lib_of_spot,
            library_key=library_key,
            coord_type=coord_type,
            n_neighs=n_neighs,
            n_rings=n_rings,
            delaunay=delaunay,
            has_radius=has_radius,
            radius_um=radius_um,
            radius_px=radius_px,
            scale_rows=scale_rows,
            set_diag=set_diag,
        )

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
    conns_key, dists_key, uns_key = graph_keys(key_added)
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
    """Centres, `(cs, µm per unit)`, squares or not, and diameter (side, in cs units) of the annotated shapes.

    From the spatial adapter's slide record without an image (:func:`histospace._spatial._slide.sdata_slide`).
    """
    slide = sdata_slide(
        ctx,
        image_key=None,
        shapes_key=shapes_key,
        coordinate_system=coordinate_system,
        image=False,
        one_region=(
            f"The table {ctx.table_key!r} annotates several regions; build one graph per region (subset the table)."
        ),
    )
    return slide.centres, (slide.extra["coordinate_system"], slide.mpp), slide.kind == "square", slide.spot_diameter
