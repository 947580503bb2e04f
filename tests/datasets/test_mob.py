"""Tests of `hs.datasets.mob`: a tiny synthetic folder in STUtility's layout (no data needed), the download path
against a file:// mirror, bad input, and the real MOB1-MOB3 files (marked `data`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import histospace as hs

STEP_PX = (20.0, 22.0)  # pixels per array step of x and of y (anisotropic, as on the '2k' array)
OFFSET = (30.0, 40.0)
GENES = ["ENSMUSG00000064339.1", "ENSMUSG00000064337.1", "ENSMUSG00000098178.2"]
SPOTS = [(1, 1), (3, 1), (2, 2), (4, 2), (1, 3), (3, 3), (2, 4), (4, 4)]  # checkerboard, x + y even
NO_ROW = (4, 4)  # a spot with counts but no row in the alignment table


def _write_section(folder: Path, section: str, *, seed: int = 0, image: bool = True) -> dict:
    """Counts, alignment table (+ JPEG) of one section in STUtility's `inst/extdata/counts` layout."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{x}x{y}" for x, y in SPOTS]
    counts = rng.poisson(4.0, size=(len(ids), len(GENES)))
    pd.DataFrame(counts, index=ids, columns=GENES).to_csv(folder / f"{section}.tsv", sep="\t")
    # every array position of a 5 x 5 checkerboard except NO_ROW, in another order, plus small detection noise
    pos = [(x, y) for y in range(1, 6) for x in range(1, 6) if (x + y) % 2 == 0 and (x, y) != NO_ROW][::-1]
    xs, ys = np.array(pos, dtype=float).T
    px = OFFSET[0] + STEP_PX[0] * xs + rng.normal(0, 0.3, len(xs))
    py = OFFSET[1] + STEP_PX[1] * ys + rng.normal(0, 0.3, len(xs))
    table = pd.DataFrame(
        {"x": xs.astype(int), "y": ys.astype(int), "new_x": xs, "new_y": ys, "pixel_x": px, "pixel_y": py}
    )
    table["selected"] = 0
    table.to_csv(folder / f"alignment_table_{section}.tsv", sep="\t", index=False)
    if image:
        img = rng.integers(0, 255, size=(180, 160, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{section}.jpg", quality=95)
    return {
        "ids": ids,
        "counts": counts,
        "table": table.set_index(table["x"].astype(str) + "x" + table["y"].astype(str)),
    }


def _write_metadata(folder: Path, sections: dict[str, str]) -> None:
    """STUtility's `metaData.csv`: `;`-separated, absolute paths of the count files, the animal in `individual`."""
    base = "/Users/someone/R/library/STutility/extdata/counts"
    rows = [
        f"{base}/{s}.tsv;Mouse;{100 + 10 * i};{a};{base}/alignment_table_{s}.tsv;{base}/{s}.jpg"
        for i, (s, a) in enumerate(sections.items())
    ]
    (folder / "metaData.csv").write_text("samples;type;z;individual;spotfiles;imgs\n" + "\n".join(rows) + "\n")


@pytest.fixture
def mob_dir(tmp_path) -> tuple[Path, dict]:
    """A data root holding `mob/` with MOB1 (animal 1) and MOB3 (animal 2)."""
    folder = tmp_path / "data" / "mob"
    written = {"MOB1": _write_section(folder, "MOB1"), "MOB3": _write_section(folder, "MOB3", seed=1)}
    _write_metadata(folder, {"MOB1": "1", "MOB2": "1", "MOB3": "2", "MOB4": "2"})
    return tmp_path / "data", written


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    monkeypatch.delenv("HISTOSPACE_DATA", raising=False)
    monkeypatch.setenv("HISTOSPACE_CACHE", str(tmp_path / "default_cache"))


def test_mob_synthetic_layout(mob_dir):
    root, w = mob_dir
    adata = hs.datasets.mob("MOB3", data_dir=root)
    written = w["MOB3"]
    assert adata.shape == (len(SPOTS), len(GENES))
    assert list(adata.obs_names) == [f"MOB3_{s}" for s in written["ids"]]
    assert adata.X.dtype == np.int32
    np.testing.assert_array_equal(adata.X.toarray(), written["counts"])
    # Ensembl ids without the version as var_names; the ids of the file in var['gene_ids']
    assert list(adata.var_names) == ["ENSMUSG00000064339", "ENSMUSG00000064337", "ENSMUSG00000098178"]
    assert list(adata.var["gene_ids"]) == GENES
    np.testing.assert_array_equal(adata.obs["array_col"], [x for x, _ in SPOTS])
    np.testing.assert_array_equal(adata.obs["array_row"], [y for _, y in SPOTS])
    assert adata.obs["array_row"].dtype == np.int64
    assert list(adata.obs["library_id"].cat.categories) == ["MOB3"]
    assert list(adata.obs["animal"]) == ["2"] * len(SPOTS)
    assert isinstance(adata.obs["animal"].dtype, pd.CategoricalDtype)

    # spot centres: the table's pixels; the spot without a row from the fitted affine map (noise 0.3 px)
    xy = adata.obsm["spatial"]
    assert xy.dtype == np.float64
    for k, (x, y) in enumerate(SPOTS):
        if (x, y) == NO_ROW:
            expected = (OFFSET[0] + STEP_PX[0] * x, OFFSET[1] + STEP_PX[1] * y)
            np.testing.assert_allclose(xy[k], expected, atol=1.0)
        else:
            np.testing.assert_allclose(xy[k], written["table"].loc[f"{x}x{y}", ["pixel_x", "pixel_y"]], rtol=1e-12)

    entry = adata.uns["spatial"]["MOB3"]
    meta, sf = entry["metadata"], entry["scalefactors"]
    # pixels per µm: the mean fitted step of both axes (21 px) / 100 µm
    assert meta["pixels_per_um"] == pytest.approx(np.mean(STEP_PX) / 100.0, rel=0.01)
    assert sf["spot_diameter_fullres"] == pytest.approx(100.0 * meta["pixels_per_um"])
    assert sf["fiducial_diameter_fullres"] == sf["spot_diameter_fullres"]
    assert meta["technology"] == "st" and meta["array"] == "2k"
    assert meta["spot_diameter_um"] == 100.0 and meta["array_step_um"] == 100.0
    assert meta["source_image_path"] == str((root / "mob" / "MOB3.jpg").resolve())
    assert entry["images"]["hires"].shape == (180, 160, 3)  # smaller than hires_max_size: kept as it is
    assert sf["tissue_hires_scalef"] == 1.0
    assert entry["images"]["hires"].dtype == np.uint8


def test_mob_downscaled_images_and_no_image(mob_dir):
    root, _ = mob_dir
    adata = hs.datasets.mob("MOB1", data_dir=root / "mob", hires_max_size=90)  # the mob folder itself
    entry = adata.uns["spatial"]["MOB1"]
    assert entry["images"]["hires"].shape == (90, 80, 3)
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(0.5)
    assert entry["images"]["lowres"].shape == (90, 80, 3)  # already below 600 px
    assert entry["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.5)
    b = hs.datasets.mob("mob1", data_dir=root, image=False)  # names of known sections are case-insensitive
    assert b.uns["spatial"]["MOB1"]["images"] == {}
    assert "tissue_hires_scalef" not in b.uns["spatial"]["MOB1"]["scalefactors"]
    assert b.uns["spatial"]["MOB1"]["metadata"]["source_image_path"].endswith("MOB1.jpg")


def test_mob_env_and_other_section_in_the_same_layout(mob_dir, monkeypatch):
    root, _ = mob_dir
    _write_section(root / "mob", "MOB7", seed=3, image=False)  # not listed in metaData.csv, no image
    monkeypatch.setenv("HISTOSPACE_DATA", str(root))
    with pytest.warns(UserWarning) as rec:
        adata = hs.datasets.mob("MOB7")
    msgs = [str(r.message) for r in rec]
    assert any("section MOB7 is not listed in" in m and "metaData.csv" in m for m in msgs)
    assert any("no H&E image" in m and "MOB7.jpg" in m and "image=False" in m for m in msgs)
    assert adata.n_obs == len(SPOTS) and "animal" not in adata.obs
    assert adata.uns["spatial"]["MOB7"]["images"] == {}


def test_mob_without_metadata_file(mob_dir):
    root, _ = mob_dir
    (root / "mob" / "metaData.csv").unlink()
    with pytest.warns(UserWarning, match=r"metaData\.csv not found; no `obs\['animal'\]`"):
        adata = hs.datasets.mob("MOB1", data_dir=root, image=False)
    assert "animal" not in adata.obs


def test_mob_missing_files_name_the_file(mob_dir, tmp_path):
    root, _ = mob_dir
    with pytest.raises(FileNotFoundError, match=r"MOB section MOB2: file .*mob/MOB2\.tsv not found .*`data_dir`"):
        hs.datasets.mob("MOB2", data_dir=root)
    (root / "mob" / "alignment_table_MOB3.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"alignment_table_MOB3\.tsv not found .*HISTOSPACE_DATA"):
        hs.datasets.mob("MOB3", data_dir=root)
    with pytest.raises(FileNotFoundError, match=r"is not a directory"):
        hs.datasets.mob("MOB1", data_dir=tmp_path / "nope")


def test_mob_bad_section_and_options():
    with pytest.raises(TypeError, match=r"`section` must be a str such as 'MOB1', got int"):
        hs.datasets.mob(1)
    for bad in ("", "  ", "../MOB1", "a/b"):
        with pytest.raises(ValueError, match=r"`section` must name a section such as 'MOB1'.*MOB1, MOB2, MOB3, MOB4"):
            hs.datasets.mob(bad)
    with pytest.raises(ValueError, match="hires_max_size"):
        hs.datasets.mob("MOB1", hires_max_size=0)


def test_mob_corrupt_files(mob_dir):
    root, _ = mob_dir
    d = root / "mob"
    counts = d / "MOB1.tsv"
    good = counts.read_bytes()
    counts.write_text("\tG1\tG2\n1x1\t1\tx\n")
    with pytest.raises(ValueError, match=r"Could not read the MOB count table .*MOB1\.tsv.*STUtility"):
        hs.datasets.mob("MOB1", data_dir=root)
    counts.write_bytes(good)
    table = d / "alignment_table_MOB1.tsv"
    table.write_text("x\ty\tnew_x\n1\t1\t1\n")
    with pytest.raises(ValueError, match=r"alignment table .*alignment_table_MOB1\.tsv lacks the columns \['pixel_x'"):
        hs.datasets.mob("MOB1", data_dir=root)
    # the table of other spots: most count spots have no row
    table.write_text("x\ty\tpixel_x\tpixel_y\n30\t30\t1\t1\n32\t30\t3\t1\n")
    with pytest.raises(ValueError, match=r"8 of 8 spots of the count table have no row in .*do not belong together"):
        hs.datasets.mob("MOB1", data_dir=root)
    (d / "MOB3.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    with pytest.raises(ValueError, match=r"Could not read the H&E image .*MOB3\.jpg.*image=False"):
        hs.datasets.mob("MOB3", data_dir=root)
    (d / "metaData.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"Could not read .*metaData\.csv.*`samples`.*`individual`"):
        hs.datasets.mob("MOB3", data_dir=root, image=False)


def test_mob_download_from_mirror(tmp_path, no_env):
    mirror = tmp_path / "mirror"
    w = _write_section(mirror / "inst" / "extdata" / "counts", "MOB2", seed=5)
    _write_metadata(mirror / "inst" / "extdata", {"MOB1": "1", "MOB2": "1"})
    cache = tmp_path / "cache"
    adata = hs.datasets.mob("MOB2", cache_dir=cache, base_url=mirror.as_uri())
    for name in ("MOB2.tsv", "alignment_table_MOB2.tsv", "MOB2.jpg", "metaData.csv"):
        assert (cache / "mob" / name).is_file(), name
    np.testing.assert_array_equal(adata.X.toarray(), w["counts"])
    assert list(adata.obs["animal"].unique()) == ["1"]
    with pytest.raises(OSError, match=r"Could not download .*inst/extdata/counts/MOB4\.tsv"):
        hs.datasets.mob("MOB4", cache_dir=cache, base_url=mirror.as_uri())
    assert not list(cache.rglob("*.part"))


def test_mob_h5ad_round_trip(mob_dir, tmp_path):
    root, _ = mob_dir
    adata = hs.datasets.mob("MOB1", data_dir=root)
    adata.write_h5ad(tmp_path / "m.h5ad")
    back = ad.read_h5ad(tmp_path / "m.h5ad")
    np.testing.assert_array_equal(back.X.toarray(), adata.X.toarray())
    np.testing.assert_array_equal(back.obsm["spatial"], adata.obsm["spatial"])
    pd.testing.assert_series_equal(back.obs["animal"], adata.obs["animal"])
    pd.testing.assert_frame_equal(back.var, adata.var)
    e0, e1 = adata.uns["spatial"]["MOB1"], back.uns["spatial"]["MOB1"]
    np.testing.assert_array_equal(e1["images"]["hires"], e0["images"]["hires"])
    assert e1["metadata"] == e0["metadata"]
    assert e1["scalefactors"] == pytest.approx(e0["scalefactors"])


# ---------------------------------------------------------------------------------------------------------------
# real data: MOB1-MOB3 of the shared copy
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_mob(data_dir):
    if not (data_dir / "mob" / "MOB1.tsv").is_file():
        pytest.skip("mob not in the data dir")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every real section has its image and metadata: no warning
        return {s: hs.datasets.mob(s, data_dir=data_dir) for s in ("MOB1", "MOB2", "MOB3")}


@pytest.mark.data
def test_mob_real_shapes_and_animals(real_mob):
    n_obs = {"MOB1": 1934, "MOB2": 1933, "MOB3": 1933}
    animal = {"MOB1": "1", "MOB2": "1", "MOB3": "2"}
    for s, adata in real_mob.items():
        assert adata.shape == (n_obs[s], 1000)
        assert np.issubdtype(adata.X.dtype, np.integer) and adata.X.min() >= 0
        assert 300 < np.median(adata.X.sum(axis=1).A1) < 3000  # UMI per spot of legacy ST
        assert adata.var_names.str.fullmatch(r"ENSMUSG\d{11}").all() and adata.var_names.is_unique
        assert adata.var["gene_ids"].str.startswith(tuple(adata.var_names[:1])).iloc[0]
        assert list(adata.obs["animal"].unique()) == [animal[s]]
        assert ((adata.obs["array_row"] + adata.obs["array_col"]) % 2 == 0).all()  # the 2k checkerboard
    assert list(real_mob["MOB1"].var_names) == list(real_mob["MOB3"].var_names)


@pytest.mark.data
def test_mob_real_scale_against_the_grid(real_mob):
    from scipy.spatial import cKDTree

    for s, adata in real_mob.items():
        entry = adata.uns["spatial"][s]
        ppu = entry["metadata"]["pixels_per_um"]
        assert 0.20 < ppu < 0.26  # about 4.4 µm per pixel of the 1905-px JPEG
        xy = adata.obsm["spatial"]
        # nearest spot centres are diagonal neighbours: 141 µm by design (detection noise makes the median shorter)
        d, _ = cKDTree(xy).query(xy, k=2)
        assert np.median(d[:, 1]) / ppu == pytest.approx(141.4, rel=0.03)
        # neighbours of one array row (x +- 2): 200 µm, the pitch of the first ST array
        key = {(c, r): i for i, (c, r) in enumerate(zip(adata.obs["array_col"], adata.obs["array_row"], strict=True))}
        pairs = [(i, key[(c + 2, r)]) for (c, r), i in key.items() if (c + 2, r) in key]
        row_um = np.linalg.norm(xy[[a for a, _ in pairs]] - xy[[b for _, b in pairs]], axis=1) / ppu
        assert np.median(row_um) == pytest.approx(200.0, rel=0.06)
        assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(100.0 * ppu)
        # spot centres inside the image, which is the full resolution (1905 px) and also the hires image
        hires = entry["images"]["hires"]
        assert hires.shape == (1905, 1905, 3) and entry["scalefactors"]["tissue_hires_scalef"] == 1.0
        assert entry["images"]["lowres"].shape == (600, 600, 3)
        assert (xy > 0).all() and (xy < 1905).all()
        src = Path(entry["metadata"]["source_image_path"])
        assert src.is_absolute() and src.name == f"{s}.jpg"
        # tissue under the spots is darker than the slide background (a real overlay, not just inside the frame)
        r, c = xy[:, 1].astype(int), xy[:, 0].astype(int)
        assert hires[r, c].mean() < np.percentile(hires.mean(axis=2), 75)


@pytest.mark.data
def test_mob_real_missing_section_names_the_file(data_dir):
    if not (data_dir / "mob").is_dir():
        pytest.skip("mob not in the data dir")
    with pytest.raises(FileNotFoundError, match=r"MOB section MOB4: file .*mob/MOB4\.tsv not found .*data_dir"):
        hs.datasets.mob("MOB4", data_dir=data_dir)
