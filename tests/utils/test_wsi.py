"""Multiscale images: whole-slide readers, OME-TIFF pyramids, SpatialData elements, squidpy ImageContainer crops."""

from __future__ import annotations

import pickle
import sys
import warnings

import numpy as np
import pytest
import tifffile

from histospace._image import (
    MultiscaleImage,
    coordinate_system_to_pixels,
    crop_patches,
    element_to_pixels,
    open_image,
    open_multiscale,
    open_slide,
    transform_xy,
)

H, W = 300, 400
TILE = (64, 64)


def block_mean(x: np.ndarray, k: int) -> np.ndarray:
    """`k x k` block mean of an `(h, w, 3)` uint8 image (whole blocks only), rounded to uint8."""
    h, w = x.shape[0] // k * k, x.shape[1] // k * k
    return np.rint(x[:h, :w].reshape(h // k, k, w // k, k, 3).mean(axis=(1, 3))).astype(np.uint8)


@pytest.fixture(scope="module")
def base() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ome_path(tmp_path_factory, base):
    """3-level pyramidal OME-TIFF (SubIFDs) with PhysicalSizeX/Y = 250 nm."""
    path = tmp_path_factory.mktemp("ome") / "slide.ome.tif"
    md = {
        "axes": "YXS",
        "PhysicalSizeX": 250,
        "PhysicalSizeXUnit": "nm",
        "PhysicalSizeY": 250,
        "PhysicalSizeYUnit": "nm",
    }
    with tifffile.TiffWriter(path) as tw:
        kw = {"tile": TILE, "photometric": "rgb", "compression": "zlib"}
        tw.write(base, subifds=2, metadata=md, **kw)
        tw.write(block_mean(base, 2), subfiletype=1, **kw)
        tw.write(block_mean(base, 4), subfiletype=1, **kw)
    return path


@pytest.fixture(scope="module")
def svs_path(tmp_path_factory, base):
    """Aperio-like SVS: tiled baseline 'Aperio Image Library ... |MPP = 0.5', stripped thumbnail, 2 reduced levels."""
    path = tmp_path_factory.mktemp("svs") / "slide.svs"
    head = "Aperio Image Library v12.0.15 \r\n"
    with tifffile.TiffWriter(path) as tw:
        kw = {"photometric": "rgb", "metadata": None}
        tiled = {"tile": TILE, "compression": "zlib", **kw}
        tw.write(base, description=f"{head}{W}x{H} [0,0 {W}x{H}] (64x64) RAW|AppMag = 20|MPP = 0.5", **tiled)
        tw.write(block_mean(base, 4), description=f"{head}{W}x{H} -> 100x75 - |AppMag = 20|MPP = 0.5", **kw)
        tw.write(block_mean(base, 2), description=f"{head}{W}x{H} -> 200x150 - |AppMag = 20|MPP = 0.5", **tiled)
        tw.write(block_mean(base, 4), description=f"{head}{W}x{H} -> 100x75 - |AppMag = 20|MPP = 0.5", **tiled)
    return path


def levels_of(base):
    return [base, block_mean(base, 2), block_mean(base, 4)]


def read_all(src):
    return src.read(0, src.height, 0, src.width)


# ---------------------------------------------------------------------------------------------------------- OME-TIFF


def test_ome_tiff_levels_regions_and_mpp(ome_path, base):
    ms = open_slide(ome_path)
    assert ms.reader == "tifffile"
    assert ms.vendor == "ome"
    assert ms.level_shapes == [(300, 400), (150, 200), (75, 100)]
    np.testing.assert_allclose(ms.downsamples, [[1, 1], [2, 2], [4, 4]])
    assert ms.mpp_xy == pytest.approx((0.25, 0.25))  # 250 nm
    for i, ref in enumerate(levels_of(base)):
        src = ms.source(i)
        assert src.mpp == pytest.approx(0.25 * 2**i)
        np.testing.assert_array_equal(read_all(src), ref)
        region = src.read(10, 40, 5, 60)
        assert region.dtype == np.uint8 and region.shape == (30, 55, 3)
        np.testing.assert_array_equal(region, ref[10:40, 5:60])
    # reads over the border are padded white
    out = ms.source(2).read(-3, 5, 95, 104)
    np.testing.assert_array_equal(out[3:, :5], levels_of(base)[2][0:5, 95:100])
    assert (out[:3] == 255).all() and (out[:, 5:] == 255).all()


def test_ome_tiff_to_dask_and_pickle(ome_path, base):
    ms = open_slide(ome_path)
    d = ms.to_dask(1, chunks=64)
    np.testing.assert_array_equal(np.asarray(d.compute()), block_mean(base, 2))
    src = pickle.loads(pickle.dumps(ms.source(1)))
    np.testing.assert_array_equal(src.read(3, 20, 7, 30), block_mean(base, 2)[3:20, 7:30])


def test_open_image_routes_tiff_through_open_slide(ome_path, base):
    src = open_image(ome_path, kind="fullres", scale=1.0)
    assert src.shape == (H, W)
    assert src.kind == "fullres"
    assert src.mpp == pytest.approx(0.25)
    np.testing.assert_array_equal(src.read(50, 60, 70, 90), base[50:60, 70:90])


def test_plain_tiff_memmap_and_resolution_tags(tmp_path, base):
    cm = tmp_path / "cm.tif"
    tifffile.imwrite(cm, base, resolution=(20000, 20000), resolutionunit="CENTIMETER")  # 0.5 µm per pixel
    ms = open_slide(cm)
    assert ms.n_levels == 1
    assert ms.levels[0].arr.memmap  # contiguous pixels: memory map, no decode
    assert ms.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(read_all(ms.source(0)), base)
    dpi = tmp_path / "dpi.tif"
    tifffile.imwrite(dpi, base, resolution=(72, 72), resolutionunit="INCH")  # a software default, not a pixel size
    assert open_slide(dpi).mpp is None
    um = tmp_path / "um_inch.tif"
    tifffile.imwrite(um, base, resolution=(25400 / 0.25, 25400 / 0.25), resolutionunit="INCH")
    assert open_slide(um).mpp == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------------------- SVS


def test_svs_openslide_reads_levels_and_mpp(svs_path, base):
    openslide = pytest.importorskip("openslide")
    slide = openslide.OpenSlide(str(svs_path))
    assert slide.properties["openslide.vendor"] == "aperio"
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    slide.close()
    ms = open_slide(svs_path)
    assert ms.reader == "openslide"
    assert ms.vendor == "aperio"
    assert ms.mpp == pytest.approx(0.5)
    assert ms.level_shapes == [(300, 400), (150, 200), (75, 100)]  # the stripped thumbnail is not a level
    for i, ref in enumerate(levels_of(base)):
        np.testing.assert_array_equal(read_all(ms.source(i)), ref)
        np.testing.assert_array_equal(ms.source(i).read(7, 33, 11, 52), ref[7:33, 11:52])


@pytest.mark.parametrize("reader", ["openslide", "tiffslide", "tifffile"])
def test_svs_every_reader_gives_the_same_pixels(svs_path, base, reader):
    pytest.importorskip(reader)
    ms = open_slide(svs_path, reader=reader)
    assert ms.reader == reader
    assert ms.vendor == "aperio"
    assert ms.mpp == pytest.approx(0.5)
    for i, ref in enumerate(levels_of(base)):
        np.testing.assert_array_equal(
            ms.source(i).read(-4, 30, 20, 45), np.pad(ref[0:30, 20:45], ((4, 0), (0, 0), (0, 0)), constant_values=255)
        )
    # picklable for DataLoader workers; the copy reopens the slide itself
    src = pickle.loads(pickle.dumps(ms.source(1)))
    np.testing.assert_array_equal(src.read(0, 10, 0, 10), block_mean(base, 2)[:10, :10])
    np.testing.assert_array_equal(np.asarray(ms.to_dask(2, chunks=32).compute()), block_mean(base, 4))


def test_openslide_composites_transparent_pixels_on_background():
    from histospace._image._levels import composite_rgba

    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [200, 100, 0, 128]]], dtype=np.uint8)
    out = composite_rgba(rgba, np.array([255, 255, 255], dtype=np.uint16).reshape(1, 1, 3))
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 2], [227, 177, 127])  # 200 * 128 / 255 + 255 * 127 / 255 = 227.4


# ---------------------------------------------------------------------------------------------------------- readers


def test_missing_openslide_message_and_fallbacks(svs_path, tmp_path, monkeypatch, base):
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(ImportError, match=r"pip install openslide-python openslide-bin"):
        open_slide(svs_path, reader="openslide")
    mrxs = tmp_path / "slide.mrxs"
    mrxs.write_bytes(b"not really a mirax slide")
    with pytest.raises(ImportError, match=r"pip install openslide-python openslide-bin"):
        open_slide(mrxs)
    pytest.importorskip("tiffslide")
    assert open_slide(svs_path).reader == "tiffslide"
    monkeypatch.setitem(sys.modules, "tiffslide", None)
    with pytest.raises(ImportError, match=r"pip install tiffslide"):
        open_slide(svs_path, reader="tiffslide")
    ms = open_slide(svs_path)
    assert ms.reader == "tifffile"
    assert ms.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(read_all(ms.source(1)), block_mean(base, 2))


def test_open_slide_errors(tmp_path, ome_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(ValueError, match="`reader` must be one of"):
        open_slide(ome_path, reader="bioformats")
    with pytest.raises(ValueError, match="`mpp` must be a positive"):
        open_slide(ome_path, mpp=-1)
    czi = tmp_path / "slide.czi"
    czi.write_bytes(b"ZISRAWFILE" + b"\x00" * 20)
    with pytest.raises(ValueError, match="No reader opens.*OME-TIFF"):
        open_slide(czi)
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(ValueError, match="Could not read the TIFF file"):
        open_slide(bad)


def test_user_mpp_fills_in_and_wins_with_warning(tmp_path, ome_path, base):
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, base)
    assert open_slide(plain).mpp is None
    assert open_slide(plain, mpp=0.4).mpp == pytest.approx(0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_slide(ome_path, mpp=0.2501).mpp == pytest.approx(0.2501)  # within 1%: no warning
    with pytest.warns(UserWarning, match="differs from the file's metadata"):
        ms = open_slide(ome_path, mpp=(0.3, 0.35))
    assert ms.mpp_xy == (0.3, 0.35)


# ---------------------------------------------------------------------------------------------------------- levels


def test_level_for_rule(ome_path, tmp_path, base):
    ms = open_slide(ome_path)  # downsamples 1, 2, 4 at 0.25 µm
    assert ms.level_for(mpp=0.25) == 0
    assert ms.level_for(mpp=0.2) == 0  # finer than level 0: level 0
    assert ms.level_for(mpp=0.49) == 0  # level 1 (0.5 µm) would be coarser than asked
    assert ms.level_for(mpp=0.5) == 1
    assert ms.level_for(mpp=0.9) == 1
    assert ms.level_for(mpp=1.0) == 2
    assert ms.level_for(mpp=50) == 2
    assert ms.level_for(downsample=3.9) == 1
    # a level whose size was rounded (downsample 4.02 for 4) still counts (1% tolerance)
    lv = [np.zeros((n, n, 3), np.uint8) for n in (1000, 500, 249)]
    odd = MultiscaleImage([open_image(x) for x in lv], mpp=0.25)
    assert odd.downsamples[2].max() == pytest.approx(1000 / 249)
    assert odd.level_for(downsample=4) == 2
    assert odd.level_for(downsample=3.95) == 1
    with pytest.raises(ValueError, match="exactly one of"):
        ms.level_for()
    with pytest.raises(ValueError, match="exactly one of"):
        ms.level_for(mpp=1, downsample=2)
    no_mpp = open_multiscale(base)
    with pytest.raises(ValueError, match=r"µm per pixel of this image is unknown.*mpp="):
        no_mpp.level_for(mpp=1.0)
    with pytest.raises(IndexError, match="levels 0..2"):
        ms.source(3)


def test_level_sources_map_fullres_coordinates(ome_path):
    ms = open_slide(ome_path)
    xy = np.array([[100.0, 60.0], [399.0, 299.0]])
    np.testing.assert_allclose(ms.source(0).to_pixels(xy), xy)
    np.testing.assert_allclose(ms.source(2).to_pixels(xy), xy / 4)
    np.testing.assert_allclose(ms.source(2).from_pixels(ms.source(2).to_pixels(xy)), xy)


def test_single_level_inputs(tmp_path, base):
    from PIL import Image

    png = tmp_path / "he.png"
    Image.fromarray(base).save(png)
    ms = open_multiscale(png, mpp=0.5)
    assert ms.n_levels == 1 and ms.reader == "pil" and ms.mpp == 0.5
    np.testing.assert_array_equal(read_all(ms.source(0).load()), base)
    arr = open_multiscale(base)
    assert arr.n_levels == 1 and arr.mpp is None
    np.testing.assert_array_equal(read_all(arr.source(0)), base)


# ---------------------------------------------------------------------------------------------------------- SpatialData


@pytest.fixture(scope="module")
def sdata():
    sd = pytest.importorskip("spatialdata")
    from spatialdata.models import Image2DModel, ShapesModel
    from spatialdata.transformations import Identity, Scale, Sequence, Translation

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (3, 64, 96), dtype=np.uint8)
    # image pixels -> global: scale by 2, then shift by (20, 10)
    t = Sequence([Scale([2.0, 2.0], axes=("y", "x")), Translation([20.0, 10.0], axes=("x", "y"))])
    image = Image2DModel.parse(arr, dims=("c", "y", "x"), scale_factors=[2, 2], transformations={"global": t})
    flat = Image2DModel.parse(arr, dims=("c", "y", "x"), transformations={"global": t})
    pix = np.array([[5.5, 7.5], [40.0, 30.0], [90.0, 60.0]])  # level-0 pixel (x, y)
    # the spots' own coordinates are in µm: global = 4 * intrinsic
    spots = ShapesModel.parse(
        (pix * 2 + [20.0, 10.0]) / 4,
        geometry=0,
        radius=np.ones(3),
        transformations={"global": Scale([4.0, 4.0], axes=("x", "y")), "other": Identity()},
    )
    s = sd.SpatialData(images={"he": image, "he_flat": flat}, shapes={"spots": spots})
    return s, arr, pix


def test_spatialdata_multiscale_levels(sdata):
    s, arr, _ = sdata
    tree = s.images["he"]
    ms = open_multiscale(tree)
    assert ms.reader == "spatialdata"
    assert ms.level_shapes == [(64, 96), (32, 48), (16, 24)]
    np.testing.assert_allclose(ms.downsamples, [[1, 1], [2, 2], [4, 4]])
    for i in range(3):
        ref = np.moveaxis(np.asarray(next(iter(tree[f"scale{i}"].values())).data), 0, -1)
        np.testing.assert_array_equal(read_all(ms.source(i)), ref)
    single = open_multiscale(s.images["he_flat"])
    assert single.n_levels == 1
    np.testing.assert_array_equal(read_all(single.source(0)), np.moveaxis(arr, 0, -1))
    src = open_image(tree)  # existing callers get level 0
    np.testing.assert_array_equal(src.read(1, 5, 2, 9), np.moveaxis(arr, 0, -1)[1:5, 2:9])


def test_spatialdata_element_to_pixels(sdata):
    s, _, pix = sdata
    spots_xy = np.column_stack([s.shapes["spots"].geometry.x, s.shapes["spots"].geometry.y])
    m0 = element_to_pixels(s, image_key="he", element_key="spots", coordinate_system="global", level=0)
    assert m0.shape == (3, 3) and m0.dtype == np.float64
    np.testing.assert_allclose(transform_xy(m0, spots_xy), pix)
    ms = open_multiscale(s.images["he"])
    for level in (1, 2):
        m = element_to_pixels(s, image_key="he", element_key="spots", level=level)
        np.testing.assert_allclose(transform_xy(m, spots_xy), pix / 2**level)
        # the level's own spatialdata transformation agrees with the MultiscaleImage's downsample
        np.testing.assert_allclose(transform_xy(m, spots_xy), ms.source(level).to_pixels(pix))
    cs = coordinate_system_to_pixels(s, image_key="he", coordinate_system="global")
    np.testing.assert_allclose(transform_xy(cs, pix * 2 + [20.0, 10.0]), pix)
    m_flat = element_to_pixels(s, image_key="he_flat", element_key="spots")
    np.testing.assert_allclose(transform_xy(m_flat, spots_xy), pix)


def test_spatialdata_transform_errors(sdata):
    s, _, _ = sdata
    with pytest.raises(ValueError, match=r"'he' not in coordinate system 'other'.*\['global'\]"):
        element_to_pixels(s, image_key="he", element_key="spots", coordinate_system="other")
    with pytest.raises(KeyError, match="Coordinate system 'nope' not found"):
        element_to_pixels(s, image_key="he", element_key="spots", coordinate_system="nope")
    with pytest.raises(KeyError, match="no image 'missing'"):
        element_to_pixels(s, image_key="missing", element_key="spots")
    with pytest.raises(KeyError, match="no element 'cells'"):
        element_to_pixels(s, image_key="he", element_key="cells")
    with pytest.raises(IndexError, match="levels 0..2"):
        element_to_pixels(s, image_key="he", element_key="spots", level=3)


# ---------------------------------------------------------------------------------------------------------- squidpy


@pytest.fixture(scope="module")
def container():
    sq = pytest.importorskip("squidpy")
    yy, xx = np.mgrid[0:200, 0:240]
    img = np.stack([xx % 256, yy % 256, (xx + 2 * yy) % 256], axis=-1).astype(np.uint8)
    return sq.im.ImageContainer(img, layer="image"), img


SPOTS = np.array([[120.0, 100.0], [100.5, 80.0], [150.0, 130.0], [90.0, 70.0]])


def test_cropped_container_gives_the_patches_of_the_uncropped_one(container):
    ic, _ = container
    full = open_image(ic)
    ref = crop_patches(full, full.to_pixels(SPOTS), 24, 24)
    for crop in (
        ic.crop_corner(40, 50, size=(120, 150)),  # y, x
        ic.crop_center(110, 120, radius=60),
        ic.crop_corner(-10, 30, size=(180, 200)),  # runs over the top: squidpy pads, padding is part of the offset
    ):
        src = open_image(crop)
        assert src.shape != full.shape
        assert src.offset.any()
        np.testing.assert_array_equal(crop_patches(src, src.to_pixels(SPOTS), 24, 24), ref)


def test_cropped_scaled_container_offset(container):
    ic, _ = container
    crop = ic.crop_corner(40, 50, size=(120, 150), scale=0.5)
    src = open_image(crop)
    assert src.scale == 0.5
    np.testing.assert_allclose(src.offset, [50.0, 40.0])
    np.testing.assert_allclose(src.to_pixels(SPOTS), (SPOTS - [50.0, 40.0]) * 0.5)
    ms = open_multiscale(crop)
    np.testing.assert_allclose(ms.source(0).to_pixels(SPOTS), (SPOTS - [50.0, 40.0]) * 0.5)


def test_container_with_several_z_planes(container):
    sq = pytest.importorskip("squidpy")
    _, img = container
    stack = np.stack([img, 255 - img], axis=2)  # y, x, z, channels
    ic = sq.im.ImageContainer(stack, layer="image", dims=("y", "x", "z", "channels"), library_id=["a", "b"])
    with pytest.raises(ValueError, match=r"2 z-planes \['a', 'b'\]; pass `library_id=`.*crop_corner"):
        open_image(ic)
    np.testing.assert_array_equal(read_all(open_image(ic, library_id="b")), 255 - img)
    np.testing.assert_array_equal(read_all(open_image(ic, library_id="a")), img)
    with pytest.raises(KeyError, match="library_id='c'"):
        open_image(ic, library_id="c")
    one = ic.crop_corner(0, 0, library_id="b")  # the squidpy way the message suggests
    np.testing.assert_array_equal(read_all(open_image(one)), 255 - img)


_INHERITED = {}


def _read_in_child():
    import os

    src = _INHERITED["src"]  # inherited through fork, not pickled (as a DataLoader worker gets its dataset)
    region = src.read(5, 25, 10, 40)
    owner = src.arr.handle._pid if hasattr(src.arr, "handle") else src.arr._pid
    return os.getpid(), owner, region


@pytest.mark.parametrize("reader", ["openslide", "tifffile"])
def test_sources_reopen_in_forked_workers(svs_path, base, reader):
    """Forked workers must not share the parent's file handle: each process reopens the slide."""
    import multiprocessing as mp
    import os

    pytest.importorskip(reader)
    src = open_slide(svs_path, reader=reader).source(1)
    src.read(0, 8, 0, 8)  # the parent has the slide open
    _INHERITED["src"] = src
    try:
        with mp.get_context("fork").Pool(1) as pool:
            pid, owner, region = pool.apply(_read_in_child)
    finally:
        _INHERITED.clear()
    assert pid != os.getpid()
    assert owner == pid  # the child opened its own handle
    np.testing.assert_array_equal(region, block_mean(base, 2)[5:25, 10:40])


def test_level_downsample_reads_strips(svs_path, base):
    pytest.importorskip("openslide")
    src = open_slide(svs_path, reader="openslide").source(0)
    np.testing.assert_array_equal(src.downsample(2, rows_per_chunk=64), block_mean(base, 2))


def test_multiscale_downsample_reads_the_best_level(ome_path, base):
    ms = open_slide(ome_path)
    np.testing.assert_array_equal(ms.downsample(4), block_mean(base, 4))  # level 2 as stored
    out = ms.downsample(8)  # level 2 (75 x 100), then 2 x 2 blocks; the last row is a partial block
    assert out.shape == (38, 50, 3)
    np.testing.assert_array_equal(out[:37], block_mean(block_mean(base, 4), 2))
    np.testing.assert_array_equal(out[37], block_mean(np.repeat(block_mean(base, 4)[74:75], 2, axis=0), 2)[0])
    np.testing.assert_array_equal(ms.downsample(2), block_mean(base, 2))
    out = ms.downsample(3)  # no level divides 3: level 0, block mean by 3, partial border blocks
    assert out.shape == (100, 134, 3)
    np.testing.assert_array_equal(out[:99, :133], block_mean(base, 3)[:99, :133])


@pytest.mark.parametrize("reader", ["openslide", "tiffslide", "tifffile"])
def test_close_and_reopen(svs_path, base, reader):
    pytest.importorskip(reader)
    with open_slide(svs_path, reader=reader) as ms:
        np.testing.assert_array_equal(ms.source(2).read(0, 5, 0, 5), block_mean(base, 4)[:5, :5])
    np.testing.assert_array_equal(ms.source(2).read(0, 5, 0, 5), block_mean(base, 4)[:5, :5])  # reopens


def test_dask_level_reads_through_a_cache_of_chunks(base):
    import dask.array as da

    from histospace._image import ImageSource, read_order
    from histospace._image._levels import DaskLevel

    computed = []

    def count(block):
        computed.append(block.shape)
        return block

    arr = da.from_array(base, chunks=(64, 64, 3)).map_blocks(count, dtype=base.dtype)
    chunk_bytes = 64 * 64 * 3
    lvl = DaskLevel(arr, cache_bytes=6 * chunk_bytes)
    rng = np.random.default_rng(1)
    for _ in range(50):  # regions, integer and stepped indices, empty ranges: the numpy result
        y0, x0 = rng.integers(0, H), rng.integers(0, W)
        y1, x1 = y0 + rng.integers(0, 90), x0 + rng.integers(0, 90)
        np.testing.assert_array_equal(lvl[y0:y1, x0:x1], base[y0:y1, x0:x1])
        np.testing.assert_array_equal(lvl[y0:y1:2, x0, 1:], base[y0:y1:2, x0, 1:])
        assert lvl._cached_bytes <= lvl.cache_bytes
    np.testing.assert_array_equal(lvl[:, :], base)  # more chunks than the cache holds: computed directly
    assert lvl._cached_bytes <= lvl.cache_bytes
    big = DaskLevel(arr, cache_bytes=100 * chunk_bytes)  # reads over more than 2 x 2 chunks bypass the cache
    np.testing.assert_array_equal(big[0:150, 0:150], base[0:150, 0:150])
    assert not big._cache
    np.testing.assert_array_equal(big[60:70, 60:70], base[60:70, 60:70])
    assert len(big._cache) == 4

    # 30-px windows over the image in chunk order decode each chunk at most twice (in row-major order: many times)
    src = ImageSource(DaskLevel(arr, cache_bytes=6 * chunk_bytes), "YXC")
    ys, xs = np.meshgrid(np.arange(0, H - 30, 10), np.arange(0, W - 30, 10), indexing="ij")
    starts = np.c_[xs.ravel(), ys.ravel()].astype(float)
    order = read_order(src, starts)
    assert sorted(order.tolist()) == list(range(len(starts)))
    assert read_order(ImageSource(base, "YXC"), starts) is None  # not chunked: any order
    computed.clear()
    for x, y in starts[order].astype(int):
        np.testing.assert_array_equal(src.read(y, y + 30, x, x + 30), base[y : y + 30, x : x + 30])
    n_chunks = arr.numblocks[0] * arr.numblocks[1]
    assert n_chunks <= len(computed) <= 2 * n_chunks

    # workers get a copy without the cache, which works on its own
    plain = DaskLevel(da.from_array(base, chunks=(64, 64, 3)))
    plain[0:10, 0:10]
    copy = pickle.loads(pickle.dumps(plain))  # as DataLoader workers get it
    assert plain._cache and copy._cached_bytes == 0 and not copy._cache
    np.testing.assert_array_equal(copy[10:20, 30:40], base[10:20, 30:40])


# ------------------------------------------------------------------------------------- one µm-per-pixel rule, damage
def _rule_files(tmp_path, base, ome_path, svs_path):
    """Files and the µm per pixel the one rule gives them (`None`: unknown)."""
    kw = {"photometric": "rgb", "tile": TILE}  # tiled, so that OpenSlide reads them too
    cm = tmp_path / "cm.tif"
    tifffile.imwrite(cm, base, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **kw)
    dpi600 = tmp_path / "dpi600.tif"  # a print default, not a pixel size
    tifffile.imwrite(dpi600, base, resolution=(600, 600), resolutionunit="INCH", **kw)
    dpi2400 = tmp_path / "dpi2400.tif"  # above 1200 dpi: a scanner's pixel size
    tifffile.imwrite(dpi2400, base, resolution=(2400, 2400), resolutionunit="INCH", **kw)
    return {ome_path: 0.25, svs_path: 0.5, cm: 0.5, dpi600: None, dpi2400: 25400 / 2400}


def test_one_mpp_rule_for_every_reader(tmp_path, base, ome_path, svs_path):
    """`open_slide` and `open_multiscale` (the wing's readers behind `pp.image_features`), `io.add_image` and
    `pp.tile_image` give a file the same µm per pixel, by the one rule of `histospace._image._mpp` (a 600-dpi TIFF
    got 42.3 µm/px from `io.add_image` and none from `open_slide`)."""
    from spatialdata import SpatialData

    import histospace as hs
    import histospace.io as hsio

    slide_readers = [r for r in ("openslide", "tiffslide") if _importable(r)]
    for path, want in _rule_files(tmp_path, base, ome_path, svs_path).items():
        got = {"open_slide": open_slide(path, reader="tifffile").mpp, "open_multiscale": open_multiscale(path).mpp}
        if path != ome_path:  # OpenSlide does not read OME SubIFD pyramids
            got.update({f"open_slide {r}": open_slide(path, reader=r).mpp for r in slide_readers})
        sdata = SpatialData()
        hsio.add_image(sdata, path)
        got["add_image"] = hsio.microns_per_unit(sdata, "global")
        tiles = hs.pp.tile_image(path, tile_size=64, tissue_only=False, hires_max_size=100)
        got["tile_image"] = tiles.uns["spatial"]["he"]["metadata"].get("microns_per_pixel")
        for who, v in got.items():
            assert (v is None) if want is None else v == pytest.approx(want), (path.name, who, v)


@pytest.mark.parametrize("cut", ["tiles", "metadata", "last level"])
def test_truncated_ome_tiff_raises_naming_the_file(tmp_path, ome_path, cut, adata):
    """An OME-TIFF cut short was read without a word (missing tiles read as empty, the OME-XML and its
    PhysicalSizeX lost); every reader now raises ValueError naming the file, and `image_features` writes nothing."""
    from spatialdata import SpatialData

    import histospace as hs
    import histospace.io as hsio

    data = ome_path.read_bytes()
    with tifffile.TiffFile(ome_path) as tf:
        page = tf.pages[0]
        tiles_end = max(o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True))
        levels_start = min(min(lv.pages[0].dataoffsets) for lv in tf.series[0].levels[1:])
    at = {"tiles": tiles_end // 2, "metadata": len(data) - 10, "last level": levels_start + 10}[cut]
    path = tmp_path / "cut.ome.tif"
    path.write_bytes(data[:at])
    match = r"The TIFF file '.*cut\.ome\.tif' is truncated: .*copy or download it again"
    for reader in ("auto", "tifffile"):
        with pytest.raises(ValueError, match=match):
            open_slide(path, reader=reader)
    with pytest.raises(ValueError, match=match):
        hs.pp.tile_image(path, tile_size=64)
    sdata = SpatialData()
    with pytest.raises(ValueError, match=match):
        hsio.add_image(sdata, path)
    assert not sdata.images and not sdata.attrs
    before = (set(adata.obsm), set(adata.uns), set(adata.obs))
    with pytest.raises(ValueError, match=match):
        hs.pp.image_features(adata, img=path, encoder="mobilenet_v2", weights=None, input_size=32, progress_bar=False)
    assert (set(adata.obsm), set(adata.uns), set(adata.obs)) == before


@pytest.mark.data
@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs"])
def test_real_svs_whole_and_truncated(data_dir, tmp_path, name):
    """The real SVS scans pass the check and keep their µm per pixel under every reader; a copy cut short (which
    lost the reduced level or the label/macro images silently) raises naming the file under every reader."""
    from spatialdata import SpatialData

    import histospace.io as hsio

    src = data_dir / "wsi" / name
    if not src.exists():
        pytest.skip(f"{src} not found")
    want = 0.499 if name.startswith("CMU") else None
    readers = ("auto", "tifffile", *(r for r in ("openslide", "tiffslide") if _importable(r)))
    for reader in readers:
        mpp = open_slide(src, reader=reader).mpp
        assert (mpp is None) if want is None else mpp == pytest.approx(want), reader
    sdata = SpatialData()
    hsio.add_image(sdata, src)
    got = hsio.microns_per_unit(sdata, "global")
    assert (got is None) if want is None else got == pytest.approx(want)
    data = src.read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: int(len(data) * 0.95)])
    for reader in readers:
        with pytest.raises(ValueError, match=rf"The TIFF file '.*{name}' is truncated: .*copy or download it again"):
            open_slide(path, reader=reader)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
