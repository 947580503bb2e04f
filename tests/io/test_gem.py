"""`hs.io.read_gem`: exact bin counts on hand-made GEM files, format variants, chunking invariance, errors, zarr."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import histospace.io as hsio

# geneID, x, y, MIDCount, ExonCount; bin_size 10 -> bins (col, row) = (x // 10, y // 10)
RECORDS = [
    ("Gb", 0, 0, 1, 1),
    ("Ga", 3, 9, 2, 1),
    ("Gb", 9, 9, 4, 4),  # bin (0, 0): Ga 2, Gb 5
    ("Ga", 10, 0, 1, 0),  # bin (1, 0): Ga 1
    ("Gc", 25, 31, 3, 2),
    ("Gc", 29, 30, 1, 1),
    ("Ga", 21, 39, 1, 1),  # bin (2, 3): Ga 1, Gc 4
    ("Gb", 5, 12, 7, 3),  # bin (0, 1): Gb 7
    ("Gb", 5, 12, 1, 0),  # the same DNB and gene twice: summed
]
EXPECTED = {  # (col, row) -> {gene: count}
    (0, 0): {"Ga": 2, "Gb": 5},
    (1, 0): {"Ga": 1},
    (0, 1): {"Gb": 8},
    (2, 3): {"Ga": 1, "Gc": 4},
}
EXPECTED_EXON = {(0, 0): {"Ga": 1, "Gb": 5}, (1, 0): {}, (0, 1): {"Gb": 3}, (2, 3): {"Ga": 1, "Gc": 3}}


def write_gem(
    path: Path,
    records=RECORDS,
    *,
    header=("#FileFormat=GEMv0.1", "#SortedBy=None", "#BinSize=1", "#OffsetX=0", "#OffsetY=0"),
    columns=("geneID", "x", "y", "MIDCount", "ExonCount"),
    sep="\t",
    gz=False,
) -> Path:
    lines = list(header) + [sep.join(columns)]
    for r in records:
        lines.append(sep.join(str(v) for v in r[: len(columns)]))
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def as_dict(table, layer=None) -> dict:
    X = table.X if layer is None else table.layers[layer]
    dense = X.toarray()
    out = {}
    for i, (c, r) in enumerate(zip(table.obs["array_col"], table.obs["array_row"], strict=True)):
        out[(int(c), int(r))] = {g: int(v) for g, v in zip(table.var_names, dense[i], strict=True) if v}
    return out


def test_fixture_is_the_records(gem_path, tmp_path):
    assert (
        gem_path.read_text().splitlines()
        == write_gem(tmp_path / "b.gem", header=("#FileFormat=GEMv0.1", "#OffsetX=0", "#OffsetY=0"))
        .read_text()
        .splitlines()
    )


def test_exact_counts_and_layout(tmp_path):
    sdata = hsio.read_gem(write_gem(tmp_path / "SN1.gem"), bin_size=10)
    assert list(sdata.tables) == ["bin10"] and list(sdata.shapes) == ["SN1_bin10"]
    t = sdata.tables["bin10"]
    assert as_dict(t) == EXPECTED
    assert list(t.var_names) == ["Ga", "Gb", "Gc"]
    assert t.X.format == "csr" and t.X.dtype == np.float32 and t.X.has_sorted_indices
    assert t.obs["array_col"].dtype == np.int32 and t.obs["array_row"].dtype == np.int32
    # rows ordered by (row, col); names are stereopy's (corner_x << 32 | corner_y)
    assert list(zip(t.obs["array_row"], t.obs["array_col"], strict=True)) == [(0, 0), (0, 1), (1, 0), (3, 2)]
    assert list(t.obs_names) == [str((10 * c << 32) | (10 * r)) for r, c in [(0, 0), (0, 1), (1, 0), (3, 2)]]
    np.testing.assert_array_equal(t.obsm["spatial"], [[5, 5], [15, 5], [5, 15], [25, 35]])
    # the table annotates the squares, one per bin, side = bin_size DNB
    attrs = t.uns["spatialdata_attrs"]
    assert attrs["region"] == "SN1_bin10" and attrs["instance_key"] == "instance_id"
    np.testing.assert_array_equal(t.obs["instance_id"], np.arange(4))
    shapes = sdata.shapes["SN1_bin10"]
    np.testing.assert_array_equal(shapes.index, np.arange(4))
    np.testing.assert_allclose(shapes.geometry.bounds.to_numpy()[3], [20, 30, 30, 40])
    assert np.allclose(shapes.geometry.area, 100)
    assert hsio.microns_per_unit(sdata, "global") == 0.5
    assert t.uns["gem"]["n_lines"] == len(RECORDS) and t.uns["gem"]["header"]["FileFormat"] == "GEMv0.1"
    assert t.uns["gem"]["count_column"] == "MIDCount"


def test_exon_layer(tmp_path):
    t = hsio.read_gem(write_gem(tmp_path / "a.gem"), bin_size=10, exon=True).tables["bin10"]
    assert as_dict(t) == EXPECTED
    assert as_dict(t, "exon") == EXPECTED_EXON


def test_gzip_and_chunking_invariance(tmp_path):
    ref = hsio.read_gem(write_gem(tmp_path / "a.gem"), bin_size=10).tables["bin10"]
    gz = hsio.read_gem(write_gem(tmp_path / "b.gem.gz", gz=True), bin_size=10).tables["bin10"]
    for chunksize in (1, 2, 3):
        t = hsio.read_gem(tmp_path / "a.gem", bin_size=10, chunksize=chunksize, exon=True).tables["bin10"]
        for other in (t, gz):
            assert (other.X != ref.X).nnz == 0
            pd.testing.assert_frame_equal(other.obs.drop(columns="region"), ref.obs.drop(columns="region"))
            assert list(other.var_names) == list(ref.var_names)


def test_chunking_invariance_random_file(tmp_path):
    rng = np.random.default_rng(0)
    n = 800
    recs = list(
        zip(
            rng.choice([f"g{i}" for i in range(40)], n),
            rng.integers(0, 300, n),
            rng.integers(0, 200, n),
            rng.integers(1, 5, n),
            strict=True,
        )
    )
    path = write_gem(tmp_path / "r.gem", recs, columns=("geneID", "x", "y", "MIDCount"), header=())
    ref = hsio.read_gem(path, bin_size=7, chunksize=10**6).tables["bin7"]
    t = hsio.read_gem(path, bin_size=7, chunksize=3).tables["bin7"]
    assert (t.X != ref.X).nnz == 0 and t.X.has_sorted_indices
    np.testing.assert_array_equal(t.obsm["spatial"], ref.obsm["spatial"])
    # against a plain groupby of the records
    df = pd.DataFrame(recs, columns=["g", "x", "y", "c"])
    df["bx"], df["by"] = df.x // 7, df.y // 7
    expect = df.groupby(["by", "bx", "g"])["c"].sum()
    got = as_dict(t)
    assert sum(len(v) for v in got.values()) == len(expect) == t.X.nnz
    for (by, bx, g), c in expect.items():
        assert got[(bx, by)][g] == c
    assert t.X.sum() == df.c.sum()


@pytest.mark.parametrize("count_name", ["MIDCounts", "UMICount", "MIDcount"])
def test_count_column_variants(tmp_path, count_name):
    path = write_gem(tmp_path / "a.gem", columns=("geneID", "x", "y", count_name), header=())
    t = hsio.read_gem(path, bin_size=10).tables["bin10"]
    assert as_dict(t) == EXPECTED
    assert t.uns["gem"]["count_column"] == count_name


def test_gene_name_column(tmp_path):
    recs = [(f"ENS{g}", x, y, c, f"Sym{g}") for g, x, y, c, _ in RECORDS]
    recs = [(gid, x, y, c, name) for gid, x, y, c, name in recs]
    cols = ("geneID", "x", "y", "MIDCount", "geneName")
    path = write_gem(tmp_path / "v2.gem", recs, columns=cols, header=("#FileFormat=GEMv0.2",))
    t = hsio.read_gem(path, bin_size=10).tables["bin10"]
    assert list(t.var_names) == ["ENSGa", "ENSGb", "ENSGc"]
    assert list(t.var["gene_name"]) == ["SymGa", "SymGb", "SymGc"]
    t2 = hsio.read_gem(path, bin_size=10, gene_column="geneName").tables["bin10"]
    assert list(t2.var_names) == ["SymGa", "SymGb", "SymGc"] and "gene_name" not in t2.var
    assert (t2.X != t.X).nnz == 0


def test_other_separator_and_chip_resolution(tmp_path):
    path = write_gem(tmp_path / "c.csv", sep=",", header=("#Stereo-seqChip=DP8400013846TR_F5",))
    sdata = hsio.read_gem(path, bin_size=10, sep=",", dataset_id="my chip", coordinate_system="dnb")
    assert as_dict(sdata.tables["bin10"]) == EXPECTED
    assert "my_chip_bin10" in sdata.shapes
    assert hsio.microns_per_unit(sdata, "dnb") == pytest.approx(0.715)  # DP84 chips: 715 nm (stereopy)
    sdata = hsio.read_gem(path, bin_size=10, sep=",", microns_per_dnb=0.5)
    assert hsio.microns_per_unit(sdata, "global") == 0.5


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        hsio.read_gem(tmp_path / "missing.gem")
    empty = tmp_path / "empty.gem"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        hsio.read_gem(empty)
    only_header = write_gem(tmp_path / "h.gem", [])
    with pytest.raises(ValueError, match="no records"):
        hsio.read_gem(only_header)
    only_comments = tmp_path / "c.gem"
    only_comments.write_text("#FileFormat=GEMv0.1\n")
    with pytest.raises(ValueError, match="no column header"):
        hsio.read_gem(only_comments)
    comma = write_gem(tmp_path / "comma.gem", sep=",")
    with pytest.raises(ValueError, match=r"sep=','"):
        hsio.read_gem(comma)
    no_count = write_gem(tmp_path / "nc.gem", columns=("geneID", "x", "y"))
    with pytest.raises(KeyError, match="no count column.*nc.gem|nc.gem.*no count column"):
        hsio.read_gem(no_count)
    no_y = write_gem(tmp_path / "ny.gem", [(g, x, c) for g, x, _, c, _ in RECORDS], columns=("geneID", "x", "MIDCount"))
    with pytest.raises(KeyError, match="'y'"):
        hsio.read_gem(no_y)
    with pytest.raises(KeyError, match="nope"):
        hsio.read_gem(write_gem(tmp_path / "a.gem"), gene_column="nope")
    with pytest.raises(KeyError, match="ExonCount"):
        hsio.read_gem(write_gem(tmp_path / "ne.gem", columns=("geneID", "x", "y", "MIDCount")), exon=True)
    frac = write_gem(tmp_path / "f.gem", [("Ga", 1.5, 2, 1, 1)] + RECORDS)
    with pytest.raises(ValueError, match="non-integer coordinates"):
        hsio.read_gem(frac)
    neg = write_gem(tmp_path / "n.gem", RECORDS + [("Ga", -1, 2, 1, 1)])
    with pytest.raises(ValueError, match="negative"):
        hsio.read_gem(neg)
    ragged = tmp_path / "r.gem"
    ragged.write_text("geneID\tx\ty\tMIDCount\nGa\t1\t2\t1\nGa\t1\t2\t1\t5\t6\n")
    with pytest.raises(ValueError, match="r.gem"):
        hsio.read_gem(ragged)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="bin_size"):
            hsio.read_gem(write_gem(tmp_path / "a.gem"), bin_size=bad)
    with pytest.raises(ValueError, match="chunksize"):
        hsio.read_gem(tmp_path / "a.gem", chunksize=0)


def test_zarr_round_trip(tmp_path):
    from spatialdata import read_zarr

    sdata = hsio.read_gem(write_gem(tmp_path / "a.gem"), bin_size=10, exon=True)
    sdata.write(tmp_path / "a.zarr")
    back = read_zarr(tmp_path / "a.zarr")
    t, t0 = back.tables["bin10"], sdata.tables["bin10"]
    assert (t.X != t0.X).nnz == 0 and (t.layers["exon"] != t0.layers["exon"]).nnz == 0
    pd.testing.assert_frame_equal(t.obs, t0.obs)
    np.testing.assert_array_equal(t.obsm["spatial"], t0.obsm["spatial"])
    assert t.uns["gem"]["bin_size"] == 10
    assert back.shapes["a_bin10"].geometry.geom_equals(sdata.shapes["a_bin10"].geometry).all()
    assert hsio.microns_per_unit(back, "global") == 0.5
    assert back.attrs["histospace"] == {"microns_per_unit": {"global": 0.5}}


def _gz_records(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"G{rng.integers(40)}", int(rng.integers(500)), int(rng.integers(500)), int(rng.integers(1, 5)), 0)
            for _ in range(n)]  # fmt: skip


@pytest.mark.parametrize("where", ["header", "middle", "end"])
def test_truncated_gzip_names_the_file(tmp_path, where):
    """A .gem.gz cut short raises ValueError naming the file and saying it is truncated (not a bare EOFError)."""
    whole = write_gem(tmp_path / "whole.gem.gz", _gz_records(), gz=True).read_bytes()
    cut = {"header": 40, "middle": len(whole) // 2, "end": len(whole) - 8}[where]
    path = tmp_path / "cut.gem.gz"
    path.write_bytes(whole[:cut])
    with pytest.raises(ValueError, match=r"GEM file '.*cut\.gem\.gz' is truncated or damaged.*gzip -t.*copy or down"):
        hsio.read_gem(path, bin_size=10, chunksize=500)


def test_corrupt_gzip_names_the_file(tmp_path):
    whole = bytearray(write_gem(tmp_path / "whole.gem.gz", _gz_records(), gz=True).read_bytes())
    whole[len(whole) // 2 : len(whole) // 2 + 64] = bytes(64)  # zeros in the middle of the deflate stream
    path = tmp_path / "bad.gem.gz"
    path.write_bytes(bytes(whole))
    with pytest.raises(ValueError, match=r"GEM file '.*bad\.gem\.gz' is truncated or damaged"):
        hsio.read_gem(path, bin_size=10, chunksize=500)


@pytest.mark.parametrize("bad", [0, -0.5, np.nan, np.inf])
def test_microns_per_dnb_checked_by_name_before_reading(tmp_path, bad):
    """`microns_per_dnb` is named in the error and checked before the file is read: a file that cannot be read
    (cut short in its header) still gives the argument's error, not the file's."""
    whole = write_gem(tmp_path / "whole.gem.gz", _gz_records(), gz=True).read_bytes()
    path = tmp_path / "cut.gem.gz"
    path.write_bytes(whole[:40])
    with pytest.raises(ValueError, match=r"`microns_per_dnb` must be a positive number"):
        hsio.read_gem(path, bin_size=10, microns_per_dnb=bad)
    with pytest.raises(TypeError, match=r"`microns_per_dnb` must be"):
        hsio.read_gem(path, bin_size=10, microns_per_dnb="0.5")
    sdata = hsio.read_gem(write_gem(tmp_path / "a.gem"), bin_size=10, microns_per_dnb=0.715)
    assert hsio.microns_per_unit(sdata, "global") == pytest.approx(0.715)
