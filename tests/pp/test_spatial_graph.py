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


def _squidpy(adata, *, coord_type, n_neighs=6, radius=None, delaunay=False, **common):
    """squidpy's graph for the same options, through the per-mode functions (`spatial_neighbors` goes in squidpy 1.9)."""
    import squidpy as sq

    if coord_type == "grid":
        sq.gr.spatial_neighbors_grid(adata, n_neighs=n_neighs, **common)
    elif delaunay:
        sq.gr.spatial_neighbors_delaunay(adata, radius=radius, **common)
    elif radius is not None:
        sq.gr.spatial_neighbors_radius(adata, radius=radius, **common)
    else:
        sq.gr.spatial_neighbors_knn(adata, n_neighs=n_neighs, **common)


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


# ---------------------------------------------------------------------------------------------------------------------
# square bins (Visium HD, Stereo-seq)
# ---------------------------------------------------------------------------------------------------------------------


def _bins(n_rows=7, n_cols=9, *, pitch=16.0, holes=((2, 3), (2, 4), (5, 0)), lib=None, seed=0, names="hd", angle=0.0):
    """A small grid of square bins with holes; centres `pitch` apart (rotated by `angle` rad, as Visium HD images)."""
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    r, c = r.ravel(), c.ravel()
    keep = np.ones(r.size, dtype=bool)
    for hr, hc in holes:
        keep &= ~((r == hr) & (c == hc))
    r, c = r[keep], c[keep]
    perm = np.random.default_rng(seed).permutation(r.size)  # bins in no particular order
    r, c = r[perm], c[perm]
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    xy = (np.column_stack([c, r]) * pitch) @ rot.T + [100.0, 50.0]
    suffix = "1" if lib is None else lib
    if names == "hd":
        index = [f"s_008um_{ri:05d}_{ci:05d}-{suffix}" for ri, ci in zip(r, c, strict=True)]
    else:
        index = [f"bin{i}-{suffix}" for i in range(r.size)]
    obs = pd.DataFrame({"array_row": r, "array_col": c}, index=index)
    if lib is not None:
        obs["library_id"] = lib
    a = ad.AnnData(obs=obs)
    a.obsm["spatial"] = xy
    return a


def _hand_graph(a, n_neighs, n_rings=1, libs=None):
    """Brute force over all pairs: same slide and lattice distance 1..n_rings (Manhattan for 4, Chebyshev for 8)."""
    r = a.obs["array_row"].to_numpy()
    c = a.obs["array_col"].to_numpy()
    libs = np.zeros(a.n_obs) if libs is None else libs
    dr, dc = np.abs(r[:, None] - r[None, :]), np.abs(c[:, None] - c[None, :])
    ring = dr + dc if n_neighs == 4 else np.maximum(dr, dc)
    adj = (ring >= 1) & (ring <= n_rings) & (libs[:, None] == libs[None, :])
    xy = a.obsm["spatial"]
    d = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
    return adj, np.where(adj, d, 0.0)


@pytest.mark.parametrize(("n_neighs", "n_rings"), [(4, 1), (8, 1), (4, 2), (8, 2)])
def test_bins_grid_equals_hand_built(n_neighs, n_rings):
    a = _bins(angle=0.02)
    hs.pp.spatial_graph(a, n_neighs=n_neighs, n_rings=n_rings)
    adj, d = _hand_graph(a, n_neighs, n_rings)
    conn, dist = a.obsp[CONN], a.obsp[DIST]
    for m in (conn, dist):
        assert sp.issparse(m) and m.format == "csr" and m.dtype == np.float32 and m.has_sorted_indices
    np.testing.assert_array_equal(conn.toarray(), adj.astype(np.float32))
    np.testing.assert_allclose(dist.toarray(), d, rtol=1e-6)  # Euclidean, in coordinate units
    assert conn.nnz == dist.nnz  # no explicit zeros, one distance per edge
    params = a.uns[UNS]["params"]
    assert params["coord_type"] == "grid" and params["bins"] is True
    assert params["n_neighbors"] == n_neighs and params["n_rings"] == n_rings
    assert params["mean_degree"] == pytest.approx(adj.sum(1).mean())


def test_bins_default_is_8_neighbour_grid():
    a = _bins(holes=())
    hs.pp.spatial_graph(a)
    params = a.uns[UNS]["params"]
    assert params["coord_type"] == "grid" and params["n_neighbors"] == 8 and params["bins"] is True
    deg = np.diff(a.obsp[CONN].indptr)
    assert deg.max() == 8 and deg.min() == 3  # interior and corner bins
    assert a.obsp[DIST].max() == pytest.approx(16.0 * np.sqrt(2))


def test_bins_two_slides_stay_separate():
    # both slides use the same grid positions: only the slide column tells them apart
    a = ad.concat([_bins(lib="s1", seed=1), _bins(lib="s2", seed=2, holes=((0, 0),))])
    a.obs["library_id"] = pd.Categorical(a.obs["library_id"])
    lib = a.obs["library_id"].to_numpy()
    hs.pp.spatial_graph(a)  # found from obs['library_id']
    adj, _ = _hand_graph(a, 8, 1, libs=lib)
    np.testing.assert_array_equal(a.obsp[CONN].toarray(), adj.astype(np.float32))
    assert a.uns[UNS]["params"]["library_key"] == "library_id"

    del a.obs["library_id"]
    before = _snapshot(a)
    with pytest.raises(ValueError, match=r"share their grid position.*library_key"):
        hs.pp.spatial_graph(a)
    _assert_unchanged(a, before)


def test_bins_grid_index_steps():
    # stereopy-style positions in DNB (multiples of the bin size) give the same graph as unit indices
    a = _bins(names="plain")
    b = a.copy()
    b.obs["array_row"] = b.obs["array_row"] * 50 + 1000
    b.obs["array_col"] = b.obs["array_col"] * 50
    b.uns["gem"] = {"bin_size": 50}
    hs.pp.spatial_graph(b)
    assert b.uns[UNS]["params"]["bins"] is True
    hs.pp.spatial_graph(a, bins=True)
    assert (a.obsp[CONN] != b.obsp[CONN]).nnz == 0


@pytest.mark.parametrize(
    "mark",
    ["barcodes", "technology", "gem", "rebin", "stereopy", "tiling", "many"],
)
def test_bins_detected(mark):
    a = _bins(names="hd" if mark == "barcodes" else "plain")
    if mark == "technology":
        a.uns["spatial"] = {"x": {"metadata": {"technology": "Visium_HD"}, "scalefactors": {}}}
    elif mark in ("gem", "rebin"):
        a.uns[mark] = {"factor": 2}
    elif mark == "stereopy":
        a.uns["bin_type"] = "bins"
    elif mark == "tiling":  # squares as wide as the grid pitch
        a.uns["spatial"] = {"x": {"scalefactors": {"spot_diameter_fullres": 16.0}, "metadata": {}}}
    elif mark == "many":
        a = _bins(80, 70, names="plain", holes=())
    hs.pp.spatial_graph(a)
    params = a.uns[UNS]["params"]
    assert params["bins"] is True and params["coord_type"] == "grid" and params["n_neighbors"] == 8


def test_spots_not_taken_for_bins(adata):
    # legacy-ST-like square array: spots of 55 px, 100 px apart, no bin marker -> squidpy as before
    hs.pp.spatial_graph(adata)
    assert adata.uns[UNS]["params"]["bins"] is False
    # bins=False turns detection off
    a = _bins()
    hs.pp.spatial_graph(a, bins=False)
    params = a.uns[UNS]["params"]
    assert params["bins"] is False and params["coord_type"] == "generic" and params["n_neighbors"] == 6


def test_bins_radius_equals_squidpy():
    import squidpy as sq

    a = _bins(angle=0.3)
    ref = a.copy()
    sq.gr.spatial_neighbors_radius(ref, radius=37.0)
    hs.pp.spatial_graph(a, radius=37.0)
    assert a.uns[UNS]["params"]["bins"] is True and a.uns[UNS]["params"]["coord_type"] == "generic"
    assert (a.obsp[CONN] != ref.obsp[CONN]).nnz == 0
    np.testing.assert_allclose(a.obsp[DIST].toarray(), ref.obsp[DIST].toarray(), rtol=1e-6)

    # radius in µm through microns_per_unit (0.5 µm per unit: 18.5 µm = 37 units)
    hs.pp.spatial_graph(a, radius_um=18.5, microns_per_unit=0.5, key_added="um")
    assert (a.obsp["um_connectivities"] != ref.obsp[CONN]).nnz == 0
    p = a.uns["um_neighbors"]["params"]
    assert p["radius"] == pytest.approx(37.0) and p["microns_per_unit"] == 0.5 and p["radius_um"] == 18.5


def test_bins_radius_two_slides_own_units():
    # slide s2 in units twice as fine (0.25 µm): same tissue, coordinates x2
    a = ad.concat([_bins(lib="s1", seed=1), _bins(lib="s2", seed=2)])
    s2 = (a.obs["library_id"] == "s2").to_numpy()
    a.obsm["spatial"][s2] *= 2
    hs.pp.spatial_graph(a, radius_um=12, microns_per_unit={"s1": 0.5, "s2": 0.25}, library_key="library_id")
    conn, dist = a.obsp[CONN], a.obsp[DIST]
    blocks = [np.flatnonzero(~s2), np.flatnonzero(s2)]
    lib = a.obs["library_id"].to_numpy()
    coo = conn.tocoo()
    assert np.all(lib[coo.row] == lib[coo.col])
    for b, unit in zip(blocks, (1.0, 2.0), strict=True):
        sub = a[b].copy()
        adj, _ = _hand_graph(sub, 8, 1)  # 24 units of 0.5 µm (12 µm) covers the diagonal of 16-unit bins
        np.testing.assert_array_equal(conn[b][:, b].toarray(), adj.astype(np.float32))
        assert dist[b][:, b].max() == pytest.approx(16.0 * np.sqrt(2) * unit)
    p = a.uns[UNS]["params"]
    assert p["radius"] == {"s1": pytest.approx(24.0), "s2": pytest.approx(48.0)}
    assert p["microns_per_unit"] == {"s1": 0.5, "s2": 0.25}


def test_bins_radius_um_from_scalefactors():
    # Visium HD scale factors carry microns_per_pixel
    a = _bins()
    a.uns["spatial"] = {
        "hd": {"scalefactors": {"microns_per_pixel": 0.5, "spot_diameter_fullres": 16.0}, "metadata": {}}
    }
    hs.pp.spatial_graph(a, radius_um=12)
    p = a.uns[UNS]["params"]
    assert p["radius"] == pytest.approx(24.0) and p["microns_per_unit"] == pytest.approx(0.5)


def test_bins_radius_um_needs_units():
    a = _bins()
    before = _snapshot(a)
    with pytest.raises(KeyError, match="microns_per_unit"):
        hs.pp.spatial_graph(a, radius_um=12)
    _assert_unchanged(a, before)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"n_neighs": 6}, ValueError, "4 or 8"),
        ({"coord_type": "grid", "delaunay": True}, ValueError, "delaunay"),
        ({"radius_um": 10, "microns_per_unit": 0.5, "spot_diameter_um": 8}, ValueError, "microns_per_unit"),
        ({"radius_um": 10, "microns_per_unit": 0}, ValueError, "microns_per_unit"),
        ({"radius_um": 10, "microns_per_unit": "0.5"}, TypeError, "microns_per_unit"),
        ({"radius_um": 10, "microns_per_unit": {"x": 0.5}}, ValueError, "library_key"),
        ({"bins": "yes"}, TypeError, "bins"),
    ],
)
def test_bins_bad_arguments(kwargs, exc, match):
    a = _bins()
    before = _snapshot(a)
    with pytest.raises(exc, match=match):
        hs.pp.spatial_graph(a, **kwargs)
    _assert_unchanged(a, before)


def test_bins_missing_slide_in_microns_per_unit():
    a = ad.concat([_bins(lib="s1", seed=1), _bins(lib="s2", seed=2)])
    with pytest.raises(KeyError, match=r"microns_per_unit.*s2"):
        hs.pp.spatial_graph(a, radius_um=10, microns_per_unit={"s1": 0.5}, library_key="library_id")


def test_bins_true_needs_square_indices(adata):
    del adata.obs["array_row"]
    with pytest.raises(KeyError, match="array_row"):
        hs.pp.spatial_graph(adata, bins=True)
    rows, cols = np.meshgrid(np.arange(4), np.arange(8), indexing="ij")
    keep = ((rows + cols) % 2 == 0).ravel()
    hexa = ad.AnnData(obs=pd.DataFrame({"array_row": rows.ravel()[keep], "array_col": cols.ravel()[keep]}))
    hexa.obsm["spatial"] = np.column_stack([hexa.obs["array_col"] * 50.0, hexa.obs["array_row"] * 86.6])
    with pytest.raises(ValueError, match="square lattice"):
        hs.pp.spatial_graph(hexa, bins=True)


def test_bins_isolated_warn_and_set_diag():
    a = _bins(holes=())
    lonely = ad.AnnData(obs=pd.DataFrame({"array_row": [30], "array_col": [30]}, index=["lonely"]))
    lonely.obsm["spatial"] = np.array([[900.0, 900.0]])
    a = ad.concat([a, lonely])
    with pytest.warns(UserWarning, match=r"1 of 64 bins .*'lonely'"):
        hs.pp.spatial_graph(a, bins=True, set_diag=True)
    assert np.all(a.obsp[CONN].diagonal() == 1)
    assert a.uns[UNS]["params"]["n_isolated"] == 1
    assert a.uns[UNS]["params"]["mean_degree"] == pytest.approx(np.diff(a.obsp[CONN].indptr).mean() - 1)


def test_bins_copy_and_h5ad_round_trip(tmp_path):
    a = _bins()
    before = _snapshot(a)
    out = hs.pp.spatial_graph(a, radius_um=12, microns_per_unit=0.5, copy=True)
    _assert_unchanged(a, before)
    out.write_h5ad(tmp_path / "b.h5ad")
    b = ad.read_h5ad(tmp_path / "b.h5ad")
    assert (b.obsp[CONN] != out.obsp[CONN]).nnz == 0
    assert b.uns[UNS]["params"]["bins"] is True or b.uns[UNS]["params"]["bins"] == np.bool_(True)
    assert set(b.uns[UNS]["params"]) == set(out.uns[UNS]["params"])


def test_bins_no_dense_work():
    # 10^5 bins: memory grows with the edges (a dense n x n matrix would take 80 GB) and it takes well under a second
    import time
    import tracemalloc

    side = 400
    rng = np.random.default_rng(0)
    r, c = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    keep = rng.random(side * side) < 0.65
    a = ad.AnnData(obs=pd.DataFrame({"array_row": r.ravel()[keep], "array_col": c.ravel()[keep]}))
    a.obsm["spatial"] = np.column_stack([a.obs["array_col"] * 16.0, a.obs["array_row"] * 16.0])
    assert 1e5 <= a.n_obs <= 1.1e5
    hs.pp.spatial_graph(a, copy=True)  # warm up
    tracemalloc.start()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a few isolated bins in the random mask
        hs.pp.spatial_graph(a, n_neighs=4)
        hs.pp.spatial_graph(a, radius=17.0, key_added="r")
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 120e6, f"peak {peak / 1e6:.0f} MB"
    assert elapsed < 3.0, f"{elapsed:.2f} s"
    assert (a.obsp[CONN] != a.obsp["r_connectivities"]).nnz == 0  # 4 neighbours = radius just above the pitch


def test_hex_crop_not_taken_for_bins():
    # a crop of a Visium array starting at an odd column: row + col always odd; spots as wide as the grid pitch
    rows, cols = np.meshgrid(np.arange(10), np.arange(1, 21), indexing="ij")
    keep = ((rows + cols) % 2 == 1).ravel()
    a = ad.AnnData(obs=pd.DataFrame({"array_row": rows.ravel()[keep], "array_col": cols.ravel()[keep]}))
    a.obsm["spatial"] = np.column_stack([a.obs["array_col"] * 50.0, a.obs["array_row"] * 50.0 * np.sqrt(3)])
    a.uns["spatial"] = {"x": {"scalefactors": {"spot_diameter_fullres": 65.8}, "metadata": {}}}
    hs.pp.spatial_graph(a)
    assert a.uns[UNS]["params"]["bins"] is False


def test_readers_take_the_name_given_to_key_added(adata):
    """`spatial_graph(key_added='x')` is read back as `connectivity_key='x'` (squidpy's long name still works)."""
    from histospace._constants import graph_keys

    assert graph_keys("x") == ("x_connectivities", "x_distances", "x_neighbors")
    hs.pp.spatial_graph(adata, key_added="x")
    assert set(graph_keys("x")[:2]) <= set(adata.obsp) and graph_keys("x")[2] in adata.uns
    kw = {"use_rep": "img_features", "n_clusters": 3, "method": "kmeans", "refine": 1, "copy": True}
    short = hs.tl.domains(adata, connectivity_key="x", **kw)
    long = hs.tl.domains(adata, connectivity_key="x_connectivities", **kw)
    np.testing.assert_array_equal(short.obs["img_features_domain"], long.obs["img_features_domain"])
    before = set(adata.obs)
    with pytest.raises(KeyError, match=r"obsp\['y'\]` not found.*spatial_graph"):
        hs.tl.domains(adata, connectivity_key="y", **{**kw, "copy": False})
    assert set(adata.obs) == before
    model = hs.models.StereoMM(adata, features_key=None, connectivity_key="x", hidden=[8], n_latent=4)
    assert model.connectivity_key == "x_connectivities"
