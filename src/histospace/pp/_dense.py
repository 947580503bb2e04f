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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scanpy import logging as logg

__all__ = ["choose_method", "dense_cost_ratio", "dense_features", "pick_level", "trunk_geometry"]

#: `method='auto'` picks the dense engine when the patch method would run at least this many times more CNN input
#: pixels than the dense engine (:func:`dense_cost_ratio`). Measured on her2st C2 (MobileNetV2, 1 CPU thread, bins on a
#: 1500-px square): the time ratio patch / dense was 0.79, 1.08, 2.1 and 3.5 at pixel ratios 0.97, 1.23, 2.4 and 3.7
#: (bin pitch 160, 112, 80 and 64 px for 224-px patches), so the break-even is a pixel ratio of about 1.15.
AUTO_BREAK_EVEN = 1.2

#: internal counters of the last :func:`dense_features` call (for tests and benchmarks)
_STATS: dict = {}


# ---------------------------------------------------------------------------------------------------------------------
# trunk geometry
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrunkGeometry:
    """Where the maps of a trunk sit on the input grid.

    Attributes
    ----------
    taps
        Indices of the trunk's children whose outputs are used (`None`: the trunk's output).
    strides
        Stride of each map in input pixels (cell `j` covers input pixels `[stride * j, stride * (j + 1))`).
    channels
        Width of each map.
    reach
        `(left, right)` receptive-field reach of each map: cell `j` depends on input pixels
        `[stride * j - left, stride * j + right]` (the same along both axes).
    """

    taps: tuple[int, ...] | None
    strides: tuple[int, ...]
    channels: tuple[int, ...]
    reach: tuple[tuple[int, int], ...]

    @property
    def max_stride(self) -> int:
        """The largest stride (tiles start at multiples of it)."""
        return max(self.strides)

    @property
    def exact_halo(self) -> int:
        """The smallest halo (multiple of the largest stride) that makes the core cells of a tile exact."""
        # core cell j (first: stride * j = tile start + halo; last: stride * (j + 1) = tile end - halo) must have its
        # whole receptive field [stride * j - left, stride * j + right] inside the tile; flipped tiles (dihedral)
        # give the same condition
        need = max(max(left, right - s + 1) for (left, right), s in zip(self.reach, self.strides, strict=True))
        return _round_up(max(need, 0), self.max_stride)

    @property
    def width(self) -> int:
        """Total feature width (sum of the map widths)."""
        return int(sum(self.channels))


def _round_up(v: float, m: int) -> int:
    return int(math.ceil(v / m - 1e-9)) * m


def _taps_of(encoder, layers: str | None) -> tuple[int, ...] | None:
    from histospace._nn._encoders import STAGES

    if layers is None:
        return encoder.taps
    if layers == "last":
        return None
    if layers == "stages":
        if encoder.name not in STAGES:
            msg = f"`layers='stages'` needs a named encoder ({sorted(STAGES)}), got an encoder named {encoder.name!r}."
            raise ValueError(msg)
        return tuple(STAGES[encoder.name][0])
    msg = f"`layers` must be 'last', 'stages' or None (the encoder's own setting), got {layers!r}."
    raise ValueError(msg)


def _is_vit(encoder) -> bool:
    """A vision transformer (a pathology encoder): its map is the patch-token grid of the tile."""
    return hasattr(encoder.backbone, "feature_map") and hasattr(encoder, "patch_size")


def _run_trunk(encoder, x, taps: tuple[int, ...] | None) -> list:
    """Maps of the trunk for a normalised input `x`: `[map]` or one map per tap (children order)."""
    import torch.nn.functional as F

    from histospace._nn._encoders import DenseNetFeatures

    bb = encoder.backbone
    if _is_vit(encoder):
        return [bb.feature_map(x)]
    if taps is None:
        y = bb(x)
        if encoder.final_relu:
            y = F.relu(y)
        return [y]
    children = list(bb.named_children())
    last = len(children) - 1
    fast = isinstance(bb, DenseNetFeatures) and not bb.training
    outs = []
    for i, (name, mod) in enumerate(children[: max(taps) + 1]):
        x = bb.run_child(name, mod, x) if fast else mod(x)
        if i in taps:
            outs.append(F.relu(x) if encoder.final_relu and i == last else x)
    return outs


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def trunk_geometry(encoder, *, layers: Literal["last", "stages"] | None = None) -> TrunkGeometry:
    """Measure the strides, widths and receptive-field reach of an encoder's trunk maps.

    The trunk runs once on a small zero input (64 px, then 128 px to check that every map has `size / stride` cells)
    with hooks on every `Conv2d`, `MaxPool2d` and `AvgPool2d`, which add up the reach of the layers in the order they
    run: a layer with kernel `k`, dilation `d`, left padding `p` on a map of stride `a` adds `p * a` to the left reach
    and `((k - 1) * d - p) * a` to the right reach. TensorFlow 'SAME' padding (`tf_padding=True`) pads
    `total // 2` on the left, computed from the layer's input size. Summing over all layers gives the reach along the
    longest path, which is exact for chains (MobileNetV2, DenseNet) and for ResNet (its shortcut convolutions are
    1 x 1); for other modules it is an upper bound, which is safe. Layers called through `torch.nn.functional`
    inside a user module are not seen.

    Parameters
    ----------
    encoder
        An :class:`~histospace._nn._encoders.ImageEncoder` (from `build_encoder`).
    layers
        `'last'`, `'stages'`, or `None` for the encoder's own setting.

    Returns
    -------
    The :class:`TrunkGeometry` of the maps.
    """
    import torch
    from torch import nn

    _check_encoder(encoder)
    if _is_vit(encoder):  # tokens of p x p pixels; every token sees the whole tile, so no halo makes them exact
        if layers == "stages":
            msg = "`layers='stages'` needs a CNN encoder; a vision transformer gives its patch-token map."
            raise ValueError(msg)
        return TrunkGeometry(
            taps=None, strides=(int(encoder.patch_size),), channels=(int(encoder.embed_dim),), reach=((0, 0),)
        )
    taps = _taps_of(encoder, layers)
    bb = encoder.backbone
    if taps is not None and not isinstance(bb, nn.Sequential):
        msg = "`layers='stages'` needs an encoder whose trunk is an `nn.Sequential` of stages."
        raise ValueError(msg)
    p = next(iter(bb.parameters()), None)
    dev = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32

    def probe(size: int):
        state = {"L": 0.0, "R": 0.0}
        raw = {}
        handles = []

        def pre(mod, args):
            raw[id(mod)] = int(args[0].shape[-1])

        def post(mod, args, out):
            w_in = raw[id(mod)]
            a = size / w_in
            if isinstance(mod, nn.Conv2d):
                k, s, d = mod.kernel_size[1], mod.stride[1], mod.dilation[1]
                if isinstance(mod.padding, str):
                    left = 0 if mod.padding == "valid" else ((k - 1) * d) // 2
                elif mod.padding[1] == 0 and s > 1 and len(mod._forward_pre_hooks) > 1:  # TF 'SAME' hook
                    o = -(-w_in // s)
                    left = max((o - 1) * s + (k - 1) * d + 1 - w_in, 0) // 2
                else:
                    left = mod.padding[1]
            else:
                k, s, pad = _pair(mod.kernel_size)[1], _pair(mod.stride or mod.kernel_size)[1], _pair(mod.padding)[1]
                d = _pair(getattr(mod, "dilation", 1))[1]
                left = pad
            state["L"] += left * a
            state["R"] += ((k - 1) * d - left) * a

        for m in bb.modules():
            if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
                handles.append(m.register_forward_pre_hook(pre, prepend=True))
                handles.append(m.register_forward_hook(post))
        reach = []
        if taps is not None:
            children = list(bb.children())
            for i in taps:
                handles.append(children[i].register_forward_hook(lambda *_: reach.append((state["L"], state["R"]))))
        try:
            x = torch.zeros(1, 3, size, size, device=dev, dtype=dtype)
            with torch.inference_mode():
                maps = _run_trunk(encoder, (x - encoder.mean.to(dev, dtype)) / encoder.std.to(dev, dtype), taps)
        except Exception as e:  # any failure of a user module
            msg = f"The encoder's trunk failed on a (1, 3, {size}, {size}) input ({type(e).__name__}: {e})."
            raise ValueError(msg) from e
        finally:
            for h in handles:
                h.remove()
        if taps is None:
            reach = [(state["L"], state["R"])]
        return maps, reach

    was_training = encoder.training
    encoder.eval()
    try:
        maps64, reach = probe(64)
        maps128, _ = probe(128)
    finally:
        encoder.train(was_training)
    strides, channels = [], []
    for m1, m2 in zip(maps64, maps128, strict=True):
        if m1.ndim != 4:
            msg = (
                f"The dense method needs a convolutional trunk that returns a map (B, C, h, w); the encoder "
                f"{encoder.name!r} returns shape {tuple(m1.shape)}. Use the patch method."
            )
            raise ValueError(msg)
        ok = m1.shape[-1] > 0 and 64 % m1.shape[-1] == 0 and m2.shape[-1] * (64 // m1.shape[-1]) == 128
        ok = ok and m1.shape[-2] == m1.shape[-1] and m2.shape[-2] == m2.shape[-1]
        if not ok:
            msg = (
                f"The dense method needs maps of `input_size / stride` cells (padded convolutions); the trunk of "
                f"{encoder.name!r} maps 64 px to {tuple(m1.shape[-2:])} and 128 px to {tuple(m2.shape[-2:])}. "
                "Use the patch method."
            )
            raise ValueError(msg)
        strides.append(64 // int(m1.shape[-1]))
        channels.append(int(m1.shape[1]))
    reach_t = tuple((int(math.ceil(a - 1e-9)), int(math.ceil(b - 1e-9))) for a, b in reach)
    return TrunkGeometry(taps=taps, strides=tuple(strides), channels=tuple(channels), reach=reach_t)


def _check_encoder(encoder) -> None:
    from histospace._nn._encoders import ImageEncoder

    if not isinstance(encoder, ImageEncoder):
        msg = (
            "`encoder` must be an ImageEncoder from `histospace._nn._encoders.build_encoder` (it carries the input "
            f"normalisation and the trunk), got {type(encoder).__name__}."
        )
        raise TypeError(msg)


# ---------------------------------------------------------------------------------------------------------------------
# resampling (global pixel coordinates, so tiles are crops of one resampled image)
# ---------------------------------------------------------------------------------------------------------------------
def _resample_weights(i0: int, n: int, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights `(n, K)` of output pixels `i0 .. i0 + n - 1` of an image resampled by `r`.

    The filter is that of `torch.nn.functional.interpolate(mode='bilinear', antialias=True, align_corners=False)`:
    a triangle of half-width `max(1 / r, 1)` source pixels centred at `(i + 0.5) / r`, normalised to sum 1. Indices
    may fall outside the image (read as white).
    """
    scale = 1.0 / r
    support = max(scale, 1.0)
    centre = scale * (np.arange(i0, i0 + n, dtype=np.float64) + 0.5)
    lo = np.floor(centre - support + 0.5).astype(np.int64)
    hi = np.floor(centre + support + 0.5).astype(np.int64)
    k = int((hi - lo).max())
    idx = lo[:, None] + np.arange(k)[None, :]
    w = np.clip(1.0 - np.abs((idx - centre[:, None] + 0.5) / support), 0.0, None)
    w[idx >= hi[:, None]] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    return idx, w


class _Resampler:
    """Read resampled regions `[y0, y1) x [x0, x1)` of a source as float `(3, h, w)` in `[0, 1]` on a device.

    Separable: the columns of a band of source rows are resampled first (gathered from the `uint8` pixels, so the
    source band is never held as floats), then the rows. Bands hold about `band_rows` source rows, so memory stays
    bounded however strongly the image is downsampled.
    """

    def __init__(self, src, r: float, device, *, band_rows: int = 1024):
        self.src, self.r, self.device = src, float(r), device
        self.identity = abs(self.r - 1.0) < 1e-12
        self.band_rows = int(band_rows)

    def read(self, y0: int, y1: int, x0: int, x1: int):
        import torch

        dev = self.device
        if self.identity:
            a = self.src.read(y0, y1, x0, x1)
            return torch.from_numpy(a).to(dev).permute(2, 0, 1).float().div_(255.0)
        iy, wy = _resample_weights(y0, y1 - y0, self.r)
        ix, wx = _resample_weights(x0, x1 - x0, self.r)
        sx0, sx1 = int(ix.min()), int(ix.max()) + 1
        ix_t = torch.as_tensor(ix - sx0, device=dev)
        wx_t = torch.as_tensor(wx, dtype=torch.float32, device=dev)
        out = torch.empty((3, y1 - y0, x1 - x0), dtype=torch.float32, device=dev)
        step = max(1, int(self.band_rows * min(self.r, 1.0)))
        for a in range(0, y1 - y0, step):
            iyc, wyc = iy[a : a + step], wy[a : a + step]
            sy0, sy1 = int(iyc.min()), int(iyc.max()) + 1
            band = torch.from_numpy(self.src.read(sy0, sy1, sx0, sx1)).to(dev).permute(2, 0, 1)  # uint8 (3, h, w)
            cols = None
            for k in range(ix.shape[1]):
                term = band.index_select(2, ix_t[:, k]) * wx_t[:, k].view(1, 1, -1)
                cols = term if cols is None else cols.add_(term)
            iy_t = torch.as_tensor(iyc - sy0, device=dev)
            wy_t = torch.as_tensor(wyc, dtype=torch.float32, device=dev)
            rows = None
            for k in range(iy.shape[1]):
                term = cols.index_select(1, iy_t[:, k]) * wy_t[:, k].view(1, -1, 1)
                rows = term if rows is None else rows.add_(term)
            out[:, a : a + step] = rows.div_(255.0)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# summed-area tables
# ---------------------------------------------------------------------------------------------------------------------
def _sat(buf):
    """Summed-area table `(h + 1, w + 1, c)` float64 of a map `(h, w, c)` (leading zero row and column)."""
    import torch

    h, w, c = buf.shape
    s = torch.zeros((h + 1, w + 1, c), dtype=torch.float64, device=buf.device)
    s[1:, 1:] = buf.to(torch.float64).cumsum(0).cumsum(1)
    return s


def _integral_at(sat_flat, n_cols1: int, n_rows1: int, u, v):
    """Integral image at fractional positions `(u, v)` (cell units): bilinear interpolation of the table.

    The integral of a piecewise-constant map is bilinear inside each cell, so this is exact.
    """
    import torch

    u = u.clamp(0, n_cols1 - 1)
    v = v.clamp(0, n_rows1 - 1)
    i0 = torch.clamp(torch.floor(u), max=n_cols1 - 2).long()
    j0 = torch.clamp(torch.floor(v), max=n_rows1 - 2).long()
    fu = (u - i0).unsqueeze(1)
    fv = (v - j0).unsqueeze(1)
    base = j0 * n_cols1 + i0
    s00 = sat_flat[base]
    s01 = sat_flat[base + 1]
    s10 = sat_flat[base + n_cols1]
    s11 = sat_flat[base + n_cols1 + 1]
    return (s00 * (1 - fu) + s01 * fu) * (1 - fv) + (s10 * (1 - fu) + s11 * fu) * fv


def _window_means_sat(sat, u0, v0, w: float, chunk: int = 1024):
    """Mean of the map over windows `[u0, u0 + w) x [v0, v0 + w)` (cell units, float64 tensors) from its table."""
    import torch

    rows1, cols1, c = sat.shape
    flat = sat.reshape(-1, c)
    out = torch.empty((u0.shape[0], c), dtype=torch.float64, device=sat.device)
    for a in range(0, u0.shape[0], chunk):
        uu, vv = u0[a : a + chunk], v0[a : a + chunk]
        tot = _integral_at(flat, cols1, rows1, uu + w, vv + w)
        tot -= _integral_at(flat, cols1, rows1, uu, vv + w)
        tot -= _integral_at(flat, cols1, rows1, uu + w, vv)
        tot += _integral_at(flat, cols1, rows1, uu, vv)
        out[a : a + chunk] = tot / (w * w)
    return out


def _box_means(buf, w: int, *, block_bytes: int = 64 * 2**20):
    """Means `(h - w + 1, w' - w + 1, c)` float32 of a map `(h, w', c)` over all `w x w` windows at integer cells.

    Running sums along each axis in float64 (the summed-area table, one axis at a time), then differences; in blocks
    of channels so that the float64 temporaries stay below about `4 * block_bytes`.
    """
    import torch

    h, wd, c = buf.shape
    out = torch.empty((h - w + 1, wd - w + 1, c), dtype=torch.float32, device=buf.device)
    step = max(1, int(block_bytes // max(h * wd * 8, 1)))
    for a in range(0, c, step):
        cs = torch.cumsum(buf[:, :, a : a + step].to(torch.float64), 0)
        rows = cs[w - 1 :].clone()
        rows[1:] -= cs[:-w]
        cs = torch.cumsum(rows, 1)
        box = cs[:, w - 1 :].clone()
        box[:, 1:] -= cs[:, :-w]
        out[:, :, a : a + step] = box.div_(w * w)
    return out


def _bilinear_rows(m, u0, v0, chunk: int = 2048):
    """Bilinear interpolation of a map `m` `(h, w, c)` at fractional cells `(u0, v0)` (float64 tensors) -> `(n, c)`."""
    import torch

    hm, wm, c = m.shape
    flat = m.reshape(-1, c)
    i0 = torch.clamp(torch.floor(u0), 0, max(wm - 2, 0)).long()
    j0 = torch.clamp(torch.floor(v0), 0, max(hm - 2, 0)).long()
    fu = (u0 - i0).clamp(0, 1).to(m.dtype).unsqueeze(1)
    fv = (v0 - j0).clamp(0, 1).to(m.dtype).unsqueeze(1)
    base = j0 * wm + i0
    dx, dy = (1 if wm > 1 else 0), (wm if hm > 1 else 0)
    out = torch.empty((u0.shape[0], c), dtype=m.dtype, device=m.device)
    for a in range(0, u0.shape[0], chunk):
        b, u, v, o = base[a : a + chunk], fu[a : a + chunk], fv[a : a + chunk], out[a : a + chunk]
        torch.mul(flat.index_select(0, b), (1 - u) * (1 - v), out=o)
        o.addcmul_(flat.index_select(0, b + dx), u * (1 - v))
        o.addcmul_(flat.index_select(0, b + dy), (1 - u) * v)
        o.addcmul_(flat.index_select(0, b + dy + dx), u * v)
    return out


def _window_means(buf, u0, v0, w: float):
    """Area-weighted means of a map `buf` `(h, w', c)` over windows `[u0, u0 + w) x [v0, v0 + w)` (cell units).

    Cells cut by a window edge count with the fraction of their area inside the window. For an integer `w` (the
    usual case: `input_size` a multiple of the stride) a window at a fractional offset is the bilinear interpolation
    of the four integer-offset windows around it, whose means come from the summed-area table for all offsets at once
    (:func:`_box_means`): 4 gathers per spot. Otherwise the summed-area table is interpolated at the 4 corners.
    """
    if abs(w - round(w)) < 1e-9:
        return _bilinear_rows(_box_means(buf, int(round(w))), u0, v0)
    return _window_means_sat(_sat(buf), u0, v0, float(w))


# ---------------------------------------------------------------------------------------------------------------------
# tile plan
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Tiles of one resolution: the windows, the tile grid and the tiles some window touches."""

    r: float
    x0: np.ndarray  # window origins in resampled pixels
    y0: np.ndarray
    w: int  # window side in resampled pixels (= input_size)
    tile_h: int  # core size of a tile (rows, columns), multiples of the largest stride
    tile_w: int
    halo: int
    oy: int  # resampled pixel of the top-left corner of tile (0, 0), a multiple of the largest stride
    ox: int
    needed: np.ndarray  # bool (n_ty, n_tx)
    strips: list = field(default_factory=list)  # tile rows with a needed tile

    @property
    def n_tiles(self) -> int:
        return int(self.needed.sum())

    @property
    def tile_px(self) -> int:
        return (self.tile_h + 2 * self.halo) * (self.tile_w + 2 * self.halo)


def _fit(lo: float, hi: float, tile: int, smax: int) -> tuple[int, int, int]:
    """Origin, core size (<= `tile`, multiple of `smax`) and count of the fewest tiles covering `[lo, hi)`."""
    o = int(math.floor(lo / smax)) * smax
    extent = int(math.ceil(hi / smax)) * smax - o
    n = max(1, -(-extent // tile))
    side = _round_up(extent / n, smax)
    return o, side, -(-extent // side)


def _plan(centres: np.ndarray, r: float, input_size: int, tile: int, halo: int, smax: int) -> _Plan:
    """Tiles for windows of `input_size` resampled pixels around `centres * r`.

    The grid is fitted to the windows' bounding box (origin at a multiple of `smax`, as few tiles per axis as tiles of
    at most `tile` px allow, all of the same size), so little is computed outside the windows.
    """
    x0 = r * centres[:, 0] - input_size / 2.0
    y0 = r * centres[:, 1] - input_size / 2.0
    # pixel span of the cells a window touches on the coarsest map (a superset for finer maps)
    px0 = np.floor(x0 / smax) * smax
    px1 = np.ceil((x0 + input_size) / smax) * smax
    py0 = np.floor(y0 / smax) * smax
    py1 = np.ceil((y0 + input_size) / smax) * smax
    ox, tw, ntx = _fit(float(px0.min()), float(px1.max()), tile, smax)
    oy, th, nty = _fit(float(py0.min()), float(py1.max()), tile, smax)
    tx_a = ((px0 - ox) // tw).astype(np.int64)
    tx_b = ((px1 - 1 - ox) // tw).astype(np.int64)
    ty_a = ((py0 - oy) // th).astype(np.int64)
    ty_b = ((py1 - 1 - oy) // th).astype(np.int64)
    needed = np.zeros((nty, ntx), dtype=bool)
    for dy in range(int((ty_b - ty_a).max()) + 1):
        for dx in range(int((tx_b - tx_a).max()) + 1):
            ok = (ty_a + dy <= ty_b) & (tx_a + dx <= tx_b)
            needed[ty_a[ok] + dy, tx_a[ok] + dx] = True
    p = _Plan(r=r, x0=x0, y0=y0, w=input_size, tile_h=th, tile_w=tw, halo=halo, oy=oy, ox=ox, needed=needed)
    p.strips = [int(i) for i in np.flatnonzero(needed.any(axis=1))]
    return p


# ---------------------------------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------------------------------
def _dihedral_maps(encoder, x, taps):
    """Mean over the 8 flips/right-angle rotations of the tiles `x`: each view's maps turned back before the mean."""
    import torch

    total = None
    for k in range(4):
        r = torch.rot90(x, k, dims=(2, 3))
        for flip in (False, True):
            view = r.flip(-1) if flip else r
            if x.device.type == "cpu":
                view = view.contiguous(memory_format=torch.channels_last)
            maps = _run_trunk(encoder, view, taps)
            back = []
            for m in maps:
                m = m.float()
                if flip:
                    m = m.flip(-1)
                back.append(torch.rot90(m, -k, dims=(2, 3)))
            total = back if total is None else [a + b for a, b in zip(total, back, strict=True)]
    return [t / 8 for t in total]


def _iter_strips(src, plan: _Plan, encoder, geom: TrunkGeometry, *, dihedral, batch_size, device, project, bar):
    """Yield `(strip, row0 per map, col0 per map, buffers per map)` for the strips of a plan, in order.

    Each buffer `(rows, cols, c)` holds the map rows `[row0, row0 + rows)` (global cell indices) of the current strip
    and the rows above it that windows reach back to; `col0` is the global index of its first column.
    `project`: optional list of `(c_t, k)` matrices applied to each map before it is stored.
    """
    import torch

    res = _Resampler(src, plan.r, device)
    th, tw, halo = plan.tile_h, plan.tile_w, plan.halo
    n_maps = len(geom.strides)
    n_tx = plan.needed.shape[1]
    mean = encoder.mean.to(device)
    std = encoder.std.to(device)
    buffers = [None] * n_maps
    row0s = [0] * n_maps
    col0s = [plan.ox // s for s in geom.strides]
    for sy in plan.strips:
        cols = [int(t) for t in np.flatnonzero(plan.needed[sy])]
        # the strip's buffers: the rows above it that a window ending in it can reach, kept from the previous buffers,
        # then the strip's own rows (filled tile by tile below; columns of skipped tiles stay zero)
        for t in range(n_maps):
            s = geom.strides[t]
            c = geom.channels[t] if project is None else project[t].shape[1]
            keep = int(math.ceil(plan.w / s)) + 1
            r0 = (plan.oy + sy * th) // s - keep
            buf = torch.zeros((keep + th // s, n_tx * (tw // s), c), dtype=torch.float32, device=device)
            if buffers[t] is not None:
                old, old_r0 = buffers[t], row0s[t]
                lo, hi = max(old_r0, r0), min(old_r0 + old.shape[0], r0 + keep)
                if hi > lo:
                    buf[lo - r0 : hi - r0] = old[lo - old_r0 : hi - old_r0]
            buffers[t] = buf
            row0s[t] = r0
            old = None
        cells = sum(int(b.shape[0]) * int(b.shape[1]) for b in buffers)
        _STATS["max_map_cells"] = max(_STATS.get("max_map_cells", 0), cells)
        y0 = plan.oy + sy * th - halo
        for b in range(0, len(cols), batch_size):
            batch_cols = cols[b : b + batch_size]
            xs = []
            for sx in batch_cols:
                x0 = plan.ox + sx * tw - halo
                xs.append(res.read(y0, y0 + th + 2 * halo, x0, x0 + tw + 2 * halo))
            x = (torch.stack(xs) - mean) / std
            if device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            maps = _dihedral_maps(encoder, x, geom.taps) if dihedral else _run_trunk(encoder, x, geom.taps)
            for t, m in enumerate(maps):
                s = geom.strides[t]
                h0, nh, nw = halo // s, th // s, tw // s
                keep = buffers[t].shape[0] - nh
                core = m[:, :, h0 : h0 + nh, h0 : h0 + nw].float().permute(0, 2, 3, 1)  # (B, nh, nw, c)
                if project is not None:
                    core = core @ project[t]
                for i, sx in enumerate(batch_cols):
                    buffers[t][keep:, sx * nw : (sx + 1) * nw] = core[i]
            del maps, x
            if bar is not None:
                bar.update(len(batch_cols))
        yield sy, list(row0s), list(col0s), buffers


def _dense_pass(src, plan: _Plan, encoder, geom: TrunkGeometry, *, dihedral, batch_size, device, project, out, bar):
    """Fill `out` `(n, sum c_t)` (or add projected `(n, k)` contributions when `project` is given)."""
    import torch

    n_maps = len(geom.strides)
    # strip of each spot per map: the one holding the bottom row of its window
    assign, offsets = [], [0]
    for t in range(n_maps):
        s = geom.strides[t]
        bottom = np.ceil((plan.y0 + plan.w) / s - 1e-9).astype(np.int64) - 1
        assign.append((bottom * s - plan.oy) // plan.tile_h)
        offsets.append(offsets[-1] + (geom.channels[t] if project is None else 0))
    for sy, row0s, col0s, buffers in _iter_strips(
        src, plan, encoder, geom, dihedral=dihedral, batch_size=batch_size, device=device, project=project, bar=bar
    ):
        for t in range(n_maps):
            idx = np.flatnonzero(assign[t] == sy)
            if idx.size == 0:
                continue
            s = geom.strides[t]
            u0 = torch.as_tensor(plan.x0[idx] / s - col0s[t], dtype=torch.float64, device=device)
            v0 = torch.as_tensor(plan.y0[idx] / s - row0s[t], dtype=torch.float64, device=device)
            if float(v0.min()) < -1e-6:  # pragma: no cover - guarded by `keep`
                msg = "internal error: a spot window starts above the kept rows of its strip."
                raise RuntimeError(msg)
            f = _window_means(buffers[t], u0, v0, plan.w / s).cpu().numpy()
            if project is None:
                out[idx, offsets[t] : offsets[t + 1]] = f
            else:
                out[idx] += f


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


def _pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top-`k` principal axes `(d, k)` of the rows of `x` (float64 covariance + `eigh`; signs fixed)."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=0)
    xc = x - mu
    cov = xc.T @ xc / max(x.shape[0] - 1, 1)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:k]
    comp = vecs[:, order]
    signs = np.sign(comp[np.argmax(np.abs(comp), axis=0), np.arange(comp.shape[1])])
    signs[signs == 0] = 1.0
    return mu, comp * signs


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
    progress_bar: bool = True,
) -> np.ndarray:
    """CNN features of the patch around every centre, from one pass of the encoder's trunk over the tissue.

    The source is resampled so that a patch of `patch_px` pixels becomes `input_size` pixels; the trunk runs over
    tiles with a halo (only tiles that some patch window touches); each centre gets the mean of each map over its
    patch window, read from summed-area tables in O(1) (see the module docstring for the method). The result matches
    the patch method (`pp.image_features`: crop, resize, encoder, global average pool) up to the CNN's border effects.

    Parameters
    ----------
    source
        The image: an `ImageSource` (`histospace._utils._image.open_image`) or anything `open_image` takes (path,
        array, squidpy `ImageContainer`). JPEG/PNG files are decoded once; TIFF/zarr sources are read tile by tile.
        For a multiscale image pass the level that fits (see :func:`pick_level`) and its `scale`.
    centres_px
        `(n, 2)` spot centres (x, y) in pixels (times `scale`: pixels of `source`).
    patch_px
        Side of the patch in the same units as `centres_px`.
    encoder
        An `ImageEncoder` from `histospace._nn._encoders.build_encoder`. It is put in eval mode and moved to `device`
        (in place). Its `mean`/`std` normalisation is applied to each tile. For speed on a CPU fold its BatchNorm
        (`fuse_conv_bn`) and make it channels-last, as `image_features` does.
    scale
        Factor from the units of `centres_px`, `patch_px` and `context_px` to pixels of `source` (e.g. `1 / 4` for a
        pyramid level at a quarter of the full resolution when centres are full-resolution pixels).
    input_size
        Side in pixels that a patch is resampled to (as in the patch method).
    layers
        `'last'`: the trunk's final map (DenseNet: after its final ReLU). `'stages'` (named encoders): every stage
        map in :data:`histospace._nn._encoders.STAGES`, concatenated. `None`: as the encoder was built.
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
    progress_bar
        Show one progress bar over the tiles.

    Returns
    -------
    `(n, d)` float32 features in the order of `centres_px`: `d` is the total width of the maps (doubled with
    `context_px`, main patch first), or `n_components`.
    """
    import torch
    from tqdm.auto import tqdm

    from histospace._utils import resolve_device
    from histospace._utils._image import open_image

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
    d_total = geom.width * (2 if context_px is not None else 1)
    if n_components is not None and n_components > d_total:
        msg = f"`n_components` = {n_components} exceeds the feature width {d_total}."
        raise ValueError(msg)
    dev = resolve_device(device)

    c_src = centres * float(scale)
    sizes = [float(patch_px) * float(scale)] + ([float(context_px) * float(scale)] if context_px is not None else [])
    plans = [_plan(c_src, input_size / s, int(input_size), tile, h, geom.max_stride) for s in sizes]
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
            else [_plan(cs, input_size / s, int(input_size), tile, h, geom.max_stride) for s in sizes]
        )
        kw = {"dihedral": bool(dihedral), "batch_size": int(batch_size), "device": dev}
        with tqdm(total=sum(p.n_tiles for p in ps), desc=desc, disable=not progress_bar) as bar:
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
        if n_components is None or n <= pca_n_spots:
            feats = np.empty((n, d_total), dtype=np.float32)
            run(None, None, feats, "dense features")
            if n_components is not None:
                mu, comp = _pca(feats, int(n_components))
                feats = ((feats.astype(np.float64) - mu) @ comp).astype(np.float32)
        else:
            sel = _pca_sample(plans[0], geom, int(pca_n_spots))
            sample = np.empty((sel.size, d_total), dtype=np.float32)
            run(sel, None, sample, "dense features (PCA fit)")
            mu, comp = _pca(sample, int(n_components))
            del sample
            proj = torch.as_tensor(comp, dtype=torch.float32, device=dev)
            acc = np.zeros((n, int(n_components)), dtype=np.float64)
            run(None, proj, acc, "dense features")
            feats = (acc - mu @ comp).astype(np.float32)
    logg.info("    finished", time=start)
    return feats


def _pca_sample(plan: _Plan, geom: TrunkGeometry, target: int) -> np.ndarray:
    """Centres whose windows end in evenly spaced strips, at least `target` of them (sorted indices)."""
    s = geom.max_stride
    bottom = np.ceil((plan.y0 + plan.w) / s - 1e-9).astype(np.int64) - 1
    strip = (bottom * s - plan.oy) // plan.tile_h
    ids, counts = np.unique(strip, return_counts=True)
    step = max(1, min(int(counts.sum()) // max(target, 1), len(ids)))
    while step > 1 and counts[::step].sum() < target:
        step -= 1
    chosen = ids[::step]
    return np.flatnonzero(np.isin(strip, chosen))


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
        p = _plan(centres * scale, input_size / (s * scale), int(input_size), tile, h, max_stride)
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
    1.08 at pixel ratio 1.23). For spots on a square grid of pitch `p` the pixel ratio is about
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
