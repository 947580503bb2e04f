"""Spatial graphs of spot arrays (Visium, legacy ST, any point cloud) through squidpy's own builders."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scanpy import logging as logg

from histospace._constants import SPATIAL_KEY, graph_keys


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


def squidpy_graph(
    coords: np.ndarray,
    lib_of_spot: np.ndarray | None,
    *,
    library_key: str | None,
    coord_type: str,
    n_neighs: int | None,
    n_rings: int,
    delaunay: bool,
    has_radius: bool,
    radius_um: float | None,
    radius_px: float | None,
    scale_rows: np.ndarray | None,
    set_diag: bool,
) -> tuple[sp.csr_matrix, sp.csr_matrix, dict, float]:
    """The graph of squidpy's grid, Delaunay, radius or k-nearest-neighbour builder, on a light AnnData.

    The AnnData holds only what the builder reads (the centres, divided by `scale_rows` when the slides have different
    units per µm, and the slides when `library_key` is given). Distances of generic graphs are converted back to each
    slide's units. Returns float32 CSR `(connectivities, distances)` with sorted indices, squidpy's non-`None`
    parameters and the start time of the log.
    """
    from histospace._utils._deps import quiet_import

    sq = quiet_import("squidpy")
    n = coords.shape[0]
    obs = pd.DataFrame(index=pd.RangeIndex(n).astype(str))
    if lib_of_spot is not None:
        obs["_library"] = pd.Categorical(lib_of_spot)
    tmp = AnnData(obs=obs)
    tmp.obsm[SPATIAL_KEY] = coords / scale_rows[:, None] if scale_rows is not None else coords
    common = {"spatial_key": SPATIAL_KEY, "library_key": "_library" if library_key is not None else None}
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

    conn_key, dist_key, uns_key = graph_keys()  # squidpy's default `key_added='spatial'`
    conn = sp.csr_matrix(tmp.obsp[conn_key], dtype=np.float32)
    dist = sp.csr_matrix(tmp.obsp[dist_key], dtype=np.float32)
    if scale_rows is not None and coord_type == "generic":
        dist = sp.csr_matrix(sp.diags(scale_rows.astype(np.float32)) @ dist, dtype=np.float32)
    conn.sort_indices()
    dist.sort_indices()
    sq_params = {k: v for k, v in tmp.uns[uns_key]["params"].items() if v is not None}
    return conn, dist, sq_params, start
