"""One small slide as an AnnData and as the equivalent SpatialData, and the checks that both gave the same result.

The AnnData is the Visium-like slide of `tests/conftest.py` (`make_adata` at 12 x 12 = 144 spots, a 650 x 650 hires
H&E image at scale 0.5, squidpy's 4-neighbour grid graph). The SpatialData is made from it with spatialdata-io's
public converter `from_legacy_anndata`, as `tests/test_spatialdata.py` does: the spots become circles of the spot
diameter, the hires image an image element, both joined by spatialdata's transformations; its table is a copy of
the AnnData. Public API only: these tests are the safety net of the spatial adapter refactor (issue #21).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

N_SIDE = 12  # 144 spots: enough for a grid with an interior, small enough for a module well under a minute

#: slots a SpatialData's table has from the converter, not from the function under test
SDATA_OBS = {"region", "instance_id"}
SDATA_UNS = {"spatialdata_attrs"}
#: `uns[key]['params']` entries that name the SpatialData's elements (recorded with a SpatialData only)
ELEMENT_PARAMS = {"table_key", "image_key", "shapes_key", "coordinate_system"}


@dataclass
class Pair:
    """The same slide in both forms. `table` is the SpatialData's table, written to exactly as the AnnData."""

    layout: str
    adata: AnnData
    sdata: object

    @property
    def table(self) -> AnnData:
        return self.sdata.tables["table"]

    def forms(self) -> tuple:
        """`(AnnData, SpatialData)`, to run a function on each."""
        return self.adata, self.sdata


LAYOUTS = ("visium",)


def make_pair(make_slide, layout: str = "visium") -> Pair:
    """Build the pair of `layout` (`'visium'`: hires image in memory, spots as circles in full-resolution pixels)."""
    import squidpy as sq
    from spatialdata_io.experimental import from_legacy_anndata

    adata = make_slide(n_side=N_SIDE)
    sq.gr.spatial_neighbors_grid(adata, n_neighs=4)
    sdata = from_legacy_anndata(adata.copy())
    if layout != "visium":  # pragma: no cover - a new layout must be built here
        msg = f"unknown layout {layout!r}"
        raise ValueError(msg)
    return Pair(layout, adata, sdata)


@pytest.fixture(params=LAYOUTS)
def pair(request, make_slide) -> Pair:
    """The same small slide as an AnnData and as the equivalent SpatialData (fresh for each test)."""
    return make_pair(make_slide, request.param)


@pytest.fixture(params=["anndata", "spatialdata"])
def form(request, pair):
    """One form of the slide at a time (`(data, table)`), for checks that hold for either form on its own."""
    data = pair.adata if request.param == "anndata" else pair.sdata
    table = pair.adata if request.param == "anndata" else pair.table
    return data, table


# ---- comparisons -------------------------------------------------------------------------------------------------


def assert_same_value(a, b, where: str = "value") -> None:
    """`a` and `b` equal bit for bit: nested dicts, arrays (dtype too), sparse matrices, frames, lists and scalars."""
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping), f"{where}: {type(a).__name__} vs {type(b).__name__}"
        assert set(a) == set(b), f"{where}: keys differ: {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same_value(a[k], b[k], f"{where}[{k!r}]")
    elif sp.issparse(a) or sp.issparse(b):
        assert sp.issparse(a) and sp.issparse(b), f"{where}: sparse vs dense"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        assert (a != b).nnz == 0, f"{where}: {(a != b).nnz} entries differ"
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=where)
    elif isinstance(a, pd.Series):
        pd.testing.assert_series_equal(a, b, check_exact=True, obj=where)
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} vs {b.dtype}"
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_value(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), f"{where}: nan vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_same_params(pa: Mapping, pt: Mapping, where: str, *, form_keys=()) -> None:
    """`uns[...]['params']` of both forms equal, except the SpatialData's element names and `form_keys`.

    `form_keys` are entries that describe the input form itself (e.g. the pixel grid the patches were cut from);
    each case says why it lists them and checks them itself.
    """
    skip = ELEMENT_PARAMS | set(form_keys)
    assert set(pt) - set(pa) <= ELEMENT_PARAMS | set(form_keys), f"{where}: extra params {set(pt) - set(pa)}"
    assert_same_value(
        {k: v for k, v in pa.items() if k not in skip}, {k: v for k, v in pt.items() if k not in skip}, where
    )


def assert_same_table(a: AnnData, t: AnnData, *, uns=(), form_keys=()) -> None:
    """The table of the SpatialData and the AnnData hold the same slots with the same content.

    Every `obs` column, `obsm`, `obsp`, `layers` entry and `X` is compared bit for bit (so nothing written to one
    form is missing from, or extra to, the other); `uns[key]` for `key` in `uns` is compared with
    :func:`assert_same_params` for its `params` and bit for bit for the rest.
    """
    assert a.shape == t.shape
    assert list(a.obs_names) == list(t.obs_names) and list(a.var_names) == list(t.var_names)
    assert set(a.obs.columns) == set(t.obs.columns) - SDATA_OBS, "obs columns differ"
    for c in a.obs.columns:
        assert_same_value(a.obs[c].to_numpy(), t.obs[c].to_numpy(), f"obs[{c!r}]")
    for slot in ("obsm", "obsp", "layers"):
        da, dt = getattr(a, slot), getattr(t, slot)
        assert set(da) == set(dt), f"{slot} keys differ: {sorted(set(da) ^ set(dt))}"
        for k in da:
            assert_same_value(da[k], dt[k], f"{slot}[{k!r}]")
    assert_same_value(a.X, t.X, "X")
    assert set(a.uns) == set(t.uns) - SDATA_UNS, f"uns keys differ: {sorted(set(a.uns) ^ (set(t.uns) - SDATA_UNS))}"
    for key in uns:
        ua, ut = a.uns[key], t.uns[key]
        assert_same_params(ua["params"], ut["params"], f"uns[{key!r}]['params']", form_keys=form_keys)
        rest = set(ua) - {"params"}
        assert rest == set(ut) - {"params"}, f"uns[{key!r}] entries differ"
        for k in rest:
            assert_same_value(ua[k], ut[k], f"uns[{key!r}][{k!r}]")
