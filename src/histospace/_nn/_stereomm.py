"""Torch modules of StereoMM: cross-modal attention and the variational graph autoencoder (VGAE).

Nothing here builds a dense ``n x n`` matrix. Global attention is exact but computed in query chunks (memory
``O(chunk * n)``); local attention is restricted to the edges of the spatial graph (``O(edges)``); GCN layers use a
sparse, pre-normalised edge list.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from histospace._utils._deps import quiet_import

GCNConv = quiet_import("torch_geometric.nn").GCNConv
scatter_softmax = quiet_import("torch_geometric.utils").softmax

AttentionMode = Literal["global", "global_trainable", "local", "local_trainable", "none"]
ATTENTION_MODES = ("global", "global_trainable", "local", "local_trainable", "none")
#: attention modes whose Q/K/V stay at their random initialisation (the reference's "brief" mode): cached
FROZEN_MODES = ("global", "local")


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
        # the cached attention outputs before W_o (frozen modes); buffers so that `.to(device)` moves them
        self.register_buffer("cache_t", None, persistent=False)
        self.register_buffer("cache_m", None, persistent=False)
        self._zero_output()

    def _zero_output(self) -> None:
        if self.zero_init:
            with torch.no_grad():
                self.out.weight.zero_()
                self.out.bias.zero_()

    def reset_parameters(self) -> None:
        """Re-initialise the projections (torch's default), zero ``W_o`` when ``zero_init``, forget the cache."""
        if self.mode == "none":
            return
        for lin in (self.q, self.k, self.v, self.out):
            lin.reset_parameters()
        self._zero_output()
        self.clear_cache()

    @property
    def frozen(self) -> bool:
        """Whether the attention output before ``W_o`` is constant (``'global'``, ``'local'``) and can be cached."""
        return self.mode in FROZEN_MODES

    @property
    def is_cached(self) -> bool:
        """Whether the attention outputs are cached."""
        return self.mode != "none" and self.cache_t is not None

    def clear_cache(self) -> None:
        """Forget the cached attention outputs (after changing ``W_q, W_k, W_v`` or the inputs)."""
        if self.mode != "none":
            self.cache_t = self.cache_m = None

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
        self.cache_t, self.cache_m = self.attend(x_t, x_m, edge_index)

    def forward(
        self, x_t: torch.Tensor, x_m: torch.Tensor, edge_index: torch.Tensor | None = None, *, idx=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(X_ma, X_ta)`` of all spots, or of the batch ``idx``.

        Parameters
        ----------
        x_t, x_m
            Expression and image features of all spots.
        edge_index
            Graph of all spots, or of the batch when ``idx`` is given (local modes).
        idx
            Rows of the batch (mini-batch training): queries from the batch; keys from all spots in
            ``'global_trainable'`` mode, from the batch graph in the local modes; frozen modes read their cache, which
            must have been built on all spots (:meth:`build_cache`).
        """
        b_t, b_m = (x_t, x_m) if idx is None else (x_t[idx], x_m[idx])
        if self.mode == "none":
            return b_m, b_t
        if self.frozen:
            if self.cache_t is None:
                if idx is not None:
                    msg = "build the attention cache on all spots (`build_cache`) before mini-batch training."
                    raise RuntimeError(msg)
                self.build_cache(x_t, x_m, edge_index)
            h_t, h_m = (self.cache_t, self.cache_m) if idx is None else (self.cache_t[idx], self.cache_m[idx])
        elif self.mode == "global_trainable" and idx is not None:
            h_t, h_m = self.attend_global(b_t, x_m), self.attend_global(b_m, x_t)
        else:
            h_t, h_m = self.attend(b_t, b_m, edge_index)
        return b_m + self.out(h_m), b_t + self.out(h_t)


class GraphVAE(nn.Module):
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

    def reset_parameters(self) -> None:
        """Re-initialise every GCN layer."""
        for conv in (*self.encoder, self.mu, self.logvar, *self.decoder):
            conv.reset_parameters()

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
    """Cross-modal attention, fusion ``[X_ma, X_ta]`` (image first), the graph VAE and its loss.

    Without image features (``use_image=False``) the attention is skipped and the VAE sees ``X_t`` only.
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
        contrastive: bool = False,
    ):
        super().__init__()
        self.use_image = use_image
        self.attention = (
            CrossModalAttention(dim, proj_dim, n_heads, attention, chunk_size, zero_init=zero_init_attention)
            if use_image
            else CrossModalAttention(dim, proj_dim, n_heads, "none")
        )
        self.vgae = GraphVAE(dim * (2 if use_image else 1), list(hidden), n_latent, decoder_last_relu=decoder_last_relu)
        #: the local-global discriminator of the contrastive term (Deep Graph Infomax, as GraphST uses), when asked
        self.discriminator = nn.Bilinear(n_latent, n_latent, 1) if contrastive else None

    @property
    def n_hops(self) -> int:
        """Receptive field in graph hops (VAE layers, plus one for trainable local attention; cached modes add none)."""
        return self.vgae.n_hops + (1 if self.attention.mode == "local_trainable" else 0)

    def reset_parameters(self) -> None:
        """Re-initialise the attention (zero-init and cache included) and the graph VAE."""
        self.attention.reset_parameters()
        self.vgae.reset_parameters()
        if self.discriminator is not None:
            self.discriminator.reset_parameters()

    @torch.no_grad()
    def prepare(self, x_t: torch.Tensor, x_m: torch.Tensor | None, edge_index: torch.Tensor | None = None) -> None:
        """Cache the frozen attention on all spots when the mode allows it and it is not cached yet."""
        if self.use_image and self.attention.frozen and not self.attention.is_cached:
            self.attention.build_cache(x_t, x_m, edge_index)

    def inputs(self, x_t, x_m):
        """The reconstruction target: the pre-attention features ``[x_m, x_t]`` (or ``x_t``)."""
        return torch.cat([x_m, x_t], 1) if self.use_image else x_t

    def fused(self, x_t, x_m, edge_index=None, *, idx=None):
        """The VAE's input: ``[X_ma, X_ta]`` after the attention (or ``X_t``), of all spots or of the batch ``idx``."""
        if self.use_image:
            x_ma, x_ta = self.attention(x_t, x_m, edge_index, idx=idx)
            return torch.cat([x_ma, x_ta], 1)
        return x_t if idx is None else x_t[idx]

    def forward(self, x_t, x_m, adj, edge_index=None, *, idx=None, sample=True, _x=None):
        """Return ``(x_hat, mu, logvar, z)`` of all spots or of the batch ``idx``.

        ``x_t``, ``x_m``: features of all spots; ``adj``: normalised sparse adjacency of the spots (of the batch when
        ``idx`` is given), ``edge_index``: its edges, for local attention.
        """
        x = self.fused(x_t, x_m, edge_index, idx=idx) if _x is None else _x
        mu, logvar = self.vgae.encode(x, adj)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.vgae.decode(z, adj), mu, logvar, z

    def contrastive_loss(self, x, mu, adj, readout, n_seeds=None):
        """Deep Graph Infomax term of GraphST: tell each spot's latent from that of shuffled features, both against
        the summary of its neighbours' latents (``readout``: row-normalised neighbours, no self loops), and back.
        """  # noqa: D205
        mu_c, _ = self.vgae.encode(x[torch.randperm(x.shape[0], device=x.device)], adj)
        s = torch.nn.functional.normalize(torch.sigmoid(readout @ mu), dim=1)
        s_c = torch.nn.functional.normalize(torch.sigmoid(readout @ mu_c), dim=1)
        n = mu.shape[0] if n_seeds is None else n_seeds
        d = self.discriminator
        logits = torch.cat([d(mu[:n], s[:n]), d(mu_c[:n], s[:n]), d(mu_c[:n], s_c[:n]), d(mu[:n], s_c[:n])]).ravel()
        labels = torch.cat([torch.ones(n), torch.zeros(n), torch.ones(n), torch.zeros(n)]).to(logits)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)

    def loss(
        self,
        x_t,
        x_m,
        adj,
        edge_index=None,
        *,
        idx=None,
        n_seeds=None,
        kl_weight: float,
        readout=None,
        contrastive_weight: float = 0.0,
    ):
        """Return ``(loss, reconstruction, kl)``: MSE to the pre-attention features plus ``kl_weight`` x KL (plus
        ``contrastive_weight`` x the contrastive term when the module has a discriminator and ``readout`` is given).

        With a batch ``idx`` the terms are taken over its first ``n_seeds`` nodes (the tile; the rest is its halo).
        """  # noqa: D205
        x = self.fused(x_t, x_m, edge_index, idx=idx)
        x_hat, mu, logvar, _ = self.forward(x_t, x_m, adj, edge_index, idx=idx, _x=x)
        cl = None
        if self.discriminator is not None and readout is not None and contrastive_weight > 0:
            cl = self.contrastive_loss(x, mu, adj, readout, n_seeds)
        if idx is None:
            target = self.inputs(x_t, x_m)
        else:
            seeds = idx[:n_seeds]
            target = self.inputs(x_t[seeds], None if x_m is None else x_m[seeds])
            x_hat, mu, logvar = x_hat[:n_seeds], mu[:n_seeds], logvar[:n_seeds]
        rec = torch.nn.functional.mse_loss(x_hat, target)
        kl = kl_divergence(mu, logvar)
        total = rec + kl_weight * kl
        return (total if cl is None else total + contrastive_weight * cl), rec, kl
