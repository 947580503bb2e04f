"""Datasets: real public data and simulated tissue.

Loaders for real public datasets take a local copy first and the public source on a connected machine; the simulated
tissue is written in the platforms' own file formats (Space Ranger, SAW, GEM, whole-slide TIFF).
"""

from typing import TYPE_CHECKING

from histospace._lazy import lazy_exports

if TYPE_CHECKING:
    from ._dlpfc import dlpfc
    from ._her2st import her2st
    from ._synthetic import SimulatedTissue, simulate_tissue, write_gem, write_stereoseq, write_visium_hd, write_wsi

__all__ = [
    "SimulatedTissue",
    "dlpfc",
    "her2st",
    "simulate_tissue",
    "write_gem",
    "write_stereoseq",
    "write_visium_hd",
    "write_wsi",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {"dlpfc": "._dlpfc", "her2st": "._her2st"}
    | {name: "._synthetic" for name in __all__ if name not in ("dlpfc", "her2st")},
)
