"""`pp.image_features`: CNN features of H&E patches around every spot, streamed in batches.

A thin public function: it checks the options, resolves the slides (:mod:`histospace.pp._feature_sources`), builds
the encoder and hands the work to the image wing (:func:`histospace._image.features._compute.compute_features`: the
feature cache, the patch and dense engines, the PCA), then writes the slot with its provenance
(:mod:`histospace._image.features._slot`). The recipes of `preset=` live in :mod:`histospace._image.features._recipes`.
"""

from __future__ import annotations

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
from histospace._image.encoders._build import build_encoder
from histospace._image.encoders._registry import get_pathology_model, is_pathology_encoder
from histospace._image.encoders._torchvision import check_encoder_options
from histospace._image.features._cache import resolve_cache
from histospace._image.features._compute import compute_features
from histospace._image.features._distributed import FeatureCluster, resolve_client
from histospace._image.features._recipes import preset_options, with_preset
from histospace._image.features._slot import feature_params, write_features
from histospace._utils import check_number, check_random_state, doc_params, resolve_device
from histospace._utils._data import check_key_added
from histospace._utils._device import keep_freed_memory
from histospace._utils._sdata import as_table, table_output
from histospace.pp._feature_sources import (
    _SDATA_KEYS,
    _anndata_coords,
    _check_inside,
    _resolve_libraries,
    _sdata_libraries,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["image_features"]


@with_preset
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
    client=None,
    task_size: int | None = None,
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
        up to the network's border effects; see :mod:`histospace._image.features._dense`). `'auto'`: dense when the patches
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
    client
        A :class:`distributed.Client`: the slides not found in the cache are computed as tasks on its workers (blocks
        of `task_size` spots for the patch method, one task per slide for the dense method), gathered back in spot
        order. The encoder goes to each worker once (`client.scatter(..., broadcast=True)`) and the workers open the
        image from its file or zarr store themselves (an in-memory array is scattered once per worker); tasks run on
        the workers' CPUs whatever `device` is. A slide whose image cannot be pickled (a SpatialData image read from a
        TIFF by `hs.io.add_image`) is computed here, with a warning. `None` (default): the active client
        (:func:`distributed.get_client`) when there is one, else everything runs here, as without dask; inside a task
        already running on a dask worker, locally. `False`: always locally. The features equal the local ones to
        float rounding.
    task_size
        With a client: spots per task of the patch method (`None`: enough tasks to give each worker about four, in
        whole batches, at most 1,024 spots).
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
        `patch_size_px`; with a client, `distributed`: `scheduler` (address), `n_workers`, `task_size` and
        `n_tasks`; `'version'`. Read from the cache (`cache=`), the features and these records are those of
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
    task_size = check_number(task_size, "task_size", integer=True, low=1, allow_none=True)
    client = resolve_client(client)
    if preset is not None:
        preset_options(preset)  # a bad name raises here also when the function is called past its wrapper
    cache_root = resolve_cache(cache)
    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_memory()  # CNN activations: heap reuse instead of fresh mmap pages per layer (2x on 2 cores)

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

    # ---- run: the wing's engines ---------------------------------------------------------------------------------
    start = logg.info(
        f"computing image features ({info['encoder']}, weights {info['weights']}) for {adata.n_obs} spots"
    )
    cluster = None if client is None else FeatureCluster(client, task_size=task_size, batch_size=batch_size)
    try:
        res = compute_features(
            libs, coords, enc, d, info, n_obs=adata.n_obs, encoder=encoder, weights=weights, factors=factors,
            input_size=input_size, batch_size=batch_size, num_workers=num_workers, dihedral=dihedral, layers=layers,
            tf_padding=tf_padding, context=context, method=method, tile_size=tile_size, halo=halo,
            n_components=n_components, pca=pca, random_state=random_state, dev=dev, cache_root=cache_root,
            progress_bar=progress_bar, cluster=cluster,
        )  # fmt: skip
    finally:  # the workers release the scattered encoder and slides, also when a task failed
        if cluster is not None:
            cluster.close()
    feats = res.features
    if not np.isfinite(feats).all():
        warnings.warn(
            f"The encoder returned {int((~np.isfinite(feats)).sum())} NaN or infinite feature values; check the "
            "weights and `mean`/`std`.",
            UserWarning,
            stacklevel=2,
        )

    # ---- write ---------------------------------------------------------------------------------------------------
    params = feature_params(
        info, res.records, input_size=input_size, spatial_key=spatial_key if ctx is None else None,
        library_key=library_key, preset=preset, tf_padding=tf_padding, layers=layers, dihedral=dihedral,
        context=context, weights=weights, encoder=encoder, random_state=random_state, sdata_keys=_SDATA_KEYS,
    )  # fmt: skip
    if res.distributed is not None:
        params["distributed"] = res.distributed
    out = adata.copy() if copy else adata
    write_features(out, key_added, feats, params, pca=res.pca if res.reduced else None, n_fit=res.n_fit)
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {key_added!r}, image features {feats.shape} (adata.obsm)\n    {key_added!r} (adata.uns)",
    )
    return table_output(ctx, out, copy)
