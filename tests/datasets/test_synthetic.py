"""`hs.datasets` simulated tissue and platform files: determinism, consistency, and the real readers reading them."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import histospace.datasets as hsd
import histospace.io as hsio

W, H = 200.0, 160.0


@pytest.fixture(scope="module")
def tissue():
    return hsd.simulate_tissue(width_um=W, height_um=H, n_genes=40, random_state=1)


def test_tissue_determinism_and_domains(tissue):
    again = hsd.simulate_tissue(width_um=W, height_um=H, n_genes=40, random_state=1)
    other = hsd.simulate_tissue(width_um=W, height_um=H, n_genes=40, random_state=2)
    d = tissue.domain_image(2.0)
    np.testing.assert_array_equal(d, again.domain_image(2.0))
    assert (d != other.domain_image(2.0)).any()
    assert d.shape == (80, 100) and d.dtype == np.int16
    assert set(np.unique(d)) == {-1, *range(6)}  # background and all six domains
    assert 0.3 < (d >= 0).mean() < 0.8
    assert d[0, 0] == -1 and d[40, 50] >= 0  # glass in the corner, tissue in the middle
    blobs = hsd.simulate_tissue(width_um=W, height_um=H, layout="blobs", n_domains=5)
    assert set(np.unique(blobs.domain_image(2.0))) == {-1, *range(5)}
    # molecules: deterministic per tile, the same whatever window asks for them
    x, y, g = tissue.molecules(0, 0, W, H)
    x2, y2, g2 = tissue.molecules(30, 20, 130, 90)
    m = (x >= 30) & (x < 130) & (y >= 20) & (y < 90)
    key = lambda a, b, c: np.sort(np.round(a * 1e3) * 1e9 + np.round(b * 1e3) * 100 + c)
    np.testing.assert_array_equal(key(x[m], y[m], g[m]), key(x2, y2, g2))
    assert g.min() >= 0 and g.max() < 40


def test_expression_follows_domains(tissue):
    (_, _, counts), *rest = list(tissue.bin_counts(10.0, strip_um=1000))
    assert not rest and counts.shape == (16 * 20, 40) and counts.dtype == np.int32
    rows, cols = np.divmod(np.arange(counts.shape[0]), 20)
    dom = tissue.domain_at((cols + 0.5) * 10, (rows + 0.5) * 10)
    dense = counts.toarray()
    inside = dom >= 0
    assert dense[inside].sum(1).mean() > 8 * dense[~inside].sum(1).mean()  # tissue vs glass (edges blur it)
    for d, genes in tissue.markers.items():
        idx = [tissue.gene_names.index(g) for g in genes]
        sel = dom == d
        if sel.sum() < 3:
            continue
        in_d = dense[sel][:, idx].sum(1).mean() / dense[sel].sum(1).mean()
        out_d = dense[inside & ~sel][:, idx].sum(1).mean() / dense[inside & ~sel].sum(1).mean()
        assert in_d > 2 * out_d, d
    # bins nest: 2 µm counts summed by 5 give the 10 µm counts
    (_, _, fine), *_ = list(tissue.bin_counts(2.0))
    r2, c2 = np.divmod(np.arange(fine.shape[0]), 100)
    agg = sp.csr_matrix((np.ones(fine.shape[0]), ((r2 // 5) * 20 + c2 // 5, np.arange(fine.shape[0]))))
    np.testing.assert_array_equal((agg @ fine).toarray(), dense)
    # fine bins are sparse
    assert fine.nnz / np.prod(fine.shape) < 0.2


def test_render_is_window_invariant(tissue):
    for um_per_px, stain in ((0.25, "he"), (0.5, "ssdna"), (0.5, "cells"), (2.0, "he")):
        full = tissue.render(0, 0, um_per_px, 240, 180, stain=stain)
        part = tissue.render(37 * um_per_px, 21 * um_per_px, um_per_px, 90, 70, stain=stain)
        np.testing.assert_array_equal(full[21:91, 37:127], part)
    he = tissue.render(0, 0, 1.0, int(W), int(H))
    assert he.shape == (160, 200, 3) and he.dtype == np.uint8
    d = tissue.domain_image(1.0)
    glass, tis = he[d < 0].astype(float), he[d >= 0].astype(float)
    assert glass.mean() > 235 and tis.mean() < glass.mean() - 15  # white glass, stained tissue
    assert tis[:, 1].mean() < tis[:, 0].mean() - 30  # pink/purple: less green than red
    # nuclei density follows the domains: darker domains have more (or larger) nuclei
    lum = tissue.render(0, 0, 0.5, 400, 320).mean(2)
    dd = tissue.domain_image(0.5)
    dark = [(lum[dd == k] < 150).mean() for k in range(6)]
    assert max(dark) > 1.5 * min(dark)


def test_gem_round_trip(tmp_path, tissue):
    path = hsd.write_gem(tmp_path / "chip.gem.gz", tissue)
    text = __import__("gzip").open(path, "rt").read().splitlines()
    assert text[0] == "#FileFormat=GEMv0.1" and text[6] == "geneID\tx\ty\tMIDCount\tExonCount"
    sdata = hsio.read_gem(path, bin_size=20, exon=True)  # 20 DNB = 10 µm
    t = sdata.tables["bin20"]
    (_, _, counts), *_ = list(tissue.bin_counts(10.0))
    rows, cols = t.obs["array_row"].to_numpy(), t.obs["array_col"].to_numpy()
    ref = counts[rows * 20 + cols][:, [tissue.gene_names.index(g) for g in t.var_names]]
    np.testing.assert_array_equal(t.X.toarray(), ref.toarray())
    assert counts.sum() == t.X.sum()  # no molecule lost
    assert (t.layers["exon"] > t.X).nnz == 0 and t.layers["exon"].sum() < t.X.sum()
    plain = hsd.write_gem(tmp_path / "chip.gem", tissue, exon=False, count_column="MIDCounts", in_tissue_only=True)
    t2 = hsio.read_gem(plain, bin_size=20).tables["bin20"]
    assert t2.uns["gem"]["count_column"] == "MIDCounts" and 0 < t2.X.sum() < t.X.sum()


def test_visium_hd_read_by_spatialdata_io(tmp_path, tissue):
    spatialdata_io = pytest.importorskip("spatialdata_io")

    path = hsd.write_visium_hd(tmp_path / "hd", tissue, raw=True, dataset_id="sim")
    assert (path / "binned_outputs" / "square_016um" / "spatial" / "tissue_positions.parquet").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = spatialdata_io.visium_hd(path, load_segmentations_only=False, filtered_counts_file=False)
    assert set(sdata.tables) == {"square_002um", "square_008um", "square_016um"}
    assert {"sim_full_image", "sim_hires_image", "sim_lowres_image"} <= set(sdata.images)
    full = sdata.images["sim_full_image"]["scale0"]["image"]
    margin = 0.04 * W
    assert full.shape == (3, int(np.ceil((H + 2 * margin) / 0.5)), int(np.ceil((W + 2 * margin) / 0.5)))
    t2, t8 = sdata.tables["square_002um"], sdata.tables["square_008um"]
    assert t2.n_obs == 80 * 100 and t8.n_obs == 20 * 25
    assert hsio.microns_per_unit(sdata, "sim") == pytest.approx(0.5)
    # bin centres in full-resolution pixels: (x + margin) / 0.5
    o = t2.obs
    np.testing.assert_allclose(t2.obsm["spatial"][:, 0], ((o["array_col"] + 0.5) * 2 + margin) / 0.5)
    # the H&E at a bin centre shows the bin's domain: glass is white, tissue is not
    img = full.data.compute()
    px = np.round(t8.obsm["spatial"]).astype(int)
    lum = img[:, px[:, 1], px[:, 0]].mean(0)
    in_t = t8.obs["in_tissue"].to_numpy() == 1
    assert lum[~in_t].mean() > 230 > lum[in_t].mean()
    # 8 µm bins are the sums of their 2 µm bins (hs.io.rebin of the raw 2 µm table)
    hsio.rebin(sdata, factor=4, table_key="square_002um", key_added="re8")
    r8 = sdata.tables["re8"]
    a = pd.DataFrame(r8.X.toarray(), index=pd.MultiIndex.from_arrays([r8.obs.array_row, r8.obs.array_col]))
    b = pd.DataFrame(t8.X.toarray(), index=pd.MultiIndex.from_arrays([t8.obs.array_row, t8.obs.array_col]))
    pd.testing.assert_frame_equal(a.sort_index(), b.sort_index(), check_dtype=False)
    np.testing.assert_allclose(
        pd.DataFrame(r8.obsm["spatial"], index=a.index).sort_index().to_numpy(),
        pd.DataFrame(t8.obsm["spatial"], index=b.index).sort_index().to_numpy(),
    )
    # the filtered matrix holds the in-tissue bins only; one bin size can be written alone
    only = hsd.write_visium_hd(tmp_path / "hd8", tissue, bin_sizes=(8,), image=False, dataset_id="sim")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s8 = spatialdata_io.visium_hd(only, load_segmentations_only=False)
    assert list(s8.tables) == ["square_008um"] and s8.tables["square_008um"].n_obs == int(in_t.sum())


def test_stereoseq_read_by_spatialdata_io(tmp_path, tissue):
    spatialdata_io = pytest.importorskip("spatialdata_io")

    path = hsd.write_stereoseq(tmp_path / "saw", tissue, bin_sizes=(1, 20), gem=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = spatialdata_io.stereoseq(path)
    assert {"bin1_table", "bin20_table", "cells_table"} <= set(sdata.tables)
    assert {"SS200000135TL_D1_regist", "SS200000135TL_D1_mask"} <= set(sdata.images)
    assert sdata.images["SS200000135TL_D1_regist"]["scale0"]["image"].shape == (1, 320, 400)  # 1 px per DNB
    assert hsio.microns_per_unit(sdata, "global") == pytest.approx(0.5)
    b1, b20 = sdata.tables["bin1_table"], sdata.tables["bin20_table"]
    assert b1.X.sum() == b20.X.sum() > 0
    cells = sdata.tables["cells_table"]
    assert cells.n_obs == len(tissue.cells()) and 0 < cells.X.sum() < b1.X.sum()
    # the tissue GEM binned by hs.io.read_gem equals the GEF's bin20 (same bins, corners in DNB)
    gem = hsio.read_gem(path / "04.tissuecut" / "SS200000135TL_D1.tissue.gem.gz", bin_size=20).tables["bin20"]
    pts = sdata.points["bin20_genes"].compute()
    corner = pd.MultiIndex.from_arrays([pts["x"].to_numpy() // 20, pts["y"].to_numpy() // 20])
    gef = pd.DataFrame(b20.X.toarray(), index=corner, columns=b20.var_names)
    ours = pd.DataFrame(gem.X.toarray(), index=pd.MultiIndex.from_arrays([gem.obs.array_col, gem.obs.array_row]))
    ours.columns = gem.var_names
    gef = gef.reindex(columns=ours.columns, fill_value=0)
    pd.testing.assert_frame_equal(gef.sort_index(), ours.sort_index(), check_dtype=False, check_names=False)
    assert (path / "03.register" / "SS200000135TL_D1_HE.tif").is_file()


@pytest.mark.parametrize("fmt", ["svs", "ome"])
def test_wsi_read_with_mpp(tmp_path, tissue, fmt):
    import tifffile

    path = hsd.write_wsi(tmp_path / f"slide.{'svs' if fmt == 'svs' else 'ome.tif'}", tissue, levels=3, tile=128)
    with tifffile.TiffFile(path) as tf:
        levels = tf.series[0].levels
        assert [lv.shape[:2] for lv in levels] == [(640, 800), (320, 400), (160, 200)]
        lvl0 = levels[0].asarray()
    ref = tissue.render(0, 0, 0.25, 800, 640)
    assert np.abs(lvl0.astype(int) - ref).mean() < 6  # JPEG
    if fmt == "svs":
        openslide = pytest.importorskip("openslide")

        with openslide.OpenSlide(str(path)) as slide:
            assert slide.properties["openslide.vendor"] == "aperio"
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
            assert slide.level_dimensions == ((800, 640), (400, 320), (200, 160))
            region = np.asarray(slide.read_region((40, 80), 1, (50, 30)).convert("RGB"))
        # the location is in level-0 pixels: (40, 80) px at 0.25 µm = (10, 20) µm
        np.testing.assert_allclose(region.mean(), tissue.render(10, 20, 0.5, 50, 30).mean(), atol=4)
    else:
        with tifffile.TiffFile(path) as tf:
            assert tf.is_ome and 'PhysicalSizeX="0.25"' in tf.ome_metadata
    # hs.io.add_image places it from its own µm per pixel
    sdata = hsio.read_gem(hsd.write_gem(tmp_path / "c.gem", tissue), bin_size=20)
    hsio.add_image(sdata, path)
    from spatialdata.transformations import get_transformation

    m = get_transformation(sdata.images["he"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(m[:2, :2], np.eye(2) * 0.5)  # 0.25 µm per pixel over 0.5 µm per DNB
    assert list(sdata.images["he"].keys()) == ["scale0", "scale1", "scale2"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        hsd.simulate_tissue(layout="stripes")
    with pytest.raises(ValueError, match="width_um"):
        hsd.simulate_tissue(width_um=-1)
    with pytest.raises(ValueError, match="n_domains"):
        hsd.simulate_tissue(n_domains=1)
    with pytest.raises(ValueError, match="bin_sizes"):
        hsd.write_visium_hd(tmp_path / "x", bin_sizes=(2, 5))
    with pytest.raises(ValueError, match="format"):
        hsd.write_wsi(tmp_path / "x.tif", format="ndpi")
    with pytest.raises(ValueError, match="tile"):
        hsd.write_wsi(tmp_path / "x.tif", tile=100)
