import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import histospace as hs

CONN, DIST, UNS = "spatial_connectivities", "spatial_distances", "spatial_neighbors"


def _snapshot(adata):
    return {
        "obsp": sorted(adata.obsp.keys()),
        "uns": sorted(adata.uns.keys()),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "obs": adata.obs.copy(),
    }


def _assert_unchanged(adata, snap):
    assert sorted(adata.obsp.keys()) == snap["obsp"]
    assert sorted(adata.uns.keys()) == snap["uns"]
    for k, v in snap["obsm"].items():
        np.testing.assert_array_equal(np.asarray(adata.obsm[k]), v)
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])


def _squidpy(adata, **kwargs):
    import squidpy as sq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # `spatial_neighbors` is deprecated in squidpy 1.8
        sq.gr.spatial_neighbors(adata, **kwargs)


def _set_tech(adata, technology, spot_diameter_um):
    for lib in adata.uns["spatial"]:
        adata.uns["spatial"][lib]["metadata"] = {"technology": technology, "spot_diameter_um": spot_diameter_um}


def test_slots_dtypes_and_params(adata):
    out = hs.pp.spatial_graph(adata)
    assert out is None
    conn, dist = adata.obsp[CONN], adata.obsp[DIST]
    for m in (conn, dist):
        assert sp.issparse(m) and m.format == "csr"
        assert m.shape == (adata.n_obs, adata.n_obs)
        assert m.dtype == np.float32
    assert conn.diagonal().sum() == 0
    assert np.all(np.diff(conn.indptr) == 6)  # squidpy's k-NN graph: 6 neighbours per row
    uns = adata.uns[UNS]
    assert uns["connectivities_key"] == CONN and uns["distances_key"] == DIST
    params = uns["params"]
    # the fixture has no technology and a square array: squidpy's generic 6-NN graph
    assert params["coord_type"] == "generic" and params["n_neighbors"] == 6
    assert params["mean_degree"] == pytest.approx(np.diff(conn.indptr).mean())
    assert params["n_isolated"] == 0
    assert all(v is not None for v in params.values())
    assert isinstance(params["version"], str)


def test_same_as_squidpy_knn(adata):
    ref = adata.copy()
    _squidpy(ref, coord_type="generic", n_neighs=6)
    hs.pp.spatial_graph(adata, coord_type="generic", n_neighs=6)
    assert (adata.obsp[CONN] != ref.obsp[CONN]).nnz == 0
    np.testing.assert_allclose(adata.obsp[DIST].toarray(), ref.obsp[DIST].toarray(), rtol=1e-6)


@pytest.mark.parametrize("n_neighs", [4, 6])
def test_same_as_squidpy_grid(adata, n_neighs):
    ref = adata.copy()
    _squidpy(ref, coord_type="grid", n_neighs=n_neighs)
    hs.pp.spatial_graph(adata, coord_type="grid", n_neighs=n_neighs)
    assert (adata.obsp[CONN] != ref.obsp[CONN]).nnz == 0
    assert (adata.obsp[DIST] != ref.obsp[DIST]).nnz == 0
    assert adata.uns[UNS]["params"]["coord_type"] == "grid"


def test_same_as_squidpy_radius_and_delaunay(adata):
    ref = adata.copy()
    _squidpy(ref, coord_type="generic", radius=150.0)
    hs.pp.spatial_graph(adata, radius=150.0)
    assert (adata.obsp[CONN] != ref.obsp[CONN]).nnz == 0
    assert (adata.obsp[CONN] != adata.obsp[CONN].T).nnz == 0  # radius graphs are symmetric
    np.testing.assert_allclose(adata.obsp[DIST].toarray(), ref.obsp[DIST].toarray(), rtol=1e-6)
    assert adata.uns[UNS]["params"]["radius"] == 150.0

    ref = adata.copy()
    _squidpy(ref, coord_type="generic", delaunay=True)
    hs.pp.spatial_graph(adata, delaunay=True, key_added="dl")
    assert (adata.obsp["dl_connectivities"] != ref.obsp[CONN]).nnz == 0
    assert adata.uns["dl_neighbors"]["params"]["delaunay"] is True


def test_radius_um_conversion(adata):
    # fixture: spot_diameter_fullres = 55 px; Visium spots are 55 µm -> 1 px per µm; spot pitch 100 px
    _set_tech(adata, "visium", 55.0)
    hs.pp.spatial_graph(adata, radius_um=110)
    params = adata.uns[UNS]["params"]
    assert params["radius"] == pytest.approx(110.0)
    assert params["radius_um"] == 110.0 and params["spot_diameter_um"] == 55.0
    deg = np.diff(adata.obsp[CONN].indptr)
    assert deg.max() == 4 and deg.min() == 2  # 4-neighbourhood on the square array
    assert adata.obsp[DIST].max() == pytest.approx(100.0)  # distances in full-resolution pixels

    # legacy ST: 100 µm spots of 55 px -> 0.55 px/µm; 200 µm -> 110 px
    _set_tech(adata, "st", 100.0)
    hs.pp.spatial_graph(adata, radius_um=200)
    assert adata.uns[UNS]["params"]["radius"] == pytest.approx(110.0)
    assert np.diff(adata.obsp[CONN].indptr).max() == 4


def test_spot_diameter_argument_and_unknown_technology(adata):
    adata.uns["spatial"]["lib"]["metadata"] = {"technology": "stereo-seq"}
    before = _snapshot(adata)
    with pytest.raises(ValueError, match="spot_diameter_um"):
        hs.pp.spatial_graph(adata, radius_um=100)
    _assert_unchanged(adata, before)
    hs.pp.spatial_graph(adata, radius_um=100, spot_diameter_um=27.5)  # 2 px per µm -> 200 px
    assert adata.uns[UNS]["params"]["radius"] == pytest.approx(200.0)


def test_missing_scalefactor_for_radius_um(adata):
    del adata.uns["spatial"]["lib"]["scalefactors"]["spot_diameter_fullres"]
    before = _snapshot(adata)
    with pytest.raises(KeyError, match="spot_diameter_fullres"):
        hs.pp.spatial_graph(adata, radius_um=100)
    _assert_unchanged(adata, before)
    hs.pp.spatial_graph(adata, radius=110)  # a pixel radius needs no scale factor
    assert adata.obsp[CONN].nnz > 0


def test_technology_defaults(adata):
    _set_tech(adata, "st", 100.0)
    hs.pp.spatial_graph(adata)
    params = adata.uns[UNS]["params"]
    assert params["coord_type"] == "grid" and params["n_neighbors"] == 4 and params["technology"] == "st"
    assert np.diff(adata.obsp[CONN].indptr).max() == 4

    _set_tech(adata, "visium", 55.0)
    hs.pp.spatial_graph(adata)
    params = adata.uns[UNS]["params"]
    assert params["coord_type"] == "grid" and params["n_neighbors"] == 6


def test_hex_array_detected_as_visium():
    # a small Visium-like hexagonal array: array_row + array_col even, centres 100 px apart
    rows, cols = np.meshgrid(np.arange(10), np.arange(20), indexing="ij")
    keep = (rows + cols) % 2 == 0
    rows, cols = rows[keep], cols[keep]
    xy = np.column_stack([cols * 50.0, rows * 50.0 * np.sqrt(3)])
    a = ad.AnnData(obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=[f"s{i}" for i in range(rows.size)]))
    a.obsm["spatial"] = xy
    a.uns["spatial"] = {"x": {"scalefactors": {"spot_diameter_fullres": 55.0}, "metadata": {}}}
    hs.pp.spatial_graph(a)
    params = a.uns[UNS]["params"]
    assert params["coord_type"] == "grid" and params["n_neighbors"] == 6 and params["technology"] == "visium"
    deg = np.diff(a.obsp[CONN].indptr)
    assert deg.max() == 6
    # radius_um: Visium spots 55 µm = 55 px, centres 100 µm apart -> 110 µm gives the same 6-neighbourhood
    hs.pp.spatial_graph(a, radius_um=110, key_added="r")
    assert (a.obsp["r_connectivities"] != a.obsp[CONN]).nnz == 0


def test_two_slides_no_edges_between(adata_two_slides):
    a = adata_two_slides
    lib = a.obs["library_id"].to_numpy()
    hs.pp.spatial_graph(a, radius=150.0, library_key="library_id")
    conn = a.obsp[CONN].tocoo()
    assert conn.nnz > 0
    assert np.all(lib[conn.row] == lib[conn.col])
    assert a.uns[UNS]["params"]["library_key"] == "library_id"

    # same as squidpy's own library_key, and each block equals the single-slide graph
    ref = a.copy()
    _squidpy(ref, coord_type="generic", radius=150.0, library_key="library_id")
    assert (a.obsp[CONN] != ref.obsp[CONN]).nnz == 0
    s1 = a[lib == "s1"].copy()
    hs.pp.spatial_graph(s1, radius=150.0)
    block = a.obsp[CONN][np.flatnonzero(lib == "s1")][:, np.flatnonzero(lib == "s1")]
    assert (block != s1.obsp[CONN]).nnz == 0


def test_two_slides_found_without_library_key(adata_two_slides):
    # the slides overlap in pixel space: without per-slide graphs there would be edges between them
    a = adata_two_slides
    lib = a.obs["library_id"].to_numpy()
    hs.pp.spatial_graph(a)
    conn = a.obsp[CONN].tocoo()
    assert np.all(lib[conn.row] == lib[conn.col])
    assert a.uns[UNS]["params"]["library_key"] == "library_id"


def test_two_slides_different_pixel_sizes(adata_two_slides):
    a = adata_two_slides
    _set_tech(a, "visium", 55.0)
    # slide s2 scanned at twice the resolution: same tissue geometry in µm, coordinates and spot size x2
    s2 = (a.obs["library_id"] == "s2").to_numpy()
    a.obsm["spatial"][s2] *= 2
    a.uns["spatial"]["s2"]["scalefactors"]["spot_diameter_fullres"] *= 2
    hs.pp.spatial_graph(a, radius_um=110, library_key="library_id")
    conn, dist = a.obsp[CONN], a.obsp[DIST]
    blocks = [np.flatnonzero(~s2), np.flatnonzero(s2)]
    c1, c2 = (conn[b][:, b] for b in blocks)
    assert c1.nnz > 0 and (c1 != c2).nnz == 0  # the same graph on both slides
    assert dist[blocks[0]][:, blocks[0]].max() == pytest.approx(100.0)
    assert dist[blocks[1]][:, blocks[1]].max() == pytest.approx(200.0)  # each slide's own pixels
    assert a.uns[UNS]["params"]["radius"] == {"s1": pytest.approx(110.0), "s2": pytest.approx(220.0)}
    lib = a.obs["library_id"].to_numpy()
    coo = conn.tocoo()
    assert np.all(lib[coo.row] == lib[coo.col])


def test_one_slide_of_several(adata_two_slides):
    # a subset holding one slide keeps both libraries in uns['spatial']; only the slide present is used
    a = adata_two_slides[(adata_two_slides.obs["library_id"] == "s2").to_numpy()].copy()
    _set_tech(a, "visium", 55.0)
    a.uns["spatial"]["s1"]["scalefactors"]["spot_diameter_fullres"] = 1000.0  # would change the radius if used
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        hs.pp.spatial_graph(a, radius_um=110)
    assert a.uns[UNS]["params"]["radius"] == pytest.approx(110.0)


def test_several_libraries_without_library_column_warn(adata_two_slides):
    a = adata_two_slides
    del a.obs["library_id"]
    with pytest.warns(UserWarning, match="library_key"):
        hs.pp.spatial_graph(a, radius=150.0)


def test_isolated_spots_warn(adata):
    adata.obsm["spatial"][0] = [5000.0, 5000.0]  # one spot far away
    with pytest.warns(UserWarning, match=r"1 of 64 spots .*lib_spot0.*bigger `radius_um`/`radius`"):
        hs.pp.spatial_graph(adata, radius=150.0)
    assert adata.uns[UNS]["params"]["n_isolated"] == 1


def test_set_diag(adata):
    hs.pp.spatial_graph(adata, set_diag=True)
    assert np.all(adata.obsp[CONN].diagonal() == 1)
    assert adata.uns[UNS]["params"]["set_diag"] is True


def test_copy(adata):
    before = _snapshot(adata)
    out = hs.pp.spatial_graph(adata, copy=True)
    assert isinstance(out, ad.AnnData) and CONN in out.obsp and UNS in out.uns
    _assert_unchanged(adata, before)


def test_deterministic(adata):
    a, b = hs.pp.spatial_graph(adata, copy=True), hs.pp.spatial_graph(adata, copy=True)
    assert (a.obsp[CONN] != b.obsp[CONN]).nnz == 0


def test_h5ad_round_trip(adata_two_slides, tmp_path):
    a = adata_two_slides
    _set_tech(a, "visium", 55.0)
    hs.pp.spatial_graph(a, radius_um=150, key_added="r150")
    path = tmp_path / "g.h5ad"
    a.write_h5ad(path)
    b = ad.read_h5ad(path)
    assert sp.issparse(b.obsp["r150_connectivities"])
    assert (b.obsp["r150_connectivities"] != a.obsp["r150_connectivities"]).nnz == 0
    assert (b.obsp["r150_distances"] != a.obsp["r150_distances"]).nnz == 0
    assert b.uns["r150_neighbors"]["connectivities_key"] == "r150_connectivities"
    p, q = a.uns["r150_neighbors"]["params"], b.uns["r150_neighbors"]["params"]
    assert set(p) == set(q)
    assert q["radius_um"] == p["radius_um"] and q["library_key"] == "library_id"


def test_missing_spatial_key(adata):
    del adata.obsm["spatial"]
    before = _snapshot(adata)
    with pytest.raises(KeyError, match="obsm\\['spatial'\\]"):
        hs.pp.spatial_graph(adata)
    _assert_unchanged(adata, before)
    with pytest.raises(KeyError, match="obsm\\['xy'\\]"):
        hs.pp.spatial_graph(adata, spatial_key="xy")


def test_nan_coordinates(adata):
    adata.obsm["spatial"][3, 0] = np.nan
    before = _snapshot(adata)
    with pytest.raises(ValueError, match="obsm\\['spatial'\\].*NaN"):
        hs.pp.spatial_graph(adata)
    _assert_unchanged(adata, before)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"radius": -1.0}, ValueError, "radius"),
        ({"radius": 0}, ValueError, "radius"),
        ({"radius": np.inf}, ValueError, "radius"),
        ({"radius": "big"}, TypeError, "radius"),
        ({"radius_um": -5}, ValueError, "radius_um"),
        ({"radius_um": 100, "radius": 100}, ValueError, "radius_um"),
        ({"radius": 100, "coord_type": "grid"}, ValueError, "coord_type='generic'"),
        ({"radius": 100, "n_neighs": 6}, ValueError, "n_neighs"),
        ({"n_neighs": 0}, ValueError, "n_neighs"),
        ({"n_neighs": 2.5}, ValueError, "n_neighs"),
        ({"n_neighs": 64}, ValueError, "n_neighs"),
        ({"coord_type": "hex"}, ValueError, "coord_type"),
        ({"n_rings": 2, "coord_type": "generic"}, ValueError, "n_rings"),
        ({"key_added": ""}, TypeError, "key_added"),
    ],
)
def test_bad_arguments(adata, kwargs, exc, match):
    before = _snapshot(adata)
    with pytest.raises(exc, match=match):
        hs.pp.spatial_graph(adata, **kwargs)
    _assert_unchanged(adata, before)


def test_unknown_library_key(adata_two_slides):
    before = _snapshot(adata_two_slides)
    with pytest.raises(KeyError, match="obs\\['slide'\\]"):
        hs.pp.spatial_graph(adata_two_slides, library_key="slide")
    _assert_unchanged(adata_two_slides, before)


def test_library_missing_from_uns_for_radius_um(adata_two_slides):
    a = adata_two_slides
    del a.uns["spatial"]["s2"]
    before = _snapshot(a)
    with pytest.raises(KeyError, match="uns\\['spatial'\\]"):
        hs.pp.spatial_graph(a, radius_um=100, library_key="library_id")
    _assert_unchanged(a, before)


def test_squidpy_graph_has_same_layout(adata):
    ref = adata.copy()
    _squidpy(ref, coord_type="grid", n_neighs=4)
    hs.pp.spatial_graph(adata, coord_type="grid", n_neighs=4)
    assert set(ref.obsp.keys()) == set(adata.obsp.keys())
    assert set(ref.uns.keys()) == set(adata.uns.keys())
    for k in ("connectivities_key", "distances_key"):
        assert ref.uns[UNS][k] == adata.uns[UNS][k]
    assert set(ref.uns[UNS]["params"]) - {"transform"} <= set(adata.uns[UNS]["params"])


@pytest.mark.data
def test_dlpfc_visium_hex(data_dir):
    path = data_dir / "dlpfc" / "151673" / "151673_5000genes.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not found")
    a = ad.read_h5ad(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a single isolated spot is allowed here
        hs.pp.spatial_graph(a)
    params = a.uns[UNS]["params"]
    assert params["coord_type"] == "grid" and params["n_neighbors"] == 6
    assert 5.5 <= params["mean_degree"] <= 6.0
    assert params["n_isolated"] < 0.01 * a.n_obs
    # 110 µm (just above the 100 µm Visium centre-to-centre distance) gives the same graph
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        hs.pp.spatial_graph(a, radius_um=110, key_added="r110")
    assert (a.obsp["r110_connectivities"] != a.obsp[CONN]).nnz == 0
