"""Bad input found by an independent run of the public API (issue #13): each case raises before any work, with the
exception type, a message naming the slot or file and the fix, and the AnnData left unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest

import histospace as hs

TINY = {"n_heads": 2, "dim_head": 8, "projection_dim": 16}
FIT = {"max_epochs": 2, "batch_size": 32, "n_models": 1, "device": "cpu", "progress_bar": False}
FEAT = {"encoder": "mobilenet_v2", "weights": None, "input_size": 32, "progress_bar": False, "device": "cpu"}


def _state(adata):
    return (
        set(adata.obsm),
        set(adata.uns),
        set(adata.obs),
        set(adata.layers),
        {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
    )


def _unchanged(adata, state):
    obsm, uns, obs, layers, arrays = state
    assert (set(adata.obsm), set(adata.uns), set(adata.obs), set(adata.layers)) == (obsm, uns, obs, layers)
    for k, v in arrays.items():
        np.testing.assert_array_equal(np.asarray(adata.obsm[k]), v)


@pytest.fixture(scope="module")
def model(adata_module):
    return hs.models.MclSTExp(adata_module, genes=list(adata_module.var_names), **TINY).train(**FIT)


# ---- 1. training that diverges stops; NaN embeddings are refused ------------------------------------------------------
def test_mclstexp_divergence_stops_training(adata):
    m = hs.models.MclSTExp(adata, **TINY)
    with pytest.raises(FloatingPointError, match=r"MclSTExp loss became nan at epoch \d+.*lower learning rate"):
        m.train(**{**FIT, "lr": 1e6, "max_epochs": 5})
    assert not m.is_trained


def test_prediction_refuses_nan_embeddings(model, adata):
    model.reference_embeddings = model.reference_embeddings.copy()
    saved = model.reference_embeddings[0, 0]
    model.reference_embeddings[0, 0] = np.nan
    state = _state(adata)
    try:
        with pytest.raises(ValueError, match="reference embeddings.*NaN"):
            hs.tl.mclstexp_predict(adata, model=model, n_neighbors=5)
        with pytest.raises(ValueError, match="`emb`.*NaN"):
            model.predict_from_embedding(np.full((2, 16), np.nan, np.float32), n_neighbors=3)
    finally:
        model.reference_embeddings[0, 0] = saved
    _unchanged(adata, state)


# ---- 3. key_added is type-checked ---------------------------------------------------------------------------------
def test_key_added_must_be_a_string(adata_graph, model):
    state = _state(adata_graph)
    with pytest.raises(TypeError, match="key_added"):
        hs.pp.image_features(adata_graph, key_added=3, **FEAT)
    adata_graph.obsm["X_stereomm"] = np.random.default_rng(0).normal(size=(adata_graph.n_obs, 4)).astype(np.float32)
    state = _state(adata_graph)
    with pytest.raises(TypeError, match="key_added"):
        hs.tl.domains(adata_graph, n_clusters=3, key_added=1)
    with pytest.raises(TypeError, match="key_added"):
        hs.tl.mclstexp_predict(adata_graph, model=model, n_neighbors=5, key_added=0)
    _unchanged(adata_graph, state)


# ---- 4. damaged save folders name the file; torch.load with weights_only ------------------------------------------
@pytest.mark.parametrize("damaged", ["params.json", "model.pt", "reference.npz"])
def test_damaged_save_folder_names_the_file(model, tmp_path, damaged):
    model.save(tmp_path / "m")
    f = tmp_path / "m" / damaged
    f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])  # truncated
    with pytest.raises(ValueError, match=rf"`{damaged}` in .*m is damaged.*Save the model again"):
        hs.models.MclSTExp.load(tmp_path / "m")


def test_stereomm_damaged_params(adata_graph, tmp_path):
    m = hs.models.StereoMM(adata_graph, hidden=[8], n_latent=4).train(max_epochs=1, progress_bar=False)
    m.save(tmp_path / "s")
    (tmp_path / "s" / "params.json").write_text('{"init": {')
    with pytest.raises(ValueError, match="params.json.*damaged"):
        hs.models.StereoMM.load(tmp_path / "s", adata=adata_graph)
    (tmp_path / "s" / "params.json").write_text(json.dumps({"class": "MclSTExp", "init": {}}))
    with pytest.raises(ValueError, match="holds a MclSTExp model"):
        hs.models.StereoMM.load(tmp_path / "s", adata=adata_graph)


def test_model_files_are_read_with_weights_only(model, tmp_path, monkeypatch):
    import torch

    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real(*a, **k))
    model.save(tmp_path / "m")
    hs.models.MclSTExp.load(tmp_path / "m")
    assert calls and all(calls)


# ---- 5. width checks of public MclSTExp methods; an empty automatic panel ------------------------------------------
def test_mclstexp_methods_check_widths(model):
    with pytest.raises(ValueError, match=r"`features` has shape \(4, 3\).*16-d image features"):
        model.get_image_embedding(features=np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"`emb` has shape \(4, 5\); expected \(n, 16\)"):
        model.predict_from_embedding(np.zeros((4, 5), np.float32), n_neighbors=3)


def test_empty_gene_panel_is_named(adata):
    two = adata[:2].copy()
    with pytest.raises(ValueError, match="gene panel is empty.*genes="):
        hs.models.MclSTExp(two, **TINY)


# ---- 6. numbers that got past validation ---------------------------------------------------------------------------
def test_numbers(adata_graph, model):
    state = _state(adata_graph)
    with pytest.raises(ValueError, match="patch_size.*positive number.*inf"):
        hs.pp.image_features(adata_graph, patch_size=np.inf, **FEAT)
    with pytest.raises(ValueError, match="larger than the whole image.*smaller `patch_size`"):
        hs.pp.image_features(adata_graph, patch_size=1e6, **FEAT)
    with pytest.raises(ValueError, match="batch_size"):
        hs.tl.mclstexp_predict(adata_graph, model=model, n_neighbors=5, batch_size=0)
    adata_graph.obsm["X_stereomm"] = np.random.default_rng(0).normal(size=(adata_graph.n_obs, 4)).astype(np.float32)
    state = _state(adata_graph)
    with pytest.raises(ValueError, match="n_pcs.*positive int"):
        hs.tl.domains(adata_graph, n_clusters=3, n_pcs=0)
    one = adata_graph[:1].copy()
    with pytest.raises(ValueError, match="1 spot.*at least 2"):
        hs.tl.domains(one, n_clusters=1, refine=False)
    _unchanged(adata_graph, state)
    # numpy scalars are numbers
    out = hs.pp.image_features(adata_graph, mean=np.float32(0.5), std=np.float64(0.5), copy=True, **FEAT)
    np.testing.assert_allclose(out.uns["img_features"]["params"]["mean"], 0.5)


def test_string_expression_names_x(adata_graph):
    a = adata_graph.copy()
    a.X = a.X.toarray().astype(str)
    with pytest.raises(TypeError, match=r"`adata.X` has dtype <U.*expected numbers"):
        hs.models.StereoMM(a, hidden=[8], n_latent=4)
    with pytest.raises(TypeError, match=r"`adata.X` has dtype"):
        hs.models.MclSTExp(a, **TINY)


# ---- issue #24 (11): piped progress writes one line per bar; one warning per problem --------------------------------
def test_piped_dense_features_write_one_line_per_bar(adata, capsys):
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the dense method needs padded convolutions
        enc = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    dense = {**FEAT, "encoder": enc, "method": "dense", "tile_size": 64, "progress_bar": True}
    capsys.readouterr()
    hs.pp.image_features(adata, **dense)  # capsys: stderr is not a terminal, as in `histospace domains 2> log`
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if "dense features" in line]
    assert len(lines) == 1 and "100%" in lines[0], err


def test_no_tqdm_outside_the_progress_helper():
    # every bar goes through `_utils._progress.progress` (one line per bar when stderr is not a terminal)
    from pathlib import Path

    src = Path(hs.__file__).parent
    direct = [
        str(f.relative_to(src))
        for f in src.rglob("*.py")
        if f.name != "_progress.py" and ("from tqdm" in f.read_text() or "import tqdm" in f.read_text())
    ]
    assert direct == []


def test_isolated_spots_warned_once(adata):
    import warnings

    # a hole of 3 x 3 spots around one spot: with a 150 px radius (pitch 100) that spot has no neighbour
    r, c = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    hole = (np.abs(r - 2) <= 1) & (np.abs(c - 2) <= 1) & ~((r == 2) & (c == 2))
    a = adata[~hole].copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hs.pp.spatial_graph(a, radius=150)
        hs.tl.stereomm(a, hidden=[8], n_latent=4, max_epochs=1, device="cpu", progress_bar=False)
    about = [str(w.message) for w in caught if "neighbour" in str(w.message)]
    assert len(about) == 1 and "1 of 56 spots" in about[0] and "bigger `radius_um`/`radius`" in about[0], about
    # a graph not built by hs.pp.spatial_graph (no record of the warning): the model warns
    del a.uns["spatial_neighbors"]
    with pytest.warns(UserWarning, match=r"1 of 56 spots .* no neighbour in `adata.obsp\['spatial_connectivities'\]`"):
        hs.tl.stereomm(a, hidden=[8], n_latent=4, max_epochs=1, device="cpu", progress_bar=False)
