"""StereoMM model class: input checks, feature preprocessing, training, latent, save/load."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData
from scanpy import logging as logg
from tqdm.auto import tqdm

from histospace._nn._stereomm import (
    ATTENTION_MODES,
    StereoMMModule,
    gcn_normalized_edges,
    kl_divergence,
    sparse_adjacency,
)
from histospace._utils import (
    check_obsm,
    check_obsp,
    check_random_state,
    check_unique_obs_names,
    get_matrix,
    make_generator,
    resolve_device,
    seed_everything,
    version_string,
)

IMAGE_HINT = (
    "Compute image features first, e.g. `hs.pp.image_features(adata)` (or `squidpy.im.calculate_image_features`), "
    "or pass `image_key=None` for an expression-only model."
)
GRAPH_HINT = "Build a spatial graph first, e.g. `squidpy.gr.spatial_neighbors(adata)` or `hs.pp.spatial_graph(adata)`."

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
}
DEFAULT_TRAIN = {"max_epochs": 300, "lr": 1e-3, "weight_decay": 1e-4}
REFERENCE_TRAIN = {"max_epochs": 100, "lr": 1e-4, "weight_decay": 1e-4}

#: full batch while the estimated training memory stays below this many bytes
FULL_BATCH_BYTES = 2 * 1024**3
#: ... and up to this many spots (beyond, tiles give more optimiser steps for the same compute)
FULL_BATCH_MAX_SPOTS = 20_000
#: spots per tile (before the halo) in mini-batch training chosen automatically
AUTO_BATCH_SIZE = 16384
#: with tiles and `max_epochs=None`, at least this many epochs (about 300 optimiser steps otherwise)
MIN_TILE_EPOCHS = 5
#: more isolated spots than this fraction is an error (the graph is probably wrong); fewer give a warning
MAX_ISOLATED_FRACTION = 0.01
#: `attention='auto'` uses exact global attention up to this many spots, local attention beyond
AUTO_GLOBAL_MAX = 100_000


# --------------------------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------------------------
def _looks_like_counts(x) -> bool:
    data = x.data if sp.issparse(x) else np.asarray(x)
    if data.size == 0:
        return False
    sample = np.asarray(data.ravel()[:1_000_000])
    return bool(np.all(np.mod(sample, 1) == 0))


def _normalize_log1p(x, target_sum: float = 1e4):
    """``log1p(x / total * target_sum)`` per spot, sparse stays sparse, float32."""
    x = x.astype(np.float32) if sp.issparse(x) else np.asarray(x, dtype=np.float32)
    tot = np.asarray(x.sum(axis=1)).ravel()
    tot[tot == 0] = 1.0
    scale = (target_sum / tot).astype(np.float32)
    if sp.issparse(x):
        x = sp.csr_matrix(sp.diags(scale) @ x)
        x.data = np.log1p(x.data)
        return x
    return np.log1p(x * scale[:, None])


def _col_mean_var(x) -> tuple[np.ndarray, np.ndarray]:
    if sp.issparse(x):
        mean = np.asarray(x.mean(axis=0), dtype=np.float64).ravel()
        sq = np.asarray(x.multiply(x).mean(axis=0), dtype=np.float64).ravel()
        var = np.maximum(sq - mean**2, 0)
    else:
        x = np.asarray(x, dtype=np.float64)
        mean, var = x.mean(0), x.var(0)
    return mean, var


def _hvg_seurat(mean: np.ndarray, var: np.ndarray, n_top: int) -> np.ndarray:
    """Seurat-flavour HVGs from the means/variances of log data: normalised dispersion in 20 mean bins."""
    m = np.expm1(mean) + 1e-12
    # scanpy's 'seurat' flavour works on expm1 of the log data; approximate with the log-space moments
    disp = np.log(np.maximum(var, 1e-12) / m)
    lm = np.log1p(m)
    edges = np.linspace(lm.min(), lm.max() + 1e-9, 21)
    b = np.clip(np.digitize(lm, edges) - 1, 0, 19)
    norm = np.zeros_like(disp)
    for k in range(20):
        sel = b == k
        if sel.sum() > 1:
            sd = disp[sel].std(ddof=1)
            norm[sel] = (disp[sel] - disp[sel].mean()) / (sd if sd > 0 else 1.0)
    norm[mean <= 0] = -np.inf
    return np.sort(np.argsort(-norm, kind="stable")[:n_top])


def _pca_fit(x, mean: np.ndarray, scale: np.ndarray, n_comps: int) -> np.ndarray:
    """Exact PCA components (d, n_comps) of ``(x - mean) / scale`` from the covariance matrix (sparse-safe)."""
    n, d = x.shape
    if d > 1000 and n_comps < min(n, d) - 1:
        return _pca_fit_randomized(x, mean, scale, n_comps)
    if sp.issparse(x):
        xs = sp.csr_matrix(x @ sp.diags(1.0 / scale))
        gram = np.asarray((xs.T @ xs).toarray(), dtype=np.float64)
    else:
        gram = np.zeros((x.shape[1], x.shape[1]))
        for i in range(0, n, 65536):
            c = np.asarray(x[i : i + 65536], dtype=np.float64) / scale
            gram += c.T @ c
    ms = mean / scale
    cov = gram / n - np.outer(ms, ms)
    w, v = np.linalg.eigh(cov)
    v = v[:, ::-1][:, :n_comps]
    # deterministic signs: largest absolute loading positive
    signs = np.sign(v[np.abs(v).argmax(0), np.arange(v.shape[1])])
    signs[signs == 0] = 1
    return (v * signs).astype(np.float32)


def _pca_fit_randomized(x, mean: np.ndarray, scale: np.ndarray, n_comps: int, n_iter: int = 6) -> np.ndarray:
    """Top PCA components of ``(x - mean) / scale`` by randomized SVD with implicit centring (sparse-safe).

    Halko et al.'s range finder with power iterations and a fixed start (``numpy`` seed 0), so it is deterministic.
    """
    n, d = x.shape
    xs = sp.csr_matrix(x @ sp.diags(1.0 / scale)) if sp.issparse(x) else np.asarray(x, dtype=np.float64) / scale
    ms = mean / scale

    def mm(m):  # Xc @ m
        return np.asarray(xs @ m) - np.outer(np.ones(n), ms @ m)

    def rmm(m):  # Xc.T @ m
        return np.asarray(xs.T @ m) - np.outer(ms, m.sum(0))

    k = min(n_comps + 20, min(n, d))
    q = np.random.default_rng(0).standard_normal((d, k))
    q, _ = np.linalg.qr(mm(q))
    for _ in range(n_iter):
        q, _ = np.linalg.qr(rmm(q))
        q, _ = np.linalg.qr(mm(q))
    b = rmm(q).T  # (k, d) = q.T @ Xc
    _, _, vt = np.linalg.svd(b, full_matrices=False)
    v = vt[:n_comps].T
    signs = np.sign(v[np.abs(v).argmax(0), np.arange(v.shape[1])])
    signs[signs == 0] = 1
    return (v * signs).astype(np.float32)


def _project(x, mean: np.ndarray, scale: np.ndarray, comps: np.ndarray | None) -> np.ndarray:
    """``((x - mean) / scale) @ comps`` (or the z-score alone), in row chunks, float32."""
    out_dim = x.shape[1] if comps is None else comps.shape[1]
    out = np.empty((x.shape[0], out_dim), dtype=np.float32)
    mean32, scale32 = mean.astype(np.float32), scale.astype(np.float32)
    for i in range(0, x.shape[0], 65536):
        c = x[i : i + 65536]
        c = c.toarray() if sp.issparse(c) else np.asarray(c)
        c = (c.astype(np.float32) - mean32) / scale32
        out[i : i + 65536] = c if comps is None else c @ comps
    return out


class _Preprocessor:
    """Fitted feature preprocessing; everything needed to transform the same AnnData again is kept in arrays."""

    def __init__(self, **arrays):
        self.arrays = arrays

    @classmethod
    def fit(cls, x_expr, x_img, *, gene_selection, n_top_genes, normalize, n_pcs, var_names) -> _Preprocessor:
        arrays: dict[str, np.ndarray] = {}
        do_norm = normalize == "log1p" or (normalize == "auto" and _looks_like_counts(x_expr))
        arrays["normalize"] = np.array(bool(do_norm))
        x = _normalize_log1p(x_expr) if do_norm else x_expr
        mean, var = _col_mean_var(x)
        n_genes = x.shape[1]
        k = min(n_top_genes or n_genes, n_genes)
        if gene_selection == "all" or k >= n_genes:
            genes = np.arange(n_genes)
        elif gene_selection == "top_variance":
            genes = np.sort(np.argsort(-var, kind="stable")[:k])
        else:  # hvg
            genes = _hvg_seurat(mean, var, k)
        arrays["genes"] = np.asarray(var_names)[genes].astype(str)
        mean, var = mean[genes], var[genes]
        std = np.sqrt(var)
        std[std == 0] = 1.0
        arrays["expr_mean"], arrays["expr_std"] = mean, std
        xg = x[:, genes]
        d_t = len(genes) if n_pcs is None else min(n_pcs, len(genes), max(x.shape[0] - 1, 1))
        if x_img is not None:
            d_m = x_img.shape[1]
            d_t = min(d_t, d_m) if n_pcs is None else min(d_t, d_m, max(x.shape[0] - 1, 1))
        if n_pcs is not None or d_t < len(genes):
            arrays["expr_pcs"] = _pca_fit(xg, mean, std, d_t)
        if x_img is not None:
            imean, ivar = _col_mean_var(x_img)
            istd = np.sqrt(ivar)
            istd[istd == 0] = 1.0
            arrays["img_mean"], arrays["img_std"] = imean, istd
            if n_pcs is not None or x_img.shape[1] != d_t:
                arrays["img_pcs"] = _pca_fit(x_img, imean, istd, d_t)
        pre = cls(**arrays)
        # block scale: mean per-dimension variance 1 on each side (PCs keep their relative variances)
        xt, xm = pre.transform(x_expr, x_img, scaled=False, gene_index=genes)
        pre.arrays["expr_block_scale"] = np.array(float(np.sqrt(np.mean(xt.var(0))) or 1.0))
        if xm is not None:
            pre.arrays["img_block_scale"] = np.array(float(np.sqrt(np.mean(xm.var(0))) or 1.0))
        return pre

    @property
    def genes(self) -> np.ndarray:
        return self.arrays["genes"]

    def transform(self, x_expr_sel_or_full, x_img, *, scaled: bool = True, gene_index=None):
        a = self.arrays
        x = x_expr_sel_or_full
        if bool(a["normalize"]):
            x = _normalize_log1p(x)
        if gene_index is not None:
            x = x[:, gene_index]
        elif x.shape[1] != len(a["genes"]):
            msg = "internal: pass gene_index when transforming the full matrix"
            raise RuntimeError(msg)
        xt = _project(x, a["expr_mean"], a["expr_std"], a.get("expr_pcs"))
        xm = None
        if x_img is not None:
            xm = _project(x_img, a["img_mean"], a["img_std"], a.get("img_pcs"))
        if scaled:
            xt /= np.float32(a["expr_block_scale"])
            if xm is not None:
                xm /= np.float32(a["img_block_scale"])
        return xt, xm


# --------------------------------------------------------------------------------------------------------------
# mini-batches: spatial tiles with a halo
# --------------------------------------------------------------------------------------------------------------
def _spatial_tiles(coords: np.ndarray | None, n: int, batch_size: int) -> list[np.ndarray]:
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


def _halo(adj: sp.csr_matrix, seeds: np.ndarray, n_hops: int) -> np.ndarray:
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


class _Batch:
    __slots__ = ("adj", "edge_index", "n_seeds", "nodes")

    def __init__(self, nodes, n_seeds, edge_index, adj):
        self.nodes, self.n_seeds, self.edge_index, self.adj = nodes, n_seeds, edge_index, adj


def _make_batches(wnorm: sp.csr_matrix, coords, batch_size: int, n_hops: int) -> list[_Batch]:
    adj = wnorm
    out = []
    for seeds in _spatial_tiles(coords, adj.shape[0], batch_size):
        nodes = _halo(adj, seeds, n_hops)
        sub = adj[nodes][:, nodes].tocoo()
        ei = torch.from_numpy(np.vstack([sub.col, sub.row]).astype(np.int64))
        adj_t = sparse_adjacency(ei, torch.from_numpy(sub.data.astype(np.float32)), len(nodes))
        out.append(_Batch(torch.from_numpy(nodes.astype(np.int64)), len(seeds), ei, adj_t))
    return out


# --------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------
class StereoMM:
    """StereoMM: cross-modal attention between expression and H&E features, then a VGAE over the spatial graph.

    Fuses spot expression, image features and the spatial graph (:cite:p:`Luo2024`). Expression features ``X_t``
    and image features ``X_m`` (both brought to a common width ``s``) exchange information through one shared
    attention module with residuals (``X_ta = X_t + A(X_t, X_m, X_m)``, ``X_ma = X_m + A(X_m, X_t, X_t)``);
    ``[X_ma, X_ta]`` (image first) goes through a variational graph autoencoder with GCN layers whose decoder
    reconstructs the pre-attention features ``[X_m, X_t]``. The latent mean is the embedding.

    Default pipeline (``preset=None``; tuned on DLPFC 151673/151674, see ``benchmarks/domains.py``):

    - expression: counts are detected (integer values) and normalised (``normalize_total`` to 1e4 + ``log1p``);
      3000 highly variable genes (Seurat dispersion); z-score; PCA to 50 dimensions (exact from the covariance
      up to 1000 features, randomized SVD with a fixed seed beyond; sparse input stays sparse);
    - image features: z-score, PCA to the same width;
    - each block scaled to mean per-dimension variance 1, then the image block multiplied by ``image_weight=0.1``
      (on DLPFC the low-resolution H&E features are weak; with seed 0 the domain ARI on 151673 / 151674 was
      0.543 / 0.568 at 0.1, 0.472 / 0.450 at 0.3 and 0.408 / 0.481 at 0.5: at higher weights they pull the latent
      away from the layers);
    - attention ``'auto'``: exact global attention (frozen Q/K/V, cached, the reference's "brief" mode) up to
      100,000 spots, local attention (neighbours only, also frozen and cached) beyond; projection 256, one head;
      output projection initialised at zero (the attention starts as the identity instead of adding
      random-attention noise);
    - VGAE hidden ``[256, 64]``, latent 32, linear last decoder layer, correct log-variance KL weighted ``1/n``;
    - training (:meth:`train`): Adam, lr 1e-3, weight decay 1e-4, gradient-norm clip 5, float32; full batch up to
      20,000 spots for 300 epochs, beyond that spatial tiles of 16,384 spots (plus a halo covering the receptive
      field) for about 300 optimiser steps in all, so that the cost grows linearly with the number of spots.

    The reference defaults (StereoMMv1: 2048 top-variance genes of `X` as given, z-scored, no PCA, hidden
    ``[2048, 256]``, latent 100, lr 1e-4, 100 epochs) train little in 100 full-batch steps and smooth the
    expression less; PCA inputs and a higher learning rate give better domains on DLPFC (ARI, see the benchmark).
    ``preset='reference'`` restores them; explicit arguments override a preset.

    Parameters
    ----------
    adata
        Annotated data matrix with expression, image features in `.obsm` and a spatial graph in `.obsp`.
    layer
        Layer with the expression (counts or normalised, non-negative); `None` uses `adata.X`.
    image_key
        Key in `adata.obsm` with image features (e.g. from `hs.pp.image_features`); `None` trains on expression
        and the graph only (ablation; the attention is then skipped).
    connectivity_key
        Key in `adata.obsp` with the spatial graph (squidpy layout). It is symmetrised and binarised, self loops are
        added; every spot needs at least one neighbour.
    preset
        `None` for the histospace defaults, `'reference'` for the StereoMMv1 README settings.
    gene_selection
        `'hvg'` (Seurat dispersion on log data), `'top_variance'` (the reference: top variance of the expression)
        or `'all'`.
    n_top_genes
        Number of genes selected.
    normalize
        `'auto'` (normalise + log1p when the values are integers), `'log1p'` (always) or `'none'` (use as given).
    n_pcs
        PCA width for both modalities; `None` keeps the z-scored genes (the wider side is then reduced by PCA to the
        narrower width, as both sides must have the same width).
    hidden
        Widths of the VGAE encoder layers (the decoder mirrors them).
    n_latent
        Width of the latent.
    proj_dim
        Width of the attention query/key/value projections.
    n_heads
        Attention heads.
    attention
        `'global'` (exact, frozen Q/K/V as in the reference, cached), `'global_trainable'`, `'local'` (spatial
        neighbours only, O(edges), frozen and cached like `'global'`), `'local_trainable'`, `'none'`, or `'auto'`
        (`'global'` up to 100,000 spots, `'local'` beyond).
    chunk_size
        Queries per chunk of global attention; `None` picks a chunk with about 128 MiB of scores.
    decoder_last_relu
        Reproduce the reference's ReLU after the last decoder layer (a defect: z-scores below 0 are unreachable).
    image_weight
        Factor on the (block-scaled) image features, in the input and in the reconstruction target (default 0.1;
        1 in the reference). Low-resolution H&E features are weak and noisy; a smaller weight lets them inform the
        latent without dominating the expression.
    zero_init_attention
        Start the attention output projection at zero, so that the attention starts as the identity (default
        `True`; `False` in the reference, whose random frozen attention then adds noise to both modalities).
    """

    def __init__(
        self,
        adata: AnnData,
        *,
        layer: str | None = None,
        image_key: str | None = "img_features",
        connectivity_key: str = "spatial_connectivities",
        preset: Literal["reference"] | None = None,
        gene_selection: Literal["hvg", "top_variance", "all"] | None = None,
        n_top_genes: int | None = None,
        normalize: Literal["auto", "log1p", "none"] | None = None,
        n_pcs: int | None | Literal["default"] = "default",
        hidden: list[int] | tuple[int, ...] | None = None,
        n_latent: int | None = None,
        proj_dim: int | None = None,
        n_heads: int | None = None,
        attention: Literal["auto", "global", "global_trainable", "local", "local_trainable", "none"] | None = None,
        chunk_size: int | None = None,
        decoder_last_relu: bool | None = None,
        image_weight: float | None = None,
        zero_init_attention: bool | None = None,
        _prefit: _Preprocessor | None = None,
    ):
        if preset not in (None, "reference"):
            msg = f"preset={preset!r} is not one of None, 'reference'."
            raise ValueError(msg)
        base = dict(REFERENCE if preset == "reference" else DEFAULTS)
        given = {
            "gene_selection": gene_selection,
            "n_top_genes": n_top_genes,
            "normalize": normalize,
            "hidden": list(hidden) if hidden is not None else None,
            "n_latent": n_latent,
            "proj_dim": proj_dim,
            "n_heads": n_heads,
            "attention": attention,
            "decoder_last_relu": decoder_last_relu,
            "image_weight": image_weight,
            "zero_init_attention": zero_init_attention,
        }
        cfg = {**base, **{k: v for k, v in given.items() if v is not None}}
        if n_pcs != "default":
            cfg["n_pcs"] = n_pcs
        self._check_config(cfg)
        # ---- inputs -------------------------------------------------------------------------------------------
        if not isinstance(adata, AnnData):
            msg = f"`adata` must be an AnnData, got {type(adata).__name__}."
            raise TypeError(msg)
        check_unique_obs_names(adata)
        x_expr = get_matrix(adata, layer, counts=True)
        if adata.n_obs < 3:
            msg = f"StereoMM needs at least 3 spots; `adata` has {adata.n_obs}."
            raise ValueError(msg)
        x_img = None
        if image_key is not None:
            x_img = check_obsm(adata, image_key, hint=IMAGE_HINT).astype(np.float32)
        adj = check_obsp(adata, connectivity_key, hint=GRAPH_HINT)
        if adj.shape != (adata.n_obs, adata.n_obs):
            msg = f"`adata.obsp[{connectivity_key!r}]` has shape {adj.shape}; expected ({adata.n_obs}, {adata.n_obs})."
            raise ValueError(msg)
        a = sp.csr_matrix(adj)
        a = ((a + a.T) != 0).astype(np.float32)
        a.setdiag(0)
        a.eliminate_zeros()
        if a.nnz == 0:
            msg = f"`adata.obsp[{connectivity_key!r}]` has no edges. {GRAPH_HINT}"
            raise ValueError(msg)
        n_isolated = int((np.diff(a.indptr) == 0).sum())
        if n_isolated > MAX_ISOLATED_FRACTION * adata.n_obs:
            msg = (
                f"{n_isolated} of {adata.n_obs} spots have no neighbour in `adata.obsp[{connectivity_key!r}]`; rebuild "
                "the graph with a larger radius or more neighbours (e.g. `squidpy.gr.spatial_neighbors(adata, "
                "n_neighs=6)`), or remove the isolated spots."
            )
            raise ValueError(msg)
        if n_isolated:
            warnings.warn(
                f"{n_isolated} spots have no neighbour in `adata.obsp[{connectivity_key!r}]`; their latent comes from "
                "their own features only.",
                UserWarning,
                stacklevel=2,
            )
        if cfg["attention"] == "auto":
            cfg["attention"] = "global" if adata.n_obs <= AUTO_GLOBAL_MAX else "local"
        self.adata = adata
        self.layer, self.image_key, self.connectivity_key, self.preset = layer, image_key, connectivity_key, preset
        self.config = cfg
        self.obs_names = np.asarray(adata.obs_names).astype(str)
        # ---- features ---------------------------------------------------------------------------------------
        if _prefit is None:
            self._pre = _Preprocessor.fit(
                x_expr,
                x_img,
                gene_selection=cfg["gene_selection"],
                n_top_genes=cfg["n_top_genes"],
                normalize=cfg["normalize"],
                n_pcs=cfg["n_pcs"],
                var_names=adata.var_names,
            )
        else:
            self._pre = _prefit
        gene_index = adata.var_names.get_indexer(self._pre.genes)
        if (gene_index < 0).any():
            missing = self._pre.genes[gene_index < 0][:5].tolist()
            msg = f"{int((gene_index < 0).sum())} genes of the saved model are missing from `adata.var_names`, e.g. {missing}."
            raise ValueError(msg)
        if _prefit is not None and x_img is not None and x_img.shape[1] != len(self._pre.arrays["img_mean"]):
            msg = (
                f"`adata.obsm[{image_key!r}]` has {x_img.shape[1]} columns; the saved model was trained on "
                f"{len(self._pre.arrays['img_mean'])}."
            )
            raise ValueError(msg)
        # gene_index relative to the full matrix: normalisation uses all genes, then the selection is taken
        xt, xm = self._pre.transform(x_expr, x_img, gene_index=gene_index)
        self._x_t = torch.from_numpy(xt)
        self._x_m = None if xm is None else torch.from_numpy(xm * np.float32(cfg["image_weight"]))
        self.dim = xt.shape[1]
        self._adj = a
        self._edge_index, self._edge_weight = gcn_normalized_edges(a)
        self._adj_t = sparse_adjacency(self._edge_index, self._edge_weight, adata.n_obs)
        self._coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2] if "spatial" in adata.obsm else None
        self.module = StereoMMModule(
            self.dim,
            use_image=x_img is not None,
            hidden=cfg["hidden"],
            n_latent=cfg["n_latent"],
            proj_dim=cfg["proj_dim"],
            n_heads=cfg["n_heads"],
            attention=cfg["attention"],
            chunk_size=chunk_size,
            decoder_last_relu=cfg["decoder_last_relu"],
            zero_init_attention=cfg["zero_init_attention"],
        )
        self.chunk_size = chunk_size
        self.history: dict[str, list[float]] = {"loss": [], "reconstruction": [], "kl": []}
        self.is_trained = False
        self.train_params: dict[str, Any] = {}
        self.device = torch.device("cpu")
        logg.info(
            f"StereoMM: {adata.n_obs} spots, width {self.dim} per modality "
            f"({'expression + image' if x_img is not None else 'expression only'}), attention={cfg['attention']!r}"
        )

    @staticmethod
    def _check_config(cfg: dict) -> None:
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
            v = cfg[key]
            if not isinstance(v, int | np.integer) or v < 1:
                msg = f"`{key}` must be a positive int, got {v!r}."
                raise ValueError(msg)
        if cfg["n_pcs"] is not None and (not isinstance(cfg["n_pcs"], int | np.integer) or cfg["n_pcs"] < 1):
            msg = f"`n_pcs` must be a positive int or None, got {cfg['n_pcs']!r}."
            raise ValueError(msg)
        if not isinstance(cfg["image_weight"], int | float) or not cfg["image_weight"] > 0:
            msg = f"`image_weight` must be a positive number, got {cfg['image_weight']!r}."
            raise ValueError(msg)
        if not cfg["hidden"] or any(not isinstance(h, int | np.integer) or h < 1 for h in cfg["hidden"]):
            msg = f"`hidden` must be a non-empty list of positive ints, got {cfg['hidden']!r}."
            raise ValueError(msg)

    # ---------------------------------------------------------------------------------------------------------
    @property
    def n_obs(self) -> int:
        """Number of spots."""
        return self._x_t.shape[0]

    def to_device(self, device: str | torch.device | None) -> StereoMM:
        """Move the module to `device` (`None`: CUDA when available) and return `self`."""
        dev = resolve_device(device)
        if dev != self.device:
            self.module.to(dev)
            self.module.attention.clear_cache()
            self.device = dev
        return self

    def _auto_batch_size(self) -> int | None:
        cfg = self.config
        in_dim = self.dim * (2 if self._x_m is not None else 1)
        per_spot = 4 * 4 * (3 * in_dim + 2 * sum(cfg["hidden"]) + 4 * cfg["n_latent"] + 2 * cfg["proj_dim"])
        if self.n_obs <= FULL_BATCH_MAX_SPOTS and self.n_obs * per_spot <= FULL_BATCH_BYTES:
            return None
        return AUTO_BATCH_SIZE

    def _loss(self, x_hat, target, mu, logvar, kl_weight):
        rec = torch.nn.functional.mse_loss(x_hat, target)
        kl = kl_divergence(mu, logvar)
        return rec + kl_weight * kl, rec, kl

    def train(
        self,
        max_epochs: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        *,
        batch_size: int | Literal["auto", "full"] = "auto",
        clip_norm: float = 5.0,
        kl_weight: float | None = None,
        device: str | torch.device | None = None,
        random_state: int | None = 0,
        progress_bar: bool = True,
    ) -> StereoMM:
        """Train the model (Adam, gradient-norm clipping) and return `self`.

        Parameters
        ----------
        max_epochs
            Passes over all spots. `None`: 300 with full-batch training; with tiles, as many epochs as give about
            300 optimiser steps (``ceil(300 / n_tiles)``, at least 5), so the compute grows linearly with the
            number of spots; 100 with `preset='reference'`.
        lr
            Adam learning rate (default 1e-3; 1e-4 with `preset='reference'`).
        weight_decay
            Adam weight decay (default 1e-4).
        batch_size
            `'auto'`: full batch up to 20,000 spots (while the estimated memory stays under 2 GiB), otherwise
            spatial tiles of 16,384 spots plus a halo of as many graph hops as the model's receptive field (exact for the tile's spots).
            `'full'` forces full batch, an int forces tiles of that many spots.
        clip_norm
            Maximum gradient norm.
        kl_weight
            Weight of the KL term; `None` uses ``1 / n_obs`` as the reference.
        device
            Torch device; `None` picks CUDA when available.
        random_state
            Seed for `random`, `numpy`, `torch` and the tile order. The same seed gives the same latent on the CPU.
        progress_bar
            Show one progress bar.
        """
        defaults = REFERENCE_TRAIN if self.preset == "reference" else DEFAULT_TRAIN
        auto_epochs = max_epochs is None and self.preset != "reference"
        max_epochs = defaults["max_epochs"] if max_epochs is None else max_epochs
        lr = defaults["lr"] if lr is None else lr
        weight_decay = defaults["weight_decay"] if weight_decay is None else weight_decay
        random_state = check_random_state(random_state)
        if not isinstance(max_epochs, int | np.integer) or max_epochs < 1:
            msg = f"`max_epochs` must be a positive int, got {max_epochs!r}."
            raise ValueError(msg)
        if not lr > 0:
            msg = f"`lr` must be positive, got {lr!r}."
            raise ValueError(msg)
        if batch_size == "auto":
            bs = self._auto_batch_size()
        elif batch_size == "full":
            bs = None
        elif isinstance(batch_size, int | np.integer) and batch_size >= 1:
            bs = int(batch_size) if batch_size < self.n_obs else None
        else:
            msg = f"`batch_size` must be 'auto', 'full' or a positive int, got {batch_size!r}."
            raise ValueError(msg)
        self.to_device(device)
        dev = self.device
        seed_everything(random_state)
        # re-initialise so that training from the same seed gives the same result
        self.module.attention.clear_cache()
        for m in self.module.modules():
            if m is not self.module and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self.module.attention.init_output()
        self.module.to(dev).train()
        x_t, x_m = self._x_t.to(dev), (None if self._x_m is None else self._x_m.to(dev))
        target_full = self.module.inputs(x_t, x_m) if x_m is not None else x_t
        kl_w = 1.0 / self.n_obs if kl_weight is None else float(kl_weight)
        params = [p for p in self.module.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        gen = make_generator(random_state)
        t0 = time.perf_counter()
        batches = None
        if bs is not None:
            w = sp.csr_matrix(
                (self._edge_weight.numpy(), (self._edge_index[1].numpy(), self._edge_index[0].numpy())),
                shape=(self.n_obs, self.n_obs),
            )
            batches = _make_batches(w, self._coords, bs, self.module.n_hops)
            if auto_epochs:
                max_epochs = max(math.ceil(max_epochs / len(batches)), MIN_TILE_EPOCHS)
        start = logg.info(
            f"training StereoMM on {dev}: {max_epochs} epochs, "
            + ("full batch" if bs is None else f"{len(batches)} tiles of {bs} spots + halo per epoch")
        )
        t_cache = time.perf_counter()
        if self.module.attention.frozen and x_m is not None:
            self.module.attention.build_cache(x_t, x_m, self._edge_index.to(dev))
        t_cache = time.perf_counter() - t_cache
        ei, adj_t = self._edge_index.to(dev), self._adj_t.to(dev)
        hist = {"loss": [], "reconstruction": [], "kl": []}
        bar = tqdm(range(max_epochs), desc="StereoMM", disable=not progress_bar)
        for epoch in bar:
            if batches is None:
                opt.zero_grad(set_to_none=True)
                x_hat, mu, logvar, _ = self.module(x_t, x_m, adj_t, ei)
                loss, rec, kl = self._loss(x_hat, target_full, mu, logvar, kl_w)
                self._check_finite(loss, epoch, lr)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
                opt.step()
                ep = (loss.item(), rec.item(), kl.item())
            else:
                tot = np.zeros(3)
                order = torch.randperm(len(batches), generator=gen).tolist()
                for bi in order:
                    b = batches[bi]
                    nodes = b.nodes.to(dev)
                    bxt = x_t[nodes]
                    bxm = None if x_m is None else x_m[nodes]
                    keys = (x_t, x_m) if self.module.attention.mode == "global_trainable" else None
                    opt.zero_grad(set_to_none=True)
                    x_hat, mu, logvar, _ = self.module(
                        bxt, bxm, b.adj.to(dev), b.edge_index.to(dev), idx=nodes, keys=keys
                    )
                    s = b.n_seeds
                    loss, rec, kl = self._loss(x_hat[:s], target_full[nodes[:s]], mu[:s], logvar[:s], kl_w)
                    self._check_finite(loss, epoch, lr)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, clip_norm)
                    opt.step()
                    tot += np.array([loss.item(), rec.item(), kl.item()]) * s
                ep = tuple(float(v) for v in tot / self.n_obs)
            for k, v in zip(("loss", "reconstruction", "kl"), ep, strict=True):
                hist[k].append(v)
            if progress_bar:
                bar.set_postfix(loss=f"{ep[0]:.4f}")
        self.history = hist
        self.is_trained = True
        self._batches = batches
        self.train_params = {
            "max_epochs": int(max_epochs),
            "lr": float(lr),
            "weight_decay": float(weight_decay),
            "batch_size": "full" if bs is None else int(bs),
            "clip_norm": float(clip_norm),
            "kl_weight": float(kl_w),
            "device": str(dev),
            "fit_seconds": float(time.perf_counter() - t0),
            "attention_cache_seconds": float(t_cache),
        }
        if random_state is not None:
            self.train_params["random_state"] = int(random_state)
        logg.info("    finished training", time=start)
        return self

    @staticmethod
    def _check_finite(loss: torch.Tensor, epoch: int, lr: float) -> None:
        if not torch.isfinite(loss):
            msg = (
                f"StereoMM loss became {loss.item()} at epoch {epoch}; training stopped. "
                f"Try a lower learning rate (lr={lr:g} now, e.g. lr={lr / 10:g}) or check the inputs."
            )
            raise FloatingPointError(msg)

    @torch.no_grad()
    def get_latent_representation(self, *, sample: bool = False, random_state: int | None = 0) -> np.ndarray:
        """Return the latent of every spot, float32 ``(n_obs, n_latent)``: the mean (or a sample when asked)."""
        if not self.is_trained:
            warnings.warn("StereoMM is not trained; the latent comes from random weights.", UserWarning, stacklevel=2)
        self.module.eval()
        dev = self.device
        if sample:
            seed_everything(random_state)
        x_t, x_m = self._x_t.to(dev), (None if self._x_m is None else self._x_m.to(dev))
        batches = getattr(self, "_batches", None)
        if batches is None:
            _, mu, logvar, z = self.module(x_t, x_m, self._adj_t.to(dev), self._edge_index.to(dev), sample=sample)
            out = (z if sample else mu).cpu().numpy()
        else:
            out = np.empty((self.n_obs, self.config["n_latent"]), dtype=np.float32)
            if self.module.attention.frozen and x_m is not None and self.module.attention._cache is None:
                self.module.attention.build_cache(x_t, x_m, self._edge_index.to(dev))
            keys = (x_t, x_m) if self.module.attention.mode == "global_trainable" else None
            for b in batches:
                nodes = b.nodes.to(dev)
                bxm = None if x_m is None else x_m[nodes]
                _, mu, logvar, z = self.module(
                    x_t[nodes], bxm, b.adj.to(dev), b.edge_index.to(dev), idx=nodes, keys=keys, sample=sample
                )
                out[b.nodes[: b.n_seeds].numpy()] = (z if sample else mu)[: b.n_seeds].cpu().numpy()
        self.module.train()
        return np.ascontiguousarray(out, dtype=np.float32)

    # ---------------------------------------------------------------------------------------------------------
    def init_params(self) -> dict[str, Any]:
        """Init parameters (JSON-serialisable) as resolved from the preset and the arguments."""
        out = {
            "layer": self.layer,
            "image_key": self.image_key,
            "connectivity_key": self.connectivity_key,
            "preset": self.preset,
            "chunk_size": self.chunk_size,
            **self.config,
        }
        return out

    def save(self, dir_path: str | Path, *, overwrite: bool = False) -> None:
        """Save the weights (``model.pt``), init parameters (``params.json``) and fitted preprocessing (``.npz``).

        The AnnData is not saved; pass it again to :meth:`load`.
        """
        d = Path(dir_path)
        if d.exists() and any(d.iterdir()) and not overwrite:
            msg = f"{d} exists and is not empty; pass overwrite=True."
            raise FileExistsError(msg)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.module.state_dict().items()}
        torch.save(state, d / "model.pt")
        meta = {
            "init": self.init_params(),
            "train": self.train_params,
            "history": {k: [float(x) for x in v] for k, v in self.history.items()},
            "is_trained": self.is_trained,
            "n_obs": self.n_obs,
            "version": version_string(),
        }
        (d / "params.json").write_text(json.dumps(meta, indent=1))
        np.savez(d / "preprocessing.npz", obs_names=self.obs_names, **self._pre.arrays)

    @classmethod
    def load(cls, dir_path: str | Path, *, adata: AnnData, device: str | torch.device | None = "cpu") -> StereoMM:
        """Load a model saved with :meth:`save` onto `adata` (the same spots, and the genes the model uses)."""
        d = Path(dir_path)
        for f in ("model.pt", "params.json", "preprocessing.npz"):
            if not (d / f).exists():
                msg = f"{d / f} not found; is {d} a directory written by `StereoMM.save`?"
                raise FileNotFoundError(msg)
        meta = json.loads((d / "params.json").read_text())
        with np.load(d / "preprocessing.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        obs_names = arrays.pop("obs_names")
        if adata.n_obs != len(obs_names) or not np.array_equal(np.asarray(adata.obs_names).astype(str), obs_names):
            msg = (
                f"`adata` has other spots than the saved model ({adata.n_obs} vs {len(obs_names)} spots, or other "
                "`obs_names`); StereoMM is transductive: load it onto the AnnData it was trained on."
            )
            raise ValueError(msg)
        init = dict(meta["init"])
        pre = _Preprocessor(**arrays)
        model = cls(adata, **init, _prefit=pre)
        state = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
        model.module.load_state_dict(state)
        model.history = {k: list(v) for k, v in meta["history"].items()}
        model.train_params = meta["train"]
        model.is_trained = bool(meta["is_trained"])
        bs = meta["train"].get("batch_size", "full")
        if bs != "full":
            w = sp.csr_matrix(
                (model._edge_weight.numpy(), (model._edge_index[1].numpy(), model._edge_index[0].numpy())),
                shape=(model.n_obs, model.n_obs),
            )
            model._batches = _make_batches(w, model._coords, int(bs), model.module.n_hops)
        model.to_device(device)
        return model

    def __repr__(self) -> str:
        n_par = sum(p.numel() for p in self.module.parameters())
        return (
            f"StereoMM(n_obs={self.n_obs}, width={self.dim}, image={self.image_key!r}, "
            f"attention={self.config['attention']!r}, hidden={self.config['hidden']}, n_latent={self.config['n_latent']}, "
            f"parameters={n_par}, trained={self.is_trained})"
        )
