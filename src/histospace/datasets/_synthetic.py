"""Simulated tissue (domains, expression, H&E) and the platforms' own files written from it.

:func:`simulate_tissue` describes a rectangle of tissue in micrometres: a tissue outline on glass, 5-7 spatial domains
(layers or blobs), molecules (a Poisson point process with a domain-specific density and gene profile with marker
genes) and an H&E-like image (nuclei as dark purple ellipses whose density, size and colour follow the domains, on
pink stroma with fibres; white glass around). Everything is a deterministic function of the seed and of fixed tiles
of the plane, so any window, bin size or image resolution can be produced on its own, tile by tile, and all of them
agree: the counts of an 8 µm bin are the sums of its 2 µm bins, the image and the counts share the same domains.

The writers produce the files the platforms' software writes, laid out as the readers expect them:
:func:`write_visium_hd` (Space Ranger outputs, read by :func:`spatialdata_io.visium_hd`), :func:`write_stereoseq` (a
SAW output folder, read by :func:`spatialdata_io.stereoseq`), :func:`write_gem` (GEM text) and :func:`write_wsi`
(a whole-slide pyramid: OME-TIFF or Aperio SVS-like TIFF).
"""

from __future__ import annotations

import gzip as _gzip
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scanpy import logging as logg

__all__ = ["SimulatedTissue", "simulate_tissue", "write_gem", "write_stereoseq", "write_visium_hd", "write_wsi"]

#: side of the square tiles (µm) in which molecules are drawn (each from its own seeded generator)
TILE_UM = 100.0
#: spacing (µm) of the grid of sites that may hold one nucleus (one cell) each
SITE_UM = 11.0
#: sites per block side (site attributes are drawn per block, from its own seeded generator)
SITE_BLOCK = 32
#: finest resolution (µm/px) rendered directly; coarser images are rendered finer and averaged
RENDER_UM = 0.5
#: side of one Stereo-seq DNB in µm
DNB_UM = 0.5

_BACKGROUND_RGB = np.array([246.0, 244.0, 247.0], dtype=np.float32)


class SimulatedTissue:
    """A simulated tissue section: domains, molecules, cells and an H&E-like image, all in µm.

    Build it with :func:`simulate_tissue`. Coordinates are micrometres from the top-left corner of the rectangle
    `[0, width_um) x [0, height_um)`; `x` grows to the right, `y` downwards (image convention).

    Attributes
    ----------
    width_um, height_um
        Size of the rectangle.
    n_domains
        Number of domains (labels `0 .. n_domains - 1`; `-1` is the glass outside the tissue).
    gene_names
        Gene symbols (`var_names` of every table written).
    gene_ids
        Gene identifiers (`SIM00000001`, ...).
    markers
        `{domain: [gene names]}`: the genes over-expressed in each domain.
    profiles
        `(n_domains, n_genes)` gene probabilities of a molecule in each domain.
    density
        Molecules per µm² in each domain (`background_density` outside the tissue).
    """

    def __init__(
        self,
        *,
        width_um: float,
        height_um: float,
        n_domains: int,
        n_genes: int,
        layout: str,
        n_markers: int,
        density: float,
        random_state: int,
    ):
        self.width_um = float(width_um)
        self.height_um = float(height_um)
        self.n_domains = int(n_domains)
        self.n_genes = int(n_genes)
        self.layout = layout
        self.random_state = int(random_state)
        rng = np.random.default_rng([self.random_state, 0])
        # tissue outline: a wobbly ellipse
        self._outline_axes = rng.uniform(0.40, 0.46, 2)
        self._outline_centre = 0.5 + rng.uniform(-0.02, 0.02, 2)
        self._outline_k = np.array([2, 3, 5])
        self._outline_amp = rng.uniform(0.02, 0.05, 3)
        self._outline_phase = rng.uniform(0, 2 * np.pi, 3)
        # domains: warped bands (layers) or a warped Voronoi partition (blobs)
        self._warp_f = rng.uniform(0.8, 2.2, (3, 2))
        self._warp_amp = rng.uniform(0.015, 0.045, 3)
        self._warp_phase = rng.uniform(0, 2 * np.pi, 3)
        widths = rng.uniform(0.6, 1.4, self.n_domains)
        edges = 0.06 + 0.88 * np.cumsum(widths) / widths.sum()
        self._band_edges = edges[:-1]
        seeds = []
        while len(seeds) < self.n_domains:  # seeds of the Voronoi cells, at least 0.18 apart
            p = rng.uniform(0.1, 0.9, 2)
            if all(np.hypot(*(p - q)) > 0.18 for q in seeds) or rng.random() < 0.02:
                seeds.append(p)
        self._seeds = np.array(seeds)
        # expression
        base = rng.gamma(0.7, 1.0, self.n_genes) + 0.02
        prof = base[None, :] * rng.lognormal(0.0, 0.35, (self.n_domains, self.n_genes))
        n_markers = max(0, min(int(n_markers), self.n_genes // self.n_domains))
        self.markers: dict[int, list[str]] = {}
        width = len(str(self.n_genes))
        self.gene_names = [f"Gene{i + 1:0{width}d}" for i in range(self.n_genes)]
        self.gene_ids = [f"SIM{i + 1:08d}" for i in range(self.n_genes)]
        for d in range(self.n_domains):
            idx = np.arange(d * n_markers, (d + 1) * n_markers)
            prof[d, idx] *= 12.0
            self.markers[d] = [self.gene_names[i] for i in idx]
        self.profiles = prof / prof.sum(1, keepdims=True)
        self.density = float(density) * rng.uniform(0.6, 1.4, self.n_domains)
        self.background_density = 0.02 * float(density)
        self._ambient = self.profiles.mean(0)
        self._cum = np.cumsum(np.vstack([self.profiles, self._ambient]), axis=1)
        self._cum[:, -1] = 1.0
        # nuclei (one per occupied site) and colours, per domain
        self.nucleus_prob = rng.uniform(0.35, 0.95, self.n_domains)
        self.nucleus_radius_um = rng.uniform(2.3, 3.5, self.n_domains)
        stroma = np.array([236.0, 166.0, 206.0]) + rng.uniform(-18, 12, (self.n_domains, 3)) * [1.0, 1.2, 0.6]
        nucleus = np.array([96.0, 58.0, 142.0]) + rng.uniform(-22, 22, (self.n_domains, 3)) * [1.0, 0.8, 1.0]
        self._stroma_lut = np.vstack([_BACKGROUND_RGB, stroma]).astype(np.float32)
        self._nucleus_rgb = np.clip(nucleus, 20, 200).astype(np.float32)
        self._fibre = rng.uniform(0, 2 * np.pi, 3)
        self._noise = np.random.default_rng([self.random_state, 3]).normal(0, 3.0, (256, 256, 3)).astype(np.float32)

    def __repr__(self) -> str:
        return (
            f"SimulatedTissue({self.width_um:g} x {self.height_um:g} µm, {self.n_domains} {self.layout} domains, "
            f"{self.n_genes} genes, random_state={self.random_state})"
        )

    # ------------------------------------------------------------------------------------------------ geometry
    def in_tissue(self, x, y) -> np.ndarray:
        """Whether points (µm) lie inside the tissue outline."""
        u = (np.asarray(x, dtype=np.float64) / self.width_um - self._outline_centre[0]) / self._outline_axes[0]
        v = (np.asarray(y, dtype=np.float64) / self.height_um - self._outline_centre[1]) / self._outline_axes[1]
        theta = np.arctan2(v, u)
        r = 1.0 + sum(
            a * np.sin(k * theta + p)
            for a, k, p in zip(self._outline_amp, self._outline_k, self._outline_phase, strict=True)
        )
        return u * u + v * v < r * r

    def domain_at(self, x, y) -> np.ndarray:
        """Domain label (`int16`) at points (µm); `-1` outside the tissue."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        u, v = x / self.width_um, y / self.height_um
        f, a, p = self._warp_f, self._warp_amp, self._warp_phase
        if self.layout == "layers":
            t = (
                v
                + a[0] * np.sin(2 * np.pi * f[0, 0] * u + p[0])
                + a[1] * np.sin(2 * np.pi * (f[1, 0] * 2 * u) + p[1])
                + a[2] * np.sin(2 * np.pi * (f[2, 0] * u + f[2, 1] * v) + p[2])
            )
            d = np.searchsorted(self._band_edges, t).astype(np.int16)
        else:
            wu = u + a[0] * 2 * np.sin(2 * np.pi * f[0, 1] * v + p[0])
            wv = v + a[1] * 2 * np.sin(2 * np.pi * f[1, 1] * u + p[1])
            best = np.full(np.shape(wu), np.inf)
            d = np.zeros(np.shape(wu), dtype=np.int16)
            for k, (sx, sy) in enumerate(self._seeds):
                dist = (wu - sx) ** 2 + (wv - sy) ** 2
                closer = dist < best
                best = np.where(closer, dist, best)
                d[closer] = k
        return np.where(self.in_tissue(x, y), d, np.int16(-1)).astype(np.int16)

    def domain_image(self, um_per_px: float) -> np.ndarray:
        """Domain labels on a grid of `um_per_px` pixels covering the rectangle (pixel centres), `(rows, cols)`."""
        nx = int(math.ceil(self.width_um / um_per_px))
        ny = int(math.ceil(self.height_um / um_per_px))
        xs = (np.arange(nx) + 0.5) * um_per_px
        ys = (np.arange(ny) + 0.5) * um_per_px
        return self.domain_at(xs[None, :], ys[:, None])

    # ------------------------------------------------------------------------------------------------ molecules
    def _tile_molecules(self, ti: int, tj: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Molecules of tile (row `ti`, column `tj`): x, y (µm, float64) and gene codes (int32)."""
        rng = np.random.default_rng([self.random_state, 1, ti, tj])
        x0, y0 = tj * TILE_UM, ti * TILE_UM
        lam = max(float(self.density.max()), self.background_density)
        n = rng.poisson(lam * TILE_UM * TILE_UM)
        x = x0 + rng.random(n) * TILE_UM
        y = y0 + rng.random(n) * TILE_UM
        d = self.domain_at(x, y)
        dens = np.where(d >= 0, self.density[np.maximum(d, 0)], self.background_density)
        keep = rng.random(n) * lam < dens
        x, y, d = x[keep], y[keep], d[keep]
        row = np.where(d >= 0, d, self.n_domains).astype(np.int64)
        u = rng.random(x.size)
        flat = (self._cum + np.arange(self.n_domains + 1)[:, None]).ravel()
        g = np.searchsorted(flat, u + row, side="right") - row * self.n_genes
        return x, y, np.clip(g, 0, self.n_genes - 1).astype(np.int32)

    def molecules(self, x0: float, y0: float, x1: float, y1: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All molecules with `x0 <= x < x1`, `y0 <= y < y1` (µm): x, y and gene codes (indices of `gene_names`)."""
        xs, ys, gs = [], [], []
        for ti in range(max(0, int(y0 // TILE_UM)), int(math.ceil(y1 / TILE_UM))):
            for tj in range(max(0, int(x0 // TILE_UM)), int(math.ceil(x1 / TILE_UM))):
                x, y, g = self._tile_molecules(ti, tj)
                m = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
                xs.append(x[m])
                ys.append(y[m])
                gs.append(g[m])
        if not xs:
            return np.empty(0), np.empty(0), np.empty(0, dtype=np.int32)
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(gs)

    def bin_counts(
        self,
        bin_um: float,
        *,
        n_rows: int | None = None,
        n_cols: int | None = None,
        extent_um: tuple[float, float] | None = None,
        strip_um: float = 1000.0,
    ) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """Counts of square bins of `bin_um` µm on the grid starting at `(0, 0)`, strip by strip of bin rows.

        Yields `(first_row, n_rows_in_strip, counts)` with `counts` a CSR matrix `(n_rows_in_strip * n_cols, n_genes)`
        (int32) of the strip's bins in row-major order. Only molecules with `x < extent_um[0]`, `y < extent_um[1]`
        count (default: the grid's extent; by default the grid covers the whole rectangle).
        """
        n_cols = int(math.ceil(self.width_um / bin_um)) if n_cols is None else int(n_cols)
        n_rows = int(math.ceil(self.height_um / bin_um)) if n_rows is None else int(n_rows)
        x_end, y_end = (n_cols * bin_um, n_rows * bin_um) if extent_um is None else extent_um
        step = max(1, int(strip_um // bin_um))
        for r0 in range(0, n_rows, step):
            r1 = min(r0 + step, n_rows)
            x, y, g = self.molecules(0.0, r0 * bin_um, min(n_cols * bin_um, x_end), min(r1 * bin_um, y_end))
            row = (y // bin_um).astype(np.int64) - r0
            col = (x // bin_um).astype(np.int64)
            m = sp.coo_matrix(
                (np.ones(g.size, dtype=np.int32), (row * n_cols + col, g)), shape=((r1 - r0) * n_cols, self.n_genes)
            ).tocsr()
            m.sum_duplicates()
            yield r0, r1 - r0, m

    # ------------------------------------------------------------------------------------------------ cells
    def sites(self, ix0: int, ix1: int, iy0: int, iy1: int) -> dict[str, np.ndarray]:
        """Attributes of the nucleus sites `[iy0, iy1) x [ix0, ix1)` (arrays `(rows, cols)`).

        Keys: `present` (bool), `cx`, `cy` (nucleus centre, µm), `rx`, `ry` (semi-axes, µm), `cos`, `sin`
        (orientation), `shade` (colour factor), `domain` (label at the site centre).
        """
        ny, nx = iy1 - iy0, ix1 - ix0
        out = {k: np.zeros((ny, nx), dtype=np.float32) for k in ("cx", "cy", "rx", "ry", "cos", "sin", "shade", "u")}
        out["domain"] = np.full((ny, nx), -1, dtype=np.int16)
        for bi in range(iy0 // SITE_BLOCK, (iy1 - 1) // SITE_BLOCK + 1):
            for bj in range(ix0 // SITE_BLOCK, (ix1 - 1) // SITE_BLOCK + 1):
                blk = self._site_block(bi, bj)
                r0, c0 = bi * SITE_BLOCK, bj * SITE_BLOCK
                sr = slice(max(iy0, r0), min(iy1, r0 + SITE_BLOCK))
                sc = slice(max(ix0, c0), min(ix1, c0 + SITE_BLOCK))
                for k, v in blk.items():
                    out[k][sr.start - iy0 : sr.stop - iy0, sc.start - ix0 : sc.stop - ix0] = v[
                        sr.start - r0 : sr.stop - r0, sc.start - c0 : sc.stop - c0
                    ]
        d = out["domain"]
        out["present"] = (d >= 0) & (out.pop("u") < np.where(d >= 0, self.nucleus_prob[np.maximum(d, 0)], 0))
        return out

    def _site_block(self, bi: int, bj: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.random_state, 2, bi + (1 << 31), bj + (1 << 31)])  # blocks may be < 0
        shape = (SITE_BLOCK, SITE_BLOCK)
        iy, ix = np.mgrid[0:SITE_BLOCK, 0:SITE_BLOCK]
        ccx = (bj * SITE_BLOCK + ix + 0.5) * SITE_UM
        ccy = (bi * SITE_BLOCK + iy + 0.5) * SITE_UM
        d = self.domain_at(ccx, ccy)
        r = self.nucleus_radius_um[np.maximum(d, 0)] * rng.uniform(0.8, 1.2, shape)
        e = rng.uniform(0.0, 0.35, shape)
        rx, ry = r * (1 + e), r / (1 + e)
        jitter = np.maximum(0.0, SITE_UM / 2 - rx - 0.4)
        theta = rng.uniform(0, np.pi, shape)
        return {
            "cx": (ccx + rng.uniform(-1, 1, shape) * jitter).astype(np.float32),
            "cy": (ccy + rng.uniform(-1, 1, shape) * jitter).astype(np.float32),
            "rx": rx.astype(np.float32),
            "ry": ry.astype(np.float32),
            "cos": np.cos(theta).astype(np.float32),
            "sin": np.sin(theta).astype(np.float32),
            "shade": rng.uniform(0.75, 1.15, shape).astype(np.float32),
            "u": rng.random(shape).astype(np.float32),
            "domain": d,
        }

    @property
    def cell_radius_um(self) -> float:
        """Radius of the (round) cells around each nucleus, µm."""
        return SITE_UM / 2 - 0.3

    def cells(self) -> pd.DataFrame:
        """All cells (occupied sites) of the section: `x`, `y` (nucleus centre, µm), `domain`, site `row`, `col`."""
        nx = int(math.ceil(self.width_um / SITE_UM))
        ny = int(math.ceil(self.height_um / SITE_UM))
        s = self.sites(0, nx, 0, ny)
        iy, ix = np.nonzero(s["present"])
        return pd.DataFrame(
            {"x": s["cx"][iy, ix], "y": s["cy"][iy, ix], "domain": s["domain"][iy, ix], "row": iy, "col": ix}
        )

    # ------------------------------------------------------------------------------------------------ image
    def render(
        self,
        x0_um: float,
        y0_um: float,
        um_per_px: float,
        width: int,
        height: int,
        *,
        stain: Literal["he", "ssdna", "cells"] = "he",
    ) -> np.ndarray:
        """Render a window of the section: pixel `(i, j)` covers `[x0 + j s, x0 + (j + 1) s)` (s = `um_per_px`).

        `stain='he'` gives an H&E-like RGB `uint8` image `(height, width, 3)`; `'ssdna'` a fluorescence-like
        greyscale `uint8` image (bright nuclei on dark tissue); `'cells'` a binary `uint8` cell mask. Resolutions
        coarser than 0.5 µm/px are rendered finer and averaged (up to 8 x 8 samples per pixel).
        """
        width, height = int(width), int(height)
        k = int(min(8, max(1, math.ceil(um_per_px / RENDER_UM - 1e-9))))
        ch = 3 if stain == "he" else 1
        out = np.empty((height, width, ch), dtype=np.uint8)
        block = max(8, (1024 // k) // 8 * 8)
        for r in range(0, height, block):
            for c in range(0, width, block):
                h, w = min(block, height - r), min(block, width - c)
                fine = self._render_fine(
                    x0_um + c * um_per_px, y0_um + r * um_per_px, um_per_px / k, w * k, h * k, stain
                )
                if k > 1:
                    fine = fine.reshape(h, k, w, k, ch).mean(axis=(1, 3))
                out[r : r + h, c : c + w] = np.clip(np.rint(fine), 0, 255).astype(np.uint8)
        return out[:, :, 0] if ch == 1 else out

    def _render_fine(self, x0, y0, r, w, h, stain) -> np.ndarray:
        """Render at a fine resolution `r` (µm/px); float32 `(h, w, channels)`.

        Per-pixel lookups use `np.take` along rows of small per-site and per-domain-cell tables (the costly part).
        """
        xs = x0 + (np.arange(w) + 0.5) * r
        ys = y0 + (np.arange(h) + 0.5) * r
        xs32, ys32 = xs.astype(np.float32), ys.astype(np.float32)
        # sites: each pixel looks at the one site it falls in (nuclei stay inside their site)
        ix = np.floor(xs / SITE_UM).astype(np.int64)
        iy = np.floor(ys / SITE_UM).astype(np.int64)
        lj, li = ix - ix[0], iy - iy[0]
        s = self.sites(int(ix[0]), int(ix[-1]) + 1, int(iy[0]), int(iy[-1]) + 1)

        def gather(table: np.ndarray) -> np.ndarray:
            return np.take(table[li], lj, axis=1)

        dx = xs32[None, :] - gather(s["cx"])
        dy = ys32[:, None] - gather(s["cy"])
        if stain == "cells":
            inside = (dx * dx + dy * dy) <= np.float32(self.cell_radius_um**2)
            return (inside & gather(s["present"]))[:, :, None].astype(np.float32) * 255.0
        # quadratic form of the rotated ellipse; absent nuclei get a form that is never < 1
        c, sn = s["cos"], s["sin"]
        irx2, iry2 = 1.0 / s["rx"] ** 2, 1.0 / s["ry"] ** 2
        big = np.float32(1e6)
        a11 = np.where(s["present"], c * c * irx2 + sn * sn * iry2, big).astype(np.float32)
        a22 = np.where(s["present"], sn * sn * irx2 + c * c * iry2, big).astype(np.float32)
        a12 = np.where(s["present"], 2 * c * sn * (irx2 - iry2), 0).astype(np.float32)
        q = gather(a11) * dx * dx
        q += gather(a12) * dx * dy
        q += gather(a22) * dy * dy
        mix = np.clip((1.0 - q) * 3.0, 0.0, 1.0)
        del q, dx, dy
        # domains on cells of ~2 µm aligned to the pixel grid (so any window renders the same pixels)
        cell = max(1, int(round(2.0 / r))) * r
        gx = np.floor(xs / cell).astype(np.int64)
        gy = np.floor(ys / cell).astype(np.int64)
        ux, uy = np.arange(gx[0], gx[-1] + 1), np.arange(gy[0], gy[-1] + 1)
        coarse = self.domain_at(((ux + 0.5) * cell)[None, :], ((uy + 0.5) * cell)[:, None])
        if stain == "ssdna":
            base = np.where(coarse >= 0, 28.0, 8.0).astype(np.float32)
            base = np.take(base[gy - gy[0]], gx - gx[0], axis=1)
            bright = gather((150.0 * s["shade"]).astype(np.float32))
            return (base + mix * (bright - base))[:, :, None]
        rgb = self._stroma_lut[coarse + 1]
        col = np.take(rgb[gy - gy[0]], gx - gx[0], axis=1)
        amp = np.take(np.where(coarse >= 0, 9.0, 0.0).astype(np.float32)[gy - gy[0]], gx - gx[0], axis=1)
        a, b, p = self._fibre
        phase = (0.21 * ys + 2.0 * np.sin(0.05 * ys + b) + p).astype(np.float32)
        fibre = np.sin((a * 0.35) * xs32[None, :] + phase[:, None]) * amp
        col += fibre[:, :, None]
        nuc = (self._nucleus_rgb[np.maximum(s["domain"], 0)] * s["shade"][:, :, None]).astype(np.float32)
        nuc = np.take(nuc[li], lj, axis=1)
        col += (nuc - col) * mix[:, :, None]
        py = np.floor(ys / r).astype(np.int64) % 256  # noise indexed by the absolute pixel
        px = np.floor(xs / r).astype(np.int64) % 256
        col += np.take(self._noise[py], px, axis=1)
        return col


def simulate_tissue(
    *,
    width_um: float = 200.0,
    height_um: float = 200.0,
    n_domains: int = 6,
    n_genes: int = 60,
    layout: Literal["layers", "blobs"] = "layers",
    n_markers: int = 5,
    density: float = 1.5,
    random_state: int = 0,
) -> SimulatedTissue:
    """Simulate a tissue section with known domains, expression and an H&E-like texture.

    The section is a wobbly ellipse of tissue on glass inside a `width_um x height_um` rectangle. Domains are warped
    bands (`'layers'`, like cortical layers) or a warped Voronoi partition (`'blobs'`). Molecules form a Poisson
    process with a density per domain (about `density` per µm², times 0.6-1.4 per domain; 2 % of it on the glass)
    and a gene profile per domain: a shared gamma-distributed base, log-normal noise per domain, and `n_markers`
    marker genes 12 times higher in their domain. Counts of any bin are therefore Poisson with known means, sparse at
    fine bins (about 6 molecules per 2 µm bin at the default density). Nuclei sit on a jittered 11 µm grid, present
    with a domain-specific probability and size.

    Parameters
    ----------
    width_um, height_um
        Size of the rectangle in µm (a Visium HD capture area is 6500 x 6500, a 1 cm Stereo-seq chip 10000 x 10000).
    n_domains
        Number of domains (5-7 look like a tissue; any number >= 2 works).
    n_genes
        Number of genes.
    layout
        `'layers'` or `'blobs'`.
    n_markers
        Marker genes per domain (at most `n_genes // n_domains`).
    density
        Mean molecules per µm² in the tissue.
    random_state
        Seed; the same seed gives the same section, whatever is produced from it and in which order.

    Returns
    -------
    A :class:`SimulatedTissue`.
    """
    if layout not in ("layers", "blobs"):
        msg = f"`layout` must be 'layers' or 'blobs', got {layout!r}."
        raise ValueError(msg)
    for name, v in (("width_um", width_um), ("height_um", height_um), ("density", density)):
        if not np.isfinite(v) or v <= 0:
            msg = f"`{name}` must be positive, got {v!r}."
            raise ValueError(msg)
    if int(n_domains) < 2 or int(n_genes) < int(n_domains):
        msg = f"Need n_domains >= 2 and n_genes >= n_domains, got n_domains={n_domains}, n_genes={n_genes}."
        raise ValueError(msg)
    return SimulatedTissue(
        width_um=width_um,
        height_um=height_um,
        n_domains=n_domains,
        n_genes=n_genes,
        layout=layout,
        n_markers=n_markers,
        density=density,
        random_state=random_state,
    )


# ---------------------------------------------------------------------------------------------------------------
# image pyramids
# ---------------------------------------------------------------------------------------------------------------
def _halve(a: np.ndarray, rows: int = 2048) -> np.ndarray:
    """2 x 2 mean of an `(h, w, c)` uint8 array (odd edges repeat the last pixel), `rows` input rows at a time."""
    h, w, c = a.shape
    out = np.empty(((h + 1) // 2, (w + 1) // 2, c), dtype=np.uint8)
    for r in range(0, h, rows):
        blk = np.asarray(a[r : r + rows])
        if blk.shape[0] % 2 or w % 2:
            blk = np.pad(blk, ((0, blk.shape[0] % 2), (0, w % 2), (0, 0)), mode="edge")
        acc = blk[0::2, 0::2].astype(np.uint16)
        acc += blk[1::2, 0::2]
        acc += blk[0::2, 1::2]
        acc += blk[1::2, 1::2]
        acc += 2
        out[r // 2 : r // 2 + acc.shape[0]] = acc >> 2
    return out


def _n_levels(width: int, height: int, tile: int) -> int:
    n, size = 1, max(width, height)
    while size > max(tile, 1024):
        size = math.ceil(size / 2)
        n += 1
    return n


def _tiles_of(arr: np.ndarray, tile: int, fill: int) -> Iterator[np.ndarray]:
    h, w, c = arr.shape
    for r in range(0, h, tile):
        for q in range(0, w, tile):
            t = arr[r : r + tile, q : q + tile]
            if t.shape[:2] != (tile, tile):
                pad = np.full((tile, tile, c), fill, dtype=arr.dtype)
                pad[: t.shape[0], : t.shape[1]] = t
                t = pad
            yield t


def _write_pyramid(
    path: Path,
    tissue: SimulatedTissue,
    *,
    um_per_px: float,
    origin_um: tuple[float, float],
    width: int,
    height: int,
    kind: Literal["ome", "svs", "tiff"],
    tile: int = 512,
    n_levels: int | None = None,
    quality: int = 90,
    stain: Literal["he", "ssdna", "cells"] = "he",
    keep_level: int = 1,
) -> np.ndarray | None:
    """Write a tiled pyramid rendered strip by strip; levels >= 1 are 2 x 2 means kept in temporary memmaps.

    `kind='ome'`: OME-TIFF with the reduced levels as SubIFDs (PhysicalSizeX/Y in µm); `'tiff'`: the same without
    OME-XML (resolution tags only); `'svs'`: Aperio layout (level 0, a stripped thumbnail, then the reduced levels as
    tiled pages; `MPP` in the ImageDescription). Returns level `keep_level` as an array (for thumbnails) or None.
    """
    import tifffile

    ch = 3 if stain == "he" else 1
    fill = 255 if stain == "he" else 0
    n_levels = _n_levels(width, height, tile) if n_levels is None else int(n_levels)
    compression = ("jpeg", {"level": quality}) if ch == 3 else ("zlib", {"level": 6})
    photometric = "rgb" if ch == 3 else "minisblack"
    res = {"resolution": (1e4 / um_per_px, 1e4 / um_per_px), "resolutionunit": "CENTIMETER"}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".pyramid_", ignore_cleanup_errors=True) as tmp:
        shapes = [(height, width)]
        for _ in range(1, n_levels):
            shapes.append((math.ceil(shapes[-1][0] / 2), math.ceil(shapes[-1][1] / 2)))
        lvl1 = None
        if n_levels > 1:
            lvl1 = np.lib.format.open_memmap(Path(tmp) / "l1.npy", mode="w+", dtype=np.uint8, shape=(*shapes[1], ch))

        def level0_tiles():
            for r in range(0, height, tile):
                h = min(tile, height - r)
                strip = tissue.render(
                    origin_um[0], origin_um[1] + r * um_per_px, um_per_px, width, h, stain=stain
                ).reshape(h, width, ch)
                if lvl1 is not None:
                    lvl1[r // 2 : r // 2 + math.ceil(h / 2)] = _halve(strip)
                yield from _tiles_of(strip, tile, fill)

        common = {"tile": (tile, tile), "photometric": photometric, "compression": compression[0]}
        common["compressionargs"] = compression[1]
        kept = None
        with tifffile.TiffWriter(path, bigtiff=True, ome=(kind == "ome")) as tw:
            if kind == "svs":
                desc = (
                    f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
                    f"JPEG/RGB Q={quality}|AppMag = {10.0 / um_per_px:g}|MPP = {um_per_px:g}|"
                    "Filename = histospace-simulated"
                )
                tw.write(
                    level0_tiles(), shape=(height, width, ch), dtype=np.uint8, description=desc, metadata=None, **common
                )
            else:
                meta = {"axes": "YXS" if ch == 3 else "YX"}
                if kind == "ome":
                    meta.update(
                        PhysicalSizeX=um_per_px, PhysicalSizeY=um_per_px, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm"
                    )
                tw.write(
                    level0_tiles(),
                    shape=(height, width, ch) if ch == 3 else (height, width),
                    dtype=np.uint8,
                    subifds=n_levels - 1,
                    metadata=meta if kind == "ome" else None,
                    **res,
                    **common,
                )
            cur = lvl1
            for i in range(1, n_levels):
                if i > 1:
                    cur = _halve(cur)
                if i == keep_level:
                    kept = np.array(cur)
                if kind == "svs":
                    if i == 1:  # Aperio: a stripped thumbnail comes second
                        thumb = cur
                        while max(thumb.shape[:2]) > 1024:
                            thumb = _halve(thumb)
                        tw.write(
                            thumb, photometric=photometric, compression="jpeg", metadata=None,
                            description=f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> "
                            f"{thumb.shape[1]}x{thumb.shape[0]} - |MPP = {um_per_px:g}",
                        )  # fmt: skip
                    desc = (
                        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
                        f"-> {cur.shape[1]}x{cur.shape[0]} JPEG/RGB Q={quality}|MPP = {um_per_px * 2**i:g}"
                    )
                    # Aperio's reduced levels are plain tiled pages (not flagged as reduced, unlike label and macro)
                    tw.write(
                        _tiles_of(cur, tile, fill), shape=cur.shape, dtype=np.uint8, description=desc,
                        metadata=None, **common,
                    )  # fmt: skip
                else:
                    tw.write(cur if ch == 3 else cur[:, :, 0], subfiletype=1, metadata=None, **common)
        cur = None  # drop the views of the memmap before the folder goes
    return kept


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))


# ---------------------------------------------------------------------------------------------------------------
# whole-slide images
# ---------------------------------------------------------------------------------------------------------------
def write_wsi(
    path: str | os.PathLike,
    tissue: SimulatedTissue | None = None,
    *,
    microns_per_pixel: float = 0.25,
    format: Literal["ome", "svs"] | None = None,
    tile: int = 512,
    quality: int = 90,
    levels: int | None = None,
) -> Path:
    """Write the simulated H&E of `tissue` as a tiled whole-slide pyramid, tile by tile.

    Parameters
    ----------
    path
        Output file. `format` defaults to `'svs'` for a `.svs` suffix, else `'ome'`.
    tissue
        The section (default: :func:`simulate_tissue` with its defaults). The image covers its whole rectangle.
    microns_per_pixel
        Resolution of level 0 (0.25 µm/px: a 40x scan; a 1 cm section is 40,000 px wide).
    format
        `'ome'`: OME-TIFF (BigTIFF) with the reduced levels as SubIFDs and `PhysicalSizeX/Y` in µm (read by tifffile,
        bioformats, QuPath). `'svs'`: an Aperio-like tiled TIFF (ImageDescription starting with
        'Aperio Image Library' and `MPP = ...`, reduced levels as further tiled pages, a stripped thumbnail second),
        read by OpenSlide (`openslide.mpp-x`).
    tile
        Tile side in pixels (a multiple of 16).
    quality
        JPEG quality of the tiles.
    levels
        Number of pyramid levels (each half the previous). Default: until the smallest is at most 1024 px.

    Returns
    -------
    The path written. Level 0 is rendered in strips of
    `tile` rows, the reduced levels are 2 x 2 means kept in temporary memory-mapped files next to `path`.
    """
    path = Path(path)
    tissue = simulate_tissue() if tissue is None else tissue
    if format is None:
        format = "svs" if path.suffix.lower() == ".svs" else "ome"
    if format not in ("ome", "svs"):
        msg = f"`format` must be 'ome' or 'svs', got {format!r}."
        raise ValueError(msg)
    if tile % 16 or tile < 16:
        msg = f"`tile` must be a positive multiple of 16, got {tile}."
        raise ValueError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    width = int(round(tissue.width_um / microns_per_pixel))
    height = int(round(tissue.height_um / microns_per_pixel))
    start = logg.info(f"writing a {width} x {height} px {format} whole-slide image to {str(path)!r}")
    _write_pyramid(
        path, tissue, um_per_px=microns_per_pixel, origin_um=(0.0, 0.0), width=width, height=height, kind=format,
        tile=tile, quality=quality, keep_level=0, n_levels=levels,
    )  # fmt: skip
    logg.info("    finished", time=start)
    return path


# ---------------------------------------------------------------------------------------------------------------
# GEM
# ---------------------------------------------------------------------------------------------------------------
def _dnb_records(tissue: SimulatedTissue, x0: float, y0: float, x1: float, y1: float, *, in_tissue_only=False):
    """Molecules of a window summed per (DNB, gene): x, y (DNB), gene code, MIDCount, ExonCount."""
    x, y, g = tissue.molecules(x0, y0, x1, y1)
    if in_tissue_only:
        keep = tissue.in_tissue(x, y)
        x, y, g = x[keep], y[keep], g[keep]
    dx = (x // DNB_UM).astype(np.int64)
    dy = (y // DNB_UM).astype(np.int64)
    key = (dy << 42) | (dx << 21) | g.astype(np.int64)
    ukey, counts = np.unique(key, return_counts=True)
    rng = np.random.default_rng([tissue.random_state, 4, int(x0), int(y0)])
    exon = rng.binomial(counts, 0.8)
    return (
        ((ukey >> 21) & ((1 << 21) - 1)).astype(np.int64),
        (ukey >> 42).astype(np.int64),
        (ukey & ((1 << 21) - 1)).astype(np.int32),
        counts.astype(np.int64),
        exon.astype(np.int64),
    )


def write_gem(
    path: str | os.PathLike,
    tissue: SimulatedTissue | None = None,
    *,
    gzip: bool | None = None,
    exon: bool = True,
    sn: str = "SS200000135TL_D1",
    gene_column: Literal["geneID", "geneName"] = "geneID",
    count_column: str = "MIDCount",
    in_tissue_only: bool = False,
    compresslevel: int = 1,
) -> Path:
    """Write the molecules of `tissue` as a Stereo-seq GEM file (one line per DNB and gene), tile by tile.

    The chip is the tissue's rectangle at 0.5 µm per DNB (DNB `x` covers `[0.5 x, 0.5 (x + 1))` µm). Lines are
    `geneID  x  y  MIDCount  ExonCount` (tab-separated; ExonCount ~ Binomial(MIDCount, 0.8)), preceded by SAW's
    header lines (`#FileFormat=GEMv0.1`, `#SortedBy=None`, `#BinSize=1`, `#Stereo-seqChip=...`, `#OffsetX=0`,
    `#OffsetY=0`), written in tiles of 100 µm (row-major), so memory stays bounded.

    Parameters
    ----------
    path
        Output file; `gzip` defaults to a `.gz` suffix.
    tissue
        The section (default: :func:`simulate_tissue` with its defaults).
    gzip
        Compress with gzip.
    exon
        Add the `ExonCount` column.
    sn
        Chip serial number in the header (`SS2...`: 500 nm DNB pitch).
    gene_column
        Name of the gene column (the values are the gene symbols).
    count_column
        Name of the count column (`MIDCount` in the specification; `MIDCounts`, `UMICount` in older files).
    in_tissue_only
        Leave out the molecules on the glass (as SAW's `tissue.gem`).
    compresslevel
        gzip level (1 is fast).

    Returns
    -------
    The path written.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    path = Path(path)
    tissue = simulate_tissue() if tissue is None else tissue
    gzip = path.suffix == ".gz" if gzip is None else bool(gzip)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = pa.array(tissue.gene_names, type=pa.string())
    columns = [gene_column, "x", "y", count_column] + (["ExonCount"] if exon else [])
    header = (
        f"#FileFormat=GEMv0.1\n#SortedBy=None\n#BinSize=1\n#Stereo-seqChip={sn}\n#OffsetX=0\n#OffsetY=0\n"
        + "\t".join(columns)
        + "\n"
    )
    opts = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    n_ty = int(math.ceil(tissue.height_um / TILE_UM))
    n_tx = int(math.ceil(tissue.width_um / TILE_UM))
    start = logg.info(f"writing GEM {str(path)!r} ({n_ty * n_tx} tiles)")
    n_lines = 0
    opener = (lambda p: _gzip.open(p, "wb", compresslevel=compresslevel)) if gzip else (lambda p: open(p, "wb"))
    with opener(path) as f:
        f.write(header.encode())
        for ti in range(n_ty):
            for tj in range(n_tx):
                x0, y0 = tj * TILE_UM, ti * TILE_UM
                x1, y1 = min(x0 + TILE_UM, tissue.width_um), min(y0 + TILE_UM, tissue.height_um)
                x, y, g, c, e = _dnb_records(tissue, x0, y0, x1, y1, in_tissue_only=in_tissue_only)
                if x.size == 0:
                    continue
                cols = [names.take(pa.array(g)), pa.array(x), pa.array(y), pa.array(c)] + (
                    [pa.array(e)] if exon else []
                )
                table = pa.Table.from_arrays(cols, names=columns)
                buf = pa.BufferOutputStream()
                pacsv.write_csv(table, buf, write_options=opts)
                f.write(buf.getvalue().to_pybytes())
                n_lines += x.size
    logg.info(f"    finished: {n_lines} lines", time=start)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Visium HD (Space Ranger)
# ---------------------------------------------------------------------------------------------------------------
def _barcodes(bin_um: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Space Ranger bin barcodes `s_008um_00012_00034-1` as a bytes array (vectorised)."""
    n = rows.size
    prefix = np.frombuffer(f"s_{bin_um:03d}um_".encode(), dtype=np.uint8)
    out = np.empty((n, len(prefix) + 5 + 1 + 5 + 2), dtype=np.uint8)
    out[:, : len(prefix)] = prefix
    p = len(prefix)
    for k in range(5):
        out[:, p + 4 - k] = 48 + (rows // 10**k) % 10
        out[:, p + 6 + 4 - k] = 48 + (cols // 10**k) % 10
    out[:, p + 5] = ord("_")
    out[:, -2:] = np.frombuffer(b"-1", dtype=np.uint8)
    return out.view(f"S{out.shape[1]}").ravel()


def _arrow_strings(fixed: np.ndarray):
    """An Arrow string array from a fixed-width bytes array, without Python objects (10^7 barcodes)."""
    import pyarrow as pa

    n, width = fixed.size, fixed.dtype.itemsize
    offsets = np.arange(n + 1, dtype=np.int64) * width
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(fixed.tobytes())).cast(pa.string())


def _write_10x_h5(path: Path, X: sp.csr_matrix, barcodes: np.ndarray, tissue: SimulatedTissue) -> None:
    """A Cell Ranger / Space Ranger feature-barcode matrix (HDF5, CSC genes x barcodes = CSR barcodes x genes)."""
    import h5py

    X = sp.csr_matrix(X)
    n_genes = X.shape[1]
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["library_ids"] = np.array([b"histospace-simulated"])
        f.attrs["chemistry_description"] = "Visium HD v1"
        f.attrs["software_version"] = "histospace simulate (spaceranger-4.0 layout)"
        m = f.create_group("matrix")
        kw = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        m.create_dataset("barcodes", data=barcodes, **kw)
        m.create_dataset("data", data=X.data.astype(np.int32), **kw)
        m.create_dataset("indices", data=X.indices.astype(np.int64), **kw)
        m.create_dataset("indptr", data=X.indptr.astype(np.int64), **kw)
        m.create_dataset("shape", data=np.array([n_genes, X.shape[0]], dtype=np.int32))
        feat = m.create_group("features")
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        feat.create_dataset("feature_type", data=np.array([b"Gene Expression"] * n_genes))
        feat.create_dataset("genome", data=np.array([b"GRCh38"] * n_genes))
        feat.create_dataset("id", data=np.array([g.encode() for g in tissue.gene_ids]))
        feat.create_dataset("name", data=np.array([g.encode() for g in tissue.gene_names]))


def write_visium_hd(
    path: str | os.PathLike,
    tissue: SimulatedTissue | None = None,
    *,
    bin_sizes: Sequence[int] = (2, 8, 16),
    dataset_id: str = "synthetic_hd",
    microns_per_pixel: float = 0.5,
    margin_um: float | None = None,
    image: bool = True,
    hires_size: int = 6000,
    lowres_size: int = 600,
    raw: bool = False,
) -> Path:
    """Write a Space Ranger (Visium HD) output folder for `tissue`, as :func:`spatialdata_io.visium_hd` reads it.

    The capture area is the tissue's rectangle; bins of `b` µm form the grid `array_row = y // b`,
    `array_col = x // b` (the grid of the smallest bin size, coarser bins nesting on it, as Space Ranger's). The
    full-resolution H&E covers the capture area plus `margin_um` on every side at `microns_per_pixel`; pixel
    `(i, j)` covers `[(j + 0.5) s - margin, ...)` so a bin centre `(x, y)` µm is at
    `pxl_col_in_fullres = (x + margin) / s`.

    Written::

        {dataset_id}_feature_slice.h5                  (metadata_json with hd_layout_json and transform_matrices)
        {dataset_id}_tissue_image.btf                  (pyramidal BigTIFF, JPEG tiles, SubIFD levels; if image)
        spatial/{tissue_hires_image.png, tissue_lowres_image.png, scalefactors_json.json}
        binned_outputs/square_{bbb}um/filtered_feature_bc_matrix.h5     (in-tissue bins; raw_... if raw)
        binned_outputs/square_{bbb}um/spatial/{tissue_positions.parquet, scalefactors_json.json}

    Parameters
    ----------
    path
        Output folder (created).
    tissue
        The section (default: :func:`simulate_tissue` with its defaults).
    bin_sizes
        Bin sides in µm to write (integers; each a multiple of the smallest).
    dataset_id
        File name prefix (spatialdata-io names the elements after it).
    microns_per_pixel
        Resolution of the full-resolution image.
    margin_um
        Glass around the capture area in the image (default: 4 % of the larger side).
    image
        Write the full-resolution image (hires/lowres PNGs are always written).
    hires_size, lowres_size
        Longer side in pixels of the hires and lowres PNGs (Space Ranger: 6000 and 600).
    raw
        Also write `raw_feature_bc_matrix.h5` (all bins).

    Returns
    -------
    The folder written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    tissue = simulate_tissue() if tissue is None else tissue
    bins = sorted({int(b) for b in bin_sizes})
    if not bins or bins[0] < 1 or any(b % bins[0] for b in bins) or bins[-1] > 999:
        msg = f"`bin_sizes` must be integers in µm (1-999), each a multiple of the smallest; got {bin_sizes!r}."
        raise ValueError(msg)
    s = float(microns_per_pixel)
    margin = 0.04 * max(tissue.width_um, tissue.height_um) if margin_um is None else float(margin_um)
    b0 = bins[0]
    n_rows0 = int(tissue.height_um // b0)
    n_cols0 = int(tissue.width_um // b0)
    full_w = int(math.ceil((tissue.width_um + 2 * margin) / s))
    full_h = int(math.ceil((tissue.height_um + 2 * margin) / s))
    hires_scalef = min(1.0, hires_size / max(full_w, full_h))
    lowres_scalef = min(1.0, lowres_size / max(full_w, full_h))
    path.mkdir(parents=True, exist_ok=True)
    start = logg.info(f"writing a Visium HD output ({', '.join(f'{b} µm' for b in bins)}) to {str(path)!r}")

    # images: full resolution (pyramid), hires and lowres PNGs
    (path / "spatial").mkdir(exist_ok=True)
    from PIL import Image

    hires_wh = (max(1, round(full_w * hires_scalef)), max(1, round(full_h * hires_scalef)))
    lowres_wh = (max(1, round(full_w * lowres_scalef)), max(1, round(full_h * lowres_scalef)))
    if image:
        lvl1 = _write_pyramid(
            path / f"{dataset_id}_tissue_image.btf", tissue, um_per_px=s, origin_um=(-margin, -margin),
            width=full_w, height=full_h, kind="tiff", keep_level=1,
        )  # fmt: skip
        src = lvl1 if lvl1 is not None and min(lvl1.shape[1], lvl1.shape[0]) >= max(hires_wh) // 2 else None
    else:
        src = None
    if src is not None and src.shape[1] >= hires_wh[0]:
        hires = _resize(src, hires_wh)
    else:
        hires = tissue.render(-margin, -margin, s / hires_scalef, *hires_wh)
    lowres = _resize(hires, lowres_wh)
    Image.fromarray(hires).save(path / "spatial" / "tissue_hires_image.png", compress_level=1)
    Image.fromarray(lowres).save(path / "spatial" / "tissue_lowres_image.png", compress_level=1)

    def scalefactors(b: int) -> dict:
        return {
            "spot_diameter_fullres": b / s,
            "bin_size_um": float(b),
            "microns_per_pixel": s,
            "tissue_lowres_scalef": lowres_scalef,
            "fiducial_diameter_fullres": 10.0 * b0 / s,
            "tissue_hires_scalef": hires_scalef,
            "regist_target_img_scalef": hires_scalef,
        }

    (path / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors(b0), indent=2))

    # feature slice metadata: spot (col, row) of the smallest bins <-> microscope (col, row) pixels
    spot_to_px = np.array([[b0 / s, 0.0, (0.5 * b0 + margin) / s], [0.0, b0 / s, (0.5 * b0 + margin) / s], [0, 0, 1]])
    matrices = {
        "spot_colrow_to_microscope_colrow": spot_to_px,
        "microscope_colrow_to_spot_colrow": np.linalg.inv(spot_to_px),
        "spot_colrow_to_cytassist_colrow": spot_to_px * [[0.1], [0.1], [1]],
    }
    matrices["cytassist_colrow_to_spot_colrow"] = np.linalg.inv(matrices["spot_colrow_to_cytassist_colrow"])
    layout = {"file_format": "1.0", "transform": np.eye(3).ravel().tolist(), "num_rows": n_rows0, "num_cols": n_cols0}
    meta = {
        "hd_layout_json": json.dumps(layout),
        "transform_matrices": {k: v.ravel().tolist() for k, v in matrices.items()},
        "bin_size_um": float(b0),
    }
    import h5py

    with h5py.File(path / f"{dataset_id}_feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps(meta)
        f.attrs["version"] = "histospace-simulated"

    # bins: counts of every size from one pass over the molecules of the smallest grid's extent (so coarse edge
    # bins hold exactly what their fine bins hold), in strips of whole rows of the largest bins
    extent_x, extent_y = n_cols0 * b0, n_rows0 * b0
    grids = {b: (int(math.ceil(n_rows0 / (b // b0))), int(math.ceil(n_cols0 / (b // b0)))) for b in bins}
    blocks: dict[int, list] = {b: [] for b in bins}
    strip = bins[-1] * max(1, 1024 // bins[-1])
    for y0 in range(0, int(math.ceil(extent_y)), strip):
        y1 = min(y0 + strip, extent_y)
        x, y, g = tissue.molecules(0.0, float(y0), extent_x, y1)
        for b in bins:
            n_cols = grids[b][1]
            r0, r1 = y0 // b, int(math.ceil(y1 / b))
            idx = ((y // b).astype(np.int64) - r0) * n_cols + (x // b).astype(np.int64)
            m = sp.coo_matrix((np.ones(g.size, dtype=np.int32), (idx, g)), shape=((r1 - r0) * n_cols, tissue.n_genes))
            blocks[b].append(m.tocsr())
    for b in bins:
        n_rows, n_cols = grids[b]
        rows, cols = np.divmod(np.arange(n_rows * n_cols, dtype=np.int64), n_cols)
        cx, cy = (cols + 0.5) * b, (rows + 0.5) * b
        in_t = tissue.in_tissue(cx, cy)
        d = path / "binned_outputs" / f"square_{b:03d}um"
        (d / "spatial").mkdir(parents=True, exist_ok=True)
        bc = _barcodes(b, rows, cols)
        pos = pa.table(
            {
                "barcode": _arrow_strings(bc),
                "in_tissue": pa.array(in_t.astype(np.int32)),
                "array_row": pa.array(rows.astype(np.int32)),
                "array_col": pa.array(cols.astype(np.int32)),
                "pxl_row_in_fullres": pa.array((cy + margin) / s),
                "pxl_col_in_fullres": pa.array((cx + margin) / s),
            }
        )
        pq.write_table(pos, d / "spatial" / "tissue_positions.parquet")
        del pos, rows, cols, cx, cy
        (d / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors(b), indent=2))
        X = sp.vstack(blocks.pop(b), format="csr")
        X.sum_duplicates()
        _write_10x_h5(d / "filtered_feature_bc_matrix.h5", X[in_t], bc[in_t], tissue)
        if raw:
            _write_10x_h5(d / "raw_feature_bc_matrix.h5", X, bc, tissue)
        logg.debug(f"    square_{b:03d}um: {int(in_t.sum())} bins in tissue, {X.nnz} non-zero")
        del X
    logg.info("    finished", time=start)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Stereo-seq (SAW)
# ---------------------------------------------------------------------------------------------------------------
def _bin_gefs(paths: dict[Path, bool], tissue: SimulatedTissue, bin_sizes: Sequence[int], *, sn: str) -> None:
    """Square-bin GEFs (old layout: geneExp/binN/{gene(gene, offset, count), expression(x, y, count), exon}).

    `paths` maps each file to whether it keeps only the molecules inside the tissue (SAW's tissue cut); all files
    come from one pass over the molecules. Records are grouped by gene; `x`, `y` are the bin's corner in DNB.
    """
    import h5py

    n_dx = int(math.ceil(tissue.width_um / DNB_UM))
    n_dy = int(math.ceil(tissue.height_um / DNB_UM))
    sizes = sorted({int(b) for b in bin_sizes})
    parts: dict[tuple[Path, int], list] = {(p, n): [] for p in paths for n in sizes}
    strip = max(1, int(1000.0 // (sizes[-1] * DNB_UM))) * sizes[-1] * DNB_UM
    for y0 in np.arange(0.0, n_dy * DNB_UM, strip):
        x, y, g = tissue.molecules(0.0, y0, n_dx * DNB_UM, min(y0 + strip, n_dy * DNB_UM))
        inside = tissue.in_tissue(x, y)
        dx, dy = (x // DNB_UM).astype(np.int64), (y // DNB_UM).astype(np.int64)
        for p, cut in paths.items():
            keep = inside if cut else slice(None)
            for n in sizes:
                key = (g[keep].astype(np.int64) << 42) | (dy[keep] // n * n << 21) | (dx[keep] // n * n)
                parts[(p, n)].append(np.unique(key, return_counts=True))
    for p in paths:
        with h5py.File(p, "w") as f:
            f.attrs["version"] = np.uint32(2)
            f.attrs["omics"] = "Transcriptomics"
            f.attrs["sn"] = sn
            f.attrs["resolution"] = np.uint32(500)
            f.attrs["offsetX"] = np.int32(0)
            f.attrs["offsetY"] = np.int32(0)
            ge = f.create_group("geneExp")
            for n in sizes:
                k = np.concatenate([q[0] for q in parts[(p, n)]])
                c = np.concatenate([q[1] for q in parts[(p, n)]])
                parts[(p, n)] = []
                # gene-major order, as GEF groups the records by gene; a bin cut by two strips is summed here
                k, inv = np.unique(k, return_inverse=True)
                c = np.bincount(inv.ravel(), weights=c, minlength=k.size).astype(np.int64)
                genes = (k >> 42).astype(np.int64)
                exp = np.zeros(k.size, dtype=[("x", "<i4"), ("y", "<i4"), ("count", "<u4")])
                exp["x"], exp["y"], exp["count"] = k & ((1 << 21) - 1), (k >> 21) & ((1 << 21) - 1), c
                per_gene = np.bincount(genes, minlength=tissue.n_genes)
                present = np.flatnonzero(per_gene)
                gene = np.zeros(present.size, dtype=[("gene", "S64"), ("offset", "<u4"), ("count", "<u4")])
                gene["gene"] = [tissue.gene_names[i].encode() for i in present]
                gene["count"] = per_gene[present]
                gene["offset"] = np.concatenate([[0], np.cumsum(per_gene[present])[:-1]])
                grp = ge.create_group(f"bin{n}")
                ds = grp.create_dataset("expression", data=exp, compression="gzip", compression_opts=4)
                for name, val in (
                    ("minX", exp["x"].min(initial=0)), ("minY", exp["y"].min(initial=0)),
                    ("maxX", exp["x"].max(initial=0)), ("maxY", exp["y"].max(initial=0)),
                ):  # fmt: skip
                    ds.attrs[name] = np.int32(val)
                ds.attrs["maxExp"] = np.uint32(c.max(initial=0))
                ds.attrs["resolution"] = np.uint32(n)
                grp.create_dataset("gene", data=gene)
                exon = np.random.default_rng([tissue.random_state, 5, n]).binomial(c, 0.8).astype(np.uint32)
                grp.create_dataset("exon", data=exon, compression="gzip", compression_opts=4)


def _cell_counts(tissue: SimulatedTissue, cells: pd.DataFrame) -> sp.csr_matrix:
    """Counts of the molecules inside each cell's circle (cells x genes, int32)."""
    n_sx = int(math.ceil(tissue.width_um / SITE_UM))
    n_sy = int(math.ceil(tissue.height_um / SITE_UM))
    lookup = np.full((n_sy, n_sx), -1, dtype=np.int64)
    lookup[cells["row"].to_numpy(), cells["col"].to_numpy()] = np.arange(len(cells))
    cx, cy = cells["x"].to_numpy(), cells["y"].to_numpy()
    r2 = tissue.cell_radius_um**2
    rows_all, genes_all = [], []
    strip = 40 * SITE_UM
    for y0 in np.arange(0.0, tissue.height_um, strip):
        x, y, g = tissue.molecules(0.0, y0, tissue.width_um, min(y0 + strip, tissue.height_um))
        sy = np.minimum((y // SITE_UM).astype(np.int64), n_sy - 1)
        sx = np.minimum((x // SITE_UM).astype(np.int64), n_sx - 1)
        cell = lookup[sy, sx]
        ok = cell >= 0
        cell, x, y, g = cell[ok], x[ok], y[ok], g[ok]
        inside = (x - cx[cell]) ** 2 + (y - cy[cell]) ** 2 <= r2
        rows_all.append(cell[inside])
        genes_all.append(g[inside])
    r = np.concatenate(rows_all) if rows_all else np.empty(0, dtype=np.int64)
    g = np.concatenate(genes_all) if genes_all else np.empty(0, dtype=np.int64)
    X = sp.coo_matrix((np.ones(r.size, dtype=np.int32), (r, g)), shape=(len(cells), tissue.n_genes)).tocsr()
    X.sum_duplicates()
    return X


def _cellbin_gef(path: Path, tissue: SimulatedTissue, cells: pd.DataFrame, X: sp.csr_matrix, *, sn: str) -> None:
    """A cell-bin GEF (`cellBin/...`) as spatialdata-io's Stereo-seq reader parses it; coordinates in DNB."""
    import h5py

    n_cells, n_genes = X.shape
    X = sp.csr_matrix(X)
    X.sort_indices()
    rng = np.random.default_rng([tissue.random_state, 6])
    exon_rec = rng.binomial(X.data, 0.8).astype(np.uint16)
    cx = np.rint(cells["x"].to_numpy() / DNB_UM).astype(np.int32)
    cy = np.rint(cells["y"].to_numpy() / DNB_UM).astype(np.int32)
    radius_dnb = tissue.cell_radius_um / DNB_UM
    cell = np.zeros(
        n_cells,
        dtype=[("id", "<u4"), ("x", "<i4"), ("y", "<i4"), ("offset", "<u4"), ("geneCount", "<u2"),
               ("expCount", "<u2"), ("dnbCount", "<u2"), ("area", "<u2"), ("cellTypeID", "<u2"),
               ("clusterID", "<u2")],
    )  # fmt: skip
    cell["id"] = np.arange(n_cells)
    cell["x"], cell["y"] = cx, cy
    cell["offset"] = X.indptr[:-1]
    cell["geneCount"] = np.minimum(np.diff(X.indptr), 65535)
    cell["expCount"] = np.minimum(np.asarray(X.sum(1)).ravel(), 65535)
    area = int(round(math.pi * radius_dnb**2))
    cell["dnbCount"] = min(area // 2, 65535)
    cell["area"] = area
    cell["clusterID"] = cells["domain"].to_numpy() + 1
    Xc = X.tocsc()
    Xc.sort_indices()
    gene = np.zeros(n_genes, dtype=[("geneName", "S64"), ("offset", "<u4"), ("cellCount", "<u4"),
                                    ("expCount", "<u4"), ("maxMIDcount", "<u2")])  # fmt: skip
    gene["geneName"] = [g.encode() for g in tissue.gene_names]
    gene["offset"] = Xc.indptr[:-1]
    gene["cellCount"] = np.diff(Xc.indptr)
    gene["expCount"] = np.asarray(X.sum(0)).ravel()
    gene["maxMIDcount"] = np.minimum(X.max(axis=0).toarray().ravel(), 65535)
    cell_exp = np.zeros(X.nnz, dtype=[("geneID", "<u4"), ("count", "<u2")])
    cell_exp["geneID"], cell_exp["count"] = X.indices, np.minimum(X.data, 65535)
    gene_exp = np.zeros(Xc.nnz, dtype=[("cellID", "<u4"), ("count", "<u2")])
    gene_exp["cellID"], gene_exp["count"] = Xc.indices, np.minimum(Xc.data, 65535)
    exon_c = sp.csr_matrix((exon_rec, X.indices, X.indptr), shape=X.shape).tocsc()
    exon_c.sort_indices()
    border = np.full((n_cells, 32, 2), 32767, dtype=np.int16)
    ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    border[:, :16, 0] = np.rint(radius_dnb * np.cos(ang)).astype(np.int16)
    border[:, :16, 1] = np.rint(radius_dnb * np.sin(ang)).astype(np.int16)
    with h5py.File(path, "w") as f:
        f.attrs["version"] = np.uint32(2)
        f.attrs["resolution"] = np.uint32(500)
        f.attrs["offsetX"] = np.int32(0)
        f.attrs["offsetY"] = np.int32(0)
        f.attrs["omics"] = "Transcriptomics"
        f.attrs["sn"] = sn
        cb = f.create_group("cellBin")
        cb.create_dataset("cell", data=cell)
        exon_r = sp.csr_matrix((exon_rec, X.indices, X.indptr), shape=X.shape)
        cb.create_dataset("cellExon", data=np.minimum(np.asarray(exon_r.sum(1)).ravel(), 65535).astype(np.uint16))
        cb.create_dataset("gene", data=gene)
        cb.create_dataset("geneExon", data=np.asarray(exon_c.sum(0)).ravel().astype(np.uint32))
        cb.create_dataset("cellExp", data=cell_exp)
        cb.create_dataset("cellExpExon", data=exon_rec)
        cb.create_dataset("geneExp", data=gene_exp)
        cb.create_dataset("geneExpExon", data=exon_c.data.astype(np.uint16))
        n_bx = int(math.ceil(tissue.width_um / DNB_UM / 256))
        n_by = int(math.ceil(tissue.height_um / DNB_UM / 256))
        cb.create_dataset("blockSize", data=np.array([256, 256, n_bx, n_by], dtype=np.uint32))
        cb.create_dataset("blockIndex", data=np.zeros(n_bx * n_by + 1, dtype=np.uint32))
        cb.create_dataset("cellTypeList", data=np.array([b"default"]))
        cb.create_dataset("cellBorder", data=border, compression="gzip", compression_opts=4)


def write_stereoseq(
    path: str | os.PathLike,
    tissue: SimulatedTissue | None = None,
    *,
    sn: str = "SS200000135TL_D1",
    bin_sizes: Sequence[int] = (1, 50),
    image: bool = True,
    gem: bool = False,
) -> Path:
    """Write a SAW (Stereo-seq) output folder for `tissue`, as :func:`spatialdata_io.stereoseq` reads it.

    The chip is the tissue's rectangle at 0.5 µm per DNB; images are registered to it at one pixel per DNB.

    Written::

        02.count/{sn}.raw.gef                         (square bins of every molecule; GEF old layout)
        03.register/{sn}_regist.tif                    (ssDNA-like greyscale stain, 1 px = 1 DNB)
        03.register/{sn}_mask.tif                      (cell mask)
        03.register/{sn}_HE.tif                        (H&E, pyramidal OME-TIFF, 1 px = 1 DNB; if image)
        04.tissuecut/{sn}.tissuecut.gef                (square bins inside the tissue)
        04.tissuecut/{sn}.tissue.gem.gz                (GEM of the tissue's molecules; if gem)
        041.cellcut/{sn}.cellbin.gef                   (cells: centre, border, counts)
        051.cellcluster/{sn}.cell.cluster.h5ad         (cells x genes counts; obs['leiden'] = true domain)

    Square-bin GEF records hold the bin's corner `(x // N * N, y // N * N)` in DNB and the summed count, grouped by
    gene. spatialdata-io reads the registered image only when it is greyscale (as SAW's ssDNA image); the H&E is
    left to :func:`histospace.io.add_image` (`scale=1`).

    Parameters
    ----------
    path
        Output folder (created).
    tissue
        The section (default: :func:`simulate_tissue` with its defaults).
    sn
        Chip serial number (file prefix).
    bin_sizes
        Square bin sizes in DNB written to the GEFs (spatialdata-io makes one points element and table per size; bin1
        of a 1 cm chip has ~10^8 records: leave it out at that size).
    image
        Write the H&E image.
    gem
        Also write the tissue's GEM file.

    Returns
    -------
    The folder written.
    """
    import anndata as ad
    import tifffile

    path = Path(path)
    tissue = simulate_tissue() if tissue is None else tissue
    if not bin_sizes or any(int(b) < 1 for b in bin_sizes):
        msg = f"`bin_sizes` must be positive integers (DNB), got {bin_sizes!r}."
        raise ValueError(msg)
    start = logg.info(f"writing a Stereo-seq (SAW) output to {str(path)!r}")
    dirs = {k: path / k for k in ("02.count", "03.register", "04.tissuecut", "041.cellcut", "051.cellcluster")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    gefs = {dirs["02.count"] / f"{sn}.raw.gef": False, dirs["04.tissuecut"] / f"{sn}.tissuecut.gef": True}
    _bin_gefs(gefs, tissue, bin_sizes, sn=sn)
    if gem:
        write_gem(dirs["04.tissuecut"] / f"{sn}.tissue.gem.gz", tissue, sn=sn, in_tissue_only=True)
    width = int(math.ceil(tissue.width_um / DNB_UM))
    height = int(math.ceil(tissue.height_um / DNB_UM))
    for name, stain in ((f"{sn}_regist.tif", "ssdna"), (f"{sn}_mask.tif", "cells")):
        with tifffile.TiffWriter(dirs["03.register"] / name, bigtiff=True) as tw:

            def tiles(stain=stain):
                for r in range(0, height, 512):
                    h = min(512, height - r)
                    strip = tissue.render(0.0, r * DNB_UM, DNB_UM, width, h, stain=stain)
                    yield from (t[:, :, 0] for t in _tiles_of(strip[:, :, None], 512, 0))

            tw.write(tiles(), shape=(height, width), dtype=np.uint8, tile=(512, 512), compression="zlib")
    if image:
        _write_pyramid(
            dirs["03.register"] / f"{sn}_HE.tif", tissue, um_per_px=DNB_UM, origin_um=(0.0, 0.0),
            width=width, height=height, kind="ome", keep_level=0,
        )  # fmt: skip
    cells = tissue.cells()
    X = _cell_counts(tissue, cells)
    _cellbin_gef(dirs["041.cellcut"] / f"{sn}.cellbin.gef", tissue, cells, X, sn=sn)
    obs = pd.DataFrame(
        {"leiden": pd.Categorical(cells["domain"].astype(str))}, index=pd.Index(np.arange(len(cells)).astype(str))
    )
    adata = ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=tissue.gene_names))
    adata.obsm["spatial"] = np.column_stack([cells["x"], cells["y"]]) / DNB_UM
    adata.write_h5ad(dirs["051.cellcluster"] / f"{sn}.cell.cluster.h5ad")
    logg.info(f"    finished: {len(cells)} cells", time=start)
    return path
