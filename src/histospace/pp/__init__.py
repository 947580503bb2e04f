"""Preprocessing: H&E patch features, tiles for H&E-only slides, spatial graphs."""

from ._image_features import image_features
from ._spatial_graph import spatial_graph
from ._tiles import tile_image

__all__ = ["image_features", "spatial_graph", "tile_image"]
