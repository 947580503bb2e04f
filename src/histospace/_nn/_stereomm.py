"""Torch modules of StereoMM: cross-modal attention and the variational graph autoencoder (VGAE).

Nothing here builds a dense ``n x n`` matrix. Global attention is exact but computed in query chunks (memory
``O(chunk * n)``); local attention is restricted to the edges of the spatial graph (``O(edges)``); GCN layers use a
sparse, pre-normalised edge list.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch_geometric.nn import GCNConv
from torch_geometric.utils import softmax as scatter_softmax

AttentionMode = Literal["global", "global_trainable", "local", "local_trainable", "none"]
ATTENTION_MODES = ("global", "global_trainable", "local", "local_trainable", "none")
#: attention modes whose Q/K/V stay at their random initialisation (the reference's "brief" mode): cached
FROZEN_MODES = ("global", "local")


def gcn_normalized_edges(adj: sp.spmatrix) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(edge_index, edge_weight)`` of ``D^-1/2 (A + I) D^-1/2`` for a binary, symmetric ``A``.

    ``A`` is symmetrised and binarised (the reference graph is undirected and unweighted) and self loops are added
    once, as torch-geometric's `gcn_norm` does. The weights are computed once on the whole graph, so the rows of a
    sub-graph that keeps all neighbours of a node (the interior of a tile) get exactly the full-graph values.
    """
    a = sp.csr_matrix(adj, dtype=np.float32)
    a = ((a + a.T) > 0).astype(np.float32)
    a.setdiag(0)
    a.eliminate_zeros()
    a = (a + sp.eye(a.shape[0], dtype=np.float32, format="csr")).tocoo()
    deg = np.asarray(a.sum(axis=1)).ravel()
    dinv = 1.0 / np.sqrt(deg)
    w = (dinv[a.row] * dinv[a.col]).astype(np.float32)
    # torch-geometric convention: edge_index[0] = source j, edge_index[1] = target i (messages j -> i)
    edge_index = torch.from_numpy(np.vstack([a.col, a.row]).astype(np.int64))
    return edge_index, torch.from_numpy(w)


def sparse_adjacency(edge_index: torch.Tensor, edge_weight: torch.Tensor, n: int) -> torch.Tensor:
    """Weighted adjacency as a torch CSR tensor with rows = targets (what `GCNConv` takes as `adj_t`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR tensor support is in beta state"
        coo = torch.sparse_coo_tensor(torch.stack([edge_index[1], edge_index[0]]), edge_weight, (n, n))
        return coo.coalesce().to_sparse_csr()


class CrossModalAttention(nn.Module):
    """StereoMM's cross-modal attention with one module shared by both directions.

    ``X_ta = X_t + W_o A(q=X_t, k=X_m, v=X_m)`` and ``X_ma = X_m + W_o A(q=X_m, k=X_t, v=X_t)``; ``W_q, W_k, W_v`` map
    ``dim -> proj_dim`` without bias, ``W_o`` maps ``proj_dim -> dim`` with bias, the score scale is
    ``1 / sqrt(proj_dim / n_heads)``.

    Parameters
    ----------
    dim
        Width ``s`` of both modalities.
    proj_dim
        Width of the query/key/value projections (256 in the reference).
    n_heads
        Number of heads; ``proj_dim`` must be divisible by it.
    mode
        ``'global'``: every spot attends to every spot (exact); ``W_q, W_k, W_v`` stay at their random
        initialisation as in the reference's "brief" attention, so the attention output before ``W_o`` is a constant
        that is computed once (chunked) and cached. ``'global_trainable'``: the same, with trainable projections
        (chunks are recomputed in the backward pass, so memory stays ``O(chunk * n)``). ``'local'``: each spot attends
        to its spatial neighbours and itself only (``O(edges)``), frozen and cached like ``'global'`` (computed once in
        blocks of query nodes). ``'local_trainable'``: the same with trainable projections (recomputed at every step,
        which costs several ``(edges x proj_dim)`` gathers per step). ``'none'``: no attention (identity).
    chunk_size
        Number of queries per chunk in global attention; `None` picks ``max(1, 2**25 // n)`` (128 MiB of scores).
    zero_init
        Start ``W_o`` at zero, so that the attention starts as the identity (residual only) and adds to the inputs
        only what training finds useful. The reference initialises ``W_o`` randomly, which with frozen random
        ``W_q, W_k, W_v`` adds noise to both modalities at the start.
    """

    def __init__(
        self,
        dim: int,
        proj_dim: int = 256,
        n_heads: int = 1,
        mode: AttentionMode = "global",
        chunk_size=None,
        zero_init: bool = False,
    ):
        super().__init__()
        if mode not in ATTENTION_MODES:
            msg = f"attention={mode!r} is not one of {ATTENTION_MODES}."
            raise ValueError(msg)
        if proj_dim % n_heads:
            msg = f"`proj_dim`={proj_dim} must be divisible by `n_heads`={n_heads}."
            raise ValueError(msg)
        self.dim, self.proj_dim, self.n_heads, self.mode = dim, proj_dim, n_heads, mode
        self.chunk_size = chunk_size
        self.zero_init = zero_init
        if mode == "none":
            return
        self.q = nn.Linear(dim, proj_dim, bias=False)
        self.k = nn.Linear(dim, proj_dim, bias=False)
        self.v = nn.Linear(dim, proj_dim, bias=False)
        self.out = nn.Linear(proj_dim, dim)
        if mode in FROZEN_MODES:
            for lin in (self.q, self.k, self.v):
                lin.weight.requires_grad_(False)
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.init_output()

    def init_output(self) -> None:
        """Zero ``W_o`` when ``zero_init`` (call after re-initialising the layers)."""
        if self.zero_init and self.mode != "none":
            with torch.no_grad():
                self.out.weight.zero_()
                self.out.bias.zero_()

    @property
    def frozen(self) -> bool:
        """Whether the attention output before ``W_o`` is constant (``'global'``, ``'local'``) and can be cached."""
        return self.mode in FROZEN_MODES

    def clear_cache(self) -> None:
        """Forget the cached attention output (call after changing ``W_q, W_k, W_v`` or the inputs)."""
        self._cache = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.n_heads, self.proj_dim // self.n_heads)

    def _chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (c, H, h), k/v: (n, H, h) -> (c, H, h); softmax(q k^T / sqrt(h)) v by the fused kernel
        scale = 1.0 / math.sqrt(self.proj_dim / self.n_heads)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale
        )
        return out.transpose(0, 1)

    def attend_global(self, xq: torch.Tensor, xkv: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Exact softmax attention of every row of ``xq`` over all rows of ``xkv``, in query chunks."""
        q, k, v = self._heads(self.q(xq)), self._heads(self.k(xkv)), self._heads(self.v(xkv))
        n = xkv.shape[0]
        cs = chunk_size or self.chunk_size or max(1, (1 << 25) // max(n, 1))
        outs = []
        use_ckpt = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        for i in range(0, q.shape[0], cs):
            qc = q[i : i + cs]
            if use_ckpt:
                outs.append(checkpoint(self._chunk, qc, k, v, use_reentrant=False))
            else:
                outs.append(self._chunk(qc, k, v))
        return torch.cat(outs, 0).reshape(xq.shape[0], self.proj_dim)

    def attend_local(self, xq: torch.Tensor, xkv: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Softmax attention of each node over its graph neighbours (``edge_index[0]`` = key, ``[1]`` = query)."""
        src, dst = edge_index[0], edge_index[1]
        q, k, v = self._heads(self.q(xq)), self._heads(self.k(xkv)), self._heads(self.v(xkv))
        scale = 1.0 / math.sqrt(self.proj_dim / self.n_heads)
        scores = (q[dst] * k[src]).sum(-1) * scale  # (E, H)
        alpha = scatter_softmax(scores, dst, num_nodes=xq.shape[0])
        out = torch.zeros_like(q).index_add_(0, dst, alpha.unsqueeze(-1) * v[src])
        return out.reshape(xq.shape[0], self.proj_dim)

    def attend_local_blocked(
        self, xq: torch.Tensor, xkv: torch.Tensor, edge_index: torch.Tensor, max_edges: int = 1 << 18
    ) -> torch.Tensor:
        """:meth:`attend_local` in blocks of query nodes with about `max_edges` edges each (bounded memory)."""
        src, dst = edge_index[0], edge_index[1]
        order = torch.argsort(dst, stable=True)
        src, dst = src[order], dst[order]
        n = xq.shape[0]
        starts = torch.searchsorted(dst, torch.arange(n + 1, device=dst.device))
        out = torch.empty(n, self.proj_dim, dtype=xq.dtype, device=xq.device)
        i = 0
        while i < n:
            j = int(torch.searchsorted(starts, starts[i] + max_edges, right=True)) - 1
            j = min(max(j, i + 1), n)
            e0, e1 = int(starts[i]), int(starts[j])
            sub = torch.stack([src[e0:e1], dst[e0:e1] - i])
            out[i:j] = self.attend_local(xq[i:j], xkv, sub) if e1 > e0 else 0.0
            i = j
        return out

    def attend(self, x_t, x_m, edge_index=None, chunk_size=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the attention outputs before ``W_o``: ``(A(q=x_t, kv=x_m), A(q=x_m, kv=x_t))``."""
        if self.mode in ("local", "local_trainable"):
            if edge_index is None:
                msg = f"attention={self.mode!r} needs the spatial graph (`edge_index`)."
                raise ValueError(msg)
            if not torch.is_grad_enabled():
                return self.attend_local_blocked(x_t, x_m, edge_index), self.attend_local_blocked(x_m, x_t, edge_index)
            return self.attend_local(x_t, x_m, edge_index), self.attend_local(x_m, x_t, edge_index)
        return self.attend_global(x_t, x_m, chunk_size), self.attend_global(x_m, x_t, chunk_size)

    @torch.no_grad()
    def build_cache(self, x_t: torch.Tensor, x_m: torch.Tensor, edge_index: torch.Tensor | None = None) -> None:
        """Compute and keep the frozen attention outputs for all spots (``'global'``; ``'local'`` with the graph)."""
        if not self.frozen:
            msg = f"only attention='global' or 'local' can be cached, not {self.mode!r}."
            raise ValueError(msg)
        self._cache = self.attend(x_t, x_m, edge_index)

    def forward(
        self,
        x_t: torch.Tensor,
        x_m: torch.Tensor,
        edge_index: torch.Tensor | None = None,
        *,
        idx: torch.Tensor | None = None,
        keys: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(X_ma, X_ta)``.

        Parameters
        ----------
        x_t, x_m
            Expression and image features of the spots in the batch (rows ``idx`` of the full data).
        edge_index
            Graph of the batch (local mode).
        idx
            Global row indices of the batch, used to read the cache (global mode) in mini-batch training.
        keys
            Full ``(x_t, x_m)`` for global_trainable mini-batches (queries from the batch, keys from all spots).
        """
        if self.mode == "none":
            return x_m, x_t
        if self.frozen:
            if self._cache is None:
                if idx is not None:
                    msg = "build the attention cache on all spots (`build_cache`) before mini-batch training."
                    raise RuntimeError(msg)
                self.build_cache(x_t, x_m, edge_index)
            h_t, h_m = self._cache
            if idx is not None:
                h_t, h_m = h_t[idx], h_m[idx]
        elif self.mode == "global_trainable" and keys is not None:
            h_t, h_m = self.attend_global(x_t, keys[1]), self.attend_global(x_m, keys[0])
        else:
            h_t, h_m = self.attend(x_t, x_m, edge_index)
        return x_m + self.out(h_m), x_t + self.out(h_t)


class VGAE(nn.Module):
    """Variational graph autoencoder with GCN layers and a GCN feature decoder (linear last layer).

    Encoder ``in -> hidden[0] -> ... -> hidden[-1]`` (GCN + ReLU), heads ``mu`` and ``logvar`` (GCN, linear),
    decoder mirrors the encoder back to ``in`` with GCN + ReLU and a linear last GCN layer. ``GCNConv`` runs with
    ``normalize=False`` on a sparse CSR adjacency normalised once for the whole graph (:func:`gcn_normalized_edges`,
    :func:`sparse_adjacency`).
    """

    def __init__(self, in_dim: int, hidden: list[int], n_latent: int, *, decoder_last_relu: bool = False):
        super().__init__()
        dims = [in_dim, *hidden]
        self.encoder = nn.ModuleList(GCNConv(a, b, normalize=False) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.mu = GCNConv(dims[-1], n_latent, normalize=False)
        self.logvar = GCNConv(dims[-1], n_latent, normalize=False)
        ddims = [n_latent, *reversed(hidden), in_dim]
        self.decoder = nn.ModuleList(GCNConv(a, b, normalize=False) for a, b in zip(ddims[:-1], ddims[1:], strict=True))
        self.decoder_last_relu = decoder_last_relu

    @property
    def n_hops(self) -> int:
        """Receptive field of a reconstructed spot, in graph hops."""
        return len(self.encoder) + 1 + len(self.decoder)

    def encode(self, x, adj):
        """Return ``(mu, logvar)``; ``adj`` is the normalised sparse adjacency (rows = targets)."""
        h = x
        for conv in self.encoder:
            h = torch.relu(conv(h, adj))
        return self.mu(h, adj), self.logvar(h, adj)

    def decode(self, z, adj):
        """Reconstruct the input features from ``z``."""
        h = z
        for i, conv in enumerate(self.decoder):
            h = conv(h, adj)
            if i < len(self.decoder) - 1 or self.decoder_last_relu:
                h = torch.relu(h)
        return h


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dimensions, averaged over spots."""
    return -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))


class StereoMMModule(nn.Module):
    """Cross-modal attention, fusion ``[X_ma, X_ta]`` (image first) and the VGAE.

    Without image features (``image_dim=0``) the attention is skipped and the VGAE sees ``X_t`` only.
    """

    def __init__(
        self,
        dim: int,
        *,
        use_image: bool = True,
        hidden: list[int] = (256, 64),
        n_latent: int = 32,
        proj_dim: int = 256,
        n_heads: int = 1,
        attention: AttentionMode = "global",
        chunk_size: int | None = None,
        decoder_last_relu: bool = False,
        zero_init_attention: bool = False,
    ):
        super().__init__()
        self.use_image = use_image
        self.attention = (
            CrossModalAttention(dim, proj_dim, n_heads, attention, chunk_size, zero_init=zero_init_attention)
            if use_image
            else CrossModalAttention(dim, proj_dim, n_heads, "none")
        )
        self.vgae = VGAE(dim * (2 if use_image else 1), list(hidden), n_latent, decoder_last_relu=decoder_last_relu)

    @property
    def n_hops(self) -> int:
        """Receptive field in graph hops (VGAE layers, plus one for trainable local attention; cached modes add none)."""
        return self.vgae.n_hops + (1 if self.attention.mode == "local_trainable" else 0)

    def inputs(self, x_t, x_m):
        """The reconstruction target: the pre-attention features ``[x_m, x_t]`` (or ``x_t``)."""
        return torch.cat([x_m, x_t], 1) if self.use_image else x_t

    def forward(self, x_t, x_m, adj, edge_index=None, *, idx=None, keys=None, sample=True):
        """Return ``(x_hat, mu, logvar, z)``; ``adj``: normalised sparse adjacency, ``edge_index``: for local attention."""
        if self.use_image:
            x_ma, x_ta = self.attention(x_t, x_m, edge_index, idx=idx, keys=keys)
            x = torch.cat([x_ma, x_ta], 1)
        else:
            x = x_t
        mu, logvar = self.vgae.encode(x, adj)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.vgae.decode(z, adj), mu, logvar, z
