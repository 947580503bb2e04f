"""The demo's trained-model cache (`histospace._cli_demo_cache`): reused only for the same data, options and code."""

from __future__ import annotations

import numpy as np
import pytest

import histospace as hs
from histospace import _cli_demo_cache as demo_cache

STEREOMM = {"max_epochs": 2, "n_models": 1, "device": "cpu", "progress_bar": False}
MCLSTEXP = {
    "model_kwargs": {"n_heads": 2, "dim_head": 8, "projection_dim": 16},
    "max_epochs": 2,
    "batch_size": 32,
    "n_models": 1,
    "device": "cpu",
    "progress_bar": False,
}


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOSPACE_CACHE", str(tmp_path / "cache"))


def test_stereomm_reused_for_the_same_run_only(adata_graph):
    first = adata_graph.copy()
    assert demo_cache.stereomm(first, use_cache=True, **STEREOMM) is False
    assert len(list(demo_cache.demo_cache_dir().glob("stereomm_*.h5ad"))) == 1
    again = adata_graph.copy()
    assert demo_cache.stereomm(again, use_cache=True, **STEREOMM) is True
    np.testing.assert_array_equal(again.obsm["X_stereomm"], first.obsm["X_stereomm"])
    hs.tl.domains(first, n_clusters=3)
    hs.tl.domains(again, n_clusters=3)
    np.testing.assert_array_equal(again.obs["stereomm_domain"], first.obs["stereomm_domain"])
    # other options, other data: trained anew
    other = adata_graph.copy()
    assert demo_cache.stereomm(other, use_cache=True, **(STEREOMM | {"random_state": 1})) is False
    changed = adata_graph.copy()
    changed.X = changed.X * 2
    assert demo_cache.stereomm(changed, use_cache=True, **STEREOMM) is False
    # without the cache nothing is read or written
    before = sorted(demo_cache.demo_cache_dir().iterdir())
    plain = adata_graph.copy()
    assert demo_cache.stereomm(plain, use_cache=False, **STEREOMM) is False
    assert sorted(demo_cache.demo_cache_dir().iterdir()) == before


def test_stereomm_damaged_entry_is_retrained(adata_graph):
    demo_cache.stereomm(adata_graph.copy(), use_cache=True, **STEREOMM)
    (entry,) = demo_cache.demo_cache_dir().glob("stereomm_*.h5ad")
    entry.write_bytes(b"not an h5ad")
    a = adata_graph.copy()
    assert demo_cache.stereomm(a, use_cache=True, **STEREOMM) is False
    assert a.obsm["X_stereomm"].shape[0] == a.n_obs


def test_mclstexp_model_reused_predicts_the_same(adata):
    genes = list(adata.var_names)
    m1, reused1 = demo_cache.mclstexp_train(adata, use_cache=True, genes=genes, **MCLSTEXP)
    m2, reused2 = demo_cache.mclstexp_train(adata, use_cache=True, genes=genes, **MCLSTEXP)
    assert (reused1, reused2) == (False, True)
    q1, q2 = adata.copy(), adata.copy()
    hs.tl.mclstexp_predict(q1, model=m1, n_neighbors=5)
    hs.tl.mclstexp_predict(q2, model=m2, n_neighbors=5)
    np.testing.assert_array_equal(q1.layers["mclstexp"], q2.layers["mclstexp"])
    _, reused3 = demo_cache.mclstexp_train(adata, use_cache=True, genes=genes[:10], **MCLSTEXP)
    assert reused3 is False


def test_key_follows_the_code(monkeypatch):
    k = demo_cache.training_key("x", np.arange(3))
    assert k == demo_cache.training_key("x", np.arange(3))
    assert k != demo_cache.training_key("x", np.arange(4))
    monkeypatch.setattr(demo_cache, "_source_digest", lambda: "other code")
    assert k != demo_cache.training_key("x", np.arange(3))
