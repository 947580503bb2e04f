"""H&E patches around spots, cut on the fly from each slide's image (the image is found by the spatial adapter)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from histospace._image import crop_patches, resize_patches
from histospace._spatial._images import IMAGE_ORDER, library_image
from histospace._spatial._uns import library_entry, uns_path
from histospace._utils._validate import check_no_nan

if TYPE_CHECKING:
    import torch

__all__ = ["IMAGE_ORDER", "PatchStream", "library_entry", "library_image"]


class PatchStream:
    """H&E patches around spots, cut on the fly from each slide's image (never all held in memory).

    The image of a slide is found as `pp.image_features` finds it (:func:`histospace._spatial._images.library_image`);
    cropping and resizing are the shared helpers of `histospace._image._sources`.
    """

    def __init__(self, adata: AnnData, libs: np.ndarray, *, img, spatial_key: str, patch_size: float, input_size: int):
        if spatial_key not in adata.obsm:
            msg = f"`adata.obsm[{spatial_key!r}]` not found; image patches need spot centres in full-resolution pixels."
            raise KeyError(msg)
        self.xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
        check_no_nan(self.xy, f"adata.obsm[{spatial_key!r}]")
        self.libs, self.patch_size, self.input_size = libs, float(patch_size), int(input_size)
        self.sources = {}
        for lib in pd.unique(libs):
            src = library_image(adata, lib, img=img)
            if src is None:
                msg = (
                    f"No image for library {lib!r}: pass `img=` or store it in `{uns_path(lib)}` "
                    "(`['metadata']['source_image_path']` or `['images']['hires'|'lowres']`)."
                )
                raise KeyError(msg)
            self.sources[lib] = src.load()

    def __call__(self, idx: np.ndarray) -> torch.Tensor:
        """Patches of the spots `idx` as float `(len(idx), 3, input_size, input_size)` in [0, 1]."""
        import torch

        out = torch.empty((len(idx), 3, self.input_size, self.input_size), dtype=torch.float32)
        for lib in pd.unique(self.libs[idx]):
            sel = np.flatnonzero(self.libs[idx] == lib)
            src = self.sources[lib]
            size = self.patch_size * src.scale
            exact = size < self.input_size
            c = src.to_pixels(self.xy[idx[sel]])
            crops = torch.from_numpy(crop_patches(src, c, size, self.input_size, exact=exact))
            out[sel] = resize_patches(crops, self.input_size, centres=c, size=size, exact=exact).contiguous()
        return out
