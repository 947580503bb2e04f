"""`hs.io.read_stereopy`: stereopy's AnnData (corner or centre positions) gives the same bins as `read_gem`."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import histospace.io as hsio


def stereopy_like(gem_table, bin_size, *, centre=False, sn="SS200000135TL_D1", resolution=500):
    """The AnnData `st.io.stereo_to_anndata(st.io.read_gem(..., bin_size))` writes (positions as uint32 corners)."""
    cols = gem_table.obs["array_col"].to_numpy().astype(np.int64)
    rows = gem_table.obs["array_row"].to_numpy().astype(np.int64)
    pos = np.column_stack([cols * bin_size, rows * bin_size])
    if centre:
        pos = pos + bin_size // 2
    names = ((cols * bin_size << 32) | (rows * bin_size)).astype(str)
    a = ad.AnnData(X=sp.csr_matrix(gem_table.X.astype(np.int32)), var=pd.DataFrame(index=gem_table.var_names))
    a.obs_names = names
    a.obs["orig.ident"] = pd.Categorical(["sample"] * a.n_obs)
    a.obsm["spatial"] = pos.astype(np.uint32)
    a.obs["x"], a.obs["y"] = pos[:, 0], pos[:, 1]
    a.uns.update({"bin_type": "bins", "bin_size": bin_size, "resolution": resolution, "merged": False})
    a.uns["sn"] = pd.DataFrame([["-1", sn]], columns=["batch", "sn"])
    return a


@pytest.mark.parametrize("centre", [False, True])
def test_same_bins_as_read_gem(tmp_path, gem_path, centre):
    gem = hsio.read_gem(gem_path, bin_size=10)
    g = gem.tables["bin10"]
    a = stereopy_like(g, 10, centre=centre)
    a.write_h5ad(tmp_path / "bins.h5ad")
    sdata = hsio.read_stereopy(tmp_path / "bins.h5ad")
    assert list(sdata.tables) == ["bin10"] and list(sdata.shapes) == ["SS200000135TL_D1_bin10"]
    t = sdata.tables["bin10"]
    assert (t.X != g.X).nnz == 0 and t.X.dtype == np.int32  # X kept as written
    np.testing.assert_array_equal(t.obs["array_col"], g.obs["array_col"])
    np.testing.assert_array_equal(t.obs["array_row"], g.obs["array_row"])
    np.testing.assert_array_equal(t.obsm["spatial"], g.obsm["spatial"])
    assert list(t.obs_names) == list(g.obs_names)
    np.testing.assert_array_equal(t.obs["x"], a.obs["x"])  # stereopy's positions kept in obs
    assert t.uns["bin_size"] == 10 and t.uns["sn"]["sn"].iloc[0] == "SS200000135TL_D1"
    assert t.uns["spatialdata_attrs"]["region"] == "SS200000135TL_D1_bin10"
    np.testing.assert_allclose(
        sdata.shapes["SS200000135TL_D1_bin10"].geometry.bounds.to_numpy(),
        gem.shapes["a_bin10"].geometry.bounds.to_numpy(),
    )
    assert hsio.microns_per_unit(sdata, "global") == 0.5
    # and re-binning works on it as on GEM tables
    hsio.rebin(sdata, factor=2)
    direct = hsio.read_gem(gem_path, bin_size=20).tables["bin20"]
    np.testing.assert_array_equal(sdata.tables["bin20"].X.toarray(), direct.X.toarray())


def test_anndata_input_resolution_and_explicit_args(gem_path):
    gem = hsio.read_gem(gem_path, bin_size=10).tables["bin10"]
    a = stereopy_like(gem, 10, resolution=715)
    del a.uns["bin_size"]
    with pytest.raises(KeyError, match="bin_size"):
        hsio.read_stereopy(a)
    sdata = hsio.read_stereopy(a, bin_size=10, dataset_id="chip", coordinate_system="dnb")
    assert "chip_bin10" in sdata.shapes and hsio.microns_per_unit(sdata, "dnb") == pytest.approx(0.715)
    assert "spatial" in a.obsm and a.obsm["spatial"].dtype == np.uint32  # the input is not modified
    a2 = stereopy_like(gem, 10)
    del a2.obsm["spatial"]  # positions from obs x/y
    t = hsio.read_stereopy(a2, positions="corner").tables["bin10"]
    np.testing.assert_array_equal(t.obsm["spatial"], gem.obsm["spatial"])


def test_errors(tmp_path, gem_path):
    gem = hsio.read_gem(gem_path, bin_size=10).tables["bin10"]
    with pytest.raises(FileNotFoundError):
        hsio.read_stereopy(tmp_path / "missing.h5ad")
    with pytest.raises(TypeError, match="AnnData"):
        hsio.read_stereopy(gem.X)
    cells = stereopy_like(gem, 10)
    cells.uns["bin_type"] = "cell_bins"
    with pytest.raises(ValueError, match="cell bins"):
        hsio.read_stereopy(cells)
    with pytest.raises(ValueError, match="one grid"):
        hsio.read_stereopy(stereopy_like(gem, 10), bin_size=7)
    with pytest.raises(ValueError, match="positions"):
        hsio.read_stereopy(stereopy_like(gem, 10), positions="middle")
    h5st = tmp_path / "data.h5st"
    with h5py.File(h5st, "w") as f:
        f.create_group("exp_matrix")
        f.create_dataset("position", data=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="stereo_to_anndata"):
        hsio.read_stereopy(h5st)
