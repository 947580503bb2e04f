"""`io.rebin`: sum square bins into coarser ones (Visium HD 2 µm -> 8/16/... µm, Stereo-seq bin1 -> binN)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scanpy import logging as logg

from histospace._constants import SPATIAL_KEY
from histospace._spatial._platform import GEM_TABLE as _GEM_KEY
from histospace._spatial._platform import VISIUM_HD_TABLE as _VISIUM_HD_KEY
from histospace._spatial._platform import is_visium_hd_barcode
from histospace._utils._choice import only_one
from histospace._utils._data import named_layers

from ._bins import COL_KEY, ROW_KEY, bin_table, squares
from ._units import _linear_scale, microns_per_unit, set_microns_per_unit, square_side

__all__ = ["rebin"]


def _only_table(sdata, table_key: str | None) -> str:
    if table_key is not None:
        if table_key not in sdata.tables:
            msg = f"Table {table_key!r} not found in `sdata.tables` (available: {sorted(sdata.tables)})."
            raise KeyError(msg)
        return table_key
    empty = "`sdata` has no table; read the bins first (e.g. `hs.io.read_gem` or `spatialdata_io.visium_hd`)."
    msg = f"`sdata` has several tables {sorted(sdata.tables)}; pass `table_key=` to choose the bins to re-bin."
    return only_one(list(sdata.tables), msg, empty_msg=empty)


def _annotated_shapes(sdata, table_key: str) -> tuple[str, str, str]:
    table = sdata.tables[table_key]
    attrs = table.uns.get("spatialdata_attrs")
    if not attrs:
        msg = f"Table {table_key!r} annotates no element (no `uns['spatialdata_attrs']`); parse it with TableModel."
        raise ValueError(msg)
    region = attrs["region"]
    regions = [region] if isinstance(region, str) else list(region)
    if len(regions) != 1:
        msg = f"Table {table_key!r} annotates several elements {regions}; re-binning needs one grid of bins."
        raise ValueError(msg)
    region = regions[0]
    if region not in sdata.shapes:
        where = "labels" if region in sdata.labels else "points" if region in sdata.points else None
        extra = f" (it is in `sdata.{where}`)" if where else ""
        msg = (
            f"Table {table_key!r} annotates {region!r}{extra}, not shapes; rebin needs bins drawn as squares "
            "(spatialdata_io.visium_hd with `bins_as_squares=True` and `annotate_table_by_labels=False`)."
        )
        raise ValueError(msg)
    return region, attrs["region_key"], attrs["instance_key"]


def _bin_microns(sdata, table_key: str, shapes, side: float) -> float | None:
    """Side of the input bins in µm: from the table key, else from a recorded/inferred µm per unit."""
    m = _VISIUM_HD_KEY.match(table_key)
    if m:
        return float(m.group(1))
    from spatialdata.transformations import get_transformation

    for cs in get_transformation(shapes, get_all=True):
        mpu = microns_per_unit(sdata, cs)
        scale = _linear_scale(shapes, cs)
        if mpu is not None and scale is not None:
            return side * scale * mpu
    return None


def _aggregate(X, new_id: np.ndarray, n_new: int, block: int):
    """`A @ X` with `A[new_id[i], i] = 1`, computed over blocks of new bins (a sparse result for sparse input)."""
    n_old = new_id.size
    order = np.argsort(new_id, kind="stable")
    ptr = np.searchsorted(new_id[order], np.arange(n_new + 1))
    sparse_in = sp.issparse(X)
    if sparse_in and X.format != "csr":
        X = sp.csr_matrix(X)
    out = []
    for b0 in range(0, n_new, block):
        b1 = min(b0 + block, n_new)
        rows = order[ptr[b0] : ptr[b1]]
        A = sp.csr_matrix(
            (np.ones(rows.size, dtype=np.float32), np.arange(rows.size), ptr[b0 : b1 + 1] - ptr[b0]),
            shape=(b1 - b0, rows.size),
        )
        sub = X[rows] if sparse_in else np.asarray(X[rows])
        res = A @ sub
        out.append(sp.csr_matrix(res) if sparse_in else np.asarray(res))
    if n_old == 0:
        return X[:0]
    if sparse_in:
        res = sp.vstack(out, format="csr")
        res.sort_indices()
        return res.astype(X.dtype, copy=False)
    return np.concatenate(out, axis=0).astype(X.dtype, copy=False)


def _new_keys(table_key: str, region: str, factor: int, new_um: float | None, key_added: str | None):
    m_hd = _VISIUM_HD_KEY.match(table_key)
    m_gem = _GEM_KEY.match(table_key)
    if key_added is not None:
        new_key = key_added
    elif m_hd and new_um is not None and float(new_um).is_integer() and new_um < 1000:
        new_key = f"square_{int(new_um):03d}um"
    elif m_gem:
        new_key = f"bin{int(m_gem.group(1)) * factor}"
    else:
        new_key = f"{table_key}_x{factor}"
    new_region = region.replace(table_key, new_key) if table_key in region else f"{region}_x{factor}"
    if new_region == region:
        new_region = f"{region}_x{factor}"
    return new_key, new_region


def rebin(
    sdata,
    *,
    factor: int | None = None,
    bin_size_um: float | None = None,
    table_key: str | None = None,
    key_added: str | None = None,
    row_key: str = ROW_KEY,
    col_key: str = COL_KEY,
    block_size: int = 65536,
) -> None:
    """Sum square bins into bins `factor` times larger: a new table and its squares, added to `sdata`.

    Works for the tables of :func:`spatialdata_io.visium_hd` (2 µm -> 4, 8, 16, 32 µm ...) and of
    :func:`histospace.io.read_gem` / :func:`histospace.io.read_stereopy` (bin1 -> binN). New bin `(r, c)` holds the
    input bins with `array_row // factor == r` and `array_col // factor == c`, the same nesting as Space Ranger's
    binned outputs and stereopy's bins. Counts (`X` and every layer) are summed with a sparse aggregation matrix, one
    block of `block_size` new bins at a time, so memory stays bounded by the input plus the result.

    New centres are the mean of the input centres plus a correction for missing input bins (bins outside the tissue
    are often filtered out): the affine map from `(array_col, array_row)` to the input centres is fitted over all
    bins, and the mean is moved to where the full block's centre lies. A full block therefore gets exactly the mean
    of its input centres. Squares are axis-aligned with side `factor` times the input side, in the input shapes'
    intrinsic units and with their transformations.

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData` with a table of square bins annotating a shapes element, with integer grid
        indices in `obs[row_key]`, `obs[col_key]` and centres in `obsm['spatial']` (intrinsic units of the shapes).
    factor
        Integer ratio of new to input bin side (e.g. 8 for 2 -> 16 µm). Give `factor` or `bin_size_um`.
    bin_size_um
        New bin side in µm; must be an integer multiple of the input bin side (known from a Visium HD table key
        `square_XXXum`, or from the recorded µm per unit, see :func:`histospace.io.microns_per_unit`).
    table_key
        Table of input bins. Default: the only table.
    key_added
        Key of the new table. Default: `square_XXXum` for Visium HD tables, `bin{N * factor}` for `binN` tables,
        else `{table_key}_x{factor}`. The squares are named like the input shapes with the table key replaced.
    row_key, col_key
        obs columns with the bins' integer row (y) and column (x) index.
    block_size
        New bins aggregated per block.

    Returns
    -------
    Returns `None`. Adds to `sdata`:

    `sdata.tables[key_added]` : :class:`anndata.AnnData`
        Summed counts (same dtype and sparsity as the input `X`; the same layers), the input `var`;
        `obs[row_key]`, `obs[col_key]`: the new grid indices; `obs['n_bins']`: number of input bins summed;
        `obs['in_tissue']`: 1 if any input bin was (when the input has it); the region and instance keys of the input
        (annotating the new squares); `obsm['spatial']`: new centres; `uns['rebin']`: source table, factor, bin sizes.
    `sdata.shapes[...]` : :class:`geopandas.GeoDataFrame`
        The new squares, index `0 .. n - 1`, with the input shapes' transformations.
    `sdata.attrs['histospace']['microns_per_unit']`
        Filled in for the squares' coordinate systems when it can be inferred and was not recorded.
    """
    from spatialdata import SpatialData
    from spatialdata.transformations import get_transformation

    if not isinstance(sdata, SpatialData):
        msg = f"`sdata` must be a spatialdata.SpatialData, got {type(sdata).__name__}."
        raise TypeError(msg)
    if (factor is None) == (bin_size_um is None):
        msg = "Pass exactly one of `factor` (integer ratio) and `bin_size_um` (new bin side in µm)."
        raise ValueError(msg)
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int | np.integer) or factor < 2):
        msg = f"`factor` must be an integer >= 2, got {factor!r}."
        raise ValueError(msg)
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) or block_size < 1:
        msg = f"`block_size` must be a positive integer, got {block_size!r}."
        raise ValueError(msg)
    table_key = _only_table(sdata, table_key)
    table = sdata.tables[table_key]
    for k in (row_key, col_key):
        if k not in table.obs:
            msg = (
                f"`sdata.tables[{table_key!r}].obs[{k!r}]` not found; rebin needs the bins' integer grid indices "
                f"(`row_key`, `col_key`; spatialdata-io's Visium HD and histospace tables have 'array_row'/'array_col')."
            )
            raise KeyError(msg)
    if SPATIAL_KEY not in table.obsm:
        msg = f"`sdata.tables[{table_key!r}].obsm['spatial']` not found; it must hold the bin centres."
        raise KeyError(msg)
    region, region_key, instance_key = _annotated_shapes(sdata, table_key)
    shapes = sdata.shapes[region]
    side = square_side(shapes)
    if side is None:
        msg = f"`sdata.shapes[{region!r}]` does not hold axis-aligned squares (or circles) of one size."
        raise ValueError(msg)
    in_um = _bin_microns(sdata, table_key, shapes, side)
    if bin_size_um is not None:
        if in_um is None:
            msg = (
                f"The size of the bins of {table_key!r} in µm is unknown; pass `factor=` or record it with "
                "`hs.io.set_microns_per_unit(sdata, value, coordinate_system=...)`."
            )
            raise ValueError(msg)
        ratio = float(bin_size_um) / in_um
        if ratio < 1.5 or abs(ratio - round(ratio)) > 1e-6:
            msg = (
                f"`bin_size_um={bin_size_um}` is not an integer multiple (>= 2) of the input bin side "
                f"({in_um:g} µm) of {table_key!r}."
            )
            raise ValueError(msg)
        factor = int(round(ratio))
    factor = int(factor)
    new_um = None if in_um is None else in_um * factor
    new_key, new_region = _new_keys(table_key, region, factor, new_um, key_added)
    if new_key in sdata.tables:
        msg = f"`sdata.tables[{new_key!r}]` exists already; pass another `key_added=`."
        raise ValueError(msg)
    if new_region in sdata.shapes or new_region in sdata.images or new_region in sdata.labels:
        msg = f"An element {new_region!r} exists already in `sdata`; pass another `key_added=`."
        raise ValueError(msg)
    rows = table.obs[row_key].to_numpy()
    cols = table.obs[col_key].to_numpy()
    if rows.dtype.kind not in "iu" or cols.dtype.kind not in "iu":
        msg = f"`obs[{row_key!r}]` and `obs[{col_key!r}]` must hold integer grid indices."
        raise ValueError(msg)
    if table.n_obs == 0:
        msg = f"Table {table_key!r} has no bins."
        raise ValueError(msg)

    start = logg.info(f"re-binning {table_key!r} by {factor} ({table.n_obs} bins)")
    rows = rows.astype(np.int64)
    cols = cols.astype(np.int64)
    nr, nc = np.floor_divide(rows, factor), np.floor_divide(cols, factor)
    r0, c0 = nr.min(), nc.min()
    pair = (nr - r0) * (nc.max() - c0 + 1) + (nc - c0)
    upair, new_id = np.unique(pair, return_inverse=True)
    new_id = new_id.astype(np.int64).ravel()
    n_new = upair.size
    new_rows = upair // (nc.max() - c0 + 1) + r0
    new_cols = upair % (nc.max() - c0 + 1) + c0

    X = _aggregate(table.X, new_id, n_new, int(block_size))
    layers = {k: _aggregate(v, new_id, n_new, int(block_size)) for k, v in named_layers(table).items()}
    n_bins = np.bincount(new_id, minlength=n_new)

    # centres: member mean + J (full-block index centre - member index mean); J fitted over all input bins
    spatial = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    design = np.column_stack([cols, rows, np.ones_like(cols)]).astype(np.float64)
    coef, _, rank, _ = np.linalg.lstsq(design - design.mean(0) * [1, 1, 0], spatial, rcond=None)
    J = coef[:2] if rank == 3 else np.diag([float(side)] * 2)  # one row or column: adjacent squares
    sums = np.zeros((n_new, 4))
    for j, v in enumerate((spatial[:, 0], spatial[:, 1], cols.astype(np.float64), rows.astype(np.float64))):
        sums[:, j] = np.bincount(new_id, weights=v, minlength=n_new)
    means = sums / n_bins[:, None]
    target = np.column_stack([new_cols * factor + (factor - 1) / 2.0, new_rows * factor + (factor - 1) / 2.0])
    centres = means[:, :2] + (target - means[:, 2:]) @ J

    obs = pd.DataFrame(
        {
            row_key: new_rows.astype(table.obs[row_key].dtype),
            col_key: new_cols.astype(table.obs[col_key].dtype),
            "n_bins": n_bins.astype(np.int32),
        }
    )
    if "in_tissue" in table.obs:
        it = np.zeros(n_new, dtype=np.int64)
        np.maximum.at(it, new_id, table.obs["in_tissue"].to_numpy().astype(np.int64))
        obs["in_tissue"] = it.astype(table.obs["in_tissue"].dtype)
    obs.index = rebinned_names(table, table_key, new_rows, new_cols, factor, side, new_um)
    uns = {
        "rebin": {
            "source": table_key,
            "factor": factor,
            **({"bin_size_um": float(new_um), "source_bin_size_um": float(in_um)} if new_um is not None else {}),
        }
    }
    if isinstance(table.uns.get("gem"), dict):
        uns["gem"] = {**table.uns["gem"], "bin_size": int(table.uns["gem"].get("bin_size", side)) * factor}

    new_table = bin_table(
        X,
        obs=obs,
        var=table.var.copy(),
        region=new_region,
        spatial=centres,
        layers=layers,
        uns=uns,
        region_key=region_key,
        instance_key=instance_key,
    )
    transformations = get_transformation(shapes, get_all=True)
    for cs in transformations:
        mpu = microns_per_unit(sdata, cs)
        if mpu is not None:
            set_microns_per_unit(sdata, mpu, coordinate_system=cs)
    sdata.shapes[new_region] = squares(centres, side * factor, transformations=transformations)
    sdata.tables[new_key] = new_table
    logg.info(
        f"    finished: {n_new} bins of {'' if new_um is None else f'{new_um:g} µm'}",
        time=start,
        deep=f"added\n    {new_key!r}, summed counts (sdata.tables)\n    {new_region!r}, squares (sdata.shapes)",
    )


def rebinned_names(
    table, table_key: str, rows: np.ndarray, cols: np.ndarray, factor: int, side: float, new_um
) -> pd.Index:
    """Obs names in the input's style: Space Ranger's `s_016um_00012_00034-1`, stereopy's `x << 32 | y`, or `r_c`."""
    first = str(table.obs_names[0])
    if is_visium_hd_barcode(first) and new_um is not None and float(new_um).is_integer():
        um = int(new_um)
        return pd.Index([f"s_{um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)])
    gem = table.uns.get("gem")
    if isinstance(gem, dict) and "bin_size" in gem and rows.min() >= 0 and cols.min() >= 0:
        b = int(gem["bin_size"]) * factor
        return pd.Index(((cols.astype(np.int64) * b << 32) | (rows.astype(np.int64) * b)).astype(str))
    return pd.Index([f"{r}_{c}" for r, c in zip(rows, cols, strict=True)])
