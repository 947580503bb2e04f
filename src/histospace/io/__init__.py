"""Readers and converters for high-resolution platforms: Stereo-seq GEM and stereopy files, re-binning, H&E images.

spatialdata-io's readers (`visium_hd`, `stereoseq`, `visium`) are the documented way in; `histospace.io` adds what
they do not do. Every function returns or fills a :class:`spatialdata.SpatialData`; heavy packages are imported when
a function runs, so `import histospace` stays fast.
"""

from typing import TYPE_CHECKING

from histospace._lazy import lazy_exports

if TYPE_CHECKING:
    from ._add_image import add_image
    from ._gem import read_gem
    from ._rebin import rebin
    from ._stereopy import read_stereopy
    from ._units import microns_per_unit, set_microns_per_unit

__all__ = ["add_image", "microns_per_unit", "read_gem", "read_stereopy", "rebin", "set_microns_per_unit"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "add_image": "._add_image",
        "microns_per_unit": "._units",
        "read_gem": "._gem",
        "read_stereopy": "._stereopy",
        "rebin": "._rebin",
        "set_microns_per_unit": "._units",
    },
)
