"""Readers and converters for high-resolution platforms: Stereo-seq GEM and stereopy files, re-binning, H&E images.

`read` takes every input the command line takes (`.h5ad`, SpatialData `.zarr`, Visium HD / SAW / Visium folders,
GEM files); behind it, spatialdata-io's readers (`visium_hd`, `stereoseq`, `visium`) read the platforms' folders, and
`histospace.io` adds what they do not do. The other functions return or fill a :class:`spatialdata.SpatialData`;
heavy packages are imported when a function runs, so `import histospace` stays fast.
"""

from typing import TYPE_CHECKING

from histospace._lazy import lazy_exports

if TYPE_CHECKING:
    from ._add_image import add_image
    from ._gem import read_gem
    from ._read import read
    from ._rebin import rebin
    from ._stereopy import read_stereopy
    from ._units import microns_per_unit, set_microns_per_unit

__all__ = ["add_image", "microns_per_unit", "read", "read_gem", "read_stereopy", "rebin", "set_microns_per_unit"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "add_image": "._add_image",
        "microns_per_unit": "._units",
        "read": "._read",
        "read_gem": "._gem",
        "read_stereopy": "._stereopy",
        "rebin": "._rebin",
        "set_microns_per_unit": "._units",
    },
)
