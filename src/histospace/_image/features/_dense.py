"""Dense image features: the CNN trunk runs once over the tissue, each spot gets the mean of the map over its window.

`pp.image_features` (the *patch* method) crops a patch of `patch_px` source pixels around every spot, resizes it to
`input_size`, runs the encoder and averages its feature map. When spots are dense (Visium HD bins, Stereo-seq bins,
tiles with a small stride) neighbouring patches overlap and the same tissue is encoded many times over. The *dense*
engine here does the same work once:

1. **Resolution.** The source is resampled by `r = input_size / patch_px` (antialiased bilinear, the filter of
   `torch.nn.functional.interpolate(..., antialias=True)`, computed in global pixel coordinates so that every tile is
   a crop of one resampled image). A spot's patch becomes a window of `input_size` resampled pixels, i.e.
   `input_size / stride` cells of a trunk map with that stride.
2. **Tiles with a halo.** The trunk (:attr:`ImageEncoder.backbone` after the encoder's input normalisation; with
   `layers='stages'` the outputs of its stages) runs over tiles of at most `tile_size` resampled pixels plus a halo
   on every side, in batches. The tile grid is fitted to the bounding box of the windows and starts at a multiple of
   the largest stride, so every tile's maps sit on one global grid. The halo defaults to the trunk's receptive-field reach (measured by :func:`trunk_geometry` from the layers'
   kernels, strides, paddings and dilations, including TensorFlow 'SAME' padding), rounded up to a multiple of the
   largest stride: then the kept (core) cells of every tile equal one pass of the trunk over the whole (white-padded)
   image, up to float rounding. MobileNetV2 needs 256 px (also with `tf_padding`), ResNet-50 224 px, DenseNet-121
   1024 px; a smaller `halo=` is faster and changes only the cells next to tile seams.
3. **Only tissue.** A tile is run only if some spot window touches it, so the cost follows the area the windows cover,
   not the image area and not the number of spots.
4. **Window means by summed-area tables.** Tiles are processed in rows (strips); the maps of one strip plus the rows
   of the previous strips that windows reach back to are kept. Each spot is read from the strip that holds the bottom
   row of its window, in O(1). Its window `[x0, x0 + w) x [y0, y0 + w)` in cell units is fractional in general; the
   mean is the area-weighted mean of the piecewise-constant map (cells cut by the window edge count with the fraction
   of their area inside it), i.e. the global average pool of a patch whose grid is offset by a fraction of a cell.
   For `w` a whole number of cells (`input_size` a multiple of the stride) that is the bilinear interpolation of the
   means of the four windows at the integer offsets around it; the means of all integer windows of a strip come from
   its summed-area table (running sums in float64), so each spot costs 4 gathers. For other `w` the integral image
   (summed-area table) is interpolated bilinearly at the four corners, which is exact for the same reason.
5. **Streaming.** Peak memory is one batch of tiles, one strip of maps (plus the window height of overlap) and the
   output; never the whole map, and never the whole image for sources read region by region (TIFF, zarr; a JPEG or
   PNG is decoded once). With `n_components` the maps are projected before the window means, so the output is
   `(n, n_components)` and the full-width features never sit in memory.

Differences from the patch method are border effects only: a patch is padded with zeros at its border inside the
CNN (and the patch method rounds the patch origin to whole pixels), while the dense map sees the neighbouring tissue.
For deep maps, whose receptive field (about 490 px for MobileNetV2's last map) is much wider than a 224-px patch,
these effects are large: on her2st the per-spot correlation of dense and patch features is high for random weights
and for early stages but moderate for the last ImageNet map, while ridge prediction of expression from stage
features is as good with either (`benchmarks/dense_features.py`).

The steps live in `_dense_trunk` (trunk geometry and runs, step 2's halo), `_dense_resample` (step 1),
`_dense_windows` (step 4's summed-area tables) and `_dense_engine` (the tile plan and streaming of steps 2-5); this
module holds the entry points :func:`dense_features`, :func:`choose_method`, :func:`dense_cost_ratio` and
:func:`pick_level`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scanpy import logging as logg

from histospace._image.features._dense_engine import _STATS, _dense_pass, pca_sample, plan_strips
from histospace._image.features._dense_trunk import TrunkGeometry, _check_encoder, _is_vit, _round_up, trunk_geometry
from histospace._utils._preprocess import covariance_pca

__all__ = ["choose_method", "dense_cost_ratio", "dense_features", "pick_level", "trunk_geometry"]

#: `method='auto'` picks the dense engine when the patch method would run at least this many times more CNN input
#: pixels than the dense engine (:func:`dense_cost_ratio`). Measured on her2st C2 (MobileNetV2, bins on a 1500-px
#: square, `benchmarks/dense_features.py`): the time ratio patch / dense was 0.68, 1.22, 2.2 and 3.5 at pixel ratios
#: 0.97, 1.23, 2.4 and 3.7 with 2 CPU threads (0.79, 1.08, 2.1 and 3.5 with 1) for bin pitches of 160, 112, 80 and
#: 64 px and 224-px patches, so the break-even is a pixel ratio of about 1.1-1.2.
AUTO_BREAK_EVEN = 1.2


def _check_inputs(src, centres, patch_px, context_px, input_size, tile_size, halo, batch_size, n_components, scale):
    if centres.ndim != 2 or centres.shape[1] != 2 or centres.shape[0] == 0:
        msg = f"`centres_px` must have shape (n, 2) with n > 0 (x, y pixels), got {centres.shape}."
        raise ValueError(msg)
    if not np.isfinite(centres).all():
        i = int(np.flatnonzero(~np.isfinite(centres).all(axis=1))[0])
        msg = f"`centres_px` has NaN or infinite values, e.g. row {i}; remove those spots first."
        raise ValueError(msg)
    for name, v in (("patch_px", patch_px), ("context_px", context_px), ("scale", scale)):
        if name == "context_px" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float | np.number) or not v > 0 or not np.isfinite(v):
            msg = f"`{name}` must be a positive number, got {v!r}."
            raise ValueError(msg)
    for name, v, lowest in (("input_size", input_size, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lowest:
            msg = f"`{name}` must be a positive integer, got {v!r}."
            raise ValueError(msg)
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int | np.integer)):
        msg = f"`tile_size` must be a positive integer or None, got {tile_size!r}."
        raise ValueError(msg)
    if halo is not None and (isinstance(halo, bool) or not isinstance(halo, int | np.integer) or halo < 0):
        msg = f"`halo` must be a non-negative integer (pixels) or None (the exact receptive-field halo), got {halo!r}."
        raise ValueError(msg)
    if n_components is not None and (
        isinstance(n_components, bool) or not isinstance(n_components, int | np.integer) or n_components < 1
    ):
        msg = f"`n_components` must be a positive integer or None, got {n_components!r}."
        raise ValueError(msg)
    h, w = src.shape
    c = centres * scale
    bad = (c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] >= w) | (c[:, 1] >= h)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        msg = (
            f"{int(bad.sum())} centres lie outside the image {src.name} of {w} x {h} px, e.g. row {i} at (x, y) = "
            f"({centres[i, 0]:.1f}, {centres[i, 1]:.1f}) (scale {scale:g}). Centres must be (x, y) pixels of the "
            "source (times `scale`)."
        )
        raise ValueError(msg)


def _resolve_tiling(geom: TrunkGeometry, input_size: int, tile_size: int | None, halo: int | None):
    smax = geom.max_stride
    if input_size < smax:
        msg = (
            f"The patch is smaller than one cell of the trunk's coarsest map: `input_size` = {input_size} px but the "
            f"map has a stride of {smax} px. Use `input_size >= {smax}` or the patch method."
        )
        raise ValueError(msg)
    h = geom.exact_halo if halo is None else _round_up(int(halo), smax)
    if tile_size is None:
        tile = _default_tile(h, input_size, smax)
    else:
        tile = int(tile_size)
        if tile < smax or tile % smax:
            msg = f"`tile_size` must be a positive multiple of the trunk's largest stride ({smax} px), got {tile}."
            raise ValueError(msg)
    return tile, h


def _default_tile(halo: int, input_size: int, smax: int) -> int:
    """Tiles of `2048` px with their halo (`2048 - 2 * halo` px of core), at least `1024` px and `input_size`."""
    return max(_round_up(2048 - 2 * halo, smax), 1024, _round_up(input_size, smax))


def dense_features(
    source,
    centres_px: np.ndarray,
    patch_px: float,
    encoder,
    *,
    scale: float = 1.0,
    input_size: int = 224,
    layers: Literal["last", "stages"] | None = None,
    context_px: float | None = None,
    dihedral: bool = False,
    tile_size: int | None = None,
    halo: int | None = None,
    device=None,
    batch_size: int = 1,
    n_components: int | None = None,
    pca_n_spots: int = 20_000,
    pca: tuple[np.ndarray, np.ndarray] | None = None,
    sample: int | None = None,
    progress_bar: bool = True,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """CNN features of the patch around every centre, from one pass of the encoder's trunk over the tissue.

    The source is resampled so that a patch of `patch_px` pixels becomes `input_size` pixels; the trunk runs over
    tiles with a halo (only tiles that some patch window touches); each centre gets the mean of each map over its
    patch window, read from summed-area tables in O(1) (see the module docstring for the method). The result matches
    the patch method (`pp.image_features`: crop, resize, encoder, global average pool) up to the CNN's border effects.

    Parameters
    ----------
    source
        The image: an `ImageSource` (`histospace._image._sources.open_image`) or anything `open_image` takes (path,
        array, squidpy `ImageContainer`). JPEG/PNG files are decoded once; TIFF/zarr sources are read tile by tile.
        For a multiscale image pass the level that fits (see :func:`pick_level`) and its `scale`.
    centres_px
        `(n, 2)` spot centres (x, y) in pixels (times `scale`: pixels of `source`).
    patch_px
        Side of the patch in the same units as `centres_px`.
    encoder
        An `ImageEncoder` from `histospace._image.encoders._torchvision.build_encoder`. It is put in eval mode and moved to `device`
        (in place). Its `mean`/`std` normalisation is applied to each tile. For speed on a CPU fold its BatchNorm
        (`fuse_conv_bn`) and make it channels-last, as `image_features` does.
    scale
        Factor from the units of `centres_px`, `patch_px` and `context_px` to pixels of `source` (e.g. `1 / 4` for a
        pyramid level at a quarter of the full resolution when centres are full-resolution pixels).
    input_size
        Side in pixels that a patch is resampled to (as in the patch method).
    layers
        `'last'`: the trunk's final map (DenseNet: after its final ReLU). `'stages'` (named encoders): every stage
        map in :data:`histospace._image.encoders._torchvision.STAGES`, concatenated. `None`: as the encoder was built.
    context_px
        Side of a second, larger patch around the same centre (e.g. `448`): the trunk runs again at the resolution
        `input_size / context_px` and its features are appended (the width doubles).
    dihedral
        Mean over the 8 flips and right-angle rotations: each tile is transformed, run, and its maps are turned back
        before the mean (8 times the compute).
    tile_size
        Largest side of a tile's core (kept cells) in resampled pixels, a multiple of the largest stride; `None`:
        `2048 - 2 * halo` (tiles of 2048 px with their halo), at least 1024 and `input_size`. The tile grid is fitted
        to the bounding box of the windows (as few tiles per axis as this size allows, all of one size). Larger tiles
        waste less on halos but hold more memory (MobileNetV2, 2048-px tiles: about 0.7 GB per tile in the batch).
    halo
        Pixels of context added on each side of a tile (rounded up to a multiple of the largest stride). `None`: the
        trunk's receptive-field reach (:func:`trunk_geometry`), so that tiled maps equal a one-pass map.
    device
        Torch device; `None` picks CUDA when available. Tiles, maps and summed-area tables stay on the device; only
        the spot features come back.
    batch_size
        Tiles per forward pass.
    n_components
        Reduce the width on the fly with PCA. Two passes: the first computes the features of a deterministic sample
        of at least `pca_n_spots` centres (those whose windows end in evenly spaced strips of tiles, so it costs only
        those strips) and fits the PCA (eigendecomposition of the float64 covariance); the second projects every map
        onto the components before its summed-area table, so only `(n, n_components)` is ever held. With at most
        `pca_n_spots` centres the features are computed once and reduced in memory. Deterministic on the CPU;
        components have their largest entry positive.
    pca_n_spots
        Number of centres the PCA is fitted on (at least; all when there are fewer).
    pca
        A fitted PCA `(mean, components)` (`(d,)` and `(d, k)`) to project onto instead of fitting one: one pass, the
        maps projected before the window means; the output is `(n, k)`. Overrides `n_components`.
    sample
        Compute only the full-width features of the PCA sample of at least `sample` centres (chosen as for
        `n_components`) and return `(indices, features)`: for fitting one PCA over several slides.
    progress_bar
        Show one progress bar over the tiles.

    Returns
    -------
    `(n, d)` float32 features in the order of `centres_px`: `d` is the total width of the maps (doubled with
    `context_px`, main patch first), or `n_components` (the width of `pca`). With `sample`: the sorted indices of the
    sample and their `(len(indices), d)` features.
    """
    import torch

    from histospace._image._open import open_image
    from histospace._utils import resolve_device
    from histospace._utils._progress import progress

    src = open_image(source)
    centres = np.asarray(centres_px, dtype=np.float64)
    _check_inputs(src, centres, patch_px, context_px, input_size, tile_size, halo, batch_size, n_components, scale)
    _check_encoder(encoder)
    geom = trunk_geometry(encoder, layers=layers)
    if _is_vit(encoder) and tile_size is None:  # tiles of the model's own input size: tokens as it was trained
        tile_size = _round_up(int(input_size), geom.max_stride)
    tile, h = _resolve_tiling(geom, int(input_size), tile_size, halo)
    if isinstance(pca_n_spots, bool) or not isinstance(pca_n_spots, int | np.integer) or pca_n_spots < 1:
        msg = f"`pca_n_spots` must be a positive integer, got {pca_n_spots!r}."
        raise ValueError(msg)
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int | np.integer) or sample < 1):
        msg = f"`sample` must be a positive integer or None, got {sample!r}."
        raise ValueError(msg)
    d_total = geom.width * (2 if context_px is not None else 1)
    if n_components is not None and n_components > d_total:
        msg = f"`n_components` = {n_components} exceeds the feature width {d_total}."
        raise ValueError(msg)
    if pca is not None:
        mu_fit, comp_fit = np.asarray(pca[0], dtype=np.float64), np.asarray(pca[1], dtype=np.float64)
        if mu_fit.shape != (d_total,) or comp_fit.ndim != 2 or comp_fit.shape[0] != d_total:
            msg = f"`pca` must be (mean, components) of shapes ({d_total},) and ({d_total}, k) for these features."
            raise ValueError(msg)
        n_components = comp_fit.shape[1]
    dev = resolve_device(device)

    c_src = centres * float(scale)
    sizes = [float(patch_px) * float(scale)] + ([float(context_px) * float(scale)] if context_px is not None else [])
    plans = [plan_strips(c_src, input_size / s, int(input_size), tile, h, geom.max_stride) for s in sizes]
    _STATS.clear()
    _STATS.update(
        {
            "halo": h,
            "tile": [(p.tile_h, p.tile_w) for p in plans],
            "n_tiles": [p.n_tiles for p in plans],
            "tile_px": [p.tile_px for p in plans],
        }
    )
    start = logg.info(
        f"dense features ({encoder.name}) for {len(centres)} centres: {sum(_STATS['n_tiles'])} tiles of at most "
        f"{tile} px + halo {h} px"
    )
    src = src.load()
    encoder.eval()
    p = next(iter(encoder.parameters()), None)
    if p is not None and p.device != dev:
        encoder.to(dev)
    n = len(centres)

    def run(sel: np.ndarray | None, project, out, desc: str) -> None:
        cs = c_src if sel is None else c_src[sel]
        ps = (
            plans
            if sel is None
            else [plan_strips(cs, input_size / s, int(input_size), tile, h, geom.max_stride) for s in sizes]
        )
        kw = {"dihedral": bool(dihedral), "batch_size": int(batch_size), "device": dev}
        with progress(total=sum(p.n_tiles for p in ps), desc=desc, disable=not progress_bar) as bar:
            for k, p in enumerate(ps):
                if project is None:
                    _dense_pass(
                        src,
                        p,
                        encoder,
                        geom,
                        project=None,
                        out=out[:, k * geom.width : (k + 1) * geom.width],
                        bar=bar,
                        **kw,
                    )
                else:
                    bounds = np.cumsum([k * geom.width, *geom.channels])
                    blocks = [project[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
                    _dense_pass(src, p, encoder, geom, project=blocks, out=out, bar=bar, **kw)

    with torch.inference_mode():
        if sample is not None:
            sel = pca_sample(plans[0], geom, int(sample)) if n > sample else np.arange(n)
            feats = np.empty((sel.size, d_total), dtype=np.float32)
            run(None if sel.size == n else sel, None, feats, "dense features (PCA sample)")
            logg.info("    finished", time=start)
            return sel, feats
        if pca is not None:
            proj = torch.as_tensor(comp_fit, dtype=torch.float32, device=dev)
            acc = np.zeros((n, int(n_components)), dtype=np.float64)
            run(None, proj, acc, "dense features")
            feats = (acc - mu_fit @ comp_fit).astype(np.float32)
        elif n_components is None or n <= pca_n_spots:
            feats = np.empty((n, d_total), dtype=np.float32)
            run(None, None, feats, "dense features")
            if n_components is not None:
                mu, comp = covariance_pca(feats, int(n_components))
                feats = ((feats.astype(np.float64) - mu) @ comp).astype(np.float32)
        else:
            sel = pca_sample(plans[0], geom, int(pca_n_spots))
            sample = np.empty((sel.size, d_total), dtype=np.float32)
            run(sel, None, sample, "dense features (PCA fit)")
            mu, comp = covariance_pca(sample, int(n_components))
            del sample
            proj = torch.as_tensor(comp, dtype=torch.float32, device=dev)
            acc = np.zeros((n, int(n_components)), dtype=np.float64)
            run(None, proj, acc, "dense features")
            feats = (acc - mu @ comp).astype(np.float32)
    logg.info("    finished", time=start)
    return feats


def pick_level(level_scales, patch_px: float, *, input_size: int = 224) -> int:
    """Index of the pyramid level to read for patches of `patch_px` full-resolution pixels resampled to `input_size`.

    `level_scales[i]` is the factor from full-resolution pixels to pixels of level `i`. The chosen level is the
    coarsest one that still has at least `input_size` pixels across a patch (so the image is only ever downsampled);
    when every level is coarser than that, the finest level.

    Parameters
    ----------
    level_scales
        Factor from full-resolution pixels to pixels of each level (e.g. `[1, 0.5, 0.25]`).
    patch_px
        Patch side in full-resolution pixels.
    input_size
        Side the patch is resampled to.

    Returns
    -------
    The index of the level; pass that level as `source` and its factor as `scale` to :func:`dense_features`.
    """
    f = np.asarray(level_scales, dtype=np.float64)
    if f.ndim != 1 or f.size == 0 or not (f > 0).all():
        msg = f"`level_scales` must be a non-empty list of positive factors, got {level_scales!r}."
        raise ValueError(msg)
    ok = np.flatnonzero(patch_px * f >= input_size * (1 - 1e-6))
    if ok.size == 0:
        return int(np.argmax(f))
    return int(ok[np.argmin(f[ok])])


def dense_cost_ratio(
    centres_px: np.ndarray,
    patch_px: float,
    *,
    input_size: int = 224,
    context_px: float | None = None,
    tile_size: int | None = None,
    halo: int = 256,
    max_stride: int = 32,
    scale: float = 1.0,
) -> float:
    """CNN input pixels the patch method would run divided by those the dense engine would run, for these centres.

    Patch method: `n * input_size**2` per resolution. Dense engine: the tiles that some window touches, each of its
    core plus the halo on every side (the same plan as :func:`dense_features`). The ratio grows with the overlap of
    the patches (`n * patch_px**2` over the area they cover) divided by the halo overhead `((tile + 2 halo) / tile)**2`.

    Parameters
    ----------
    centres_px, patch_px, input_size, context_px, tile_size, scale
        As in :func:`dense_features`.
    halo
        Halo in pixels (MobileNetV2's exact halo by default).
    max_stride
        Largest stride of the trunk's maps.

    Returns
    -------
    The ratio (above 1: the dense engine runs fewer pixels).
    """
    centres = np.asarray(centres_px, dtype=np.float64)
    h = _round_up(int(halo), max_stride)
    tile = _default_tile(h, input_size, max_stride) if tile_size is None else int(tile_size)
    sizes = [patch_px] + ([context_px] if context_px is not None else [])
    dense = 0.0
    for s in sizes:
        p = plan_strips(centres * scale, input_size / (s * scale), int(input_size), tile, h, max_stride)
        dense += p.n_tiles * float(p.tile_px)
    return float(len(centres) * input_size**2 * len(sizes) / dense)


def choose_method(
    centres_px: np.ndarray,
    patch_px: float,
    encoder=None,
    *,
    input_size: int = 224,
    layers: Literal["last", "stages"] | None = None,
    context_px: float | None = None,
    tile_size: int | None = None,
    halo: int | None = None,
    scale: float = 1.0,
    break_even: float = AUTO_BREAK_EVEN,
) -> Literal["dense", "patch"]:
    """Choose `'dense'` or `'patch'` for `method='auto'`.

    Rule: `'dense'` when :func:`dense_cost_ratio` (patch-method input pixels over dense-engine input pixels) is at
    least `break_even` (:data:`AUTO_BREAK_EVEN` = 1.2). Per input pixel a large tile costs about as much as a batch of
    224-px patches and the window means cost little, so the time ratio follows the pixel ratio (measured: time ratio
    1.22 at pixel ratio 1.23 with 2 CPU threads). For spots on a square grid of pitch `p` the pixel ratio is about
    `(patch_px / p)**2 / ((tile + 2 * halo) / tile)**2`, less the waste of tiles at the tissue edge: with MobileNetV2
    (halo 256 px) and 224-px patches dense wins below a pitch of about 110 px, half the patch side.
    `'patch'` also when the encoder's trunk cannot run densely (no spatial map, unpadded layers) or
    the patch is smaller than one cell of the coarsest map.

    Parameters
    ----------
    centres_px, patch_px, input_size, layers, context_px, tile_size, scale
        As in :func:`dense_features`.
    encoder
        The encoder (its trunk gives the strides and the exact halo); `None` assumes MobileNetV2's (stride 32,
        halo 256 px).
    halo
        Halo in pixels; `None`: the encoder's exact halo.
    break_even
        Pixel ratio from which the dense engine is chosen.

    Returns
    -------
    `'dense'` or `'patch'`.
    """
    geom = None
    if encoder is not None:
        try:
            geom = trunk_geometry(encoder, layers=layers)
        except ValueError:
            return "patch"
        if input_size < geom.max_stride:
            return "patch"
    smax = 32 if geom is None else geom.max_stride
    h = (geom.exact_halo if geom is not None else 256) if halo is None else int(halo)
    ratio = dense_cost_ratio(
        centres_px,
        patch_px,
        input_size=input_size,
        context_px=context_px,
        tile_size=tile_size,
        halo=h,
        max_stride=smax,
        scale=scale,
    )
    return "dense" if ratio >= break_even else "patch"
