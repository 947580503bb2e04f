"""Means of a feature map over fractional windows, from summed-area tables (the dense engine's O(1) per spot)."""

from __future__ import annotations


def summed_area_table(buf):
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


def window_means_sat(sat, u0, v0, w: float, chunk: int = 1024):
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


def box_means(buf, w: int, *, block_bytes: int = 64 * 2**20):
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


def window_means(buf, u0, v0, w: float):
    """Area-weighted means of a map `buf` `(h, w', c)` over windows `[u0, u0 + w) x [v0, v0 + w)` (cell units).

    Cells cut by a window edge count with the fraction of their area inside the window. For an integer `w` (the
    usual case: `input_size` a multiple of the stride) a window at a fractional offset is the bilinear interpolation
    of the four integer-offset windows around it, whose means come from the summed-area table for all offsets at once
    (:func:`box_means`): 4 gathers per spot. Otherwise the summed-area table is interpolated at the 4 corners.
    """
    if abs(w - round(w)) < 1e-9:
        return _bilinear_rows(box_means(buf, int(round(w))), u0, v0)
    return window_means_sat(summed_area_table(buf), u0, v0, float(w))
