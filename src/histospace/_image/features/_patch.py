"""The patch engine: crop the patch around every spot, resize it, run the encoder, in batches.

For one slide (a :class:`~histospace.pp._feature_sources._Library`) and each patch width (the patch, then its
context), the spot centres are mapped into the pixels of the level that fits the patch, read in the order that
decodes each chunk of a chunked image once (:func:`~histospace._image._sources.read_order`), cropped in DataLoader
workers (:func:`~histospace._image._sources.crop_patches`), resized to `input_size`
(:func:`~histospace._image._sources.resize_patches`) and encoded, optionally averaged over the 8 flips and
right-angle rotations (:func:`dihedral_mean`). Patches are never all held in memory. The dense engine
(:mod:`histospace._image.features._dense`) computes the same quantity from one pass of the trunk over the tissue;
:mod:`histospace._image.features._compute` picks between them per slide.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from histospace._image._sources import crop_patches, read_order, resize_patches

__all__ = ["DIHEDRAL_CHUNK", "dihedral_mean", "patch_library"]


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


#: images per forward pass of the 8 dihedral views (several views of a batch go through the encoder together)
DIHEDRAL_CHUNK = 128


def dihedral_mean(enc: nn.Module, x: torch.Tensor, *, chunk: int = DIHEDRAL_CHUNK) -> torch.Tensor:
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


def patch_library(lib, coords: np.ndarray, enc: nn.Module, target: np.ndarray, rows: np.ndarray, rec: dict, *,
                  d: int, factors: tuple[float, ...], input_size: int, batch_size: int, num_workers: int,
                  dihedral: bool, dev: torch.device, bar) -> None:  # fmt: skip
    """Patch features of the slide `lib` into `target[rows]` (columns `j * d:(j + 1) * d` for the `j`-th of
    `factors`, the patch widths relative to `lib.patch_size_px`); what was read (image, scale, level) goes into `rec`.

    `coords` are all spots' full-resolution centres (the slide's are `coords[lib.rows]`); `bar` is updated per batch.
    """  # noqa: D205
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
            y = dihedral_mean(enc, x) if dihedral else enc(x)
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
