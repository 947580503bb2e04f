"""`hs.io.add_image`: arrays and (pyramidal OME) TIFF paths placed into the bins' coordinate system, lazily."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
from spatialdata.transformations import Affine, get_transformation

import histospace.io as hsio


def rgb(h=300, w=400, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def matrix(element, cs):
    return get_transformation(element, cs).to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


def write_ome(path, img, mpp=0.25, levels=3):
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
        tw.write(img, subifds=levels - 1, tile=(64, 64), photometric="rgb", metadata=meta)
        for i in range(1, levels):
            tw.write(img[:: 2**i, :: 2**i], subfiletype=1, tile=(64, 64), photometric="rgb")
    return path


def test_array_with_scale_and_offset(gem_path):
    sdata = hsio.read_gem(gem_path, bin_size=10)
    img = rgb()
    hsio.add_image(sdata, img, scale=0.5, offset=(-3, 4), scale_factors=[])
    el = sdata.images["he"]
    assert el.dims == ("c", "y", "x") and el.shape == (3, 300, 400) and isinstance(el.data, da.Array)
    np.testing.assert_allclose(matrix(el, "global"), [[0.5, 0, -3], [0, 0.5, 4], [0, 0, 1]])
    np.testing.assert_array_equal(el.data[:, 10:12, 20:23].compute(), img[10:12, 20:23].transpose(2, 0, 1))
    # channels-first and greyscale arrays; an affine; default pyramid
    hsio.add_image(sdata, img.transpose(2, 0, 1), image_key="cf", affine=[[1, 0, 2], [0, 1, 3]])
    assert sdata.images["cf"].shape == (3, 300, 400)  # small: one level by default
    assert isinstance(get_transformation(sdata.images["cf"], "global"), Affine)
    hsio.add_image(sdata, img[:, :, 0], image_key="grey", scale=2, scale_factors=[2])
    assert sdata.images["grey"]["scale1"]["image"].shape == (1, 150, 200)


def test_ome_tiff_native_levels_and_mpp(tmp_path, gem_path):
    sdata = hsio.read_gem(gem_path, bin_size=10)  # 0.5 µm per DNB
    img = rgb(260, 300)
    path = write_ome(tmp_path / "he.ome.tif", img, mpp=0.25)
    hsio.add_image(sdata, path, offset=(1, 2))
    tree = sdata.images["he"]
    assert list(tree.keys()) == ["scale0", "scale1", "scale2"]  # the file's own levels
    assert tree["scale1"]["image"].shape == (3, 130, 150)
    np.testing.assert_allclose(matrix(tree, "global"), [[0.5, 0, 1], [0, 0.5, 2], [0, 0, 1]])  # 0.25 / 0.5
    lvl1 = tree["scale1"]["image"]
    np.testing.assert_allclose(matrix(lvl1, "global")[0, 0], 1.0)  # two pixels of level 0
    np.testing.assert_array_equal(
        tree["scale0"]["image"].data[:, 50:60, 70:75].compute(), img[50:60, 70:75].transpose(2, 0, 1)
    )
    # explicit mpp wins over the file
    hsio.add_image(sdata, path, image_key="he2", mpp=1.0)
    np.testing.assert_allclose(matrix(sdata.images["he2"], "global")[0, 0], 2.0)


def test_levels_carry_the_pixel_centre_coordinates_of_image2dmodel(tmp_path, gem_path):
    # the coordinates spatialdata's Image2DModel.parse gives a multiscale image (set here without its private helper)
    sdata = hsio.read_gem(gem_path, bin_size=10)
    hsio.add_image(sdata, write_ome(tmp_path / "he.ome.tif", rgb(261, 301), mpp=0.25))
    tree = sdata.images["he"]
    for name in tree:
        lvl = tree[name]["image"]
        for ax, full in (("y", 261), ("x", 301)):
            n = lvl.sizes[ax]
            np.testing.assert_allclose(lvl.coords[ax].to_numpy(), np.linspace(0, full, n + 1)[:-1] + full / n / 2)


def test_plain_tiff_and_png(tmp_path, gem_path):
    from PIL import Image

    sdata = hsio.read_gem(gem_path, bin_size=10)
    img = rgb(120, 90)
    tifffile.imwrite(
        tmp_path / "a.tif", img, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER"
    )
    hsio.add_image(sdata, tmp_path / "a.tif")
    np.testing.assert_allclose(matrix(sdata.images["he"], "global")[0, 0], 1.0)  # 0.5 µm/px over 0.5 µm/DNB
    Image.fromarray(img).save(tmp_path / "a.png")
    hsio.add_image(sdata, tmp_path / "a.png", image_key="png", scale=1)
    np.testing.assert_array_equal(sdata.images["png"].data.compute(), img.transpose(2, 0, 1))


def test_errors(tmp_path, gem_path):
    sdata = hsio.read_gem(gem_path, bin_size=10)
    with pytest.raises(ValueError, match="µm per pixel is unknown"):
        hsio.add_image(sdata, rgb())
    sdata.attrs.clear()
    with pytest.raises(ValueError, match="µm per unit of 'global' is unknown"):
        hsio.add_image(sdata, rgb(), mpp=0.5)
    with pytest.raises(FileNotFoundError):
        hsio.add_image(sdata, tmp_path / "none.tif", scale=1)
    with pytest.raises(ValueError, match="shape"):
        hsio.add_image(sdata, np.zeros((5, 6, 7, 8)), scale=1)
    with pytest.raises(ValueError, match="at most one"):
        hsio.add_image(sdata, rgb(), scale=1, affine=np.eye(3))
    with pytest.raises(ValueError, match="affine"):
        hsio.add_image(sdata, rgb(), affine=np.eye(2))
    with pytest.raises(ValueError, match="scale"):
        hsio.add_image(sdata, rgb(), scale=-1)
    with pytest.raises(TypeError, match="transformation"):
        hsio.add_image(sdata, rgb(), transformation=np.eye(3))
    hsio.add_image(sdata, rgb(), scale=1)
    with pytest.raises(ValueError, match="exists already"):
        hsio.add_image(sdata, rgb(), scale=1)
    with pytest.raises(TypeError, match="SpatialData"):
        hsio.add_image(sdata.tables["bin10"], rgb(), scale=1)


def test_zarr_round_trip(tmp_path, gem_path):
    from spatialdata import read_zarr

    sdata = hsio.read_gem(gem_path, bin_size=10)
    img = rgb(200, 150)
    hsio.add_image(sdata, write_ome(tmp_path / "he.ome.tif", img), offset=(5, 5))
    sdata.write(tmp_path / "s.zarr")
    back = read_zarr(tmp_path / "s.zarr")
    np.testing.assert_allclose(matrix(back.images["he"], "global"), matrix(sdata.images["he"], "global"))
    np.testing.assert_array_equal(back.images["he"]["scale0"]["image"].data.compute(), img.transpose(2, 0, 1))
    assert list(back.images["he"].keys()) == ["scale0", "scale1", "scale2"]


def test_empty_spatialdata_gets_the_image_in_global(tmp_path):
    """An H&E-only slide: nothing to register to, so the image goes into spatialdata's default system."""
    from spatialdata import SpatialData

    sdata = SpatialData()
    path = write_ome(tmp_path / "he.ome.tif", rgb(260, 300), mpp=0.25)
    hsio.add_image(sdata, path, image_key="he")
    assert list(sdata.coordinate_systems) == ["global"]
    assert sdata.images["he"]["scale0"]["image"].shape == (3, 260, 300)
    np.testing.assert_allclose(matrix(sdata.images["he"], "global"), np.eye(3))  # units: full-resolution pixels
    assert hsio.microns_per_unit(sdata, "global") == pytest.approx(0.25)  # the file's µm per pixel
    sdata2 = SpatialData()
    with pytest.warns(UserWarning, match="No element"):  # new systems, named by the user
        hsio.add_image(sdata2, path, image_key="a", coordinate_system="one")
        hsio.add_image(sdata2, path, image_key="b", coordinate_system="two")
    with pytest.raises(ValueError, match="coordinate systems"):  # once there are several, the choice is the user's
        hsio.add_image(sdata2, path, image_key="c")


def _state(sdata):
    """What `add_image` may change: element names, coordinate systems and the recorded µm per unit."""
    import copy

    return (
        {k: sorted(getattr(sdata, k)) for k in ("images", "labels", "shapes", "points", "tables")},
        sorted(sdata.coordinate_systems),
        copy.deepcopy(dict(sdata.attrs)),
    )


@pytest.mark.parametrize("name", ["mpp", "microns_per_pixel"])
@pytest.mark.parametrize("bad", [0, -0.25, np.nan])
@pytest.mark.filterwarnings("ignore:`microns_per_pixel=`:FutureWarning")
def test_mpp_named_and_nothing_written(tmp_path, gem_path, bad, name):
    """`mpp <= 0` (or its deprecated alias) names the argument given (not `scale`), with bins or on an empty
    SpatialData, and leaves `sdata` as it was (the empty one used to get the image before the error)."""
    from spatialdata import SpatialData

    path = write_ome(tmp_path / "he.ome.tif", rgb(130, 150), mpp=0.25, levels=1)
    for sdata in (hsio.read_gem(gem_path, bin_size=10), SpatialData()):
        before = _state(sdata)
        for image in (rgb(), path):
            with pytest.raises(ValueError, match=rf"`{name}` must be a positive number") as e:
                hsio.add_image(sdata, image, **{name: bad})
            assert "scale" not in str(e.value)
            assert _state(sdata) == before


def test_bad_attrs_raise_before_the_image_is_added(tmp_path):
    """An empty SpatialData whose µm-per-unit record cannot be written: the error comes before the image is added."""
    from spatialdata import SpatialData

    sdata = SpatialData()
    sdata.attrs["histospace"] = "not a dict"
    before = _state(sdata)
    with pytest.raises(TypeError, match=r"`sdata.attrs\['histospace'\]` is a str, expected a dict; remove or fix it"):
        hsio.add_image(sdata, rgb(), mpp=0.5)
    assert _state(sdata) == before


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (
            "cut in the header",
            r"Could not read the TIFF file '.*d\.tif': it is damaged or not a TIFF.*copy or download",
        ),
        ("corrupt IFD", r"Could not read the TIFF file '.*d\.tif': it is damaged or not a TIFF.*copy or download"),
        ("first IFD beyond the end", r"The TIFF file '.*d\.tif' is truncated: its header points to the first IFD"),
        ("cut in the pixels", r"The TIFF file '.*d\.tif' is truncated: 1 of the 1 tiles/strips .*copy or download"),
    ],
)
def test_damaged_tiff_named(tmp_path, damage, match):
    """A damaged TIFF raises ValueError naming the file and the fix (a first IFD beyond the end was a bare
    IndexError, a file cut in its pixels was added without a word); nothing is added."""
    from spatialdata import SpatialData

    tifffile.imwrite(tmp_path / "p.tif", rgb(64, 64), photometric="rgb")
    data = bytearray((tmp_path / "p.tif").read_bytes())
    if damage == "cut in the header":
        data = data[:4]
    elif damage == "corrupt IFD":
        data[8:10] = b"\xff\xff"  # 65535 tags in the first IFD
    elif damage == "first IFD beyond the end":
        data[4:8] = (10**8).to_bytes(4, "little")
    else:
        data = data[: len(data) - 20]
    (tmp_path / "d.tif").write_bytes(bytes(data))
    sdata = SpatialData()
    with pytest.raises(ValueError, match=match):
        hsio.add_image(sdata, tmp_path / "d.tif", scale=1)
    assert _state(sdata) == _state(SpatialData())
