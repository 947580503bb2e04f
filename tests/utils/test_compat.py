"""Compatibility with the scverse line for Python >= 3.12 (anndata 0.13, spatialdata 0.8), checked without it."""

from types import SimpleNamespace

import numpy as np
from anndata import AnnData

from histospace._utils._data import named_layers


def test_named_layers_leaves_out_x_under_none():
    # anndata >= 0.13 lists X among the layers under the key None; re-binning and stereopy reading copy the named ones
    x, counts = np.zeros((2, 3)), np.ones((2, 3))
    fake = SimpleNamespace(layers={None: x, "counts": counts})
    out = named_layers(fake)
    assert list(out) == ["counts"]
    assert out["counts"] is counts


def test_named_layers_on_this_anndata():
    a = AnnData(np.zeros((2, 3), dtype=np.float32), layers={"counts": np.ones((2, 3), dtype=np.float32)})
    assert list(named_layers(a)) == ["counts"]
