"""`hs.io.read`: every input form of the command line, on tiny synthetic files (and one real file)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

import histospace as hs


@pytest.fixture(scope="module")
def tissue():
    return hs.datasets.simulate_tissue(width_um=200, height_um=160, n_genes=20, random_state=3)


def test_read_h5ad_equals_anndata_reader(adata, tmp_path):
    adata.write_h5ad(tmp_path / "a.h5ad")
    got = hs.io.read(tmp_path / "a.h5ad")
    assert isinstance(got, ad.AnnData) and got.shape == adata.shape
    np.testing.assert_array_equal(got.obsm["spatial"], adata.obsm["spatial"])
    np.testing.assert_array_equal(got.X.toarray(), adata.X.toarray())


def test_read_zarr_is_a_spatialdata(adata, tmp_path):
    sd = pytest.importorskip("spatialdata")
    from spatialdata_io.experimental import from_legacy_anndata

    sdata_zarr = tmp_path / "slide.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's notices about its next release
        from_legacy_anndata(adata).write(sdata_zarr)
    got = hs.io.read(sdata_zarr)
    assert isinstance(got, sd.SpatialData)
    ref = sd.read_zarr(sdata_zarr)
    assert set(got.tables) == set(ref.tables) and set(got.images) == set(ref.images)


def test_read_gem_bins_and_image(gem_path, tissue, tmp_path):
    sdata = hs.io.read(gem_path, bin_size=10)
    assert list(sdata.tables) == ["bin10"]
    np.testing.assert_array_equal(
        sdata.tables["bin10"].X.toarray(), hs.io.read_gem(gem_path, bin_size=10)["bin10"].X.toarray()
    )
    assert list(hs.io.read(gem_path).tables) == ["bin50"]  # the default bin
    # a GEM file with an H&E: attached with add_image (its µm per pixel from the file)
    gem = hs.datasets.write_gem(tmp_path / "t.gem.gz", tissue)
    he = hs.datasets.write_wsi(tmp_path / "he.tif", tissue, format="ome")
    sdata = hs.io.read(gem, bin_size=40, image=he)
    assert "bin40" in sdata.tables and len(sdata.images) == 1


def test_read_visium_hd_folder(tissue, tmp_path):
    pytest.importorskip("spatialdata_io")
    path = hs.datasets.write_visium_hd(tmp_path / "hd", tissue, bin_sizes=(8, 16), dataset_id="s")
    sdata = hs.io.read(path, bin_size=16)
    assert list(sdata.tables) == ["square_016um"] and sdata.tables["square_016um"].n_obs > 0
    assert len(sdata.images) > 0
    assert list(hs.io.read(path).tables) == ["square_008um"]  # the default bin


def test_read_saw_folder(tissue, tmp_path):
    pytest.importorskip("spatialdata_io")
    path = hs.datasets.write_stereoseq(tmp_path / "saw", tissue, bin_sizes=(1, 20))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sdata = hs.io.read(path)
    assert not [w for w in caught if "bin_size" in str(w.message)]  # no bin_size given: nothing to warn about
    assert {"bin1_table", "bin20_table"} <= set(sdata.tables)
    with pytest.warns(UserWarning, match=r"bin_size=20 is not used for .*saw: only a Visium HD folder and a GEM"):
        hs.io.read(path, bin_size=20)


def test_read_visium_folder_goes_to_spatialdata_io(tmp_path, monkeypatch):
    sio = pytest.importorskip("spatialdata_io")
    (tmp_path / "v" / "spatial").mkdir(parents=True)
    (tmp_path / "v" / "filtered_feature_bc_matrix.h5").write_bytes(b"")
    calls = []
    monkeypatch.setattr(sio, "visium", lambda p: calls.append(p) or "sdata")
    assert hs.io.read(tmp_path / "v") == "sdata" and calls == [tmp_path / "v"]


def test_read_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.h5ad does not exist; pass an \.h5ad file, a SpatialData"):
        hs.io.read(tmp_path / "missing.h5ad")


def test_read_unknown_forms_name_the_path_and_the_fix(tmp_path, adata):
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"table\.csv: unknown input; expected an \.h5ad file.*GEM files end in"):
        hs.io.read(tmp_path / "table.csv")
    (tmp_path / "text.h5ad").write_text("not an HDF5 file\n")
    with pytest.raises(ValueError, match=r"text\.h5ad is not an \.h5ad file anndata can read"):
        hs.io.read(tmp_path / "text.h5ad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty is not a Visium HD, SAW \(Stereo-seq\) or Visium output folder"):
        hs.io.read(tmp_path / "empty")
    (tmp_path / "bad.zarr").mkdir()
    with pytest.raises(ValueError, match=r"bad\.zarr is not a SpatialData \.zarr store spatialdata can read"):
        hs.io.read(tmp_path / "bad.zarr")


def test_read_image_only_for_gem(adata, tmp_path):
    adata.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(
        ValueError, match=r"image='he\.tif': only a GEM file .*`hs.pp.image_features\(adata, img=\.\.\.\)`"
    ):
        hs.io.read(tmp_path / "a.h5ad", image="he.tif")
    with pytest.warns(UserWarning, match=r"bin_size=8 is not used for .*a\.h5ad"):
        hs.io.read(tmp_path / "a.h5ad", bin_size=8)


@pytest.mark.data
def test_read_real_dlpfc_h5ad(data_dir):
    path = data_dir / "dlpfc" / "151673" / "151673_5000genes.h5ad"
    if not path.is_file():
        pytest.skip(f"{path} not in the data dir")
    got = hs.io.read(path)
    assert isinstance(got, ad.AnnData) and got.shape == ad.read_h5ad(path).shape and got.n_obs > 3000
