"""The image of a slide: one lookup order for every function that reads H&E pixels around spots."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from histospace._constants import SPATIAL_UNS_KEY
from histospace._image import ImageSource, crop_patches, open_image, resize_patches
from histospace._utils._validate import check_no_nan

if TYPE_CHECKING:
    import torch

#: where the image of a slide is looked for, in this order (documented in `pp.image_features`)
IMAGE_ORDER = (
    "`img=` (an image, or a dict {library_id: image})",
    "`uns['spatial'][library_id]['metadata']['source_image_path']` (full resolution)",
    "`uns['spatial'][library_id]['images']['hires']` with `scalefactors['tissue_hires_scalef']`",
    "`uns['spatial'][library_id]['images']['lowres']` with `scalefactors['tissue_lowres_scalef']`",
)


def library_entry(adata: AnnData, library_id: str | None) -> Mapping:
    """`adata.uns['spatial'][library_id]` (an empty dict when absent)."""
    spatial = adata.uns.get(SPATIAL_UNS_KEY)
    if library_id is None or not isinstance(spatial, Mapping):
        return {}
    entry = spatial.get(library_id)
    return entry if isinstance(entry, Mapping) else {}


def library_image(
    adata: AnnData, library_id: str | None, *, img=None, img_scale: float | None = None
) -> ImageSource | None:
    """The image of one slide and its scale from `obsm['spatial']` (full-resolution pixels), or `None` if it has none.

    The lookup order is :data:`IMAGE_ORDER`: `img` (path, array or squidpy `ImageContainer`, scaled by `img_scale`,
    default 1; a dict `{library_id: image}` for several slides), then the full-resolution file named in the slide's
    metadata (a missing file warns and falls back), then the `hires` and `lowres` images of `uns['spatial']`.
    """
    if img is not None:
        if isinstance(img, Mapping):
            if library_id not in img:
                msg = f"`img` is a dict without library {library_id!r} (has {list(img)[:5]}); pass one image per slide."
                raise KeyError(msg)
            img = img[library_id]
        return open_image(img, kind="img", scale=img_scale)
    entry = library_entry(adata, library_id)
    meta = entry.get("metadata", {}) or {}
    sf = entry.get("scalefactors", {}) or {}
    path = meta.get("source_image_path")
    if isinstance(path, str | os.PathLike) and str(path):
        if Path(path).expanduser().is_file():
            return open_image(path, kind="fullres", scale=1.0)
        warnings.warn(
            f"`adata.uns['spatial'][{library_id!r}]['metadata']['source_image_path']` = {str(path)!r} does not exist; "
            "falling back to the images in `adata.uns['spatial']`. Pass `img=` to use the full-resolution image.",
            UserWarning,
            stacklevel=3,
        )
    images = entry.get("images", {}) or {}
    for res in ("hires", "lowres"):
        if images.get(res) is not None:
            key = f"tissue_{res}_scalef"
            if key not in sf:
                msg = (
                    f"`adata.uns['spatial'][{library_id!r}]['scalefactors'][{key!r}]` not found; it is needed to map "
                    f"`obsm['spatial']` onto the {res!r} image. Add it or pass the full-resolution image as `img=`."
                )
                raise KeyError(msg)
            return open_image(
                np.asarray(images[res]),
                kind=res,
                scale=float(sf[key]),
                name=f"adata.uns['spatial'][{library_id!r}]['images'][{res!r}]",
            )
    return None


class PatchStream:
    """H&E patches around spots, cut on the fly from each slide's image (never all held in memory).

    The image of a slide is found as `pp.image_features` finds it (:func:`histospace._utils._library.library_image`);
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
                    f"No image for library {lib!r}: pass `img=` or store it in `adata.uns['spatial'][{lib!r}]` "
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
