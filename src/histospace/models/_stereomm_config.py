"""StereoMM's settings: the defaults and the reference's, the automatic choices, and their checks.

:class:`~histospace.models.StereoMM` fills its configuration from :data:`DEFAULTS` (or :data:`REFERENCE`, the
StereoMMv1 README settings, with `preset='reference'`) and checks it with :func:`check_config`; `graph_weight='auto'`
measures :func:`neighbour_dissimilarity` and propagates with :func:`weighted_gcn_edges`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scanpy import logging as logg

from histospace._nn._stereomm import ATTENTION_MODES
from histospace._utils import check_number
from histospace._utils._graph import gcn_normalized_edges

IMAGE_HINT = (
    "Compute image features first, e.g. `hs.pp.image_features(adata)` (or `squidpy.im.calculate_image_features`), "
    "or pass `features_key=None` for an expression-only model."
)
GRAPH_HINT = (
    "Build a spatial graph first, e.g. `hs.pp.spatial_graph(adata)` or `squidpy.gr.spatial_neighbors_grid(adata)`."
)

#: default settings (see the class docstring for why they differ from the reference)
DEFAULTS: dict[str, Any] = {
    "gene_selection": "hvg",
    "n_top_genes": 3000,
    "normalize": "auto",
    "n_pcs": 50,
    "hidden": [256, 64],
    "n_latent": 32,
    "proj_dim": 256,
    "n_heads": 1,
    "attention": "auto",
    "decoder_last_relu": False,
    "image_weight": 0.1,
    "zero_init_attention": True,
    "graph_weight": "auto",
    "contrastive_weight": 0.0,
}
#: StereoMMv1 README settings ("real data" command)
REFERENCE: dict[str, Any] = {
    "gene_selection": "top_variance",
    "n_top_genes": 2048,
    "normalize": "none",
    "n_pcs": None,
    "hidden": [2048, 256],
    "n_latent": 100,
    "proj_dim": 256,
    "n_heads": 1,
    "attention": "global",
    "decoder_last_relu": False,
    "image_weight": 1.0,
    "zero_init_attention": False,
    "graph_weight": 1.0,
    "contrastive_weight": 0.0,
}
DEFAULT_TRAIN = {"max_epochs": 300, "lr": 1e-3, "weight_decay": 1e-4, "n_models": 3}
REFERENCE_TRAIN = {"max_epochs": 100, "lr": 1e-4, "weight_decay": 1e-4, "n_models": 1}

#: full batch while the estimated training memory stays below this many bytes
FULL_BATCH_BYTES = 2 * 1024**3
#: ... and up to this many spots (beyond, tiles give more optimiser steps for the same compute)
FULL_BATCH_MAX_SPOTS = 20_000
#: spots per tile (before the halo) in mini-batch training chosen automatically
AUTO_BATCH_SIZE = 16384
#: with tiles and `max_epochs=None`, at least this many epochs (about 300 optimiser steps otherwise)
MIN_TILE_EPOCHS = 5
#: `attention='auto'` uses exact global attention up to this many spots, local attention beyond
AUTO_GLOBAL_MAX = 100_000
#: `graph_weight='auto'`: the neighbour dissimilarity is measured on this many leading expression PCs ...
AUTO_GRAPH_PCS = 10
#: ... and the graph convolutions mix neighbours (weight 1) below this dissimilarity, not at all (weight 0) above it.
#: Chosen on the main sections of benchmarks/domain_protocol.py (10 PCs, default graphs): weight 1 is better at
#: DLPFC 151673 0.26, 151674 0.25, simulated Visium 0.29, Visium HD 0.50, Stereo-seq 0.55; weight 0 on the Stereo-seq
#: embryo bin20 S01 0.78, S02 0.75. 0.65 is the middle of that gap (each section left out, the gap of the others puts
#: it on the right side); confirmed on the robustness sections: 151673 with 500 genes 0.55 (weight 1: ARI 0.48
#: against 0.22), unbalanced simulated domains 0.71 (weight 0: 0.88 against 0.77), a 500-spot window 0.68.
AUTO_GRAPH_MAX_DISSIMILARITY = 0.65


def neighbour_dissimilarity(x: np.ndarray, a: sp.csr_matrix) -> float:
    """Mean squared distance of graph neighbours over that of random pairs (Geary's ratio; 0: alike, 1: random).

    `x`: spots x features; `a`: binary symmetric adjacency without self loops. ``sum_ij a_ij |x_i - x_j|^2 / nnz``
    divided by ``2 * sum(var(x))``, computed as ``2 (tr(X'DX) - tr(X'AX))`` without forming the edge differences.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0)
    total = 2.0 * float(x.var(0).sum())
    if a.nnz == 0 or total == 0:
        return 1.0
    deg = np.asarray(a.sum(axis=1), dtype=np.float64).ravel()
    edge_sum = 2.0 * (float((deg[:, None] * x * x).sum()) - float((x * (a @ x)).sum()))
    return edge_sum / a.nnz / total


def weighted_gcn_edges(a: sp.csr_matrix, weight: float):
    """``(edge_index, edge_weight)`` of ``D^-1/2 (I + weight A) D^-1/2``; `weight=1` is the usual GCN propagation."""
    if weight == 1.0:
        return gcn_normalized_edges(a)
    m = sp.csr_matrix(a * np.float32(weight) + sp.eye(a.shape[0], dtype=np.float32, format="csr"))
    m.eliminate_zeros()
    m = m.tocoo()
    dinv = 1.0 / np.sqrt(np.asarray(m.sum(axis=1), dtype=np.float64).ravel())
    w = (m.data * dinv[m.row] * dinv[m.col]).astype(np.float32)
    return torch.from_numpy(np.vstack([m.col, m.row]).astype(np.int64)), torch.from_numpy(w)


def check_config(cfg: dict) -> None:
    """Raise `ValueError` naming the first setting of a StereoMM configuration that is out of range."""
    if cfg["gene_selection"] not in ("hvg", "top_variance", "all"):
        msg = f"gene_selection={cfg['gene_selection']!r} is not one of 'hvg', 'top_variance', 'all'."
        raise ValueError(msg)
    if cfg["normalize"] not in ("auto", "log1p", "none"):
        msg = f"normalize={cfg['normalize']!r} is not one of 'auto', 'log1p', 'none'."
        raise ValueError(msg)
    if cfg["attention"] not in (*ATTENTION_MODES, "auto"):
        msg = f"attention={cfg['attention']!r} is not one of {('auto', *ATTENTION_MODES)}."
        raise ValueError(msg)
    for key in ("n_latent", "proj_dim", "n_heads", "n_top_genes"):
        check_number(cfg[key], key, integer=True, low=1)
    check_number(cfg["n_pcs"], "n_pcs", integer=True, low=1, allow_none=True)
    check_number(cfg["image_weight"], "image_weight", low=0, low_inclusive=False)
    check_number(cfg["contrastive_weight"], "contrastive_weight", low=0)
    if cfg["graph_weight"] != "auto":
        if isinstance(cfg["graph_weight"], str):
            msg = f"graph_weight={cfg['graph_weight']!r} is not 'auto' or a number >= 0."
            raise ValueError(msg)
        check_number(cfg["graph_weight"], "graph_weight", low=0)
    if isinstance(cfg["hidden"], str | bytes) or not cfg["hidden"]:
        msg = f"`hidden` must be a non-empty list of positive ints, got {cfg['hidden']!r}."
        raise ValueError(msg)
    for h in cfg["hidden"]:
        check_number(h, "hidden", integer=True, low=1)


def resolve_graph_weight(cfg: dict, xt: np.ndarray, a: sp.csr_matrix) -> None:
    """`graph_weight='auto'` in `cfg`: 1 when graph neighbours are alike in expression (`xt`, adjacency `a`), else 0.

    The ratio goes into `cfg['neighbour_dissimilarity']`; the choice is logged.
    """
    if cfg["graph_weight"] == "auto":
        ratio = neighbour_dissimilarity(xt if cfg["n_pcs"] is None else xt[:, :AUTO_GRAPH_PCS], a)
        cfg["neighbour_dissimilarity"] = float(ratio)
        cfg["graph_weight"] = 1.0 if ratio < AUTO_GRAPH_MAX_DISSIMILARITY else 0.0
        logg.info(
            f"    neighbour dissimilarity {ratio:.2f} (0: neighbours alike, 1: as different as random spots): "
            + (
                "the graph convolutions average over neighbours"
                if cfg["graph_weight"]
                else f"above {AUTO_GRAPH_MAX_DISSIMILARITY}, so the graph convolutions keep each spot's own "
                "features (graph_weight=0); pass graph_weight=1 to average over neighbours anyway"
            )
        )


def auto_batch_size(cfg: dict, in_dim: int, n_obs: int) -> int | None:
    """Spots per tile for `batch_size='auto'`: `None` (full batch) while the estimated memory and spots allow it."""
    per_spot = 4 * 4 * (3 * in_dim + 2 * sum(cfg["hidden"]) + 4 * cfg["n_latent"] + 2 * cfg["proj_dim"])
    if n_obs <= FULL_BATCH_MAX_SPOTS and n_obs * per_spot <= FULL_BATCH_BYTES:
        return None
    return AUTO_BATCH_SIZE


def warn_isolated(adata, a: sp.csr_matrix, connectivity_key: str) -> None:
    """Warn about spots without a neighbour in the binary graph `a` (unless the graph's builder warned already)."""
    from histospace.pp._spatial_graph import isolated_already_warned

    n_isolated = int((np.diff(a.indptr) == 0).sum())
    if n_isolated and not isolated_already_warned(adata, connectivity_key, n_isolated):  # warned by the builder
        warnings.warn(
            f"{n_isolated} of {adata.n_obs} spots ({100 * n_isolated / adata.n_obs:.2g}%) have no neighbour in "
            f"`adata.obsp[{connectivity_key!r}]`; their latent comes from their own features only. Rebuild the "
            "graph with a larger radius or more neighbours if that is not intended.",
            UserWarning,
            stacklevel=3,
        )


def resolve_batch_size(batch_size: int | str, auto: int | None, n_obs: int) -> int | None:
    """Spots per tile from `train`'s `batch_size` (`'auto'` -> `auto`); `None` for full batch."""
    if batch_size == "auto":
        return auto
    if batch_size == "full":
        return None
    if isinstance(batch_size, str):
        msg = f"`batch_size` must be 'auto', 'full' or a positive int, got {batch_size!r}."
        raise ValueError(msg)
    batch_size = check_number(batch_size, "batch_size", integer=True, low=1)
    return batch_size if batch_size < n_obs else None


def readout_adjacency(a: sp.csr_matrix, nodes: np.ndarray | None = None) -> torch.Tensor:
    """Row-normalised neighbours (no self loops) of all spots or of the sub-graph `nodes`, as a torch CSR tensor:
    the neighbourhood summary of the contrastive term. A spot without neighbours summarises to zero.
    """  # noqa: D205
    if nodes is not None:
        a = a[nodes][:, nodes]
    a = sp.csr_matrix(a, dtype=np.float32)
    a.setdiag(0)
    a.eliminate_zeros()
    deg = np.asarray(a.sum(axis=1)).ravel()
    a = (sp.diags((1.0 / np.maximum(deg, 1)).astype(np.float32)) @ a).tocsr()
    # built directly, not through `sparse_adjacency`: its coalesce sorts the columns of each row, which changes the
    # order of the float sums (and the trained latents, by up to 6e-5 on S01) against the runs of the domain protocol
    return torch.sparse_csr_tensor(
        torch.from_numpy(a.indptr.astype(np.int64)),
        torch.from_numpy(a.indices.astype(np.int64)),
        torch.from_numpy(a.data.astype(np.float32)),
        a.shape,
    )


def contrastive_kwargs(weight: float, graph: sp.csr_matrix | None, tiles: list | None, device) -> dict:
    """The contrastive term's arguments of the loss per batch (`None`: the full graph; else `id(tile)`): the
    neighbour summary of :func:`readout_adjacency` and the weight; empty without the term (`graph` is `None`: the
    model keeps its graph for the term only when `contrastive_weight > 0`).
    """  # noqa: D205
    if graph is None:
        return {}
    if tiles is None:
        return {None: {"readout": readout_adjacency(graph).to(device), "contrastive_weight": weight}}
    return {
        id(t): {"readout": readout_adjacency(graph, t.nodes.numpy()).to(device), "contrastive_weight": weight}
        for t in tiles
    }
