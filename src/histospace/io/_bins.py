"""Square bins as SpatialData: a table (bins x genes) annotating square shapes, shared by the readers and `rebin`."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scanpy import logging as logg

from histospace._constants import COL_KEY, ROW_KEY, SPATIAL_KEY

from ._units import set_microns_per_unit

#: obs columns of a bin table: the bin's column (x) and row (y) index on its grid, as in spatialdata-io's Visium HD
COL_KEY = COL_KEY
ROW_KEY = ROW_KEY
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"

_NAME_OK = re.compile(r"[^0-9A-Za-z_.-]")


def element_name(name: str) -> str:
    """A valid SpatialData element name (letters, digits, `_`, `-`, `.`) from any string."""
    name = _NAME_OK.sub("_", str(name)).strip("_.-")
    return name or "bins"


def squares(centres: np.ndarray, side: float, *, index=None, transformations: Mapping | None = None):
    """Parse axis-aligned squares of side `side` centred on `centres` (`(n, 2)` as x, y) as a shapes element."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel

    c = np.asarray(centres, dtype=np.float64)
    h = float(side) / 2.0
    geom = shapely.box(c[:, 0] - h, c[:, 1] - h, c[:, 0] + h, c[:, 1] + h)
    idx = pd.RangeIndex(len(c)) if index is None else pd.Index(index)
    gdf = gpd.GeoDataFrame(geometry=gpd.GeoSeries(geom, index=idx))
    return ShapesModel.parse(gdf, transformations=dict(transformations) if transformations else None)


def bin_table(
    X,
    *,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    region: str,
    spatial: np.ndarray,
    layers: Mapping | None = None,
    uns: Mapping | None = None,
    region_key: str = REGION_KEY,
    instance_key: str = INSTANCE_KEY,
):
    """An AnnData of bins parsed with :class:`spatialdata.models.TableModel`, annotating `region` row by row.

    `obs[instance_key]` is `0 .. n - 1`, the index of the squares in the shapes element `region`.
    """
    import anndata as ad
    from spatialdata.models import TableModel

    obs = obs.copy()
    obs[region_key] = pd.Categorical([region] * len(obs), categories=[region])
    obs[instance_key] = np.arange(len(obs), dtype=np.int64)
    adata = ad.AnnData(X=X, obs=obs, var=var, layers=dict(layers) if layers else None)
    adata.obsm[SPATIAL_KEY] = np.asarray(spatial, dtype=np.float64)
    if uns:
        adata.uns.update(dict(uns))
    return TableModel.parse(adata, region=region, region_key=region_key, instance_key=instance_key)


def bins_sdata(
    table,
    centres: np.ndarray,
    side: float,
    table_key: str,
    shapes_key: str,
    coordinate_system: str,
    microns_per_unit: float,
    start,
    summary: str,
    table_what: str,
):
    """A SpatialData of a bin table and its squares of `side` around `centres` (identity to `coordinate_system`).

    The table goes to `tables[table_key]`, the squares to `shapes[shapes_key]`; `microns_per_unit` is recorded for
    `coordinate_system` (:func:`~histospace.io.set_microns_per_unit`). Logs the reader's end, `finished: {summary}`
    timed from `start`, naming the table (`table_what`) and the squares.
    """
    from spatialdata import SpatialData
    from spatialdata.transformations import Identity

    shapes = squares(centres, side, transformations={coordinate_system: Identity()})
    sdata = SpatialData(shapes={shapes_key: shapes}, tables={table_key: table})
    set_microns_per_unit(sdata, microns_per_unit, coordinate_system=coordinate_system)
    logg.info(
        f"    finished: {summary}",
        time=start,
        deep=f"added\n    {table_key!r}, {table_what} (sdata.tables)\n    {shapes_key!r}, bin squares (sdata.shapes)",
    )
    return sdata
