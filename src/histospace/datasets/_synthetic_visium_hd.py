"""Space Ranger (Visium HD) output folders written from a simulated tissue, as spatialdata-io reads them."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scanpy import logging as logg

from histospace._constants import COL_KEY, ROW_KEY, SPACERANGER_SPATIAL_DIR
from histospace._utils._deprecate import renamed_argument

from ._synthetic import SimulatedTissue, simulate_tissue
from ._synthetic_pyramid import _resize, _write_pyramid

__all__ = ["write_visium_hd"]


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
    mpp: float | None = None,
    margin_um: float | None = None,
    image: bool = True,
    hires_size: int = 6000,
    lowres_size: int = 600,
    raw: bool = False,
    microns_per_pixel: float | None = None,
) -> Path:
    """Write a Space Ranger (Visium HD) output folder for `tissue`, as :func:`spatialdata_io.visium_hd` reads it.

    The capture area is the tissue's rectangle; bins of `b` µm form the grid `array_row = y // b`,
    `array_col = x // b` (the grid of the smallest bin size, coarser bins nesting on it, as Space Ranger's). The
    full-resolution H&E covers the capture area plus `margin_um` on every side at `mpp` µm per pixel; pixel
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
        Output folder (created), laid out as Space Ranger writes it.
    tissue
        The section (default: :func:`simulate_tissue` with its defaults).
    bin_sizes
        Bin sides in µm to write (integers; each a multiple of the smallest).
    dataset_id
        File name prefix (spatialdata-io names the elements after it).
    mpp
        Resolution of the full-resolution image in µm per pixel (default 0.5).
    margin_um
        Glass around the capture area in the image (default: 4 % of the larger side).
    image
        Write the full-resolution image (hires/lowres PNGs are always written).
    hires_size, lowres_size
        Longer side in pixels of the hires and lowres PNGs (Space Ranger: 6000 and 600).
    raw
        Also write `raw_feature_bc_matrix.h5` (all bins).
    microns_per_pixel
        Deprecated alias of `mpp`.

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
    mpp = renamed_argument(
        mpp, microns_per_pixel, new_name="mpp", old_name="microns_per_pixel", func="hs.datasets.write_visium_hd"
    )
    s = 0.5 if mpp is None else float(mpp)
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
    (path / SPACERANGER_SPATIAL_DIR).mkdir(exist_ok=True)
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
    Image.fromarray(hires).save(path / SPACERANGER_SPATIAL_DIR / "tissue_hires_image.png", compress_level=1)
    Image.fromarray(lowres).save(path / SPACERANGER_SPATIAL_DIR / "tissue_lowres_image.png", compress_level=1)

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

    (path / SPACERANGER_SPATIAL_DIR / "scalefactors_json.json").write_text(json.dumps(scalefactors(b0), indent=2))

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
        (d / SPACERANGER_SPATIAL_DIR).mkdir(parents=True, exist_ok=True)
        bc = _barcodes(b, rows, cols)
        pos = pa.table(
            {
                "barcode": _arrow_strings(bc),
                "in_tissue": pa.array(in_t.astype(np.int32)),
                ROW_KEY: pa.array(rows.astype(np.int32)),
                COL_KEY: pa.array(cols.astype(np.int32)),
                "pxl_row_in_fullres": pa.array((cy + margin) / s),
                "pxl_col_in_fullres": pa.array((cx + margin) / s),
            }
        )
        pq.write_table(pos, d / SPACERANGER_SPATIAL_DIR / "tissue_positions.parquet")
        del pos, rows, cols, cx, cy
        (d / SPACERANGER_SPATIAL_DIR / "scalefactors_json.json").write_text(json.dumps(scalefactors(b), indent=2))
        X = sp.vstack(blocks.pop(b), format="csr")
        X.sum_duplicates()
        _write_10x_h5(d / "filtered_feature_bc_matrix.h5", X[in_t], bc[in_t], tissue)
        if raw:
            _write_10x_h5(d / "raw_feature_bc_matrix.h5", X, bc, tissue)
        logg.debug(f"    square_{b:03d}um: {int(in_t.sum())} bins in tissue, {X.nnz} non-zero")
        del X
    logg.info("    finished", time=start)
    return path
