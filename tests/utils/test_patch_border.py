"""Patches at and beyond the image border (`pp.image_features`): padded white over the border, refused when wider
than the whole image (issue #24 item 1: the docstring and the code disagreed)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from torch import nn

import histospace as hs

with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)
    TINY = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
FAST = {"encoder": TINY, "weights": None, "input_size": 32, "progress_bar": False, "device": "cpu", "method": "patch"}
SIDE = 48  # a tiny image


def _tiny(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, (SIDE, SIDE, 3), dtype=np.uint8)


def _spots(xy) -> ad.AnnData:
    a = ad.AnnData(X=np.zeros((len(xy), 1), dtype=np.float32))
    a.obs_names = [f"s{i}" for i in range(len(xy))]
    a.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
    return a


def test_patch_over_the_border_is_padded_white():
    """A patch running over the border gives the features of the same patch on the image laid on white glass."""
    img = _tiny()
    xy = np.array([[5.0, 5.0], [SIDE - 3.0, 20.0], [24.0, 24.0]])  # two spots near the border, one in the middle
    out = hs.pp.image_features(_spots(xy), img=img, patch_size=40, copy=True, **FAST).obsm["img_features"]
    pad = 50
    canvas = np.full((SIDE + 2 * pad, SIDE + 2 * pad, 3), 255, dtype=np.uint8)
    canvas[pad : pad + SIDE, pad : pad + SIDE] = img
    ref = hs.pp.image_features(_spots(xy + pad), img=canvas, patch_size=40, copy=True, **FAST).obsm["img_features"]
    np.testing.assert_array_equal(out, ref)
    black = np.zeros_like(canvas)  # the padding is white, not black: another canvas gives other features
    black[pad : pad + SIDE, pad : pad + SIDE] = img
    other = hs.pp.image_features(_spots(xy + pad), img=black, patch_size=40, copy=True, **FAST).obsm["img_features"]
    assert not np.allclose(out[0], other[0])


@pytest.mark.parametrize("patch_size", [SIDE + 1, 1e6])
def test_patch_wider_than_the_whole_image_raises(patch_size):
    """A patch wider than the whole image is refused before any work (a size in the wrong units; a 1e6-px patch
    cannot even be allocated), naming `patch_size` and the fix; the AnnData is left as it was."""
    a = _spots([[24.0, 24.0], [10.0, 30.0]])
    before = (set(a.obsm), set(a.uns), set(a.obs), a.obsm["spatial"].copy())
    with pytest.raises(ValueError, match=r"larger than the whole image.*pass a smaller `patch_size`.*`patch_size_um`"):
        hs.pp.image_features(a, img=_tiny(), patch_size=patch_size, **FAST)
    assert (set(a.obsm), set(a.uns), set(a.obs)) == before[:3]
    np.testing.assert_array_equal(a.obsm["spatial"], before[3])
    out = hs.pp.image_features(a, img=_tiny(), patch_size=SIDE, copy=True, **FAST)  # as wide as the image: fine
    assert out.obsm["img_features"].shape == (2, 16)
