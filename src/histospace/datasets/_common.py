"""Pieces shared by the dataset loaders: the `uns['spatial']` entry of one slide and the closing log line."""

from __future__ import annotations

from collections.abc import Mapping

import anndata as ad
import numpy as np
from scanpy import logging as logg


def spatial_uns(
    library_id: str,
    *,
    images: Mapping[str, np.ndarray],
    scalefactors: Mapping[str, float],
    metadata: Mapping[str, object] | None = None,
) -> dict:
    """`uns['spatial']` of one slide in the scanpy/squidpy Visium layout (arrays and floats, plain dicts)."""
    return {
        library_id: {
            "images": {k: np.asarray(v) for k, v in images.items()},
            "scalefactors": {k: float(v) for k, v in scalefactors.items()},
            "metadata": dict(metadata or {}),
        }
    }


def log_loaded(adata: ad.AnnData, start) -> None:
    """Log the end of a dataset load (sizes and the slots every loader writes) with the time since `start`."""
    logg.info(
        f"    finished: {adata.n_obs} spots x {adata.n_vars} genes",
        time=start,
        deep="added\n    'spatial', spot centres (adata.obsm)\n    'spatial', images and scale factors (adata.uns)",
    )
