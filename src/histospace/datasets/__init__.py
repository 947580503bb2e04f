"""Datasets: real public data and simulated tissue.

Loaders for real public datasets take a local copy first and the public source on a connected machine; the simulated
tissue is written in the platforms' own file formats (Space Ranger, SAW, GEM, whole-slide TIFF). `her2st_genes` and
`mobilenet_v2_weights` find the gene panel and the encoder weights that go with them in the data folder.
"""

from typing import TYPE_CHECKING

from histospace._lazy import lazy_exports

if TYPE_CHECKING:
    from ._dlpfc import dlpfc
    from ._her2st import her2st
    from ._mob import mob
    from ._resources import her2st_genes, mobilenet_v2_weights
    from ._stereoseq_embryo import stereoseq_embryo
    from ._synthetic import SimulatedTissue, simulate_tissue
    from ._synthetic_gem import write_gem
    from ._synthetic_pyramid import write_wsi
    from ._synthetic_stereoseq import write_stereoseq
    from ._synthetic_visium_hd import write_visium_hd

__all__ = [
    "SimulatedTissue",
    "dlpfc",
    "her2st",
    "her2st_genes",
    "mob",
    "mobilenet_v2_weights",
    "simulate_tissue",
    "stereoseq_embryo",
    "write_gem",
    "write_stereoseq",
    "write_visium_hd",
    "write_wsi",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "dlpfc": "._dlpfc",
        "her2st": "._her2st",
        "her2st_genes": "._resources",
        "mobilenet_v2_weights": "._resources",
        "stereoseq_embryo": "._stereoseq_embryo",
        "mob": "._mob",
        "SimulatedTissue": "._synthetic",
        "simulate_tissue": "._synthetic",
        "write_gem": "._synthetic_gem",
        "write_stereoseq": "._synthetic_stereoseq",
        "write_visium_hd": "._synthetic_visium_hd",
        "write_wsi": "._synthetic_pyramid",
    },
)
