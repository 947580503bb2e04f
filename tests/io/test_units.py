"""`hs.io.set_microns_per_unit` / `hs.io.microns_per_unit`: the attrs convention, inference, errors."""

from __future__ import annotations

import numpy as np
import pytest
from spatialdata import SpatialData

import histospace.io as hsio


def test_set_get_and_errors(gem_path):
    sdata = SpatialData()
    assert hsio.microns_per_unit(sdata, "global") is None
    hsio.set_microns_per_unit(sdata, 0.2737, coordinate_system="hd")
    hsio.set_microns_per_unit(sdata, np.float32(2), coordinate_system="other")
    assert sdata.attrs["histospace"] == {"microns_per_unit": {"hd": 0.2737, "other": 2.0}}
    assert hsio.microns_per_unit(sdata, "hd") == 0.2737 and hsio.microns_per_unit(sdata, "nope") is None
    for bad in (0, -1, np.nan, np.inf):
        with pytest.raises(ValueError, match="positive"):
            hsio.set_microns_per_unit(sdata, bad, coordinate_system="hd")
    with pytest.raises(TypeError, match="number"):
        hsio.set_microns_per_unit(sdata, None, coordinate_system="hd")
    with pytest.raises(TypeError, match="coordinate_system"):
        hsio.set_microns_per_unit(sdata, 1.0, coordinate_system="")
    with pytest.raises(TypeError, match="SpatialData"):
        hsio.microns_per_unit({"attrs": {}}, "global")
    gem = hsio.read_gem(gem_path, bin_size=10)
    with pytest.raises(KeyError, match="nope"):
        hsio.microns_per_unit(gem, "global", table_key="nope")
    # a recorded value wins over inference; a GEM table is not a Visium HD table, so nothing is inferred without it
    gem.attrs.clear()
    assert hsio.microns_per_unit(gem, "global") is None
