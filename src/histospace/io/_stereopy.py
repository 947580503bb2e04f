"""`io.read_stereopy`: the AnnData that stereopy writes (`st.io.stereo_to_anndata`) as square bins in SpatialData."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from scanpy import logging as logg

from histospace._constants import SPATIAL_KEY
from histospace._utils._data import named_layers

from ._bins import COL_KEY, ROW_KEY, bin_table, bins_sdata, element_name
from ._gem import chip_resolution_um
from ._units import DNB_MICRONS

__all__ = ["read_stereopy"]


def _is_h5st(path: Path) -> bool:
    """Stereopy's own StereoExpData file (`st.io.write_h5ad`, `.h5st`): `exp_matrix` and `position`, no `X`."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "exp_matrix" in f and "X" not in f
    except OSError:
        return False


def _scalar(v):
    v = np.asarray(v)
    return v.ravel()[0].item() if v.size else None


def _sn(uns) -> str | None:
    sn = uns.get("sn")
    if isinstance(sn, pd.DataFrame) and "sn" in sn and len(sn):
        return str(sn["sn"].iloc[0])
    if isinstance(sn, dict) and "sn" in sn:
        return str(_scalar(sn["sn"]))
    if isinstance(sn, str):
        return sn
    return None


def read_stereopy(
    adata,
    *,
    bin_size: int | None = None,
    positions: Literal["auto", "corner", "centre"] = "auto",
    dataset_id: str | None = None,
    coordinate_system: str = "global",
    microns_per_dnb: float | None = None,
):
    """Read stereopy's AnnData of square bins (a `.h5ad` path or an AnnData) into the layout of :func:`read_gem`.

    stereopy (`st.io.stereo_to_anndata` / `st.io.read_gem(...).to_ann_based()` / SAW's `.h5ad` outputs) writes the
    bin positions in DNB units to `obsm['spatial']` (and `obs['x']`, `obs['y']`), the bin size to
    `uns['bin_size']`, the bin type to `uns['bin_type']`, the DNB distance in nm to `uns['resolution']` and the chip
    serial number to `uns['sn']`. Positions are the bins' corners by default (`center_coordinates=False`:
    `x // bin_size * bin_size`), their centres (`corner + bin_size // 2`) otherwise.

    Parameters
    ----------
    adata
        Path of an `.h5ad` file written from stereopy, or the :class:`anndata.AnnData` itself (it is copied).
    bin_size
        Bin side in DNB. Default: `uns['bin_size']`.
    positions
        What the positions mark: `'corner'` (stereopy's default), `'centre'` (`center_coordinates=True`), or
        `'auto'`: corners when every position is a multiple of `bin_size`, else centres.
    dataset_id
        Prefix of the element names. Default: the chip serial number in `uns['sn']`, else the file name.
    coordinate_system
        Name of the coordinate system (DNB units) the bins map to.
    microns_per_dnb
        Size of a DNB in µm. Default: `uns['resolution'] / 1000`, else from the chip serial number, else 0.5.

    Returns
    -------
    A :class:`spatialdata.SpatialData` with:

    `sdata.shapes['{dataset_id}_bin{bin_size}']` : :class:`geopandas.GeoDataFrame`
        One square per bin (side `bin_size`, DNB units), index `0 .. n - 1`.
    `sdata.tables['bin{bin_size}']` : :class:`anndata.AnnData`
        The input AnnData (`X`, layers, `var`, `uns`, `obs` kept) with `obs['array_col']`, `obs['array_row']`
        (integer bin indices on the grid of the positions), `obs['region']`, `obs['instance_id']` (spatialdata
        `TableModel`) and `obsm['spatial']` replaced by the bin centres in DNB (`float64`, x, y; stereopy's positions
        stay in `obs['x']`, `obs['y']` when it wrote them).
    `sdata.attrs['histospace']['microns_per_unit'][coordinate_system]` : :class:`float`
        Micrometres per DNB.
    """
    import anndata as ad

    name = "adata"
    if isinstance(adata, str | os.PathLike):
        path = Path(adata).expanduser()
        if not path.is_file():
            msg = f"stereopy file {str(path)!r} not found."
            raise FileNotFoundError(msg)
        if _is_h5st(path):
            msg = (
                f"{str(path)!r} is stereopy's own StereoExpData format (`st.io.write_h5ad`), not an AnnData; convert it "
                "with `st.io.stereo_to_anndata(st.io.read_h5ad(path, flavor='stereopy'), flavor='scanpy', "
                "output='bins.h5ad')` and read that file."
            )
            raise ValueError(msg)
        name = str(path)
        adata = ad.read_h5ad(path)
        default_id = path.name.split(".")[0]
    elif isinstance(adata, ad.AnnData):
        adata = adata.copy()
        default_id = "stereopy"
    else:
        msg = f"`adata` must be a path of an .h5ad file or an AnnData, got {type(adata).__name__}."
        raise TypeError(msg)
    if positions not in ("auto", "corner", "centre"):
        msg = f"`positions` must be 'auto', 'corner' or 'centre', got {positions!r}."
        raise ValueError(msg)
    bin_type = adata.uns.get("bin_type")
    if bin_type is not None and str(_scalar(bin_type)) == "cell_bins":
        msg = f"{name} holds stereopy cell bins (`uns['bin_type'] == 'cell_bins'`), not square bins."
        raise ValueError(msg)
    if bin_size is None:
        if "bin_size" not in adata.uns:
            msg = f"{name} has no `uns['bin_size']`; pass `bin_size=` (the bin side in DNB)."
            raise KeyError(msg)
        bin_size = _scalar(adata.uns["bin_size"])
    if isinstance(bin_size, bool) or not float(bin_size).is_integer() or int(bin_size) < 1:
        msg = f"`bin_size` must be a positive integer number of DNB, got {bin_size!r}."
        raise ValueError(msg)
    b = int(bin_size)
    if SPATIAL_KEY in adata.obsm:
        pos = np.asarray(adata.obsm[SPATIAL_KEY])[:, :2]
    elif "x" in adata.obs and "y" in adata.obs:
        pos = adata.obs[["x", "y"]].to_numpy()
    else:
        msg = f"{name} has no bin positions: neither `obsm['spatial']` nor `obs['x']`, `obs['y']`."
        raise KeyError(msg)
    pos = pos.astype(np.float64)
    if not np.isfinite(pos).all() or (np.floor(pos) != pos).any():
        msg = f"{name}: bin positions must be integer DNB coordinates (stereopy's `position`)."
        raise ValueError(msg)
    pos = pos.astype(np.int64)
    if positions == "auto":
        positions = "corner" if not (pos % b).any() else "centre"
    corners = pos if positions == "corner" else pos - b // 2
    offset = corners.min(axis=0) % b
    if ((corners - offset) % b).any():
        msg = f"{name}: the positions are not on one grid of bin_size={b} DNB; check `bin_size` and `positions`."
        raise ValueError(msg)
    cols = ((corners[:, 0] - offset[0]) // b).astype(np.int32)
    rows = ((corners[:, 1] - offset[1]) // b).astype(np.int32)
    if pd.Series(cols.astype(np.int64) << 32 | rows.astype(np.int64)).duplicated().any():
        msg = f"{name}: several bins share a position; is `bin_size={b}` right?"
        raise ValueError(msg)
    centres = corners + b / 2.0

    if microns_per_dnb is None:
        res = adata.uns.get("resolution")
        sn = _sn(adata.uns)
        if res is not None and float(_scalar(res)) > 0:
            microns_per_dnb = float(_scalar(res)) / 1000.0
        elif sn is not None:
            microns_per_dnb = chip_resolution_um({"SN": sn}) or DNB_MICRONS
        else:
            microns_per_dnb = DNB_MICRONS
    if dataset_id is None:
        dataset_id = _sn(adata.uns) or default_id
    dataset_id = element_name(dataset_id)
    table_key, shapes_key = f"bin{b}", f"{dataset_id}_bin{b}"

    start = logg.info(f"reading stereopy bins ({adata.n_obs} bins of {b} DNB)")
    obs = adata.obs.copy()
    obs[COL_KEY] = cols
    obs[ROW_KEY] = rows
    layers = named_layers(adata)
    table = bin_table(adata.X, obs=obs, var=adata.var.copy(), region=shapes_key, spatial=centres, layers=layers)
    table.uns.update({k: v for k, v in adata.uns.items() if k != "spatialdata_attrs"})
    for k, v in adata.obsm.items():
        if k != SPATIAL_KEY:
            table.obsm[k] = v
    for k, v in adata.obsp.items():
        table.obsp[k] = v
    if adata.raw is not None:
        table.raw = adata.raw.to_adata()
    summary = f"{table.n_obs} bins x {table.n_vars} genes"
    return bins_sdata(
        table, centres, b, table_key, shapes_key, coordinate_system, microns_per_dnb, start, summary, "bins"
    )
