"""`pl.training_history`: loss curves of any histospace model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes

from histospace._utils._sdata import as_table, is_spatialdata
from histospace.pl._utils import finish


def _history_of(model_or_adata, key: str | None, table_key: str | None) -> tuple[dict[str, np.ndarray], str]:
    if is_spatialdata(model_or_adata):
        model_or_adata = as_table(model_or_adata, table_key, name="model_or_adata")[0]
    if isinstance(model_or_adata, AnnData):
        if key is None:
            msg = "pass `key=` naming the `adata.uns` entry with the history (e.g. key='stereomm' or 'mclstexp')."
            raise ValueError(msg)
        if key not in model_or_adata.uns:
            msg = f"`adata.uns[{key!r}]` not found; train a model first (e.g. `hs.tl.stereomm(adata)`)."
            raise KeyError(msg)
        entry = model_or_adata.uns[key]
        if not isinstance(entry, Mapping) or "history" not in entry:
            msg = f"`adata.uns[{key!r}]` has no 'history'."
            raise KeyError(msg)
        return dict(entry["history"]), key
    hist = getattr(model_or_adata, "history", None)
    if not isinstance(hist, Mapping):
        msg = (
            "`model_or_adata` must be an AnnData, a SpatialData or a model with a `.history` dict, got "
            f"{type(model_or_adata).__name__}."
        )
        raise TypeError(msg)
    return dict(hist), type(model_or_adata).__name__


def training_history(
    model_or_adata,
    *,
    key: str | None = None,
    table_key: str | None = None,
    metrics: Sequence[str] | None = None,
    log: bool | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """Plot the training history (loss per epoch) of a histospace model.

    Parameters
    ----------
    model_or_adata
        A model with a `.history` dict of per-epoch lists (e.g. :class:`~histospace.models.StereoMM`), or an AnnData
        (or a SpatialData whose table has it) with `adata.uns[key]['history']` (written by `hs.tl.stereomm` and the
        mclSTExp tools).
    key
        Key in `adata.uns` when an AnnData or a SpatialData is passed (e.g. `'stereomm'`).
    table_key
        SpatialData: the table holding `uns[key]` (default: the only one).
    metrics
        History entries to draw; `None` draws all. Entries of other lengths than the first (e.g. per-validation
        values) are drawn against their own index.
    log
        Logarithmic y axis; `None` uses one when all values are positive and span more than a factor 10.
    ax
        Axes to draw into; a new figure otherwise.
    show
        Show the figure; `None` follows `scanpy.settings.autoshow`. With `show=False` the `Axes` is returned.

    Returns
    -------
    The `Axes` when `show=False`, else `None`.
    """
    hist, name = _history_of(model_or_adata, key, table_key)
    if metrics is not None:
        missing = [m for m in metrics if m not in hist]
        if missing:
            msg = f"{missing} not in the history; available: {list(hist)}."
            raise KeyError(msg)
        hist = {m: hist[m] for m in metrics}
    series = {k: np.asarray(v, dtype=float).ravel() for k, v in hist.items() if np.size(v)}
    if not series:
        msg = "the history is empty; train the model first."
        raise ValueError(msg)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    for k, v in series.items():
        ax.plot(np.arange(1, len(v) + 1), v, label=k, marker="o" if len(v) < 20 else None, ms=3)
    allv = np.concatenate(list(series.values()))
    allv = allv[np.isfinite(allv)]
    if log is None:
        log = bool(allv.size and allv.min() > 0 and allv.max() / allv.min() > 10)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(f"{name} training history")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return finish(ax, show)
