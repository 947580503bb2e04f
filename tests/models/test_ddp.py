"""Training on several processes (`devices=N`, torch.distributed DDP with gloo on the CPU)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import squidpy as sq
import torch
import torch.distributed as dist

import histospace as hs
from histospace.models import _ddp as ddp

STEREOMM = {"hidden": [8], "n_latent": 4}
STEREOMM_FIT = {"max_epochs": 3, "n_models": 1, "device": "cpu", "progress_bar": False}
MCLSTEXP = {"n_heads": 2, "dim_head": 8, "projection_dim": 16, "n_top_genes": 20}
MCLSTEXP_FIT = {"max_epochs": 2, "batch_size": 16, "n_models": 1, "device": "cpu", "progress_bar": False}


@pytest.fixture
def slide(make_slide):
    """100 spots with a grid graph."""
    a = make_slide(n_side=10)
    sq.gr.spatial_neighbors_grid(a, n_neighs=4)
    return a


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_worker(rank: int, world: int, port: int, a, out: str) -> None:
    """A rank of a process group made by the caller (as under torchrun): train with `devices=world` in it."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        runs = [hs.models.StereoMM(a, **STEREOMM).train(**STEREOMM_FIT, devices=world) for _ in range(2)]
        z = [m.get_latent_representation() for m in runs]
        no_image = hs.models.StereoMM(a, features_key=None, **STEREOMM).train(**STEREOMM_FIT, devices=world)
        contrastive = hs.models.StereoMM(a, contrastive_weight=0.5, **STEREOMM).train(**STEREOMM_FIT, devices=world)
        mcl = hs.models.MclSTExp(a, **MCLSTEXP).train(**MCLSTEXP_FIT, devices=world)
        assert dist.is_initialized()  # the caller's group is left alone
        if rank == 0:
            torch.save(
                {
                    "z": z,
                    "params": runs[0].train_params,
                    "no_image": no_image.get_latent_representation(),
                    "contrastive": contrastive.get_latent_representation(),
                    "contrastive_loss": contrastive.history["loss"],
                    "mcl": mcl.predict(a, n_neighbors=5),
                    "mcl_loss": mcl.history["loss"],
                },
                out,
            )
    finally:
        dist.destroy_process_group()


def test_check_devices_names_the_argument(slide):
    a = slide
    model = hs.models.StereoMM(a, **STEREOMM)
    with pytest.raises(ValueError, match="devices"):
        model.train(**STEREOMM_FIT, devices=0)
    assert not model.is_trained


def test_devices_1_is_one_process(slide):
    a = slide
    model = hs.models.StereoMM(a, **STEREOMM).train(**STEREOMM_FIT)
    assert not dist.is_initialized()
    assert model.train_params["devices"] == 1 and model.train_params["backend"] == "none"
    again = hs.models.StereoMM(a, **STEREOMM).train(**STEREOMM_FIT, devices=1)
    np.testing.assert_array_equal(model.get_latent_representation(), again.get_latent_representation())


def test_shard_pads_like_distributed_sampler():
    batches = list("abcde")
    r0, r1 = (ddp.shard(batches, ddp.Group(r, 2, "gloo")) for r in (0, 1))
    assert r0 == ["a", "c", "e"] and r1 == ["b", "d", "a"]  # every batch once, padded to equal steps
    assert ddp.shard([], ddp.Group(0, 2, "gloo")) == []


@pytest.mark.slow
def test_two_processes_same_seed_same_model(slide, tmp_path):
    """In a process group (torchrun's case) and spawned by histospace: the same seed and N give the same model."""
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_group_worker, args=(2, _free_port(), slide, str(out)), nprocs=2, join=True)
    res = torch.load(out, weights_only=False)
    np.testing.assert_array_equal(res["z"][0], res["z"][1])
    assert res["params"]["devices"] == 2 and res["params"]["backend"] == "gloo"
    assert res["params"]["batch_size"] == 50  # the full batch split into one tile per process
    assert np.isfinite(res["no_image"]).all() and np.isfinite(res["mcl"]).all()
    assert np.isfinite(res["contrastive"]).all() and np.isfinite(res["contrastive_loss"]).all()
    assert not np.allclose(res["contrastive"], res["z"][0])  # the term changed the training of the same seed
    assert len(res["mcl_loss"]) == 2 and np.isfinite(res["mcl_loss"]).all()
    # histospace spawns the two processes itself: the same model as inside the caller's group
    a = slide
    torch.set_num_threads(1)  # as the ranks: the same preprocessing (PCA) and latent to the bit
    spawned = hs.tl.stereomm(a, **STEREOMM, **STEREOMM_FIT, devices=2, return_model=True)
    np.testing.assert_array_equal(a.obsm["X_stereomm"], res["z"][0])
    params = a.uns["stereomm"]["params"]
    assert params["devices"] == 2 and params["backend"] == "gloo" and params["spawned"]
    assert spawned.is_trained and spawned.device == torch.device("cpu")
