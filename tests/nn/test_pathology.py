"""Tests of the pathology foundation-model encoders (`histospace._image.encoders._pathology`).

Full-size models are only built on torch's meta device (no memory); real builds use reduced variants of every family
(same timm architecture, registers, MLP type, patch size and pooling; depth 1, width 32) registered for the test, plus
the full-size H0-mini (86M) once.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import histospace as hs
from histospace._image import ImageEncoder, build_encoder
from histospace._image.encoders._pathology import (
    HOPTIMUS_MEAN,
    PATHOLOGY_ENCODERS,
    PathologyEncoder,
    build_pathology_encoder,
    count_parameters,
    create_vit,
    read_checkpoint,
    replace_model,
)

NAMES = sorted(PATHOLOGY_ENCODERS)
# feature width d per the model cards (class token, or class token + mean patch token for Virchow2 and H0-mini)
CARD_DIMS = {
    "uni": 1024,
    "uni2-h": 1536,
    "h-optimus-0": 1536,
    "h0-mini": 1536,
    "virchow2": 2560,
    "phikon-v2": 1024,
    "gigapath": 1536,
}
# prefix tokens: class + registers (UNI2-h 8, H-optimus-0 / H0-mini / Virchow2 4)
PREFIX = {"uni": 1, "uni2-h": 9, "h-optimus-0": 5, "h0-mini": 5, "virchow2": 5, "phikon-v2": 1, "gigapath": 1}
WIDTH = 32


def tiny_name(name: str) -> str:
    return f"tiny-{name}"


def make_tiny(name: str):
    e = PATHOLOGY_ENCODERS[name]
    small = {"depth": 1, "embed_dim": WIDTH, "num_heads": 2, "img_size": 4 * e.patch_size}
    hub_kwargs = e.hub_kwargs
    if hub_kwargs is not None and "embed_dim" in hub_kwargs:  # the card passes the whole architecture (UNI2-h)
        hub_kwargs = {**hub_kwargs, **small}
    return replace_model(
        e,
        name=tiny_name(name),
        hub_id=f"histospace-test/tiny-{name}",
        kwargs=small,
        hub_kwargs=hub_kwargs,
        embed_dim=WIDTH,
        n_params=0,
    )


@pytest.fixture(autouse=True)
def tiny_registry(monkeypatch):
    """Register a reduced variant of every family as 'tiny-<name>'."""
    for n in NAMES:
        monkeypatch.setitem(PATHOLOGY_ENCODERS, tiny_name(n), make_tiny(n))
    torch.set_num_threads(1)


def _x(side: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g)


def _features(enc, x):
    with torch.inference_mode():
        return enc(x)


def _save_vit(enc, path, fmt: str, *, wrap=False, half=False):
    sd = {k: v.detach().clone().contiguous() for k, v in enc.backbone.vit.state_dict().items()}
    if half:
        sd = {k: v.half() for k, v in sd.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}} if wrap else sd, path)
    return path


# ---- the registry -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_published_parameter_count_on_meta_device(name):
    """Every full-size model reproduces its parameter count without allocating (meta device)."""
    e = PATHOLOGY_ENCODERS[name]
    vit = create_vit(name, meta=True)
    assert all(p.is_meta for p in vit.parameters())
    n = sum(p.numel() for p in vit.parameters())
    assert n == e.n_params == count_parameters(name)
    published, half_unit = e.published_params
    assert abs(n - published) <= max(half_unit, 0.015 * published), (name, n, e.n_params_published)
    assert vit.embed_dim == e.embed_dim and vit.patch_embed.patch_size[0] == e.patch_size
    assert vit.num_prefix_tokens == PREFIX[name]
    assert vit.patch_embed.img_size == (e.input_size, e.input_size)
    assert e.out_dim == CARD_DIMS[name]


def test_registry_metadata():
    for name in NAMES:
        e = PATHOLOGY_ENCODERS[name]
        assert e.license and e.sources and e.hub_id.count("/") == 1 and e.url.startswith("https://huggingface.co/")
        assert e.input_size == 224 and e.mpp == 0.5
        assert len(e.mean) == len(e.std) == 3
    # patch sides in µm: 256 px at 0.5 µm/px for UNI / UNI2-h (TRIDENT), 224 px for the others
    assert PATHOLOGY_ENCODERS["uni"].patch_size_um == PATHOLOGY_ENCODERS["uni2-h"].patch_size_um == 128.0
    assert {PATHOLOGY_ENCODERS[n].patch_size_um for n in NAMES if not n.startswith("uni")} == {112.0}
    assert PATHOLOGY_ENCODERS["h-optimus-0"].mean == HOPTIMUS_MEAN == PATHOLOGY_ENCODERS["h0-mini"].mean
    assert PATHOLOGY_ENCODERS["phikon-v2"].checkpoint == "hf-dinov2"
    assert not PATHOLOGY_ENCODERS["uni"].commercial and PATHOLOGY_ENCODERS["h-optimus-0"].commercial
    assert PATHOLOGY_ENCODERS["virchow2"].published_params == (632e6, 0.5e6)
    assert PATHOLOGY_ENCODERS["h-optimus-0"].published_params == pytest.approx((1.1e9, 0.05e9))


# ---- reduced variants built for real ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_tiny_forward_pooling_and_feature_map(name):
    e = PATHOLOGY_ENCODERS[tiny_name(name)]
    enc, d, info = build_encoder(tiny_name(name), None)
    assert isinstance(enc, PathologyEncoder) and isinstance(enc, ImageEncoder) and not enc.training
    assert d == enc.out_dim == e.out_dim == WIDTH * (2 if e.pooling == "cls+mean" else 1)
    assert info == {
        "encoder": tiny_name(name),
        "weights": "random",
        "mean": list(e.mean),
        "std": list(e.std),
        "pooling": e.pooling,
        "mpp": 0.5,
        "input_size": 224,
        "patch_size_um": e.patch_size_um,
        "token_size": e.patch_size,
        "out_dim": d,
    }
    side = 4 * e.patch_size
    x = _x(side)
    with torch.inference_mode():
        y = enc(x)
        fm = enc.feature_map(x)
        odd = enc.feature_map(_x(side + e.patch_size // 2))  # not a multiple of p: floored
        big = enc(_x(2 * side))  # another size: position embeddings interpolated
        tokens = enc.backbone.tokens((x - enc.mean) / enc.std)
    assert y.shape == (2, d) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert fm.shape == (2, WIDTH, 4, 4) and odd.shape == (2, WIDTH, 4, 4)
    assert big.shape == (2, d) and torch.isfinite(big).all()
    # the map is the patch tokens (class and registers dropped), in row-major order
    assert tokens.shape == (2, PREFIX[name] + 16, WIDTH)
    torch.testing.assert_close(fm.flatten(2).transpose(1, 2), tokens[:, PREFIX[name] :])
    torch.testing.assert_close(y[:, :WIDTH], tokens[:, 0])
    if e.pooling == "cls+mean":
        torch.testing.assert_close(y[:, WIDTH:], fm.mean(dim=(2, 3)))
    # the other pooling, asked for explicitly
    other = "cls" if e.pooling == "cls+mean" else "cls+mean"
    enc2, d2, info2 = build_pathology_encoder(tiny_name(name), None, pooling=other)
    assert d2 == (WIDTH if other == "cls" else 2 * WIDTH) and info2["pooling"] == other
    torch.testing.assert_close(_features(enc2, x)[:, :WIDTH], y[:, :WIDTH])


def test_random_init_is_seeded_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a, _, _ = build_pathology_encoder("tiny-uni", None, random_state=3)
    b, _, _ = build_pathology_encoder("tiny-uni", None, random_state=3)
    c, _, _ = build_pathology_encoder("tiny-uni", None, random_state=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    x = _x(64)
    torch.testing.assert_close(_features(a, x), _features(b, x), rtol=0, atol=0)
    assert not torch.allclose(_features(a, x), _features(c, x))


def test_full_size_h0_mini_builds_for_real():
    enc, d, info = build_encoder("h0-mini", None)
    assert d == 1536 and sum(p.numel() for p in enc.parameters()) == PATHOLOGY_ENCODERS["h0-mini"].n_params
    y = _features(enc, _x(224, n=1))
    assert y.shape == (1, 1536) and torch.isfinite(y).all()
    assert info["mean"] == list(HOPTIMUS_MEAN) and info["pooling"] == "cls+mean"


# ---- checkpoints --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_checkpoint_round_trip(name, fmt, tmp_path):
    src, _, _ = build_pathology_encoder(tiny_name(name), None, random_state=7)
    path = _save_vit(src, tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"), fmt)
    enc, _, info = build_encoder(tiny_name(name), path)
    assert info["weights"] == str(path.resolve())
    assert all(p.requires_grad and not p.is_meta for p in enc.parameters())  # fine-tunable, fully loaded
    x = _x(4 * PATHOLOGY_ENCODERS[name].patch_size)
    torch.testing.assert_close(_features(enc, x), _features(src, x), rtol=0, atol=0)
    # the folder of a snapshot finds its file
    enc2, _, _ = build_pathology_encoder(tiny_name(name), tmp_path)
    torch.testing.assert_close(_features(enc2, x), _features(src, x), rtol=0, atol=0)


def test_wrapped_and_half_precision_checkpoints(tmp_path):
    src, _, _ = build_pathology_encoder("tiny-h-optimus-0", None, random_state=1)
    x = _x(56)
    wrapped = _save_vit(src, tmp_path / "wrapped.pth", "bin", wrap=True)  # {'state_dict': {'module.*': ...}}
    enc, _, _ = build_pathology_encoder("tiny-h-optimus-0", wrapped)
    torch.testing.assert_close(_features(enc, x), _features(src, x), rtol=0, atol=0)
    half = _save_vit(src, tmp_path / "half.safetensors", "safetensors", half=True)
    enc, _, _ = build_pathology_encoder("tiny-h-optimus-0", half)
    assert all(p.dtype == torch.float32 for p in enc.parameters())
    torch.testing.assert_close(_features(enc, x), _features(src, x), rtol=1e-2, atol=1e-2)
    # a DINOv2 training checkpoint: {'teacher': {'backbone.*', 'dino_head.*'}}
    sd = {f"backbone.{k}": v for k, v in src.backbone.vit.state_dict().items()}
    sd["dino_head.mlp.0.weight"] = torch.zeros(4, WIDTH)
    torch.save({"teacher": sd, "iteration": torch.tensor(5)}, tmp_path / "teacher.pth")
    assert set(read_checkpoint(tmp_path / "teacher.pth")) == set(src.backbone.vit.state_dict())


def _timm_to_hf_dinov2(sd: dict, depth: int, dim: int) -> dict:
    """timm ViT keys -> transformers Dinov2Model keys (as transformers' convert_dinov2_to_hf.py does)."""
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": torch.zeros(1, dim),
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for t in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{t}"].chunk(3, dim=0)
            out[f"{h}attention.attention.query.{t}"] = q
            out[f"{h}attention.attention.key.{t}"] = k
            out[f"{h}attention.attention.value.{t}"] = v
            out[f"{h}attention.output.dense.{t}"] = sd[f"{b}attn.proj.{t}"]
            for n in ("norm1", "norm2"):
                out[f"{h}{n}.{t}"] = sd[f"{b}{n}.{t}"]
            out[f"{h}mlp.fc1.{t}"] = sd[f"{b}mlp.fc1.{t}"]
            out[f"{h}mlp.fc2.{t}"] = sd[f"{b}mlp.fc2.{t}"]
        out[f"{h}layer_scale1.lambda1"] = sd[f"{b}ls1.gamma"]
        out[f"{h}layer_scale2.lambda1"] = sd[f"{b}ls2.gamma"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def test_phikon_v2_transformers_layout(tmp_path):
    from safetensors.torch import save_file

    src, _, _ = build_pathology_encoder("tiny-phikon-v2", None, random_state=2)
    hf = _timm_to_hf_dinov2(src.backbone.vit.state_dict(), depth=1, dim=WIDTH)
    assert not any(k.startswith(("blocks.", "cls_token")) for k in hf)
    (tmp_path / "snap").mkdir()
    save_file(hf, str(tmp_path / "snap" / "model.safetensors"))
    x = _x(64)
    enc, _, info = build_encoder("tiny-phikon-v2", tmp_path / "snap" / "model.safetensors")
    torch.testing.assert_close(_features(enc, x), _features(src, x), rtol=0, atol=0)
    # a task model's keys ('dinov2.' prefix, classifier head) load too
    torch.save({f"dinov2.{k}": v for k, v in hf.items()} | {"classifier.weight": torch.zeros(2, 2)}, tmp_path / "t.bin")
    with pytest.raises(ValueError, match=r"unexpected keys \(e\.g\. \['classifier"):
        build_pathology_encoder("tiny-phikon-v2", tmp_path / "t.bin")
    torch.save({f"dinov2.{k}": v for k, v in hf.items()}, tmp_path / "t.bin")
    enc, _, _ = build_pathology_encoder("tiny-phikon-v2", tmp_path / "t.bin")
    torch.testing.assert_close(_features(enc, x), _features(src, x), rtol=0, atol=0)


def test_original_dinov2_layout_with_registers(tmp_path):
    """H-optimus-0's original checkpoint.pth layout: register_tokens, pos_embed over the class token, SwiGLU w12/w3."""
    src, _, _ = build_pathology_encoder("tiny-h-optimus-0", None, random_state=5)
    sd = {k: v.detach().clone() for k, v in src.backbone.vit.state_dict().items()}
    r = 0.02 * torch.randn(1, 1, WIDTH)
    orig = {
        "cls_token": sd.pop("cls_token") - r,
        "pos_embed": torch.cat([r, sd.pop("pos_embed")], dim=1),
        "register_tokens": sd.pop("reg_token"),
        "mask_token": torch.zeros(1, WIDTH),
    }
    for k, v in sd.items():
        orig[k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")] = v
    torch.save(orig, tmp_path / "checkpoint.pth")
    enc, _, _ = build_pathology_encoder("tiny-h-optimus-0", tmp_path / "checkpoint.pth")
    x = _x(56)
    torch.testing.assert_close(_features(enc, x), _features(src, x), rtol=1e-5, atol=1e-5)


def test_position_table_of_another_grid_is_resampled(tmp_path):
    src, _, _ = build_pathology_encoder("tiny-uni", None)
    sd = dict(src.backbone.vit.state_dict())
    pos = sd["pos_embed"]  # (1, 1 + 4 * 4, W)
    grid = pos[:, 1:].reshape(1, 4, 4, WIDTH).permute(0, 3, 1, 2)
    big = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 64, WIDTH)
    sd["pos_embed"] = torch.cat([pos[:, :1], big], dim=1)
    torch.save(sd, tmp_path / "p.bin")
    enc, _, _ = build_pathology_encoder("tiny-uni", tmp_path / "p.bin")
    assert enc.backbone.vit.pos_embed.shape == pos.shape
    assert torch.isfinite(_features(enc, _x(64))).all()


# ---- errors -------------------------------------------------------------------------------------------------------


def test_wrong_architecture_names_the_matching_encoder(tmp_path):
    giga, _, _ = build_pathology_encoder("tiny-gigapath", None)
    path = _save_vit(giga, tmp_path / "gigapath.bin", "bin")
    with pytest.raises(ValueError, match="tiny-h0-mini") as err:
        build_pathology_encoder("tiny-h0-mini", path)
    msg = str(err.value)
    assert "fits the architecture of 'tiny-gigapath': pass `encoder='tiny-gigapath'`." in msg
    assert "missing keys" in msg and "patch 16, 0 register tokens, SwiGLU" in msg
    # UNI and Phikon-v2 share one architecture: both are named
    other, _, _ = build_pathology_encoder("tiny-uni", None)
    path = _save_vit(other, tmp_path / "uni.bin", "bin")
    with pytest.raises(ValueError, match="'tiny-uni', 'tiny-phikon-v2'|'tiny-phikon-v2', 'tiny-uni'"):
        build_pathology_encoder("tiny-h0-mini", path)
    # a file of no registry architecture: described, and no encoder named
    sd = dict(other.backbone.vit.state_dict())
    sd["patch_embed.proj.weight"] = torch.zeros(WIDTH, 3, 8, 8)
    torch.save(sd, tmp_path / "p8.bin")
    with pytest.raises(ValueError, match=r"patch 8.*Pass the UNI weights"):
        build_pathology_encoder("tiny-uni", tmp_path / "p8.bin")
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "cnn.bin")
    with pytest.raises(ValueError, match="not a ViT checkpoint"):
        build_pathology_encoder("tiny-uni", tmp_path / "cnn.bin")


def test_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights='hub'"):
        build_encoder("tiny-uni", tmp_path / "missing.bin")
    with pytest.raises(FileNotFoundError, match="No weights file in folder"):
        build_encoder("tiny-uni", tmp_path)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Could not read weights file"):
        build_encoder("tiny-uni", tmp_path / "junk.bin")
    torch.save([1, 2], tmp_path / "list.bin")
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        build_encoder("tiny-uni", tmp_path / "list.bin")
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_encoder("tiny-uni", "imagenet")
    with pytest.raises(TypeError, match="`weights` must be"):
        build_encoder("tiny-uni", 3)
    with pytest.raises(ValueError, match="CNN encoders only"):
        build_encoder("tiny-uni", None, layers="stages")
    with pytest.raises(ValueError, match="CNN encoders only"):
        build_encoder("tiny-uni", None, tf_padding=True)
    with pytest.raises(ValueError, match="`pooling` must be"):
        build_pathology_encoder("tiny-uni", None, pooling="max")
    with pytest.raises(ValueError, match=r"a pathology model \[.*'uni'"):
        build_encoder("unknown-net", None)
    with pytest.raises(ValueError, match="Unknown pathology encoder"):
        build_pathology_encoder("resnet50", None)


# ---- the hub path, offline ----------------------------------------------------------------------------------------


def _fake_hub_repo(cache, repo_id: str, files: dict) -> None:
    """Write a HuggingFace cache entry (`models--org--name/{refs/main, snapshots/<commit>/...}`) as hf_hub_download
    leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for fname, write in files.items():
        write(snap / fname)


def _timm_config(entry) -> dict:
    args = {k: v for k, v in entry.kwargs.items() if k not in ("mlp_layer", "act_layer")}
    return {
        "architecture": entry.arch,
        "num_classes": 0,
        "num_features": entry.embed_dim,
        "global_pool": "token",
        "model_args": args,
        "pretrained_cfg": {"input_size": [3, 224, 224], "mean": list(entry.mean), "std": list(entry.std)},
    }


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline HuggingFace hub whose cache is `tmp_path / 'hub'` (HF_HUB_OFFLINE=1, HF_HUB_CACHE=...)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("name", ["h0-mini", "uni2-h"])
def test_hub_through_timm_offline(name, offline_hub, tmp_path):
    """`weights='hub'` runs timm's `hf-hub:` loader (config.json + weights from the HF cache, no network)."""
    entry = PATHOLOGY_ENCODERS[tiny_name(name)]
    src, _, _ = build_pathology_encoder(tiny_name(name), None, random_state=11)
    sd = {k: v.detach().clone() for k, v in src.backbone.vit.state_dict().items()}
    _fake_hub_repo(
        offline_hub,
        entry.hub_id,
        {
            "config.json": lambda p: p.write_text(json.dumps(_timm_config(entry))),
            "pytorch_model.bin": lambda p: torch.save(sd, p),
        },
    )
    x = _x(4 * entry.patch_size)
    for weights in ("hub", f"hf-hub:{entry.hub_id}", entry.hub_id):
        enc, d, info = build_encoder(tiny_name(name), weights)
        assert info["weights"] == f"hf-hub:{entry.hub_id}" and d == entry.out_dim
        torch.testing.assert_close(_features(enc, x), _features(src, x), rtol=0, atol=0)
    # a hub repository holding another architecture is refused
    uni = PATHOLOGY_ENCODERS["tiny-uni"]
    other, _, _ = build_pathology_encoder("tiny-uni", None)
    _fake_hub_repo(
        offline_hub,
        "histospace-test/other",
        {
            "config.json": lambda p: p.write_text(json.dumps(_timm_config(uni))),
            "pytorch_model.bin": lambda p: torch.save(other.backbone.vit.state_dict(), p),
        },
    )
    with pytest.raises(ValueError, match="do(es)? not fit the .* architecture"):
        build_encoder(tiny_name(name), "hf-hub:histospace-test/other")


def test_hub_transformers_repo_offline(offline_hub):
    """Phikon-v2's repository (transformers layout) comes through huggingface_hub and is converted."""
    from safetensors.torch import save_file

    entry = PATHOLOGY_ENCODERS["tiny-phikon-v2"]
    src, _, _ = build_pathology_encoder("tiny-phikon-v2", None, random_state=2)
    hf = _timm_to_hf_dinov2(src.backbone.vit.state_dict(), depth=1, dim=WIDTH)
    _fake_hub_repo(offline_hub, entry.hub_id, {"model.safetensors": lambda p: save_file(hf, str(p))})
    enc, _, info = build_encoder("tiny-phikon-v2", "hub")
    assert info["weights"] == f"hf-hub:{entry.hub_id}"
    torch.testing.assert_close(_features(enc, _x(64)), _features(src, _x(64)), rtol=0, atol=0)


def test_hub_missing_offline_says_what_to_do(offline_hub):
    with pytest.raises(RuntimeError, match=r"(?s)request access.*Offline, download `pytorch_model.bin`"):
        build_encoder("tiny-uni", "hub")
    with pytest.raises(RuntimeError, match="Offline, download `model.safetensors`"):
        build_encoder("tiny-phikon-v2", "hub")


# ---- through the public functions ---------------------------------------------------------------------------------


def test_image_features_with_a_pathology_encoder(adata, tmp_path):
    src, _, _ = build_pathology_encoder("tiny-h0-mini", None, random_state=4)
    path = _save_vit(src, tmp_path / "pytorch_model.bin", "bin")
    kw = {"input_size": 56, "patch_size": 60, "progress_bar": False, "device": "cpu"}
    hs.pp.image_features(adata, encoder="tiny-h0-mini", weights=path, **kw)
    feats = adata.obsm["img_features"]
    assert feats.shape == (adata.n_obs, 2 * WIDTH) and feats.dtype == np.float32 and np.isfinite(feats).all()
    params = adata.uns["img_features"]["params"]
    assert params["encoder"] == "tiny-h0-mini" and params["weights"] == str(path.resolve())
    np.testing.assert_allclose(params["mean"], HOPTIMUS_MEAN)  # the model's statistics, not ImageNet's
    # the same as running the encoder on the patches directly (fusion and channels_last change nothing here)
    hs.pp.image_features(adata, encoder="tiny-h0-mini", weights=None, random_state=4, key_added="rnd", **kw)
    np.testing.assert_allclose(adata.obsm["rnd"], feats, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no ImageNet weights"):
        hs.pp.image_features(adata, encoder="tiny-h0-mini", key_added="x", **kw)  # the default weights='imagenet'
    assert "x" not in adata.obsm


def test_mclstexp_fine_tunes_a_pathology_encoder(adata):
    tiny = {"n_heads": 2, "dim_head": 8, "projection_dim": 16, "n_top_genes": 20}
    model = hs.models.MclSTExp(
        adata, freeze_encoder=False, encoder="tiny-h0-mini", patch_size=60, input_size=28, **tiny
    )
    assert isinstance(model.module.image_encoder, PathologyEncoder) and model.img_dim == 2 * WIDTH
    model.train(max_epochs=1, batch_size=32, n_models=1, device="cpu", progress_bar=False)
    enc = model.module.image_encoder
    assert isinstance(enc, PathologyEncoder)
    # the encoder normalises with its own statistics unless image_mean/image_std are given
    own, _, _ = build_pathology_encoder("tiny-h0-mini", None)
    np.testing.assert_allclose(enc.mean.flatten().numpy(), own.mean.flatten().numpy())
    given = hs.models.MclSTExp(
        adata, freeze_encoder=False, encoder="tiny-h0-mini", patch_size=60, input_size=28, image_mean=0.5, **tiny
    )
    np.testing.assert_allclose(given.module.image_encoder.mean.flatten().numpy(), 0.5)
    init, _, _ = build_pathology_encoder("tiny-h0-mini", None)  # the seed-0 start the model was built from
    assert not torch.equal(init.backbone.vit.blocks[0].attn.qkv.weight, enc.backbone.vit.blocks[0].attn.qkv.weight)
    pred = model.predict(adata, n_neighbors=5)
    assert pred.shape == (adata.n_obs, len(model.genes)) and np.isfinite(pred).all()


def test_docs_table_lists_every_encoder():
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "encoders.md"
    text = doc.read_text()
    for name in NAMES:
        e = PATHOLOGY_ENCODERS[name]
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, name
        assert e.n_params_published in row and str(e.out_dim) in row and e.hub_id in row
        assert re.search(rf"\b{e.patch_size_um:g} µm", row), row
