"""Pathology foundation models (vision transformers built through timm) as image encoders.

:data:`PATHOLOGY_ENCODERS` maps a name (`'uni'`, `'uni2-h'`, `'h-optimus-0'`, `'h0-mini'`, `'virchow2'`,
`'phikon-v2'`, `'gigapath'`) to a :class:`PathologyModel`: the timm architecture and its arguments, the input size,
normalisation, the resolution it was trained at, its pooling, its widths, parameter count and licence, each with the
source it was taken from. :func:`build_pathology_encoder` builds one as a :class:`PathologyEncoder`, an
:class:`~histospace._image.encoders._torchvision.ImageEncoder` (`(B, 3, H, W)` floats in `[0, 1]` -> `(B, d)`, normalising itself)
that also gives the patch-token map (:meth:`PathologyEncoder.feature_map`). Weights come from a local file in the
formats the model cards publish (`pytorch_model.bin`, `model.safetensors`, HuggingFace-transformers DINOv2 layout for
Phikon-v2, the original DINOv2 layout), from the HuggingFace hub through timm's `hf-hub:` loader (`weights='hub'`), or
are random (`weights=None`, seeded, nothing downloaded).

Nothing heavy is imported at module level except torch (as in `_encoders`); timm, safetensors and huggingface_hub are
imported when a model is built.

The registry lives in `_pathology_registry` and the weights (files, key layouts, hub) in `_pathology_weights`; this
module holds the encoder classes and the builder, and gathers the names of the other two.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from scanpy import logging as logg
from torch import nn

from histospace._image.encoders._registry import (
    _POOLINGS,
    HOPTIMUS_MEAN,
    HOPTIMUS_STD,
    PATHOLOGY_ENCODERS,
    PathologyModel,
    Pooling,
    count_parameters,
    create_vit,
    get_pathology_model,
    is_pathology_encoder,
    replace_model,
)
from histospace._image.encoders._torchvision import ImageEncoder, _as_triplet
from histospace._image.encoders._weights import (
    _from_hub,
    _hub_id,
    convert_dinov2,
    convert_hf_dinov2,
    load_into_vit,
    read_checkpoint,
    to_timm_layout,
)

__all__ = [
    "HOPTIMUS_MEAN",
    "HOPTIMUS_STD",
    "PATHOLOGY_ENCODERS",
    "PathologyEncoder",
    "PathologyModel",
    "ViTTrunk",
    "build_pathology_encoder",
    "convert_dinov2",
    "convert_hf_dinov2",
    "count_parameters",
    "create_vit",
    "get_pathology_model",
    "is_pathology_encoder",
    "load_into_vit",
    "read_checkpoint",
    "replace_model",
    "to_timm_layout",
]


class ViTTrunk(nn.Module):
    """A timm ViT as a trunk: normalised `(B, 3, H, W)` -> pooled `(B, d)`, or the patch-token map.

    Parameters
    ----------
    vit
        timm `VisionTransformer` (`num_classes=0`, `dynamic_img_size=True`).
    pooling
        `'cls'` or `'cls+mean'` (class token concatenated with the mean of the patch tokens; registers excluded).
    """

    def __init__(self, vit: nn.Module, *, pooling: Pooling = "cls"):
        super().__init__()
        if pooling not in _POOLINGS:
            msg = f"`pooling` must be one of {_POOLINGS}, got {pooling!r}."
            raise ValueError(msg)
        self.vit = vit
        self.pooling = pooling
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.embed_dim = int(vit.embed_dim)
        self.patch_size = int(vit.patch_embed.patch_size[0])

    @property
    def out_dim(self) -> int:
        """Width of the pooled features."""
        return self.embed_dim * (2 if self.pooling == "cls+mean" else 1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm: `(B, prefix + h * w, C)` (class, registers, patches).

        Sides that are not multiples of the patch size are cropped to the largest multiple (bottom/right).
        """
        p = self.patch_size
        height, width = x.shape[-2] // p * p, x.shape[-1] // p * p
        if height == 0 or width == 0:
            msg = f"The input ({x.shape[-2]} x {x.shape[-1]} px) is smaller than one ViT patch ({p} px)."
            raise ValueError(msg)
        if (height, width) != tuple(x.shape[-2:]):
            x = x[..., :height, :width]
        return self.vit.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features `(B, d)` of a normalised batch."""
        t = self.tokens(x)
        cls = t[:, 0]
        if self.pooling == "cls":
            return cls
        return torch.cat([cls, t[:, self.num_prefix_tokens :].mean(dim=1)], dim=1)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid `(h, w)` of an input of `height x width` pixels (`floor(side / patch_size)`)."""
        return int(height) // self.patch_size, int(width) // self.patch_size

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens as a map `(B, C, H // p, W // p)` (class and register tokens dropped), `p = patch_size`."""
        b, _, height, width = x.shape
        h, w = self.grid_size(height, width)
        t = self.tokens(x)[:, self.num_prefix_tokens :]
        return t.transpose(1, 2).reshape(b, t.shape[-1], h, w)


class PathologyEncoder(ImageEncoder):
    """An :class:`~histospace._image.encoders._torchvision.ImageEncoder` around a pathology ViT.

    `forward`: `(B, 3, H, W)` floats in `[0, 1]` -> `(B, d)` (normalised with the model's mean/std, pooled as its
    card says). :meth:`feature_map`: the patch-token map `(B, embed_dim, H // p, W // p)`. Attributes `pooling`,
    `patch_size` (p), `mpp`, `input_size`, `patch_size_um` and `model` (the registry entry) describe it.
    """

    def __init__(self, trunk: ViTTrunk, model: PathologyModel, *, mean, std, weights: str):
        super().__init__(trunk, out_dim=trunk.out_dim, mean=mean, std=std, name=model.name, weights=weights)
        self.model = model
        self.pooling = trunk.pooling
        self.patch_size = trunk.patch_size
        self.embed_dim = trunk.embed_dim
        self.mpp = float(model.mpp)
        self.input_size = int(model.input_size)
        self.patch_size_um = model.patch_size_um

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Map `(B, 3, H, W)` floats in `[0, 1]` to patch tokens `(B, embed_dim, H // p, W // p)`.

        Every token attends to the whole input (global self-attention), so unlike a CNN map a token depends on all of
        the tile, not only on its own `p x p` pixels; tiles of the model's `input_size` (or near it) at its `mpp` keep
        the tokens closest to what the model was trained on. Sides that are not multiples of `p` are floored.
        """
        x = (x - self.mean) / self.std
        return self.backbone.feature_map(x)


def build_pathology_encoder(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    mean=None,
    std=None,
    pooling: Pooling | None = None,
    random_state: int | None = 0,
    layers: str = "last",
    tf_padding: bool = False,
) -> tuple[PathologyEncoder, int, dict]:
    """Build a pathology foundation model as an image encoder: `(B, 3, H, W)` RGB in `[0, 1]` -> `(B, d)`.

    Parameters
    ----------
    name
        A key of :data:`PATHOLOGY_ENCODERS`: `'uni'`, `'uni2-h'`, `'h-optimus-0'`, `'h0-mini'`, `'virchow2'`,
        `'phikon-v2'`, `'gigapath'`.
    weights
        `None`: random initialisation seeded with `random_state` (nothing is downloaded). A path: the model's weights
        file as published (`pytorch_model.bin`, `model.safetensors`; Phikon-v2's transformers layout and the original
        DINOv2 layout are converted), or a folder holding one (a HuggingFace snapshot). `'hub'`, `'hf-hub:<org/name>'`
        or the repository name: download through timm's `hf-hub:` loader (Phikon-v2: `huggingface_hub`), cached in
        the HuggingFace cache; gated repositories need an accepted access request and a login.
    mean, std
        Normalisation of the `[0, 1]` input; `None` uses the model's (see :class:`PathologyModel`).
    pooling
        `'cls'` or `'cls+mean'`; `None` uses the model card's.
    random_state
        Seed of the random initialisation.
    layers, tf_padding
        Options of the CNN encoders; only `'last'` / `False` apply to a ViT.

    Returns
    -------
    `(encoder, d, info)`: the :class:`PathologyEncoder` in eval mode on the CPU, the feature width and `info` with
    `encoder`, `weights` (`'random'`, the file path or `'hf-hub:<repo>'`), `mean`, `std`, `pooling`, `mpp`,
    `input_size`, `patch_size_um` (default patch side in µm), `token_size` (ViT patch side in pixels) and `out_dim`.
    """
    entry = get_pathology_model(name)
    if layers != "last":
        msg = (
            f"`layers={layers!r}` applies to the CNN encoders only; the pathology encoder {entry.name!r} takes 'last'."
        )
        raise ValueError(msg)
    if tf_padding:
        msg = f"`tf_padding=True` applies to the CNN encoders only, not to the pathology encoder {entry.name!r}."
        raise ValueError(msg)
    pool = entry.pooling if pooling is None else pooling
    if pool not in _POOLINGS:
        msg = f"`pooling` must be one of {_POOLINGS} or None, got {pooling!r}."
        raise ValueError(msg)
    mean_t = _as_triplet(entry.mean if mean is None else mean, "mean")
    std_t = _as_triplet(entry.std if std is None else std, "std")

    if weights is None:
        label = "random"
        vit = create_vit(entry, random_state=random_state)
    elif isinstance(weights, str | os.PathLike):
        hub = _hub_id(entry, str(weights)) if isinstance(weights, str) else None
        if isinstance(weights, str) and weights.strip().lower() == "imagenet":
            msg = (
                f"The pathology encoder {entry.name!r} has no ImageNet weights. Pass `weights=` the path of its "
                f"weights file ({entry.url}), `weights='hub'` to download it, or `weights=None` for random init."
            )
            raise ValueError(msg)
        if hub is not None:
            label = f"hf-hub:{hub}"
            start = logg.info(f"loading {entry.title} weights from the HuggingFace hub ({hub})")
            vit = _from_hub(entry, hub)
            logg.info("    loaded", time=start)
        else:
            path = Path(weights).expanduser().resolve()
            label = str(path)
            start = logg.info(f"loading {entry.title} weights from {label}")
            vit = load_into_vit(entry, read_checkpoint(path), source=label)
            logg.info("    loaded", time=start)
    else:
        msg = f"`weights` must be a file path, 'hub' or None, got {type(weights).__name__}."
        raise TypeError(msg)

    trunk = ViTTrunk(vit, pooling=pool)
    enc = PathologyEncoder(trunk, entry, mean=mean_t, std=std_t, weights=label)
    enc.eval()
    d = trunk.out_dim
    info = {
        "encoder": entry.name,
        "weights": label,
        "mean": list(mean_t),
        "std": list(std_t),
        "pooling": pool,
        "mpp": float(entry.mpp),
        "input_size": int(entry.input_size),
        "patch_size_um": float(entry.patch_size_um),
        "token_size": int(trunk.patch_size),
        "out_dim": int(d),
    }
    return enc, d, info
