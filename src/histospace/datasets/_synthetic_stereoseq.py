"""SAW (Stereo-seq) output folders written from a simulated tissue, as spatialdata-io reads them."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scanpy import logging as logg

from histospace._constants import SPATIAL_KEY

from ._synthetic import DNB_UM, SITE_UM, SimulatedTissue, simulate_tissue
from ._synthetic_gem import write_gem
from ._synthetic_pyramid import _tiles_of, _write_pyramid

__all__ = ["write_stereoseq"]


def _gef_attrs(f, sn: str) -> None:
    """The root attributes of a GEF file (version 2, transcriptomics, 500 nm DNB pitch, no offset)."""
    f.attrs["version"] = np.uint32(2)
    f.attrs["omics"] = "Transcriptomics"
    f.attrs["sn"] = sn
    f.attrs["resolution"] = np.uint32(500)
    f.attrs["offsetX"] = np.int32(0)
    f.attrs["offsetY"] = np.int32(0)


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
            _gef_attrs(f, sn)
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
        _gef_attrs(f, sn)
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
        Output folder (created), laid out as SAW writes it.
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
    adata.obsm[SPATIAL_KEY] = np.column_stack([cells["x"], cells["y"]]) / DNB_UM
    adata.write_h5ad(dirs["051.cellcluster"] / f"{sn}.cell.cluster.h5ad")
    logg.info(f"    finished: {len(cells)} cells", time=start)
    return path
