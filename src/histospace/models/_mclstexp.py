"""mclSTExp: contrastive spot/image embedding and expression prediction by nearest reference spots.

See :class:`MclSTExp`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scanpy import logging as logg
from tqdm.auto import tqdm

from histospace._nn._mclstexp import MclSTExpModule
from histospace._utils import (
    check_no_nan,
    check_random_state,
    check_unique_obs_names,
    get_matrix,
    make_generator,
    resolve_device,
    seed_everything,
    version_string,
)
from histospace._utils._image import ImageSource, crop_patches, open_image, resize_patches

_NORMALIZE = ("log1p_cp10k", "log10_cp10k", "none")
_WEIGHTING = ("inverse_square", "uniform", "softmax")
_FEATURES_HINT = (
    "Compute image features first, e.g. `hs.pp.image_features(adata, encoder='mobilenet_v2', weights=...)`, "
    "or pass `image_key=` naming the `adata.obsm` key that holds them."
)


def normalize_expression(x: np.ndarray, method: str) -> np.ndarray:
    """Normalise panel expression per spot: `'log1p_cp10k'` = `ln(1 + 1e4 x / sum)`, `'log10_cp10k'` = reference."""
    x = np.asarray(x, dtype=np.float64)
    if method == "none":
        return x.astype(np.float32)
    s = x.sum(axis=1, keepdims=True)
    x = np.divide(1e4 * x, s, out=np.zeros_like(x), where=s > 0)
    out = np.log1p(x) if method == "log1p_cp10k" else np.log10(1.0 + x)
    return out.astype(np.float32)


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x)


def _select_genes(adata: AnnData, layer: str | None, n_top_genes: int, library_key: str | None) -> list[str]:
    """Highly variable genes of the reference only (Seurat flavour on log-CP10k, per slide when several)."""
    import scanpy as sc

    tmp = AnnData(X=sp.csr_matrix(get_matrix(adata, layer, counts=True), dtype=np.float32), obs=adata.obs[[]].copy())
    tmp.var_names = adata.var_names
    if library_key is not None and library_key in adata.obs:
        tmp.obs["_lib"] = adata.obs[library_key].astype(str).to_numpy()
    n_spots = np.asarray((tmp.X > 0).sum(axis=0)).ravel()
    tmp = tmp[:, n_spots >= max(3, int(0.01 * tmp.n_obs))].copy()
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    n_top = min(n_top_genes, tmp.n_vars)
    batch = "_lib" if "_lib" in tmp.obs and tmp.obs["_lib"].nunique() > 1 else None
    sc.pp.highly_variable_genes(tmp, n_top_genes=n_top, batch_key=batch, flavor="seurat")
    return tmp.var_names[tmp.var["highly_variable"].to_numpy()].tolist()


def _grid_positions(xy: np.ndarray, libs: np.ndarray) -> np.ndarray:
    """Quantise pixel coordinates to a grid (pitch = median nearest-neighbour distance) per slide; `(x, y)`."""
    from scipy.spatial import cKDTree

    out = np.zeros((xy.shape[0], 2), dtype=np.int64)
    for lib in np.unique(libs):
        m = libs == lib
        p = xy[m]
        if p.shape[0] > 1:
            d, _ = cKDTree(p).query(p, k=2)
            pitch = float(np.median(d[:, 1])) or 1.0
        else:
            pitch = 1.0
        out[m] = np.rint((p - p.min(axis=0)) / pitch).astype(np.int64)
    return out


def _check_feature_params(ref: dict | None, query: dict | None, image_key: str) -> None:
    """Compare `uns[image_key]['params']` of the reference and the query (encoder, weights, patch size)."""
    if not ref or not query:
        return
    for k in ("encoder", "weights", "patch_size_px", "patch_size_um"):
        if k in ref and k in query and str(ref[k]) != str(query[k]):
            msg = (
                f"`adata.uns[{image_key!r}]['params'][{k!r}]` is {query[k]!r} but the model was trained on features "
                f"with {k}={ref[k]!r}. Recompute the query features with the same settings "
                "(`hs.pp.image_features`) as the reference."
            )
            raise ValueError(msg)


# --------------------------------------------------------------------------------------------------------------
# image patches (fine-tuning path)
# --------------------------------------------------------------------------------------------------------------
def _image_of_library(adata: AnnData, lib: str, img) -> tuple[ImageSource, float]:
    """The image of one slide and the factor from `obsm['spatial']` (full-resolution pixels) to its pixels.

    In this order: `img` (array, path or `ImageContainer`; a dict `{library_id: img}` for several slides, taken as full
    resolution), `uns['spatial'][lib]['metadata']['source_image_path']`, `uns['spatial'][lib]['images']['hires']`
    with `tissue_hires_scalef`.
    """
    if img is not None:
        if isinstance(img, dict):
            if lib not in img:
                msg = f"`img` is a dict without library {lib!r}; pass one image per library id."
                raise KeyError(msg)
            img = img[lib]
        return open_image(img, kind="img").load(), 1.0
    entry = adata.uns.get("spatial", {}).get(lib)
    if entry is None:
        msg = (
            f"No image for library {lib!r}: pass `img=` or store it in `adata.uns['spatial'][{lib!r}]` "
            "(`['metadata']['source_image_path']` or `['images']['hires']`)."
        )
        raise KeyError(msg)
    path = (entry.get("metadata", {}) or {}).get("source_image_path")
    if path and Path(path).expanduser().is_file():
        return open_image(path, kind="fullres").load(), 1.0
    images = entry.get("images", {}) or {}
    if images.get("hires") is not None and "tissue_hires_scalef" in entry.get("scalefactors", {}):
        scale = float(entry["scalefactors"]["tissue_hires_scalef"])
        return open_image(np.asarray(images["hires"]), kind="hires", scale=scale), scale
    msg = (
        f"`adata.uns['spatial'][{lib!r}]` holds no usable image (full-resolution path or `hires` + scale); pass `img=`."
    )
    raise KeyError(msg)


def extract_patches(
    adata: AnnData,
    *,
    img=None,
    library_key: str | None = "library_id",
    spatial_key: str = "spatial",
    patch_size: int = 224,
    input_size: int = 224,
    batch_size: int = 256,
) -> np.ndarray:
    """Return RGB uint8 patches `(n_obs, input_size, input_size, 3)` around `obsm[spatial_key]` (full-res pixels).

    The image of each slide is, in this order: `img` (array, path or `ImageContainer`; a dict `{library_id: img}` for
    several slides), `uns['spatial'][lib]['metadata']['source_image_path']` (full resolution), or
    `uns['spatial'][lib]['images']['hires']` scaled by `tissue_hires_scalef`. Cropping and resizing are those of
    :func:`histospace.pp.image_features` (`histospace._utils._image`: white padding outside the image, bilinear
    resizing with antialiasing, exact sub-pixel boxes when upsampling).
    """
    if spatial_key not in adata.obsm:
        msg = f"`adata.obsm[{spatial_key!r}]` not found; image patches need spot centres in full-resolution pixels."
        raise KeyError(msg)
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if library_key is not None and library_key in adata.obs:
        libs = adata.obs[library_key].astype(str).to_numpy()
    else:
        spatial = adata.uns.get("spatial", {})
        libs = np.full(adata.n_obs, next(iter(spatial)) if len(spatial) == 1 else "_img", dtype=object)
    out = np.empty((adata.n_obs, input_size, input_size, 3), dtype=np.uint8)
    for lib in pd.unique(libs):
        m = np.flatnonzero(libs == lib)
        src, scale = _image_of_library(adata, lib, img)
        size = patch_size * scale
        exact = size < input_size
        for lo in range(0, m.size, batch_size):
            idx = m[lo : lo + batch_size]
            c = xy[idx] * scale
            crops = torch.from_numpy(crop_patches(src, c, size, input_size, exact=exact))
            x = resize_patches(crops, input_size, centres=c, size=size, exact=exact)
            out[idx] = x.mul(255.0).round_().clamp_(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def _build_encoder(encoder, weights, *, mean, std, input_size: int) -> tuple[torch.nn.Module, int]:
    """Image encoder `(n, 3, h, w)` in [0, 1] -> `(n, d)` from `histospace._nn._encoders.build_encoder`.

    It normalises with `mean`/`std` itself; `encoder` is an architecture name or a `torch.nn.Module`.
    """
    from histospace._nn._encoders import build_encoder

    if weights == "":
        weights = None
    module, d, _ = build_encoder(encoder, weights, mean=mean, std=std, input_size=input_size)
    return module, int(d)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Reference augmentation on a uint8-scaled float batch `(b, 3, h, w)` in [0, 1]: colour jitter, flips, rotations."""
    b = x.shape[0]
    dev = x.device
    r = torch.rand(b, 6, generator=generator).to(dev)
    # colour jitter (brightness, contrast, saturation 0.5 as the reference)
    bright = (0.5 + r[:, 0]).view(b, 1, 1, 1)
    x = (x * bright).clamp(0, 1)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    contrast = (0.5 + r[:, 1]).view(b, 1, 1, 1)
    x = ((x - grey.mean((2, 3), keepdim=True)) * contrast + grey.mean((2, 3), keepdim=True)).clamp(0, 1)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    sat = (0.5 + r[:, 2]).view(b, 1, 1, 1)
    x = ((x - grey) * sat + grey).clamp(0, 1)
    # flips and right-angle rotations (the dihedral group)
    hflip = r[:, 3] < 0.5
    x = torch.where(hflip.view(b, 1, 1, 1), x.flip(-1), x)
    k = (r[:, 4] * 4).long()
    out = x.clone()
    for q in range(1, 4):
        sel = k == q
        if sel.any():
            out[sel] = torch.rot90(x[sel], q, dims=(2, 3))
    return out


def _adam(params: list[torch.nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam with the fused kernel where torch has it for the device (CPU since torch 2.4, CUDA).

    The plain (per-tensor) Adam makes about ten passes over every parameter per step; with 6.4 M parameters (785-gene
    panel) that was 30-40 % of a training step on 2 CPU threads. The fused kernel does one pass (same update rule,
    equal up to float rounding).
    """
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):  # device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


# --------------------------------------------------------------------------------------------------------------
class MclSTExp:
    """mclSTExp :cite:p:`Min2024`: learn a joint embedding of spots and H&E patches, predict expression from H&E.

    The spot side encodes the normalised expression of a gene panel plus learned x/y position tables with a small
    Transformer whose sequence is a set of spots (the reference's mini-batch); the image side projects image
    features (frozen encoder, `freeze_encoder=True`) or fine-tunes an image encoder on patches
    (`freeze_encoder=False`). Both are trained with a symmetric CLIP loss. A query patch's expression is the
    weighted mean of the expression of its nearest reference spots in the joint space.

    Parameters
    ----------
    adata
        Reference: one or more slides with counts, image features and positions.
    layer
        Layer with the counts (or normalised expression when `normalize='none'`); `None` uses `adata.X`.
    genes
        Gene panel. `None` chooses `n_top_genes` highly variable genes from the reference only.
    n_top_genes
        Panel size when `genes` is `None`.
    image_key
        `adata.obsm` key with the image features (frozen path).
    augment_keys
        Frozen path: `adata.obsm` keys with features of augmented views of the same patches (e.g. flipped or rotated,
        computed by :func:`histospace.pp.image_features` with a wrapping `encoder=`). During training each spot's
        image features are drawn at random, per epoch, among `image_key` and these keys (feature-level augmentation,
        standing in for the reference's image augmentation); the reference and queries use `image_key`.
    library_key
        `adata.obs` column telling the slides apart (`None`: one slide).
    position_key
        Two `adata.obs` columns `(row, col)` with integer array coordinates. When absent, pixel coordinates in
        `adata.obsm[spatial_key]` are quantised to a grid per slide.
    spatial_key
        `adata.obsm` key with full-resolution pixel coordinates.
    normalize
        `'log1p_cp10k'`: `ln(1 + 1e4 x / s)` with `s` the spot's total over the panel genes; `'log10_cp10k'`: the
        reference code's `log10(1 + 1e4 x / s)`; `'none'`: use the values as given (already normalised).
    scale_features
        Standardise the image features with the reference mean and standard deviation (applied to queries too).
    freeze_encoder
        `True` (CPU path): train on the features in `adata.obsm[image_key]`. `False`: fine-tune `encoder` end to end
        on image patches with augmentation (colour jitter, flips, right-angle rotations); the patches are cut around
        `adata.obsm[spatial_key]` from `img` or from `adata.uns['spatial'][library_id]` (`metadata` →
        `source_image_path`, else the `hires` image). Queries then need an image too (`img=` of
        :func:`histospace.tl.mclstexp_predict`). GPU advised.
    encoder, encoder_weights
        Fine-tuning path: a torchvision architecture name (`'mobilenet_v2'`, `'resnet50'`, `'densenet121'`) with a
        local state_dict path (`None`: random init), or a `torch.nn.Module` mapping `(n, 3, h, w)` to `(n, d)`.
    patch_size, input_size
        Fine-tuning path: patch side in full-resolution pixels, and the side it is resized to.
    image_mean, image_std
        Fine-tuning path: per-channel normalisation of images in [0, 1] (default: `x * 2 - 1`, MobileNetV2's scaling).
    spot_encoder
        `'transformer'` (mclSTExp) or `'none'` (BLEEP: the expression goes straight into the projection head).
    use_positions
        Add the learned x/y position tables (mclSTExp); `False` for BLEEP.
    n_heads, dim_head, n_layers
        Spot Transformer: heads, width per head, blocks (MLP width = number of genes, no dropout).
    projection_dim
        Width of the joint space.
    dropout
        Dropout in the projection heads (reference: 0).
    temperature
        Logit temperature (reference: 1.0).
    l2_normalize
        L2-normalise embeddings before the dot product (CLIP). The reference does not (its LayerNorm outputs have a norm
        of about 16, so T = 1 gives very peaked logits).
    learn_temperature
        Learn the temperature, starting at `temperature`.
    reference_batch_size
        Spots per sequence when embedding the reference after training (default: the training batch size).

    Notes
    -----
    The spot Transformer attends over the spots passed together, so a spot's embedding depends on its companions.
    Training draws random mini-batches over all reference spots. After training, the reference embeddings are
    computed deterministically: each slide's spots are permuted with a fixed seed (`random_state` of
    :meth:`train`) and split into nearly equal chunks of at most `reference_batch_size` spots, each chunk one
    sequence — so spots see random companions of their own slide, as during training, and never another slide's.
    Queries only use the image side, so their predictions do not depend on batching.
    """

    def __init__(
        self,
        adata: AnnData,
        *,
        layer: str | None = None,
        genes: Sequence[str] | None = None,
        n_top_genes: int = 1000,
        image_key: str = "img_features",
        augment_keys: Sequence[str] = (),
        library_key: str | None = "library_id",
        position_key: tuple[str, str] = ("array_row", "array_col"),
        spatial_key: str = "spatial",
        normalize: Literal["log1p_cp10k", "log10_cp10k", "none"] = "log1p_cp10k",
        scale_features: bool = True,
        freeze_encoder: bool = True,
        encoder: str | torch.nn.Module = "mobilenet_v2",
        encoder_weights: str | Path | None = None,
        img=None,
        patch_size: int = 224,
        input_size: int = 224,
        image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        spot_encoder: Literal["transformer", "none"] = "transformer",
        use_positions: bool = True,
        n_heads: int = 8,
        dim_head: int = 64,
        n_layers: int = 2,
        projection_dim: int = 256,
        dropout: float = 0.0,
        temperature: float = 1.0,
        l2_normalize: bool = False,
        learn_temperature: bool = False,
        reference_batch_size: int | None = None,
    ):
        if not isinstance(adata, AnnData):
            msg = f"`adata` must be an AnnData, got {type(adata).__name__}."
            raise TypeError(msg)
        if normalize not in _NORMALIZE:
            msg = f"`normalize` must be one of {_NORMALIZE}, got {normalize!r}."
            raise ValueError(msg)
        if spot_encoder not in ("transformer", "none"):
            msg = f"`spot_encoder` must be 'transformer' or 'none', got {spot_encoder!r}."
            raise ValueError(msg)
        if temperature <= 0:
            msg = f"`temperature` must be positive, got {temperature}."
            raise ValueError(msg)
        check_unique_obs_names(adata)
        if adata.n_obs < 2:
            msg = "The reference needs at least 2 spots."
            raise ValueError(msg)

        # slides
        if library_key is not None and library_key in adata.obs:
            libs = adata.obs[library_key].astype(str).to_numpy()
        elif library_key is not None and library_key != "library_id":
            msg = f"`adata.obs[{library_key!r}]` not found; pass `library_key=None` for a single slide."
            raise KeyError(msg)
        else:
            libs = np.full(adata.n_obs, "0", dtype=object)

        # genes
        if genes is None:
            counts = get_matrix(adata, layer, counts=normalize != "none")
            genes = _select_genes(adata, layer, n_top_genes, library_key if library_key in adata.obs else None)
        else:
            genes = [str(g) for g in genes]
            if len(set(genes)) != len(genes):
                msg = "`genes` holds duplicates; pass each gene once."
                raise ValueError(msg)
            missing = [g for g in genes if g not in adata.var_names]
            if missing:
                msg = (
                    f"{len(missing)} panel gene(s) not in `adata.var_names` of the reference, e.g. {missing[:5]}. "
                    "Subset `genes=` to the genes measured in every reference slide."
                )
                raise KeyError(msg)
            counts = get_matrix(adata, layer, counts=normalize != "none")
        if len(genes) == 0:
            msg = "The gene panel is empty; pass `genes=` or a reference with expressed genes."
            raise ValueError(msg)
        gidx = adata.var_names.get_indexer(genes)
        x_panel = _dense(counts[:, gidx])
        check_no_nan(x_panel, "adata.X" if layer is None else f"adata.layers[{layer!r}]")
        for lib in pd.unique(libs):
            m = libs == lib
            if m.sum() > 0 and len(pd.unique(libs)) > 1:
                zero = np.flatnonzero(np.abs(x_panel[m]).sum(axis=0) == 0)
                if zero.size > 0.5 * len(genes):
                    msg = (
                        f"{zero.size} of {len(genes)} panel genes are all zero in reference slide {lib!r} (e.g. "
                        f"{[genes[i] for i in zero[:5]]}); the panel genes look missing from that slide. Pass "
                        "`genes=` measured in every slide, or drop the slide."
                    )
                    raise ValueError(msg)

        # positions
        use_positions = bool(use_positions)
        pos = np.zeros((adata.n_obs, 2), dtype=np.int64)
        if use_positions:
            rk, ck = position_key
            if rk in adata.obs and ck in adata.obs:
                rows = pd.to_numeric(adata.obs[rk], errors="coerce").to_numpy()
                cols = pd.to_numeric(adata.obs[ck], errors="coerce").to_numpy()
                if not (np.isfinite(rows).all() and np.isfinite(cols).all()):
                    msg = f"`adata.obs[{rk!r}]`/`adata.obs[{ck!r}]` hold missing values; fill them or drop the spots."
                    raise ValueError(msg)
                if (rows < 0).any() or (cols < 0).any():
                    msg = f"`adata.obs[{rk!r}]`/`adata.obs[{ck!r}]` must be non-negative array coordinates."
                    raise ValueError(msg)
                pos = np.column_stack([np.rint(cols), np.rint(rows)]).astype(np.int64)
            elif spatial_key in adata.obsm:
                xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
                check_no_nan(xy, f"adata.obsm[{spatial_key!r}]")
                pos = _grid_positions(xy, libs)
                logg.info(f"    no `obs[{rk!r}]`/`obs[{ck!r}]`: positions quantised from `obsm[{spatial_key!r}]`")
            else:
                msg = (
                    f"The reference has no positions: neither `adata.obs[{rk!r}]`/`adata.obs[{ck!r}]` (array "
                    f"coordinates) nor `adata.obsm[{spatial_key!r}]` (pixels). Add them, or pass "
                    "`use_positions=False`."
                )
                raise KeyError(msg)

        # image side
        feature_params: dict = {}
        patches = None
        if freeze_encoder:
            if image_key not in adata.obsm:
                msg = f"`adata.obsm[{image_key!r}]` not found. {_FEATURES_HINT}"
                raise KeyError(msg)
            feats = _dense(adata.obsm[image_key]).astype(np.float32)
            if feats.ndim != 2 or feats.shape[0] != adata.n_obs:
                msg = f"`adata.obsm[{image_key!r}]` has shape {feats.shape}; expected ({adata.n_obs}, d)."
                raise ValueError(msg)
            check_no_nan(feats, f"adata.obsm[{image_key!r}]")
            img_dim = int(feats.shape[1])
            views = []
            for k in augment_keys:
                if k not in adata.obsm:
                    msg = f"`adata.obsm[{k!r}]` (in `augment_keys`) not found. {_FEATURES_HINT}"
                    raise KeyError(msg)
                v = _dense(adata.obsm[k]).astype(np.float32)
                if v.shape != feats.shape:
                    msg = f"`adata.obsm[{k!r}]` has shape {v.shape}; expected {feats.shape} as `adata.obsm[{image_key!r}]`."
                    raise ValueError(msg)
                check_no_nan(v, f"adata.obsm[{k!r}]")
                views.append(v)
            uns_f = adata.uns.get(image_key, {})
            if isinstance(uns_f, dict) and isinstance(uns_f.get("params"), dict):
                feature_params = {
                    k: v
                    for k, v in uns_f["params"].items()
                    if k in ("encoder", "weights", "patch_size_px", "patch_size_um")
                    and isinstance(v, str | int | float)
                }
        else:
            feats, views = None, []
            patches = extract_patches(
                adata,
                img=img,
                library_key=library_key,
                spatial_key=spatial_key,
                patch_size=patch_size,
                input_size=input_size,
            )
            img_dim = -1  # set when the encoder is built

        self.genes: list[str] = list(genes)
        self.params = {
            "layer": "X" if layer is None else layer,
            "n_top_genes": int(n_top_genes),
            "image_key": image_key,
            "augment_keys": [str(k) for k in augment_keys],
            "library_key": "" if library_key is None else library_key,
            "position_key": list(position_key),
            "spatial_key": spatial_key,
            "normalize": normalize,
            "scale_features": bool(scale_features),
            "freeze_encoder": bool(freeze_encoder),
            "encoder": encoder if isinstance(encoder, str) else "custom",
            "encoder_weights": "" if encoder_weights is None else str(encoder_weights),
            "patch_size": int(patch_size),
            "input_size": int(input_size),
            "image_mean": [float(v) for v in image_mean],
            "image_std": [float(v) for v in image_std],
            "spot_encoder": spot_encoder,
            "use_positions": use_positions,
            "n_heads": int(n_heads),
            "dim_head": int(dim_head),
            "n_layers": int(n_layers) if spot_encoder == "transformer" else 0,
            "projection_dim": int(projection_dim),
            "dropout": float(dropout),
            "temperature": float(temperature),
            "l2_normalize": bool(l2_normalize),
            "learn_temperature": bool(learn_temperature),
            "reference_batch_size": 0 if reference_batch_size is None else int(reference_batch_size),
        }
        self._expr = normalize_expression(x_panel, normalize)
        self._pos = pos
        self._libs = libs
        self._feats = feats
        self._views = views
        self._patches = patches
        self.feature_params = feature_params
        self.n_x = int(pos[:, 0].max()) + 1
        self.n_y = int(pos[:, 1].max()) + 1
        self.reference_obs_names = np.asarray(adata.obs_names.astype(str))
        if feats is not None and scale_features:
            self.feature_mean = feats.mean(axis=0).astype(np.float32)
            self.feature_std = np.maximum(feats.std(axis=0), 1e-6).astype(np.float32)
        else:
            self.feature_mean = self.feature_std = None
        self._custom_encoder = encoder if isinstance(encoder, torch.nn.Module) else None
        self.img_dim = img_dim
        self._build()
        self.history: dict[str, list[float]] = {"loss": []}
        self.is_trained = False
        self.reference_embeddings: np.ndarray | None = None
        self.reference_expression: np.ndarray = self._expr
        self._members: list[tuple[dict[str, torch.Tensor], np.ndarray]] = []

    # ----------------------------------------------------------------------------------------------------------
    def _build(self) -> None:
        p = self.params
        image_encoder = None
        if not p["freeze_encoder"]:
            image_encoder, d = _build_encoder(
                self._custom_encoder if self._custom_encoder is not None else p["encoder"],
                p["encoder_weights"] or None,
                mean=p["image_mean"],
                std=p["image_std"],
                input_size=p["input_size"],
            )
            self.img_dim = d
        self.module = MclSTExpModule(
            n_genes=len(self.genes),
            img_dim=self.img_dim,
            n_x=self.n_x,
            n_y=self.n_y,
            n_heads=p["n_heads"],
            dim_head=p["dim_head"],
            n_layers=p["n_layers"],
            use_positions=p["use_positions"],
            projection_dim=p["projection_dim"],
            dropout=p["dropout"],
            image_encoder=image_encoder,
            temperature=p["temperature"],
            l2_normalize=p["l2_normalize"],
            learn_temperature=p["learn_temperature"],
        )
        self.device = getattr(self, "device", torch.device("cpu"))  # a rebuilt module stays on the model's device
        self.module.to(self.device)

    def to_device(self, device: str | torch.device | None = None) -> MclSTExp:
        """Move the module to `device` (see :func:`histospace._utils.resolve_device`)."""
        self.device = resolve_device(device)
        self.module.to(self.device)
        return self

    def __repr__(self) -> str:
        p = self.params
        kind = "BLEEP-style" if p["spot_encoder"] == "none" else "mclSTExp"
        return (
            f"MclSTExp({kind}, {len(self.genes)} genes, {self.reference_expression.shape[0]} reference spots, "
            f"image {'features' if p['freeze_encoder'] else 'encoder'} {self.img_dim}-d, "
            + (f"{self.n_models_} models, " if self.n_models_ > 1 else "")
            + f"trained={self.is_trained})"
        )

    # ----------------------------------------------------------------------------------------------------------
    def _scale(self, feats: np.ndarray) -> np.ndarray:
        if self.feature_mean is None:
            return feats.astype(np.float32)
        return ((feats - self.feature_mean) / self.feature_std).astype(np.float32)

    def _image_tensor(self, patches_u8: torch.Tensor, augment: bool, generator: torch.Generator | None) -> torch.Tensor:
        x = patches_u8.permute(0, 3, 1, 2).float().div(255.0)
        if augment:
            x = _augment(x, generator)
        return x  # the encoder normalises with `image_mean`/`image_std`

    def train(
        self,
        max_epochs: int = 90,
        batch_size: int = 128,
        lr: float = 1e-4,
        weight_decay: float = 1e-3,
        device: str | torch.device | None = None,
        random_state: int | None = 0,
        n_models: int = 1,
        progress_bar: bool = True,
    ) -> MclSTExp:
        """Train with Adam on the symmetric CLIP loss, then embed the reference spots.

        Parameters
        ----------
        max_epochs
            Passes over the reference spots (reference: 90). Measured on her2st C2-C6 leave-one-slide-out (785 genes,
            dihedral-averaged MobileNetV2 features, `l2_normalize=True`, `learn_temperature=True`, feature-view
            augmentation): mean PCC all genes / top 50 of 0.209 / 0.286 at 10 epochs, 0.216 / 0.303 at 20, 0.216 /
            0.308 at 30, 0.214 / 0.310 at 40, and 0.209 / 0.311 at 90 in an earlier run; nested validation (one
            training slide held out) chose 30 epochs in 4 of 5 folds. Training time is linear in the epochs, so
            about 30 epochs give the same accuracy three times faster; the default stays the reference's.
        batch_size
            Spots per mini-batch (the spot Transformer's sequence).
        lr, weight_decay
            Adam learning rate and L2 weight decay (reference: 1e-4, 1e-3).
        device
            Torch device; `None` picks CUDA when available.
        random_state
            Seed for the weights, the batch order, augmentation and the reference batching. Same seed and device give
            identical results on the CPU.
        n_models
            Seed ensemble: train `n_models` models from seeds `random_state`, `random_state + 1`, ... (fresh weights
            each) and predict with the mean of their predictions (each model searches its own embedding of the
            reference). Training and prediction time grow linearly. Measured on her2st C2-C6 leave-one-slide-out
            (stage features + context, 30 epochs, `l2_normalize=True`, `learn_temperature=True`, inverse-square
            weights): mean PCC all genes / top 50 of 0.220 / 0.328 with 1 model and 0.230 / 0.341 with 5
            (`benchmarks/results/expression.md`; 0.228 / 0.340 with 3 in an exploratory run).
        progress_bar
            Show one progress bar per model.

        Returns
        -------
        The model itself (trained); `history['loss']` holds the mean loss per epoch (averaged over the models of an
        ensemble). After training, :attr:`module` and :attr:`reference_embeddings` are those of the first model;
        :meth:`predict` averages over all of them.
        """
        random_state = check_random_state(random_state)
        if max_epochs < 0 or batch_size < 2:
            msg = f"`max_epochs` must be >= 0 and `batch_size` >= 2, got {max_epochs} and {batch_size}."
            raise ValueError(msg)
        if not isinstance(n_models, int | np.integer) or isinstance(n_models, bool) or n_models < 1:
            msg = f"`n_models` must be a positive integer, got {n_models!r}."
            raise ValueError(msg)
        n_models = int(n_models)
        self.to_device(device)
        start = logg.info(
            f"training mclSTExp on {self._expr.shape[0]} spots, {len(self.genes)} genes"
            + (f", {n_models} models" if n_models > 1 else "")
        )
        t0 = time.perf_counter()
        members, losses = [], []
        for i in range(n_models):
            seed = None if random_state is None else random_state + i
            # fresh, seeded weights: same seed -> same model regardless of history (and a fresh model per member)
            losses.append(self._fit_one(max_epochs, batch_size, lr, weight_decay, seed, i > 0, progress_bar))
            emb = self._embed_reference(batch_size, seed)
            if n_models > 1:
                members.append(({k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}, emb))
            else:
                self.reference_embeddings = emb
        self.history = {"loss": np.mean(np.asarray(losses, dtype=np.float64), axis=0).tolist() if max_epochs else []}
        self.train_time_ = time.perf_counter() - t0
        self.batch_size_ = int(batch_size)
        self.random_state_ = random_state
        self._members = members
        if members:
            self._use_member(0)
        self.is_trained = True
        logg.info("    finished", time=start)
        return self

    @property
    def n_models_(self) -> int:
        """Models in the seed ensemble (1: a single model)."""
        return max(len(self._members), 1)

    def _use_member(self, i: int) -> None:
        """Load the weights and reference embeddings of ensemble member `i` into :attr:`module`."""
        state, emb = self._members[i]
        self.module.load_state_dict(state)
        self.reference_embeddings = emb

    def _fit_one(
        self,
        max_epochs: int,
        batch_size: int,
        lr: float,
        weight_decay: float,
        random_state: int | None,
        rebuild: bool,
        progress_bar: bool,
    ) -> list[float]:
        """Train :attr:`module` from fresh weights (seeded, or `rebuild`); return the mean loss per epoch."""
        dev = self.device
        seed_everything(random_state)
        if random_state is not None or rebuild:
            self._build()
        module = self.module
        expr = torch.from_numpy(self._expr).to(dev)
        pos = torch.from_numpy(self._pos).to(dev)
        if self._feats is not None:
            feats = torch.from_numpy(self._scale(self._feats)).to(dev)
            if self._views:
                feats = torch.stack([feats] + [torch.from_numpy(self._scale(v)).to(dev) for v in self._views])
        else:
            patches = torch.from_numpy(self._patches)
        gen = make_generator(random_state)
        opt = _adam([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
        n = expr.shape[0]
        history: list[float] = []
        module.train()
        for _ in (pbar := tqdm(range(max_epochs), desc="mclSTExp", disable=not progress_bar)):
            perm = torch.randperm(n, generator=gen)
            total, count = 0.0, 0
            for lo in range(0, n, batch_size):
                idx = perm[lo : lo + batch_size]
                if idx.numel() < 2:
                    continue
                idx_d = idx.to(dev)
                if self._feats is not None and self._views:
                    view = torch.randint(0, feats.shape[0], (idx.numel(),), generator=gen).to(dev)
                    image = feats[view, idx_d]
                elif self._feats is not None:
                    image = feats[idx_d]
                else:
                    image = self._image_tensor(patches[idx].to(dev), augment=True, generator=gen)
                loss = module(image, expr[idx_d], pos[idx_d])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
                count += idx.numel()
            epoch_loss = total / max(count, 1)
            history.append(epoch_loss)
            pbar.set_postfix(loss=f"{epoch_loss:.4f}")
        return history

    @torch.no_grad()
    def _embed_reference(self, batch_size: int, random_state: int | None) -> np.ndarray:
        """Deterministic reference embeddings: per slide, a seeded permutation cut into nearly equal chunks."""
        bs = self.params["reference_batch_size"] or batch_size
        module = self.module.eval()
        dev = self.device
        rng = np.random.default_rng(0 if random_state is None else random_state)
        out = np.zeros((self._expr.shape[0], self.params["projection_dim"]), dtype=np.float32)
        for lib in pd.unique(self._libs):
            m = np.flatnonzero(self._libs == lib)
            m = m[rng.permutation(m.size)]
            for chunk in np.array_split(m, max(1, math.ceil(m.size / bs))):
                e = torch.from_numpy(self._expr[chunk]).to(dev)
                p = torch.from_numpy(self._pos[chunk]).to(dev)
                out[chunk] = module.embed_spot(e, p).float().cpu().numpy()
        return out

    # ----------------------------------------------------------------------------------------------------------
    def check_query(self, adata: AnnData, *, image_key: str | None = None, img=None) -> None:
        """Raise if `adata` cannot be embedded by this model (missing, mis-sized, NaN or foreign image features)."""
        if not self.params["freeze_encoder"]:
            if img is None and "spatial" not in adata.uns:
                msg = (
                    "This model fine-tunes its image encoder, so the query needs an image: pass `img=` or store it "
                    "in `adata.uns['spatial']` (e.g. from `hs.pp.tile_image`)."
                )
                raise KeyError(msg)
            if self.params["spatial_key"] not in adata.obsm:
                msg = f"`adata.obsm[{self.params['spatial_key']!r}]` not found; patches need spot centres in pixels."
                raise KeyError(msg)
            return
        key = image_key or self.params["image_key"]
        if key not in adata.obsm:
            msg = f"`adata.obsm[{key!r}]` not found. {_FEATURES_HINT}"
            raise KeyError(msg)
        f = adata.obsm[key]
        shape = f.shape
        if len(shape) != 2 or shape[1] != self.img_dim:
            msg = (
                f"`adata.obsm[{key!r}]` has {shape[1] if len(shape) == 2 else shape} columns but the model was trained "
                f"on {self.img_dim}-d image features. Compute the query features with the same encoder as the "
                "reference (`hs.pp.image_features`)."
            )
            raise ValueError(msg)
        check_no_nan(_dense(f), f"adata.obsm[{key!r}]")
        uns_f = adata.uns.get(key, {})
        qp = uns_f.get("params") if isinstance(uns_f, dict) else None
        _check_feature_params(self.feature_params, qp if isinstance(qp, dict) else None, key)

    @torch.no_grad()
    def get_image_embedding(
        self, adata: AnnData | None = None, *, features: np.ndarray | None = None, img=None, batch_size: int = 4096
    ) -> np.ndarray:
        """Joint-space embeddings of the query's image features (or patches when fine-tuned), `(n_obs, dim)`.

        With a seed ensemble, those of the first model (:attr:`module`); :meth:`predict` uses all of them.
        """
        module = self.module.eval()
        dev = self.device
        if self.params["freeze_encoder"]:
            if features is None:
                self.check_query(adata)
                features = _dense(adata.obsm[self.params["image_key"]])
            x = self._scale(np.asarray(features, dtype=np.float32))
            out = [
                module.embed_image(torch.from_numpy(x[lo : lo + batch_size]).to(dev)).float().cpu()
                for lo in range(0, x.shape[0], batch_size)
            ]
        else:
            p = self.params
            patches = extract_patches(
                adata,
                img=img,
                library_key=p["library_key"] or None,
                spatial_key=p["spatial_key"],
                patch_size=p["patch_size"],
                input_size=p["input_size"],
            )
            bs = min(batch_size, 128)
            out = [
                module.embed_image(self._image_tensor(torch.from_numpy(patches[lo : lo + bs]).to(dev), False, None))
                .float()
                .cpu()
                for lo in range(0, patches.shape[0], bs)
            ]
        if not out:
            return np.zeros((0, self.params["projection_dim"]), dtype=np.float32)
        return torch.cat(out).numpy()

    @torch.no_grad()
    def predict_from_embedding(
        self,
        emb: np.ndarray,
        *,
        n_neighbors: int = 200,
        weighting: Literal["inverse_square", "uniform", "softmax"] = "inverse_square",
        batch_size: int = 4096,
    ) -> np.ndarray:
        """Expression `(n, n_genes)` as the weighted mean over the cosine top-`n_neighbors` reference spots.

        Weights: `'inverse_square'` `1/d^2` of the Euclidean distance between the (unnormalised) embeddings (the
        reference); `'uniform'`; `'softmax'` of the model's logits (`logit_scale * q . k`). With a seed ensemble, the
        search is in the first model's space (:attr:`reference_embeddings`); :meth:`predict` uses all of them.
        """
        self._check_trained()
        if weighting not in _WEIGHTING:
            msg = f"`weighting` must be one of {_WEIGHTING}, got {weighting!r}."
            raise ValueError(msg)
        n_ref = self.reference_embeddings.shape[0]
        if not 1 <= n_neighbors <= n_ref:
            msg = f"`n_neighbors={n_neighbors}` must be between 1 and the number of reference spots ({n_ref})."
            raise ValueError(msg)
        dev = self.device
        keys = torch.from_numpy(self.reference_embeddings).to(dev)
        key_sq = (keys**2).sum(dim=1)
        values = torch.from_numpy(self.reference_expression).to(dev)
        scale = float(self.module.logit_scale)
        out = np.zeros((emb.shape[0], values.shape[1]), dtype=np.float32)
        # chunks keep the (chunk x n_ref) similarity matrix near 64 MB
        chunk = max(1, min(batch_size, (16 * 2**20) // max(n_ref, 1)))
        for lo in range(0, emb.shape[0], chunk):
            q = torch.from_numpy(np.asarray(emb[lo : lo + chunk], dtype=np.float32)).to(dev)
            dots = q @ keys.T
            sim = dots / (q.norm(dim=1, keepdim=True).clamp_min(1e-12) * keys.norm(dim=1).clamp_min(1e-12))
            top_idx = torch.topk(sim, n_neighbors, dim=1).indices
            if weighting == "uniform":
                w = torch.full(top_idx.shape, 1.0 / n_neighbors, device=dev)
            elif weighting == "softmax":
                w = torch.softmax(dots.gather(1, top_idx) * scale, dim=1)
            else:
                d2 = ((q**2).sum(dim=1, keepdim=True) + key_sq[top_idx] - 2 * dots.gather(1, top_idx)).clamp_min(1e-12)
                w = 1.0 / d2
                w = w / w.sum(dim=1, keepdim=True)
            weights = torch.zeros_like(sim).scatter_(1, top_idx, w)  # sparse rows: k non-zeros each
            out[lo : lo + q.shape[0]] = (weights @ values).float().cpu().numpy()
        return out

    def predict(
        self,
        adata: AnnData,
        *,
        n_neighbors: int = 200,
        weighting: Literal["inverse_square", "uniform", "softmax"] = "inverse_square",
        smooth_neighbors: int = 0,
        img=None,
        batch_size: int = 4096,
    ) -> np.ndarray:
        """Predicted normalised expression `(adata.n_obs, n_genes)` of the query (columns in `self.genes` order).

        For a seed ensemble (`n_models > 1` in :meth:`train`), the mean of the members' predictions. See
        :func:`histospace.tl.mclstexp_predict` for the parameters.
        """
        self._check_trained()
        self.check_query(adata, img=img)
        out = None
        n = max(len(self._members), 1)
        try:
            for i in range(n):
                if self._members:
                    self._use_member(i)
                emb = self.get_image_embedding(adata, img=img, batch_size=batch_size)
                if smooth_neighbors > 0:
                    emb = smooth_over_neighbors(
                        emb,
                        adata,
                        n_neighbors=smooth_neighbors,
                        spatial_key=self.params["spatial_key"],
                        library_key=self.params["library_key"] or None,
                    )
                p = self.predict_from_embedding(
                    emb, n_neighbors=n_neighbors, weighting=weighting, batch_size=batch_size
                )
                out = p if out is None else out + p
        finally:
            if self._members:
                self._use_member(0)
        return out / np.float32(n) if n > 1 else out

    def _check_trained(self) -> None:
        if not self.is_trained or self.reference_embeddings is None:
            msg = "The model is not trained; call `model.train()` (or `hs.tl.mclstexp_train`) first."
            raise RuntimeError(msg)

    # ----------------------------------------------------------------------------------------------------------
    def save(self, dir_path: str | Path, *, overwrite: bool = False) -> None:
        """Save `state_dict` (`model.pt`), parameters (`params.json`) and reference embeddings/expression (`.npz`).

        A seed ensemble also writes the members' state dicts (`members.pt`) and reference embeddings.

        The AnnData is not saved: a loaded model predicts from the stored reference alone.
        """
        self._check_trained()
        d = Path(dir_path)
        if d.exists() and any(d.iterdir()) and not overwrite:
            msg = f"{d} exists and is not empty; pass `overwrite=True`."
            raise FileExistsError(msg)
        d.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in self.module.state_dict().items()}, d / "model.pt")
        if self._members:
            torch.save([state for state, _ in self._members], d / "members.pt")
        elif (d / "members.pt").exists():  # overwrite=True over an ensemble
            (d / "members.pt").unlink()
        meta = {
            "params": self.params,
            "genes": self.genes,
            "n_x": self.n_x,
            "n_y": self.n_y,
            "img_dim": self.img_dim,
            "feature_params": self.feature_params,
            "history": self.history,
            "batch_size": self.batch_size_,
            "random_state": -1 if self.random_state_ is None else self.random_state_,
            "n_models": self.n_models_,
            "version": version_string(),
        }
        (d / "params.json").write_text(json.dumps(meta, indent=1))
        arrays = {
            "reference_embeddings": self.reference_embeddings,
            "reference_expression": self.reference_expression,
            "reference_obs_names": self.reference_obs_names.astype(str),
        }
        if self.feature_mean is not None:
            arrays["feature_mean"] = self.feature_mean
            arrays["feature_std"] = self.feature_std
        if self._members:
            arrays["member_embeddings"] = np.stack([emb for _, emb in self._members])
        np.savez_compressed(d / "reference.npz", **arrays)

    @classmethod
    def load(
        cls, dir_path: str | Path, *, device: str | torch.device | None = "cpu", encoder: torch.nn.Module | None = None
    ) -> MclSTExp:
        """Load a model saved by :meth:`save`; it predicts with no reference AnnData.

        Pass `encoder=` (the same architecture) for a model fine-tuned with a custom `torch.nn.Module` encoder.
        """
        d = Path(dir_path)
        for f in ("model.pt", "params.json", "reference.npz"):
            if not (d / f).exists():
                msg = f"{d / f} not found; `dir_path` must be a folder written by `MclSTExp.save`."
                raise FileNotFoundError(msg)
        meta = json.loads((d / "params.json").read_text())
        self = cls.__new__(cls)
        self.params = meta["params"]
        self.genes = list(meta["genes"])
        self.n_x, self.n_y, self.img_dim = int(meta["n_x"]), int(meta["n_y"]), int(meta["img_dim"])
        self.feature_params = meta.get("feature_params", {})
        self.history = {k: list(v) for k, v in meta.get("history", {}).items()}
        self.batch_size_ = int(meta.get("batch_size", 128))
        rs = int(meta.get("random_state", 0))
        self.random_state_ = None if rs < 0 else rs
        if self.params["encoder"] == "custom" and not self.params["freeze_encoder"] and encoder is None:
            msg = "This model was fine-tuned with a custom encoder module; pass the same architecture as `encoder=`."
            raise ValueError(msg)
        self._custom_encoder = encoder
        with np.load(d / "reference.npz", allow_pickle=False) as z:
            self.reference_embeddings = z["reference_embeddings"]
            self.reference_expression = z["reference_expression"]
            self.reference_obs_names = z["reference_obs_names"]
            self.feature_mean = z["feature_mean"] if "feature_mean" in z else None
            self.feature_std = z["feature_std"] if "feature_std" in z else None
            member_embeddings = z["member_embeddings"] if "member_embeddings" in z else None
        n_models = int(meta.get("n_models", 1))
        self._expr = self.reference_expression
        self._feats = self._patches = None
        self._views = []
        self._pos = self._libs = None
        if not self.params["freeze_encoder"] and self.params["encoder"] != "custom":
            self.params = {**self.params, "encoder_weights": ""}  # the fine-tuned weights come from model.pt
        self._build()
        self.module.load_state_dict(torch.load(d / "model.pt", map_location="cpu"))
        self._members = []
        if n_models > 1:
            if member_embeddings is None or not (d / "members.pt").exists():
                msg = f"{d} holds a {n_models}-model ensemble but `members.pt` or its embeddings are missing."
                raise FileNotFoundError(msg)
            states = torch.load(d / "members.pt", map_location="cpu")
            self._members = list(zip(states, list(member_embeddings), strict=True))
        self.is_trained = True
        self.to_device(device)
        return self


def smooth_over_neighbors(
    x: np.ndarray,
    adata: AnnData,
    *,
    n_neighbors: int,
    spatial_key: str = "spatial",
    library_key: str | None = "library_id",
) -> np.ndarray:
    """Average the rows of `x` over each spot and its `n_neighbors` nearest spatial neighbours within its slide."""
    from scipy.spatial import cKDTree

    if spatial_key not in adata.obsm:
        msg = f"`adata.obsm[{spatial_key!r}]` not found; spatial smoothing needs spot coordinates (or set it to 0)."
        raise KeyError(msg)
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if library_key is not None and library_key in adata.obs:
        libs = adata.obs[library_key].astype(str).to_numpy()
    else:
        libs = np.zeros(adata.n_obs, dtype=int)
    out = np.empty_like(x)
    for lib in pd.unique(libs):
        m = np.flatnonzero(libs == lib)
        k = min(n_neighbors + 1, m.size)
        _, nn = cKDTree(xy[m]).query(xy[m], k=k)
        nn = nn.reshape(m.size, k)
        out[m] = x[m][nn].mean(axis=1)
    return out
