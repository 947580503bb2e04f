import anndata as ad
import numpy as np
import pandas as pd
import pytest

import histospace as hs


@pytest.fixture
def adata_rep(adata_graph):
    # a latent with three well separated groups (the fixture's vertical bands)
    rng = np.random.default_rng(0)
    dom = adata_graph.obs["domain"].cat.codes.to_numpy()
    adata_graph.obsm["X_stereomm"] = (np.eye(3)[dom] * 5 + 0.3 * rng.normal(size=(adata_graph.n_obs, 3))).astype(
        np.float32
    )
    return adata_graph


def _ari(a, b):
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(a, b)


@pytest.mark.parametrize("method", ["gmm", "kmeans", "leiden"])
def test_methods(adata_rep, method):
    hs.tl.domains(adata_rep, n_clusters=3, method=method)
    lab = adata_rep.obs["stereomm_domain"]
    assert isinstance(lab.dtype, pd.CategoricalDtype)
    assert list(lab.cat.categories) == ["0", "1", "2"]
    assert _ari(lab, adata_rep.obs["domain"]) > 0.9
    p = adata_rep.uns["stereomm_domain"]["params"]
    assert p["method"] == method and p["n_clusters"] == 3
    if method == "leiden":
        assert 0 < p["resolution"]


def test_choose_n_clusters(adata_rep):
    hs.tl.domains(adata_rep, n_clusters=None, method="gmm", cluster_range=(2, 6), n_init=2)
    assert adata_rep.uns["stereomm_domain"]["params"]["criterion"] == "bic"
    assert adata_rep.uns["stereomm_domain"]["params"]["n_clusters"] == 3
    assert adata_rep.uns["stereomm_domain"]["params"]["n_clusters_chosen"] == 3
    hs.tl.domains(adata_rep, n_clusters=None, method="kmeans", cluster_range=(2, 6), key_added="km")
    assert adata_rep.uns["km"]["params"]["n_clusters"] == 3
    assert adata_rep.uns["km"]["params"]["n_clusters_chosen"] == 3
    assert adata_rep.uns["km"]["params"]["criterion"] == "silhouette"


def test_choose_n_clusters_warns_at_the_top_of_the_range(adata_rep, recwarn):
    hs.tl.domains(adata_rep, n_clusters=None, method="gmm", cluster_range=(2, 6), n_init=2)
    assert not [w for w in recwarn if "largest number tried" in str(w.message)]  # 3 of (2, 6): no warning
    for method, name in [("gmm", "BIC"), ("kmeans", "silhouette score")]:
        msg = rf"the {name} chose 3, the largest number tried \(cluster_range=\(2, 3\)\)"
        with pytest.warns(UserWarning, match=msg):
            hs.tl.domains(adata_rep, n_clusters=None, method=method, cluster_range=(2, 3), n_init=2, key_added="top")
        assert adata_rep.uns["top"]["params"]["n_clusters_chosen"] == 3


def test_leiden_not_exact_warns(adata_rep):
    with pytest.warns(UserWarning, match="closest"):
        hs.tl.domains(adata_rep, n_clusters=60, method="leiden", refine=False)
    assert adata_rep.uns["stereomm_domain"]["params"]["n_clusters"] != 60


def test_refine_smooths_labels(adata_rep):
    # one interior spot whose latent looks like another band: the mixture mislabels it, refinement restores it
    i = 8 * 4 + 1  # row 4, column 1: its four grid neighbours are all in band D0
    dom = adata_rep.obs["domain"].cat.codes.to_numpy()
    adata_rep.obsm["X_stereomm"][i] = np.eye(3)[2] * 5
    hs.tl.domains(adata_rep, n_clusters=3, refine=False, key_added="raw")
    hs.tl.domains(adata_rep, n_clusters=3, refine=True, key_added="refined")
    raw = adata_rep.obs["raw"].astype(int).to_numpy()
    refined = adata_rep.obs["refined"].astype(int).to_numpy()
    neighbours = adata_rep.obsp["spatial_connectivities"][i].indices
    assert (dom[neighbours] == dom[i]).all()
    assert (raw[neighbours] != raw[i]).all()  # mislabelled before refinement
    assert (refined[neighbours] == refined[i]).all()  # restored from its neighbours
    assert adata_rep.uns["refined"]["params"]["refine"] == 1 and adata_rep.uns["raw"]["params"]["refine"] == 0


def test_key_defaults_and_copy(adata_rep):
    adata_rep.obsm["X_other"] = adata_rep.obsm["X_stereomm"].copy()
    out = hs.tl.domains(adata_rep, use_rep="X_other", n_clusters=3, copy=True)
    assert "other_domain" in out.obs and "other_domain" in out.uns
    assert "other_domain" not in adata_rep.obs and "other_domain" not in adata_rep.uns


def test_same_seed(adata_rep):
    a = hs.tl.domains(adata_rep, n_clusters=4, copy=True, random_state=2)
    b = hs.tl.domains(adata_rep, n_clusters=4, copy=True, random_state=2)
    assert a.obs["stereomm_domain"].equals(b.obs["stereomm_domain"])


def test_h5ad_roundtrip(adata_rep, tmp_path):
    hs.tl.domains(adata_rep, n_clusters=3, method="leiden")
    adata_rep.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert back.obs["stereomm_domain"].equals(adata_rep.obs["stereomm_domain"])
    assert (
        back.uns["stereomm_domain"]["params"]["resolution"] == adata_rep.uns["stereomm_domain"]["params"]["resolution"]
    )


def test_errors(adata_rep):
    bare = adata_rep.copy()
    del bare.obsm["X_stereomm"]
    with pytest.raises(KeyError, match=r"X_stereomm.*hs\.tl\.stereomm"):
        hs.tl.domains(bare)
    with pytest.raises(ValueError, match="fewer than n_clusters"):
        hs.tl.domains(adata_rep, n_clusters=adata_rep.n_obs + 1)
    with pytest.raises(ValueError, match="method"):
        hs.tl.domains(adata_rep, method="mclust")
    del adata_rep.obsp["spatial_connectivities"]
    with pytest.raises(KeyError, match="spatial_connectivities"):
        hs.tl.domains(adata_rep, n_clusters=3)
    assert "stereomm_domain" not in adata_rep.obs and "stereomm_domain" not in adata_rep.uns
    hs.tl.domains(adata_rep, n_clusters=3, refine=False)
    assert "stereomm_domain" in adata_rep.obs


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"n_clusters": True}, TypeError, r"`n_clusters` must be a positive int or None, got the bool True"),
        ({"n_clusters": np.bool_(True)}, TypeError, r"`n_clusters` must be a positive int or None, got the bool"),
        ({"n_clusters": 0}, ValueError, r"`n_clusters` must be a positive int or None, got 0"),
        ({"n_clusters": "3"}, TypeError, r"`n_clusters` must be a positive int or None, got str '3'"),
        ({"n_clusters": 3, "refine": -1}, ValueError, r"`refine` must be a non-negative int, got -1.*True/False"),
        ({"n_clusters": 3, "refine": 1.5}, ValueError, r"`refine` must be a non-negative int, got 1\.5.*passes"),
        ({"n_clusters": 3, "refine": "yes"}, TypeError, r"`refine` must be.*got str 'yes'.*True/False"),
        ({"n_clusters": 3, "n_neighbors": True}, TypeError, r"`n_neighbors` must be a positive int, got the bool"),
    ],
)
def test_bools_and_negative_refine_refused(adata_rep, kw, error, match):
    # issue #24 (10): refine=-1 was recorded as is, n_clusters=True taken as one cluster
    before = (set(adata_rep.obs), set(adata_rep.uns), set(adata_rep.obsm))
    with pytest.raises(error, match=match):
        hs.tl.domains(adata_rep, **kw)
    assert (set(adata_rep.obs), set(adata_rep.uns), set(adata_rep.obsm)) == before


def test_refine_counts(adata_rep):
    hs.tl.domains(adata_rep, n_clusters=3, refine=2)
    assert adata_rep.uns["stereomm_domain"]["params"]["refine"] == 2
    hs.tl.domains(adata_rep, n_clusters=3, refine=np.int64(0), key_added="none")
    assert adata_rep.uns["none"]["params"]["refine"] == 0


def test_seed_ensemble_vote(adata_rep):
    # three latents side by side, as `hs.tl.stereomm(n_models=3)` writes them: two show the bands (with their
    # groups in other orders), the third is noise; the vote follows the two, whatever the order of their labels
    rng = np.random.default_rng(1)
    z = adata_rep.obsm["X_stereomm"]
    noise = rng.normal(size=z.shape).astype(np.float32)
    adata_rep.obsm["X_stereomm"] = np.hstack([z[:, [2, 0, 1]], noise, z[:, [1, 2, 0]]])
    adata_rep.uns["stereomm"] = {"params": {"n_models": 3, "n_latent": 3}}
    hs.tl.domains(adata_rep, n_clusters=3, refine=False, ensemble="vote")
    p = adata_rep.uns["stereomm_domain"]["params"]
    assert p["n_models"] == 3 and p["ensemble"] == "vote" and 0.3 < p["model_agreement"] < 1 and p["n_pcs"] == 3
    assert _ari(adata_rep.obs["stereomm_domain"], adata_rep.obs["domain"]) > 0.9
    # the same with n_models given (no uns entry), and with k chosen on the first model
    del adata_rep.uns["stereomm"]
    hs.tl.domains(adata_rep, n_clusters=3, n_models=3, refine=False, ensemble="vote", key_added="given")
    assert (adata_rep.obs["given"] == adata_rep.obs["stereomm_domain"]).all()
    hs.tl.domains(
        adata_rep,
        n_clusters=None,
        n_models=3,
        cluster_range=(2, 5),
        n_init=2,
        ensemble="vote",
        consensus=True,
        key_added="chosen",
    )
    assert adata_rep.uns["chosen"]["params"]["n_clusters"] == 3
    assert 0.5 < adata_rep.uns["chosen"]["params"]["consensus_agreement"] <= 1  # the vote at the number chosen
    # the default: the principal components of the three latents together
    hs.tl.domains(adata_rep, n_clusters=3, n_models=3, refine=False, key_added="joint")
    p = adata_rep.uns["joint"]["params"]
    assert p["ensemble"] == "joint" and p["n_pcs"] == 9 and "model_agreement" not in p and p["consensus"]
    assert _ari(adata_rep.obs["joint"], adata_rep.obs["domain"]) > 0.9
    with pytest.raises(ValueError, match="`ensemble` must be 'joint' or 'vote'"):
        hs.tl.domains(adata_rep, n_models=3, ensemble="mean", key_added="bad")
    assert "bad" not in adata_rep.obs
    # n_models=1 clusters the side-by-side latents together
    hs.tl.domains(adata_rep, n_clusters=3, n_models=1, key_added="together")
    p = adata_rep.uns["together"]["params"]
    assert p["n_models"] == 1 and "ensemble" not in p
    assert p["n_init"] == 10 and not p["consensus"]  # one latent: the best of 10 starts (the joint ensemble: 50 vote)
    assert adata_rep.uns["joint"]["params"]["n_init"] == 50


def test_seed_ensemble_errors(adata_rep):
    with pytest.raises(ValueError, match=r"X_stereomm.*3 columns.*n_models=2"):
        hs.tl.domains(adata_rep, n_models=2)
    # uns describes an ensemble that the obsm entry no longer holds
    adata_rep.uns["stereomm"] = {"params": {"n_models": 3, "n_latent": 4}}
    with pytest.raises(ValueError, match=r"uns\['stereomm'\].*overwritten"):
        hs.tl.domains(adata_rep)
    assert "stereomm_domain" not in adata_rep.obs


def test_seed_ensemble_from_stereomm(adata_graph):
    hs.tl.stereomm(adata_graph, hidden=[8], n_latent=4, max_epochs=2, device="cpu", progress_bar=False)
    hs.tl.domains(adata_graph, n_clusters=3)
    p = adata_graph.uns["stereomm_domain"]["params"]
    assert p["n_models"] == 3 and p["ensemble"] == "joint" and p["n_pcs"] == 10 and "model_agreement" not in p
    hs.tl.domains(adata_graph, n_clusters=3, ensemble="vote", key_added="vote")
    p = adata_graph.uns["vote"]["params"]
    assert p["n_models"] == 3 and p["n_pcs"] == 4 and "model_agreement" in p


def test_other_tools_n_models_not_read(adata_rep):
    # mclSTExp records the size of its ensemble under uns['mclstexp'], but obsm['X_mclstexp'] is one embedding
    adata_rep.obsm["X_mclstexp"] = adata_rep.obsm["X_stereomm"]
    adata_rep.uns["mclstexp"] = {"params": {"n_models": 5, "embedding_key": "X_mclstexp"}}
    hs.tl.domains(adata_rep, use_rep="X_mclstexp", n_clusters=3)
    assert adata_rep.uns["mclstexp_domain"]["params"]["n_models"] == 1
