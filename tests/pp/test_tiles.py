"""Tests of `hs.pp.tile_image` on a synthetic H&E-like image: a pink blob on white glass."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from torch import nn

import histospace as hs

H, W = 1200, 1600
CY, CX, RY, RX = 600, 700, 400, 500  # the blob: an ellipse


def _blob_image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    inside = ((yy - CY) / RY) ** 2 + ((xx - CX) / RX) ** 2 <= 1
    img = np.full((H, W, 3), 244.0) + rng.normal(0, 3, size=(H, W, 3))
    pink = np.array([205.0, 120.0, 175.0]) + rng.normal(0, 25, size=(H, W, 3))
    img[inside] = pink[inside]
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def blob():
    return _blob_image()


def _inside(xy, margin=0.0):
    return ((xy[:, 1] - CY) / (RY + margin)) ** 2 + ((xy[:, 0] - CX) / (RX + margin)) ** 2 <= 1


with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)
    TINY = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
FAST = {"encoder": TINY, "weights": None, "input_size": 32, "progress_bar": False, "device": "cpu"}


def test_tiles_slots(blob):
    tiles = hs.pp.tile_image(blob, tile_size=100, library_id="slide", mpp=0.5, hires_max_size=400)
    n = tiles.n_obs
    assert tiles.X.shape == (n, 0) and tiles.X.dtype == np.float32
    xy = tiles.obsm["spatial"]
    assert xy.shape == (n, 2) and xy.dtype == np.float64
    assert tiles.obs["array_row"].dtype == np.int64 and tiles.obs["array_col"].dtype == np.int64
    np.testing.assert_allclose(xy[:, 0], tiles.obs["array_col"] * 100 + 50)
    np.testing.assert_allclose(xy[:, 1], tiles.obs["array_row"] * 100 + 50)
    assert tiles.obs["library_id"].dtype == "category" and set(tiles.obs["library_id"]) == {"slide"}
    assert tiles.obs_names.is_unique
    assert ((tiles.obs["tissue_fraction"] >= 0.5) & (tiles.obs["tissue_fraction"] <= 1)).all()
    lib = tiles.uns["spatial"]["slide"]
    hires = lib["images"]["hires"]
    assert hires.dtype == np.uint8 and hires.ndim == 3 and max(hires.shape[:2]) <= 400
    sf = lib["scalefactors"]
    assert sf["spot_diameter_fullres"] == 100.0
    assert sf["tissue_hires_scalef"] == pytest.approx(0.25)
    assert lib["metadata"]["spot_diameter_um"] == pytest.approx(50.0)
    assert "source_image_path" not in lib["metadata"]  # array input: pass img= again to image_features
    p = tiles.uns["tile_image"]["params"]
    assert p["tile_size"] == 100 and p["stride"] == 100 and p["tissue_only"] is True
    assert 0.05 <= p["tissue_threshold"] < 1
    assert isinstance(tiles.uns["tile_image"]["version"], str)


def test_tiles_cover_the_tissue(blob):
    tiles = hs.pp.tile_image(blob, tile_size=100)
    xy = tiles.obsm["spatial"]
    assert _inside(xy, margin=60).all()  # no tile on the white glass
    expected = np.pi * RX * RY / 100**2  # blob area in tiles
    assert 0.85 * expected <= tiles.n_obs <= 1.1 * expected
    all_tiles = hs.pp.tile_image(blob, tile_size=100, tissue_only=False)
    assert all_tiles.n_obs == (H // 100) * (W // 100)
    half = hs.pp.tile_image(blob, tile_size=100, stride=50)
    assert half.n_obs > 3 * tiles.n_obs


def test_tiles_deterministic_and_round_trip(blob, tmp_path):
    a = hs.pp.tile_image(blob, tile_size=100)
    b = hs.pp.tile_image(blob, tile_size=100)
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    a.write_h5ad(tmp_path / "tiles.h5ad")
    back = ad.read_h5ad(tmp_path / "tiles.h5ad")
    np.testing.assert_array_equal(back.obsm["spatial"], a.obsm["spatial"])
    np.testing.assert_array_equal(
        back.uns["spatial"]["he"]["images"]["hires"], a.uns["spatial"]["he"]["images"]["hires"]
    )
    assert back.uns["tile_image"]["params"]["tile_size"] == 100
    assert back.obs["array_row"].tolist() == a.obs["array_row"].tolist()


@pytest.mark.parametrize("fmt", ["png", "jpg", "tif"])
def test_tiles_from_file_then_image_features(blob, tmp_path, fmt):
    """A path gives metadata['source_image_path']; image_features then reads the full-resolution file."""
    path = tmp_path / f"slide.{fmt}"
    if fmt == "tif":
        import tifffile

        tifffile.imwrite(path, blob, tile=(256, 256), compression="zlib")
    else:
        from PIL import Image

        Image.fromarray(blob).save(path, quality=95)
    tiles = hs.pp.tile_image(path, tile_size=100)
    ref = hs.pp.tile_image(blob, tile_size=100)
    assert abs(tiles.n_obs - ref.n_obs) <= 0.03 * ref.n_obs
    assert tiles.uns["spatial"]["he"]["metadata"]["source_image_path"] == str(path.resolve())
    out = hs.pp.image_features(tiles, copy=True, **FAST)
    assert out.obsm["img_features"].shape == (tiles.n_obs, 16)
    p = out.uns["img_features"]["params"]
    assert p["image"] == "fullres" and p["patch_size_px"] == 100.0
    if fmt != "jpg":  # lossless: same features as from the array
        arr = hs.pp.image_features(tiles, img=blob, copy=True, **FAST).obsm["img_features"]
        np.testing.assert_allclose(out.obsm["img_features"], arr, rtol=1e-4, atol=1e-6)


def test_tiles_from_image_container(blob):
    sq = pytest.importorskip("squidpy")
    tiles = hs.pp.tile_image(sq.im.ImageContainer(blob, layer="image"), tile_size=100)
    ref = hs.pp.tile_image(blob, tile_size=100)
    np.testing.assert_array_equal(tiles.obsm["spatial"], ref.obsm["spatial"])


def test_tiles_array_image_features_uses_hires_or_img(blob):
    tiles = hs.pp.tile_image(blob, tile_size=100)
    low = hs.pp.image_features(tiles, copy=True, **FAST)  # no source file: the hires copy in uns
    assert low.uns["img_features"]["params"]["image"] == "hires"
    full = hs.pp.image_features(tiles, img=blob, copy=True, **FAST)
    assert full.uns["img_features"]["params"]["image"] == "img"
    assert np.isfinite(full.obsm["img_features"]).all()


def test_many_tiles():
    img = np.full((2000, 2000, 3), 240, np.uint8)
    img[:, :] = [200, 110, 170]  # all tissue
    tiles = hs.pp.tile_image(img, tile_size=20, tissue_threshold=0.1)
    assert tiles.n_obs == 10_000


def test_tiles_bad_input(blob, tmp_path):
    white = np.full((500, 500, 3), 245, np.uint8)
    with pytest.raises(ValueError, match="No tile.*tissue_only=False"):
        hs.pp.tile_image(white, tile_size=100)
    assert hs.pp.tile_image(white, tile_size=100, tissue_only=False).n_obs == 25
    with pytest.raises(ValueError, match="tile_size.*larger than the image"):
        hs.pp.tile_image(blob, tile_size=5000)
    with pytest.raises(ValueError, match="tissue_fraction"):
        hs.pp.tile_image(blob, tissue_fraction=1.5)
    with pytest.raises(ValueError, match="stride"):
        hs.pp.tile_image(blob, stride=0)
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        hs.pp.tile_image(tmp_path / "nope.jpg")
    with pytest.raises(TypeError, match="img"):
        hs.pp.tile_image([1, 2, 3])
    with pytest.raises(ValueError, match="shape"):
        hs.pp.tile_image(np.zeros((4, 4, 4, 4)))


def _ome(path, img, mpp):
    import tifffile

    md = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
    tifffile.imwrite(path, img, photometric="rgb", tile=(256, 256), metadata=md)
    return path


def test_tiles_read_the_ome_tiff_microns_per_pixel(blob, tmp_path):
    """An OME-TIFF's PhysicalSizeX gives the tiles' µm per pixel, so `image_features(..., patch_size_um=)` works
    (it was ignored: the tiles had no µm and `patch_size_um` failed); a given `mpp` wins, with a warning."""
    from PIL import Image

    path = _ome(tmp_path / "he.ome.tif", blob, mpp=0.5)
    tiles = hs.pp.tile_image(path, tile_size=100, hires_max_size=400)
    meta = tiles.uns["spatial"]["he"]["metadata"]
    assert meta["microns_per_pixel"] == pytest.approx(0.5)
    assert meta["spot_diameter_um"] == pytest.approx(50.0)
    assert tiles.uns["tile_image"]["params"]["mpp"] == pytest.approx(0.5)
    out = hs.pp.image_features(tiles, patch_size_um=50.0, copy=True, **FAST)
    assert out.uns["img_features"]["params"]["patch_size_px"] == pytest.approx(100.0)
    with pytest.warns(UserWarning, match=r"`mpp=0.25` differs from the file's metadata"):
        given = hs.pp.tile_image(path, tile_size=100, hires_max_size=400, mpp=0.25)
    assert given.uns["spatial"]["he"]["metadata"]["microns_per_pixel"] == pytest.approx(0.25)
    plain = tmp_path / "plain.png"
    Image.fromarray(blob).save(plain)
    assert "microns_per_pixel" not in hs.pp.tile_image(plain, tile_size=100).uns["spatial"]["he"]["metadata"]


def test_tiles_of_a_truncated_ome_tiff_raise(blob, tmp_path):
    """A file cut short is refused naming the file (a third of the tiles read as empty before, without a word)."""
    path = _ome(tmp_path / "he.ome.tif", blob, mpp=0.5)
    data = path.read_bytes()
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"The TIFF file '.*cut\.ome\.tif' is truncated: .* copy or download it again"):
        hs.pp.tile_image(cut, tile_size=100)
