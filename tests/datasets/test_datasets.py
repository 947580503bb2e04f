"""Tests of `hs.datasets`: local copies (real data, marked `data`), the download path against a fake mirror
(file:// URLs and an HTTP server on 127.0.0.1; never the internet), and bad input."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import threading
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

import histospace as hs

# ---------------------------------------------------------------------------------------------------------------
# fake public mirrors (same relative paths as almaan/her2st and spatialLIBD/HumanPilot), tiny synthetic files
# ---------------------------------------------------------------------------------------------------------------
PITCH_PX = 20.0  # pixels per array step -> 0.1 px/µm for ST (200 µm pitch) -> spot diameter 10 px
HER2ST_GENES = ["GENE1", "GENE2", "DUP", "DUP", "ERBB2"]


def _write_jpeg(path: Path, w: int, h: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path, quality=90)


def _her2st_section(mirror: Path, section: str, image_name: str | None, *, labels: bool, seed: int = 0) -> dict:
    """Write counts, spots (+ labels, + image) of one section; return what was written."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(3, 7), np.arange(2, 5))  # 4 x 3 grid of array positions
    xs, ys = xs.ravel(), ys.ravel()
    ids = [f"{x}x{y}" for x, y in zip(xs, ys, strict=True)]
    counts = rng.poisson(3.0, size=(len(ids), len(HER2ST_GENES)))
    cnt = mirror / "data" / "ST-cnts" / f"{section}.tsv.gz"
    cnt.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(counts, index=ids, columns=HER2ST_GENES)
    with gzip.open(cnt, "wt") as f:
        df.to_csv(f, sep="\t")
    # spots file: one extra row (a spot without counts) and rows in another order
    px, py = PITCH_PX * xs + 7.0, PITCH_PX * ys + 11.0
    spots = pd.DataFrame(
        {
            "x": np.r_[xs, 9],
            "y": np.r_[ys, 9],
            "new_x": np.r_[xs, 9] + 0.01,
            "new_y": np.r_[ys, 9] - 0.01,
            "pixel_x": np.r_[px, 999.0],
            "pixel_y": np.r_[py, 999.0],
            "selected": 1,
        }
    ).iloc[::-1]
    spf = mirror / "data" / "ST-spotfiles" / f"{section}_selection.tsv"
    spf.parent.mkdir(parents=True, exist_ok=True)
    spots.to_csv(spf, sep="\t", index=False)
    out = {"ids": ids, "counts": counts, "pixel": np.column_stack([px, py]), "xs": xs, "ys": ys}
    if labels:
        lab = pd.DataFrame(
            {
                "Row.names": [f"{a}x{b}" for a, b in zip(px, py, strict=True)][:-2] + ["nan"],
                "x": np.r_[xs[:-2] + 0.02, np.nan],  # near-integer array coords; last spots unlabelled
                "y": np.r_[ys[:-2] - 0.03, np.nan],
                "pixel_x": np.r_[px[:-2], np.nan],
                "pixel_y": np.r_[py[:-2], np.nan],
                "label": ["invasive cancer", "adipose tissue"] * ((len(ids) - 2) // 2) + ["undetermined"],
            }
        )
        lf = mirror / "data" / "ST-pat" / "lbl" / f"{section}_labeled_coordinates.tsv"
        lf.parent.mkdir(parents=True, exist_ok=True)
        lab.to_csv(lf, sep="\t", index=False)
        out["labels"] = lab
    if image_name is not None:
        _write_jpeg(mirror / "data" / "ST-imgs" / section[0] / section / image_name, 200, 160, seed)
    return out


@pytest.fixture
def her2st_mirror(tmp_path) -> tuple[Path, dict]:
    mirror = tmp_path / "her2st_mirror"
    written = {
        "C2": _her2st_section(mirror, "C2", "5714_HE_BT_C2.jpg", labels=False),
        "A1": _her2st_section(mirror, "A1", "9769_C1_HE_small.jpg", labels=True, seed=1),
    }
    return mirror, written


DLPFC_BARCODES = [f"AAAC{i:04d}-1" for i in range(10)]
DLPFC_GENES = ["MOBP", "SNAP25", "DUPG", "DUPG"]


def _write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> None:
    import h5py

    m = sp.csc_matrix(counts.T)  # genes x cells, CSC over cells
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"] = m.data.astype(np.int32)
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        fg = g.create_group("features")
        fg["id"] = np.array([f"ENSG{i:011d}" for i in range(len(genes))], dtype="S")
        fg["name"] = np.array(genes, dtype="S")
        fg["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        fg["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")


@pytest.fixture
def dlpfc_mirror(tmp_path) -> tuple[Path, dict]:
    """Bucket paths (h5/, images/) and HumanPilot paths (10X/) under one root, for sample 151507."""
    mirror = tmp_path / "dlpfc_mirror"
    sid = "151507"
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(len(DLPFC_BARCODES), len(DLPFC_GENES)))
    _write_10x_h5(mirror / "h5" / f"{sid}_filtered_feature_bc_matrix.h5", counts, DLPFC_BARCODES, DLPFC_GENES)
    rows, cols = np.arange(10) // 5, 2 * (np.arange(10) % 5)
    pxl_row, pxl_col = 100 + 50 * rows, 200 + 30 * cols
    pos = [
        f"{b},1,{r},{c},{pr},{pc}" for b, r, c, pr, pc in zip(DLPFC_BARCODES, rows, cols, pxl_row, pxl_col, strict=True)
    ]
    pos += ["TTTT0000-1,0,9,9,900,900"]  # a spot outside tissue, not in the matrix
    (mirror / "10X" / sid).mkdir(parents=True)
    (mirror / "10X" / sid / "tissue_positions_list.txt").write_text("\n".join(pos) + "\n")
    sf = {"spot_diameter_fullres": 96.4, "tissue_hires_scalef": 0.15, "fiducial_diameter_fullres": 144.6,
          "tissue_lowres_scalef": 0.045}  # fmt: skip
    (mirror / "10X" / sid / "scalefactors_json.json").write_text(json.dumps(sf))
    layers = ["L1", "L2", "L3", "WM", "L6", "L1", "L2", "L3"]  # 8 of 10 spots annotated
    lines = [f"{b}\t{sid}\t{lay}" for b, lay in zip(DLPFC_BARCODES[:8], layers, strict=True)]
    lines += [f"{DLPFC_BARCODES[9]}\t151508\tL4"]  # another sample's row with the same barcode: ignored
    (mirror / "10X" / "barcode_level_layer_map.tsv").write_text("\n".join(lines) + "\n")
    (mirror / "images").mkdir()
    Image.fromarray(np.full((60, 50, 3), 200, np.uint8)).save(mirror / "images" / f"{sid}_tissue_lowres_image.png")
    Image.fromarray(np.full((200, 180, 4), 90, np.uint8)).save(mirror / "images" / f"{sid}_tissue_hires_image.png")
    return mirror, {"counts": counts, "pxl": np.column_stack([pxl_col, pxl_row]), "rows": rows, "cols": cols, "sf": sf}


@pytest.fixture
def no_env(monkeypatch):
    """No HISTOSPACE_DATA / HISTOSPACE_CACHE, so the loaders use the cache given by `cache_dir=`."""
    monkeypatch.delenv("HISTOSPACE_DATA", raising=False)
    monkeypatch.delenv("HISTOSPACE_CACHE", raising=False)


@pytest.fixture
def http_mirror():
    """Serve a folder over HTTP on 127.0.0.1 (loopback only) in a thread; yields a function folder -> base URL."""
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield serve
    for srv in servers:
        srv.shutdown()
        srv.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


# ---------------------------------------------------------------------------------------------------------------
# her2st: download path
# ---------------------------------------------------------------------------------------------------------------
def _check_visium_layout(adata: ad.AnnData, lib: str, technology: str) -> None:
    assert sp.isspmatrix_csr(adata.X) or isinstance(adata.X, sp.csr_array)
    assert np.issubdtype(adata.X.dtype, np.integer)
    assert adata.var_names.is_unique and adata.obs_names.is_unique
    assert adata.obsm["spatial"].dtype == np.float64 and adata.obsm["spatial"].shape == (adata.n_obs, 2)
    assert np.issubdtype(adata.obs["array_row"].dtype, np.integer)
    assert np.issubdtype(adata.obs["array_col"].dtype, np.integer)
    assert isinstance(adata.obs["library_id"].dtype, pd.CategoricalDtype)
    assert list(adata.obs["library_id"].cat.categories) == [lib]
    assert list(adata.uns["spatial"]) == [lib]
    entry = adata.uns["spatial"][lib]
    assert set(entry) == {"images", "scalefactors", "metadata"}
    assert entry["metadata"]["technology"] == technology
    assert entry["scalefactors"]["spot_diameter_fullres"] > 0
    for name, img in entry["images"].items():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert f"tissue_{name}_scalef" in entry["scalefactors"]


def test_her2st_download_file_url(her2st_mirror, tmp_path, no_env):
    mirror, written = her2st_mirror
    cache = tmp_path / "cache"
    adata = hs.datasets.her2st("C2", cache_dir=cache, base_url=mirror.as_uri(), hires_max_size=100)
    # the cache holds the shared-data layout
    root = cache / "her2st"
    assert (root / "counts" / "C2.tsv.gz").is_file()
    assert (root / "spots" / "C2_selection.tsv").is_file()
    assert (root / "images" / "C2_5714_HE_BT_C2.jpg").is_file()
    assert not list(root.rglob("*.part"))

    _check_visium_layout(adata, "C2", "st")
    c2 = written["C2"]
    assert adata.shape == (12, len(HER2ST_GENES))
    assert adata.X.dtype == np.int32
    np.testing.assert_array_equal(adata.X.toarray(), c2["counts"])
    assert list(adata.var_names) == ["GENE1", "GENE2", "DUP", "DUP-1", "ERBB2"]
    assert list(adata.obs_names[:2]) == ["C2_3x2", "C2_4x2"]
    np.testing.assert_allclose(adata.obsm["spatial"], c2["pixel"])
    np.testing.assert_array_equal(adata.obs["array_col"], c2["xs"])
    np.testing.assert_array_equal(adata.obs["array_row"], c2["ys"])
    assert (adata.obs["patient"] == "C").all() and isinstance(adata.obs["patient"].dtype, pd.CategoricalDtype)
    assert "label" not in adata.obs

    entry = adata.uns["spatial"]["C2"]
    sf, meta = entry["scalefactors"], entry["metadata"]
    assert max(entry["images"]["hires"].shape[:2]) == 100
    assert entry["images"]["hires"].shape[:2] == (80, 100)  # 160 x 200 source, aspect kept
    assert sf["tissue_hires_scalef"] == pytest.approx(0.5)
    assert max(entry["images"]["lowres"].shape[:2]) <= 100
    assert sf["tissue_lowres_scalef"] == pytest.approx(entry["images"]["lowres"].shape[1] / 200)
    # 20 px per 200 µm array step -> 0.1 px/µm -> a 100 µm spot is 10 px
    assert sf["spot_diameter_fullres"] == pytest.approx(10.0)
    assert sf["fiducial_diameter_fullres"] == pytest.approx(10.0)
    assert meta["spot_diameter_um"] == 100.0
    assert meta["pixels_per_um"] == pytest.approx(0.1)
    assert Path(meta["source_image_path"]) == (root / "images" / "C2_5714_HE_BT_C2.jpg").resolve()

    # second call reads the cache only (the mirror URL is now broken)
    again = hs.datasets.her2st("C2", cache_dir=cache, base_url=(tmp_path / "gone").as_uri(), hires_max_size=100)
    np.testing.assert_array_equal(again.X.toarray(), adata.X.toarray())


def test_her2st_download_http_loopback_labels(her2st_mirror, tmp_path, no_env, http_mirror):
    mirror, written = her2st_mirror
    base = http_mirror(mirror)
    cache = tmp_path / "cache"
    adata = hs.datasets.her2st("a1", cache_dir=cache, base_url=base, hires_max_size=64)  # case-insensitive id
    assert (cache / "her2st" / "pathologist_labels" / "A1_labeled_coordinates.tsv").is_file()
    assert (cache / "her2st" / "images" / "A1_9769_C1_HE_small.jpg").is_file()
    _check_visium_layout(adata, "A1", "st")
    assert (adata.obs["patient"] == "A").all()
    lab = adata.obs["label"]
    assert isinstance(lab.dtype, pd.CategoricalDtype)
    assert list(lab.cat.categories) == ["invasive cancer", "adipose tissue"]  # classes present, fixed order
    assert lab.isna().sum() == 2  # the last two spots have no (or a NaN-coordinate) label row
    expected = written["A1"]["labels"]["label"].iloc[:-1].tolist()
    assert lab.iloc[:10].tolist() == expected


def test_her2st_image_false_downloads_no_image(her2st_mirror, tmp_path, no_env):
    mirror, _ = her2st_mirror
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "no image" warning when the image was not asked for
        adata = hs.datasets.her2st("C2", cache_dir=cache, base_url=mirror.as_uri(), image=False)
    assert not (cache / "her2st" / "images").exists()
    assert adata.uns["spatial"]["C2"]["images"] == {}
    assert "source_image_path" not in adata.uns["spatial"]["C2"]["metadata"]
    assert "tissue_hires_scalef" not in adata.uns["spatial"]["C2"]["scalefactors"]


def test_her2st_download_failure_names_url(her2st_mirror, tmp_path, no_env):
    mirror, _ = her2st_mirror
    (mirror / "data" / "ST-spotfiles" / "C2_selection.tsv").unlink()  # second file of the set is missing
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match=r"Could not download .*data/ST-spotfiles/C2_selection\.tsv"):
        hs.datasets.her2st("C2", cache_dir=cache, base_url=mirror.as_uri())
    root = cache / "her2st"
    assert (root / "counts" / "C2.tsv.gz").is_file()  # the first file is kept for the next attempt
    assert not (root / "spots" / "C2_selection.tsv").exists()
    assert not list(root.rglob("*.part"))  # no partial file left behind


def test_cache_dir_from_environment(her2st_mirror, tmp_path, no_env, monkeypatch):
    mirror, _ = her2st_mirror
    monkeypatch.setenv("HISTOSPACE_CACHE", str(tmp_path / "envcache"))
    hs.datasets.her2st("C2", base_url=mirror.as_uri(), image=False)
    assert (tmp_path / "envcache" / "her2st" / "counts" / "C2.tsv.gz").is_file()
    monkeypatch.delenv("HISTOSPACE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    hs.datasets.her2st("C2", base_url=mirror.as_uri(), image=False)
    assert (tmp_path / "xdg" / "histospace" / "her2st" / "spots" / "C2_selection.tsv").is_file()


# ---------------------------------------------------------------------------------------------------------------
# her2st: local data dir (synthetic), warnings and bad input
# ---------------------------------------------------------------------------------------------------------------
def _local_her2st(mirror: Path, root: Path, section: str, *, image: bool) -> Path:
    """Copy a mirror section into the shared-data layout `<root>/her2st/...`."""
    d = root / "her2st"
    for sub in ("counts", "spots", "images"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "counts" / f"{section}.tsv.gz").write_bytes((mirror / "data" / "ST-cnts" / f"{section}.tsv.gz").read_bytes())
    (d / "spots" / f"{section}_selection.tsv").write_bytes(
        (mirror / "data" / "ST-spotfiles" / f"{section}_selection.tsv").read_bytes()
    )
    if image:
        src = next((mirror / "data" / "ST-imgs" / section[0] / section).glob("*.jpg"))
        (d / "images" / f"{section}_{src.name}").write_bytes(src.read_bytes())
    return d


def test_her2st_local_without_image_warns(her2st_mirror, tmp_path):
    mirror, written = her2st_mirror
    _local_her2st(mirror, tmp_path / "data", "C2", image=False)
    with pytest.warns(UserWarning, match=r"no H&E image found .*C2_\*\.jpg"):
        adata = hs.datasets.her2st("C2", data_dir=tmp_path / "data")
    _check_visium_layout(adata, "C2", "st")
    entry = adata.uns["spatial"]["C2"]
    assert entry["images"] == {}
    assert set(entry["scalefactors"]) == {"spot_diameter_fullres", "fiducial_diameter_fullres"}
    assert "source_image_path" not in entry["metadata"]
    np.testing.assert_allclose(adata.obsm["spatial"], written["C2"]["pixel"])


def test_her2st_data_dir_may_be_dataset_folder(her2st_mirror, tmp_path, monkeypatch):
    mirror, _ = her2st_mirror
    d = _local_her2st(mirror, tmp_path / "data", "C2", image=True)
    a = hs.datasets.her2st("C2", data_dir=d, hires_max_size=50)  # the her2st folder itself
    monkeypatch.setenv("HISTOSPACE_DATA", str(tmp_path / "data"))  # the root, through the environment
    b = hs.datasets.her2st("C2", hires_max_size=50)
    assert a.uns["spatial"]["C2"]["metadata"]["source_image_path"] == str(
        (d / "images" / "C2_5714_HE_BT_C2.jpg").resolve()
    )
    np.testing.assert_array_equal(a.uns["spatial"]["C2"]["images"]["hires"], b.uns["spatial"]["C2"]["images"]["hires"])


def test_her2st_unknown_section():
    with pytest.raises(ValueError, match=r"Unknown her2st section 'Z9'; valid sections: A1, A2.*H3"):
        hs.datasets.her2st("Z9")
    with pytest.raises(ValueError, match="E4"):  # patients E-H have 3 sections
        hs.datasets.her2st("E4")
    with pytest.raises(TypeError, match="section"):
        hs.datasets.her2st(2)


def test_her2st_bad_hires_max_size():
    with pytest.raises(ValueError, match="hires_max_size"):
        hs.datasets.her2st("C2", hires_max_size=0)


def test_her2st_data_dir_without_files(tmp_path):
    (tmp_path / "her2st").mkdir()
    with pytest.raises(FileNotFoundError, match=r"counts/C2\.tsv\.gz not found .*HISTOSPACE_DATA"):
        hs.datasets.her2st("C2", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"is not a directory"):
        hs.datasets.her2st("C2", data_dir=tmp_path / "nope")


def test_her2st_corrupt_files(her2st_mirror, tmp_path):
    mirror, _ = her2st_mirror
    d = _local_her2st(mirror, tmp_path / "data", "C2", image=True)
    counts = d / "counts" / "C2.tsv.gz"
    good = counts.read_bytes()
    counts.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"Could not read the her2st count table .*C2\.tsv\.gz"):
        hs.datasets.her2st("C2", data_dir=d)
    counts.write_bytes(gzip.compress(b"\tG1\tG2\n3x2\t1\tx\n"))
    with pytest.raises(ValueError, match=r"count table"):
        hs.datasets.her2st("C2", data_dir=d)
    counts.write_bytes(good)
    img = next((d / "images").glob("C2_*.jpg"))
    img.write_bytes(b"\xff\xd8 broken jpeg")
    with pytest.raises(ValueError, match=r"Could not read the H&E image .*C2_5714_HE_BT_C2\.jpg.*image=False"):
        hs.datasets.her2st("C2", data_dir=d)
    # the spots file of another section: spot ids do not match
    spots = d / "spots" / "C2_selection.tsv"
    spots.write_text("x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected\n30\t30\t30\t30\t1\t1\t1\n")
    with pytest.raises(ValueError, match=r"12 spots of the count table have no row in .*C2_selection\.tsv"):
        hs.datasets.her2st("C2", data_dir=d, image=False)


def test_her2st_h5ad_round_trip(her2st_mirror, tmp_path, no_env):
    mirror, _ = her2st_mirror
    adata = hs.datasets.her2st("A1", cache_dir=tmp_path / "cache", base_url=mirror.as_uri(), hires_max_size=64)
    adata.write_h5ad(tmp_path / "a1.h5ad")
    back = ad.read_h5ad(tmp_path / "a1.h5ad")
    np.testing.assert_array_equal(back.X.toarray(), adata.X.toarray())
    np.testing.assert_array_equal(back.obsm["spatial"], adata.obsm["spatial"])
    pd.testing.assert_series_equal(back.obs["label"], adata.obs["label"])
    e0, e1 = adata.uns["spatial"]["A1"], back.uns["spatial"]["A1"]
    np.testing.assert_array_equal(e1["images"]["hires"], e0["images"]["hires"])
    assert e1["metadata"] == e0["metadata"]
    assert e1["scalefactors"] == pytest.approx(e0["scalefactors"])


# ---------------------------------------------------------------------------------------------------------------
# DLPFC: download path, local 10x layout, bad input
# ---------------------------------------------------------------------------------------------------------------
def test_dlpfc_download_file_url(dlpfc_mirror, tmp_path, no_env):
    mirror, w = dlpfc_mirror
    cache = tmp_path / "cache"
    adata = hs.datasets.dlpfc(151507, cache_dir=cache, base_url=mirror.as_uri())
    d = cache / "dlpfc"
    assert (d / "151507" / "151507_filtered_feature_bc_matrix.h5").is_file()
    for name in (
        "tissue_positions_list.csv",
        "scalefactors_json.json",
        "tissue_lowres_image.png",
        "tissue_hires_image.png",
    ):
        assert (d / "151507" / "spatial" / name).is_file(), name
    assert (d / "barcode_level_layer_map.tsv").is_file()

    _check_visium_layout(adata, "151507", "visium")
    assert adata.shape == (10, 4)
    assert list(adata.obs_names) == DLPFC_BARCODES
    assert list(adata.var_names) == ["MOBP", "SNAP25", "DUPG", "DUPG-1"]
    assert adata.X.dtype == np.int32
    np.testing.assert_array_equal(adata.X.toarray(), w["counts"])
    np.testing.assert_allclose(adata.obsm["spatial"], w["pxl"])  # (x, y) = (pxl_col, pxl_row)
    np.testing.assert_array_equal(adata.obs["array_row"], w["rows"])
    np.testing.assert_array_equal(adata.obs["array_col"], w["cols"])
    lab = adata.obs["layer_guess_reordered"]
    assert list(lab.cat.categories) == ["Layer1", "Layer2", "Layer3", "Layer6", "WM"]
    assert lab.iloc[:5].tolist() == ["Layer1", "Layer2", "Layer3", "WM", "Layer6"]
    assert lab.isna().sum() == 2
    entry = adata.uns["spatial"]["151507"]
    assert entry["scalefactors"] == pytest.approx(w["sf"])
    assert entry["images"]["lowres"].shape == (60, 50, 3)
    assert entry["images"]["hires"].shape == (200, 180, 3)  # RGBA file -> RGB
    assert entry["metadata"]["spot_diameter_um"] == 55.0
    assert "source_image_path" not in entry["metadata"]
    back_path = tmp_path / "d.h5ad"
    adata.write_h5ad(back_path)
    back = ad.read_h5ad(back_path)
    pd.testing.assert_series_equal(back.obs["layer_guess_reordered"], lab)
    np.testing.assert_array_equal(back.uns["spatial"]["151507"]["images"]["hires"], entry["images"]["hires"])


def test_dlpfc_download_http_loopback_no_image(dlpfc_mirror, tmp_path, no_env, http_mirror):
    mirror, w = dlpfc_mirror
    cache = tmp_path / "cache"
    adata = hs.datasets.dlpfc("151507", cache_dir=cache, base_url=http_mirror(mirror), image=False)
    assert adata.uns["spatial"]["151507"]["images"] == {}
    assert not (cache / "dlpfc" / "151507" / "spatial" / "tissue_hires_image.png").exists()
    np.testing.assert_array_equal(adata.X.toarray(), w["counts"])


def test_dlpfc_download_failure_names_url(tmp_path, no_env):
    with pytest.raises(OSError, match=r"Could not download .*h5/151676_filtered_feature_bc_matrix\.h5"):
        hs.datasets.dlpfc("151676", cache_dir=tmp_path / "cache", base_url=(tmp_path / "nothing").as_uri())
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_dlpfc_local_fullres_path(dlpfc_mirror, tmp_path, no_env):
    mirror, _ = dlpfc_mirror
    cache = tmp_path / "cache"
    hs.datasets.dlpfc("151507", cache_dir=cache, base_url=mirror.as_uri())
    sample = cache / "dlpfc" / "151507"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(sample / "151507_full_image.tif")
    # the filled cache works as a data dir too, at the root, the dataset folder and the sample folder
    for d in (cache, cache / "dlpfc", sample):
        adata = hs.datasets.dlpfc("151507", data_dir=d)
        assert adata.uns["spatial"]["151507"]["metadata"]["source_image_path"] == str(sample / "151507_full_image.tif")


def test_dlpfc_unknown_sample():
    with pytest.raises(ValueError, match=r"Unknown DLPFC sample_id '999'; valid ids: 151507, .*151676"):
        hs.datasets.dlpfc("999")
    with pytest.raises(TypeError, match="sample_id"):
        hs.datasets.dlpfc(1.5)


def test_dlpfc_data_dir_without_files(tmp_path):
    (tmp_path / "dlpfc").mkdir()
    with pytest.raises(FileNotFoundError, match=r"151674_5000genes\.h5ad.*HISTOSPACE_DATA.*download"):
        hs.datasets.dlpfc("151674", data_dir=tmp_path)


def test_dlpfc_corrupt_h5(dlpfc_mirror, tmp_path, no_env):
    mirror, _ = dlpfc_mirror
    cache = tmp_path / "cache"
    hs.datasets.dlpfc("151507", cache_dir=cache, base_url=mirror.as_uri(), image=False)
    (cache / "dlpfc" / "151507" / "151507_filtered_feature_bc_matrix.h5").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"Could not read the 10x count matrix .*151507_filtered_feature_bc_matrix"):
        hs.datasets.dlpfc("151507", cache_dir=cache)


# ---------------------------------------------------------------------------------------------------------------
# real data (../shared/data or HISTOSPACE_DATA)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.data
def test_dlpfc_151673_real(data_dir):
    if not (data_dir / "dlpfc" / "151673").is_dir():
        pytest.skip("DLPFC 151673 not in the data dir")
    adata = hs.datasets.dlpfc("151673", data_dir=data_dir)
    _check_visium_layout(adata, "151673", "visium")
    assert adata.shape == (3639, 5000)
    x = adata.X
    assert np.issubdtype(x.dtype, np.integer) and x.min() >= 0 and x.sum() > 0
    lab = adata.obs["layer_guess_reordered"]
    assert isinstance(lab.dtype, pd.CategoricalDtype)
    assert list(lab.cat.categories) == ["Layer1", "Layer2", "Layer3", "Layer4", "Layer5", "Layer6", "WM"]
    assert lab.isna().sum() == 28
    entry = adata.uns["spatial"]["151673"]
    assert entry["images"]["lowres"].shape == (600, 600, 3)
    sf = entry["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(96.4, abs=0.1)
    assert sf["tissue_lowres_scalef"] == pytest.approx(0.045, abs=1e-3)
    assert entry["metadata"]["technology"] == "visium" and entry["metadata"]["spot_diameter_um"] == 55.0
    lowres_xy = adata.obsm["spatial"] * sf["tissue_lowres_scalef"]
    assert (lowres_xy >= 0).all() and (lowres_xy < 600).all()


@pytest.mark.data
def test_dlpfc_missing_sample_real(data_dir):
    with pytest.raises(FileNotFoundError, match=r"151507_5000genes\.h5ad.*HISTOSPACE_DATA"):
        hs.datasets.dlpfc("151507", data_dir=data_dir)


@pytest.mark.data
def test_her2st_c2_real(data_dir):
    if not (data_dir / "her2st" / "images").is_dir():
        pytest.skip("her2st images not in the data dir")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # C2 has an image: no warning
        adata = hs.datasets.her2st("C2", data_dir=data_dir)
    _check_visium_layout(adata, "C2", "st")
    assert adata.n_obs == 187 and adata.n_vars > 15000
    assert (adata.obs["patient"] == "C").all()
    entry = adata.uns["spatial"]["C2"]
    hires = entry["images"]["hires"]
    assert max(hires.shape[:2]) == 2000
    src = Path(entry["metadata"]["source_image_path"])
    assert src.is_absolute() and src.is_file()
    sf = entry["scalefactors"]
    assert 110 <= sf["spot_diameter_fullres"] <= 150
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ~92 Mpx H&E
        with Image.open(src) as im:
            full_w, full_h = im.size
    assert sf["tissue_hires_scalef"] == pytest.approx(2000 / max(full_w, full_h))
    # spot centres fall inside the image, at full resolution and after scaling to hires
    xy = adata.obsm["spatial"]
    assert (xy >= 0).all() and (xy[:, 0] < full_w).all() and (xy[:, 1] < full_h).all()
    hxy = xy * sf["tissue_hires_scalef"]
    assert (hxy[:, 0] < hires.shape[1]).all() and (hxy[:, 1] < hires.shape[0]).all()
    # tissue under the spots is darker than the slide background (real overlay, not just inside the frame)
    r, c = hxy[:, 1].astype(int), hxy[:, 0].astype(int)
    assert hires[r, c].mean() < np.percentile(hires.mean(axis=2), 90)


@pytest.mark.data
def test_her2st_a1_real_labels_no_image(data_dir):
    with pytest.warns(UserWarning, match="no H&E image"):
        adata = hs.datasets.her2st("A1", data_dir=data_dir)
    assert adata.n_obs == 346
    lab = adata.obs["label"]
    assert isinstance(lab.dtype, pd.CategoricalDtype)
    assert lab.notna().mean() > 0.99
    assert "invasive cancer" in lab.cat.categories
    assert adata.uns["spatial"]["A1"]["images"] == {}
    assert "source_image_path" not in adata.uns["spatial"]["A1"]["metadata"]
    assert adata.uns["spatial"]["A1"]["scalefactors"]["spot_diameter_fullres"] > 0
