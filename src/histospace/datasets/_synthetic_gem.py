"""Stereo-seq GEM text files written from a simulated tissue, tile by tile."""

from __future__ import annotations

import gzip as _gzip
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
from scanpy import logging as logg

from ._synthetic import DNB_UM, TILE_UM, SimulatedTissue, simulate_tissue

__all__ = ["write_gem"]


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
