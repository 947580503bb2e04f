"""The spatial context of mclSTExp's image side: ring means over the slide's graph, in training and prediction."""

import numpy as np
import pytest
import scipy.sparse as sp

import histospace as hs
from histospace.models._context import context_rows, ring_operators

KW = {"projection_dim": 8, "n_heads": 2, "dim_head": 4, "n_layers": 1}
TRAIN = {"max_epochs": 2, "batch_size": 16, "device": "cpu", "progress_bar": False, "random_state": 0, "n_models": 1}


def test_rings_of_a_chain():
    # path 0-1-2-3-4: ring 1 of 0 is {1}, ring 2 of 0 is {2}; ring 2 of 2 is {0, 4}
    n = 5
    a = sp.diags([np.ones(n - 1), np.ones(n - 1)], [1, -1]).tocsr()
    r1, r2, r3 = (op.toarray() for op in ring_operators(a, 3))
    np.testing.assert_allclose(r1[0], [0, 1, 0, 0, 0])
    np.testing.assert_allclose(r1[2], [0, 0.5, 0, 0.5, 0])
    np.testing.assert_allclose(r2[2], [0.5, 0, 0, 0, 0.5])
    np.testing.assert_allclose(r2[0], [0, 0, 1, 0, 0])
    # ring 3 of spot 2 is empty: its own features stand in
    np.testing.assert_allclose(r3[2], [0, 0, 1, 0, 0])
    x = np.arange(n, dtype=np.float32)[:, None]
    ctx = context_rows(x, [sp.csr_matrix(r1), sp.csr_matrix(r2)])
    np.testing.assert_allclose(ctx[1], [1, 1, 3])
    np.testing.assert_allclose(context_rows(x, [sp.csr_matrix(r1)], slice(3, 5)), [[3, 3], [4, 3]])


def test_directed_knn_graph_is_symmetrised():
    a = sp.csr_matrix(np.array([[0, 1, 0], [0, 0, 0], [0, 1, 0]], dtype=np.float32))
    (r1,) = ring_operators(a, 1)
    np.testing.assert_allclose(r1.toarray()[1], [0.5, 0, 0.5])


@pytest.fixture
def graph_adata(adata):
    hs.pp.spatial_graph(adata)
    return adata


def test_context_model_trains_and_predicts(graph_adata):
    m = hs.models.MclSTExp(graph_adata, **KW, spatial_context=2).train(**TRAIN)
    d = graph_adata.obsm["img_features"].shape[1]
    assert m.spatial_context == 2
    assert m.module.image_projection.projection.in_features == 3 * d
    assert m.img_dim == d  # the query gives the plain features
    pred = m.predict(graph_adata, n_neighbors=10)
    assert pred.shape == (graph_adata.n_obs, len(m.genes))
    # computed batch by batch: the same for any batch size
    np.testing.assert_allclose(m.predict(graph_adata, batch_size=7, n_neighbors=10), pred, rtol=1e-5, atol=1e-6)
    # the context enters: the same model weights on a query without neighbours (each spot alone) differ
    alone = graph_adata.copy()
    alone.obsp["spatial_connectivities"] = sp.csr_matrix((alone.n_obs, alone.n_obs), dtype=np.float32)
    assert not np.allclose(m.predict(alone, n_neighbors=10), pred)
    off = hs.models.MclSTExp(graph_adata, **KW, spatial_context=0).train(**TRAIN)
    assert off.module.image_projection.projection.in_features == d


def test_context_follows_the_graph_not_the_order(graph_adata):
    m = hs.models.MclSTExp(graph_adata, **KW, spatial_context=1).train(**TRAIN)
    pred = m.predict(graph_adata, n_neighbors=10)
    perm = np.random.default_rng(0).permutation(graph_adata.n_obs)
    q = graph_adata[perm].copy()
    np.testing.assert_allclose(m.predict(q, n_neighbors=10), pred[perm], rtol=1e-5, atol=1e-6)


def test_context_graph_built_when_absent(adata, graph_adata):
    bare = adata.copy()
    del bare.obsp["spatial_connectivities"]
    m = hs.models.MclSTExp(bare, **KW, spatial_context=1).train(**TRAIN)
    assert "spatial_connectivities" not in bare.obsp  # nothing written
    np.testing.assert_allclose(
        m.predict(bare, n_neighbors=10), m.predict(graph_adata, n_neighbors=10), rtol=1e-5, atol=1e-6
    )
    no_xy = bare.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(KeyError, match="spatial_graph"):
        m.predict(no_xy, n_neighbors=10)


def test_context_saved_and_loaded(graph_adata, tmp_path):
    m = hs.models.MclSTExp(graph_adata, **KW, spatial_context=2).train(**TRAIN)
    m.save(tmp_path / "m")
    m2 = hs.models.MclSTExp.load(tmp_path / "m")
    assert m2.spatial_context == 2
    np.testing.assert_allclose(
        m2.predict(graph_adata, n_neighbors=10), m.predict(graph_adata, n_neighbors=10), rtol=1e-5, atol=1e-6
    )


def test_smoothed_predictions(graph_adata):
    m = hs.models.MclSTExp(graph_adata, **KW, smooth_predictions=0.0).train(**TRAIN)
    raw = m.predict(graph_adata, n_neighbors=10)
    m.smooth_predictions = 0.4
    got = m.predict(graph_adata, n_neighbors=10)
    # by hand: ring-1 neighbours on the graph, taken undirected
    g = graph_adata.obsp["spatial_connectivities"].toarray() > 0
    g = g | g.T
    np.fill_diagonal(g, False)
    want = 0.6 * raw + 0.4 * (g @ raw) / g.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the ensemble spread is that of the smoothed members
    mean, sd = m.predict(graph_adata, n_neighbors=10, return_std=True)
    np.testing.assert_allclose(mean, got, rtol=1e-6)
    assert sd is None  # one model


def test_context_defaults_and_bad_input(graph_adata):
    m0 = hs.models.MclSTExp(graph_adata, **KW)
    assert (m0.spatial_context, m0.smooth_predictions) == (0, 0.0)  # both opt-in
    ref = hs.models.MclSTExp(graph_adata, **KW, preset="reference")
    assert (ref.spatial_context, ref.smooth_predictions) == (0, 0.0)
    with pytest.raises(ValueError, match="smooth_predictions"):
        hs.models.MclSTExp(graph_adata, **KW, smooth_predictions=1.5)
    with pytest.raises(ValueError, match="spatial_context=0"):
        hs.models.MclSTExp(graph_adata, **KW, spatial_context=1, freeze_encoder=False)
    with pytest.raises(ValueError, match="spatial_context"):
        hs.models.MclSTExp(graph_adata, **KW, spatial_context=-1)
    m = hs.models.MclSTExp(graph_adata, **KW, spatial_context=1).train(**TRAIN)
    with pytest.raises(ValueError, match="pass `adata`"):
        m.get_image_embedding(features=graph_adata.obsm["img_features"])


def test_smoothing_skipped_with_a_warning_without_coordinates(graph_adata):
    m = hs.models.MclSTExp(graph_adata, **KW, smooth_predictions=0.5).train(**TRAIN)
    bare = graph_adata.copy()
    del bare.obsp["spatial_connectivities"], bare.obsm["spatial"]
    with pytest.warns(UserWarning, match="not smoothed"):
        got = m.predict(bare, n_neighbors=10)
    m.smooth_predictions = 0.0
    np.testing.assert_allclose(got, m.predict(graph_adata, n_neighbors=10), rtol=1e-6)
