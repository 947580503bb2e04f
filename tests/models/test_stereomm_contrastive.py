"""StereoMM's optional contrastive term (Deep Graph Infomax, as GraphST): `contrastive_weight`."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import histospace as hs
from histospace.models._stereomm_config import readout_adjacency

TINY = {"hidden": [8], "n_latent": 4}
FAST = {"max_epochs": 3, "n_models": 1, "device": "cpu", "progress_bar": False}


def test_default_has_no_contrastive_term(adata_graph):
    m = hs.models.StereoMM(adata_graph, **TINY)
    assert m.config["contrastive_weight"] == 0.0
    assert m.module.discriminator is None
    assert not any(k.startswith("discriminator") for k in m.module.state_dict())
    assert hs.models.StereoMM(adata_graph, preset="reference", **TINY).config["contrastive_weight"] == 0.0


def test_readout_is_the_neighbour_mean():
    a = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    r = readout_adjacency(a).to_dense().numpy()
    np.testing.assert_allclose(np.diag(r), 0)  # the spot itself is not its own summary
    np.testing.assert_allclose(r.sum(1), [1, 1, 1, 0])  # an isolated spot summarises to zero
    np.testing.assert_allclose(r[1], [0.5, 0, 0.5, 0])
    sub = readout_adjacency(a, np.array([1, 2])).to_dense().numpy()  # a tile's own sub-graph
    np.testing.assert_allclose(sub, [[0, 1], [1, 0]])


def test_contrastive_training_changes_the_latent_and_is_seeded(adata_graph):
    z0 = hs.models.StereoMM(adata_graph, **TINY).train(random_state=1, **FAST).get_latent_representation()
    m = hs.models.StereoMM(adata_graph, contrastive_weight=1.0, **TINY).train(random_state=1, **FAST)
    z1 = m.get_latent_representation()
    z2 = (
        hs.models.StereoMM(adata_graph, contrastive_weight=1.0, **TINY)
        .train(random_state=1, **FAST)
        .get_latent_representation()
    )
    assert m.module.discriminator is not None and np.isfinite(m.history["loss"]).all()
    np.testing.assert_array_equal(z1, z2)
    assert not np.allclose(z0, z1)


def test_contrastive_loss_is_added(adata_graph):
    m = hs.models.StereoMM(adata_graph, contrastive_weight=2.0, **TINY)
    x_t, x_m = m._inputs()
    ro = readout_adjacency(m._readout_graph)
    torch.manual_seed(0)
    total, rec, kl = m.module.loss(x_t, x_m, m._adj_t, m._edge_index, kl_weight=0.0)
    torch.manual_seed(0)
    total2, rec2, _ = m.module.loss(
        x_t, x_m, m._adj_t, m._edge_index, kl_weight=0.0, readout=ro, contrastive_weight=2.0
    )
    assert float(total) == pytest.approx(float(rec))
    # binary cross-entropy of an untrained discriminator: about ln 2 per term
    assert float(total2 - rec2) / 2.0 == pytest.approx(np.log(2), abs=0.3)


def test_contrastive_tiles_and_save_load(adata_graph, tmp_path):
    m = hs.models.StereoMM(adata_graph, attention="local", contrastive_weight=0.5, **TINY)
    m.train(batch_size=20, **FAST)
    assert len(m._tiles) > 1 and np.isfinite(m.history["loss"]).all()
    z = m.get_latent_representation()
    m.save(tmp_path / "model")
    m2 = hs.models.StereoMM.load(tmp_path / "model", adata=adata_graph)
    assert m2.config["contrastive_weight"] == 0.5 and m2.module.discriminator is not None
    np.testing.assert_array_equal(m2.get_latent_representation(), z)


def test_bad_contrastive_weight(adata_graph):
    with pytest.raises(ValueError, match="contrastive_weight"):
        hs.models.StereoMM(adata_graph, contrastive_weight=-1, **TINY)
