"""Preprocessing: H&E patch features, tiles for H&E-only slides, spatial graphs."""

from typing import TYPE_CHECKING

from histospace._lazy import lazy_exports

if TYPE_CHECKING:
    from histospace._image.features._cache import clear_feature_cache, feature_cache_dir

    from ._image_features import image_features
    from ._spatial_graph import spatial_graph
    from ._tiles import tile_image

__all__ = ["clear_feature_cache", "feature_cache_dir", "image_features", "spatial_graph", "tile_image"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "clear_feature_cache": "histospace._image.features._cache",
        "feature_cache_dir": "histospace._image.features._cache",
        "image_features": "._image_features",
        "spatial_graph": "._spatial_graph",
        "tile_image": "._tiles",
    },
)
