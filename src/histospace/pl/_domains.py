"""`pl.domains`: spatial domains drawn over the H&E image (squidpy's `spatial_scatter`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes

from histospace._constants import DOMAIN_KEY, LIBRARY_KEY
from histospace._utils._data import library_labels
from histospace.pl._utils import finish, plot_library


def domains(
    adata: AnnData,
    *,
    key: str = DOMAIN_KEY,
    groundtruth_key: str | None = None,
    library_id: str | None = None,
    library_key: str = LIBRARY_KEY,
    img: bool = True,
    img_res_key: str | None = None,
    size: float | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    **kwargs,
) -> Axes | None:
    """Plot spatial domains over the H&E image.

    Uses :func:`squidpy.pl.spatial_scatter` (spots at their true size over `uns['spatial'][library_id]['images']`).
    With `groundtruth_key`, the adjusted Rand index between the domains and that column (spots with a missing label
    excluded) is added to the title.

    Parameters
    ----------
    adata
        Annotated data matrix with `obs[key]` (from `hs.tl.domains`), `obsm['spatial']` and, for the image,
        `uns['spatial']`.
    key
        Column of `adata.obs` with the domains.
    groundtruth_key
        Column of `adata.obs` with reference labels; the ARI goes into the title.
    library_id
        Library (slide) to draw; `None` takes the only one. With several slides in one AnnData only the spots of
        that library (`obs[library_key]`) are drawn.
    library_key
        Column of `adata.obs` that tells the slides apart.
    img
        Draw the H&E image under the spots.
    img_res_key
        Image to use (`'hires'` or `'lowres'`); `None` takes `'hires'` when present, else `'lowres'`.
    size
        Spot size scale passed to squidpy (1 = the spot diameter).
    title
        Title; `None` uses `key` (and the ARI).
    ax
        Axes to draw into; a new figure otherwise.
    show
        Show the figure; `None` follows `scanpy.settings.autoshow`. With `show=False` the `Axes` is returned.
    **kwargs
        Passed to :func:`squidpy.pl.spatial_scatter` (e.g. `palette`, `alpha`, `crop_coord`).

    Returns
    -------
    The `Axes` when `show=False`, else `None`. Like scanpy, sets `adata.uns[key + '_colors']` when absent.
    """
    from histospace._utils._deps import quiet_import

    sq = quiet_import("squidpy")

    if key not in adata.obs:
        msg = f"`adata.obs[{key!r}]` not found; run `hs.tl.domains(adata)` first."
        raise KeyError(msg)
    if groundtruth_key is not None and groundtruth_key not in adata.obs:
        msg = f"`adata.obs[{groundtruth_key!r}]` not found."
        raise KeyError(msg)
    if "spatial" not in adata.obsm:
        msg = "`adata.obsm['spatial']` not found; spot coordinates are needed."
        raise KeyError(msg)
    lib = plot_library(adata, library_id, library_key)
    labels = library_labels(adata, library_key)
    sub = adata[labels == lib] if lib is not None and len(set(labels)) > 1 else adata
    use_img = img and lib is not None
    if use_img:
        images = adata.uns["spatial"][lib].get("images", {})
        if img_res_key is None:
            img_res_key = "hires" if "hires" in images else ("lowres" if "lowres" in images else None)
        if img_res_key is None or img_res_key not in images:
            msg = f"no image {img_res_key!r} in `adata.uns['spatial'][{lib!r}]['images']` (has {list(images)})."
            raise KeyError(msg)
    if title is None:
        title = key
        if groundtruth_key is not None:
            from sklearn.metrics import adjusted_rand_score

            gt = sub.obs[groundtruth_key]
            ok = gt.notna().to_numpy()
            ari = adjusted_rand_score(gt[ok].astype(str), sub.obs[key][ok].astype(str))
            title = f"{key} (ARI {ari:.3f} vs {groundtruth_key})"
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    sq_kwargs = {"img": use_img, "library_id": lib, "ax": ax, "title": title, "return_ax": True, **kwargs}
    if use_img:
        sq_kwargs["img_res_key"] = img_res_key
    else:
        sq_kwargs["shape"] = None
    if size is not None:
        sq_kwargs["size"] = size
    if lib is None:
        sq_kwargs.pop("library_id")
    sub = sub.copy() if sub is not adata else adata
    ax = sq.pl.spatial_scatter(sub, color=key, **sq_kwargs)
    if isinstance(ax, list | np.ndarray):
        ax = np.ravel(ax)[0]
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    return finish(ax, show)
