"""Tests of hs.models.MclSTExp (and its internal torch modules)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import histospace as hs
from histospace._nn._mclstexp import MclSTExpModule, ProjectionHead, clip_loss

TINY = {"n_heads": 2, "dim_head": 8, "projection_dim": 16, "n_top_genes": 20}
FIT = {"max_epochs": 2, "batch_size": 32, "n_models": 1, "device": "cpu", "progress_bar": False}


def test_module_shapes_and_loss():
    m = MclSTExpModule(n_genes=12, img_dim=7, n_x=5, n_y=6, n_heads=2, dim_head=4, projection_dim=8)
    img = torch.randn(10, 7)
    expr = torch.randn(10, 12)
    pos = torch.stack([torch.randint(0, 5, (10,)), torch.randint(0, 6, (10,))], dim=1)
    assert m.embed_image(img).shape == (10, 8)
    assert m.embed_spot(expr, pos).shape == (10, 8)
    loss = m(img, expr, pos)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert m.spot_encoder.x_embed.weight.grad is not None
    # position tables sized to the data, not 65,536 rows
    assert m.spot_encoder.x_embed.num_embeddings == 5 and m.spot_encoder.y_embed.num_embeddings == 6
    head = ProjectionHead(7, 8)
    assert head(img).shape == (10, 8)
    # perfect alignment gives a lower loss than a random pairing
    z = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    assert clip_loss(z, z, 10.0) < clip_loss(z, z[torch.randperm(6)], 10.0) + 1e-6


def test_model_train_history_and_reference(adata):
    model = hs.models.MclSTExp(adata, **TINY)
    assert not model.is_trained
    model.train(**FIT)
    assert model.is_trained
    assert len(model.history["loss"]) == 2 and np.isfinite(model.history["loss"]).all()
    assert model.reference_embeddings.shape == (adata.n_obs, 16)
    assert model.reference_expression.shape == (adata.n_obs, len(model.genes))
    assert model.reference_expression.dtype == np.float32
    assert model.n_x == adata.obs["array_col"].max() + 1 and model.n_y == adata.obs["array_row"].max() + 1
    pred = model.predict(adata, n_neighbors=5)
    assert pred.shape == (adata.n_obs, len(model.genes)) and pred.dtype == np.float32
    assert "MclSTExp" in repr(model)


def test_model_genes_given_and_normalisation(adata):
    genes = list(adata.var_names[:10])
    model = hs.models.MclSTExp(adata, genes=genes, normalize="log10_cp10k", **TINY)
    assert model.genes == genes
    x = np.asarray(adata[:, genes].X.toarray(), dtype=np.float64)
    expected = np.log10(1 + 1e4 * x / x.sum(1, keepdims=True))
    np.testing.assert_allclose(model.reference_expression, expected, rtol=1e-5)


def test_model_determinism(adata):
    genes = list(adata.var_names)
    model = hs.models.MclSTExp(adata, genes=genes, **TINY)
    a = model.train(random_state=3, **FIT).predict(adata, n_neighbors=5)
    b = hs.models.MclSTExp(adata, genes=genes, **TINY).train(random_state=3, **FIT).predict(adata, n_neighbors=5)
    c = model.train(random_state=4, **FIT).predict(adata, n_neighbors=5)  # retraining re-seeds the weights
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_model_save_load(adata, tmp_path):
    model = hs.models.MclSTExp(adata, l2_normalize=True, learn_temperature=True, temperature=0.1, **TINY)
    model.train(**FIT)
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite"):
        model.save(tmp_path / "m")
    loaded = hs.models.MclSTExp.load(tmp_path / "m")
    assert loaded.genes == model.genes and loaded.history == model.history
    q = adata[:, []].copy()  # no expression needed to predict
    assert q.n_vars == 0
    np.testing.assert_array_equal(loaded.predict(q, n_neighbors=7), model.predict(adata, n_neighbors=7))
    with pytest.raises(FileNotFoundError, match="MclSTExp.save"):
        hs.models.MclSTExp.load(tmp_path / "nothing")


def test_model_expression_rank(adata, tmp_path):
    """Predictions from the reference expression on its first principal axes: the default 16, off with the preset."""
    import json

    genes = list(adata.var_names)  # 30 genes: rank 16 is a real reduction
    assert hs.models.MclSTExp(adata, genes=genes, **TINY).expression_rank == 16
    assert hs.models.MclSTExp(adata, genes=genes, preset="reference", **TINY).expression_rank == 0
    for bad in (-1, 1.5, "16", False):  # a bool is not a rank (False was taken as 0 before)
        with pytest.raises((ValueError, TypeError), match="expression_rank"):
            hs.models.MclSTExp(adata, genes=genes, expression_rank=bad, **TINY)
    model = hs.models.MclSTExp(adata, genes=genes, expression_rank=4, **TINY).train(random_state=0, **FIT)
    y = model.reference_expression.astype(np.float64)
    low = model.reference.expression_at_rank(4)
    # by hand: the centred reference on its first 4 right singular vectors, clipped to each gene's range
    v = np.linalg.svd(y - y.mean(0), full_matrices=False)[2][:4]
    by_hand = np.clip((y - y.mean(0)) @ v.T @ v + y.mean(0), y.min(0), y.max(0))
    np.testing.assert_allclose(low, by_hand, atol=1e-4)
    assert low.dtype == np.float32 and not np.allclose(low, y, atol=1e-3)
    # the prediction is the weighted mean of the low-rank reference rows: rank 0 on those rows gives it back
    emb = model.get_image_embedding(adata)
    pred = model.predict_from_embedding(emb, n_neighbors=7)
    model.expression_rank = 0
    raw = model.predict_from_embedding(emb, n_neighbors=7)
    assert not np.allclose(pred, raw, atol=1e-4)
    model.reference.expression, y32 = low, model.reference.expression
    np.testing.assert_allclose(model.predict_from_embedding(emb, n_neighbors=7), pred, atol=1e-5)
    model.reference.expression, model.expression_rank = y32, 4
    # a rank that spans every axis leaves the expression as measured
    np.testing.assert_array_equal(model.reference.expression_at_rank(len(genes)), model.reference_expression)
    # saved and loaded: the same rank, the same axes, the same predictions; a model saved before the option had
    # none and keeps predicting from the expression as measured
    model.save(tmp_path / "m")
    loaded = hs.models.MclSTExp.load(tmp_path / "m")
    assert loaded.expression_rank == 4
    np.testing.assert_array_equal(loaded.predict(adata, n_neighbors=7), model.predict(adata, n_neighbors=7))
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    del params["init"]["expression_rank"]
    (tmp_path / "m" / "params.json").write_text(json.dumps(params))
    old = hs.models.MclSTExp.load(tmp_path / "m")
    assert old.expression_rank == 0
    model.expression_rank = 0
    np.testing.assert_array_equal(old.predict(adata, n_neighbors=7), model.predict(adata, n_neighbors=7))


def test_model_seed_ensemble(adata, tmp_path):
    genes = list(adata.var_names)
    ens = hs.models.MclSTExp(adata, genes=genes, **TINY).train(random_state=3, **{**FIT, "n_models": 3})
    assert ens.n_models_ == 3 and len(ens._members) == 3 and "3 models" in repr(ens)
    singles = [hs.models.MclSTExp(adata, genes=genes, **TINY).train(random_state=s, **FIT) for s in (3, 4, 5)]
    preds = [m.predict(adata, n_neighbors=5) for m in singles]
    # the ensemble predicts the mean of the members, each a fresh model from seeds 3, 4, 5
    np.testing.assert_allclose(ens.predict(adata, n_neighbors=5), np.mean(preds, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ens.history["loss"], np.mean([m.history["loss"] for m in singles], axis=0), rtol=1e-6)
    # after training and after predicting, the model exposes its first member
    np.testing.assert_array_equal(ens.reference_embeddings, singles[0].reference_embeddings)
    assert ens.smooth_predictions == 0.0  # the default; predict_from_embedding does not smooth
    first = ens.predict_from_embedding(ens.get_image_embedding(adata), n_neighbors=5)
    np.testing.assert_array_equal(first, singles[0].predict(adata, n_neighbors=5))
    # same seed -> same ensemble; save/load keeps every member
    again = hs.models.MclSTExp(adata, genes=genes, **TINY).train(random_state=3, **{**FIT, "n_models": 3})
    np.testing.assert_array_equal(again.predict(adata, n_neighbors=5), ens.predict(adata, n_neighbors=5))
    ens.save(tmp_path / "ens")
    loaded = hs.models.MclSTExp.load(tmp_path / "ens")
    assert loaded.n_models_ == 3
    np.testing.assert_array_equal(loaded.predict(adata, n_neighbors=5), ens.predict(adata, n_neighbors=5))
    # overwriting with a single model drops the members file
    singles[0].save(tmp_path / "ens", overwrite=True)
    assert not (tmp_path / "ens" / "members.pt").exists()
    np.testing.assert_array_equal(hs.models.MclSTExp.load(tmp_path / "ens").predict(adata, n_neighbors=5), preds[0])
    (tmp_path / "ens2").mkdir()
    ens.save(tmp_path / "ens2", overwrite=True)
    (tmp_path / "ens2" / "members.pt").unlink()
    with pytest.raises(FileNotFoundError, match="members.pt"):
        hs.models.MclSTExp.load(tmp_path / "ens2")
    for bad, error in ((0, ValueError), (-1, ValueError), (1.5, ValueError), (True, TypeError)):
        with pytest.raises(error, match="n_models"):
            hs.models.MclSTExp(adata, genes=genes, **TINY).train(**{**FIT, "n_models": bad})


def test_model_bleep_variant(adata):
    model = hs.models.MclSTExp(adata, spot_encoder="none", use_positions=False, **TINY).train(**FIT)
    assert len(model.module.spot_encoder.blocks) == 0
    assert not hasattr(model.module.spot_encoder, "x_embed")
    assert model.predict(adata, n_neighbors=3).shape[0] == adata.n_obs


def test_model_augment_keys(adata):
    a = adata.copy()
    a.obsm["flipped"] = a.obsm["img_features"] + 0.1
    model = hs.models.MclSTExp(a, augment_keys=["flipped"], genes=list(a.var_names), **TINY).train(**FIT)
    assert model.init_params_["augment_keys"] == ["flipped"]
    assert model.predict(a, n_neighbors=5).shape == (a.n_obs, a.n_vars)
    a.obsm["bad"] = a.obsm["img_features"][:, :3]
    with pytest.raises(ValueError, match="bad"):
        hs.models.MclSTExp(a, augment_keys=["bad"], **TINY)
    with pytest.raises(KeyError, match="missing.*augment_keys"):
        hs.models.MclSTExp(a, augment_keys=["missing"], **TINY)


def test_model_positions_fallback(adata):
    a = adata.copy()
    del a.obs["array_row"], a.obs["array_col"]
    model = hs.models.MclSTExp(a, **TINY)
    assert model.n_x == 8 and model.n_y == 8  # quantised from the 100-px pitch of obsm['spatial']
    del a.obsm["spatial"]
    with pytest.raises(KeyError, match="array_row"):
        hs.models.MclSTExp(a, **TINY)
    hs.models.MclSTExp(a, use_positions=False, **TINY)  # works without positions when not used


def test_model_bad_input(adata, adata_two_slides):
    before = adata.copy()
    with pytest.raises(KeyError, match="nope.*hs.pp.image_features"):
        hs.models.MclSTExp(adata, features_key="nope", **TINY)
    with pytest.raises(KeyError, match="var_names"):
        hs.models.MclSTExp(adata, genes=["gene0", "NOT_A_GENE"], **TINY)
    bad = adata.copy()
    bad.obsm["img_features"][0, 0] = np.nan
    with pytest.raises(ValueError, match="img_features.*NaN"):
        hs.models.MclSTExp(bad, **TINY)
    bad = adata.copy()
    bad.X = bad.X.toarray()
    bad.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="adata.X.*NaN"):
        hs.models.MclSTExp(bad, **TINY)
    with pytest.raises(ValueError, match="normalize"):
        hs.models.MclSTExp(adata, normalize="cpm", **TINY)
    # panel genes missing from a slide (outer join filled with zeros)
    two = adata_two_slides.copy()
    two.X = two.X.toarray()
    two.X[two.obs["library_id"] == "s2", :20] = 0
    with pytest.raises(ValueError, match="missing from that slide"):
        hs.models.MclSTExp(two, genes=list(two.var_names[:20]), **TINY)
    with pytest.raises(RuntimeError, match="train"):
        hs.models.MclSTExp(adata, **TINY).predict(adata)
    assert adata.obsm.keys() == before.obsm.keys() and adata.uns.keys() == before.uns.keys()
    np.testing.assert_array_equal(adata.X.toarray(), before.X.toarray())


def test_model_fine_tune_path(adata, tmp_path):
    """freeze_encoder=False: patches from the hires image, a tiny encoder, augmentation, 1 epoch."""

    def tiny_encoder():
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )

    enc = tiny_encoder()
    model = hs.models.MclSTExp(adata, freeze_encoder=False, encoder=enc, patch_size=60, input_size=16, **TINY)
    w0 = enc[0].weight.detach().clone()
    model.train(max_epochs=1, batch_size=32, n_models=1, device="cpu", progress_bar=False)
    assert not torch.equal(w0, enc[0].weight)  # the (wrapped) encoder was fine-tuned in place
    q = adata.copy()
    del q.obsm["img_features"]  # the image, not the features, is used
    pred = model.predict(q, n_neighbors=5)
    assert pred.shape == (adata.n_obs, len(model.genes)) and np.isfinite(pred).all()
    model.save(tmp_path / "ft")
    with pytest.raises(ValueError, match="encoder="):
        hs.models.MclSTExp.load(tmp_path / "ft")
    loaded = hs.models.MclSTExp.load(tmp_path / "ft", encoder=tiny_encoder())
    np.testing.assert_allclose(loaded.predict(q, n_neighbors=5), pred, rtol=1e-5, atol=1e-6)
    # `img=` per library (a dict), cut with the shared cropping helpers; a library missing from the dict is an error
    lib = str(adata.obs["library_id"].iloc[0])
    hires = adata.uns["spatial"][lib]["images"]["hires"]
    pred_img = model.predict(q, n_neighbors=5, img={lib: hires})
    assert pred_img.shape == pred.shape and np.isfinite(pred_img).all()
    with pytest.raises(KeyError, match="img"):
        model.predict(q, n_neighbors=5, img={"other": hires})


@pytest.mark.gpu
def test_model_cuda(adata):
    model = hs.models.MclSTExp(adata, **TINY).train(max_epochs=2, device="cuda", progress_bar=False)
    assert model.device.type == "cuda"
    pred = model.predict(adata, n_neighbors=5)
    assert isinstance(pred, np.ndarray) and np.isfinite(pred).all()
