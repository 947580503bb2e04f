"""Torch modules of mclSTExp: spot Transformer with learned position tables, projection heads, CLIP loss.

Architecture as described by Min et al. (2024) and its code (see `reference/mclstexp.md`), with the position tables
sized to the data instead of 65,536 rows. The "sequence" the spot Transformer attends over is the set of spots
passed together (a mini-batch), as in the reference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """`Linear -> GELU -> Linear -> Dropout`, plus the first Linear's output (residual), then `LayerNorm`."""

    def __init__(self, in_dim: int, out_dim: int = 256, dropout: float = 0.0):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(x + projected)


class _Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dim_head: int):
        super().__init__()
        inner = n_heads * dim_head
        self.n_heads = n_heads
        self.dim_head = dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, n, dim); attention over the n spots of each sequence
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.n_heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        attn = (q @ k.transpose(-1, -2)) * (self.dim_head**-0.5)
        out = attn.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.n_heads * self.dim_head))


class TransformerBlock(nn.Module):
    """Pre-norm block: `x + Attn(LN(x))`, then `x + FF(LN(x))` with `FF = Linear(dim, mlp) -> GELU -> Linear`."""

    def __init__(self, dim: int, n_heads: int = 8, dim_head: int = 64, mlp_dim: int | None = None):
        super().__init__()
        mlp_dim = dim if mlp_dim is None else mlp_dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, n_heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class SpotEncoder(nn.Module):
    """Expression plus learned x/y position tables, then `n_layers` Transformer blocks over the spots passed together.

    With `use_positions=False` and `n_layers=0` it is the identity (BLEEP's spot side).
    """

    def __init__(
        self,
        n_genes: int,
        n_x: int,
        n_y: int,
        *,
        n_heads: int = 8,
        dim_head: int = 64,
        n_layers: int = 2,
        use_positions: bool = True,
    ):
        super().__init__()
        self.use_positions = use_positions
        if use_positions:
            self.x_embed = nn.Embedding(max(int(n_x), 1), n_genes)
            self.y_embed = nn.Embedding(max(int(n_y), 1), n_genes)
        self.blocks = nn.ModuleList(
            [TransformerBlock(n_genes, n_heads=n_heads, dim_head=dim_head) for _ in range(n_layers)]
        )

    def forward(self, expr: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Encode `expr` (n, n_genes) with positions `pos` (n, 2) long `(x, y)`; the n spots form one sequence."""
        h = expr
        if self.use_positions:
            h = h + self.x_embed(pos[:, 0]) + self.y_embed(pos[:, 1])
        if len(self.blocks):
            h = h.unsqueeze(0)
            for block in self.blocks:
                h = block(h)
            h = h.squeeze(0)
        return h


class MclSTExpModule(nn.Module):
    """Spot and image towers projected to a shared space, trained with a symmetric CLIP loss.

    Parameters
    ----------
    n_genes, img_dim
        Width of the expression vector and of the image features (or of the image encoder output).
    n_x, n_y
        Rows of the x and y position tables (max array coordinate + 1).
    projection_dim, dropout
        Width of the joint space and dropout of the projection heads.
    image_encoder
        Optional `nn.Module` mapping `(n, 3, h, w)` images in `[-1, 1]`-ish scale to `(n, img_dim)` features
        (fine-tuning path). `None`: the image input is a feature vector.
    temperature
        Logit temperature (reference: 1.0 on unnormalised LayerNorm outputs).
    l2_normalize
        L2-normalise the embeddings before the dot product (CLIP), instead of the reference's raw dot product.
    learn_temperature
        Learn the temperature (as `log(1/T)`, clamped to T >= 0.01).
    **spot_kwargs
        Keyword arguments of :class:`SpotEncoder` (`n_heads`, `dim_head`, `n_layers`, `use_positions`).
    """

    def __init__(
        self,
        n_genes: int,
        img_dim: int,
        n_x: int,
        n_y: int,
        *,
        projection_dim: int = 256,
        dropout: float = 0.0,
        image_encoder: nn.Module | None = None,
        temperature: float = 1.0,
        l2_normalize: bool = False,
        learn_temperature: bool = False,
        **spot_kwargs,
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.spot_encoder = SpotEncoder(n_genes, n_x, n_y, **spot_kwargs)
        self.image_projection = ProjectionHead(img_dim, projection_dim, dropout)
        self.spot_projection = ProjectionHead(n_genes, projection_dim, dropout)
        self.l2_normalize = l2_normalize
        log_scale = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        if learn_temperature:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

    @property
    def logit_scale(self) -> torch.Tensor:
        """`1 / temperature` (clamped to at most 100)."""
        return self.log_logit_scale.clamp(max=math.log(100.0)).exp()

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings from features `(n, img_dim)`, or from images `(n, 3, h, w)` with an image encoder."""
        if self.image_encoder is not None and x.ndim == 4:
            x = self.image_encoder(x)
        z = self.image_projection(x)
        return F.normalize(z, dim=-1) if self.l2_normalize else z

    def embed_spot(self, expr: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Spot embeddings of `expr` (n, n_genes) and positions `pos` (n, 2); the n spots are one sequence."""
        z = self.spot_projection(self.spot_encoder(expr, pos))
        return F.normalize(z, dim=-1) if self.l2_normalize else z

    def forward(self, image: torch.Tensor, expr: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Return the symmetric CLIP loss of one batch of matching (image, spot) pairs."""
        img = self.embed_image(image)
        spot = self.embed_spot(expr, pos)
        return clip_loss(spot, img, self.logit_scale)


def clip_loss(spot: torch.Tensor, img: torch.Tensor, logit_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Symmetric cross-entropy of `spot @ img.T * logit_scale` with identity targets (hard CLIP targets)."""
    logits = spot @ img.T * logit_scale
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The reference's image augmentation on a float batch `(b, 3, h, w)` in [0, 1]: colour jitter, flips, rotations."""
    b = x.shape[0]
    r = torch.rand(b, 6, generator=generator).to(x.device)
    bright = (0.5 + r[:, 0]).view(b, 1, 1, 1)
    x = (x * bright).clamp(0, 1)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    contrast = (0.5 + r[:, 1]).view(b, 1, 1, 1)
    x = ((x - grey.mean((2, 3), keepdim=True)) * contrast + grey.mean((2, 3), keepdim=True)).clamp(0, 1)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    sat = (0.5 + r[:, 2]).view(b, 1, 1, 1)
    x = ((x - grey) * sat + grey).clamp(0, 1)
    hflip = r[:, 3] < 0.5
    x = torch.where(hflip.view(b, 1, 1, 1), x.flip(-1), x)
    k = (r[:, 4] * 4).long()
    out = x.clone()
    for q in range(1, 4):
        sel = k == q
        if sel.any():
            out[sel] = torch.rot90(x[sel], q, dims=(2, 3))
    return out


@torch.no_grad()
def knn_predict(
    emb: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    *,
    n_neighbors: int,
    weighting: str,
    logit_scale: float,
    batch_size: int,
    device,
) -> np.ndarray:
    """Weighted mean of `values` over the cosine top-`n_neighbors` rows of `keys` for every row of `emb`.

    Weights: `'softmax'` of `logit_scale * q . k`, `'inverse_square'` `1/d^2` of the Euclidean distance, or
    `'uniform'`. Queries go in chunks that keep the `(chunk x n_keys)` similarity matrix near 64 MB.
    """
    dev = device
    keys = torch.from_numpy(np.asarray(keys, dtype=np.float32)).to(dev)
    key_sq = (keys**2).sum(dim=1)
    values = torch.from_numpy(np.asarray(values, dtype=np.float32)).to(dev)
    out = np.zeros((emb.shape[0], values.shape[1]), dtype=np.float32)
    chunk = max(1, min(batch_size, (16 * 2**20) // max(keys.shape[0], 1)))
    for lo in range(0, emb.shape[0], chunk):
        q = torch.from_numpy(emb[lo : lo + chunk]).to(dev)
        dots = q @ keys.T
        sim = dots / (q.norm(dim=1, keepdim=True).clamp_min(1e-12) * keys.norm(dim=1).clamp_min(1e-12))
        top_idx = torch.topk(sim, n_neighbors, dim=1).indices
        if weighting == "uniform":
            w = torch.full(top_idx.shape, 1.0 / n_neighbors, device=dev)
        elif weighting == "softmax":
            w = torch.softmax(dots.gather(1, top_idx) * logit_scale, dim=1)
        else:
            d2 = ((q**2).sum(dim=1, keepdim=True) + key_sq[top_idx] - 2 * dots.gather(1, top_idx)).clamp_min(1e-12)
            w = 1.0 / d2
            w = w / w.sum(dim=1, keepdim=True)
        weights = torch.zeros_like(sim).scatter_(1, top_idx, w)  # sparse rows: k non-zeros each
        out[lo : lo + q.shape[0]] = (weights @ values).float().cpu().numpy()
    return out
