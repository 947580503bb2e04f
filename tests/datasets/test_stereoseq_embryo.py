"""Tests of `hs.datasets.stereoseq_embryo`: a tiny file in the ST-GEARS layout (local and through a fake file://
mirror, never the internet), bad input, and the real sections (marked `data`)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import histospace as hs

CORNERS = [(20500, 62780), (20500, 62800), (20520, 62780), (20520, 62800), (20540, 62800)]  # (raw_x, raw_y), DNB
GENES = ["128up", "14-3-3epsilon", "ftz", "eve"]


def _stgears_file(path: Path, *, seed: int = 0, counts_layer: bool = True, corners=CORNERS) -> np.ndarray:
    """A tiny AnnData in the layout of the ST-GEARS sample data; returns its counts."""
    rng = np.random.default_rng(seed)
    n = len(corners)
    counts = rng.poisson(3.0, size=(n, len(GENES))).astype(np.float32)
    obs = pd.DataFrame(
        {
            "slice_ID": ["E14-16h_a_S07"] * n,
            "raw_x": [c[0] for c in corners],
            "raw_y": [c[1] for c in corners],
            "new_x": rng.normal(size=n),
            "new_y": rng.normal(size=n),
            "new_z": np.ones(n),
            "annotation": ["epidermis", "CNS", "epidermis", "muscle", "CNS"][:n],
        },
        index=[f"E14-16h_a_S07_{x}x{y}-0" for x, y in corners],
    )
    a = ad.AnnData(X=np.log1p(counts), obs=obs, var=pd.DataFrame(index=GENES))
    if counts_layer:
        a.layers["raw_counts"] = counts
    else:
        a.X = counts
    a.obsm["spatial"] = rng.normal(size=(n, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    a.write_h5ad(path)
    return counts


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("HISTOSPACE_DATA", raising=False)
    monkeypatch.delenv("HISTOSPACE_CACHE", raising=False)


def test_local_file_layout(tmp_path, no_env):
    counts = _stgears_file(tmp_path / "stereoseq" / "stgears_E14-16h_S07.h5ad")
    adata = hs.datasets.stereoseq_embryo("S07", data_dir=tmp_path)  # a section that is not published loads too
    assert adata.shape == (5, 4)
    assert isinstance(adata.X, sp.csr_matrix) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), counts)  # the counts layer, not the log-normalised X
    assert list(adata.var_names) == GENES
    corners = np.array(CORNERS, dtype=np.float64)
    np.testing.assert_array_equal(adata.obsm["spatial"], corners + 10)  # bin centres, DNB
    assert adata.obsm["spatial"].dtype == np.float64
    np.testing.assert_array_equal(adata.obs["array_col"], corners[:, 0] // 20)
    np.testing.assert_array_equal(adata.obs["array_row"], corners[:, 1] // 20)
    assert adata.obs["array_row"].dtype == np.int64
    assert isinstance(adata.obs["annotation"].dtype, pd.CategoricalDtype)
    assert adata.obs["annotation"].tolist() == ["epidermis", "CNS", "epidermis", "muscle", "CNS"]
    assert list(adata.obs["library_id"].cat.categories) == ["S07"]
    assert adata.obsm["spatial_3d"].shape == (5, 3)
    entry = adata.uns["spatial"]["S07"]
    assert entry["images"] == {}
    assert entry["scalefactors"] == {"microns_per_pixel": 0.5, "spot_diameter_fullres": 20.0}
    assert entry["metadata"] == {
        "technology": "stereo-seq",
        "microns_per_dnb": 0.5,
        "bin_size": 20,
        "bin_size_um": 10.0,
    }
    assert entry["metadata"]["microns_per_dnb"] * 20 == entry["metadata"]["bin_size_um"]  # 500 nm DNB pitch
    # the graph sees square bins and converts µm through the recorded pitch
    hs.pp.spatial_graph(adata)
    assert adata.uns["spatial_neighbors"]["params"]["bins"] is True
    assert adata.uns["spatial_neighbors"]["params"]["n_neighbors"] == 8
    hs.pp.spatial_graph(adata, radius_um=10.5, key_added="r")  # 10 µm = 20 DNB: the 4 direct neighbours
    assert adata.obsp["r_connectivities"][0].indices.tolist() == [1, 2]
    back = tmp_path / "back.h5ad"
    adata.write_h5ad(back)
    again = ad.read_h5ad(back)
    assert again.uns["spatial"]["S07"]["metadata"]["technology"] == "stereo-seq"


@pytest.mark.parametrize("sample", ["S01", "s1", 1, "E14-16h_a_S01", "01"])
def test_sample_names(tmp_path, no_env, sample):
    _stgears_file(tmp_path / "stereoseq" / "stgears_E14-16h_S01.h5ad")
    adata = hs.datasets.stereoseq_embryo(sample, data_dir=tmp_path / "stereoseq")  # the dataset folder itself
    assert list(adata.uns["spatial"]) == ["S01"]


def test_counts_in_x_when_no_layer(tmp_path, no_env):
    counts = _stgears_file(tmp_path / "stereoseq" / "stgears_E14-16h_S02.h5ad", counts_layer=False)
    adata = hs.datasets.stereoseq_embryo("S02", data_dir=tmp_path)
    np.testing.assert_array_equal(adata.X.toarray(), counts)


def test_download_file_url(tmp_path, no_env):
    mirror = tmp_path / "mirror"
    counts = _stgears_file(mirror / "sample_data" / "1.h5ad")  # ST-GEARS' second sample file is S02
    cache = tmp_path / "cache"
    adata = hs.datasets.stereoseq_embryo("S02", cache_dir=cache, base_url=mirror.as_uri())
    assert (cache / "stereoseq" / "stgears_E14-16h_S02.h5ad").is_file()
    np.testing.assert_array_equal(adata.X.toarray(), counts)


def test_download_failure_names_url(tmp_path, no_env):
    with pytest.raises(OSError, match=r"Could not download .*sample_data/2\.h5ad"):
        hs.datasets.stereoseq_embryo("S03", cache_dir=tmp_path / "cache", base_url=(tmp_path / "none").as_uri())
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_missing_file_names_it(tmp_path, no_env):
    with pytest.raises(FileNotFoundError, match=r"stgears_E14-16h_S09\.h5ad.*not found.*data_dir"):
        hs.datasets.stereoseq_embryo("S09", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("sample", "error", "match"),
    [("S0", ValueError, "expected 'S01'"), ("slice", ValueError, "Unknown"), (1.5, TypeError, "section name")],
)
def test_bad_sample(sample, error, match, tmp_path):
    with pytest.raises(error, match=match):
        hs.datasets.stereoseq_embryo(sample, data_dir=tmp_path)


def test_bad_files(tmp_path, no_env):
    d = tmp_path / "stereoseq"
    d.mkdir()
    (d / "stgears_E14-16h_S01.h5ad").write_bytes(b"not an h5ad")
    with pytest.raises(ValueError, match=r"Could not read .*stgears_E14-16h_S01\.h5ad"):
        hs.datasets.stereoseq_embryo("S01", data_dir=tmp_path)
    _stgears_file(d / "stgears_E14-16h_S02.h5ad", corners=[(20500, 62785), (20500, 62800)])
    with pytest.raises(ValueError, match=r"not multiples of bin_size=20.*`bin_size=`"):
        hs.datasets.stereoseq_embryo("S02", data_dir=tmp_path)
    assert hs.datasets.stereoseq_embryo("S02", data_dir=tmp_path, bin_size=5).uns["spatial"]["S02"]["metadata"][
        "bin_size_um"
    ] == pytest.approx(2.5)
    with pytest.raises(ValueError, match="`bin_size` must be a positive integer"):
        hs.datasets.stereoseq_embryo("S02", data_dir=tmp_path, bin_size=0)
    a = ad.AnnData(X=np.ones((2, 2), dtype=np.float32), obs=pd.DataFrame(index=["a", "b"]))
    a.write_h5ad(d / "stgears_E14-16h_S03.h5ad")
    with pytest.raises(ValueError, match=r"no `obs` column\(s\) \['raw_x', 'raw_y'\]"):
        hs.datasets.stereoseq_embryo("S03", data_dir=tmp_path)
    obs = pd.DataFrame({"raw_x": [0, 20], "raw_y": [0, 0]}, index=["a", "b"])
    a = ad.AnnData(X=np.full((2, 2), 0.5, dtype=np.float32), obs=obs)
    a.write_h5ad(d / "stgears_E14-16h_S04.h5ad")
    with pytest.raises(ValueError, match="non-integer or negative values"):
        hs.datasets.stereoseq_embryo("S04", data_dir=tmp_path)


@pytest.mark.data
@pytest.mark.parametrize(("sample", "n_obs", "n_labels"), [("S01", 482, 6), ("S02", 549, 9)])
def test_real_sections(data_dir, sample, n_obs, n_labels):
    if not (data_dir / "stereoseq" / f"stgears_E14-16h_{sample}.h5ad").is_file():
        pytest.skip("Stereo-seq embryo sections not in the data folder")
    adata = hs.datasets.stereoseq_embryo(sample, data_dir=data_dir)
    assert adata.shape == (n_obs, 13668)
    assert adata.obs["annotation"].nunique() == n_labels
    assert np.all(np.mod(adata.X.data, 1) == 0)
    np.testing.assert_array_equal(adata.obsm["spatial"][:, 0], adata.obs["raw_x"].to_numpy() + 10)
    hs.pp.spatial_graph(adata)
    params = adata.uns["spatial_neighbors"]["params"]
    assert params["bins"] is True and params["n_isolated"] == 0
