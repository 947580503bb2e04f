"""One small slide as an AnnData and as the equivalent SpatialData, and the checks that both gave the same result.

The AnnData is the Visium-like slide of `tests/conftest.py` (`make_adata` at 12 x 12 = 144 spots, a 650 x 650 hires
H&E image at scale 0.5, squidpy's 4-neighbour grid graph). The SpatialData holds the same spots as circles of the
spot diameter, the hires image as an image element and a copy of the AnnData as its table, in two layouts
(:data:`LAYOUTS`): spatialdata-io's public converter `from_legacy_anndata` (as `tests/test_spatialdata.py` uses), and
the full-resolution 'global' layout of spatialdata-io's Visium reader, built with spatialdata's models (histospace
has no converter of its own). Public API only: these tests guard the spatial adapter refactor of issue #21.
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


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread in these tests (the suite's conftest sets 2), restored after each test.

    Both forms of a case run with the same setting, so the comparison does not depend on it; on a shared CPU two
    threads per process made the tiny trainings here 3-20x slower (oversubscription), one keeps the module short.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass
class Pair:
    """The same slide in both forms. `table` is the SpatialData's table, written to exactly as the AnnData."""

    layout: str
    adata: AnnData
    sdata: object
    image_key: str
    shapes_key: str

    @property
    def table(self) -> AnnData:
        return self.sdata.tables["table"]

    def forms(self) -> tuple:
        """`(AnnData, SpatialData)`, to run a function on each."""
        return self.adata, self.sdata


#: how the SpatialData places the spots and the image (the AnnData is the same for both):
#: - `legacy`: spatialdata-io's `from_legacy_anndata`; the image at identity in the coordinate system 'lib_hires'
#:   (hires pixels), the circles scaled by `tissue_hires_scalef` into it;
#: - `global`: the layout of spatialdata-io's Visium reader; the circles at identity in 'global' (full-resolution
#:   pixels), the hires image scaled by `1 / tissue_hires_scalef` into it.
LAYOUTS = ("legacy", "global")


def _global_sdata(adata: AnnData):
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    lib = adata.uns["spatial"]["lib"]
    sf = lib["scalefactors"]
    image = Image2DModel.parse(
        np.moveaxis(lib["images"]["hires"], 2, 0),
        dims=("c", "y", "x"),
        transformations={"global": Scale([1 / sf["tissue_hires_scalef"]] * 2, axes=("y", "x"))},
    )
    radius = np.full(adata.n_obs, sf["spot_diameter_fullres"] / 2)
    spots = ShapesModel.parse(adata.obsm["spatial"], geometry=0, radius=radius, transformations={"global": Identity()})
    table = adata.copy()
    table.obs["region"] = pd.Categorical(["spots"] * adata.n_obs)
    table.obs["instance_id"] = np.arange(adata.n_obs)
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="instance_id")
    return sd.SpatialData(images={"he": image}, shapes={"spots": spots}, tables={"table": table})


def make_pair(make_slide, layout: str) -> Pair:
    """Build the pair of `layout` (see :data:`LAYOUTS`)."""
    import squidpy as sq
    from spatialdata_io.experimental import from_legacy_anndata

    adata = make_slide(n_side=N_SIDE)
    sq.gr.spatial_neighbors_grid(adata, n_neighs=4)
    if layout == "legacy":
        return Pair(layout, adata, from_legacy_anndata(adata.copy()), "lib_hires", "locations")
    if layout == "global":
        return Pair(layout, adata, _global_sdata(adata), "he", "spots")
    msg = f"unknown layout {layout!r}; one of {LAYOUTS}"
    raise ValueError(msg)


@pytest.fixture(params=LAYOUTS)
def pair(request, make_slide) -> Pair:
    """The same small slide as an AnnData and as the equivalent SpatialData (fresh for each test).

    Tests of functions that read only the table (no positions or image) take one layout:
    `@pytest.mark.parametrize("pair", ["legacy"], indirect=True)`.
    """
    return make_pair(make_slide, request.param)


def xfail_on(request, pair: Pair, layouts, reason: str) -> None:
    """Mark the running test a strict xfail for the layouts where the library gives a different result."""
    if pair.layout in layouts:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


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
