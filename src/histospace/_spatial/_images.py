"""The image of a slide: one lookup order for an AnnData, one choice rule for a SpatialData's image elements."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from anndata import AnnData

from histospace._image._open import open_image
from histospace._image._sources import ImageSource
from histospace._spatial._uns import images, metadata, scalefactors, uns_path
from histospace._utils._choice import element_key

#: where the image of a slide is looked for, in this order (documented in `pp.image_features`)
IMAGE_ORDER = (
    "`img=` (an image, or a dict {library_id: image})",
    "`uns['spatial'][library_id]['metadata']['source_image_path']` (full resolution)",
    "`uns['spatial'][library_id]['images']['hires']` with `scalefactors['tissue_hires_scalef']`",
    "`uns['spatial'][library_id]['images']['lowres']` with `scalefactors['tissue_lowres_scalef']`",
)


def library_image(
    adata: AnnData, library_id: str | None, *, img=None, img_scale: float | None = None
) -> ImageSource | None:
    """The image of one slide and its scale from `obsm['spatial']` (full-resolution pixels), or `None` if it has none.

    The lookup order is :data:`IMAGE_ORDER`: `img` (path, array or squidpy `ImageContainer`, scaled by `img_scale`,
    default 1; a dict `{library_id: image}` for several slides), then the full-resolution file named in the slide's
    metadata (a missing file warns and falls back), then the `hires` and `lowres` images of the slide's entry.
    """
    if img is not None:
        if isinstance(img, Mapping):
            if library_id not in img:
                msg = f"`img` is a dict without library {library_id!r} (has {list(img)[:5]}); pass one image per slide."
                raise KeyError(msg)
            img = img[library_id]
        return open_image(img, kind="img", scale=img_scale)
    meta, sf, imgs = metadata(adata, library_id), scalefactors(adata, library_id), images(adata, library_id)
    path = meta.get("source_image_path")
    if isinstance(path, str | os.PathLike) and str(path):
        if Path(path).expanduser().is_file():
            return open_image(path, kind="fullres", scale=1.0)
        warnings.warn(
            f"`{uns_path(library_id, 'metadata', 'source_image_path')}` = {str(path)!r} does not exist; "
            f"falling back to the images in `{uns_path()}`. Pass `img=` to use the full-resolution image.",
            UserWarning,
            stacklevel=3,
        )
    for res in ("hires", "lowres"):
        if imgs.get(res) is not None:
            key = f"tissue_{res}_scalef"
            if key not in sf:
                msg = (
                    f"`{uns_path(library_id, 'scalefactors', key)}` not found; it is needed to map "
                    f"`obsm['spatial']` onto the {res!r} image. Add it or pass the full-resolution image as `img=`."
                )
                raise KeyError(msg)
            return open_image(
                np.asarray(imgs[res]), kind=res, scale=float(sf[key]), name=uns_path(library_id, "images", res)
            )
    return None


def sdata_image_key(sdata, image_key: str | None) -> str:
    """The H&E element of `sdata.images`: `image_key`, checked, or the only image when it is `None`.

    The one choice rule for every function that reads a SpatialData's image (no function takes the first image).
    """
    names = list(sdata.images)
    return element_key(
        sdata.images,
        image_key,
        slot="sdata.images",
        msg=f"The SpatialData holds {len(names)} images {names}; pass `image_key=` naming the H&E.",
        empty_msg="The SpatialData holds no image; add the H&E with `hs.io.add_image(sdata, ...)` or pass `img=`.",
    )
