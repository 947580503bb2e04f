"""`tl.stereomm`: train StereoMM and write its latent to the AnnData."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from anndata import AnnData
from scanpy import logging as logg

from histospace._constants import CONNECTIVITIES_KEY, FEATURES_KEY, STEREOMM_KEY
from histospace._utils import doc_params, version_string
from histospace._utils._data import check_key_added, uns_safe
from histospace._utils._sdata import as_table, table_output

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

    from histospace.models import StereoMM


@doc_params()
def stereomm(
    adata: AnnData | SpatialData,
    *,
    table_key: str | None = None,
    layer: str | None = None,
    features_key: str | None = FEATURES_KEY,
    connectivity_key: str = CONNECTIVITIES_KEY,
    preset: Literal["reference"] | None = None,
    n_latent: int | None = None,
    hidden: list[int] | None = None,
    attention: Literal["auto", "global", "global_trainable", "local", "local_trainable", "none"] | None = None,
    n_pcs: int | None | Literal["default"] = "default",
    max_epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | Literal["auto", "full"] = "auto",
    n_models: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    devices: int = 1,
    random_state: int | None = 0,
    progress_bar: bool = True,
    key_added: str = STEREOMM_KEY,
    return_model: bool = False,
    copy: bool = False,
) -> AnnData | SpatialData | StereoMM | tuple[AnnData | SpatialData, StereoMM] | None:
    """Integrate expression, H&E image features and the spatial graph with StereoMM :cite:p:`Luo2024`.

    A thin wrapper around :class:`histospace.models.StereoMM`: build the model, train it and write the latent mean.
    The defaults are described in :class:`~histospace.models.StereoMM`; `preset='reference'` uses the settings of
    the StereoMMv1 code. Use `sc.pp.neighbors(adata, use_rep='X_stereomm')` or `hs.tl.domains(adata)` next.

    Parameters
    ----------
    adata
        {adata}
    table_key
        {table_key}
    layer
        Layer with the expression (counts or normalised, non-negative); `None` uses `adata.X`.
    features_key
        Key in `adata.obsm` with image features (`hs.pp.image_features`); `None` for an expression-only model.
    connectivity_key
        Key in `adata.obsp` with the spatial graph (`hs.pp.spatial_graph`, or squidpy's `spatial_neighbors_grid` and its
        siblings), or the graph's base name: after `hs.pp.spatial_graph(adata, key_added='x')` pass `'x'` (or the full
        `'x_connectivities'`).
    preset
        `None` (histospace defaults) or `'reference'` (StereoMMv1 settings).
    n_latent
        Latent width (default 32; 100 with the reference preset).
    hidden
        Encoder widths of the graph VAE (default `[256, 64]`).
    attention
        `'auto'`, `'global'`, `'global_trainable'`, `'local'`, `'local_trainable'` or `'none'` (see :class:`~histospace.models.StereoMM`).
    n_pcs
        PCA width of both modalities (default 50; `None` keeps z-scored genes).
    max_epochs
        Training epochs (default 300; 100 with the reference preset).
    lr
        Learning rate (default 1e-3; 1e-4 with the reference preset).
    batch_size
        `'auto'` (full batch up to 20,000 spots, spatial tiles of 16,384 spots with a halo beyond), `'full'`, or an
        int.
    n_models
        Seed ensemble (default 3; 1 with the reference preset): `n_models` models trained from seeds `random_state`,
        `random_state + 1`, ...; their latents are written side by side and `hs.tl.domains` clusters them together,
        which depends less on the seed than one model does. `n_models=1` is 3 times faster.
    model_kwargs
        Other arguments of :class:`~histospace.models.StereoMM` (e.g. `gene_selection`, `n_top_genes`, `proj_dim`,
        `graph_weight`, `contrastive_weight`).
    train_kwargs
        Other arguments of :meth:`~histospace.models.StereoMM.train` (e.g. `weight_decay`, `clip_norm`).
    device
        {device}
    devices
        {devices}
    random_state
        {random_state}
    progress_bar
        {progress_bar}
    key_added
        Key in `adata.obsm` for the latent. The `uns` key is `key_added` without a leading `'X_'`.
    return_model
        Also return the trained model (to save it, or to look at `.history`).
    copy
        {copy}

    Returns
    -------
    `None` if `copy=False`, else an `AnnData` (a `SpatialData` for a SpatialData); with `return_model=True` the model,
    or `(copy, model)` when `copy=True`. Sets the following fields (of the table, for a SpatialData):

    `adata.obsm['X_stereomm' | key_added]` : :class:`numpy.ndarray` (dtype `float32`)
        Latent mean, shape `(n_obs, n_models * n_latent)`: the latents of the `n_models` models side by side (model
        `m` in columns `m * n_latent` to `(m + 1) * n_latent`). scanpy's neighbours and UMAP take it as it is.
    `adata.uns['stereomm' | key_added without 'X_']` : :class:`dict`
        `'params'` (resolved model and training parameters, `'n_models'` and `'n_latent'` among them; `hs.tl.domains`
        reads `'n_models'`; `'image_features'`: how the image features were made, as recorded by
        :func:`histospace.pp.image_features`: encoder, weights, patch size in px and µm, ...; `'graph_weight'` used
        and, with `graph_weight='auto'`, the `'neighbour_dissimilarity'` it was chosen from), `'history'` (`'loss'`,
        `'reconstruction'`, `'kl'`: float32 arrays, one value per epoch, the mean over the models) and `'version'`.
    """
    from histospace.models import StereoMM

    check_key_added(key_added)
    adata, ctx = as_table(adata, table_key)
    uns_key = key_added[2:] if key_added.startswith("X_") and len(key_added) > 2 else key_added
    start = logg.info("running StereoMM")
    model = StereoMM(
        adata,
        layer=layer,
        features_key=features_key,
        connectivity_key=connectivity_key,
        preset=preset,
        n_latent=n_latent,
        hidden=hidden,
        attention=attention,
        n_pcs=n_pcs,
        **(model_kwargs or {}),
    )
    model.train(
        max_epochs=max_epochs,
        lr=lr,
        batch_size=batch_size,
        n_models=n_models,
        device=device,
        devices=devices,
        random_state=random_state,
        progress_bar=progress_bar,
        **(train_kwargs or {}),
    )
    z = model.get_latent_representation()
    out = adata.copy() if copy else adata
    out.obsm[key_added] = z.astype(np.float32, copy=False)
    params = {**model.init_params_, **model.config, **model.train_params}
    params["layer"] = "X" if layer is None else layer
    params["width"] = int(model.dim)
    for k in ("fit_seconds", "attention_cache_seconds", "chunk_size", "n_pcs"):
        params.pop(k, None)
    if model.config["n_pcs"] is not None:
        params["n_pcs"] = int(model.config["n_pcs"])
    if model.feature_settings:
        params["image_features"] = dict(model.feature_settings)
    out.uns[uns_key] = {
        "params": uns_safe(params),
        "history": {k: np.asarray(v, dtype=np.float32) for k, v in model.history.items()},
        "version": version_string(),
    }
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    {key_added!r}, latent (adata.obsm)\n    {uns_key!r}, parameters and history (adata.uns)",
    )
    if copy:
        out = table_output(ctx, out, copy)
        return (out, model) if return_model else out
    return model if return_model else None
