"""The dense engine's tile plan and streaming: tiles with a halo over the windows, strip by strip.

A plan fits a grid of equal tiles to the windows' bounding box and keeps only the tiles some window touches;
:func:`iter_strips` runs the trunk over them row by row, keeping one strip of maps plus the rows windows reach back
to, and :func:`_dense_pass` reads each spot's window mean from the strip that holds the bottom of its window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from histospace._image.features._dense_resample import Resampler
from histospace._image.features._dense_trunk import TrunkGeometry, _dihedral_maps, _round_up, run_trunk
from histospace._image.features._dense_windows import window_means

#: internal counters of the last :func:`dense_features` call (for tests and benchmarks)
_STATS: dict = {}


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


def plan_strips(centres: np.ndarray, r: float, input_size: int, tile: int, halo: int, smax: int) -> _Plan:
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


def iter_strips(src, plan: _Plan, encoder, geom: TrunkGeometry, *, dihedral, batch_size, device, project, bar):
    """Yield `(strip, row0 per map, col0 per map, buffers per map)` for the strips of a plan, in order.

    Each buffer `(rows, cols, c)` holds the map rows `[row0, row0 + rows)` (global cell indices) of the current strip
    and the rows above it that windows reach back to; `col0` is the global index of its first column.
    `project`: optional list of `(c_t, k)` matrices applied to each map before it is stored.
    """
    import torch

    res = Resampler(src, plan.r, device)
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
            maps = _dihedral_maps(encoder, x, geom.taps) if dihedral else run_trunk(encoder, x, geom.taps)
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
    for sy, row0s, col0s, buffers in iter_strips(
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
            f = window_means(buffers[t], u0, v0, plan.w / s).cpu().numpy()
            if project is None:
                out[idx, offsets[t] : offsets[t + 1]] = f
            else:
                out[idx] += f


def pca_sample(plan: _Plan, geom: TrunkGeometry, target: int) -> np.ndarray:
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
