"""Helpers shared by the plotting functions."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
from anndata import AnnData
from matplotlib import pyplot as plt

from histospace._utils._data import library_labels


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
    """The slide to draw: `library_id` (checked), else the only slide of `adata` with an entry in `uns['spatial']`.

    Several slides with images and no `library_id` is an error; no image at all gives `None` (spots only).
    """
    spatial = adata.uns.get("spatial")
    libs = [str(k) for k in spatial] if isinstance(spatial, Mapping) else []
    if library_id is not None:
        if library_id not in libs:
            msg = f"library_id={library_id!r} not in `adata.uns['spatial']` (available: {libs})."
            raise KeyError(msg)
        return library_id
    present = [lib for lib in pd.unique(library_labels(adata, library_key)) if lib in libs]
    candidates = present or libs
    if len(candidates) > 1:
        msg = f"`adata` holds several slides with images {candidates[:10]}; pass `library_id=` to choose one."
        raise ValueError(msg)
    return candidates[0] if candidates else None
