"""`hs.io.rebin`: exact sums, centres and names for GEM bins and Visium HD-like tables, errors, zarr round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import histospace.io as hsio


def random_gem(path, n=4000, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "geneID": rng.choice([f"g{i}" for i in range(30)], n),
            "x": rng.integers(3, 260, n),
            "y": rng.integers(0, 170, n),
            "MIDCount": rng.integers(1, 4, n),
            "ExonCount": rng.integers(0, 2, n),
        }
    )
    df.to_csv(path, sep="\t", index=False)
    return path


def test_gem_rebin_equals_direct_binning(tmp_path):
    path = random_gem(tmp_path / "chip.gem")
    sdata = hsio.read_gem(path, bin_size=10, exon=True)
    hsio.rebin(sdata, factor=3)
    direct = hsio.read_gem(path, bin_size=30, exon=True)
    t, d = sdata.tables["bin30"], direct.tables["bin30"]
    assert t.uns["spatialdata_attrs"]["region"] == "chip_bin30"
    assert (t.X != d.X).nnz == 0 and t.X.dtype == np.float32 and t.X.format == "csr"
    assert (t.layers["exon"] != d.layers["exon"]).nnz == 0
    assert list(t.obs_names) == list(d.obs_names)  # stereopy names of bin30
    for k in ("array_row", "array_col", "instance_id"):
        np.testing.assert_array_equal(t.obs[k], d.obs[k])
    np.testing.assert_allclose(t.obsm["spatial"], d.obsm["spatial"], atol=1e-9)
    assert t.uns["gem"]["bin_size"] == 30 and t.uns["rebin"]["factor"] == 3
    np.testing.assert_allclose(
        sdata.shapes["chip_bin30"].geometry.bounds.to_numpy(),
        direct.shapes["chip_bin30"].geometry.bounds.to_numpy(),
        atol=1e-9,
    )
    # bin_size_um: 10 DNB = 5 µm -> 15 µm is factor 3 again, under another key
    hsio.rebin(sdata, bin_size_um=15, table_key="bin10", key_added="again")
    assert (sdata.tables["again"].X != d.X).nnz == 0
    assert "chip_again" in sdata.shapes
    assert sdata.tables["again"].obs["n_bins"].sum() == sdata.tables["bin10"].n_obs


def fake_visium_hd(seed=0, n=40, drop=0.3, angle=0.05):
    """A table shaped like spatialdata_io.visium_hd's 2 µm bins: rotated affine grid, bins missing, fullres pixels."""
    import anndata as ad
    from geopandas import GeoDataFrame
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(3, 3 + n), np.arange(5, 5 + n), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    keep = rng.random(rows.size) > drop
    rows, cols = rows[keep], cols[keep]
    step = 2.0 / 0.25  # 2 µm bins at 0.25 µm per pixel
    c, s = np.cos(angle), np.sin(angle)
    J = step * np.array([[c, s], [-s, c]])  # (col, row) -> (x, y)
    spatial = np.column_stack([cols, rows]) @ J + [100.0, 50.0]
    X = sp.random(rows.size, 12, density=0.3, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.ceil(X.data * 5)
    obs = pd.DataFrame(
        {"in_tissue": rng.integers(0, 2, rows.size), "array_row": rows, "array_col": cols},
        index=[f"s_002um_{r:05d}_{q:05d}-1" for r, q in zip(rows, cols, strict=True)],
    )
    obs["location_id"] = np.arange(rows.size)
    obs["region"] = pd.Categorical(["hd_square_002um"] * rows.size)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(12)]))
    adata.obsm["spatial"] = spatial
    tf = {"hd": Identity(), "hd_downscaled_hires": Scale([0.1, 0.1], axes=("x", "y"))}
    circles = ShapesModel.parse(
        spatial, geometry=0, radius=step / 2, index=obs["location_id"].copy(), transformations=tf
    )
    squares = ShapesModel.parse(GeoDataFrame(geometry=circles.buffer(step / 2, cap_style=3)), transformations=tf)
    table = TableModel.parse(adata, region="hd_square_002um", region_key="region", instance_key="location_id")
    return SpatialData(shapes={"hd_square_002um": squares}, tables={"square_002um": table}), J


def test_visium_hd_rebin_sums_centres_names():
    sdata, J = fake_visium_hd()
    assert hsio.microns_per_unit(sdata, "hd") == pytest.approx(0.25)
    assert hsio.microns_per_unit(sdata, "hd_downscaled_hires") == pytest.approx(2.5)
    hsio.rebin(sdata, bin_size_um=8)
    t0, t = sdata.tables["square_002um"], sdata.tables["square_008um"]
    assert t.uns["spatialdata_attrs"] == {
        "region": "hd_square_008um",
        "region_key": "region",
        "instance_key": "location_id",
    }
    # exact sums against a groupby
    dense = pd.DataFrame(t0.X.toarray(), columns=t0.var_names)
    dense["r"], dense["c"] = t0.obs["array_row"].to_numpy() // 4, t0.obs["array_col"].to_numpy() // 4
    expect = dense.groupby(["r", "c"]).sum()
    got = pd.DataFrame(
        t.X.toarray(), columns=t.var_names, index=pd.MultiIndex.from_arrays([t.obs.array_row, t.obs.array_col])
    )
    pd.testing.assert_frame_equal(got.sort_index(), expect.rename_axis(["array_row", "array_col"]), check_dtype=False)
    assert t.X.dtype == np.float32 and sp.issparse(t.X)
    assert t.obs["n_bins"].sum() == t0.n_obs and t.obs["n_bins"].max() <= 16
    first = t.obs.iloc[0]
    assert t.obs_names[0] == f"s_008um_{first.array_row:05d}_{first.array_col:05d}-1"
    # centres: the affine grid's centre of each full 4 x 4 block, also for partial blocks
    idx = np.column_stack([t.obs.array_col * 4 + 1.5, t.obs.array_row * 4 + 1.5])
    np.testing.assert_allclose(t.obsm["spatial"], idx @ J + [100.0, 50.0], atol=1e-8)
    shapes = sdata.shapes["hd_square_008um"]
    np.testing.assert_allclose(shapes.geometry.area, (4 * 8.0) ** 2)
    np.testing.assert_allclose(np.column_stack([shapes.centroid.x, shapes.centroid.y]), t.obsm["spatial"])
    assert hsio.microns_per_unit(sdata, "hd", table_key="square_008um") == pytest.approx(0.25)
    assert sdata.attrs["histospace"]["microns_per_unit"]["hd"] == pytest.approx(0.25)
    in_t = pd.Series(t0.obs["in_tissue"].to_numpy()).groupby([dense.r, dense.c]).max()
    np.testing.assert_array_equal(
        t.obs.set_index(["array_row", "array_col"]).sort_index()["in_tissue"], in_t.sort_index()
    )


def test_rebin_dense_and_block_invariance():
    sdata, _ = fake_visium_hd(seed=1)
    sdata2, _ = fake_visium_hd(seed=1)
    sdata2.tables["square_002um"].X = sdata2.tables["square_002um"].X.toarray()
    hsio.rebin(sdata, factor=8, block_size=3)
    hsio.rebin(sdata2, factor=8)
    a, b = sdata.tables["square_016um"], sdata2.tables["square_016um"]
    assert isinstance(b.X, np.ndarray)
    np.testing.assert_array_equal(a.X.toarray(), b.X)
    np.testing.assert_allclose(a.obsm["spatial"], b.obsm["spatial"])


def test_rebin_errors(tmp_path):
    sdata, _ = fake_visium_hd()
    with pytest.raises(ValueError, match="exactly one"):
        hsio.rebin(sdata)
    with pytest.raises(ValueError, match="exactly one"):
        hsio.rebin(sdata, factor=2, bin_size_um=4)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="factor"):
            hsio.rebin(sdata, factor=bad)
    with pytest.raises(ValueError, match="integer multiple"):
        hsio.rebin(sdata, bin_size_um=5)
    with pytest.raises(KeyError, match="nope"):
        hsio.rebin(sdata, factor=2, table_key="nope")
    with pytest.raises(KeyError, match="array_row"):
        hsio.rebin(sdata, factor=2, row_key="array_row_x".replace("_x", "") + "z")
    hsio.rebin(sdata, factor=2)
    with pytest.raises(ValueError, match="several tables"):
        hsio.rebin(sdata, factor=2)
    with pytest.raises(ValueError, match="exists already"):
        hsio.rebin(sdata, factor=2, table_key="square_002um")
    gem = hsio.read_gem(random_gem(tmp_path / "c.gem"), bin_size=10)
    gem.attrs.clear()
    with pytest.raises(ValueError, match="µm is unknown"):
        hsio.rebin(gem, bin_size_um=20)
    with pytest.raises(TypeError, match="SpatialData"):
        hsio.rebin(gem.tables["bin10"], factor=2)


def test_rebin_zarr_round_trip(tmp_path):
    from spatialdata import read_zarr

    sdata, _ = fake_visium_hd()
    hsio.rebin(sdata, bin_size_um=16)
    sdata.write(tmp_path / "hd.zarr")
    back = read_zarr(tmp_path / "hd.zarr")
    t, t0 = back.tables["square_016um"], sdata.tables["square_016um"]
    assert (t.X != t0.X).nnz == 0
    pd.testing.assert_frame_equal(t.obs, t0.obs)
    assert back.shapes["hd_square_016um"].geometry.geom_equals(sdata.shapes["hd_square_016um"].geometry).all()
    assert hsio.microns_per_unit(back, "hd") == pytest.approx(0.25)
