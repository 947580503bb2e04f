"""`graph_weight` of `hs.tl.stereomm`: neighbours averaged when they are alike, each spot's own features when the graph
joins spots that are as different as random ones (`'auto'`), and explicit weights."""

import numpy as np
import pytest
import scipy.sparse as sp

import histospace as hs
from histospace.models._stereomm_config import AUTO_GRAPH_MAX_DISSIMILARITY

KW = {"hidden": [8], "n_latent": 4, "max_epochs": 2, "n_models": 1, "device": "cpu", "progress_bar": False}


def _shuffled_graph(adata, seed=0):
    """The same graph with the spots permuted: every spot's neighbours are random spots."""
    p = np.random.default_rng(seed).permutation(adata.n_obs)
    g = adata.obsp["spatial_connectivities"].tocsr()
    return sp.csr_matrix(g[p][:, p])


def test_auto_keeps_the_graph_when_neighbours_are_alike(adata_graph):
    hs.tl.stereomm(adata_graph, features_key=None, **KW)
    params = adata_graph.uns["stereomm"]["params"]
    assert params["graph_weight"] == 1.0
    assert 0 <= params["neighbour_dissimilarity"] < 0.5  # three bands: grid neighbours share a band
    z_auto = adata_graph.obsm["X_stereomm"]
    hs.tl.stereomm(adata_graph, features_key=None, model_kwargs={"graph_weight": 1}, key_added="X_one", **KW)
    np.testing.assert_array_equal(adata_graph.obsm["X_one"], z_auto)  # 'auto' -> 1 is the usual GCN, unchanged
    assert "neighbour_dissimilarity" not in adata_graph.uns["one"]["params"]


def test_auto_drops_neighbours_that_are_as_different_as_random_spots(adata_graph):
    adata_graph.obsp["shuffled"] = _shuffled_graph(adata_graph)
    hs.tl.stereomm(adata_graph, features_key=None, connectivity_key="shuffled", **KW)
    params = adata_graph.uns["stereomm"]["params"]
    assert params["neighbour_dissimilarity"] > AUTO_GRAPH_MAX_DISSIMILARITY
    assert params["graph_weight"] == 0.0
    # with weight 0 the latent does not depend on the graph: another random graph gives the same latent
    adata_graph.obsp["shuffled2"] = _shuffled_graph(adata_graph, seed=1)
    hs.tl.stereomm(
        adata_graph, features_key=None, connectivity_key="shuffled2", model_kwargs={"graph_weight": 0}, key_added="X_0",
        **KW,
    )  # fmt: skip
    np.testing.assert_allclose(adata_graph.obsm["X_0"], adata_graph.obsm["X_stereomm"], rtol=1e-5, atol=1e-6)
    # forcing the usual GCN on the random graph changes it
    hs.tl.stereomm(
        adata_graph, features_key=None, connectivity_key="shuffled", model_kwargs={"graph_weight": 1}, key_added="X_1",
        **KW,
    )  # fmt: skip
    assert not np.allclose(adata_graph.obsm["X_1"], adata_graph.obsm["X_stereomm"])


def test_intermediate_weight_and_reference(adata_graph):
    model = hs.tl.stereomm(adata_graph, model_kwargs={"graph_weight": 0.25}, return_model=True, **KW)
    assert model.config["graph_weight"] == 0.25 and "neighbour_dissimilarity" not in model.config
    assert np.isfinite(adata_graph.obsm["X_stereomm"]).all()
    ref = hs.models.StereoMM(adata_graph, preset="reference")
    assert ref.config["graph_weight"] == 1.0  # the reference's GCN
    assert "neighbour_dissimilarity" not in ref.config


def test_save_load_recomputes_the_same_choice(adata_graph, tmp_path):
    adata_graph.obsp["shuffled"] = _shuffled_graph(adata_graph)
    model = hs.models.StereoMM(adata_graph, features_key=None, connectivity_key="shuffled", hidden=[8], n_latent=4)
    model.train(max_epochs=2, n_models=1, device="cpu", progress_bar=False)
    model.save(tmp_path / "m")
    back = hs.models.StereoMM.load(tmp_path / "m", adata=adata_graph)
    assert back.config["graph_weight"] == 0.0
    np.testing.assert_allclose(back.get_latent_representation(), model.get_latent_representation(), rtol=1e-6)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [(-1, ValueError, "graph_weight"), ("x", ValueError, "graph_weight='x'"), (True, TypeError, "graph_weight")],
)
def test_bad_graph_weight_writes_nothing(adata_graph, value, error, match):
    before = set(adata_graph.obsm), set(adata_graph.uns)
    with pytest.raises(error, match=match):
        hs.tl.stereomm(adata_graph, model_kwargs={"graph_weight": value}, **KW)
    assert (set(adata_graph.obsm), set(adata_graph.uns)) == before
