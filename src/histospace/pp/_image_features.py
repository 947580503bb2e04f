"""`pp.image_features`: CNN features of H&E patches around every spot, streamed in batches."""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from anndata import AnnData
from scanpy import logging as logg
from torch import nn

from histospace._constants import FEATURES_KEY, SPATIAL_KEY
from histospace._nn._encoders import build_encoder, check_encoder_options, fuse_conv_bn
from histospace._utils import check_number, check_random_state, doc_params, resolve_device, version_string
from histospace._utils._data import check_key_added
from histospace._utils._device import keep_freed_memory
from histospace._utils._image import PADDING, crop_patches, read_order, resize_patches
from histospace._utils._progress import progress
from histospace._utils._sdata import as_table, table_output
from histospace.pp._feature_sources import (
    _SDATA_KEYS,
    _anndata_coords,
    _check_inside,
    _Library,
    _resolve_libraries,
    _sdata_libraries,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["image_features"]


class _BatchDataset(torch.utils.data.Dataset):
    """Batch `i` of a library: its RGB uint8 patches `(b, s, s, 3)` (cropping runs in DataLoader workers)."""

    def __init__(self, source, centres, size, input_size, batch_size, exact):
        self.source, self.centres, self.size = source, centres, size
        self.input_size, self.batch_size, self.exact = input_size, batch_size, exact

    def __len__(self):
        return -(-self.centres.shape[0] // self.batch_size)

    def __getitem__(self, i):
        c = self.centres[i * self.batch_size : (i + 1) * self.batch_size]
        return torch.from_numpy(crop_patches(self.source, c, self.size, self.input_size, exact=self.exact))


def _choose(method: str, lib: _Library, coords: np.ndarray, enc, input_size: int, context: float | None) -> str:
    """`'dense'` or `'patch'` for one slide (`method='auto'`: dense when the patches overlap enough to pay off)."""
    if method != "auto":
        return method
    from histospace.pp._dense import choose_method

    _, src = lib.source_for(lib.patch_size_px, input_size)
    size = lib.patch_size_px * src.scale
    try:
        return choose_method(
            src.to_pixels(coords[lib.rows]),
            size,
            enc,
            input_size=input_size,
            context_px=None if context is None else size * context,
        )
    except (TypeError, ValueError):  # an encoder the dense engine cannot run (no map of input_size / stride cells)
        return "patch"


def _dense_library(lib: _Library, coords, enc, feats, *, input_size, context, dihedral, device, tile_size, halo,
                   progress_bar, pca=None, sample=None) -> dict | tuple:  # fmt: skip
    """Dense features of one slide into `feats[lib.rows]` (projected onto `pca` when given); returns what to record.

    With `sample`, only the full-width features of a PCA sample of at least `sample` of its spots: returns
    `(positions in lib.rows, features, record)`.
    """
    from histospace.pp import _dense

    level, src = lib.source_for(lib.patch_size_px, input_size)
    src = src.load()
    size = lib.patch_size_px * src.scale
    out = _dense.dense_features(
        src,
        src.to_pixels(coords[lib.rows]),
        size,
        enc,
        input_size=input_size,
        context_px=None if context is None else size * context,
        dihedral=dihedral,
        tile_size=tile_size,
        halo=halo,
        device=device,
        batch_size=1 if device.type == "cpu" else 4,
        pca=pca,
        sample=sample,
        progress_bar=progress_bar,
    )
    if sample is None:
        feats[lib.rows] = out
    rec = {"image": src.kind, "scale": float(src.scale), "halo": int(_dense._STATS["halo"])}
    rec["n_tiles"] = int(sum(_dense._STATS["n_tiles"]))
    if lib.multiscale is not None and lib.multiscale.n_levels > 1:
        rec["level"] = int(level)
    if src.path is not None:
        rec["image_path"] = str(src.path)
    return rec if sample is None else (*out, rec)


#: spots (about) on which `n_components` fits its PCA, spread over the dense-method slides
PCA_N_SPOTS = 20_000


def _check_pca(pca: Mapping, width: int, n_components: int | None) -> tuple[np.ndarray, np.ndarray]:
    """`(mean, components)` of a stored PCA, checked against the feature width and `n_components`."""
    try:
        mu = np.asarray(pca["mean"], dtype=np.float64)
        comp = np.asarray(pca["components"], dtype=np.float64)
    except KeyError as e:
        msg = f"`pca` has no {e.args[0]!r}: pass `adata.uns['img_features']['pca']` of an earlier call."
        raise ValueError(msg) from None
    if mu.shape != (width,) or comp.ndim != 2 or comp.shape[0] != width or not comp.shape[1]:
        msg = (
            f"`pca` was fitted on features of width {mu.shape[0] if mu.ndim == 1 else mu.shape}, these have width "
            f"{width}: compute them with the encoder options of the call that fitted it."
        )
        raise ValueError(msg)
    if n_components is not None and n_components != comp.shape[1]:
        msg = f"n_components={n_components} but `pca` has {comp.shape[1]} components; pass one of them."
        raise ValueError(msg)
    if not (np.isfinite(mu).all() and np.isfinite(comp).all()):
        msg = "`pca` holds NaN or infinite values."
        raise ValueError(msg)
    return mu, comp


#: images per forward pass of the 8 dihedral views (several views of a batch go through the encoder together)
DIHEDRAL_CHUNK = 128


def _dihedral_mean(enc: nn.Module, x: torch.Tensor, *, chunk: int = DIHEDRAL_CHUNK) -> torch.Tensor:
    """Mean of `enc` over the 8 flips/right-angle rotations of the batch `x` `(B, 3, H, W)`.

    The views are stacked and run in forward passes of about `chunk` images (several views of a small batch at once),
    which is faster on a CPU than 8 passes of `B`; each image's features do not depend on its batch, so the result
    is the same up to float rounding. They are summed in the order rot90 k = 0..3, each then its flip.
    """
    b = x.shape[0]
    per = max(1, min(8, chunk // max(b, 1)))  # views per forward pass
    fmt = torch.channels_last if x.device.type == "cpu" else torch.contiguous_format
    views = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(2, 3))
        views += [r, r.flip(-1)]
    total = None
    for i in range(0, 8, per):
        v = torch.cat(views[i : i + per]).contiguous(memory_format=fmt)
        y = enc(v).float()
        y = y.view(-1, b, *y.shape[1:])
        for j in range(y.shape[0]):
            total = y[j] if total is None else total + y[j]
    return total / 8


#: named feature recipes of `image_features(preset=...)`: the options each fills (see `preset_options`)
PRESETS: dict[str, dict] = {
    # mclSTExp on her2st (validated by the expression benchmark): stage features of the patch and of a patch twice as
    # wide, averaged over the 8 flips/rotations; plus `tf_padding` for weights trained with TF 'SAME' padding
    "mclstexp": {"encoder": "mobilenet_v2", "layers": "stages", "context": 2.0, "dihedral": True},
}


def preset_options(preset: str, *, encoder=None, weights="imagenet") -> dict:
    """The options that `image_features(preset=preset)` fills for `encoder` and `weights` (the caller's or defaults).

    `PRESETS[preset]`, plus `tf_padding=True` when `weights` is a file known to be trained with TensorFlow 'SAME'
    padding (by its SHA-256, e.g. the shared TF-converted MobileNetV2) and the encoder is a named one.
    """
    if not isinstance(preset, str) or preset not in PRESETS:
        msg = f"`preset` must be one of {sorted(PRESETS)} or None, got {preset!r}."
        raise ValueError(msg)
    from histospace._nn._encoders import trained_with_tf_padding

    out = dict(PRESETS[preset])
    enc = out.get("encoder") if encoder is None else encoder
    if isinstance(enc, str) and trained_with_tf_padding(weights):
        out["tf_padding"] = True
    return out


def _cache_settings(lib: _Library, info: dict, weights, **options) -> dict | None:
    """What a slide's features depend on besides its centres (the key of :mod:`._feature_cache`); `None`: uncacheable."""
    from histospace.pp import _feature_cache

    if info["weights"] == "module":  # a user module: its weights cannot be identified
        return None
    image = _feature_cache.image_digest(lib.source)
    w = _feature_cache.weights_digest(weights)
    if image is None or w is None:
        return None
    src = lib.source
    return {
        "format": _feature_cache.CACHE_FORMAT,
        "torch": torch.__version__,
        "image": image,
        "image_kind": src.kind,
        "image_shape": [int(src.height), int(src.width)],
        "scale": [float(v) for v in src._scale_xy()],
        "offset": [float(v) for v in src.offset],
        "levels": 1 if lib.multiscale is None else int(lib.multiscale.n_levels),
        "patch_size_px": float(lib.patch_size_px),
        "info": {k: v for k, v in info.items() if k != "weights"},
        "weights": w,
        **options,
    }


def _cached(root, settings, lib: _Library, coords, width: int):
    """`(key, (features, record) or None)` of a slide in the cache at `root` (`(None, None)` without a cache)."""
    from histospace.pp import _feature_cache

    if root is None or settings is None:
        return None, None
    key = _feature_cache.entry_key(settings, coords[lib.rows])
    return key, _feature_cache.load(root, key, (len(lib.rows), width))


def _with_preset(func):
    """Fill the options of `preset=` that the caller did not pass (explicit arguments win) before calling `func`."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        preset = kwargs.get("preset")
        if preset is not None:
            filled = preset_options(preset, encoder=kwargs.get("encoder"), weights=kwargs.get("weights", "imagenet"))
            kwargs = filled | kwargs
        return func(*args, **kwargs)

    return wrapper


@_with_preset
@doc_params()
def image_features(
    adata: AnnData | SpatialData,
    *,
    table_key: str | None = None,
    image_key: str | None = None,
    shapes_key: str | None = None,
    coordinate_system: str | None = None,
    img=None,
    img_scale: float | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    spatial_key: str = SPATIAL_KEY,
    preset: Literal["mclstexp"] | None = None,
    encoder: str | nn.Module = "mobilenet_v2",
    weights: str | os.PathLike | None = "imagenet",
    mean: float | tuple[float, float, float] | None = None,
    std: float | tuple[float, float, float] | None = None,
    tf_padding: bool = False,
    layers: Literal["last", "stages"] = "last",
    dihedral: bool = False,
    patch_size: float | None = None,
    patch_size_um: float | None = None,
    context: float | None = None,
    method: Literal["auto", "patch", "dense"] = "auto",
    tile_size: int | None = None,
    halo: int | None = None,
    input_size: int = 224,
    n_components: int | None = None,
    pca: Mapping | None = None,
    cache: bool | str | os.PathLike = False,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    random_state: int | None = 0,
    progress_bar: bool = True,
    key_added: str = FEATURES_KEY,
    copy: bool = False,
) -> AnnData | SpatialData | None:
    """Compute CNN features of the H&E patch around every spot.

    A square patch is cropped around each spot centre (`obsm[spatial_key]`, full-resolution pixels), resized to
    `input_size`, normalised for the encoder's weights and run through the encoder in eval mode without gradients, in
    batches (patches are never all held in memory). Global average pooling gives one feature vector per spot.

    The image is the best one available, in this order:

    1. `img=` (path, array or squidpy `ImageContainer`), for all spots;
    2. the full-resolution file `uns['spatial'][library_id]['metadata']['source_image_path']` (decoded once per
       slide; TIFFs are read lazily through `tifffile.memmap` or zarr, so memory stays bounded);
    3. `uns['spatial'][library_id]['images']['hires']`, then `['lowres']`, with their `tissue_*_scalef`: the patch is
       cut at `coordinates * scalef` with size `patch_size * scalef` and resized to `input_size` (bilinear, sampled
       at the exact sub-pixel box when upsampling).

    With a SpatialData the spots (or bins) are the shapes that the table `table_key` annotates (circles, squares or
    polygons; their centroids), mapped into the pixels of the image `image_key` through spatialdata's coordinate
    transformations in `coordinate_system`; a multiscale image is read lazily, from the pyramid level that fits the
    patch. The features go into the table.

    Image conversion: RGBA drops alpha, greyscale is repeated to RGB, 16-bit (and other integer) images are scaled by
    `255 / 65535`, float images are taken as `[0, 1]` when their maximum is `<= 1`, else as `[0, 255]`.
    Patches that run over the image border are padded with constant white (255, empty glass); spots whose centre lies
    outside the image, and a patch wider than the whole image (a size in the wrong units), raise `ValueError`.

    Parameters
    ----------
    adata
        {adata}
    table_key
        {table_key}
    image_key
        With a SpatialData: the H&E element of `sdata.images` (`None`: the only image).
    shapes_key
        With a SpatialData: the shapes element whose centres are used (`None`: the one the table annotates).
    coordinate_system
        With a SpatialData: the coordinate system joining the shapes and the image (`None`: the one they share, or
        `'global'`).
    img
        H&E image for all spots: a path (JPEG, PNG or TIFF), a numpy array `H x W` or `H x W x C` (C = 1, 3, 4) in
        full-resolution pixels, or a squidpy `ImageContainer`. `None` uses the images in `adata.uns['spatial']`.
    img_scale
        Factor from `obsm[spatial_key]` to pixels of `img`. `None`: 1 (`img` is full resolution), or the
        `ImageContainer`'s `scale` attribute.
    library_id
        {library_id}
    library_key
        Column of `adata.obs` naming each spot's slide when `adata` holds several (e.g. `'library_id'`); each slide
        uses its own image in `adata.uns['spatial']`.
    spatial_key
        {spatial_key}
    preset
        A named recipe that fills the options not passed (explicit arguments win); recorded in
        `uns[key_added]['params']['preset']`. `'mclstexp'`: the image features validated for
        :func:`histospace.tl.mclstexp_train` on her2st, `encoder='mobilenet_v2'`, `layers='stages'`, `context=2`,
        `dihedral=True`, and `tf_padding=True` when `weights` is a file known to be trained with TensorFlow padding
        (the shared TF-converted MobileNetV2, recognised by its checksum). The weights and the patch size are not
        filled: the benchmark used that MobileNetV2 file and `patch_size=224` (her2st full-resolution pixels,
        about 150 µm). `None`: no recipe, every option at its default.
    encoder
        `'densenet121'` (1024 features), `'resnet50'` (2048), `'mobilenet_v2'` (1280): torchvision architectures
        with the classifier removed and global average pooling; or any `torch.nn.Module` mapping normalised
        `(B, 3, H, W)` images to `(B, d)` features or `(B, d, h, w)` maps (averaged over `h, w`); `d` is inferred.
        A module is put in eval mode and moved to `device` (in place). Named encoders have their BatchNorm folded
        into the convolutions for speed (same features up to float rounding).
    weights
        `'imagenet'` (torchvision's ImageNet weights, downloaded and cached by torchvision; needs a connection the
        first time), a path to a state_dict with torchvision keys (classifier keys are ignored), or `None` for random
        initialisation seeded with `random_state` (a user module is used as given).
    mean, std
        Per-channel normalisation of the RGB input in `[0, 1]`: `(x - mean) / std`. `None` uses the statistics the
        weights were trained with: the model's own for the pathology encoders, `0.5, 0.5` for the shared TF-style
        MobileNetV2 file (recognised by its checksum), ImageNet's for torchvision weights.
    tf_padding
        Pad stride-2 convolutions like TensorFlow's 'SAME' (one extra row/column at the bottom/right) instead of
        torchvision's symmetric padding, for weights converted from TensorFlow: the shared MobileNetV2 file reproduces
        its TFLite original only with `tf_padding=True`. Named encoders only.
    layers
        `'last'`: pool the encoder's final feature map (the usual CNN features). `'stages'` (named encoders): pool the
        output of every stage of the network and concatenate them, from early texture-level maps to the last one:
        `mobilenet_v2` 696 features (bottleneck stages 2-7, without the final 1x1 expansion to 1280),
        `resnet50` 3840 (`layer1`-`layer4`), `densenet121` 1920 (three transitions and the final block). On her2st
        expression prediction these predict better than the final features (see the expression benchmark).
    dihedral
        Average the features over the 8 flips and right-angle rotations of each patch (H&E has no preferred
        orientation, so this removes the encoder's orientation noise); 8 times the compute.
    patch_size
        Side of the square patch in full-resolution pixels (of the image's full-resolution level for a SpatialData;
        `224` reproduces mclSTExp on her2st).
    patch_size_um
        Side of the patch in µm, converted with `scalefactors['spot_diameter_fullres']` and
        `metadata['spot_diameter_um']` (with a SpatialData, with :func:`histospace.io.microns_per_unit`). Without
        `patch_size` and `patch_size_um` the patch side is three spot diameters (`3 x
        scalefactors['spot_diameter_fullres']`; 165 µm on Visium, the setting the domain benchmark validated), the
        tile for tiles of :func:`histospace.pp.tile_image`, and 165 µm for square bins.
    context
        Also encode a context patch `context` times wider around the same centre (resized to `input_size` as well)
        and append its features: the width doubles. `context=2` with `layers='stages'` and `dihedral=True` are the
        features the expression benchmark validated for mclSTExp.
    method
        `'patch'`: crop, resize and encode every spot's patch (the cost grows with the number of spots). `'dense'`:
        run the encoder's trunk once over the tissue in tiles with a halo and give each spot the mean of the feature
        map over its patch window, from summed-area tables (the cost grows with the tissue area; the same quantity
        up to the network's border effects; see :mod:`histospace.pp._dense`). `'auto'`: dense when the patches
        overlap enough that it runs fewer pixels through the network (bins, tiles with a small stride), patch
        otherwise. Vision transformers give their patch-token map on tiles of `input_size` (mean of patch tokens,
        not the class token).
    tile_size, halo
        Dense method: side of a tile's core and the halo added around it, in resampled pixels (`None`: about 2,048-px
        tiles and the network's receptive-field reach, which makes tiled maps equal a one-pass map).
    input_size
        Side in pixels of the patches given to the encoder.
    n_components
        Reduce the features to this many principal components (`None`: keep them all). One PCA for all slides, fitted
        on every spot of patch-method slides and on a sample of dense-method slides (the spots of evenly spaced strips
        of tiles, about 20,000 in all, spread over the slides by their number of spots); dense slides with more spots
        than their share then run a second pass whose maps are projected before the window means, so the full-width
        features of 10^5-10^6 bins (5 GB for 10^6 x 1280) are never held. Patch-method slides are computed at full
        width and then projected (their `n x d` floats are held for a moment: 0.5 GB for 10^5 tiles). The PCA is
        stored in `uns[key_added]['pca']` for `pca=`.
    pca
        Project onto a PCA fitted by an earlier call, `other.uns['img_features']['pca']` (a mapping with `'mean'` and
        `'components'`), instead of fitting one: the features of a new slide in the space of a reference's (e.g. for
        `hs.tl.mclstexp_predict` with a model trained on reduced features). The encoder options must be the same.
    cache
        Store each slide's features on disk and reuse them when the same image, spots and settings come again (a
        second run of a script or of the `histospace` command reads them instead of running the encoder). `True`:
        the folder :func:`histospace.pp.feature_cache_dir` (`$HISTOSPACE_CACHE/features`, else
        `~/.cache/histospace/features`); a path: that folder; `False` (default): no cache, nothing written to disk.
        An entry's key is a hash of the image's content (its file's bytes or the array's pixels), the spot centres,
        the patch size and every feature setting (encoder, the weights file's hash, mean/std, `tf_padding`,
        `layers`, `dihedral`, `context`, `input_size`, method, tiles, device type), so any change computes anew.
        Slides read from a zarr/dask image without a file, user modules and dense-method slides with a PCA are not
        cached; unreadable entries are recomputed. Empty it with :func:`histospace.pp.clear_feature_cache`.
    batch_size
        Patches per forward pass; memory use grows with it, not with the number of spots.
    device
        {device}
    num_workers
        DataLoader workers that crop patches while the encoder runs (`0`: crop in the main process).
    random_state
        Seed of the random initialisation when `weights=None`.
    progress_bar
        {progress_bar}
    key_added
        Key in `adata.obsm` and `adata.uns` to write.
    copy
        {copy}

    Returns
    -------
    Returns `None` if `copy=False`, else returns an `AnnData` object. Sets the following fields:

    `adata.obsm['img_features' | key_added]` : :class:`numpy.ndarray` (dtype `float32`)
        Image features of shape `(n_obs, d)` (`d` doubles with `context`; `n_components` with a PCA). For a
        SpatialData, in its table.
    `adata.uns['img_features' | key_added]` : :class:`dict`
        `'pca'` (with `n_components` or `pca`): `'mean'` `(d,)` and `'components'` `(d, n_components)` (float64) and
        `'n_fit'`, the number of spots it was fitted on (`0` when given); `'params'`: `n_components` (when set),
        `encoder`, `weights` (`'imagenet'`, file path, `'random'` or `'module'`), `patch_size_px`,
        `patch_size_um` (when known), `input_size`, `image` (`'fullres'`, `'hires'`, `'lowres'` or `'img'`), `scale`,
        `mean`, `std`, `padding` (of patches at the image border), `preset`, `tf_padding`, `layers` and `dihedral`
        (when set), `library_ids` and, per library, `libraries[library_id]` with its own `image`, `scale`,
        `patch_size_px`; `'version'`. Read from the cache (`cache=`), the features and these records are those of
        the run that stored them.

    Examples
    --------
    >>> import histospace as hs
    >>> adata = hs.datasets.her2st("C2")
    >>> hs.pp.image_features(
    ...     adata, encoder="mobilenet_v2", weights="mobilenet_v2.pt", mean=0.5, std=0.5, patch_size=224
    ... )
    >>> adata.obsm["img_features"].shape
    (187, 1280)
    """
    # ---- check everything before the expensive work --------------------------------------------------------------
    positive = {"low": 0, "low_inclusive": False}
    patch_size = check_number(patch_size, "patch_size", **positive, allow_none=True)
    patch_size_um = check_number(patch_size_um, "patch_size_um", **positive, allow_none=True)
    input_size = check_number(input_size, "input_size", integer=True, low=1, high=4096)
    batch_size = check_number(batch_size, "batch_size", integer=True, low=1)
    num_workers = check_number(num_workers, "num_workers", integer=True, low=0)
    img_scale = check_number(img_scale, "img_scale", **positive, allow_none=True)
    context = check_number(context, "context", low=1, low_inclusive=False, allow_none=True)
    check_key_added(key_added)
    if img is None and img_scale is not None:
        msg = "`img_scale` applies only with `img=`."
        raise ValueError(msg)
    random_state = check_random_state(random_state)
    check_encoder_options(encoder, layers=layers, tf_padding=tf_padding)
    if method not in ("auto", "patch", "dense"):
        msg = f"`method` must be 'auto', 'patch' or 'dense', got {method!r}."
        raise ValueError(msg)
    n_components = check_number(n_components, "n_components", integer=True, low=1, allow_none=True)
    if pca is not None and not isinstance(pca, Mapping):
        msg = (
            "`pca` must be a mapping with 'mean' and 'components' (`adata.uns['img_features']['pca']`), got "
            f"{type(pca).__name__}."
        )
        raise TypeError(msg)
    tile_size = check_number(tile_size, "tile_size", integer=True, low=1, allow_none=True)
    halo = check_number(halo, "halo", integer=True, low=0, allow_none=True)
    if preset is not None:
        preset_options(preset)  # a bad name raises here also when the function is called past its wrapper
    from histospace.pp import _feature_cache

    cache_root = _feature_cache.resolve_cache(cache)
    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_memory()  # CNN activations: heap reuse instead of fresh mmap pages per layer (2x on 2 cores)

    from histospace._nn._pathology import get_pathology_model, is_pathology_encoder

    if patch_size is None and patch_size_um is None and is_pathology_encoder(encoder):
        patch_size_um = get_pathology_model(encoder).patch_size_um  # the tissue size the model was trained on
    adata, ctx = as_table(adata, table_key)
    if ctx is None:
        coords = _anndata_coords(adata, spatial_key)
        libs = _resolve_libraries(
            adata,
            img=img,
            img_scale=img_scale,
            library_id=library_id,
            library_key=library_key,
            patch_size=patch_size,
            patch_size_um=patch_size_um,
        )
    elif img is not None:
        msg = "With a SpatialData the image is an element of `sdata.images`: pass `image_key=`, not `img=`."
        raise ValueError(msg)
    else:
        coords, libs = _sdata_libraries(
            ctx,
            image_key=image_key,
            shapes_key=shapes_key,
            coordinate_system=coordinate_system,
            patch_size=patch_size,
            patch_size_um=patch_size_um,
        )
    factors = (1.0,) if context is None else (1.0, float(context))
    _check_inside(adata, libs, coords, max_factor=factors[-1])
    enc, d, info = build_encoder(
        encoder,
        weights,
        mean,
        std,
        random_state=random_state,
        input_size=input_size,
        tf_padding=bool(tf_padding),
        layers=layers,
    )

    # ---- run -----------------------------------------------------------------------------------------------------
    start = logg.info(
        f"computing image features ({info['encoder']}, weights {info['weights']}) for {adata.n_obs} spots"
    )
    d_full = d * len(factors)
    if n_components is not None and pca is None and n_components > min(d_full, adata.n_obs):
        msg = (
            f"n_components={n_components} is more than the {d_full} features or the {adata.n_obs} spots; pass at "
            f"most {min(d_full, adata.n_obs)}."
        )
        raise ValueError(msg)
    fitted = None if pca is None else _check_pca(pca, d_full, n_components)
    n_fit = 0
    reduce = n_components is not None or fitted is not None
    width = d_full if not reduce else (n_components if fitted is None else fitted[1].shape[1])
    feats = np.empty((adata.n_obs, width), dtype=np.float32)
    # the cache is looked up first: a slide found there needs no method choice (which runs the trunk) nor features.
    # Keyed on `method` as passed ('auto' resolves the same way for the same spots and settings) and on whether a PCA
    # follows (dense slides are cached only without one); the entry records the method used.
    cache_kw = {"input_size": int(input_size), "context": context, "dihedral": bool(dihedral), "layers": layers,
                "tf_padding": bool(tf_padding), "device": dev.type, "method": method, "tile_size": tile_size,
                "halo": halo, "pca": bool(reduce)}  # fmt: skip
    if weights is None:
        cache_kw["random_state"] = random_state
    keys, hits, settings = {}, {}, {}
    if cache_root is not None:
        for lib in libs:
            settings[lib.library_id] = _cache_settings(lib, info, weights, **cache_kw)
            keys[lib.library_id], hit = _cached(cache_root, settings[lib.library_id], lib, coords, d_full)
            if hit is not None and hit[1].get("method") in ("patch", "dense"):
                hits[lib.library_id] = hit
    if len(hits) < len(libs):  # something to compute
        if isinstance(encoder, str):  # our own fresh copy: fold BatchNorm into the convolutions (faster, same output)
            fuse_conv_bn(enc.backbone)
        enc = enc.to(dev)
        if dev.type == "cpu":
            enc = enc.to(memory_format=torch.channels_last)
    methods = {lib.library_id: hits[lib.library_id][1]["method"] if lib.library_id in hits else
               _choose(method, lib, coords, enc, input_size, context) for lib in libs}  # fmt: skip
    dense_kw = {"input_size": input_size, "context": context, "dihedral": dihedral, "device": dev,
                "tile_size": tile_size, "halo": halo, "progress_bar": progress_bar}  # fmt: skip
    records = {lib.library_id: {"patch_size_px": float(lib.patch_size_px), "method": methods[lib.library_id],
                                **lib.extra} for lib in libs}  # fmt: skip
    for lib in libs:
        if lib.patch_size_um is not None:
            records[lib.library_id]["patch_size_um"] = float(lib.patch_size_um)
    dense_libs = [lib for lib in libs if methods[lib.library_id] == "dense"]
    patch_libs = [lib for lib in libs if methods[lib.library_id] == "patch"]
    held: dict = {}  # with a PCA: full-width features of whole slides, projected once the PCA is known
    fit_rows: list[np.ndarray] = []  # ... and the rows the PCA is fitted on
    if reduce and fitted is None:  # a sample of each dense slide (all its spots when it has few)
        for lib in dense_libs:
            target = max(1, math.ceil(PCA_N_SPOTS * len(lib.rows) / adata.n_obs))
            pos, x, rec = _dense_library(lib, coords, enc, None, sample=target, **dense_kw)
            fit_rows.append(x)
            if pos.size == len(lib.rows):  # the whole slide: no second pass
                held[lib.library_id] = x
                records[lib.library_id] |= rec
    n_batches = len(factors) * sum(-(-len(lib.rows) // batch_size) for lib in patch_libs)
    with (
        progress(total=n_batches, desc="image features", disable=not progress_bar or not n_batches) as bar,
        torch.inference_mode(),
    ):
        for lib in patch_libs:
            rec = records[lib.library_id]
            # without a PCA straight into `feats`; with one, full width first, projected below
            target, rows = (np.empty((len(lib.rows), d_full), np.float32), np.arange(len(lib.rows))) if reduce else (
                feats, lib.rows)  # fmt: skip
            key, hit = keys.get(lib.library_id), hits.get(lib.library_id)
            if hit is not None:
                target[rows] = hit[0]
                rec |= hit[1]
                bar.update(len(factors) * -(-len(lib.rows) // batch_size))
                if reduce:
                    held[lib.library_id] = target
                    if fitted is None:
                        fit_rows.append(target)
                continue
            before = set(rec)
            loaded: dict = {}  # level -> decoded image: the patch and its context read one decoded JPEG/PNG
            for j, factor in enumerate(factors):
                full = lib.patch_size_px * factor  # patch side in full-resolution units
                level, src = lib.source_for(full, input_size)
                if level not in loaded:
                    loaded[level] = src.load()  # JPEG/PNG decoded once; others stay lazy
                src = loaded[level]
                size = full * src.scale
                exact = size < input_size
                if size < 16 and j == 0:
                    warnings.warn(
                        f"library {lib.library_id!r}: patches are only {size:.1f} px wide in the {src.kind!r} image "
                        f"(scale {src.scale:g}) and are upsampled to {input_size} px; they carry little detail. A "
                        "full-resolution image (`img=` or `metadata['source_image_path']`) gives better features.",
                        UserWarning,
                        stacklevel=2,
                    )
                centres = src.to_pixels(coords[lib.rows])
                order = read_order(src, centres - size / 2.0)  # chunk by chunk from a chunked (dask) image
                out_rows = rows if order is None else rows[order]
                if order is not None:
                    centres = centres[order]
                ds = _BatchDataset(src, centres, size, input_size, batch_size, exact)
                loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=int(num_workers))
                cols = slice(j * d, (j + 1) * d)
                for i, batch in enumerate(loader):
                    c = centres[i * batch_size : (i + 1) * batch_size]
                    x = resize_patches(batch.to(dev, non_blocking=True), input_size, centres=c, size=size, exact=exact)
                    y = _dihedral_mean(enc, x) if dihedral else enc(x)
                    target[out_rows[i * batch_size : (i + 1) * batch_size], cols] = y.float().cpu().numpy()
                    bar.update(1)
                if j == 0:
                    rec |= {"image": src.kind, "scale": float(src.scale)}
                    if src.path is not None:
                        rec["image_path"] = str(src.path)
                if lib.multiscale is not None and lib.multiscale.n_levels > 1:
                    rec["level" if j == 0 else "context_level"] = int(level)
                del src, ds, loader
            del loaded
            if key is not None:
                stored = {"method": "patch"} | {k: v for k, v in rec.items() if k not in before}
                _feature_cache.save(cache_root, key, target[rows], stored, settings[lib.library_id])
            if reduce:
                held[lib.library_id] = target
                if fitted is None:
                    fit_rows.append(target)
    if reduce and fitted is None:  # one PCA for all slides
        from histospace._utils._preprocess import covariance_pca

        n_fit = sum(len(x) for x in fit_rows)
        fitted = covariance_pca(np.concatenate(fit_rows) if len(fit_rows) > 1 else fit_rows[0], int(n_components))
        del fit_rows
    for lib in dense_libs:  # (with a PCA: its maps projected before the window means)
        if lib.library_id in held:
            continue
        key, hit = keys.get(lib.library_id), hits.get(lib.library_id)  # (only without a PCA: full-width features)
        if hit is not None and not reduce:
            feats[lib.rows] = hit[0]
            records[lib.library_id] |= hit[1]
            continue
        rec = _dense_library(lib, coords, enc, feats, pca=fitted, **dense_kw)
        records[lib.library_id] |= rec
        if key is not None and not reduce:
            _feature_cache.save(cache_root, key, feats[lib.rows], {"method": "dense"} | rec, settings[lib.library_id])
    if reduce:
        for lib in libs:
            if lib.library_id in held:
                x = held.pop(lib.library_id)
                feats[lib.rows] = ((x.astype(np.float64) - fitted[0]) @ fitted[1]).astype(np.float32)

    if not np.isfinite(feats).all():
        warnings.warn(
            f"The encoder returned {int((~np.isfinite(feats)).sum())} NaN or infinite feature values; check the "
            "weights and `mean`/`std`.",
            UserWarning,
            stacklevel=2,
        )

    # ---- write ---------------------------------------------------------------------------------------------------
    params = {
        "encoder": info["encoder"],
        "weights": info["weights"],
        "input_size": int(input_size),
        "mean": np.asarray(info["mean"], dtype=np.float64),
        "std": np.asarray(info["std"], dtype=np.float64),
        "padding": PADDING,
        "spatial_key": spatial_key,
        "library_ids": [str(k) for k in records],
        "libraries": records,
    }
    if library_key is not None:
        params["library_key"] = library_key
    if preset is not None:
        params["preset"] = preset
    if tf_padding:
        params["tf_padding"] = True
    if layers != "last":
        params["layers"] = layers
    if dihedral:
        params["dihedral"] = True
    if context is not None:
        params["context"] = float(context)
    for k in ("pooling", "mpp"):
        if info.get(k) is not None:
            params[k] = info[k]
    for k in ("image", "scale", "patch_size_px", "patch_size_um", "method", "halo", "n_tiles") + _SDATA_KEYS:
        vals = [r[k] for r in records.values() if k in r]
        if not vals:
            continue
        if len(vals) == len(records) and all(v == vals[0] for v in vals):
            params[k] = vals[0]
        elif k == "image" or k in _SDATA_KEYS:
            params[k] = [str(v) for v in vals]
        else:
            params[k] = np.asarray(vals, dtype=np.float64)
    if weights is None and not isinstance(encoder, nn.Module) and random_state is not None:
        params["random_state"] = int(random_state)

    if ctx is not None:
        params.pop("spatial_key")
    out = adata.copy() if copy else adata
    out.obsm[key_added] = feats
    out.uns[key_added] = {"params": params, "version": version_string()}
    if reduce:
        params["n_components"] = int(width)
        out.uns[key_added]["pca"] = {"mean": fitted[0], "components": fitted[1], "n_fit": int(n_fit)}
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {key_added!r}, image features {feats.shape} (adata.obsm)\n    {key_added!r} (adata.uns)",
    )
    return table_output(ctx, out, copy)
