import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import histospace as hs
from histospace._nn._stereomm import CrossModalAttention, StereoMMModule, kl_divergence

TINY = {"hidden": [8], "n_latent": 4}
FAST = {"max_epochs": 2, "n_models": 1, "device": "cpu", "progress_bar": False}


def _grid_graph(n_side: int) -> sp.csr_matrix:
    idx = np.arange(n_side * n_side).reshape(n_side, n_side)
    rows, cols = [], []
    for a, b in [(idx[:, :-1], idx[:, 1:]), (idx[:-1, :], idx[1:, :])]:
        rows += [a.ravel(), b.ravel()]
        cols += [b.ravel(), a.ravel()]
    r, c = np.concatenate(rows), np.concatenate(cols)
    return sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(idx.size, idx.size))


# ---------------------------------------------------------------- torch modules
def test_reference_parameter_count():
    # StereoMMv1 tutorial: s = 2048, hidden [512, 128], latent 50, feature decoder -> 6,449,252 parameters,
    # 2,099,200 of them in the attention
    m = StereoMMModule(2048, hidden=[512, 128], n_latent=50, proj_dim=256, n_heads=1, attention="global")
    n_att = sum(p.numel() for p in m.attention.parameters())
    n_vgae = sum(p.numel() for p in m.vgae.parameters())
    assert n_att == 2_099_200
    assert n_vgae == 4_350_052
    assert n_att + n_vgae == 6_449_252
    # brief attention: only the output projection trains
    assert sum(p.numel() for p in m.attention.parameters() if p.requires_grad) == 256 * 2048 + 2048


def test_reference_preset_parameter_count():
    # the same numbers through the public class with preset="reference" (2048 top-variance genes, 2048 image dims)
    rng = np.random.default_rng(0)
    n, g = 16, 2100
    a = ad.AnnData(X=sp.csr_matrix(rng.poisson(1.0, size=(n, g)).astype(np.float32)))
    a.obs_names = [f"s{i}" for i in range(n)]
    a.obsm["img_features"] = rng.normal(size=(n, 2048)).astype(np.float32)
    a.obsp["spatial_connectivities"] = _grid_graph(4)
    m = hs.models.StereoMM(a, preset="reference", hidden=[512, 128], n_latent=50)
    assert m.dim == 2048
    assert sum(p.numel() for p in m.module.parameters()) == 6_449_252
    assert sum(p.numel() for p in m.module.attention.parameters()) == 2_099_200


def test_chunked_global_attention_is_exact():
    torch.manual_seed(0)
    att = CrossModalAttention(6, proj_dim=8, n_heads=2, mode="global_trainable")
    xq, xkv = torch.randn(50, 6), torch.randn(50, 6)
    full = att.attend_global(xq, xkv, chunk_size=50)
    chunked = att.attend_global(xq, xkv, chunk_size=7)
    # dense reference computation
    q = att.q(xq).view(50, 2, 4).transpose(0, 1)
    k = att.k(xkv).view(50, 2, 4).transpose(0, 1)
    v = att.v(xkv).view(50, 2, 4).transpose(0, 1)
    ref = (torch.softmax(q @ k.transpose(1, 2) / 2.0, -1) @ v).transpose(0, 1).reshape(50, 8)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-5)
    # gradients through the checkpointed chunks match too
    xq.requires_grad_(True)
    g1 = torch.autograd.grad(att.attend_global(xq, xkv, chunk_size=7).sum(), xq)[0]
    g2 = torch.autograd.grad(att.attend_global(xq, xkv, chunk_size=50).sum(), xq)[0]
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_cached_brief_attention_matches_recomputation():
    torch.manual_seed(0)
    att = CrossModalAttention(6, proj_dim=8, mode="global", chunk_size=5)
    assert not att.q.weight.requires_grad and att.out.weight.requires_grad
    x_t, x_m = torch.randn(30, 6), torch.randn(30, 6)
    x_ma, x_ta = att(x_t, x_m)  # builds the cache
    assert att.is_cached
    x_ma2, x_ta2 = att(x_t, x_m)  # reads the cache
    h_t, h_m = att.attend(x_t, x_m, chunk_size=30)  # recomputed, unchunked
    torch.testing.assert_close(x_ta2, x_t + att.out(h_t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_ma2, x_m + att.out(h_m), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_ma, x_ma2)


def test_local_attention_is_softmax_over_neighbours():
    torch.manual_seed(0)
    att = CrossModalAttention(4, proj_dim=4, mode="local")
    x_t, x_m = torch.randn(5, 4), torch.randn(5, 4)
    # node 0 attends to nodes 0, 1, 2; the others to themselves only
    src = torch.tensor([0, 1, 2, 1, 2, 3, 4])
    dst = torch.tensor([0, 0, 0, 1, 2, 3, 4])
    out = att.attend_local(x_t, x_m, torch.stack([src, dst]))
    q, k, v = att.q(x_t), att.k(x_m), att.v(x_m)
    w = torch.softmax(q[0] @ k[:3].T / 2.0, -1)
    torch.testing.assert_close(out[0], w @ v[:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[3], v[3], atol=1e-5, rtol=1e-5)


def test_local_attention_blocks_equal_one_pass():
    torch.manual_seed(0)
    att = CrossModalAttention(4, proj_dim=4, mode="local")
    assert att.frozen and not att.q.weight.requires_grad
    n = 50
    x_t, x_m = torch.randn(n, 4), torch.randn(n, 4)
    g = torch.Generator().manual_seed(1)
    src = torch.cat([torch.arange(n), torch.randint(0, n, (200,), generator=g)])
    dst = torch.cat([torch.arange(n), torch.randint(0, n, (200,), generator=g)])
    perm = torch.randperm(len(src), generator=g)  # unsorted edges
    ei = torch.stack([src[perm], dst[perm]])
    one = att.attend_local(x_t, x_m, ei)
    torch.testing.assert_close(att.attend_local_blocked(x_t, x_m, ei, max_edges=7), one, atol=1e-6, rtol=1e-5)
    att.build_cache(x_t, x_m, ei)
    torch.testing.assert_close(att.cache_t, one, atol=1e-6, rtol=1e-5)
    assert not CrossModalAttention(4, proj_dim=4, mode="local_trainable").frozen


def test_kl_uses_log_variance():
    mu, lv = torch.zeros(3, 2), torch.zeros(3, 2)
    assert float(kl_divergence(mu, lv)) == pytest.approx(0.0)
    lv = torch.full((3, 2), np.log(4.0))  # variance 4: KL per dim = 0.5 * (4 - 1 - log 4)
    assert float(kl_divergence(mu, lv)) == pytest.approx(2 * 0.5 * (4 - 1 - np.log(4.0)), rel=1e-5)


# ---------------------------------------------------------------- model class
@pytest.mark.parametrize("attention", ["global", "global_trainable", "local", "local_trainable", "none"])
def test_attention_modes_train(adata_graph, attention):
    m = hs.models.StereoMM(adata_graph, attention=attention, **TINY)
    m.train(**FAST)
    z = m.get_latent_representation()
    assert z.shape == (adata_graph.n_obs, 4) and z.dtype == np.float32
    assert np.isfinite(z).all()
    assert m.is_trained and len(m.history["loss"]) == 2
    assert m.device == torch.device("cpu")


def test_expression_only(adata_graph):
    m = hs.models.StereoMM(adata_graph, features_key=None, **TINY)
    m.train(**FAST)
    assert m.get_latent_representation().shape == (adata_graph.n_obs, 4)
    assert not m.module.use_image


@pytest.mark.parametrize("attention", ["global", "local", "local_trainable", "global_trainable"])
def test_mini_batch_path(adata_graph, attention):
    m = hs.models.StereoMM(adata_graph, attention=attention, **TINY)
    m.train(batch_size=20, **FAST)
    assert m.train_params["batch_size"] == 20
    assert len(m._tiles) > 1
    # every spot is a seed of exactly one tile
    seeds = np.concatenate([b.nodes[: b.n_seeds].numpy() for b in m._tiles])
    assert np.array_equal(np.sort(seeds), np.arange(adata_graph.n_obs))
    z = m.get_latent_representation()
    assert z.shape == (adata_graph.n_obs, 4) and np.isfinite(z).all()


def test_default_epochs_give_about_300_steps_with_tiles(adata_graph):
    m = hs.models.StereoMM(adata_graph, attention="local", **TINY).train(batch_size=20, progress_bar=False)
    n_tiles = len(m._tiles)
    assert n_tiles > 1
    assert m.train_params["max_epochs"] == max(-(-300 // n_tiles), 5) == len(m.history["loss"])


@pytest.mark.parametrize("attention", ["local", "local_trainable"])
def test_mini_batch_latent_equals_full_batch_latent(adata_graph, attention):
    # the halo covers the receptive field: tiles give the same latent as the full graph for the same weights
    m = hs.models.StereoMM(adata_graph, attention=attention, **TINY)
    m.train(batch_size=20, **FAST)
    z_tiles = m.get_latent_representation()
    m._tiles = None
    z_full = m.get_latent_representation()
    np.testing.assert_allclose(z_tiles, z_full, atol=1e-5)


def test_same_seed_same_latent(adata_graph):
    z1 = hs.models.StereoMM(adata_graph, **TINY).train(random_state=3, **FAST).get_latent_representation()
    z2 = hs.models.StereoMM(adata_graph, **TINY).train(random_state=3, **FAST).get_latent_representation()
    z3 = hs.models.StereoMM(adata_graph, **TINY).train(random_state=4, **FAST).get_latent_representation()
    np.testing.assert_array_equal(z1, z2)
    assert not np.array_equal(z1, z3)


def test_sample_differs_from_mean(adata_graph):
    m = hs.models.StereoMM(adata_graph, **TINY).train(**FAST)
    mu = m.get_latent_representation()
    z = m.get_latent_representation(sample=True)
    assert z.shape == mu.shape and not np.allclose(z, mu)


def test_save_load_roundtrip(adata_graph, tmp_path):
    m = hs.models.StereoMM(adata_graph, **TINY).train(**FAST)
    z = m.get_latent_representation()
    m.save(tmp_path / "model")
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"model.pt", "params.json", "preprocessing.npz"}
    m2 = hs.models.StereoMM.load(tmp_path / "model", adata=adata_graph)
    assert m2.is_trained and m2.history["loss"] == pytest.approx(m.history["loss"])
    np.testing.assert_array_equal(m2.get_latent_representation(), z)
    with pytest.raises(FileExistsError):
        m.save(tmp_path / "model")


def test_seed_ensemble(adata_graph, tmp_path):
    kw = {**FAST, "n_models": 3}
    m = hs.models.StereoMM(adata_graph, **TINY).train(random_state=5, **kw)
    z = m.get_latent_representation()
    assert m.n_models == 3 and "3 models" in repr(m)
    assert z.shape == (adata_graph.n_obs, 3 * 4) and z.dtype == np.float32
    # member i is the model of seed random_state + i
    for i in range(3):
        single = hs.models.StereoMM(adata_graph, **TINY).train(random_state=5 + i, **FAST)
        np.testing.assert_array_equal(z[:, 4 * i : 4 * (i + 1)], single.get_latent_representation())
        assert len(m.member_histories[i]["loss"]) == 2
    assert not np.allclose(z[:, :4], z[:, 4:8])
    np.testing.assert_allclose(m.history["loss"], np.mean([h["loss"] for h in m.member_histories], axis=0))
    assert m.train_params["n_models"] == 3
    # same seed -> same bytes; asking twice gives the same latent (the module's weights are restored)
    again = hs.models.StereoMM(adata_graph, **TINY).train(random_state=5, **kw).get_latent_representation()
    assert again.tobytes() == z.tobytes() and m.get_latent_representation().tobytes() == z.tobytes()
    # save/load keeps every member
    m.save(tmp_path / "ens")
    assert (tmp_path / "ens" / "members.pt").is_file()
    back = hs.models.StereoMM.load(tmp_path / "ens", adata=adata_graph)
    assert back.n_models == 3
    np.testing.assert_array_equal(back.get_latent_representation(), z)
    (tmp_path / "ens" / "members.pt").unlink()
    with pytest.raises(FileNotFoundError, match="members.pt"):
        hs.models.StereoMM.load(tmp_path / "ens", adata=adata_graph)
    # a single model saved over the ensemble folder leaves no stale members
    m.save(tmp_path / "ens2")
    hs.models.StereoMM(adata_graph, **TINY).train(**FAST).save(tmp_path / "ens2", overwrite=True)
    assert not (tmp_path / "ens2" / "members.pt").exists()
    with pytest.raises(ValueError, match="n_models"):
        hs.models.StereoMM(adata_graph, **TINY).train(**{**FAST, "n_models": 0})


def test_save_load_mini_batch(adata_graph, tmp_path):
    m = hs.models.StereoMM(adata_graph, attention="local", **TINY).train(batch_size=20, **FAST)
    z = m.get_latent_representation()
    m.save(tmp_path / "m")
    np.testing.assert_allclose(
        hs.models.StereoMM.load(tmp_path / "m", adata=adata_graph).get_latent_representation(), z, atol=1e-6
    )


def test_load_on_other_adata_fails(adata_graph, tmp_path):
    m = hs.models.StereoMM(adata_graph, **TINY).train(**FAST)
    m.save(tmp_path / "model")
    other = adata_graph[:40].copy()
    with pytest.raises(ValueError, match="other spots"):
        hs.models.StereoMM.load(tmp_path / "model", adata=other)
    renamed = adata_graph.copy()
    renamed.obs_names = [f"x{i}" for i in range(renamed.n_obs)]
    with pytest.raises(ValueError, match="other spots"):
        hs.models.StereoMM.load(tmp_path / "model", adata=renamed)
    fewer_genes = adata_graph[:, :10].copy()
    with pytest.raises(ValueError, match="genes"):
        hs.models.StereoMM.load(tmp_path / "model", adata=fewer_genes)
    with pytest.raises(FileNotFoundError):
        hs.models.StereoMM.load(tmp_path / "nothing", adata=adata_graph)


def test_nan_loss_raises(adata_graph):
    m = hs.models.StereoMM(adata_graph, **TINY)
    with pytest.raises(FloatingPointError, match=r"at epoch \d.*lower learning rate"):
        m.train(lr=1e30, clip_norm=1e30, **{**FAST, "max_epochs": 3})


def test_reference_preset_settings(adata_graph):
    m = hs.models.StereoMM(adata_graph, preset="reference", hidden=[8], n_latent=4)
    assert m.config["gene_selection"] == "top_variance" and m.config["n_pcs"] is None
    assert m.config["attention"] == "global" and m.config["normalize"] == "none"
    m.train(max_epochs=1, progress_bar=False)
    assert m.train_params["lr"] == 1e-4 and m.train_params["weight_decay"] == 1e-4


def test_common_width(adata_graph):
    # 30 genes, 16 image features: the expression side is reduced to 16 as well
    m = hs.models.StereoMM(adata_graph, n_pcs=None, **TINY)
    assert m.dim == 16
    m = hs.models.StereoMM(adata_graph, n_pcs=8, **TINY)
    assert m.dim == 8 and m._x_m.shape == (adata_graph.n_obs, 8)


# ---------------------------------------------------------------- bad input
def test_missing_image_features(adata_graph):
    del adata_graph.obsm["img_features"]
    with pytest.raises(KeyError, match=r"img_features.*hs\.pp\.image_features"):
        hs.models.StereoMM(adata_graph, **TINY)


def test_missing_graph(adata):
    with pytest.raises(KeyError, match=r"spatial_connectivities.*spatial_neighbors"):
        hs.models.StereoMM(adata, **TINY)


def test_feature_rows_mismatch(adata_graph):
    # AnnData refuses obsm entries of the wrong length; a stale entry can still sneak in through the store
    adata_graph.obsm._data["img_features"] = np.zeros((adata_graph.n_obs - 4, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="img_features"):
        hs.models.StereoMM(adata_graph, **TINY)


def test_nan_features(adata_graph):
    adata_graph.obsm["img_features"][3, 2] = np.nan
    with pytest.raises(ValueError, match="img_features"):
        hs.models.StereoMM(adata_graph, **TINY)
    adata_graph.obsm["img_features"][3, 2] = np.inf
    with pytest.raises(ValueError, match="img_features"):
        hs.models.StereoMM(adata_graph, **TINY)


def test_empty_graph_and_isolated_spots(adata_graph):
    adata_graph.obsp["spatial_connectivities"] = sp.csr_matrix((adata_graph.n_obs, adata_graph.n_obs))
    with pytest.raises(ValueError, match="spatial_connectivities"):
        hs.models.StereoMM(adata_graph, **TINY)
    g = _grid_graph(8).tolil()
    g[:10, :] = 0
    g[:, :10] = 0
    adata_graph.obsp["spatial_connectivities"] = g.tocsr()
    # QC-filtered slides have isolated spots: they keep their own features, with a warning that counts them
    with pytest.warns(UserWarning, match=r"10 of 64 spots \(16%\) have no neighbour"):
        m = hs.models.StereoMM(adata_graph, **TINY)
    z = m.train(**FAST).get_latent_representation()
    assert z.shape == (64, 4) and np.isfinite(z).all()


def test_missing_layer_and_negative_counts(adata_graph):
    with pytest.raises(KeyError, match="counts"):
        hs.models.StereoMM(adata_graph, layer="counts", **TINY)
    adata_graph.layers["neg"] = adata_graph.X.toarray() - 5
    with pytest.raises(ValueError, match="negative"):
        hs.models.StereoMM(adata_graph, layer="neg", **TINY)


def test_bad_options(adata_graph):
    with pytest.raises(ValueError, match="attention"):
        hs.models.StereoMM(adata_graph, attention="dense", **TINY)
    with pytest.raises(ValueError, match="preset"):
        hs.models.StereoMM(adata_graph, preset="v2", **TINY)
    with pytest.raises(ValueError, match="max_epochs"):
        hs.models.StereoMM(adata_graph, **TINY).train(max_epochs=0)


@pytest.mark.gpu
def test_cuda(adata_graph):
    m = hs.models.StereoMM(adata_graph, **TINY).train(max_epochs=2, device="cuda", progress_bar=False)
    assert m.device.type == "cuda"
    z = m.get_latent_representation()
    assert isinstance(z, np.ndarray) and z.shape == (adata_graph.n_obs, 4)


def test_default_attention_starts_as_identity(adata_graph):
    m = hs.models.StereoMM(adata_graph, **TINY)
    assert m.config["zero_init_attention"] and m.config["attention"] == "global"
    x_ma, x_ta = m.module.attention(m._x_t, m._x_m)
    torch.testing.assert_close(x_ta, m._x_t)
    torch.testing.assert_close(x_ma, m._x_m)
    ref = hs.models.StereoMM(adata_graph, preset="reference", **TINY)
    assert not ref.config["zero_init_attention"] and ref.config["image_weight"] == 1.0


def test_image_feature_settings_recorded(adata_graph, tmp_path):
    # StereoMM is transductive (no new section): the settings of its image features are recorded, not reused
    a = adata_graph.copy()
    a.uns["img_features"] = {
        "params": {"encoder": "mobilenet_v2", "weights": "w.pt", "patch_size_px": 165.0, "patch_size_um": 82.5,
                   "input_size": 224, "mean": np.array([0.5, 0.5, 0.5]), "std": np.array([0.5, 0.5, 0.5])}
    }  # fmt: skip
    m = hs.models.StereoMM(a, **TINY).train(**FAST)
    s = m.feature_settings
    assert s["encoder"] == "mobilenet_v2" and s["patch_size_um"] == 82.5 and s["mpp"] == pytest.approx(0.5)
    m.save(tmp_path / "m")
    del a.uns["img_features"]
    assert hs.models.StereoMM.load(tmp_path / "m", adata=a).feature_settings == s
    hs.tl.stereomm(a, **TINY, **FAST)  # no recorded settings: no entry
    assert "image_features" not in a.uns["stereomm"]["params"]
    b = adata_graph.copy()
    b.uns["img_features"] = {"params": {"encoder": "resnet50", "patch_size_px": 100.0}}
    hs.tl.stereomm(b, **TINY, **FAST)
    assert b.uns["stereomm"]["params"]["image_features"]["encoder"] == "resnet50"
    assert b.uns["stereomm"]["params"]["image_features"]["patch_size_px"] == 100.0
