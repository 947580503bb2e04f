"""Multiscale images read lazily: whole-slide files, OME-TIFF / pyramidal TIFF and SpatialData image elements.

Every image histospace reads can be seen as a :class:`MultiscaleImage`: a list of levels, each an
:class:`~histospace._utils._image.ImageSource` read region by region (RGB `uint8`, white outside the image), with the
level's downsample from level 0 and, when known, the µm per pixel. A single-level image is a `MultiscaleImage` with
one level.

Readers (:func:`open_slide`), none of which decodes a whole level:

- `openslide` (`openslide-python` + the `openslide-bin` wheel): Aperio `.svs`, Hamamatsu `.ndpi`/`.vms`/`.vmu`,
  MIRAX `.mrxs`, Leica `.scn`, Ventana `.bif`, Sakura `.svslide`, DICOM, generic tiled TIFF. Each read is one
  `read_region` at the level; OpenSlide's RGBA output (transparent outside the scanned area) is composited onto the
  slide's background colour (white unless the slide says otherwise). `read_region` places regions in level-0
  pixels, so at a level whose downsample is not an integer (level sizes that do not divide the full size) OpenSlide
  resamples the region at a sub-pixel offset (under half a level pixel); tiffslide and tifffile return the stored
  pixels exactly.
- `tiffslide`: the TIFF-based formats above through tifffile, with the OpenSlide API; used where openslide is not
  installed.
- `tifffile` (+ zarr): OME-TIFF (SubIFD pyramids), pyramidal and plain TIFF, and the vendor TIFFs tifffile parses
  (SVS, NDPI, SCN, BIF); levels are zarr views of the tiles (`aszarr=True`), or a memory map when the pixels are
  stored contiguously.

Each level reader reopens its file in a new process, so sources can be sent to DataLoader workers or dask workers.

µm per pixel comes from the file's metadata (`openslide.mpp-x/y`, `aperio.MPP`, OME `PhysicalSizeX/Y` with their
units, tiffslide's `tiffslide.mpp-x/y`, TIFF `XResolution`/`ResolutionUnit`), or from `mpp=` given by the user (which
wins, with a warning when it disagrees with the metadata), else it is `None`. Resolution tags in inches at 1200 dpi
or less are screen/print defaults written by image software, not a microscope's pixel size, and are ignored.

This module gathers the names of `_multiscale` (the image and its level choice), `_wsi_levels` (level readers),
`_wsi_read` (the file readers), `_wsi_mpp` (µm per pixel from metadata) and `_wsi_sdata` (SpatialData elements and
their transformations).
"""

from histospace._utils._multiscale import MultiscaleImage, level_zero
from histospace._utils._wsi_levels import _DaskLevel as _DaskLevel  # re-exported for `_image.py`
from histospace._utils._wsi_read import is_slide_path, open_slide
from histospace._utils._wsi_sdata import _xy_matrix as _xy_matrix  # re-exported for `_sdata.py`
from histospace._utils._wsi_sdata import (
    coordinate_system_to_pixels,
    element_to_pixels,
    is_xarray_image,
    open_multiscale,
    transform_xy,
)

__all__ = [
    "MultiscaleImage",
    "coordinate_system_to_pixels",
    "element_to_pixels",
    "is_slide_path",
    "is_xarray_image",
    "level_zero",
    "open_multiscale",
    "open_slide",
    "transform_xy",
]
