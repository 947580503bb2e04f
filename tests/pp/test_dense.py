"""Tests of the dense image-feature engine (`histospace._image.features._dense`): tiny images, random-init encoders, CPU."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import histospace as hs
from histospace._image import build_encoder, open_image
from histospace._image.features import _dense
from histospace._image.features._dense import (
    choose_method,
    dense_cost_ratio,
    dense_features,
    pick_level,
    trunk_geometry,
)
from histospace._image.features._dense_engine import iter_strips, pca_sample, plan_strips
from histospace._image.features._dense_resample import Resampler
from histospace._image.features._dense_trunk import run_trunk
from histospace._image.features._dense_windows import box_means, summed_area_table, window_means, window_means_sat
from histospace._utils._preprocess import covariance_pca

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small convolutions: one thread avoids waiting on a second one on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny():
    """A small padded CNN (stride 4): fast, and exercises the user-module path."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        )
    return build_encoder(m, None)[0]


def _mobilenet(**kw):
    return build_encoder("mobilenet_v2", None, random_state=0, **kw)[0]


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """H&E-like colours varying smoothly (sums of a few low-frequency waves) plus mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((h, w, 3))
    for c, base in enumerate((190.0, 120.0, 170.0)):
        f = sum(
            np.sin(2 * np.pi * (xx * rng.uniform(0.002, 0.02) + yy * rng.uniform(0.002, 0.02)) + rng.uniform(0, 6))
            for _ in range(4)
        )
        img[:, :, c] = base + 15 * f
    img += rng.normal(0, 4, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _grid(x0, x1, y0, y1, step):
    xs, ys = np.meshgrid(np.arange(x0, x1, step, dtype=np.float64), np.arange(y0, y1, step, dtype=np.float64))
    return np.column_stack([xs.ravel(), ys.ravel()])


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


# ---------------------------------------------------------------------------------------------------------------------
# summed-area tables
# ---------------------------------------------------------------------------------------------------------------------
def test_window_means_integer_windows_equal_direct_means():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(13, 17, 5))
    u0 = rng.integers(0, 17 - 4, size=40)
    v0 = rng.integers(0, 13 - 4, size=40)
    u, v = torch.as_tensor(u0, dtype=torch.float64), torch.as_tensor(v0, dtype=torch.float64)
    want = np.stack([m[b : b + 4, a : a + 4].mean(axis=(0, 1)) for a, b in zip(u0, v0, strict=True)])
    # the summed-area table, read at the 4 corners
    np.testing.assert_allclose(
        window_means_sat(summed_area_table(torch.from_numpy(m)), u, v, 4.0).numpy(), want, rtol=1e-12
    )
    # the means of all integer windows at once (float32 output)
    got = window_means(torch.from_numpy(m).float(), u, v, 4.0).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # computed in blocks of channels: the same
    buf = torch.from_numpy(m).float()
    np.testing.assert_array_equal(box_means(buf, 4, block_bytes=1).numpy(), box_means(buf, 4).numpy())


def _area_weighted(m, u0, v0, w):
    def overlap(a, n):  # length of [a, a + w) inside each cell [j, j + 1)
        j = np.arange(n)
        return np.clip(np.minimum(j + 1, a + w) - np.maximum(j, a), 0, None)

    h, wd = m.shape[:2]
    return np.stack(
        [np.einsum("i,j,ijc->c", overlap(v, h), overlap(u, wd), m) / w**2 for u, v in zip(u0, v0, strict=True)]
    )


@pytest.mark.parametrize("w", [3.0, 3.5])
def test_window_means_fractional_windows_are_area_weighted(w):
    rng = np.random.default_rng(1)
    m = rng.normal(size=(12, 15, 3))
    u0 = np.concatenate([rng.uniform(0, 15 - w, size=30), [0.0, 15 - w]])  # both ends of the map too
    v0 = np.concatenate([rng.uniform(0, 12 - w, size=30), [12 - w, 0.0]])
    u, v = torch.as_tensor(u0), torch.as_tensor(v0)
    want = _area_weighted(m, u0, v0, w)
    np.testing.assert_allclose(
        window_means_sat(summed_area_table(torch.from_numpy(m)), u, v, w).numpy(), want, rtol=1e-10
    )
    got = window_means(torch.from_numpy(m).float(), u, v, w).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# resampling
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [0.5, 0.37, 1.6])
def test_resampling_matches_torch_antialias_inside_the_image(r):
    img = _smooth_image(90, 110, seed=2)
    src = open_image(img)
    h, w = int(90 * r), int(110 * r)
    got = Resampler(src, r, CPU).read(0, h, 0, w)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    want = torch.nn.functional.interpolate(
        x, scale_factor=r, mode="bilinear", antialias=True, align_corners=False, recompute_scale_factor=False
    )[0]
    m = int(np.ceil(2 / min(r, 1))) + 1  # torch clips the filter at the border, we read white beyond it
    np.testing.assert_allclose(got[:, m : h - m, m : w - m].numpy(), want[:, m : h - m, m : w - m].numpy(), atol=2e-6)
    # tiles are crops of one resampled image, whatever the bands of source rows
    tile = Resampler(src, r, CPU, band_rows=7).read(7, 7 + 20, 11, 11 + 25)
    np.testing.assert_array_equal(tile.numpy(), got[:, 7:27, 11:36].numpy())


# ---------------------------------------------------------------------------------------------------------------------
# geometry and tiles
# ---------------------------------------------------------------------------------------------------------------------
def test_trunk_geometry_of_named_encoders():
    g = trunk_geometry(_mobilenet())
    assert g.strides == (32,) and g.channels == (1280,)
    assert g.exact_halo == 256
    gs = trunk_geometry(_mobilenet(layers="stages"))
    assert gs.strides == (4, 8, 16, 16, 32, 32)
    assert gs.width == 696
    assert all(a <= b for a, b in zip([lr[0] for lr in gs.reach], [lr[0] for lr in gs.reach][1:], strict=False))
    # TF 'SAME' padding pads on the right: the reach is asymmetric
    left, right = trunk_geometry(_mobilenet(tf_padding=True)).reach[0]
    assert right > left
    assert trunk_geometry(_tiny()).strides == (4,)


def _assembled_maps(src, plan, enc, geom):
    """Map rows of every strip (core cells only), from the engine's strips."""
    out = {}
    with torch.inference_mode():
        for sy, _, _, bufs in iter_strips(
            src, plan, enc, geom, dihedral=False, batch_size=2, device=CPU, project=None, bar=None
        ):
            for t, b in enumerate(bufs):
                n = plan.tile_h // geom.strides[t]
                out.setdefault(t, {})[sy] = b[-n:].clone()
    return out


def _one_pass_maps(src, plan, enc, geom, r):
    y0, x0 = plan.oy - plan.halo, plan.ox - plan.halo
    y1 = plan.oy + plan.needed.shape[0] * plan.tile_h + plan.halo
    x1 = plan.ox + plan.needed.shape[1] * plan.tile_w + plan.halo
    with torch.inference_mode():
        x = Resampler(src, r, CPU).read(y0, y1, x0, x1)[None]
        return [m[0].permute(1, 2, 0) for m in run_trunk(enc, (x - enc.mean) / enc.std, geom.taps)]


def _max_tile_error(src, centres, enc, r, halo=None):
    geom = trunk_geometry(enc)
    h = geom.exact_halo if halo is None else halo
    plan = plan_strips(centres, r, 64, 64, h, geom.max_stride)
    assert plan.needed.shape[0] >= 2 and plan.needed.shape[1] >= 2  # seams in both directions
    tiled, full = _assembled_maps(src, plan, enc, geom), _one_pass_maps(src, plan, enc, geom, r)
    errs = []
    for t, f in enumerate(full):
        s = geom.strides[t]
        nh, nw, hc = plan.tile_h // s, plan.tile_w // s, plan.halo // s
        for sy, rows in tiled[t].items():
            cols = torch.from_numpy(np.repeat(plan.needed[sy], nw))
            ref = f[hc + sy * nh : hc + (sy + 1) * nh, hc : hc + rows.shape[1]]
            errs.append(_rel(rows[:, cols], ref[:, cols]))
    return max(errs)


def test_tiled_maps_equal_one_pass_in_the_interior():
    img = _smooth_image(130, 130, seed=3)
    src = open_image(img)
    r = 0.8
    centres = _grid(40 / r, 90 / r, 40 / r, 90 / r, 12)  # windows inside 2 x 2 tiles of 64 px
    # MobileNetV2 stages with TF 'SAME' padding (asymmetric reach), resampled by 0.8
    enc = _mobilenet(tf_padding=True, layers="stages")
    assert _max_tile_error(src, centres, enc, r) < 1e-4
    # the test can fail: without a halo the cells next to the seams differ
    assert _max_tile_error(src, centres, enc, r, halo=0) > 1e-3
    assert _max_tile_error(src, centres * r, _tiny(), 1.0) < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# dense_features
# ---------------------------------------------------------------------------------------------------------------------
def test_dense_matches_patch_method_on_a_smooth_image():
    img = _smooth_image(600, 600, seed=4)
    centres = _grid(150, 460, 150, 460, 50)
    enc = _mobilenet()
    dense = dense_features(img, centres, 224, enc, tile_size=512, progress_bar=False, device="cpu")
    a = ad.AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(len(centres))]))
    a.obsm["spatial"] = centres
    hs.pp.image_features(a, img=img, encoder="mobilenet_v2", weights=None, patch_size=224, progress_bar=False)
    patch = a.obsm["img_features"]
    assert dense.shape == patch.shape and dense.dtype == np.float32
    r = np.array([np.corrcoef(dense[i], patch[i])[0, 1] for i in range(len(centres))])
    assert np.median(r) > 0.95 and r.min() > 0.9


def test_shapes_stages_context_and_determinism():
    img = _smooth_image(128, 128, seed=5)
    centres = _grid(34, 96, 34, 96, 10)
    enc = _mobilenet(layers="stages")
    kw = {"input_size": 64, "tile_size": 128, "progress_bar": False, "device": "cpu"}
    f = dense_features(img, centres, 64, enc, **kw)
    assert _dense._STATS["n_tiles"] == [1]
    assert f.shape == (len(centres), 696) and f.dtype == np.float32 and np.isfinite(f).all()
    last = dense_features(img, centres, 64, enc, layers="last", **kw)
    assert last.shape == (len(centres), 1280)
    ctx = dense_features(img, centres, 64, enc, context_px=128, **kw)
    assert ctx.shape == (len(centres), 2 * 696)
    np.testing.assert_array_equal(ctx[:, :696], f)
    np.testing.assert_array_equal(ctx[:, 696:], dense_features(img, centres, 128, enc, **kw))
    again = dense_features(img, centres, 64, enc, **kw)
    assert again.tobytes() == f.tobytes()
    # tiles and batches do not change the features (up to float rounding)
    other = dense_features(img, centres, 64, enc, **{**kw, "tile_size": 64}, batch_size=3)
    assert _dense._STATS["n_tiles"] == [4]
    assert _rel(other, f) < 1e-4


def test_scale_reads_a_lower_resolution_level():
    img = _smooth_image(256, 256, seed=6)
    half = img.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    centres = _grid(40, 220, 40, 220, 60)
    enc = _tiny()
    kw = {"input_size": 32, "tile_size": 32, "progress_bar": False, "device": "cpu"}
    full = dense_features(img, centres, 64, enc, **kw)
    lvl = dense_features(half, centres, 64, enc, scale=0.5, **kw)
    assert lvl.shape == full.shape
    r = [np.corrcoef(a, b)[0, 1] for a, b in zip(full, lvl, strict=True)]
    assert np.median(r) > 0.99
    assert pick_level([1.0, 0.5, 0.25], 64, input_size=32) == 1
    assert pick_level([1.0, 0.5, 0.25], 224, input_size=224) == 0
    assert pick_level([0.5, 0.25], 64, input_size=224) == 0


def test_dihedral_is_invariant_to_rotating_the_image():
    img = _smooth_image(128, 160, seed=7)
    centres = _grid(20, 140, 20, 110, 15)
    enc = _tiny()
    kw = {"input_size": 32, "tile_size": 32, "progress_bar": False, "device": "cpu"}
    # rotating by 90 degrees counter-clockwise: (x, y) -> (y, W - x); W is a multiple of the stride, so the grid is kept
    rot = np.ascontiguousarray(np.rot90(img))
    c_rot = np.column_stack([centres[:, 1], img.shape[1] - centres[:, 0]])
    f = dense_features(img, centres, 32, enc, dihedral=True, **kw)
    g = dense_features(rot, c_rot, 32, enc, dihedral=True, **kw)
    assert _rel(g, f) < 1e-5
    plain_f = dense_features(img, centres, 32, enc, **kw)
    plain_g = dense_features(rot, c_rot, 32, enc, **kw)
    assert _rel(plain_g, plain_f) > 1e-2  # without the dihedral mean the features depend on the orientation
    assert _rel(f, plain_f) > 1e-2


def test_cost_follows_the_tissue_and_memory_is_bounded():
    img = _smooth_image(600, 400, seed=8)
    enc = _tiny()
    kw = {"input_size": 32, "tile_size": 64, "halo": 0, "progress_bar": False, "device": "cpu"}
    corner = _grid(10, 120, 10, 120, 8)
    dense_features(img, corner, 32, enc, **kw)
    few = _dense._STATS["n_tiles"][0]
    everywhere = _grid(10, 390, 10, 590, 8)
    f = dense_features(img, everywhere, 32, enc, **kw)
    many = _dense._STATS["n_tiles"][0]
    assert few <= many / 4
    # the buffers hold one strip of the map plus the rows a window reaches back to, never the whole map
    stride, tile = 4, 64
    n_cols = (-(-400 // tile) + 2) * tile // stride  # the tile columns over the image and one on either side
    bound = (tile // stride + 32 // stride + 1) * n_cols
    whole = (600 // stride) * (400 // stride)
    assert _dense._STATS["max_map_cells"] <= bound < whole / 4
    # more bins on the same area: the same tiles
    dense_features(img, _grid(10, 390, 10, 590, 4), 32, enc, **kw)
    assert _dense._STATS["n_tiles"][0] == many
    assert f.shape == (len(everywhere), 16)


def test_n_components_projects_on_the_fly():
    img = _smooth_image(400, 300, seed=9)
    centres = _grid(10, 290, 10, 390, 9)
    enc = _tiny()
    kw = {"input_size": 32, "tile_size": 64, "progress_bar": False, "device": "cpu"}
    full = dense_features(img, centres, 32, enc, **kw).astype(np.float64)
    # two passes: fitted on the centres of evenly spaced strips, the maps projected before their tables
    red = dense_features(img, centres, 32, enc, n_components=5, pca_n_spots=300, **kw)
    geom = trunk_geometry(enc)
    sel = pca_sample(plan_strips(centres, 1.0, 32, 64, geom.exact_halo, geom.max_stride), geom, 300)
    assert 300 <= sel.size < len(centres) / 2
    mu, comp = covariance_pca(full[sel], 5)
    want = (full - mu) @ comp
    assert red.shape == (len(centres), 5) and red.dtype == np.float32
    assert _rel(red, want) < 1e-4
    # few centres: one pass, PCA in memory
    small = dense_features(img, centres[:200], 32, enc, n_components=3, **kw)
    mu, comp = covariance_pca(full[:200], 3)
    assert _rel(small, (full[:200] - mu) @ comp) < 1e-4
    assert dense_features(img, centres, 32, enc, n_components=5, pca_n_spots=300, **kw).tobytes() == red.tobytes()
    # the pieces `hs.pp.image_features(n_components=)` joins over slides: the sample alone, then a given PCA
    idx, x = dense_features(img, centres, 32, enc, sample=300, **kw)
    np.testing.assert_array_equal(idx, sel)
    assert _rel(x, full[sel]) < 1e-5
    mu, comp = covariance_pca(full[sel], 5)
    assert _rel(dense_features(img, centres, 32, enc, pca=(mu, comp), **kw), red) < 1e-5


def test_choose_method_follows_the_overlap():
    enc = _mobilenet()
    dense_grid = _grid(0, 4000, 0, 4000, 16)  # bins 16 px apart, 224-px patches: ~200-fold overlap
    sparse = _grid(0, 4000, 0, 4000, 300)  # spots 300 px apart: patches do not overlap
    assert dense_cost_ratio(dense_grid, 224) > 30
    assert dense_cost_ratio(sparse, 224) < 1
    assert choose_method(dense_grid, 224, enc) == "dense"
    assert choose_method(sparse, 224, enc) == "patch"
    assert choose_method(dense_grid, 224, enc, input_size=16) == "patch"  # patch smaller than a map cell
    unpadded = build_encoder(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU()), None)[0]
    assert choose_method(dense_grid, 224, unpadded) == "patch"


def test_errors():
    img = _smooth_image(100, 120)
    c = _grid(10, 110, 10, 90, 20)
    enc = _mobilenet()
    kw = {"progress_bar": False, "device": "cpu"}
    with pytest.raises(ValueError, match="smaller than one cell"):
        dense_features(img, c, 16, enc, input_size=16, **kw)
    with pytest.raises(ValueError, match="outside the image"):
        dense_features(img, np.vstack([c, [[130.0, 5.0]]]), 64, enc, **kw)
    with pytest.raises(ValueError, match="outside the image"):
        dense_features(img, c, 64, enc, scale=2.0, **kw)
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        dense_features(img, c[:, :1], 64, enc, **kw)
    with pytest.raises(ValueError, match="NaN"):
        dense_features(img, np.vstack([c, [[np.nan, 5.0]]]), 64, enc, **kw)
    with pytest.raises(ValueError, match="`patch_px` must be a positive"):
        dense_features(img, c, 0, enc, **kw)
    with pytest.raises(ValueError, match="multiple of the trunk's largest stride"):
        dense_features(img, c, 64, enc, input_size=64, tile_size=100, **kw)
    with pytest.raises(ValueError, match="`n_components` = 5000 exceeds"):
        dense_features(img, c, 64, enc, input_size=64, n_components=5000, **kw)
    with pytest.raises(ValueError, match="`pca_n_spots` must be"):
        dense_features(img, c, 64, enc, input_size=64, n_components=2, pca_n_spots=0, **kw)
    with pytest.raises(ValueError, match=r"`pca` must be \(mean, components\) of shapes \(1280,\)"):
        dense_features(img, c, 64, enc, input_size=64, pca=(np.zeros(16), np.zeros((16, 2))), **kw)
    with pytest.raises(ValueError, match="`sample` must be a positive integer"):
        dense_features(img, c, 64, enc, input_size=64, sample=0, **kw)
    with pytest.raises(ValueError, match="`halo` must be"):
        dense_features(img, c, 64, enc, halo=-1, **kw)
    with pytest.raises(ValueError, match="`layers` must be"):
        dense_features(img, c, 64, enc, layers="all", **kw)
    with pytest.raises(ValueError, match="needs a named encoder"):
        dense_features(img, c, 64, _tiny(), layers="stages", **kw)
    with pytest.raises(TypeError, match="ImageEncoder"):
        dense_features(img, c, 64, nn.Conv2d(3, 4, 3), **kw)
    pooled = build_encoder(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()), None)
    with pytest.raises(ValueError, match="returns a map"):
        dense_features(img, c, 64, pooled[0], **kw)
    with pytest.raises(FileNotFoundError):
        dense_features("/nonexistent/he.tif", c, 64, enc, **kw)
    with pytest.raises(ValueError, match="level_scales"):
        pick_level([], 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    img = _smooth_image(128, 128, seed=10)
    centres = _grid(34, 96, 34, 96, 10)
    kw = {"input_size": 64, "tile_size": 64, "progress_bar": False}
    cpu = dense_features(img, centres, 64, _mobilenet(layers="stages"), device="cpu", **kw)
    gpu = dense_features(img, centres, 64, _mobilenet(layers="stages"), device="cuda", batch_size=4, **kw)
    assert _rel(gpu, cpu) < 1e-3
    red = dense_features(img, centres, 64, _mobilenet(), device="cuda", n_components=4, pca_n_spots=10, **kw)
    assert red.shape == (len(centres), 4) and np.isfinite(red).all()
