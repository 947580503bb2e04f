"""Trunk geometry for the dense engine: where an encoder's maps sit on the input grid, and running the trunk.

:func:`trunk_geometry` measures the strides, widths and receptive-field reach of the maps (the exact halo);
:func:`run_trunk` and :func:`_dihedral_maps` run the trunk on normalised tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["TrunkGeometry", "trunk_geometry"]


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
    from histospace._image.encoders._torchvision import STAGES

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


def run_trunk(encoder, x, taps: tuple[int, ...] | None) -> list:
    """Maps of the trunk for a normalised input `x`: `[map]` or one map per tap (children order)."""
    import torch.nn.functional as F

    from histospace._image.encoders._torchvision import DenseNetFeatures

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
        An :class:`~histospace._image.encoders._torchvision.ImageEncoder` (from `build_encoder`).
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
                maps = run_trunk(encoder, (x - encoder.mean.to(dev, dtype)) / encoder.std.to(dev, dtype), taps)
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
    from histospace._image.encoders._torchvision import ImageEncoder

    if not isinstance(encoder, ImageEncoder):
        msg = (
            "`encoder` must be an ImageEncoder from `histospace._image.encoders._torchvision.build_encoder` (it carries the input "
            f"normalisation and the trunk), got {type(encoder).__name__}."
        )
        raise TypeError(msg)


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
            maps = run_trunk(encoder, view, taps)
            back = []
            for m in maps:
                m = m.float()
                if flip:
                    m = m.flip(-1)
                back.append(torch.rot90(m, -k, dims=(2, 3)))
            total = back if total is None else [a + b for a, b in zip(total, back, strict=True)]
    return [t / 8 for t in total]
