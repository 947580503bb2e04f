"""mclSTExp: train a reference model, predict expression from H&E image features."""

from __future__ import annotations

from typing import Literal

import numpy as np
from anndata import AnnData
from scanpy import logging as logg

from histospace._utils import check_unique_obs_names, doc_params, version_string
from histospace.models._mclstexp import MclSTExp

_TRAIN_KEYS = ("max_epochs", "batch_size", "lr", "weight_decay", "device", "random_state", "n_models", "progress_bar")


@doc_params()
def mclstexp_train(adata_ref: AnnData, **kwargs) -> MclSTExp:
    """Build and train an :class:`~histospace.models.MclSTExp` model on reference slides (a thin wrapper).

    Parameters
    ----------
    adata_ref
        Reference: one or more slides with counts, image features in `.obsm` and positions.
    **kwargs
        Keyword arguments of :class:`~histospace.models.MclSTExp` (e.g. `genes`, `image_key`, `library_key`,
        `temperature`) and of :meth:`~histospace.models.MclSTExp.train` (`max_epochs`, `batch_size`, `lr`,
        `weight_decay`, `device`, `random_state`, `n_models`, `progress_bar`).

    Returns
    -------
    The trained model. Nothing is written to `adata_ref`.
    """
    train_kwargs = {k: kwargs.pop(k) for k in _TRAIN_KEYS if k in kwargs}
    model = MclSTExp(adata_ref, **kwargs)
    return model.train(**train_kwargs)


@doc_params()
def mclstexp_predict(
    adata: AnnData,
    *,
    model: MclSTExp,
    n_neighbors: int = 200,
    weighting: Literal["inverse_square", "uniform", "softmax"] = "inverse_square",
    smooth_neighbors: int = 0,
    img=None,
    batch_size: int = 4096,
    key_added: str = "mclstexp",
    copy: bool = False,
) -> AnnData | None:
    """Predict the expression of the model's gene panel from the H&E image features of `adata`.

    Each query spot (or tile) is embedded by the model's image side; its expression is the weighted mean of the
    normalised expression of its `n_neighbors` nearest reference spots (cosine similarity in the joint space).

    Parameters
    ----------
    adata
        {adata}
        It needs the image features the model was trained on (`adata.obsm[model.params['image_key']]`, from
        :func:`histospace.pp.image_features`), or an image (`img=` or `adata.uns['spatial']`) for a model with a
        fine-tuned encoder. Expression is not needed (H&E-only slides and tiles from
        :func:`histospace.pp.tile_image` work).
    model
        A trained :class:`~histospace.models.MclSTExp` (from :func:`mclstexp_train` or
        :meth:`~histospace.models.MclSTExp.load`).
    n_neighbors
        Reference spots averaged per query (reference: 200); at most the number of reference spots.
    weighting
        `'inverse_square'`: weights `1/d^2` of the Euclidean embedding distance (reference); `'uniform'`: plain mean;
        `'softmax'`: softmax of the model's logits over the neighbours.
    smooth_neighbors
        Average each query's image embedding with those of its `smooth_neighbors` nearest spatial neighbours
        (`obsm['spatial']`, within a slide) before the search. `0` (reference) switches it off.
    img
        Full-resolution image (array, path, or dict per library) for a model with a fine-tuned encoder.
    batch_size
        Query rows per chunk of the nearest-neighbour search.
    key_added
        Key of the layer and of the `uns` entry.
    copy
        {copy}

    Returns
    -------
    The return value depends on the genes of `adata`:

    * `adata` holds exactly the model's genes (same set, any order): returns `None` if `copy=False`, else a copy,
      with

      `adata.layers['mclstexp' | key_added]` : :class:`numpy.ndarray` (dtype `float32`)
          Predicted normalised expression `(n_obs, n_vars)`, in the gene order of `adata`.
      `adata.uns['mclstexp' | key_added]` : :class:`dict`
          `params` (n_neighbors, weighting, model parameters) and `version`.

    * otherwise (other genes, or an H&E-only AnnData with no genes): `adata` is left untouched (whatever `copy`) and a
      **new** AnnData is returned with the model's genes as `var`, the predictions as `X` (float32), `obs`,
      `obsm['spatial']`, `obsm[image_key]` and `uns['spatial']` carried over, and `uns['mclstexp' | key_added]`.
    """
    if not isinstance(model, MclSTExp):
        msg = f"`model` must be a trained `hs.models.MclSTExp`, got {type(model).__name__}."
        raise TypeError(msg)
    model._check_trained()
    check_unique_obs_names(adata)
    n_ref = model.reference_expression.shape[0]
    if not isinstance(n_neighbors, int | np.integer) or not 1 <= n_neighbors <= n_ref:
        msg = f"`n_neighbors={n_neighbors}` must be an integer between 1 and the number of reference spots ({n_ref})."
        raise ValueError(msg)
    if weighting not in ("inverse_square", "uniform", "softmax"):
        msg = f"`weighting` must be 'inverse_square', 'uniform' or 'softmax', got {weighting!r}."
        raise ValueError(msg)
    if smooth_neighbors < 0:
        msg = f"`smooth_neighbors` must be >= 0, got {smooth_neighbors}."
        raise ValueError(msg)
    if smooth_neighbors > 0 and model.params["spatial_key"] not in adata.obsm:
        msg = f"`adata.obsm[{model.params['spatial_key']!r}]` not found; `smooth_neighbors>0` needs coordinates."
        raise KeyError(msg)
    model.check_query(adata, img=img)

    start = logg.info(f"predicting {len(model.genes)} genes for {adata.n_obs} spots with mclSTExp")
    pred = model.predict(
        adata,
        n_neighbors=int(n_neighbors),
        weighting=weighting,
        smooth_neighbors=int(smooth_neighbors),
        img=img,
        batch_size=batch_size,
    )
    p = model.params
    uns = {
        "params": {
            "n_neighbors": int(n_neighbors),
            "weighting": weighting,
            "smooth_neighbors": int(smooth_neighbors),
            "image_key": p["image_key"],
            "normalize": p["normalize"],
            "spot_encoder": p["spot_encoder"],
            "n_reference_spots": int(n_ref),
            "n_models": int(model.n_models_),
            "genes": list(model.genes),
        },
        "version": version_string(),
    }
    same_genes = adata.n_vars == len(model.genes) and set(adata.var_names) == set(model.genes)
    if same_genes:
        adata = adata.copy() if copy else adata
        order = np.asarray([model.genes.index(g) for g in adata.var_names])
        adata.layers[key_added] = np.ascontiguousarray(pred[:, order], dtype=np.float32)
        adata.uns[key_added] = uns
        logg.info(
            "    finished",
            time=start,
            deep=f"added\n    {key_added!r}, predicted expression (adata.layers)\n    {key_added!r}, params (adata.uns)",
        )
        return adata if copy else None

    import pandas as pd

    out = AnnData(
        X=pred.astype(np.float32),
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=pd.Index(model.genes, name=None)),
    )
    sk = p["spatial_key"]
    if sk in adata.obsm:
        out.obsm[sk] = np.asarray(adata.obsm[sk]).copy()
    if p["image_key"] in adata.obsm:
        out.obsm[p["image_key"]] = np.asarray(adata.obsm[p["image_key"]]).copy()
    if "spatial" in adata.uns:
        import copy as _copy

        out.uns["spatial"] = _copy.deepcopy(adata.uns["spatial"])
    out.uns[key_added] = uns
    logg.info("    finished", time=start, deep="returned a new AnnData: predicted expression in .X")
    return out
