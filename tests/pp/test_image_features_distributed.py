"""`hs.pp.image_features` on a dask.distributed cluster: same features as the local run, recorded in the params."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from torch import nn

import histospace as hs

distributed = pytest.importorskip("distributed")

with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)
    TINY = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
    PADDED = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
FAST = {"encoder": TINY, "weights": None, "input_size": 32, "progress_bar": False, "device": "cpu"}

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def client():
    """Two in-process workers of one thread each (a process cluster is tested with the cohort command)."""
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def test_cluster_features_equal_local(adata_two_slides, client, tmp_path):
    local = hs.pp.image_features(adata_two_slides, library_key="library_id", client=False, copy=True, **FAST)
    assert "distributed" not in local.uns["img_features"]["params"]
    out = hs.pp.image_features(
        adata_two_slides, library_key="library_id", client=client, task_size=10, copy=True, **FAST
    )
    np.testing.assert_allclose(out.obsm["img_features"], local.obsm["img_features"], atol=1e-5, rtol=0)
    assert np.abs(out.obsm["img_features"] - local.obsm["img_features"]).max() <= 1e-5
    rec = out.uns["img_features"]["params"]["distributed"]
    assert rec["scheduler"] == client.scheduler.address
    assert rec["n_workers"] == 2
    assert rec["task_size"] == 10
    n_per_slide = [int((adata_two_slides.obs["library_id"] == s).sum()) for s in ("s1", "s2")]
    assert rec["n_tasks"] == sum(-(-n // 10) for n in n_per_slide)
    out.write_h5ad(tmp_path / "x.h5ad")  # the record survives a round trip
    assert ad.read_h5ad(tmp_path / "x.h5ad").uns["img_features"]["params"]["distributed"]["n_workers"] == 2
    # the per-slide records are the local run's (image, scale)
    for k in ("image", "scale", "patch_size_px"):
        assert out.uns["img_features"]["params"][k] == local.uns["img_features"]["params"][k]


def test_active_client_is_used_and_false_forces_local(adata, client):
    out = hs.pp.image_features(adata, copy=True, **FAST)  # client=None: the active client
    assert out.uns["img_features"]["params"]["distributed"]["n_workers"] == 2
    local = hs.pp.image_features(adata, client=False, copy=True, **FAST)
    assert "distributed" not in local.uns["img_features"]["params"]
    np.testing.assert_allclose(out.obsm["img_features"], local.obsm["img_features"], atol=1e-5, rtol=0)


def test_dense_and_context_on_cluster(adata, client):
    kw = {**FAST, "encoder": PADDED, "method": "dense", "context": 2.0}
    local = hs.pp.image_features(adata, client=False, copy=True, **kw)
    out = hs.pp.image_features(adata, client=client, copy=True, **kw)
    np.testing.assert_allclose(out.obsm["img_features"], local.obsm["img_features"], atol=1e-5, rtol=0)
    assert out.uns["img_features"]["params"]["distributed"]["n_tasks"] == 1  # one slide, one dense task
    assert out.uns["img_features"]["params"]["method"] == "dense"


def test_in_memory_image_and_pca_on_cluster(adata, client):
    img = np.asarray(adata.uns["spatial"]["lib"]["images"]["hires"])
    scale = adata.uns["spatial"]["lib"]["scalefactors"]["tissue_hires_scalef"]
    kw = {**FAST, "img": img, "img_scale": scale, "n_components": 4, "patch_size": 40}
    local = hs.pp.image_features(adata, client=False, copy=True, **kw)
    out = hs.pp.image_features(adata, client=client, task_size=16, copy=True, **kw)
    np.testing.assert_allclose(out.obsm["img_features"], local.obsm["img_features"], atol=1e-4, rtol=0)
    assert out.obsm["img_features"].shape == (adata.n_obs, 4)


def test_bad_client_raises_before_writing(adata):
    before = set(adata.uns)
    with pytest.raises(TypeError, match="`client` must be a `distributed.Client`"):
        hs.pp.image_features(adata, client="tcp://nowhere:8786", **FAST)
    assert set(adata.uns) == before


def test_unpicklable_image_is_computed_here_with_a_warning(tmp_path, client):
    from spatialdata import SpatialData

    tissue = hs.datasets.simulate_tissue(width_um=128, height_um=128, random_state=0)
    path = hs.datasets.write_wsi(tmp_path / "s.tif", tissue, mpp=1.0, tile=128)
    sdata = SpatialData()
    hs.io.add_image(sdata, path, image_key="he")  # tifffile's zarr store holds a lock: it does not pickle
    hs.pp.tile_image(sdata, tile_size=16, tissue_only=False)
    local = hs.pp.image_features(sdata, table_key="tiles", client=False, copy=True, patch_size=16, **FAST)
    with pytest.warns(UserWarning, match="cannot be sent to the dask workers"):
        out = hs.pp.image_features(sdata, table_key="tiles", client=client, copy=True, patch_size=16, **FAST)
    out, local = out.tables["tiles"], local.tables["tiles"]
    np.testing.assert_allclose(out.obsm["img_features"], local.obsm["img_features"], atol=1e-5, rtol=0)
    assert out.uns["img_features"]["params"]["distributed"]["local_libraries"] == ["tiles_squares"]


def test_failed_run_releases_the_cluster(adata, client, monkeypatch):
    """A run that fails mid-way forgets its scattered encoder and slides (the workers release them), writes nothing."""
    import importlib

    from histospace._image.features import _distributed

    module = importlib.import_module("histospace.pp._image_features")

    closed = []
    monkeypatch.setattr(_distributed.FeatureCluster, "close", lambda self: closed.append(self))

    def fail(*args, cluster=None, **kw):
        cluster.start(nn.Identity(), adata.n_obs)
        raise RuntimeError("a worker died")

    monkeypatch.setattr(module, "compute_features", fail)
    before = set(adata.obsm)
    with pytest.raises(RuntimeError, match="a worker died"):
        hs.pp.image_features(adata, client=client, **FAST)
    assert len(closed) == 1
    assert set(adata.obsm) == before
