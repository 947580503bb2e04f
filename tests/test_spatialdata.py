"""The same functions on an AnnData and on a SpatialData give the same results (and zarr round trips)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import histospace as hs


@pytest.fixture
def sdata(adata_graph):
    """The tiny Visium-like slide as a SpatialData: circles, the hires image with its transform, the table."""
    from spatialdata_io.experimental import from_legacy_anndata

    return from_legacy_anndata(adata_graph)


KW = {"hidden": [8], "n_latent": 4, "max_epochs": 2, "device": "cpu", "progress_bar": False}


def test_table_functions_write_into_the_table(adata_graph, sdata):
    table = sdata.tables["table"]
    assert hs.tl.stereomm(sdata, **KW) is None
    hs.tl.stereomm(adata_graph, **KW)
    np.testing.assert_array_equal(table.obsm["X_stereomm"], adata_graph.obsm["X_stereomm"])
    assert hs.tl.domains(sdata, n_clusters=3) is None
    hs.tl.domains(adata_graph, n_clusters=3)
    pd.testing.assert_series_equal(
        table.obs["stereomm_domain"], adata_graph.obs["stereomm_domain"], check_names=False, check_index=False
    )
    assert set(table.uns) >= {"stereomm", "stereomm_domain"}


def test_copy_returns_a_spatialdata_and_leaves_the_input(sdata):
    from spatialdata import SpatialData

    out = hs.tl.stereomm(sdata, copy=True, **KW)
    assert isinstance(out, SpatialData) and "X_stereomm" in out.tables["table"].obsm
    assert "X_stereomm" not in sdata.tables["table"].obsm
    assert out.images.keys() == sdata.images.keys() and out.shapes.keys() == sdata.shapes.keys()
    res = hs.tl.domains(out, n_clusters=3, copy=True)
    assert "stereomm_domain" in res.tables["table"].obs and "stereomm_domain" not in out.tables["table"].obs


def test_models_take_a_spatialdata(adata_graph, sdata, tmp_path):
    m = hs.models.StereoMM(sdata, hidden=[8], n_latent=4).train(max_epochs=2, progress_bar=False)
    ref = hs.models.StereoMM(adata_graph, hidden=[8], n_latent=4).train(max_epochs=2, progress_bar=False)
    np.testing.assert_array_equal(m.get_latent_representation(), ref.get_latent_representation())
    m.save(tmp_path / "m")
    again = hs.models.StereoMM.load(tmp_path / "m", adata=sdata)
    np.testing.assert_array_equal(again.get_latent_representation(), m.get_latent_representation())


def test_table_key_errors(sdata):
    before = set(sdata.tables["table"].obsm)
    with pytest.raises(KeyError, match=r"tables\['nope'\]"):
        hs.tl.stereomm(sdata, table_key="nope", **KW)
    sdata.tables["other"] = sdata.tables["table"].copy()
    with pytest.raises(ValueError, match="2 tables.*table_key"):
        hs.tl.domains(sdata)
    with pytest.raises(TypeError, match="AnnData or a SpatialData"):
        hs.tl.domains("adata")
    assert set(sdata.tables["table"].obsm) == before


def test_zarr_round_trip(sdata, tmp_path):
    import spatialdata as sd

    hs.tl.stereomm(sdata, **KW)
    hs.tl.domains(sdata, n_clusters=3)
    sdata.write(tmp_path / "s.zarr")
    back = sd.read_zarr(tmp_path / "s.zarr")
    t, b = sdata.tables["table"], back.tables["table"]
    np.testing.assert_array_equal(b.obsm["X_stereomm"], t.obsm["X_stereomm"])
    assert b.obs["stereomm_domain"].astype(str).tolist() == t.obs["stereomm_domain"].astype(str).tolist()
    np.testing.assert_array_equal(b.uns["stereomm"]["history"]["loss"], t.uns["stereomm"]["history"]["loss"])


FEAT = {"encoder": "mobilenet_v2", "weights": None, "input_size": 32, "progress_bar": False, "device": "cpu"}


def test_image_features_same_as_anndata(adata_graph, sdata):
    # the same spots mapped into the same image through spatialdata's transformations: the same bytes
    hs.pp.image_features(adata_graph, **FEAT)
    hs.pp.image_features(sdata, **FEAT)
    table = sdata.tables["table"]
    np.testing.assert_array_equal(table.obsm["img_features"], adata_graph.obsm["img_features"])
    p = table.uns["img_features"]["params"]
    assert p["shapes_key"] == "locations" and p["image_key"] in sdata.images and p["table_key"] == "table"
    assert p["patch_size_px"] == pytest.approx(165.0 * 0.5)  # three diameters, in pixels of the hires image
    # context doubles the width; copy returns a SpatialData and leaves the input
    out = hs.pp.image_features(sdata, context=2, key_added="ctx", copy=True, **FEAT)
    assert out.tables["table"].obsm["ctx"].shape == (table.n_obs, 2 * 1280)
    np.testing.assert_array_equal(out.tables["table"].obsm["ctx"][:, :1280], table.obsm["img_features"])
    assert "ctx" not in table.obsm


def test_image_features_from_a_chunked_image(adata_graph, sdata):
    # an image in many small dask chunks is read chunk by chunk (spots reordered, chunks cached): same bytes
    for key, image in list(sdata.images.items()):
        sdata.images[key] = image.chunk({"y": 40, "x": 40})
    hs.pp.image_features(adata_graph, **FEAT)
    hs.pp.image_features(sdata, **FEAT)
    np.testing.assert_array_equal(sdata.tables["table"].obsm["img_features"], adata_graph.obsm["img_features"])
    # in batches of 7 the spots of a batch differ (float rounding of the convolutions), each row stays its spot's
    hs.pp.image_features(sdata, batch_size=7, key_added="b7", **FEAT)
    a, b = sdata.tables["table"].obsm["b7"], adata_graph.obsm["img_features"]
    np.testing.assert_allclose(a / np.abs(b).max(), b / np.abs(b).max(), rtol=1e-4, atol=1e-5)


def test_image_features_errors_leave_the_table(sdata):
    from spatialdata.models import Image2DModel

    table = sdata.tables["table"]
    before = set(table.obsm)
    with pytest.raises(KeyError, match=r"images\['nope'\]"):
        hs.pp.image_features(sdata, image_key="nope", **FEAT)
    with pytest.raises(KeyError, match="Coordinate system 'other' not found"):
        hs.pp.image_features(sdata, coordinate_system="other", **FEAT)
    with pytest.raises(ValueError, match="patch_size_um.*µm scale.*set_microns_per_unit"):
        hs.pp.image_features(sdata, patch_size_um=50, **FEAT)
    with pytest.raises(ValueError, match="image_key=.*not `img=`"):
        hs.pp.image_features(sdata, img=np.zeros((10, 10, 3), np.uint8), **FEAT)
    sdata.images["second"] = Image2DModel.parse(np.zeros((3, 8, 8), np.uint8), dims=("c", "y", "x"))
    with pytest.raises(ValueError, match="2 images.*image_key="):
        hs.pp.image_features(sdata, **FEAT)
    table.uns["spatialdata_attrs"]["region"] = "gone"
    with pytest.raises(ValueError, match="annotates no shapes"):
        hs.pp.image_features(sdata, image_key="second", **FEAT)
    assert set(table.obsm) == before


def test_spatial_graph_same_as_anndata(adata_graph, sdata):
    hs.pp.spatial_graph(adata_graph, key_added="g")
    hs.pp.spatial_graph(sdata, key_added="g")
    t = sdata.tables["table"]
    assert (t.obsp["g_connectivities"] != adata_graph.obsp["g_connectivities"]).nnz == 0
    assert t.uns["g_neighbors"]["params"]["table_key"] == "table"


def test_plot_domains_of_a_spatialdata(sdata):
    import matplotlib.pyplot as plt

    hs.tl.stereomm(sdata, **KW)
    hs.tl.domains(sdata, n_clusters=3)
    ax = hs.pl.domains(sdata, show=False)
    assert ax.images and ax.get_title() == "stereomm_domain"
    assert "stereomm_domain_colors" in sdata.tables["table"].uns
    plt.close(ax.figure)


@pytest.fixture(scope="module")
def visium_hd(tmp_path_factory):
    """A simulated Visium HD section in Space Ranger's layout, read by spatialdata-io (16 µm bins)."""
    import warnings

    import spatialdata_io

    tissue = hs.datasets.simulate_tissue(width_um=320, height_um=240, n_genes=40, random_state=2)
    path = hs.datasets.write_visium_hd(tmp_path_factory.mktemp("hd") / "hd", tissue, bin_sizes=(16,), dataset_id="s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spatialdata_io.visium_hd(path, load_segmentations_only=False), tissue


def test_visium_hd_bins_pipeline(visium_hd, tmp_path):
    import matplotlib.pyplot as plt
    import spatialdata as sd

    sdata, _ = visium_hd
    tk = {"table_key": "square_016um"}
    hs.pp.spatial_graph(sdata, **tk)
    t = sdata.tables["square_016um"]
    g = t.obsp["spatial_connectivities"]
    assert t.uns["spatial_neighbors"]["params"]["bins"] is True
    assert np.diff(g.indptr).max() == 8  # interior bins: the 8 touching squares
    hs.pp.image_features(sdata, image_key="s_full_image", **tk, **FEAT)
    p = t.uns["img_features"]["params"]
    assert p["patch_size_um"] == pytest.approx(165.0) and p["patch_size_px"] == pytest.approx(165.0 / 0.5)
    assert t.obsm["img_features"].shape == (t.n_obs, 1280) and np.isfinite(t.obsm["img_features"]).all()
    assert p["level"] >= 1  # 330-px patches resized to 32 px: read from a coarser pyramid level
    hs.tl.stereomm(sdata, **tk, **KW)
    hs.tl.domains(sdata, n_clusters=4, **tk)
    ax = hs.pl.domains(sdata, image_key="s_hires_image", show=False, **tk)
    assert ax.images
    plt.close(ax.figure)
    sdata.write(tmp_path / "hd.zarr")
    back = sd.read_zarr(tmp_path / "hd.zarr").tables["square_016um"]
    np.testing.assert_array_equal(back.obsm["X_stereomm"], t.obsm["X_stereomm"])
    assert (back.obsp["spatial_connectivities"] != g).nnz == 0


def test_tile_image_adds_tiles_to_a_spatialdata(visium_hd):
    import spatialdata as sd

    sdata, _ = visium_hd
    s = sd.SpatialData(images={"he": sdata.images["s_full_image"]}, attrs=dict(sdata.attrs))
    assert hs.pp.tile_image(s, tile_size=64, tissue_fraction=0.3) is None
    t = s.tables["tiles"]
    assert t.n_obs > 0 and t.n_vars == 0 and "tiles_squares" in s.shapes
    assert t.uns["spatialdata_attrs"]["region"] == "tiles_squares"
    side = np.sqrt(s.shapes["tiles_squares"].geometry.area.to_numpy())
    np.testing.assert_allclose(side, 64.0)
    # the tiles are spots like any other: image features through the same transformations
    hs.pp.image_features(s, table_key="tiles", **FEAT)  # default patch: the tile
    assert t.obsm["img_features"].shape == (t.n_obs, 1280)
    assert t.uns["img_features"]["params"]["patch_size_px"] == pytest.approx(64.0)
    with pytest.raises(ValueError, match="already holds an element 'tiles'"):
        hs.pp.tile_image(s, tile_size=64)


def test_mclstexp_on_spatialdata_tiles(visium_hd, sdata):
    """Train on the table of a SpatialData; predict an H&E-only SpatialData's tiles into their own table."""
    import matplotlib.pyplot as plt
    import spatialdata as sd

    hs.pp.image_features(sdata, patch_size=50, **FEAT)
    model = hs.tl.mclstexp_train(
        sdata, model_kwargs={"n_heads": 2, "dim_head": 8, "projection_dim": 16}, max_epochs=2, n_models=1,
        progress_bar=False,
    )  # fmt: skip
    assert model.n_x == 8
    hd, _ = visium_hd
    s = sd.SpatialData(images={"he": hd.images["s_full_image"]}, attrs=dict(hd.attrs))
    hs.pp.tile_image(s, tile_size=64, tissue_fraction=0.3)
    hs.pp.image_features(s, table_key="tiles", patch_size=50, **FEAT)  # the reference's patch (checked)
    hs.tl.mclstexp_predict(s, table_key="tiles", model=model, n_neighbors=5)
    t = s.tables["tiles"]
    assert t.obsm["mclstexp"].shape == (t.n_obs, len(model.genes)) and "X_mclstexp" in t.obsm
    fig = hs.pl.predicted_vs_observed(s, table_key="tiles", genes=model.genes[:2], show=False)
    assert len([ax for ax in fig.axes if ax.images]) == 2  # H&E under the predicted maps
    plt.close(fig)
