"""Platform recognition: Visium, Visium HD, Stereo-seq, H&E tiles and legacy ST, in one place.

The technology of a slide is read from `uns['spatial'][library_id]['metadata']` (`'technology'`, or scanpy's
Visium `'chemistry_description'`, or a known spot diameter); the names Space Ranger and the bin readers give to
tables and barcodes tell Visium HD and Stereo-seq bins apart. Spot sizes and grid neighbours of each spot technology
live here too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from numbers import Real

import numpy as np

#: technologies (`metadata['technology']`, lower case) whose spots are square bins
BIN_TECHNOLOGIES = frozenset({"visium_hd", "visium hd", "visiumhd", "stereo-seq", "stereoseq", "stereo_seq", "bins"})
#: technology written by `pp.tile_image` (H&E tiles without expression)
HE_TILES = "he_tiles"
#: spot diameter (µm) per spot technology (centre-to-centre: Visium 100 µm, legacy ST 200 µm)
SPOT_DIAMETER_UM = {"visium": 55.0, "st": 100.0}
#: first-ring grid neighbours per spot technology
GRID_NEIGHS = {"visium": 6, "st": 4}
#: spot diameter assumed when nothing says otherwise (Visium)
DEFAULT_SPOT_DIAMETER_UM = 55.0

#: Visium HD tables of spatialdata-io: `square_008um` (bin side in µm)
VISIUM_HD_TABLE = re.compile(r"^square_(\d{3})um$")
#: Space Ranger's Visium HD bin barcodes, `s_008um_00012_00345-1`: bin side in µm (3 digits), row and column (5 digits,
#: zero-padded), then the end or a suffix after `-` (Space Ranger's GEM well `-1`, or a slide suffix added when tables
#: are concatenated)
VISIUM_HD_BARCODE = re.compile(r"^s_(\d{3})um_(\d{5})_(\d{5})(?:-|$)")
#: Stereo-seq bin tables of `hs.io.read_gem` / `hs.io.rebin`: `bin50`
GEM_TABLE = re.compile(r"^bin(\d+)$")


def visium_hd_bin_um(table_key: str) -> float | None:
    """The bin side in µm of a spatialdata-io Visium HD table name (`'square_008um'` -> 8.0), else `None`."""
    m = VISIUM_HD_TABLE.match(table_key)
    return float(m.group(1)) if m else None


def is_visium_hd_barcode(name) -> bool:
    """Whether `name` is a Space Ranger Visium HD bin barcode (`s_008um_00012_00345-1`)."""
    return VISIUM_HD_BARCODE.match(str(name)) is not None


def technology(meta: Mapping) -> str | None:
    """Technology of a slide from its metadata (`'visium'`, `'st'`, another string, or `None` when unknown).

    `meta['technology']` (lower case) when set; scanpy/squidpy's Visium readers leave `'chemistry_description'`;
    else a spot diameter (`meta['spot_diameter_um']`) of a known spot technology.
    """
    tech = meta.get("technology")
    if isinstance(tech, str) and tech:
        return tech.lower()
    if "chemistry_description" in meta:  # written by scanpy.read_visium / squidpy.read.visium
        return "visium"
    um = meta.get("spot_diameter_um")
    if isinstance(um, Real) and not isinstance(um, bool):
        for name, d in SPOT_DIAMETER_UM.items():
            if np.isclose(float(um), d):
                return name
    return None


def is_bin_technology(tech: str | None) -> bool:
    """Whether technology `tech` (as :func:`technology` returns it) has square bins."""
    return tech is not None and tech.lower() in BIN_TECHNOLOGIES
