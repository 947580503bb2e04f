"""SpatialData in and out: the table a function writes to, the regions it annotates, and their place in an image.

Every public function takes an AnnData or a SpatialData. With a SpatialData the function works on one table (the
AnnData it writes to, named by `table_key`); the spot or bin centres are those of the shapes the table annotates,
mapped into an image's pixels through spatialdata's coordinate transformations (no hand-made scale factors). Results
go into the table exactly as into an AnnData; with `copy=True` a new SpatialData holding a copy of the table (and the
same other elements) is returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from histospace._spatial._affine import affine_scale, apply_affine, element_to, shared_coordinate_system
from histospace._utils._choice import element_key

__all__ = [
    "TableContext",
    "affine_scale",
    "apply_affine",
    "as_table",
    "is_spatialdata",
    "region_labels",
    "table_output",
]


def is_spatialdata(obj) -> bool:
    """Whether `obj` is a :class:`spatialdata.SpatialData` (without importing spatialdata)."""
    t = type(obj)
    return t.__name__ == "SpatialData" and t.__module__.split(".")[0] == "spatialdata"


@dataclass
class TableContext:
    """A SpatialData and the table a function works on."""

    sdata: Any
    table_key: str

    @property
    def table(self) -> AnnData:
        """The table (an AnnData, written in place)."""
        return self.sdata.tables[self.table_key]

    def with_table(self, table: AnnData):
        """A new SpatialData with `table` in place of the table (the other elements are shared, not copied)."""
        from spatialdata import SpatialData

        s = self.sdata
        return SpatialData(
            images=dict(s.images),
            labels=dict(s.labels),
            points=dict(s.points),
            shapes=dict(s.shapes),
            tables={**dict(s.tables), self.table_key: table},
            attrs=dict(getattr(s, "attrs", {}) or {}),
        )

    # ---- regions -------------------------------------------------------------------------------------------------
    def region_info(self) -> tuple[list[str], str | None, str | None]:
        """`(regions, region_key, instance_key)` from the table's `uns['spatialdata_attrs']`."""
        attrs = self.table.uns.get("spatialdata_attrs", {}) or {}
        region = attrs.get("region")
        regions = [] if region is None else ([region] if isinstance(region, str) else [str(r) for r in region])
        return regions, attrs.get("region_key"), attrs.get("instance_key")

    def shapes_key(self, shapes_key: str | None) -> str:
        """The shapes element the table annotates (`shapes_key` when given, checked)."""
        regions, _, _ = self.region_info()
        annotated = [r for r in regions if r in self.sdata.shapes]
        if shapes_key is not None:
            if shapes_key not in self.sdata.shapes:
                msg = f"`sdata.shapes[{shapes_key!r}]` not found; shapes elements: {list(self.sdata.shapes)}."
                raise KeyError(msg)
            if regions and shapes_key not in regions:
                msg = (
                    f"The table {self.table_key!r} does not annotate `sdata.shapes[{shapes_key!r}]` (it annotates "
                    f"{regions}); pass `shapes_key=` one of them, or `table_key=` the table of these shapes."
                )
                raise ValueError(msg)
            return shapes_key
        if not annotated:
            msg = (
                f"The table {self.table_key!r} annotates no shapes element (regions {regions}; shapes elements "
                f"{list(self.sdata.shapes)}). Annotate the spots or bins with `spatialdata.models.TableModel.parse("
                "table, region=..., region_key=..., instance_key=...)`."
            )
            raise ValueError(msg)
        if len(annotated) > 1:
            msg = f"The table {self.table_key!r} annotates several shapes elements {annotated}; pass `shapes_key=`."
            raise ValueError(msg)
        return annotated[0]

    def rows_of(self, shapes_key: str) -> np.ndarray:
        """Rows of the table annotating `shapes_key` (all of them for a table of one region)."""
        regions, region_key, _ = self.region_info()
        if len(regions) <= 1 or region_key is None:
            return np.arange(self.table.n_obs)
        return np.flatnonzero(self.table.obs[region_key].astype(str).to_numpy() == shapes_key)

    def geometry(self, shapes_key: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
        """Centres `(n, 2)` and sizes `(n,)` of the shapes of the table's `rows`, in the shapes' own units.

        The size is the diameter of a circle, the side of a square, and the diameter of the disc of the same area for
        other polygons; the kind is `'circle'`, `'square'` or `'polygon'`.
        """
        shapes = self.sdata.shapes[shapes_key]
        _, _, instance_key = self.region_info()
        table = self.table
        if instance_key is not None and instance_key in table.obs:
            ids = table.obs[instance_key].to_numpy()[rows]
            try:
                shapes = shapes.loc[ids]
            except KeyError as e:
                msg = (
                    f"Some `obs[{instance_key!r}]` values of table {self.table_key!r} are not in the index of "
                    f"`sdata.shapes[{shapes_key!r}]` (e.g. {e}); the table and the shapes do not belong together."
                )
                raise ValueError(msg) from e
        elif len(shapes) != len(rows):
            msg = (
                f"Table {self.table_key!r} has {len(rows)} rows for `sdata.shapes[{shapes_key!r}]` but the shapes have "
                f"{len(shapes)} and the table has no instance key to match them."
            )
            raise ValueError(msg)
        geom = shapes.geometry
        gtype = set(geom.geom_type.unique())
        if gtype <= {"Point"}:
            if "radius" not in shapes:
                msg = f"`sdata.shapes[{shapes_key!r}]` holds points without a `radius` column; circles need one."
                raise ValueError(msg)
            xy = np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()]).astype(np.float64)
            return xy, 2.0 * shapes["radius"].to_numpy(dtype=np.float64), "circle"
        c = geom.centroid
        xy = np.column_stack([c.x.to_numpy(), c.y.to_numpy()]).astype(np.float64)
        area = geom.area.to_numpy(dtype=np.float64)
        b = geom.bounds.to_numpy(dtype=np.float64)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        square = np.allclose(w * h, area, rtol=1e-6) and np.allclose(w, h, rtol=1e-6)
        return xy, (np.sqrt(area) if square else np.sqrt(4 * area / np.pi)), ("square" if square else "polygon")

    # ---- coordinate systems --------------------------------------------------------------------------------------
    def coordinate_system(self, coordinate_system: str | None, elements: list[str]) -> str:
        """The coordinate system all `elements` belong to (:func:`~histospace._spatial._affine.shared_coordinate_system`)."""
        return shared_coordinate_system(self.sdata, coordinate_system, elements)

    def to_coordinate_system(self, element: str, coordinate_system: str) -> np.ndarray:
        """The `(3, 3)` affine map from `element`'s intrinsic `(x, y)` to `coordinate_system`."""
        return element_to(self.sdata, element, coordinate_system)


def as_table(data, table_key: str | None, *, name: str = "adata") -> tuple[AnnData, TableContext | None]:
    """`(table, context)`: an AnnData is its own table (context `None`); a SpatialData gives its table `table_key`."""
    if isinstance(data, AnnData):
        return data, None
    if is_spatialdata(data):
        tables = list(data.tables)
        table_key = element_key(
            data.tables,
            table_key,
            slot="sdata.tables",
            msg=f"The SpatialData holds {len(tables)} tables {tables}; pass `table_key=` naming the table to use.",
            empty_msg="The SpatialData holds no table; add one (`sdata.tables['table'] = ...`) with the expression.",
        )
        return data.tables[table_key], TableContext(data, table_key)
    msg = f"`{name}` must be an AnnData or a SpatialData, got {type(data).__name__}."
    raise TypeError(msg)


def table_output(ctx: TableContext | None, out: AnnData, copy: bool):
    """What a function returns: `None` in place; with `copy`, the AnnData copy or a SpatialData holding it."""
    if not copy:
        return None
    return out if ctx is None else ctx.with_table(out)


def region_labels(ctx: TableContext) -> pd.Series | None:
    """The region of each row when the table annotates several regions (one slide each), else `None`."""
    regions, region_key, _ = ctx.region_info()
    if len(regions) > 1 and region_key is not None and region_key in ctx.table.obs:
        return ctx.table.obs[region_key].astype(str)
    return None
