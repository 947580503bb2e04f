"""The spatial adapter (`histospace._spatial`): platform names, the Visium `uns` layout, affine maps, slide records."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import histospace as hs
from histospace._spatial import _affine, _platform, _uns
from histospace._spatial._slide import anndata_slide, sdata_slide
from histospace._utils._sdata import as_table

HIRES_SCALEF, PITCH = 0.5, 100.0  # of the tiny slide of tests/conftest.py


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("s_008um_00012_00345-1", True),  # Space Ranger: bin side 3 digits, row and column 5 digits, GEM well -1
        ("s_002um_00000_00000-1", True),
        ("s_016um_00001_00002-1-A", True),  # a suffix added when tables are concatenated
        ("s_008um_00012_00345-s1", True),  # a slide suffix in place of the GEM well
        ("s_008um_00012_00345", True),  # the GEM-well suffix stripped
        ("s_8um_12_345-1", False),  # not zero-padded: not Space Ranger's
        ("s_008um_00012_003456-1", False),  # 6 digits
        ("AAACAAGTATCTCCCA-1", False),  # a Visium spot barcode
        ("lib_spot3", False),
    ],
)
def test_one_visium_hd_barcode_rule(name, expected):
    # the former patterns disagreed: `pp`/`pl`'s `^s_\d{3}um_\d{5}_\d{5}` took the 6-digit name (a prefix match),
    # `io.rebin`'s `^s_\d{3}um_\d+_\d+-1$` refused every suffix but `-1` (so `rebin` renamed concatenated or
    # multi-slide bins `r_c` while `pp.spatial_graph` called them Visium HD) and took names that are not zero-padded
    assert _platform.is_visium_hd_barcode(name) is expected


def test_visium_hd_barcodes_are_bins_and_rebin_keeps_their_style():
    from histospace._utils._lattice import bins_evidence
    from histospace.io._rebin import rebinned_names

    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    names = [f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rows.ravel(), cols.ravel(), strict=True)]
    t = ad.AnnData(obs=pd.DataFrame({"array_row": rows.ravel(), "array_col": cols.ravel()}, index=names))
    t.obsm["spatial"] = np.column_stack([cols.ravel(), rows.ravel()]).astype(float) * 10
    assert bins_evidence(t) == "Visium HD barcodes"
    out = rebinned_names(t, "square_008um", np.array([0, 1]), np.array([2, 3]), 2, 10.0, 16.0)
    assert list(out) == ["s_016um_00000_00002-1", "s_016um_00001_00003-1"]


def test_visium_hd_table_names():
    assert _platform.visium_hd_bin_um("square_008um") == 8.0
    assert _platform.visium_hd_bin_um("square_8um") is None
    assert _platform.GEM_TABLE.match("bin50").group(1) == "50"


@pytest.mark.parametrize(
    ("meta", "tech"),
    [
        ({"technology": "Visium_HD"}, "visium_hd"),
        ({"chemistry_description": "Visium V1"}, "visium"),
        ({"spot_diameter_um": 100.0}, "st"),
        ({"spot_diameter_um": 55}, "visium"),
        ({"spot_diameter_um": 12.0}, None),
        ({}, None),
    ],
)
def test_technology(meta, tech):
    assert _platform.technology(meta) == tech


def test_uns_readers_and_slot_names(adata):
    assert _uns.uns_libraries(adata) == ["lib"]
    assert _uns.scalefactors(adata, "lib")["tissue_hires_scalef"] == HIRES_SCALEF
    assert _uns.metadata(adata, "lib") == {}
    assert _uns.images(adata, "nope") == {} and _uns.library_entry(adata, None) == {}
    assert _uns.uns_path("lib", "scalefactors") == "adata.uns['spatial']['lib']['scalefactors']"
    assert _uns.uns_path(obj="") == "uns['spatial']"
    b = adata.copy()
    _uns.drop_uns(b)
    assert not _uns.has_uns(b) and _uns.uns_libraries(b) == [] and _uns.scalefactors(b, "lib") == {}
    b.uns["spatial"] = "not a mapping"
    assert _uns.uns_libraries(b) == []


def test_one_affine_helper_and_one_checker():
    from histospace._image import _sdata as _image_sdata
    from histospace._utils import _sdata

    assert _image_sdata.transform_xy is _affine.apply_affine is _sdata.apply_affine
    assert _image_sdata._check_cs is _affine.check_coordinate_system
    m = np.array([[2.0, 0, 10], [0, 2.0, 5], [0, 0, 1]])
    np.testing.assert_array_equal(_affine.apply_affine(m, [[1.0, 1.0]]), [[12.0, 7.0]])
    assert _affine.affine_scale(m) == 2.0


def test_coordinate_system_errors(adata):
    from spatialdata_io.experimental import from_legacy_anndata

    sdata = from_legacy_anndata(adata)
    (shapes,) = list(sdata.shapes)
    with pytest.raises(KeyError, match="Coordinate system 'nope' not found.*coordinate_system="):
        _affine.shared_coordinate_system(sdata, "nope", [shapes])
    cs = _affine.shared_coordinate_system(sdata, None, [shapes, *sdata.images])
    assert cs in sdata.coordinate_systems


def test_slide_record_anndata_and_spatialdata_agree(adata):
    from spatialdata_io.experimental import from_legacy_anndata

    a = anndata_slide(adata, "lib", np.arange(adata.n_obs))
    assert a.image is not None and a.image.scale == HIRES_SCALEF
    assert a.spot_diameter == 0.55 * PITCH and a.mpp is None and a.technology is None
    sdata = from_legacy_anndata(adata)
    _, ctx = as_table(sdata, None)
    s = sdata_slide(ctx, image_key=None, shapes_key=None, coordinate_system=None)
    # the hires image is level 0 of the SpatialData: the centres are in its pixels
    np.testing.assert_allclose(s.centres, adata.obsm["spatial"] * HIRES_SCALEF)
    np.testing.assert_allclose(s.spot_diameter, 0.55 * PITCH * HIRES_SCALEF)
    assert s.kind == "circle" and list(s.spot_ids) == list(adata.obs_names)
    assert s.image.shape == adata.uns["spatial"]["lib"]["images"]["hires"].shape[:2]
    no_img = sdata_slide(ctx, image_key=None, shapes_key=None, coordinate_system=None, image=False)
    assert no_img.image is None and no_img.extra["image_key"] is None


def test_image_choice_names_image_key(adata):
    from spatialdata_io.experimental import from_legacy_anndata

    sdata = from_legacy_anndata(adata)
    (img,) = list(sdata.images)
    sdata.images["other"] = sdata.images[img]
    _, ctx = as_table(sdata, None)
    with pytest.raises(ValueError, match=r"2 images.*pass `image_key=`"):
        sdata_slide(ctx, image_key=None, shapes_key=None, coordinate_system=None)
    with pytest.raises(ValueError, match=r"2 images.*pass `image_key=`"):
        hs.pl.domains(sdata, key="domain", show=False)
