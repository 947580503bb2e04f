"""Spatial context of image features: each spot's features beside the means over the rings of its spatial graph.

A query slide always has a neighbourhood (spots, bins or H&E tiles form a grid even when nothing was sequenced), so
the context costs the user nothing: ring `k` of a spot is the set of spots `k` hops away on the slide's spatial graph
(`obsp['spatial_connectivities']` of :func:`histospace.pp.spatial_graph` or squidpy), and the context features of a
spot are `[x, mean(x over ring 1), ..., mean(x over ring n)]`. A spot with an empty ring (an isolated spot, a slide
edge) takes its own features for that ring. The ring means are sparse products (`O(edges)`), computed batch by batch
at prediction, so a slide of 10^5 tiles never holds more than a batch of the widened features.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData
from scanpy import logging as logg

from histospace._constants import COL_KEY, GRAPH_KEY, ROW_KEY, SPATIAL_UNS_KEY, connectivity_key_in


def ring_operators(conn, n_rings: int) -> list[sp.csr_matrix]:
    """Row-normalised operators of rings 1..`n_rings` of the graph `conn` (hop distance exactly `k`, no self).

    A row whose ring is empty holds a 1 on the diagonal (the spot's own features stand in).
    """
    n = conn.shape[0]
    a = sp.csr_matrix(conn, dtype=np.float32, copy=True)
    a.setdiag(0)
    a.eliminate_zeros()
    a.data[:] = 1.0
    a = ((a + a.T) > 0).astype(np.float32).tocsr()  # squidpy's k-NN graph is directed: rings are undirected
    eye = sp.identity(n, dtype=np.float32, format="csr")
    reached = (eye + a).astype(bool).tocsr()
    frontier = a.astype(bool).tocsr()
    ops = []
    for k in range(1, n_rings + 1):
        if k > 1:
            grown = (reached.astype(np.float32) @ a).astype(bool).tocsr()
            frontier = (grown.astype(np.int8) - grown.multiply(reached).astype(np.int8)).astype(bool).tocsr()
            reached = (reached + frontier).astype(bool).tocsr()
        ring = frontier.astype(np.float32).tocsr()
        ring.eliminate_zeros()
        deg = np.asarray(ring.sum(axis=1)).ravel()
        empty = deg == 0
        inv = np.where(empty, 0.0, 1.0 / np.maximum(deg, 1)).astype(np.float32)
        op = sp.diags(inv) @ ring + sp.diags(empty.astype(np.float32))
        ops.append(op.tocsr().astype(np.float32))
    return ops


def context_rows(x: np.ndarray, ops: list[sp.csr_matrix], rows: slice | np.ndarray | None = None) -> np.ndarray:
    """`[x, ring means...]` of the spots `rows` (all when `None`), float32 `(n_rows, d * (1 + len(ops)))`."""
    x = np.asarray(x, dtype=np.float32)
    if rows is None:
        rows = slice(None)
    parts = [x[rows]] + [np.asarray(op[rows] @ x, dtype=np.float32) for op in ops]
    return np.hstack(parts) if len(parts) > 1 else parts[0]


def slide_graph(
    adata: AnnData, *, connectivity_key: str = GRAPH_KEY, spatial_key: str, library_key: str | None
) -> sp.csr_matrix:
    """The spatial graph of `adata` (`obsp[connectivity_key]`), or one built by :func:`histospace.pp.spatial_graph`.

    Nothing is written to `adata`: a missing graph is built on a light copy (obs, `obsm[spatial_key]`, the Visium
    `uns`) with the technology's defaults, one graph per slide of `library_key`.
    """
    key = connectivity_key_in(adata.obsp, connectivity_key)
    if key in adata.obsp:
        g = adata.obsp[key]
        if g.shape != (adata.n_obs, adata.n_obs):
            msg = f"`adata.obsp[{key!r}]` has shape {g.shape}; expected ({adata.n_obs}, {adata.n_obs})."
            raise ValueError(msg)
        return sp.csr_matrix(g)
    if spatial_key not in adata.obsm:
        msg = (
            f"The spatial context needs the slide's spatial graph: neither `adata.obsp[{connectivity_key!r}]` nor "
            f"`adata.obsm[{spatial_key!r}]` (spot centres) was found. Build it with `hs.pp.spatial_graph(adata)` "
            "(or `squidpy.gr.spatial_neighbors_grid(adata)`), or pass `spatial_context=0` to the model."
        )
        raise KeyError(msg)
    import histospace as hs

    cols = [c for c in (library_key, ROW_KEY, COL_KEY) if c is not None and c in adata.obs]
    light = AnnData(obs=adata.obs[cols].copy(), obsm={spatial_key: np.asarray(adata.obsm[spatial_key])})
    if SPATIAL_UNS_KEY in adata.uns:  # the Visium layout tells the technology (grid of spots)
        light.uns[SPATIAL_UNS_KEY] = adata.uns[SPATIAL_UNS_KEY]
    lib = library_key if library_key is not None and library_key in light.obs else None
    hs.pp.spatial_graph(light, spatial_key=spatial_key, library_key=lib)
    logg.info(f"    spatial context: no `obsp[{connectivity_key!r}]`, built a graph with `hs.pp.spatial_graph`")
    return sp.csr_matrix(light.obsp[connectivity_key_in(light.obsp, GRAPH_KEY)])


def context_ops(
    adata: AnnData, context: int, connectivity_key: str, spatial_key: str, library_key: str | None
) -> list[sp.csr_matrix]:
    """Ring operators `1..context` of `adata`'s spatial graph (`[]` when `context` is 0)."""
    if not context:
        return []
    graph = slide_graph(adata, connectivity_key=connectivity_key, spatial_key=spatial_key, library_key=library_key)
    return ring_operators(graph, context)


def check_context_input(adata: AnnData, context: int, connectivity_key: str, spatial_key: str) -> None:
    """Raise before any work when a query has neither the spatial graph nor the spot centres to build it."""
    if connectivity_key_in(adata.obsp, connectivity_key) in adata.obsp or spatial_key in adata.obsm:
        return
    msg = (
        f"The model uses the query's spatial graph (spatial_context={context}, or smooth_predictions > 0): neither "
        f"`adata.obsp[{connectivity_key!r}]` nor `adata.obsm[{spatial_key!r}]` was found. Build it with "
        "`hs.pp.spatial_graph(adata)`."
    )
    raise KeyError(msg)


def smooth_rows(p: np.ndarray, ring1: sp.csr_matrix, weight: float) -> np.ndarray:
    """`(1 - weight) * p + weight * (ring-1 mean of p)`, float32 (a spot without neighbours keeps its own row)."""
    return ((1.0 - weight) * p + weight * np.asarray(ring1 @ p)).astype(np.float32, copy=False)


def can_smooth(adata: AnnData, weight: float, connectivity_key: str, spatial_key: str, *, warn: bool = False) -> bool:
    """Whether predictions for `adata` can be smoothed with `weight > 0` (it has a graph or centres); warns if not."""
    if weight <= 0:
        return False
    ok = connectivity_key_in(adata.obsp, connectivity_key) in adata.obsp or spatial_key in adata.obsm
    if not ok and warn:
        import warnings

        msg = (
            f"The query has no spatial graph (`adata.obsp[{connectivity_key!r}]`) and no centres "
            f"(`adata.obsm[{spatial_key!r}]`): its predictions are not smoothed (`smooth_predictions={weight:g}`). "
            "Add its coordinates, or pass `smooth_predictions=0` to the model."
        )
        warnings.warn(msg, UserWarning, stacklevel=5)
    return ok
