"""The image wing: pixels, pyramids and slide readers, the one µm-per-pixel rule, encoders and feature engines.

Private to histospace; these names are its documented internals (tests and benchmarks import them from here). Layout
(see `docs/image_wing.md`), each module importing only those above it, so the wing has no import circle:

- pixels and pyramids: :mod:`._sources` (an :class:`ImageSource` read region by region as RGB `uint8`, white outside;
  patch crop and resize), :mod:`._levels` (level readers over OpenSlide, tiffslide, tifffile/zarr, dask),
  :mod:`._multiscale` (:class:`MultiscaleImage`, the level that fits a patch);
- slide readers: :mod:`._mpp` (**the one µm-per-pixel rule** from file metadata: OME `PhysicalSizeX/Y`, Aperio
  `MPP`, TIFF resolution tags, inch resolutions of 1200 dpi or less ignored), :mod:`._tiff` (header and damage
  checks), :mod:`._readers` (:func:`open_slide`), :mod:`._sdata` (SpatialData elements and their transformations),
  :mod:`._open` (:func:`open_image`, :func:`open_multiscale`: anything histospace reads);
- :mod:`.encoders`: torchvision CNNs (:mod:`~.encoders._torchvision`), pathology ViTs (:mod:`~.encoders._registry`,
  :mod:`~.encoders._weights`, :mod:`~.encoders._pathology`) and :func:`build_encoder` (:mod:`~.encoders._build`);
- :mod:`.features`: the patch engine (:mod:`~.features._patch`) and the dense engine (:mod:`~.features._dense` and
  its `_dense_*` steps) side by side, run by :func:`compute_features` (:mod:`~.features._compute`) with the feature
  cache (:mod:`~.features._cache`); the feature slot (:mod:`~.features._slot`: write, read and compare
  `obsm[key]` + `uns[key]['params']`); the recipes of `preset=` (:mod:`~.features._recipes`).

Names load lazily (PEP 562), so importing the wing does not import torch.
"""

from histospace._lazy import lazy_exports

_EXPORTS = {
    # pixels, pyramids, readers
    "PADDING": "._sources",
    "ImageSource": "._sources",
    "crop_patches": "._sources",
    "read_order": "._sources",
    "resize_patches": "._sources",
    "MultiscaleImage": "._multiscale",
    "level_zero": "._multiscale",
    "is_slide_path": "._readers",
    "open_slide": "._readers",
    "TruncatedTiffError": "._tiff",
    "read_tiff_header": "._tiff",
    "coordinate_system_to_pixels": "._sdata",
    "element_to_pixels": "._sdata",
    "is_xarray_image": "._sdata",
    "transform_xy": "._sdata",
    "open_image": "._open",
    "open_multiscale": "._open",
    # encoders
    "build_encoder": ".encoders._build",
    "ENCODERS": ".encoders._torchvision",
    "STAGES": ".encoders._torchvision",
    "ImageEncoder": ".encoders._torchvision",
    "check_encoder_options": ".encoders._torchvision",
    "fuse_conv_bn": ".encoders._torchvision",
    "trained_with_tf_padding": ".encoders._torchvision",
    "PATHOLOGY_ENCODERS": ".encoders._pathology",
    "build_pathology_encoder": ".encoders._pathology",
    "get_pathology_model": ".encoders._pathology",
    "is_pathology_encoder": ".encoders._pathology",
    # feature engines, cache, slot, recipes
    "compute_features": ".features._compute",
    "dihedral_mean": ".features._patch",
    "patch_library": ".features._patch",
    "choose_method": ".features._dense",
    "dense_features": ".features._dense",
    "clear_feature_cache": ".features._cache",
    "feature_cache_dir": ".features._cache",
    "feature_params": ".features._slot",
    "feature_pca": ".features._slot",
    "feature_settings": ".features._slot",
    "read_features": ".features._slot",
    "settings_mismatch": ".features._slot",
    "write_features": ".features._slot",
    "MCLSTEXP_FEATURES": ".features._recipes",
    "PRESETS": ".features._recipes",
    "mclstexp_features": ".features._recipes",
    "preset_options": ".features._recipes",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
