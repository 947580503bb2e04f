"""Spatial graphs of square bins (Visium HD, Stereo-seq) from their integer grid indices or a k-d tree.

The 4- or 8-neighbour grid comes from the bins' integer indices by sparse index arithmetic (one hash per bin, one shift
and `searchsorted` per neighbour direction) and the radius graph from a k-d tree per slide: no dense matrix and no
Python loop over bins, so 10^6 bins take seconds. Bins of different slides never meet.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scanpy import logging as logg

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


def bin_graph(
    coords: np.ndarray,
    idx: tuple[np.ndarray, np.ndarray],
    lib_of_spot: np.ndarray | None,
    obs_names: pd.Index,
    *,
    coord_type: str,
    library_key: str | None,
    n_neighs: int | None,
    n_rings: int,
    radius_um: float | None,
    radius_px: float | None,
    px_per_um: dict[str, float],
    scale_rows: np.ndarray | None,
    set_diag: bool,
    bins_why: str,
) -> tuple[sp.csr_matrix, sp.csr_matrix, dict, float]:
    """The grid (`coord_type='grid'`) or radius graph of square bins, one per slide.

    `idx` holds the bins' grid rows and columns, `lib_of_spot` their slides (`None`: one slide). With a radius, each
    slide's radius is `radius_um * px_per_um[slide]` when `scale_rows` is given (slides of different pixel sizes),
    else `radius_px`. Raises `ValueError` naming bins that share a grid position on one slide.

    Returns `(connectivities, distances, squidpy-style parameters, start time of the log)`.
    """
    n = coords.shape[0]
    if lib_of_spot is not None:
        lib_codes, lib_names = pd.factorize(lib_of_spot)
        lib_codes, lib_names = lib_codes.astype(np.int64), np.asarray(lib_names, dtype=object)
    else:
        lib_codes, lib_names = np.zeros(n, dtype=np.int64), np.array([""], dtype=object)
    if coord_type == "grid":
        keys, grid_h, grid_w = _lattice_keys(idx[0], idx[1], lib_codes)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        del keys
        same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if same.size:
            dup = np.unique(np.concatenate([order[same], order[same + 1]]))
            example = ", ".join(repr(str(x)) for x in obs_names[dup[:4]])
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
        return conn, dist, {"n_neighbors": int(n_neighs), "n_rings": int(n_rings), "delaunay": False}, start
    if scale_rows is not None:
        r_lib = np.array([radius_um * px_per_um[str(lib)] for lib in lib_names])
    else:
        r_lib = np.full(lib_names.size, float(radius_px))
    start = logg.info(f"building the radius graph of {n} square bins ({bins_why})")
    conn, dist = _radius_graph(coords, lib_codes, r_lib, set_diag=bool(set_diag))
    return conn, dist, {}, start
