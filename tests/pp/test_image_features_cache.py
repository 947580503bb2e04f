"""Tests of `hs.pp.image_features`' `preset=` and `cache=`, `hs.pp.feature_cache_dir` / `clear_feature_cache`, and the
batched dihedral mean (tiny synthetic data, random-init MobileNetV2 at 32 px)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from torch import nn

import histospace as hs
from histospace import _image as wing
from histospace._image.features import _compute, _patch

MOBILENET = {"encoder": "mobilenet_v2", "weights": None, "input_size": 32, "progress_bar": False, "device": "cpu"}


def _entries(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.npz"))


def _snapshot(adata):
    return set(adata.obsm), set(adata.uns), adata.obs.copy()


def _assert_unchanged(adata, snap):
    assert set(adata.obsm) == snap[0]
    assert set(adata.uns) == snap[1]
    assert adata.obs.equals(snap[2])


def _no_crops(monkeypatch):
    """Make any patch crop and any method choice ('auto' runs the trunk) fail: a call that runs the encoder raises."""

    def fail(*args, **kwargs):
        raise AssertionError("patches were cropped or a method chosen: the features were recomputed")

    monkeypatch.setattr(_patch._BatchDataset, "__getitem__", fail)
    monkeypatch.setattr(_compute, "_choose", fail)


# ---- preset -----------------------------------------------------------------------------------------------------
def test_preset_fills_the_mclstexp_options_and_records_them(adata):
    adata = adata[:16].copy()  # 16 views per spot: few spots
    out = hs.pp.image_features(adata, preset="mclstexp", copy=True, **MOBILENET)
    params = out.uns["img_features"]["params"]
    assert params["preset"] == "mclstexp"
    assert (params["layers"], params["context"], params["dihedral"]) == ("stages", 2.0, True)
    assert "tf_padding" not in params  # random weights: not a file trained with TF padding
    assert out.obsm["img_features"].shape == (adata.n_obs, 2 * 696)
    explicit = hs.pp.image_features(adata, layers="stages", context=2, dihedral=True, copy=True, **MOBILENET)
    np.testing.assert_array_equal(out.obsm["img_features"], explicit.obsm["img_features"])


def test_preset_explicit_arguments_win(adata):
    out = hs.pp.image_features(adata, preset="mclstexp", dihedral=False, context=None, copy=True, **MOBILENET)
    params = out.uns["img_features"]["params"]
    assert params["preset"] == "mclstexp" and params["layers"] == "stages"
    assert "dihedral" not in params and "context" not in params
    assert out.obsm["img_features"].shape == (adata.n_obs, 696)


def test_no_preset_is_the_default_behaviour(adata):
    out = hs.pp.image_features(adata, copy=True, **MOBILENET)
    params = out.uns["img_features"]["params"]
    assert "preset" not in params and "layers" not in params and "dihedral" not in params
    assert out.obsm["img_features"].shape == (adata.n_obs, 1280)


def test_unknown_preset_raises_and_writes_nothing(adata):
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match=r"`preset` must be one of \['mclstexp'\] or None, got 'stexp'"):
        hs.pp.image_features(adata, preset="stexp", **MOBILENET)
    _assert_unchanged(adata, snap)


@pytest.mark.data
def test_preset_sets_tf_padding_for_the_shared_weights(mobilenet_weights):
    assert wing.preset_options("mclstexp", weights=str(mobilenet_weights))["tf_padding"] is True
    assert "tf_padding" not in wing.preset_options("mclstexp", weights="imagenet")


def test_mclstexp_recipe_is_the_preset_and_the_cli_imports_it():
    """The validated recipe lives in the wing; the CLI (and the benchmarks) import it from there."""
    from histospace import _cli

    assert _cli.MCLSTEXP_FEATURES is wing.MCLSTEXP_FEATURES
    assert _cli._mclstexp_features is wing.mclstexp_features
    opts = wing.mclstexp_features(None)
    assert opts["preset"] == "mclstexp"
    assert {k: v for k, v in wing.MCLSTEXP_FEATURES.items() if k != "preset"} == {
        k: v for k, v in wing.PRESETS["mclstexp"].items() if k != "encoder"
    }
    assert {k: v for k, v in opts.items() if k != "preset"} == {
        k: v for k, v in wing.preset_options("mclstexp", weights=None).items() if k != "encoder"
    }


def _stored(params: dict) -> ad.AnnData:
    """A table whose `obsm['img_features']` was made with `params` (as `pp.image_features` records them)."""
    a = ad.AnnData(np.zeros((4, 2), np.float32))
    a.obsm["img_features"] = np.zeros((4, 1392), np.float32)
    a.uns["img_features"] = {"params": params}
    return a


def test_one_settings_check_for_the_models_and_the_cli():
    """The CLI's "reuse the stored features?" and the models' "were the query's features made like the
    reference's?" are one comparison, `settings_mismatch` of the feature slot (the CLI on the settings it asks for)."""
    from histospace._cli_steps import features_mismatch

    made = {"encoder": "mobilenet_v2", "weights": "random", "layers": "stages", "context": 2.0, "dihedral": True,
            "tf_padding": False, "patch_size_px": 224.0, "patch_size_um": 150.0}  # fmt: skip
    kw = {"encoder": "mobilenet_v2", "weights": None}
    extra = {k: v for k, v in wing.MCLSTEXP_FEATURES.items() if k != "preset"}
    assert features_mismatch(_stored(made), kw, extra) is None
    # the patch size in µm within 1%, as the models compare it (the CLI compared the strings before)
    assert features_mismatch(_stored(made), kw | {"patch_size_um": 150.9}, extra) is None
    near = wing.feature_settings(made | {"patch_size_um": 150.9})
    assert wing.settings_mismatch(wing.feature_settings(made), near) is None
    why = features_mismatch(_stored(made), kw | {"patch_size_um": 160.0}, extra)
    assert why == "uns['img_features']['params']['patch_size_um'] is 150.0, not 160.0"
    why = features_mismatch(_stored(made | {"dihedral": False}), kw, extra)
    assert why == "uns['img_features']['params']['dihedral'] is False, not True"
    why = features_mismatch(_stored({k: v for k, v in made.items() if k != "context"}), kw, extra)
    assert why == "uns['img_features']['params']['context'] is None, not 2.0"
    assert features_mismatch(_stored(made), kw | {"encoder": "resnet50"}, extra) == (
        "uns['img_features']['params']['encoder'] is 'mobilenet_v2', not 'resnet50'"
    )
    # settings the command does not ask for are not compared; the models compare them all
    assert features_mismatch(_stored(made | {"input_size": 256}), kw, extra) is None
    bad = wing.settings_mismatch(wing.feature_settings(made), wing.feature_settings(made | {"input_size": 256}))
    assert bad == ("input_size", 256, 224)


# ---- the batched dihedral mean -----------------------------------------------------------------------------------
def _dihedral_loop(enc, x):
    """The reference: one forward pass per view."""
    total = None
    for k in range(4):
        r = torch.rot90(x, k, dims=(2, 3))
        for view in (r, r.flip(-1)):
            y = enc(view.contiguous()).float()
            total = y if total is None else total + y
    return total / 8


@pytest.mark.parametrize("chunk", [1, 10, 64])
def test_dihedral_mean_batched_equals_one_pass_per_view(chunk):
    from histospace._image import build_encoder

    enc, _, _ = build_encoder("mobilenet_v2", None, layers="stages", input_size=32)
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = _dihedral_loop(enc, x)
        got = wing.dihedral_mean(enc, x, chunk=chunk)
    assert got.shape == ref.shape == (5, 696)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


# ---- cache ------------------------------------------------------------------------------------------------------
def test_feature_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HISTOSPACE_CACHE", str(tmp_path / "hc"))
    assert hs.pp.feature_cache_dir() == tmp_path / "hc" / "features"
    monkeypatch.delenv("HISTOSPACE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hs.pp.feature_cache_dir() == tmp_path / "xdg" / "histospace" / "features"


def test_cache_off_by_default_writes_nothing(adata, monkeypatch, tmp_path):
    monkeypatch.setenv("HISTOSPACE_CACHE", str(tmp_path))
    hs.pp.image_features(adata, copy=True, **MOBILENET)
    assert not (tmp_path / "features").exists()


def test_cache_hit_gives_the_same_features_without_the_encoder(adata, monkeypatch, tmp_path):
    monkeypatch.setenv("HISTOSPACE_CACHE", str(tmp_path))
    kw = {**MOBILENET, "layers": "stages", "context": 2.0}
    first = hs.pp.image_features(adata, cache=True, copy=True, **kw)
    entries = _entries(tmp_path / "features")
    assert len(entries) == 1
    _no_crops(monkeypatch)
    second = hs.pp.image_features(adata, cache=True, copy=True, **kw)
    np.testing.assert_array_equal(second.obsm["img_features"], first.obsm["img_features"])
    p1, p2 = first.uns["img_features"]["params"], second.uns["img_features"]["params"]
    assert p1.keys() == p2.keys()
    assert p2["image"] == p1["image"] == "hires" and p2["scale"] == p1["scale"]
    assert p2["method"] == p1["method"] == "patch"
    assert _entries(tmp_path / "features") == entries
    with pytest.raises(AssertionError, match="recomputed"):  # the guard works: without the cache it computes
        hs.pp.image_features(adata, copy=True, **kw)


def _variants(adata):
    """(name, AnnData, options) that must each miss the entry of `adata` with MOBILENET."""
    shifted = adata.copy()
    shifted.obsm["spatial"] = shifted.obsm["spatial"] + 1.0
    repainted = adata.copy()
    lib = next(iter(repainted.uns["spatial"]))
    hires = repainted.uns["spatial"][lib]["images"]["hires"].copy()
    hires[0, 0] = 255 - hires[0, 0]
    repainted.uns["spatial"][lib]["images"]["hires"] = hires
    return [
        ("input_size", adata, {"input_size": 48}),
        ("layers", adata, {"layers": "stages"}),
        ("dihedral", adata, {"dihedral": True}),
        ("context", adata, {"context": 1.5}),
        ("patch_size", adata, {"patch_size": 50.0}),
        ("random_state", adata, {"random_state": 1}),
        ("mean", adata, {"mean": 0.5, "std": 0.5}),
        ("tf_padding", adata, {"tf_padding": True}),
        ("method", adata, {"method": "dense"}),
        ("centres", shifted, {}),
        ("pixels", repainted, {}),
    ]


def test_cache_misses_on_any_changed_setting(adata, tmp_path):
    adata = adata[:12].copy()  # 13 runs: few spots
    root = tmp_path / "c"
    hs.pp.image_features(adata, cache=root, copy=True, **MOBILENET)
    n = 1
    for name, data, kw in _variants(adata):
        hs.pp.image_features(data, cache=root, copy=True, **{**MOBILENET, **kw})
        n += 1
        assert len(_entries(root)) == n, f"{name}: no new cache entry"


def test_cache_hit_with_a_dense_method_slide(adata, monkeypatch, tmp_path):
    kw = {**MOBILENET, "method": "dense", "cache": tmp_path}
    first = hs.pp.image_features(adata, copy=True, **kw)
    assert len(_entries(tmp_path)) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the dense engine ran")

    monkeypatch.setattr(_compute, "_dense_library", fail)
    second = hs.pp.image_features(adata, copy=True, **kw)
    np.testing.assert_array_equal(second.obsm["img_features"], first.obsm["img_features"])
    p1, p2 = first.uns["img_features"]["params"], second.uns["img_features"]["params"]
    assert p2["method"] == "dense" and p2["halo"] == p1["halo"] and p2["n_tiles"] == p1["n_tiles"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape"])
def test_corrupted_cache_entry_is_recomputed(adata, tmp_path, damage):
    from histospace._image.features import _cache as _feature_cache

    first = hs.pp.image_features(adata, cache=tmp_path, copy=True, **MOBILENET)
    (entry,) = _entries(tmp_path)
    if damage == "garbage":
        entry.write_bytes(b"not an npz file")
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:100])
    else:
        with np.load(entry) as z:
            parts = {k: z[k] for k in z.files}
        parts["features"] = parts["features"][:-1]
        np.savez(entry, **parts)
    second = hs.pp.image_features(adata, cache=tmp_path, copy=True, **MOBILENET)
    np.testing.assert_array_equal(second.obsm["img_features"], first.obsm["img_features"])
    key = entry.stem
    assert _feature_cache.load(tmp_path, key, first.obsm["img_features"].shape) is not None  # rewritten


def test_cache_with_two_slides_and_a_pca(adata_two_slides, tmp_path, monkeypatch):
    kw = {**MOBILENET, "library_key": "library_id", "n_components": 4, "cache": tmp_path}
    first = hs.pp.image_features(adata_two_slides, copy=True, **kw)
    assert len(_entries(tmp_path)) == 2  # one per slide, at full width
    _no_crops(monkeypatch)
    second = hs.pp.image_features(adata_two_slides, copy=True, **kw)
    np.testing.assert_array_equal(second.obsm["img_features"], first.obsm["img_features"])
    np.testing.assert_array_equal(
        second.uns["img_features"]["pca"]["components"], first.uns["img_features"]["pca"]["components"]
    )


def test_cache_skips_user_modules(adata, tmp_path):
    enc = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU())
    hs.pp.image_features(adata, cache=tmp_path, copy=True, **{**MOBILENET, "encoder": enc})
    assert _entries(tmp_path) == []


def test_bad_cache_argument_raises_and_writes_nothing(adata):
    snap = _snapshot(adata)
    with pytest.raises(TypeError, match="`cache` must be True, False or a folder path, got int"):
        hs.pp.image_features(adata, cache=1, **MOBILENET)
    _assert_unchanged(adata, snap)


def test_clear_feature_cache(adata, monkeypatch, tmp_path):
    monkeypatch.setenv("HISTOSPACE_CACHE", str(tmp_path))
    hs.pp.image_features(adata, cache=True, copy=True, **MOBILENET)
    hs.pp.image_features(adata, cache=True, copy=True, **{**MOBILENET, "input_size": 48})
    root = hs.pp.feature_cache_dir()
    keep = root / "README.txt"
    keep.write_text("not an entry")
    assert len(_entries(root)) == 2
    assert hs.pp.clear_feature_cache() == 2
    assert _entries(root) == [] and keep.exists()
    assert hs.pp.clear_feature_cache() == 0
    assert hs.pp.clear_feature_cache(tmp_path / "missing") == 0


def test_cached_result_survives_h5ad(adata, tmp_path):
    kw = {**MOBILENET, "preset": "mclstexp", "dihedral": False}
    out = hs.pp.image_features(adata, cache=tmp_path / "c", copy=True, **kw)
    out.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert back.uns["img_features"]["params"]["preset"] == "mclstexp"
    np.testing.assert_array_equal(back.obsm["img_features"], out.obsm["img_features"])
