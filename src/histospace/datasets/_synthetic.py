"""Simulated tissue: domains, molecules, cells and an H&E-like image, all a deterministic function of a seed.

:func:`simulate_tissue` describes a rectangle of tissue in micrometres: a tissue outline on glass, 5-7 spatial domains
(layers or blobs), molecules (a Poisson point process with a domain-specific density and gene profile with marker
genes) and an H&E-like image (nuclei as dark purple ellipses whose density, size and colour follow the domains, on
pink stroma with fibres; white glass around). Everything is a deterministic function of the seed and of fixed tiles
of the plane, so any window, bin size or image resolution can be produced on its own, tile by tile, and all of them
agree: the counts of an 8 µm bin are the sums of its 2 µm bins, the image and the counts share the same domains.

The writers produce the files the platforms' software writes, laid out as the readers expect them, each in its own
module: :func:`write_visium_hd` (`_synthetic_visium_hd`: Space Ranger outputs, read by
:func:`spatialdata_io.visium_hd`), :func:`write_stereoseq` (`_synthetic_stereoseq`: a SAW output folder, read by
:func:`spatialdata_io.stereoseq`), :func:`write_gem` (`_synthetic_gem`: GEM text) and :func:`write_wsi`
(`_synthetic_pyramid`: a whole-slide pyramid, OME-TIFF or Aperio SVS-like TIFF, also used for the others' images).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["SimulatedTissue", "simulate_tissue"]

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
