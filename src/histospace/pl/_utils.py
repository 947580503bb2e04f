"""Helpers shared by the plotting functions."""

from __future__ import annotations

import pandas as pd
from anndata import AnnData
from matplotlib import pyplot as plt

from histospace._spatial._uns import uns_libraries, uns_path
from histospace._utils._data import library_labels

#: longest side of the image level drawn under a SpatialData's spots or bins
PLOT_IMAGE_SIDE = 2000


def finish(obj, show: bool | None):
    """Show the figure (`None`: as `scanpy.settings.autoshow`) and return `None`, or return `obj`."""
    if show is None:
        import scanpy as sc

        show = sc.settings.autoshow
    if not show:
        return obj
    plt.show()
    return None


def plot_library(adata: AnnData, library_id: str | None, library_key: str | None) -> str | None:
    """The slide to draw: `library_id` (checked), else the only slide of `adata` with an entry in the Visium `uns`.

    Several slides with images and no `library_id` is an error; no image at all gives `None` (spots only).
    """
    libs = uns_libraries(adata)
    if library_id is not None:
        if library_id not in libs:
            msg = f"library_id={library_id!r} not in `{uns_path()}` (available: {libs})."
            raise KeyError(msg)
        return library_id
    present = [lib for lib in pd.unique(library_labels(adata, library_key)) if lib in libs]
    candidates = present or libs
    if len(candidates) > 1:
        msg = f"`adata` holds several slides with images {candidates[:10]}; pass `library_id=` to choose one."
        raise ValueError(msg)
    return candidates[0] if candidates else None


def sdata_plot_slide(sdata, *, table_key, image_key, shapes_key=None, coordinate_system=None, img=True):
    """`(table, slide, image)` to draw a SpatialData: the adapter's slide record with its centres in the pixels of an
    image level of about :data:`PLOT_IMAGE_SIDE` pixels, and that level's pixels (`None` without an image).

    The image is `image_key`, or the only image (several: `image_key=` is needed); none when `img` is `False` or the
    SpatialData holds no image.
    """  # noqa: D205
    from histospace._spatial._slide import sdata_slide
    from histospace._utils._sdata import as_table

    table, ctx = as_table(sdata, table_key)
    use_img = img is not False and (image_key is not None or len(sdata.images) > 0)
    slide = sdata_slide(
        ctx,
        image_key=image_key,
        shapes_key=shapes_key,
        coordinate_system=coordinate_system,
        image=use_img,
        max_side=PLOT_IMAGE_SIDE if use_img else None,
    )
    image = None
    if slide.image is not None:
        src = slide.image
        image = src.read(0, src.height, 0, src.width)
    return table, slide, image
