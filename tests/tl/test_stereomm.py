import anndata as ad
import numpy as np
import pytest

import histospace as hs

KW = {"hidden": [8], "n_latent": 4, "max_epochs": 2, "device": "cpu", "progress_bar": False}


def test_slots(adata_graph):
    before = set(adata_graph.obsm), set(adata_graph.uns), set(adata_graph.obs)
    assert hs.tl.stereomm(adata_graph, **KW) is None
    z = adata_graph.obsm["X_stereomm"]
    # default: a seed ensemble of 3 models, their latents side by side
    assert z.shape == (adata_graph.n_obs, 3 * 4) and z.dtype == np.float32
    uns = adata_graph.uns["stereomm"]
    assert uns["params"]["n_models"] == 3
    assert set(uns) == {"params", "history", "version"}
    assert uns["history"]["loss"].dtype == np.float32 and uns["history"]["loss"].shape == (2,)
    assert set(uns["history"]) == {"loss", "reconstruction", "kl"}
    assert uns["params"]["layer"] == "X" and uns["params"]["n_latent"] == 4
    assert uns["params"]["features_key"] == "img_features"
    # nothing else written
    assert set(adata_graph.obsm) - before[0] == {"X_stereomm"}
    assert set(adata_graph.uns) - before[1] == {"stereomm"}
    assert set(adata_graph.obs) == before[2]


def test_key_added_and_return_model(adata_graph):
    model = hs.tl.stereomm(adata_graph, key_added="X_mm", return_model=True, **KW)
    assert isinstance(model, hs.models.StereoMM) and model.is_trained
    assert "X_mm" in adata_graph.obsm and "mm" in adata_graph.uns
    np.testing.assert_array_equal(model.get_latent_representation(), adata_graph.obsm["X_mm"])


def test_copy(adata_graph):
    orig = adata_graph.copy()
    out = hs.tl.stereomm(adata_graph, copy=True, **KW)
    assert isinstance(out, ad.AnnData) and "X_stereomm" in out.obsm
    assert "X_stereomm" not in adata_graph.obsm and "stereomm" not in adata_graph.uns
    assert set(adata_graph.obsm) == set(orig.obsm)


def test_same_seed(adata_graph):
    a = hs.tl.stereomm(adata_graph, copy=True, random_state=1, **KW)
    b = hs.tl.stereomm(adata_graph, copy=True, random_state=1, **KW)
    np.testing.assert_array_equal(a.obsm["X_stereomm"], b.obsm["X_stereomm"])


def test_expression_only_and_reference(adata_graph):
    hs.tl.stereomm(adata_graph, features_key=None, key_added="X_expr", **KW)
    assert adata_graph.uns["expr"]["params"]["features_key"] is None
    hs.tl.stereomm(adata_graph, preset="reference", key_added="X_ref", **KW)
    assert adata_graph.uns["ref"]["params"]["preset"] == "reference"
    assert adata_graph.obsm["X_ref"].shape == (adata_graph.n_obs, 4)


def test_h5ad_roundtrip(adata_graph, tmp_path):
    hs.tl.stereomm(adata_graph, **KW)
    adata_graph.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(back.obsm["X_stereomm"], adata_graph.obsm["X_stereomm"])
    np.testing.assert_array_equal(
        back.uns["stereomm"]["history"]["loss"], adata_graph.uns["stereomm"]["history"]["loss"]
    )
    assert back.uns["stereomm"]["params"]["attention"] == adata_graph.uns["stereomm"]["params"]["attention"]


def test_errors_leave_adata_unchanged(adata_graph):
    bare = adata_graph.copy()
    del bare.obsp["spatial_connectivities"]
    with pytest.raises(KeyError, match=r"spatial_connectivities.*spatial_neighbors"):
        hs.tl.stereomm(bare, **KW)
    assert "X_stereomm" not in bare.obsm
    del adata_graph.obsm["img_features"]
    orig_keys = set(adata_graph.obsm), set(adata_graph.uns)
    with pytest.raises(KeyError, match=r"img_features.*image_features"):
        hs.tl.stereomm(adata_graph, **KW)
    with pytest.raises(KeyError, match="layers"):
        hs.tl.stereomm(adata_graph, layer="nope", features_key=None, **KW)
    assert (set(adata_graph.obsm), set(adata_graph.uns)) == orig_keys
