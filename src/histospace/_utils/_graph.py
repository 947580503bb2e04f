"""Mini-batches of a spatial graph: compact spatial tiles, each with the halo of graph hops a node's output needs."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from histospace._utils._data import binary_adjacency

if TYPE_CHECKING:
    import torch


def spatial_tiles(coords: np.ndarray | None, n: int, batch_size: int) -> list[np.ndarray]:
    """Split spots into about ``n / batch_size`` compact tiles (quantile grid on x, then y)."""
    n_tiles = max(1, math.ceil(n / batch_size))
    if coords is None:
        return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    g = max(1, math.ceil(math.sqrt(n_tiles)))
    order_x = np.argsort(coords[:, 0], kind="stable")
    tiles = []
    for col in np.array_split(order_x, g):
        rows_per_col = max(1, math.ceil(len(col) / batch_size))
        order_y = col[np.argsort(coords[col, 1], kind="stable")]
        tiles.extend(np.sort(t) for t in np.array_split(order_y, rows_per_col) if len(t))
    return tiles


def halo(adj: sp.csr_matrix, seeds: np.ndarray, n_hops: int) -> np.ndarray:
    """Return ``seeds`` followed by the spots within ``n_hops`` graph hops of them (not in ``seeds``)."""
    mask = np.zeros(adj.shape[0], dtype=bool)
    mask[seeds] = True
    frontier = seeds
    for _ in range(n_hops):
        nb = np.unique(adj[frontier].indices)
        nb = nb[~mask[nb]]
        if nb.size == 0:
            break
        mask[nb] = True
        frontier = nb
    halo = np.flatnonzero(mask)
    is_seed = np.zeros(adj.shape[0], dtype=bool)
    is_seed[seeds] = True
    return np.concatenate([seeds, halo[~is_seed[halo]]])


class GraphBatch:
    __slots__ = ("adj", "edge_index", "n_seeds", "nodes")

    def __init__(self, nodes, n_seeds, edge_index, adj):
        self.nodes, self.n_seeds, self.edge_index, self.adj = nodes, n_seeds, edge_index, adj


def make_tiles(wnorm: sp.csr_matrix, coords, batch_size: int, n_hops: int) -> list[GraphBatch]:
    """Tiles of about `batch_size` spots, each with the halo of `n_hops` graph hops its latent depends on."""
    import torch

    adj = wnorm
    out = []
    for seeds in spatial_tiles(coords, adj.shape[0], batch_size):
        nodes = halo(adj, seeds, n_hops)
        sub = adj[nodes][:, nodes].tocoo()
        ei = torch.from_numpy(np.vstack([sub.col, sub.row]).astype(np.int64))
        adj_t = sparse_adjacency(ei, torch.from_numpy(sub.data.astype(np.float32)), len(nodes))
        out.append(GraphBatch(torch.from_numpy(nodes.astype(np.int64)), len(seeds), ei, adj_t))
    return out


def gcn_normalized_edges(adj: sp.spmatrix) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(edge_index, edge_weight)`` of ``D^-1/2 (A + I) D^-1/2`` for a binary, symmetric ``A``.

    ``A`` is symmetrised and binarised (the reference graph is undirected and unweighted) and self loops are added
    once, as torch-geometric's `gcn_norm` does. The weights are computed once on the whole graph, so the rows of a
    sub-graph that keeps all neighbours of a node (the interior of a tile) get exactly the full-graph values.
    """
    import torch

    a = binary_adjacency(adj, self_loops=True).tocoo()
    deg = np.asarray(a.sum(axis=1)).ravel()
    dinv = 1.0 / np.sqrt(deg)
    w = (dinv[a.row] * dinv[a.col]).astype(np.float32)
    # torch-geometric convention: edge_index[0] = source j, edge_index[1] = target i (messages j -> i)
    edge_index = torch.from_numpy(np.vstack([a.col, a.row]).astype(np.int64))
    return edge_index, torch.from_numpy(w)


def sparse_adjacency(edge_index: torch.Tensor, edge_weight: torch.Tensor, n: int) -> torch.Tensor:
    """Weighted adjacency as a torch CSR tensor with rows = targets (what `GCNConv` takes as `adj_t`)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR tensor support is in beta state"
        coo = torch.sparse_coo_tensor(torch.stack([edge_index[1], edge_index[0]]), edge_weight, (n, n))
        return coo.coalesce().to_sparse_csr()
