"""Tests of the shared renderer (histospace.pl._render): spots as discs, bins as squares, raster above a threshold."""

from __future__ import annotations

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import EllipseCollection, PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.image import AxesImage

from histospace.pl import _render as render


def _grid(n_rows, n_cols, pitch=16.0, origin=(8.0, 8.0), holes=0.0, seed=0):
    rng = np.random.default_rng(seed)
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    r, c = r.ravel(), c.ravel()
    keep = rng.random(r.size) >= holes
    r, c = r[keep], c[keep]
    xy = np.column_stack([c * pitch + origin[0], r * pitch + origin[1]])
    return r, c, xy


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


@pytest.mark.parametrize("max_pixels", [10_000, 40_000, 1_000_000])
def test_raster_squares_on_the_grid_are_exact(max_pixels):
    r, c, xy = _grid(30, 40, holes=0.2)
    raster, extent = render.raster_index(xy, shape="square", size=16.0, max_pixels=max_pixels)
    left, right, bottom, top = extent
    h, w = raster.shape
    p = (right - left) / w
    assert (bottom - top) / h == pytest.approx(p)  # square pixels, y pointing down
    k = 16.0 / p
    assert k == pytest.approx(round(k)) and 1 <= round(k) <= 8 and h * w <= max_pixels
    counts = np.bincount(raster[raster >= 0], minlength=xy.shape[0])
    assert np.all(counts == round(k) ** 2)  # every bin covers exactly its square: area = side^2
    # the pixel at each bin centre belongs to that bin, and the square spans [x - 8, x + 8)
    ix = ((xy[:, 0] - left) / p).astype(int)
    iy = ((xy[:, 1] - top) / p).astype(int)
    np.testing.assert_array_equal(raster[iy, ix], np.arange(xy.shape[0]))
    assert left == pytest.approx(xy[:, 0].min() - 8.0) and top == pytest.approx(xy[:, 1].min() - 8.0)
    assert (raster < 0).sum() == h * w - counts.sum()  # the holes stay empty


def test_raster_discs_have_their_area():
    xy = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    raster, extent = render.raster_index(xy, shape="circle", size=40.0, max_pixels=200_000)
    p = (extent[1] - extent[0]) / raster.shape[1]
    counts = np.bincount(raster[raster >= 0], minlength=4)
    np.testing.assert_allclose(counts * p**2, np.pi * 20.0**2, rtol=0.15)


def test_raster_coarse_keeps_every_element():
    # more elements than pixels per element allow: each still gets its own pixel when they do not overlap
    _, _, xy = _grid(30, 30, pitch=100.0)
    raster, extent = render.raster_index(xy, shape="square", size=1.0, max_pixels=10_000)
    assert raster.size <= 10_000 * 1.01
    assert (extent[1] - extent[0]) / raster.shape[1] > 1.0  # pixels larger than the elements
    assert np.array_equal(np.unique(raster[raster >= 0]), np.arange(xy.shape[0]))


def test_draw_image_extent():
    _, ax = plt.subplots()
    img = np.zeros((20, 30, 3), dtype=np.uint8)
    im = render.draw_image(ax, img, scale=0.5)
    # pixel i is centred on coordinate i / scale
    assert im.get_extent() == pytest.approx([-1.0, 59.0, 39.0, -1.0])
    with pytest.raises(ValueError, match="scale"):
        render.draw_image(ax, img, scale=0)
    with pytest.raises(ValueError, match="shape"):
        render.draw_image(ax, np.zeros((2, 3, 5)))


def test_draw_values_patches_below_threshold():
    _, c, xy = _grid(5, 6)
    vals = np.arange(xy.shape[0], dtype=float)
    vals[3] = np.nan
    fig, ax = plt.subplots()
    art = render.draw_values(ax, xy, vals, size=16.0, shape="square", vmin=-1, vmax=50, cmap="magma")
    assert isinstance(art, PolyCollection) and not ax.get_images()
    assert art.get_clim() == (-1, 50)
    assert len(art.get_paths()) == xy.shape[0] - 1  # the NaN is not drawn
    verts = art.get_paths()[0].vertices
    assert np.ptp(verts[:, 0]) == pytest.approx(16.0) and np.ptp(verts[:, 1]) == pytest.approx(16.0)
    fig.colorbar(art, ax=ax)
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # y down
    _, ax = plt.subplots()
    art = render.draw_values(ax, xy, vals, size=10.0)  # spots: discs of diameter 10
    assert isinstance(art, EllipseCollection)
    assert art.get_clim() == (0.0, float(np.nanmax(vals)))


def test_draw_values_raster_above_threshold(monkeypatch):
    monkeypatch.setattr(render, "RASTER_THRESHOLD", 100)
    _, c, xy = _grid(20, 30)
    vals = c.astype(float)
    fig, ax = plt.subplots()
    art = render.draw_values(ax, xy, vals, size=16.0, shape="square", vmin=0, vmax=100)
    assert isinstance(art, AxesImage) and not ax.collections
    assert art.get_clim() == (0, 100)
    data = art.get_array()
    left, _, _, top = art.get_extent()
    p = 16.0 / round(16.0 / ((art.get_extent()[1] - left) / data.shape[1]))
    iy, ix = ((xy[:, 1] - top) / p).astype(int), ((xy[:, 0] - left) / p).astype(int)
    np.testing.assert_array_equal(np.asarray(data[iy, ix]), vals)
    fig.colorbar(art, ax=ax)
    # rasterize=False forces patches
    _, ax = plt.subplots()
    assert isinstance(render.draw_values(ax, xy, vals, size=16.0, shape="square", rasterize=False), PolyCollection)


def test_draw_categories_raster_colours():
    _, c, xy = _grid(10, 12)
    codes = (c // 4).astype(int)
    codes[0] = -1
    colors = ["#ff0000", "#00ff00", "#0000ff"]
    _, ax = plt.subplots()
    im = render.draw_categories(ax, xy, codes, colors, size=16.0, shape="square", rasterize=True, alpha=0.5)
    rgba = im.get_array()
    left, right, _, top = im.get_extent()
    p = (right - left) / rgba.shape[1]
    iy, ix = ((xy[:, 1] - top) / p).astype(int), ((xy[:, 0] - left) / p).astype(int)
    got = rgba[iy, ix] / 255.0
    want = np.array([to_rgba(colors[k]) if k >= 0 else to_rgba("lightgray") for k in codes])
    want[:, 3] = 0.5
    np.testing.assert_allclose(got, want, atol=1 / 255)
    with pytest.raises(ValueError, match="codes"):
        render.draw_categories(ax, xy, codes + 5, colors, size=16.0)


def test_element_geometry_bins_and_spots(adata):
    # bins: rotated Visium HD-like grid, Space Ranger barcodes -> squares of the grid pitch
    r, c, xy = _grid(8, 9, pitch=13.5)
    th = 0.02
    xy = xy @ np.array([[np.cos(th), np.sin(th)], [-np.sin(th), np.cos(th)]])
    names = [f"s_008um_{a:05d}_{b:05d}-1" for a, b in zip(r, c, strict=True)]
    bins = ad.AnnData(obs=pd.DataFrame({"array_row": r, "array_col": c}, index=names))
    bins.obsm["spatial"] = xy
    shape, size = render.element_geometry(bins)
    assert shape == "square" and size == pytest.approx(13.5)
    # spots: the fixture's 55-px discs, else 0.8 x the nearest-neighbour distance
    assert render.element_geometry(adata, diameter=55.0) == ("circle", 55.0)
    assert render.element_geometry(adata) == ("circle", pytest.approx(80.0))


def test_category_colors():
    cats = ["a", "b", "c"]
    assert render.category_colors(cats, ["red", "green", "blue"]) == ["#ff0000", "#008000", "#0000ff"]
    assert render.category_colors(cats, {"a": "k", "b": "w", "c": "r"})[0] == "#000000"
    assert len(render.category_colors(cats, "tab10")) == 3
    assert render.category_colors(cats, stored=["#111111", "#222222", "#333333"])[2] == "#333333"
    assert len(set(render.category_colors([str(i) for i in range(150)]))) == 150
    with pytest.raises(KeyError, match="palette"):
        render.category_colors(cats, {"a": "k"})
    with pytest.raises(ValueError, match="palette"):
        render.category_colors(cats, ["red"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"shape": "hexagon"}, "shape"), ({"size": 0.0}, "size"), ({"size": np.nan}, "size")],
)
def test_draw_values_errors(kwargs, match):
    _, ax = plt.subplots()
    args = {"size": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        render.draw_values(ax, np.zeros((3, 2)), np.zeros(3), **args)
    with pytest.raises(ValueError, match="xy"):
        render.draw_values(ax, np.zeros((4, 2)), np.zeros(3), size=1.0)
