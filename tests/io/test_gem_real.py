"""`hs.io.read_gem` on a real GEM file: a bin1 window of the Stereopy mouse-brain demo chip (old header
`geneID x y MIDCounts`), checked against an independent pandas group-by at bin 1, 20 and 50."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import histospace as hs

GEM_NAME = "SS200000135TL_D1_bin1_small.gem.gz"


@pytest.fixture(scope="module")
def real_gem(data_dir):
    path = data_dir / "stereoseq" / GEM_NAME
    if not path.is_file():
        pytest.skip(f"{path} not in the data dir")
    lines = pd.read_csv(path, sep="\t", dtype={"geneID": str, "x": np.int64, "y": np.int64, "MIDCounts": np.int64})
    return path, lines


@pytest.mark.data
def test_real_gem_file_is_the_documented_window(real_gem):
    _, lines = real_gem
    assert list(lines.columns) == ["geneID", "x", "y", "MIDCounts"]  # the old header
    assert len(lines) == 77_634  # data lines (SOURCE.md: 77,634 lines)
    assert lines["geneID"].nunique() == 10_631
    assert lines["MIDCounts"].sum() == 131_002
    assert (lines["x"].min(), lines["x"].max(), lines["y"].min(), lines["y"].max()) == (9600, 9898, 12600, 12899)


@pytest.mark.data
@pytest.mark.parametrize("bin_size", [1, 20, 50])
def test_real_gem_counts_equal_pandas_groupby(real_gem, bin_size):
    path, lines = real_gem
    sdata = hs.io.read_gem(path, bin_size=bin_size)
    table = sdata.tables[f"bin{bin_size}"]

    # independent truth: sum MIDCounts per (x // b, y // b, gene) with pandas
    g = lines.assign(i=lines["x"] // bin_size, j=lines["y"] // bin_size)
    truth = g.groupby(["i", "j", "geneID"], sort=False)["MIDCounts"].sum()
    bins = truth.index.droplevel("geneID").unique()
    genes = sorted(lines["geneID"].unique())
    assert table.n_obs == len(bins)
    assert sorted(table.var_names) == genes
    expected_n_bins = {20: 225, 50: 36}  # SOURCE.md: a 300 x 300 DNB window aligned to 20 and 50
    if bin_size in expected_n_bins:
        assert table.n_obs == expected_n_bins[bin_size]

    # every bin, in the reader's order: the same (column, row) set, centres and stereopy's names
    ij = np.column_stack([table.obs["array_col"].to_numpy(), table.obs["array_row"].to_numpy()]).astype(np.int64)
    assert set(map(tuple, ij)) == set(map(tuple, bins.to_frame().to_numpy()))
    np.testing.assert_allclose(table.obsm["spatial"], (ij + 0.5) * bin_size)
    names = [str((int(i) * bin_size) << 32 | (int(j) * bin_size)) for i, j in ij]
    assert list(table.obs_names) == names

    # every (bin, gene) count exactly, and nothing else
    x = table.X.tocoo()
    got = pd.Series(
        x.data.astype(np.int64),
        index=pd.MultiIndex.from_arrays([ij[x.row, 0], ij[x.row, 1], table.var_names[x.col]]),
    )
    got = got[got != 0].sort_index()
    truth = truth[truth != 0]
    truth.index = truth.index.set_names([None, None, None])
    truth = truth.sort_index()
    assert len(got) == len(truth)
    np.testing.assert_array_equal(got.index.to_frame().to_numpy(), truth.index.to_frame().to_numpy())
    np.testing.assert_array_equal(got.to_numpy(), truth.to_numpy())
    assert table.X.sum() == 131_002
    assert table.uns["gem"]["bin_size"] == bin_size
