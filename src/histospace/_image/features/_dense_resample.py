"""Antialiased bilinear resampling for the dense engine, in global pixel coordinates.

Every tile is then a crop of one resampled image, however the tiles are laid out.
"""

from __future__ import annotations

import numpy as np


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


class Resampler:
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
